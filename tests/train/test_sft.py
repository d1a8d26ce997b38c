import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trl import SFTConfig

from core.chat import ConversationError
from core.config import build
from train.sft import SFTScriptArgs, build_trainer, load_conversations

ROOT = Path(__file__).resolve().parents[2]
CONVERSATIONS = [
    [
        {"role": "user", "content": "Name a primary color."},
        {"role": "assistant", "content": "Red is a primary color."},
    ],
    [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "3 + 4 = 7."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."},
    ],
    [{"role": "user", "content": "Say hello in French."}, {"role": "assistant", "content": "Bonjour !"}],
]


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": m, "source": "test"}) + "\n" for m in CONVERSATIONS))
    return path


def sft_args(out: Path, **overrides) -> SFTConfig:
    values = dict(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        max_length=128,
        assistant_only_loss=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        activation_checkpointing=False,
        seed=0,
    )
    values.update(overrides)
    return build(values, SFTConfig)[0]


@pytest.mark.integration
def test_lora_sft_on_the_embedded_model_changes_every_lora_parameter(tmp_path, data_file):
    script = SFTScriptArgs(
        model_name_or_path="embedded", dataset=str(data_file), peft="lora", lora_r=8, lora_alpha=16
    )
    trainer = build_trainer(script, sft_args(tmp_path / "out"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"LoRA parameters that did not change: {unchanged[:5]}"
    frozen = [n for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert frozen  # the base model stays frozen


@pytest.mark.integration
def test_assistant_only_loss_masks_everything_but_assistant_turns(tmp_path, data_file):
    script = SFTScriptArgs(model_name_or_path="embedded", dataset=str(data_file), peft="lora")
    trainer = build_trainer(script, sft_args(tmp_path / "out"))
    tok = trainer.processing_class
    row = trainer.train_dataset[2]  # system + two user/assistant rounds
    trained = tok.decode(
        [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    )
    assert trained == "Rome.<|im_end|>Madrid.<|im_end|>"


def test_bad_rows_fail_naming_the_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [
        {"messages": CONVERSATIONS[0]},
        {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConversationError, match=r"bad.jsonl: row 1: roles out of order"):
        load_conversations(SFTScriptArgs(dataset=str(path)))
    path.write_text(json.dumps({"text": "no messages"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0: no conversation \(expected messages"):
        load_conversations(SFTScriptArgs(dataset=str(path)))


@pytest.mark.integration
def test_accelerate_launch_runs_the_script_and_writes_its_config(tmp_path, data_file):
    out = tmp_path / "sft"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs/cpu.yaml"),
        str(ROOT / "train/sft.py"),
        "recipe=demo_sft",
        f"dataset={data_file}",
        f"output_dir={out}",
        "max_steps=1",
        "max_length=128",
        "save_strategy=steps",
        "save_steps=1",
        "merge_lora=true",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
                          preexec_fn=lambda: os.umask(0o027))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "merged" / "model.safetensors").is_file()
    assert "learning_rate: 0.0002" in (out / "config.yaml").read_text()
    # Adapter, merged weights and checkpoint follow the umask (safetensors writes through a 0600 temp file)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.name != ".lock"}
    assert (out / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert {m for p, m in modes.items() if (out / p).is_file()} == {0o640}, modes
    assert {m for p, m in modes.items() if (out / p).is_dir()} == {0o750}, modes


def test_weighted_mixture_oversamples_and_converts_sharegpt(tmp_path, data_file):
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text(
        json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]})
        + "\n"
    )
    script = SFTScriptArgs(dataset_mixture={str(data_file): 0.5, str(sharegpt): 3.0})
    ds = load_conversations(script)
    texts = [r["messages"][-1]["content"] for r in ds]
    assert len(ds) == 2 + 3 and texts.count("Hello!") == 3  # half of 4 rows, and the one row three times


def test_invalid_rows_can_be_dropped_and_counted(tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    rows = [{"messages": CONVERSATIONS[0]}, {"messages": [{"role": "user", "content": "no answer"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_conversations(SFTScriptArgs(dataset=str(path), drop_invalid=True))) == 1
    assert "dropped 1 invalid rows of 2" in capsys.readouterr().out


def tiny_llama3(tmp_path: Path, embedded_path: str) -> Path:
    """A tiny random Llama with the Llama-3 chat template and special tokens (a stand-in for Llama-3-8B base)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.fixtures.chat_families import family_tokenizer

    path = Path(family_tokenizer("llama3", embedded_path, tmp_path))
    tok = AutoTokenizer.from_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def llama3_base(tmp_path: Path, embedded_path: str) -> tuple[Path, list[int]]:
    """`tiny_llama3` as Llama-3-8B base is: its template-token rows zero in both embeddings, and <|end_of_text|> its
    eos, not the template's <|eot_id|>; and the template tokens' ids."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, GenerationConfig

    model_path = tiny_llama3(tmp_path, embedded_path)
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.eos_token = "<|end_of_text|>"
    tok.save_pretrained(model_path)
    config = json.loads((model_path / "config.json").read_text())
    config["eos_token_id"] = tok.eos_token_id
    (model_path / "config.json").write_text(json.dumps(config))
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(model_path)
    weights = load_file(model_path / "model.safetensors")
    tok_ids = [49152 + i for i in range(5)]  # the five Llama-3 special tokens the fixture tokenizer adds
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name][tok_ids] = 0.0
    save_file(weights, model_path / "model.safetensors", metadata={"format": "pt"})
    return model_path, tok_ids


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_llama3_template_mask_and_untrained_token_rows(tmp_path, data_file, embedded_path, peft):
    """Llama-3-template SFT on a tiny random Llama whose template-token rows are zero, as in Llama-3-8B base: those
    rows start from the mean trained row, the loss covers exactly the assistant turns and their <|eot_id|>, and
    every trainable parameter changes."""
    model_path, tok_ids = llama3_base(tmp_path, embedded_path)
    script = SFTScriptArgs(
        model_name_or_path=str(model_path),
        dataset=str(data_file),
        peft=peft,
        chat_template="llama3",
        lora_r=4,
        lora_alpha=8,
    )
    trainer = build_trainer(script, sft_args(tmp_path / "out", learning_rate=1e-2))
    tok = trainer.processing_class
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    model = trainer.model.get_base_model() if peft == "lora" else trainer.model
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        w = emb.weight.detach()
        trained = torch.ones(len(w), dtype=torch.bool)
        trained[tok_ids] = False
        assert w[eot].abs().sum() > 0 and torch.allclose(
            w[eot], w[trained].mean(0), atol=1e-6
        )  # the mean row
    row = trainer.train_dataset[2]
    trained = tok.decode(
        [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    )
    assert trained == "Rome.<|eot_id|>Madrid.<|eot_id|>"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"trainable parameters that did not change: {unchanged[:5]}"


@pytest.mark.integration
def test_qlora_sft_on_the_embedded_model(tmp_path, data_file):
    """4-bit nf4 base (bitsandbytes runs on CPU), LoRA adapters on top: the quantized weights are frozen and
    every adapter parameter changes."""
    import bitsandbytes as bnb

    script = SFTScriptArgs(
        model_name_or_path="embedded", dataset=str(data_file), peft="qlora", lora_r=8, lora_alpha=16
    )
    trainer = build_trainer(script, sft_args(tmp_path / "out"))
    base = trainer.model.get_base_model()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    assert base.config.quantization_config.bnb_4bit_quant_type == "nf4"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"LoRA parameters that did not change: {unchanged[:5]}"

    # merge_lora: the adapter merged into the base's full-precision weights, not into its 4-bit ones
    from safetensors.torch import load_file

    from core.models import resolve_model
    from tests.train.test_distributed import lora_merged_by_hand
    from train.common import merge_adapter

    out = tmp_path / "out"
    trainer.save_model(out)
    merge_adapter(script, trainer.args, out, trainer.processing_class)
    base = load_file(Path(resolve_model("embedded")) / "model.safetensors")
    merged = load_file(out / "merged" / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in merged.items()} == {
        k: (v.shape, torch.float32) for k, v in base.items()
    }
    expected = lora_merged_by_hand(base, load_file(out / "adapter_model.safetensors"), scale=16 / 8)
    wrong = [k for k in expected if not torch.allclose(merged[k], expected[k], atol=1e-5)]
    assert not wrong, f"merged tensors that are not base + delta: {wrong[:5]}"


def test_a_run_resumes_its_checkpoints_only_on_the_data_it_started_with(tmp_path, data_file):
    """The Trainer resumes by step: other rows under the same path would silently continue the epoch on them."""
    from core.config import ConfigError
    from core.rundir import release_output_dir
    from train.common import start

    out = tmp_path / "sft"
    argv = [f"dataset={data_file}", f"output_dir={out}", "bf16=false", "report_to=none"]
    start(
        "sft", [*argv, f"dataset={tmp_path / 'typo.jsonl'}"], SFTScriptArgs, SFTConfig
    )  # then it fails on the data
    start(
        "sft", argv, SFTScriptArgs, SFTConfig
    )  # the corrected command: the signature is no result that blocks it
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")  # a complete checkpoint
    start("sft", argv, SFTScriptArgs, SFTConfig)  # the same data: resumes
    data_file.write_text(data_file.read_text().replace("Red is", "Blue is"))
    with pytest.raises(ConfigError, match="the training data changed since its checkpoints were written"):
        start("sft", argv, SFTScriptArgs, SFTConfig)
    release_output_dir(out)


def test_qlora_configs_are_trls_own_from_our_recipe_keys():
    from train.common import peft_and_quantization

    script = SFTScriptArgs(model_name_or_path="embedded", peft="qlora", lora_r=16, lora_alpha=32,
                           lora_target_modules=["all-linear"])  # fmt: skip
    lora, quant = peft_and_quantization(script, torch.bfloat16)
    assert (lora.r, lora.lora_alpha, lora.target_modules, lora.task_type) == (
        16,
        32,
        "all-linear",
        "CAUSAL_LM",
    )
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16 and quant.bnb_4bit_quant_storage == torch.bfloat16
    lora, quant = peft_and_quantization(SFTScriptArgs(peft="lora", lora_target_modules=["q_proj", "v_proj"]),
                                       torch.float32)  # fmt: skip
    assert quant is None and set(lora.target_modules) == {"q_proj", "v_proj"}
