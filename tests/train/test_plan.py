import pytest
from transformers import LlamaConfig

import train.plan
from core.config import ConfigError
from train.plan import GB, PlanConfig, count_params, estimate, lora_params, plan, sharding

LLAMA3_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)  # fmt: skip


def test_llama3_8b_parameter_count():
    p = count_params(LLAMA3_8B)
    assert p["total"] == 8_030_261_248  # the published 8.03B
    # LoRA r=16 on q, k, v, o, gate, up, down: 16 x ((4096+4096) x 2 + (4096+1024) x 2 + (4096+14336) x 3) x 32
    assert lora_params(p, 16) == 41_943_040


def test_sharding_divides_what_each_zero_stage_shards():
    p = count_params(LLAMA3_8B)
    recipe = {
        "peft": "none",
        "bf16": True,
        "per_device_train_batch_size": 1,
        "max_length": 8192,
        "activation_checkpointing": True,
    }
    single = estimate(p, recipe, sharding({"distributed_type": "NO"}), 1)
    zero3 = estimate(
        p, recipe, sharding({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 3}}), 8
    )
    zero2 = estimate(
        p, recipe, sharding({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2}}), 8
    )
    assert single["weights"] == 2 * p["total"] and single["optimizer"] == 12 * p["total"]  # bf16 + fp32 Adam
    assert zero3["weights"] == single["weights"] / 8 and zero3["optimizer"] == single["optimizer"] / 8
    assert zero2["weights"] == single["weights"] and zero2["gradients"] == single["gradients"] / 8
    offload = sharding(
        {
            "distributed_type": "DEEPSPEED",
            "deepspeed_config": {
                "zero_stage": 3,
                "offload_optimizer_device": "cpu",
                "offload_param_device": "cpu",
            },
        }
    )
    assert (
        estimate(p, recipe, offload, 8)["optimizer"] == 0 and estimate(p, recipe, offload, 8)["weights"] == 0
    )


def test_plan_on_recipes_says_whether_it_fits(tmp_path):
    LLAMA3_8B.save_pretrained(tmp_path / "llama3-8b")

    def plan_8b(recipe, accelerate_config, gpus, gpu_mem_gb):
        cfg = PlanConfig(recipe, accelerate_config=accelerate_config, gpus=gpus, gpu_mem_gb=gpu_mem_gb,
                         model=str(tmp_path / "llama3-8b"))  # fmt: skip
        return plan(cfg)

    full = plan_8b("magpie_pro_300k", "deepspeed_zero3", 4, 80)
    assert full["fits"] and full["params_billion"] == pytest.approx(8.03, abs=0.01)
    one_gpu = plan_8b("magpie_pro_300k", "single_gpu", 1, 80)
    assert not one_gpu["fits"] and one_gpu["per_gpu_gb"]["optimizer"] == pytest.approx(
        12 * 8.03e9 / GB, rel=1e-3
    )
    qlora = plan_8b("magpie_pro_300k_qlora", "single_gpu", 1, 24)
    assert qlora["per_gpu_gb"]["weights"] < 7 and qlora["trainable_params_million"] > 100  # r=64


def test_the_command_line_is_parsed_as_every_command_parses_it(monkeypatch, capsys):
    """core.config's rules, not plain YAML: `save_strategy=no` is the string "no" (YAML 1.1 reads False), dots
    nest, and the planner's own keys are typed by PlanConfig."""
    seen = {}

    def fake_plan(cfg, overrides):
        seen.update(cfg=cfg, overrides=overrides)
        return {"fits": True, "sharding": "single process", "total_gb": 1.0}

    monkeypatch.setattr(train.plan, "plan", fake_plan)
    train.plan.main(["recipe=demo_dpo", "stage=dpo", "gpus=2", "--gpu-mem-gb=24", "save_strategy=no",
                     "report_to=off", "max_length=4096", "model_init_kwargs.revision=v1"])  # fmt: skip
    assert seen["overrides"] == {"save_strategy": "no", "report_to": "off", "max_length": 4096,
                                 "model_init_kwargs": {"revision": "v1"}}  # fmt: skip
    assert seen["cfg"] == PlanConfig(recipe="demo_dpo", stage="dpo", gpus=2, gpu_mem_gb=24.0)
    assert "demo_dpo on 2 x 24 GB" in capsys.readouterr().out


