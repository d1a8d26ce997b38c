"""The preference methods behind train/dpo.py's `method` switch: each trains the embedded model for real, its loss is
the method's own (recomputed from what the trainer logs, and no other method's formula fits the same steps), and it
learns to prefer the chosen replies."""

import json
import math
from pathlib import Path

import pytest
import torch

from core.config import ConfigError, parse_config
from train.dpo import METHODS, PreferenceArgs, build_trainer, config_from, load_preferences

SYSTEM = {
    "role": "system",
    "content": "Be brief.",
}  # shorter than SmolLM2's default system prompt: faster steps
PAIRS = [  # chosen and rejected differ clearly
    ("Name a planet.", "Mars is a planet.", "Bananas are yellow fruit."),
    ("What is 2 + 2?", "2 + 2 = 4.", "It is 17, obviously."),
    ("Say hi in French.", "Bonjour !", "Goodbye forever."),
    ("What color is the sky?", "The sky is blue.", "Cheese."),
]


def write_pairs(path: Path) -> Path:
    rows = [
        {
            "prompt": [SYSTEM, {"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        }
        for q, c, r in PAIRS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(logsig(x))


# Each method's loss from one logged step of one pair (KTO: one good and one bad row), as its paper writes it. Logged
# rewards are beta x log-ratio to the reference (DPO's family, KTO), or beta x the policy's log-probability (CPO's:
# summed for SLiC, averaged per token for SimPO); `lengths` are the reply's token counts (IPO averages per token).
def dpo(e, a, n):
    return -logsig(e["rewards/margins"])


def robust(e, a, n):
    m, eps = e["rewards/margins"], a.label_smoothing or 0.1  # as a rival of plain DPO: robust DPO's default
    return (-(1 - eps) * logsig(m) + eps * logsig(-m)) / (1 - 2 * eps)


def apo_zero(e, a, n):
    return 1 - sig(e["rewards/chosen"]) + sig(e["rewards/rejected"])


def ipo(e, a, n):
    chosen, rejected = e["rewards/chosen"] / a.beta / n[0], e["rewards/rejected"] / a.beta / n[1]
    return (chosen - rejected - 1 / (2 * a.beta)) ** 2


def hinge(e, a, n):  # SLiC-HF: margin 1/beta on the policy's log-probabilities, plus cpo_alpha x NLL
    return max(0.0, 1 - e["rewards/margins"]) + a.cpo_alpha * e["nll_loss"]


def simpo(e, a, n):
    return -logsig(e["rewards/margins"] - a.simpo_gamma) + a.cpo_alpha * e["nll_loss"]


def orpo(e, a, n):
    assert math.isclose(e["log_odds_ratio"], logsig(e["log_odds_chosen"]), rel_tol=1e-4, abs_tol=1e-5)
    return e["nll_loss"] - a.beta * e["log_odds_ratio"]


def kto(e, a, n):
    kl = a.beta * e["kl"]
    good = a.desirable_weight * (1 - sig(e["rewards/chosen"] - kl))
    bad = a.undesirable_weight * (1 - sig(kl - e["rewards/rejected"]))
    return (good + bad) / 2


LOSSES = {"dpo": dpo, "ipo": ipo, "robust": robust, "apo_zero": apo_zero, "slic": hinge, "simpo": simpo,
          "orpo": orpo, "kto": kto}  # fmt: skip
RIVALS = {  # the other formulas that read the same logged quantities
    **dict.fromkeys(["dpo", "ipo", "robust", "apo_zero"], ["dpo", "ipo", "robust", "apo_zero"]),
    **dict.fromkeys(["slic", "simpo"], ["slic", "simpo"]),
    "orpo": ["orpo"],
    "kto": ["kto"],
}


# SLiC's hinge on summed log-probabilities is already cleared by these easy pairs at the demo's margin (1/beta = 1):
# a wider margin keeps it active, so the steps tell it apart from SimPO's
TEST_SETTINGS = {"slic": ["beta=0.05"]}
# DPO whose reference log-probabilities are computed once before training (no reference forward in the steps)
VARIANTS = {"dpo_precomputed": ("dpo", ["precompute_ref_log_probs=true"])}


def config(method: str, tmp_path: Path, *overrides: str) -> tuple[PreferenceArgs, object]:
    argv, config_class = config_from([f"recipe=demo_{method}", *overrides])
    return parse_config("dpo", argv, PreferenceArgs, config_class)


@torch.no_grad()
def chosen_over_rejected(trainer) -> float:
    """Mean over PAIRS of log p(chosen) - log p(rejected) under the model, computed here without trl."""
    model, tok = trainer.model, trainer.processing_class
    seqs, starts, signs = [], [], []
    for q, c, r in PAIRS:
        prompt = [SYSTEM, {"role": "user", "content": q}]
        start = len(
            tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        )
        for sign, reply in ((1, c), (-1, r)):
            seqs.append(tok.apply_chat_template([*prompt, {"role": "assistant", "content": reply}], tokenize=True,
                                                return_dict=False))  # fmt: skip
            starts.append(start)
            signs.append(sign)
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    model.eval()
    logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
    model.train()
    token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    total = sum(sign * token_logp[i, start - 1 : len(seqs[i]) - 1].sum().item()
                for i, (start, sign) in enumerate(zip(starts, signs, strict=True)))  # fmt: skip
    return total / len(PAIRS)


def reply_lengths(trainer, step: int) -> tuple[int, int]:
    """Token counts of the chosen and rejected replies the step trained on (sequential order, one pair a step)."""
    row = trainer.train_dataset[step % len(trainer.train_dataset)]
    return len(row["chosen_ids"]), len(row["rejected_ids"])


@pytest.mark.integration
@pytest.mark.parametrize("case", [*METHODS, *VARIANTS])
def test_each_method_trains_with_its_own_loss_and_learns_the_preference(case, tmp_path):
    method, variant = VARIANTS.get(case, (case, []))
    kto_batch = METHODS[method].unpaired
    script, args = config(
        method, tmp_path,
        f"dataset={write_pairs(tmp_path / 'pairs.jsonl')}", f"output_dir={tmp_path / 'out'}",
        "max_steps=3", f"per_device_train_batch_size={2 if kto_batch else 1}", "gradient_accumulation_steps=1",
        "learning_rate=2e-3", "lr_scheduler_type=constant", "warmup_steps=0", "max_length=96", "lora_r=8",
        "lora_alpha=16", "save_strategy=no", "merge_lora=false", "train_sampling_strategy=sequential",
        *TEST_SETTINGS.get(method, []), *variant,
    )  # fmt: skip
    trainer = build_trainer(script, args)
    assert type(trainer).__name__ == METHODS[method].trainer.split(":")[1]
    assert ("ref_chosen_logps" in trainer.train_dataset.column_names) == (case == "dpo_precomputed")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)
    margin_before = chosen_over_rejected(trainer)
    trainer.train()

    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"{method}: trainable parameters that did not change: {unchanged[:5]}"

    steps = [e for e in trainer.state.log_history if "loss" in e and "rewards/chosen" in e]
    assert len(steps) == 3
    paired = (
        "chosen_ids" in trainer.train_dataset.column_names
    )  # DPOTrainer's rows: IPO's formula reads lengths
    lengths = [reply_lengths(trainer, i) if paired else None for i in range(len(steps))]
    for rival in RIVALS[method]:
        fits = [math.isclose(e["loss"], LOSSES[rival](e, args, n), rel_tol=1e-3, abs_tol=1e-4)
                for e, n in zip(steps, lengths, strict=True)]  # fmt: skip
        if rival == method:
            assert all(fits), (
                f"{method}: logged loss vs its formula: {[(e['loss'], LOSSES[method](e, args, n)) for e, n in zip(steps, lengths, strict=True)]}"
            )
        else:
            assert not all(fits), f"{method}: the logged losses also fit {rival}'s formula"

    margin_after = chosen_over_rejected(trainer)
    assert margin_after > margin_before + 1.0, (method, margin_before, margin_after)


def test_kto_unpairs_pairs_into_alternating_good_and_bad_rows_and_reads_labelled_rows(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    script, _ = config("kto", tmp_path, f"dataset={pairs}", f"output_dir={tmp_path / 'o'}")
    rows = load_preferences(script, seed=0).to_list()
    assert [r["label"] for r in rows] == [True, False] * len(PAIRS)
    by_prompt = {r["prompt"][-1]["content"]: (r["completion"][0]["content"],) for r in rows[::2]}
    assert {(q, by_prompt[q][0]) for q, _, _ in PAIRS} == {(q, c) for q, c, _ in PAIRS}
    assert all(rows[i]["prompt"] == rows[i + 1]["prompt"] for i in range(0, len(rows), 2))

    thumbs = tmp_path / "thumbs.jsonl"
    thumbs.write_text(
        json.dumps({"prompt": "Hi?", "completion": "Hello!", "label": True}) + "\n"
        + json.dumps({"prompt": "Hi?", "completion": "No.", "label": "yes"}) + "\n"
    )  # fmt: skip
    script, _ = config("kto", tmp_path, f"dataset={thumbs}", f"output_dir={tmp_path / 'o'}")
    with pytest.raises(ConfigError, match=r"thumbs.jsonl: row 1: 'label' must be true .* got 'yes'"):
        load_preferences(script)
    script, _ = config("dpo", tmp_path, f"dataset={thumbs}", f"output_dir={tmp_path / 'o'}")
    with pytest.raises(ConfigError, match="method=dpo needs pairs .* use method=kto"):
        load_preferences(script)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["method=simpo", "precompute_ref_log_probs=true"],
         "precompute_ref_log_probs: method=simpo does not use it .*method dpo, ipo, robust, apo_zero, kto"),
        (["method=ipo", "label_smoothing=0.1"], "label_smoothing: method=ipo does not use it .*dpo, robust, simpo"),
        (["method=dpo", "simpo_gamma=1"], "simpo_gamma: method=dpo does not use it .*method simpo"),
        (["method=orpo", "cpo_alpha=1"], "cpo_alpha: method=orpo does not use it .*method slic, simpo"),
        (["method=ipo", "loss_type=sigmoid"], r"loss_type=sigmoid: method=ipo is loss_type=\['ipo'\]"),
        (["method=kto", "train_sampling_strategy=random"], "method=kto is train_sampling_strategy=sequential"),
        (["method=dpo", "padding_free=true"], "padding_free=true: trl's DPOTrainer ignores it"),
        (["method=kto", "per_device_train_batch_size=1"], "per_device_train_batch_size=1: method=kto .* at least 2"),
        (["method=sft"], "method 'sft': choose one of dpo, ipo, robust, apo_zero, slic, simpo, orpo, kto"),
        (["method=simpo", "simpo_gamma=-1"], "key .simpo_gamma.: must be >= 0, got -1"),
        (["method=robust", "label_smoothing=0.5"], r"key .label_smoothing.: must be in \[0, 0.5\), got 0.5"),
    ],
)  # fmt: skip
def test_a_key_the_method_does_not_use_fails_naming_the_methods_that_do(argv, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        config("dpo", tmp_path, *argv, "output_dir=/tmp/x")


def test_method_dpo_passes_any_trl_loss_and_the_methods_set_their_own(tmp_path):
    _, args = config(
        "dpo", tmp_path, "loss_type=[sigmoid,sft]", "loss_weights=[0.8,0.2]", "output_dir=/tmp/x"
    )
    assert args.loss_type == ["sigmoid", "sft"]  # MPO-style combination, trl's own
    for method, loss in (("ipo", ["ipo"]), ("robust", ["robust"]), ("slic", "hinge"), ("simpo", "simpo")):
        _, args = config(method, tmp_path, "output_dir=/tmp/x")
        assert args.loss_type == loss
    _, args = config("simpo", tmp_path, "output_dir=/tmp/x")
    assert args.cpo_alpha == 0.0 and args.beta == 2.0 and args.simpo_gamma == 1.0
    _, args = config("kto", tmp_path, "output_dir=/tmp/x")
    assert type(args).__name__ == "KTOConfig" and args.train_sampling_strategy == "sequential"
