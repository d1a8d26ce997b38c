"""Every command in one table: its module, the recipe folder it reads and the dataclasses a recipe builds.

The sweep runs these as stages (by the table's names: `command: synth`, `command: sft`, ...); the recipe tests check
every file under recipes/<folder>/ against its command's dataclasses. A new command is one row here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # `python -m <module>`; training runs under `accelerate launch -m <module>`
    recipes: str  # its recipes live in recipes/<recipes>/
    configs: tuple[str, ...]  # the dataclasses (in `module`) a recipe and its overrides build, in order
    training: bool = False  # launched by accelerate, on the stage's accelerate_config
    stage: bool = True  # a sweep may run it (the orchestrators themselves may not)
    # scores a model: the only stages an eval-only sweep row (a released checkpoint) runs
    evaluates: bool = False
    # a function of `module` that picks the dataclasses from the merged recipe (dpo: by `method`), else `configs`
    pick: str | None = None

    def schemas(self, raw: dict | None = None) -> tuple[type, ...]:
        """The dataclasses the merged recipe `raw` builds (without one: those of the command's defaults)."""
        module = importlib.import_module(self.module)
        if self.pick:
            return getattr(module, self.pick)(raw or {})
        return tuple(getattr(module, name) for name in self.configs)


COMMANDS = {
    "synth": Command("data_synth.magpie", "magpie", ("MagpieConfig",)),
    "baselines": Command("data_synth.baselines", "baselines", ("BaselineConfig",)),
    "corpus": Command("data_synth.corpus", "corpus", ("CorpusConfig",)),
    "augment": Command("data_synth.augment", "augment", ("AugmentConfig",)),
    "tag": Command("data_synth.tag", "tag", ("TagConfig",)),
    "select": Command("data_synth.select", "select", ("SelectConfig",)),
    "pairs": Command("data_synth.pairs", "pairs", ("PairsConfig",)),
    "report": Command("data_synth.report", "report", ("ReportConfig",)),
    "decontaminate": Command("data_synth.decontaminate", "decontaminate", ("DecontaminateConfig",)),
    "sft": Command("train.sft", "sft", ("SFTScriptArgs", "SFTConfig"), training=True),
    "dpo": Command("train.dpo", "dpo", ("PreferenceArgs", "DPOConfig"), training=True, pick="schemas"),
    "generate": Command("eval.generate", "generate", ("GenerateConfig",), evaluates=True),
    "alpaca_eval": Command("eval.alpaca_eval", "alpaca_eval", ("AlpacaEvalConfig",), evaluates=True),
    "arena_hard": Command("eval.arena_hard", "arena_hard", ("ArenaHardConfig",), evaluates=True),
    "lm_eval": Command("eval.lm_eval", "lm_eval", ("LmEvalConfig",), evaluates=True),
    "pairwise": Command("eval.pairwise", "pairwise", ("PairwiseConfig",), evaluates=True),
    "mt_bench": Command("eval.mt_bench", "mt_bench", ("MtBenchConfig",), evaluates=True),
    "agreement": Command("eval.agreement", "agreement", ("AgreementConfig",)),
    "sweep": Command("experiments.sweep", "sweeps", ("SweepConfig",), stage=False),
    "humpback": Command("experiments.humpback", "humpback", ("HumpbackConfig",), stage=False),
}
STAGES = {name: command for name, command in COMMANDS.items() if command.stage}
BY_FOLDER = {command.recipes: command for command in COMMANDS.values()}
