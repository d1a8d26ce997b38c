"""Scores for (instruction, response) pairs: a sequence-classification reward model, or the judge's
probability-weighted score standing in for one (labelled as such). Tagging (instruct_reward, reward_difference) and
preference pairs use this one scorer, so the same settings give the same numbers in both."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.engines import Completion, Sampling
from core.errors import EngineError
from core.judge import Judge, JudgeConfig, expected_score
from core.models import default_dtype, padded, resolve_model
from data_synth import prompts

SCORE_PREFILL = '{\n    "score": '


def reward_source(reward_model: str | None, judge_model: str) -> str:
    """What produced the scores, for the column metadata and manifests."""
    if reward_model:
        return f"reward model {reward_model}"
    return f"judge {judge_model}: probability-weighted 1-10 score (not a reward model)"


class Scorer:
    """The judge and the reward model, each built on first use (a finished run loads nothing). `missing` collects
    the positions, in the prompts of the calls since it was last cleared, whose judge request the engine never
    answered: no result, so callers write nothing for them and a re-run asks again."""

    def __init__(
        self,
        judge: JudgeConfig,
        cache: Path,
        reward_model: str | None = None,
        reward_batch_size: int = 8,
        reward_trust_remote_code: bool = False,
    ):
        self.judge_config, self.cache = judge, cache
        self.reward_model, self.reward_batch_size = reward_model, reward_batch_size
        self.reward_trust_remote_code = reward_trust_remote_code
        self.models: dict[str, Any] = {}  # "judge", "rm"
        self.missing: set[int] = set()

    @property
    def judge(self) -> Judge:
        if "judge" not in self.models:
            self.models["judge"] = Judge(self.judge_config, self.cache)
        return self.models["judge"]

    def release(self, keep: set[str]) -> None:
        """Close the models not in `keep`; the judge keeps its cache and reloads on its next call."""
        if "judge" in self.models and "judge" not in keep:
            self.models["judge"].close()
        if "rm" in self.models and "rm" not in keep:
            self.models.pop("rm").close()

    def ask(self, prompts: list[str], parse: Callable[[Completion], Any], desc: str, **protocol: Any) -> list:
        """One judge call per prompt (a user turn); the parsed value, or None where every attempt failed."""
        verdicts = self.judge.ask(
            [[{"role": "user", "content": p}] for p in prompts], parse, desc, **protocol
        )
        self.missing.update(i for i, v in enumerate(verdicts) if v.missing)
        return [v.value for v in verdicts]

    def scores(self, prompts: list[str], low: int, high: int, desc: str) -> list[float | None]:
        """The judge's probability-weighted score after the prefilled `{"score": ` (one token, its logprobs)."""
        return self.ask(
            prompts,
            lambda c: expected_score(c, low, high),
            desc,
            prefill=SCORE_PREFILL,
            sampling=Sampling(temperature=0.0, max_tokens=1, logprobs=20),
            retries=0,
        )

    def rewards(self, pairs: list[tuple[str, str]]) -> list[float | None]:
        """The reward model's score when one is configured, else the judge's probability-weighted 1-10 score."""
        if self.reward_model:
            if "rm" not in self.models:
                self.models["rm"] = RewardModel(
                    self.reward_model, self.reward_batch_size, self.reward_trust_remote_code
                )
            return self.models["rm"](pairs)
        return self.scores([prompts.fill(prompts.REWARD, q, a) for q, a in pairs], 1, 10, "reward")


class RewardModel:
    """A sequence-classification reward model (FsfairX, ArmoRM, ...) scoring (instruction, response) pairs."""

    def __init__(self, name: str, batch_size: int, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model(name)
        self.tok = padded(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = default_dtype(self.device)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True
        )
        # A checkpoint without a trained reward head (a plain language model, or ArmoRM loaded without its own code)
        # gets a randomly initialised one, which transformers only warns about: its scores would be noise.
        if info["missing_keys"]:
            raise EngineError(
                f"reward model {name}: its checkpoint has no trained reward head ({', '.join(sorted(info['missing_keys'])[:3])} "
                "would be random); use a sequence-classification reward model, and for one that ships its own code "
                "(ArmoRM) set reward_trust_remote_code=true"
            )
        self.model = model.eval().to(self.device)
        self.batch_size = batch_size

    def close(self) -> None:
        self.model = None

    def __call__(self, pairs: list[tuple[str, str]]) -> list[float]:
        import torch

        scores: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            chats = [
                self.tok.apply_chat_template(
                    [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
                )
                for q, a in pairs[start : start + self.batch_size]
            ]
            enc = self.tok(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                out = self.model(**enc)
            # FsfairX-style models have one label; ArmoRM's own code returns a `score` besides its logits.
            score = out.score if getattr(out, "score", None) is not None else out.logits[:, 0]
            scores.extend(score.float().reshape(-1).tolist())
        return scores
