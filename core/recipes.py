"""The recipe folder: `recipes/<stage>/NAME.yaml`, found beside the packages (in a checkout and in an installed wheel
alike), with `base: OTHER` inheritance and `key=value` overrides merged on top."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from core.errors import ConfigError, first_line

INSTALL_ROOT = Path(__file__).resolve().parents[1]  # the checkout, or site-packages for an installed wheel
RECIPES_DIR = INSTALL_ROOT / "recipes"


def shipped(path: str) -> str:
    """A relative path a shipped recipe names (`eval/data/demo_instructions.jsonl`): as given when it exists from
    here, else the file installed with the package, so the recipe runs outside the checkout too."""
    installed = INSTALL_ROOT / path
    if Path(path).is_absolute() or Path(path).exists() or not installed.exists():
        return path
    return str(installed)


def available_recipes(stage: str) -> list[str]:
    return sorted(p.stem for p in (RECIPES_DIR / stage).glob("*.yaml"))


def recipe_path(stage: str, name: str) -> Path:
    """`name` is a recipe under recipes/<stage>/ or a path to a YAML file."""
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path
    path = RECIPES_DIR / stage / f"{name}.yaml"
    if not path.is_file():
        choices = available_recipes(stage)
        close = difflib.get_close_matches(name, choices, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown {stage} recipe '{name}'.{hint} Available in {RECIPES_DIR / stage}: {', '.join(choices) or '(none)'}"
        )
    return path


def load_recipe(stage: str, name: str, _seen: tuple[str, ...] = ()) -> Any:
    """A recipe's YAML; `base: OTHER` first loads recipe OTHER of the same stage and overrides it (so a baseline
    recipe states only what differs from the paper's, e.g. its dataset)."""
    path = recipe_path(stage, name)
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(loaded, typing.Mapping):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys to values")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if base in _seen:
        raise ConfigError(f"{path}: recipes inherit in a loop: {' -> '.join((*_seen, name, base))}")
    return OmegaConf.merge(load_recipe(stage, base, (*_seen, name)), loaded)


def merge_recipe(stage: str, recipe: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Recipe `recipe` of `stage` (None: an empty one) with `overrides` merged on top, interpolations resolved:
    the raw dict that `build` checks."""
    merged = OmegaConf.create({}) if recipe is None else load_recipe(stage, recipe)
    try:
        merged = OmegaConf.merge(merged, overrides)
    except Exception as e:
        raise ConfigError(f"could not apply overrides {overrides}: {first_line(e)}") from e
    try:
        return OmegaConf.to_container(merged, resolve=True)
    except Exception as e:
        raise ConfigError(f"could not resolve the config: {first_line(e)}") from e
