"""The preflight: what a config names that this machine lacks fails in one line naming the key and the fix, before
anything loads or is written; `--preflight` runs only it."""

import pytest

from core import preflight
from tests.core.test_output_dir import main

GPU_ONLY = {"tensorboard", "tensorboardx", "kernels", "flash-attn", "vllm", "wandb"}


@pytest.fixture
def without_gpu_packages(monkeypatch):
    """This environment as a CPU setup has it, whatever else is installed here (a GPU machine runs these tests too)."""
    have = preflight.installed() - GPU_ONLY
    monkeypatch.setattr(preflight, "installed", lambda: have)


def test_each_package_a_config_names_is_looked_up_where_it_sits():
    config = {"attn_implementation": "flash_attention_2", "report_to": ["tensorboard", "none"], "optim": "paged_adamw_8bit",
              "judge": {"engine": {"backend": "vllm"}}, "embed": {"engine": {"backend": "transformers"}}}  # fmt: skip
    lines = preflight.problems(config, available={"torch"})
    assert [line.split(" needs")[0] for line in lines] == [
        "attn_implementation=flash_attention_2", "report_to=tensorboard", "optim=paged_adamw_8bit",
        "judge.engine.backend=vllm",
    ]  # fmt: skip
    assert "set attn_implementation=sdpa" in lines[0] and "make setup-gpu" in lines[0]
    assert "set report_to=none" in lines[1] and "set judge.engine.backend=transformers" in lines[3]
    # installed under either of its names, a package is found: flash-attn itself or transformers' kernels
    assert preflight.problems(config, available={"kernels", "TensorBoard", "bitsandbytes", "vllm"}) == []


def test_the_paper_recipe_fails_its_preflight_without_the_gpu_setup(
    without_gpu_packages, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code, err = main("train.sft", "recipe=magpie_pro_300k", "use_cpu=true", "--preflight")
    lines = err.strip().splitlines()
    assert code == 2 and all(line.startswith("error: ") for line in lines)
    assert any(
        "attn_implementation=flash_attention_2 needs the package flash-attn or kernels" in li for li in lines
    )
    assert any("report_to=tensorboard needs the package tensorboard" in line for line in lines)
    assert not (tmp_path / "runs").exists()


def test_a_preflight_that_passes_exits_0_and_writes_nothing(
    without_gpu_packages, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    code, err = main("train.sft", "recipe=magpie_pro_300k", "use_cpu=true", "attn_implementation=sdpa",
                     "report_to=none", "--preflight")  # fmt: skip
    assert (code, err) == (0, "")
    assert "preflight: sft is ready to run" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_a_missing_earlier_output_names_the_recipe_that_writes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = main(
        "data_synth.pairs", "recipe=magpie_pro_dpo", "engine.backend=transformers", "--preflight"
    )
    assert code == 2
    assert err.strip() == (
        "error: input=runs/magpie_pro_dpo_instructions does not exist: it is an earlier stage's output; "
        "it is written by recipe=dpo_instructions (select)"
    )


@pytest.mark.parametrize(
    ("processes", "extra", "expected"),
    [
        ("8", [], 4),  # the paper's 32 = 8 GPUs x 1 x 4
        ("4", [], 8),
        ("1", [], 32),
        ("3", [], "is not a multiple of 3 processes x per_device_train_batch_size=1"),
        ("8", ["gradient_accumulation_steps=8"], "is a batch of 64, not effective_batch_size=32"),
    ],
)
def test_the_effective_batch_is_the_recipes_on_any_number_of_processes(
    processes, extra, expected, monkeypatch
):
    from trl import SFTConfig

    from core.config import parse_config
    from train.common import settle_batch
    from train.sft import SFTScriptArgs

    script, args = parse_config(
        "sft", ["recipe=magpie_pro_300k", "use_cpu=true", *extra], SFTScriptArgs, SFTConfig
    )
    monkeypatch.setenv("WORLD_SIZE", processes)  # as accelerate launch sets it in each process
    problems = settle_batch(script, args)
    if isinstance(expected, int):
        assert problems == [] and args.gradient_accumulation_steps == expected
    else:
        assert len(problems) == 1 and expected in problems[0]


def test_settings_a_hosted_reasoning_judge_refuses_are_named():
    hosted = {"backend": "openai", "base_urls": ["https://api.openai.com/v1"]}
    config = {"judge": {"model": "o3-2025-04-16", "engine": hosted, "temperature": 0.0, "logprobs": 5},
              "baseline": {"model": "gpt-4.1", "engine": hosted, "temperature": 0.0, "logprobs": 5},
              "local": {"model": "o3", "engine": {"backend": "openai", "base_urls": ["http://node:8000/v1"]},
                        "temperature": 0.0}}  # fmt: skip
    assert preflight.api_problems(config) == [
        "judge.temperature=0.0: OpenAI's reasoning model o3-2025-04-16 accepts only temperature 1; "
        "set judge.temperature=1.0",
        "judge.logprobs=5: OpenAI's reasoning model o3-2025-04-16 returns no logprobs; set judge.logprobs=null, "
        "or choose a judge that returns them",
    ]


def test_training_checks_the_sources_it_reads_not_the_dataset_a_mixture_replaces(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = main("train.sft", "recipe=demo_sft", "dataset_mixture={runs/seed: 1.0}", "--preflight")
    assert code == 2 and err.strip() == (
        "error: dataset_mixture=runs/seed does not exist: it is an earlier stage's output"
    )  # and not dataset=runs/demo/magpie, which the mixture replaces


def test_gpu_only_kernels_and_an_unprojected_galore_are_named_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = main(
        "train.sft", "recipe=demo_sft", "use_liger_kernel=true", "optim=galore_adamw", "--preflight"
    )
    assert code == 2
    assert "use_liger_kernel=true: Liger's Triton kernels run on a CUDA GPU only" in err
    assert "optim=galore_adamw needs optim_target_modules" in err
    assert not (tmp_path / "runs").exists()
