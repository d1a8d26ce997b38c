import pytest
from trl import DPOConfig

from core.config import ConfigError, parse_config
from train.common import ScriptArgs
from train.dpo import normalize_preference

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


@pytest.mark.parametrize("key", ["reverse_pairs=true", "dataset_mixture={a: 1.0}", "system_prompts={a: x}",
                                 "drop_invalid=true", "mixture_seed=1"])  # fmt: skip
def test_dpo_refuses_the_sft_data_keys_it_would_ignore(key):
    with pytest.raises(ConfigError, match=f"unknown key '{key.split('=')[0]}'"):
        parse_config("dpo", [key, "output_dir=/tmp/x", "bf16=false"], ScriptArgs, DPOConfig)
