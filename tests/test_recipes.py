"""Every recipe file loads and validates against the command it feeds, GPU recipes included, and every key it sets
reaches that command's config with the value it states."""

import dataclasses
import importlib
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from core.config import RECIPES_DIR, load_config, load_recipe, to_plain

ROOT = RECIPES_DIR.parent

# recipes/<folder>/ is read by exactly one command, named like the folder: its module and config dataclasses.
COMMANDS = {
    "magpie": ("data_synth.magpie", ["MagpieConfig"]),
    "tag": ("data_synth.tag", ["TagConfig"]),
    "select": ("data_synth.select", ["SelectConfig"]),
    "pairs": ("data_synth.pairs", ["PairsConfig"]),
    "report": ("data_synth.report", ["ReportConfig"]),
    "sft": ("train.sft", ["SFTScriptArgs", "SFTConfig"]),
    "dpo": ("train.dpo", ["ScriptArgs", "DPOConfig"]),
    "generate": ("eval.generate", ["GenerateConfig"]),
    "alpaca_eval": ("eval.alpaca_eval", ["AlpacaEvalConfig"]),
    "arena_hard": ("eval.arena_hard", ["ArenaHardConfig"]),
    "lm_eval": ("eval.lm_eval", ["LmEvalConfig"]),
    "pairwise": ("eval.pairwise", ["PairwiseConfig"]),
    "sweeps": ("experiments.sweep", ["SweepConfig"]),
    "corpus": ("data_synth.corpus", ["CorpusConfig"]),
    "augment": ("data_synth.augment", ["AugmentConfig"]),
    "backtranslate": ("data_synth.backtranslate", ["BacktranslateConfig"]),
}


def command(stage: str) -> Any:
    if stage not in COMMANDS:
        pytest.fail(f"recipes/{stage}/ is not a command's folder: name it after the command that reads it "
                    f"and register it in COMMANDS (known: {', '.join(COMMANDS)})")  # fmt: skip
    return importlib.import_module(COMMANDS[stage][0])


def schemas(stage: str) -> tuple[type, ...]:
    module = command(stage)
    return tuple(getattr(module, name) for name in COMMANDS[stage][1])


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Every value a recipe sets, by dotted key (mappings are followed, a list is one value)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def built_value(built: tuple[Any, ...], dotted: str) -> Any:
    """The value at `dotted` in the built configs; a top-level key belongs to the first schema with that field,
    as `build` routes it."""
    first, *rest = dotted.split(".")
    owner = next(b for b in built if first in {f.name for f in dataclasses.fields(b)})
    value = getattr(owner, first)
    while rest:  # a mapping's own keys may hold dots (a sweep's `grid: {sft.learning_rate: [...]}`)
        for n in range(len(rest), 0, -1):
            key = ".".join(rest[:n])
            if isinstance(value, dict) and key in value:
                value, rest = value[key], rest[n:]
                break
        else:
            value, rest = getattr(value, rest[0]), rest[1:]
    return to_plain(value)


def same(stated: Any, built: Any) -> bool:
    """`built` is what the recipe stated: equal, a float field holding the number the YAML spelled (YAML 1.1 reads
    `2e-5` as a string), and a dataclass in a list holding at least the keys the recipe set."""
    if isinstance(stated, dict):
        return isinstance(built, dict) and all(k in built and same(v, built[k]) for k, v in stated.items())
    if isinstance(stated, list):
        return isinstance(built, list) and len(stated) == len(built) and all(map(same, stated, built))
    if isinstance(built, float) and isinstance(stated, (int, str)) and not isinstance(stated, bool):
        try:
            return float(stated) == built
        except ValueError:
            return False
    return type(stated) is type(built) and stated == built


# What a schema does to a stated value on purpose: transformers' TrainingArguments reads `report_to: tensorboard`
# as the list ['tensorboard'] and `report_to: none` as no reporter at all.
NORMALIZED = {"report_to": lambda v: [] if v == "none" else [v] if isinstance(v, str) else v}

RECIPES = sorted(p for p in RECIPES_DIR.glob("*/*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[f"{p.parent.name}/{p.stem}" for p in RECIPES])
def test_recipe_validates(path: Path):
    stage = path.parent.name
    # GPU recipes ask for bf16, which transformers refuses on a machine without a GPU unless told it is CPU.
    extra = ["use_cpu=true"] if stage in ("sft", "dpo") else []
    built = load_config(stage, [f"recipe={path.stem}", *extra], *schemas(stage))
    stated = leaves(OmegaConf.to_container(load_recipe(stage, path.stem), resolve=True))  # `base:` included
    assert stated
    wrong = {key: (value, built_value(built, key)) for key, value in stated.items()
             if not same(NORMALIZED.get(key, lambda v: v)(value), built_value(built, key))}  # fmt: skip
    assert not wrong, f"recipe {path} states (value, built as): {wrong}"


@pytest.mark.parametrize("stage", sorted(p.name for p in RECIPES_DIR.iterdir() if p.is_dir()))
def test_each_folder_is_read_by_the_command_it_is_named_after(stage: str, capsys):
    with pytest.raises(SystemExit) as exit_:
        command(stage).main(["recipe=no_such_recipe"])
    assert exit_.value.code == 2
    assert f"unknown {stage} recipe 'no_such_recipe'" in capsys.readouterr().err
    assert list((RECIPES_DIR / stage).glob("*.yaml")), f"recipes/{stage}/ holds no recipe"


def test_every_trained_model_a_command_line_names_is_one_training_writes():
    """A full fine-tune saves its model in output_dir; only an adapter run with merge_lora writes output_dir/merged.
    The README and the recipes' comments pointed evaluation at runs/magpie_pro_300k/merged, which never exists."""
    import re

    trained: dict[str, set] = {}  # output_dir -> {(peft, merge_lora)} of the training recipes that write it
    for stage in ("sft", "dpo"):
        for path in (RECIPES_DIR / stage).glob("*.yaml"):
            raw = OmegaConf.to_container(load_recipe(stage, path.stem), resolve=True)
            if raw.get("output_dir"):  # (a demo and a paper recipe may write the same directory)
                written = (raw.get("peft", "lora"), raw.get("merge_lora", False))
                trained.setdefault(raw["output_dir"].rstrip("/"), set()).add(written)
    texts = [ROOT / "README.md", ROOT / "Makefile", *sorted(RECIPES_DIR.rglob("*.yaml"))]
    named = [(p.name, m.group(1), m.group(2)) for p in texts
             for m in re.finditer(r"model(?:s\.\w+)?[=:] ?(runs/[\w./-]+?)(/merged)?(?=[\s,}\"']|$)", p.read_text())]  # fmt: skip
    checked = 0
    for where, run, merged in named:
        if run not in trained:
            continue
        checked += 1
        if merged:
            assert any(peft != "none" and merge for peft, merge in trained[run]), (
                f"{where}: {run}/merged is never written"
            )
        else:
            assert any(peft == "none" for peft, _ in trained[run]), (
                f"{where}: {run} holds an adapter only; name /merged"
            )
    assert checked >= 3
