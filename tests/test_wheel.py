"""`pip install .` as a wheel, not editable: every command and every recipe from outside the checkout."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT

CHECK_EVERY_RECIPE = """
import contextlib, importlib, io, sys
from core.config import parse_config
from core.recipes import RECIPES_DIR, merge_recipe
from experiments.commands import COMMANDS
assert "site" in str(RECIPES_DIR), RECIPES_DIR
checked = 0
for command in COMMANDS.values():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        importlib.import_module(command.module).main(["--help"])
    for path in sorted((RECIPES_DIR / command.recipes).glob("*.yaml")):
        extra = ["use_cpu=true"] if command.training else []  # GPU recipes ask for bf16
        parse_config(command.recipes, [f"recipe={path.stem}", *extra], *command.schemas(merge_recipe(command.recipes, path.stem, {})))
        checked += 1
print(checked)
"""


@pytest.mark.integration
def test_the_wheel_runs_every_command_and_recipe_outside_the_checkout(tmp_path):
    # Built from a copy, so the build leaves nothing in the checkout; no isolation: the build backend is installed.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))  # fmt: skip
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("magpie_harness-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    recipes = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").rglob("*.yaml"))
    assert not set(recipes) - set(names), "recipes missing from the wheel"
    assert "experiments/sweep.py" in names and "accelerate_configs/slurm_multinode.sh" in names
    assert not [n for n in names if n.startswith("tests/")]

    # Installed into a directory of its own that comes first on the path; the dependencies are this environment's.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=away, env=env, capture_output=True, text=True, timeout=300
        )

    where = run("-c", "import core, experiments, recipes; print(core.__file__, experiments.__file__)")
    assert where.stdout.split() and all(p.startswith(str(site)) for p in where.stdout.split()), where

    for module in ("data_synth.magpie", "train.sft", "experiments.sweep"):  # as a user types them
        helped = run("-m", module, "--help")
        assert helped.returncode == 0 and "keys" in helped.stdout, (module, helped.stderr[-2000:])

    # Every command's --help and every shipped recipe, read and validated against its command, in one process (a
    # process each takes minutes; the machine checks of --preflight are the recipe tests' business).
    check = run("-c", CHECK_EVERY_RECIPE)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    assert int(check.stdout.split()[-1]) == len(recipes)

    # A dry run of a whole sweep plans every stage from the installed recipes, and a shipped data file is found.
    plan = run("-m", "experiments.sweep", "recipe=demo_sweep", "dry_run=true", f"output_dir={away / 'sweep'}")
    assert plan.returncode == 0, plan.stderr[-2000:]
    questions = run("-c", "from eval.generate import load_questions; "
                    "print(len(load_questions('alpaca_eval', 'eval/data/demo_instructions.jsonl')))")  # fmt: skip
    assert questions.returncode == 0 and int(questions.stdout) == 24, questions.stderr[-2000:]
    assert not list(away.glob("runs")), "a dry run wrote runs/"
