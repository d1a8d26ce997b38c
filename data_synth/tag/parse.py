"""Reading the judge's replies into tag columns: strict JSON labels, Humpback's "Score: N", and scores read from the
first token's probabilities. A reply that does not parse is None: the judge is asked again, then the row fails."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from core.engines import Completion
from core.judge import expected_score
from data_synth.labels import DIFFICULTY, QUALITY, TASK_CATEGORIES

CURATION_SCORES = ("1", "2", "3", "4", "5")  # the only replies parse_curation accepts
CURATION_PREFILL = "Score: "
SCORE_LINE = re.compile(r"score\s*:\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)  # "4.5" is read whole, and fails


def _label(value: Any, allowed: list[str]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in allowed:
        raise ValueError(f"expected one of {allowed}, got {value!r}")
    return value.strip().lower()


def _category(value: Any) -> str:
    by_lower = {c.lower(): c for c in TASK_CATEGORIES}
    if not isinstance(value, str) or value.strip().lower() not in by_lower:
        raise ValueError(f"expected one of the 12 task categories, got {value!r}")
    return by_lower[value.strip().lower()]


def parse_quality(obj: dict) -> dict:
    return {
        "input_quality": _label(obj["input_quality"], QUALITY),
        "quality_explanation": str(obj.get("explanation", "")),
    }


def parse_difficulty(obj: dict) -> dict:
    return {
        "difficulty": _label(obj["difficulty"], DIFFICULTY),
        "intent": str(obj.get("intent", "")),
        "knowledge": str(obj.get("knowledge", "")),
    }


def parse_category(obj: dict) -> dict:
    others = obj.get("other_tags", [])
    if not isinstance(others, list):
        raise ValueError(f"other_tags must be a list, got {others!r}")
    primary = _category(obj["primary_tag"])
    return {
        "task_category": primary,
        "other_task_category": [c for c in dict.fromkeys(map(_category, others)) if c != primary],
    }


def parse_judgment(text: str, parse: Callable[[dict], dict]) -> dict:
    """The judge's reply after the prefilled "{" (and up to the stop "}"): strict JSON, validated fields."""
    body = text.strip()
    body = body if body.startswith("{") else "{" + body
    body = body if body.rstrip().endswith("}") else body + "}"
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg}") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    try:
        return parse(obj)
    except KeyError as e:
        raise ValueError(f"missing field {e}") from None


def parse_curation(c: Completion) -> dict | None:
    """The paper's format: the score is the number after the last "Score:" in the reply, and must be 1-5; a reply
    without one (or with another number) is None: retried, then counted as failed, never mapped to a score."""
    found = SCORE_LINE.findall(c.text)
    if not found or found[-1] not in CURATION_SCORES:
        return None
    return {"curation_score": int(found[-1]), "curation_expected": None, "curation_reply": c.text.strip()}


def read_curation_probabilities(c: Completion) -> dict | None:
    """Probability mode: after the prefilled "Score: ", the probability-weighted score over the digits 1-5 of the
    first token (`curation_expected`), and that rounded as the score (so A_k keeps expected >= k - 0.5). Not the
    most probable digit: a small judge puts "5" first for almost every pair. None when no digit 1-5 is among them."""
    expected = expected_score(c, 1, 5)
    if expected is None:
        return None
    return {"curation_score": int(expected + 0.5), "curation_expected": expected, "curation_reply": None}


def parsed(parse: Callable[[dict], dict]) -> Callable[[Completion], dict | None]:
    """A judge parser over the strict-JSON protocol: the parsed columns, or None (retried, then failed)."""

    def read(c: Completion) -> dict | None:
        try:
            return parse_judgment(c.text, parse)
        except ValueError:
            return None

    return read
