"""Every recipe file loads and validates against the command it feeds, GPU recipes included, and every key it sets
reaches that command's config with the value it states."""

import dataclasses
import importlib
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from core.config import parse_config, to_plain
from core.recipes import RECIPES_DIR, load_recipe, merge_recipe
from experiments.commands import BY_FOLDER, Command

ROOT = RECIPES_DIR.parent


def command(folder: str) -> Command:
    """recipes/<folder>/ is read by exactly one command (experiments.commands), named like the folder."""
    if folder not in BY_FOLDER:
        pytest.fail(f"recipes/{folder}/ is not a command's folder: name it after the command that reads it "
                    f"and add it to experiments/commands.py (known: {', '.join(BY_FOLDER)})")  # fmt: skip
    return BY_FOLDER[folder]


def schemas(folder: str, recipe: str | None = None) -> tuple[type, ...]:
    """The dataclasses recipe `recipe` of `folder` builds (the preference script's depend on its `method`)."""
    return command(folder).schemas(merge_recipe(folder, recipe, {}))


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
    built = parse_config(stage, [f"recipe={path.stem}", *extra], *schemas(stage, path.stem))
    stated = leaves(OmegaConf.to_container(load_recipe(stage, path.stem), resolve=True))  # `base:` included
    assert stated
    wrong = {key: (value, built_value(built, key)) for key, value in stated.items()
             if not same(NORMALIZED.get(key, lambda v: v)(value), built_value(built, key))}  # fmt: skip
    assert not wrong, f"recipe {path} states (value, built as): {wrong}"


@pytest.mark.parametrize("stage", sorted(p.name for p in RECIPES_DIR.iterdir() if p.is_dir()))
def test_each_folder_is_read_by_the_command_it_is_named_after(stage: str, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(command(stage).module).main(["recipe=no_such_recipe"])
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


def gpu_setup_requirements() -> list[str]:
    """What `make setup GPU=1` asks pip for, read from the Makefile and pyproject.toml (never restated here)."""
    import re

    import tomllib

    makefile = (ROOT / "Makefile").read_text()
    torch_version = re.search(r"^GPU_TORCH_VERSION \?= (\S+)", makefile, re.M).group(1)
    extras = re.search(r"^EXTRAS \?= \$\(if \$\(GPU\),(\S+?),dev\)", makefile, re.M).group(1).split("$(,)")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = [req for extra in extras for req in project["optional-dependencies"][extra]]
    return [f"torch=={torch_version}", *project["dependencies"], *optional]


@pytest.fixture(scope="session")
def gpu_environment(tmp_path_factory) -> dict[str, str]:
    """name -> version of every distribution the README's GPU setup installs, as pip resolves it against the real
    index (a dry run: nothing is installed, installed packages are ignored). CI reaches the index; about a minute."""
    import json
    import subprocess
    import sys

    report = tmp_path_factory.mktemp("gpu_env") / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
         "--report", str(report), *gpu_setup_requirements()],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, f"pip cannot resolve the GPU setup:\n{run.stderr[-3000:]}"
    return {
        i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
    }


@pytest.mark.integration
def test_the_gpu_setup_resolves_to_what_training_and_vllm_need(gpu_environment):
    """One environment for synthesis with vLLM and for training: pip must not trade transformers down for vLLM
    (vLLM 0.32 capped it below 5.20, which has no `activation_checkpointing` key every training recipe sets)."""
    from packaging.version import Version
    from transformers import TrainingArguments

    versions = {name.lower(): Version(v) for name, v in gpu_environment.items()}
    assert "vllm" in versions and "torch" in versions
    assert versions["transformers"] >= Version("5.20")
    assert versions["deepspeed"] >= Version("0.19.3")
    assert "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}


@pytest.mark.integration
@pytest.mark.parametrize("path", RECIPES, ids=[f"{p.parent.name}/{p.stem}" for p in RECIPES])
def test_recipe_passes_the_preflight_in_the_gpu_setup(path: Path, gpu_environment):
    """Every package a shipped recipe names (attention, report_to, optimizer, engines) is one the GPU setup brings."""
    from core import preflight
    from core.config import resolved

    stage = path.parent.name
    extra = ["use_cpu=true"] if stage in ("sft", "dpo") else []
    built = parse_config(stage, [f"recipe={path.stem}", *extra], *schemas(stage, path.stem))
    assert preflight.problems(resolved(*built), set(gpu_environment)) == []


@pytest.mark.parametrize("path", [p for p in RECIPES if p.parent.name in ("sft", "dpo")],
                         ids=lambda p: f"{p.parent.name}/{p.stem}")  # fmt: skip
def test_a_training_recipe_gets_its_batch_from_the_launch_line_it_documents(path: Path, monkeypatch):
    """processes x per-device batch x accumulation = the recipe's effective_batch_size, under the accelerate config
    (and --num_processes) its own comment tells the user to launch with."""
    import re

    from train.common import settle_batch

    text = path.read_text()
    launch = re.search(r"accelerate launch (?:--config_file (\S+))?((?: --num_processes \d+)?)", text)
    script, args = parse_config(
        path.parent.name, [f"recipe={path.stem}", "use_cpu=true"], *schemas(path.parent.name, path.stem)
    )
    if script.effective_batch_size is None:
        assert not re.search(r"deepspeed|GPUs", text), (
            f"{path}: a GPU recipe states its batch as effective_batch_size"
        )
        return
    config = OmegaConf.load(ROOT / launch.group(1)) if launch and launch.group(1) else {"num_processes": 8}
    processes = int(launch.group(2).split()[-1]) if launch and launch.group(2) else config["num_processes"]
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    assert settle_batch(script, args) == []
    total = processes * args.per_device_train_batch_size * args.gradient_accumulation_steps
    assert total == script.effective_batch_size


# Inputs under runs/ that commands without recipes write: data_synth.baselines (`name=sharegpt ...`, as each baseline
# recipe's comment says), and Humpback's stages, whose paths experiments.humpback passes to each stage itself.
PREPARED_WITHOUT_A_RECIPE = ("runs/baselines/", "runs/humpback/")


def test_every_earlier_output_a_recipe_reads_is_written_by_a_shipped_recipe():
    """The chain holds: each runs/ path a recipe reads (a data set, a model, a judge's input) is the output_dir of
    another shipped recipe, or lies in it (`runs/x/merged`)."""
    from core import preflight

    orphans = []
    for path in RECIPES:
        if path.parent.name == "sweeps":  # a sweep's stages pass their own paths on
            continue
        raw = OmegaConf.to_container(load_recipe(path.parent.name, path.stem), resolve=True)
        for key, value in preflight.leaves(raw):
            for read in value if isinstance(value, list) else [value]:
                if (isinstance(read, str) and read.startswith("runs/") and not key.endswith("output_dir")
                        and not read.startswith(PREPARED_WITHOUT_A_RECIPE) and not preflight.writers_of(read)):  # fmt: skip
                    orphans.append(f"{path.parent.name}/{path.stem}: {key}={read}")
    assert not orphans, f"read but written by no recipe: {orphans}"
