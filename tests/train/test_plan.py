import pytest
from transformers import LlamaConfig

from train.plan import GB, PlanConfig, count_params, estimate, lora_params, plan, sharding

LLAMA3_8B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)


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
    full = plan(
        PlanConfig(
            recipe="magpie_pro_300k",
            accelerate_config="deepspeed_zero3",
            gpus=4,
            gpu_mem_gb=80,
            model=str(tmp_path / "llama3-8b"),
        )
    )
    assert full["fits"] and full["params_billion"] == pytest.approx(8.03, abs=0.01)
    one_gpu = plan(
        PlanConfig(
            recipe="magpie_pro_300k",
            accelerate_config="single_gpu",
            gpus=1,
            gpu_mem_gb=80,
            model=str(tmp_path / "llama3-8b"),
        )
    )
    assert not one_gpu["fits"] and one_gpu["per_gpu_gb"]["optimizer"] == pytest.approx(
        12 * 8.03e9 / GB, rel=1e-3
    )
    qlora = plan(
        PlanConfig(
            recipe="magpie_pro_300k_qlora",
            accelerate_config="single_gpu",
            gpus=1,
            gpu_mem_gb=24,
            model=str(tmp_path / "llama3-8b"),
        )
    )
    assert qlora["per_gpu_gb"]["weights"] < 7 and qlora["trainable_params_million"] > 100  # r=64
