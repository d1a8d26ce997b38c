"""Supervised fine-tuning on conversations, with trl's SFTTrainer.

    accelerate launch [--config_file accelerate_configs/X.yaml] train/sft.py recipe=NAME [key=value ...]
    python train/sft.py recipe=demo_sft dataset=runs/demo/magpie output_dir=runs/demo/sft

Keys are `SFTScriptArgs` (the shared `ScriptArgs` of train/common.py and SFT's data options) plus every field of
trl's `SFTConfig`.
"""

from __future__ import annotations

import itertools
import random
import sys
from dataclasses import dataclass, field

import datasets
from trl import SFTConfig, SFTTrainer

from core.chat import CONVERSATION_COLUMNS, check_messages, first_turn, to_messages
from core.config import ConfigError, cli
from core.data import batch_rows, open_dataset
from train.common import ScriptArgs, load_model, load_tokenizer, start, train_and_save


@dataclass
class SFTScriptArgs(ScriptArgs):
    """The shared keys plus SFT's own data options (dpo.py refuses these: it does not read them)."""

    dataset_mixture: dict[str, float] = field(default_factory=dict)  # source -> weight; replaces `dataset`
    mixture_seed: int = 42
    # source (`dataset`, or a key of `dataset_mixture`) -> a system prompt added to each of its rows (appended to
    # one the row has): Humpback tags seed and augmented data apart this way
    system_prompts: dict[str, str] = field(default_factory=dict)
    # train on (response -> instruction): each row's first exchange with its roles swapped, as Humpback's
    # backward model M_yx learns to predict the instruction a text answers
    reverse_pairs: bool = False
    drop_invalid: bool = False  # drop (and count) rows that are not valid conversations instead of failing

    def sources(self) -> list[str]:
        return list(self.dataset_mixture) if self.dataset_mixture else [self.dataset]


def mixture(script: SFTScriptArgs, sizes: list[int]) -> list[tuple[int, int]]:
    """(source number, row index) for `dataset`, or for every source of `dataset_mixture` (of `sizes` rows) at its
    weight: the share of its rows to take, sampled with the seed; a weight above 1 repeats the source."""
    if not script.dataset_mixture:
        return [(0, i) for i in range(sizes[0])]
    rng = random.Random(script.mixture_seed)
    out = []
    for k, weight in enumerate(script.dataset_mixture.values()):
        rows = range(sizes[k])
        full, rest = divmod(round(weight * len(rows)), len(rows)) if rows else (0, 0)
        out += [(k, i) for i in [*rows] * full + rng.sample(rows, rest)]
    rng.shuffle(out)
    return out


def reversed_pair(messages: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    """The first exchange backwards: its response as the user turn, its instruction as the reply to learn."""
    instruction, response = first_turn({"messages": messages}, where)
    return [{"role": "user", "content": response}, {"role": "assistant", "content": instruction}]


def with_system_prompt(messages: list[dict[str, str]], prompt: str) -> list[dict[str, str]]:
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']} {prompt}".strip()}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def as_messages(
    ds: datasets.Dataset,
    source: str,
    drop_invalid: bool,
    reverse: bool = False,
    system_prompt: str | None = None,
) -> datasets.Dataset:
    """`messages` (and whether the row is valid) for every row, converted in Arrow batches by `datasets.map`:
    ShareGPT `conversations`, instruction/response and the other layouts become chat messages (reversed, and with
    the source's system prompt, when asked), and a bad row fails naming its source and index (or, with
    drop_invalid, is marked and dropped later)."""

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = {"messages": [], "__valid__": []}
        for i, row in zip(indices, batch_rows(batch), strict=True):
            where = f"{source}: row {i}"
            try:
                messages = to_messages(row, where)
                if reverse:
                    messages = reversed_pair(messages, where)
                if system_prompt:
                    messages = with_system_prompt(messages, system_prompt)
                check_messages(messages, where)
            except ConfigError:
                if not drop_invalid:
                    raise
                messages = []
            out["messages"].append(messages)
            out["__valid__"].append(bool(messages))
        return out

    columns = [c for c in CONVERSATION_COLUMNS if c in ds.column_names]
    if not columns:  # no conversation anywhere: fail on the first row, which names what was expected
        to_messages(ds[0], f"{source}: row 0")
    # One schema for every source, so a mixture concatenates whatever string types its files use
    features = datasets.Features(
        {
            "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "__valid__": datasets.Value("bool"),
        }
    )
    return ds.select_columns(columns).map(
        convert,
        batched=True,
        with_indices=True,
        remove_columns=columns,
        features=features,
        desc=f"messages of {source}",
    )


def load_conversations(script: SFTScriptArgs) -> datasets.Dataset:
    """A `datasets.Dataset` with only the `messages` column, Arrow end to end (`load_dataset`, `map`, `select`).
    Every row is validated: a bad one fails naming its source and index, or with `drop_invalid=true` is dropped
    and counted."""
    names = script.sources()
    unknown = sorted(set(script.system_prompts) - set(names))
    if unknown:
        raise ConfigError(f"system_prompts: {unknown} are not sources of this run; sources: {names}")
    converted = [
        as_messages(
            open_dataset(name, script.dataset_split),
            name,
            script.drop_invalid,
            script.reverse_pairs,
            script.system_prompts.get(name),
        )
        for name in names
    ]
    offsets = [0, *itertools.accumulate(len(ds) for ds in converted)]
    picked = mixture(script, [len(ds) for ds in converted])
    if script.max_samples is not None:
        picked = picked[: script.max_samples]
    dataset = datasets.concatenate_datasets(converted).select([offsets[k] + i for k, i in picked])
    valid = dataset.filter(lambda b: b["__valid__"], batched=True).remove_columns("__valid__")
    if len(valid) < len(dataset):
        print(f"dropped {len(dataset) - len(valid)} invalid rows of {len(dataset)} (drop_invalid=true)")
    return valid


def build_trainer(script: SFTScriptArgs, args: SFTConfig) -> SFTTrainer:
    """Data, tokenizer, model and trainer, in that order (alignment-handbook's shape)."""
    dataset = load_conversations(script)
    tokenizer = load_tokenizer(script, args, assistant_only_loss=args.assistant_only_loss)
    model, lora = load_model(script, args, tokenizer)
    return SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
    )


@cli
def main(argv: list[str] | None = None) -> None:
    script, args, state = start("sft", argv, SFTScriptArgs, SFTConfig)
    trainer = build_trainer(script, args)
    train_and_save(trainer, script, args, state, "SFT")


if __name__ == "__main__":
    main(sys.argv[1:])
