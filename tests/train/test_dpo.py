import json

import pytest
import torch

from core.config import ConfigError, build, parse_config
from train.common import ScriptArgs
from train.dpo import DPOConfig, build_trainer, normalize_preference

USER = {"role": "user", "content": "Name a planet."}


def test_preference_rows_are_normalized_or_rejected_naming_the_row():
    good = {
        "prompt": [USER],
        "chosen": [{"role": "assistant", "content": "Mars."}],
        "rejected": [{"role": "assistant", "content": "A star."}],
    }
    assert normalize_preference(good, "r0") == good
    whole = {
        "prompt": "Name a planet.",
        "chosen": [USER, {"role": "assistant", "content": "Mars."}],
        "rejected": [USER, {"role": "assistant", "content": "A star."}],
    }  # UltraFeedback-binarized style
    assert normalize_preference(whole, "r1") == good
    assert normalize_preference({**good, "prompt": "Name a planet."}, "r2") == good
    with pytest.raises(ConfigError, match=r"rows.jsonl: row 3 \(rejected\): assistant turn 1 is empty"):
        normalize_preference(
            {**good, "rejected": [{"role": "assistant", "content": " "}]}, "rows.jsonl: row 3"
        )
    with pytest.raises(ConfigError, match="row 4: missing 'chosen'"):
        normalize_preference({"prompt": "x", "rejected": []}, "row 4")
    # Whole conversations whose turns before the reply differ do not share a prompt: refused, not split at the end
    other = {"role": "user", "content": "Name a star."}
    with pytest.raises(ConfigError, match=r"row 5: 'chosen' and 'rejected' differ before their replies"):
        normalize_preference(
            {**whole, "rejected": [other, {"role": "assistant", "content": "Sirius."}]}, "row 5"
        )


@pytest.mark.integration
def test_lora_dpo_on_the_embedded_model_changes_every_lora_parameter(tmp_path):
    from trl import DPOConfig

    pairs = [
        ("Name a planet.", "Mars is a planet.", "Bananas."),
        ("What is 2 + 2?", "2 + 2 = 4.", "5"),
        ("Say hi in French.", "Bonjour !", "Goodbye."),
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": q}],
                    "chosen": [{"role": "assistant", "content": c}],
                    "rejected": [{"role": "assistant", "content": r}],
                }
            )
            + "\n"
            for q, c, r in pairs
        )
    )
    script = ScriptArgs(
        model_name_or_path="embedded", dataset=str(path), peft="lora", lora_r=8, lora_alpha=16
    )
    (args,) = build(
        {
            "output_dir": str(tmp_path / "dpo"),
            "max_steps": 3,
            "per_device_train_batch_size": 3,
            "learning_rate": 1e-3,
            "beta": 0.1,
            "max_length": 128,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "bf16": False,
            "activation_checkpointing": False,
        },
        DPOConfig,
    )
    trainer = build_trainer(script, args)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"LoRA parameters that did not change: {unchanged[:5]}"
    log = [e for e in trainer.state.log_history if "rewards/margins" in e]
    assert log and log[-1]["rewards/margins"] > log[0]["rewards/margins"] - 1e-6  # learning to prefer chosen


@pytest.mark.parametrize("key", ["reverse_pairs=true", "dataset_mixture={a: 1.0}", "system_prompts={a: x}",
                                 "drop_invalid=true", "mixture_seed=1"])  # fmt: skip
def test_dpo_refuses_the_sft_data_keys_it_would_ignore(key):
    with pytest.raises(ConfigError, match=f"unknown key '{key.split('=')[0]}'"):
        parse_config("dpo", [key, "output_dir=/tmp/x", "bf16=false"], ScriptArgs, DPOConfig)