def test_a_value_training_would_refuse_is_a_one_line_error(capsys):
    for argv, message in [
        (["recipe=demo_sft", "bf16=no"], "key 'bf16': expected bool (true/false), got 'no' (str)"),
        (["recipe=demo_sft", "gpus=abc"], "key 'gpus': expected int, got 'abc' (str)"),
        (
            ["recipe=demo_sft", "lora_r=${nowhere}"],
            "could not resolve the config: Interpolation key 'nowhere'",
        ),
        (["recipe=demo_sft", "gpus"], "argument 'gpus' is not of the form key=value"),
    ]:
        with pytest.raises(SystemExit) as exit:
            train.plan.main(argv)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_each_memory_efficient_optimizer_has_its_own_state_and_gradient_memory():
    p = count_params(LLAMA3_8B)
    n, largest = p["total"], 128256 * 4096  # the embedding matrix is the largest tensor
    base = {"peft": "none", "bf16": True, "per_device_train_batch_size": 1, "max_length": 2048}

    def memory(optim: str, **more) -> tuple[float, float]:
        est = estimate(p, {**base, "optim": optim, **more}, sharding({"distributed_type": "NO"}), 1)
        return est["optimizer"], est["gradients"]

    assert memory("adamw_torch") == (12 * n, 2 * n)  # fp32 master + two fp32 moments; bf16 gradients
    assert memory("paged_adamw_32bit") == memory(
        "adamw_torch"
    )  # paging moves states, it does not shrink them
    optim, grads = memory("adamw_bnb_8bit")
    embedding = 128256 * 4096  # its states stay 32-bit, as the Trainer registers them with bitsandbytes
    assert (
        optim == pytest.approx(4 * n + 2 * (1 + 4 / 256) * (n - embedding) + 8 * embedding) and grads == 2 * n
    )
    assert memory("lomo") == (0, 2 * largest)  # no state, and one gradient at a time
    adalomo, _ = memory("adalomo")
    assert 0 < adalomo < 0.01 * n  # factored: rows + columns per matrix
    adafactor, adafactor_grads = memory("adafactor")
    assert adafactor == pytest.approx(adalomo + 4 * n, rel=1e-6) and adafactor_grads == 2 * n
    galore, _ = memory("galore_adamw", optim_target_modules=["attn", "mlp"])
    assert 4 * n < galore < 12 * n  # moments of rank-128 projections of the blocks, AdamW on the embeddings
    assert memory("galore_adamw", optim_target_modules=["attn", "mlp"], optim_args="rank=512")[0] > galore
    assert memory("galore_adamw_layerwise", optim_target_modules=["attn", "mlp"]) == (galore, 2 * largest)
    lora = estimate(
        p, {**base, "peft": "lora", "optim": "adamw_bnb_8bit"}, sharding({"distributed_type": "NO"}), 1
    )
    assert lora["optimizer"] == pytest.approx(2 * (1 + 4 / 256) * lora["trainable_params"])
    with pytest.raises(ConfigError, match="optim=mystery: the planner does not know its memory"):
        memory("mystery")


def test_a_full_preference_run_holds_the_reference_model_unless_it_is_reference_free_or_precomputed(tmp_path):
    LLAMA3_8B.save_pretrained(tmp_path / "llama3-8b")

    def weights(recipe: str, **overrides) -> float:
        cfg = PlanConfig(
            recipe,
            stage="dpo",
            accelerate_config="deepspeed_zero3",
            gpus=8,
            model=str(tmp_path / "llama3-8b"),
        )
        return plan(cfg, overrides)["per_gpu_gb"]["weights"]

    dpo = weights("magpie_pro_dpo")
    assert dpo == pytest.approx(
        2 * 2 * 8.03e9 / 8 / GB, rel=1e-3
    )  # policy and reference, bf16, sharded 8 ways
    assert weights("magpie_pro_simpo") == pytest.approx(dpo / 2, rel=1e-3)
    assert weights("magpie_pro_dpo", precompute_ref_log_probs=True) == pytest.approx(dpo / 2, rel=1e-3)
    assert weights("magpie_pro_kto") == pytest.approx(dpo, rel=1e-3)
