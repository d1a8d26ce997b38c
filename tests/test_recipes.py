"""Every recipe file loads and validates against the command it feeds, GPU recipes included."""

from pathlib import Path

import pytest

from core.config import RECIPES_DIR, load_config


def schemas(stage: str, name: str = "") -> tuple[type, ...]:
    if stage == "synth":
        from data_synth.magpie import MagpieConfig

        return (MagpieConfig,)
    if stage in ("sft", "dpo"):
        from trl import DPOConfig, SFTConfig

        from train.common import ScriptArgs

        return (ScriptArgs, SFTConfig if stage == "sft" else DPOConfig)
    if stage == "tag":
        from data_synth.tag import TagConfig

        return (TagConfig,)
    if stage == "select":
        from data_synth.select import SelectConfig

        return (SelectConfig,)
    if stage == "pairs":
        from data_synth.pairs import PairsConfig

        return (PairsConfig,)
    if stage == "report":
        from data_synth.report import ReportConfig

        return (ReportConfig,)
    if stage == "eval":  # one folder, several commands: the recipe's name says which
        from eval.alpaca_eval import AlpacaEvalConfig
        from eval.arena_hard import ArenaHardConfig
        from eval.generate import GenerateConfig
        from eval.lm_eval import LmEvalConfig
        from eval.pairwise import PairwiseConfig

        prefixes = {"generate": GenerateConfig, "alpaca_eval": AlpacaEvalConfig, "arena_hard": ArenaHardConfig,
                    "lm_eval": LmEvalConfig}  # fmt: skip
        return (next((c for p, c in prefixes.items() if name.startswith(p)), PairwiseConfig),)
    raise AssertionError(f"no schema registered for recipes/{stage}: add it here")


RECIPES = sorted(p for p in RECIPES_DIR.glob("*/*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[f"{p.parent.name}/{p.stem}" for p in RECIPES])
def test_recipe_validates(path: Path):
    stage = path.parent.name
    # GPU recipes ask for bf16, which transformers refuses on a machine without a GPU unless told it is CPU.
    extra = ["use_cpu=true"] if stage in ("sft", "dpo") else []
    built = load_config(stage, [f"recipe={path.stem}", *extra], *schemas(stage, path.stem))
    assert all(b is not None for b in built)
