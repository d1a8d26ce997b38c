"""Each memory-saving optimizer a recipe may name trains for real through train/sft.py's trainer (full fine-tuning of
a tiny random Llama): every parameter moves, and the optimizer is the one asked for. AdaLomo needs CUDA (its code
calls torch.cuda) and is left to the GPU setup; benchmarks/train_memory.py measures each one's memory."""

import pytest
import torch

from tests.train.test_sft import data_file, sft_args, tiny_llama3  # noqa: F401  (data_file is a fixture)
from train.sft import SFTScriptArgs, build_trainer

PROJECTED = {"optim_target_modules": ["self_attn", "mlp"], "optim_args": "rank=8"}
OPTIMIZERS = {  # optim -> (its keys, the optimizer class the Trainer builds)
    "adamw_bnb_8bit": ({}, "bitsandbytes.optim.adamw.AdamW"),
    "paged_adamw_8bit": ({}, "bitsandbytes.optim.adamw.AdamW"),
    "adafactor": ({}, "transformers.optimization.Adafactor"),
    "lomo": ({}, "lomo_optim.lomo.Lomo"),
    "galore_adamw": (PROJECTED, "galore_torch.adamw.AdamW"),
    "galore_adamw_layerwise": (PROJECTED, "transformers.trainer_pt_utils.LayerWiseDummyOptimizer"),
    "apollo_adamw": (PROJECTED, "apollo_torch.apollo.AdamW"),
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, embedded_path) -> str:
    return str(tiny_llama3(tmp_path_factory.mktemp("tiny"), embedded_path))


@pytest.mark.integration
@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_each_memory_saving_optimizer_trains_every_parameter(optim, tmp_path, data_file, tiny_model):  # noqa: F811
    extra, expected = OPTIMIZERS[optim]
    script = SFTScriptArgs(
        model_name_or_path=tiny_model, dataset=str(data_file), peft="none", chat_template="llama3"
    )
    trainer = build_trainer(
        script, sft_args(tmp_path / "out", optim=optim, learning_rate=1e-2, max_steps=2, **extra)
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == expected
    if "bnb" in optim or "paged" in optim:
        assert optimizer.args.optim_bits == 8 and optimizer.is_paged == optim.startswith("paged")
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"{optim}: parameters that did not change: {unchanged[:5]}"
