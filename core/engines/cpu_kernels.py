"""Faster CPU inference for the transformers engine: Linear layers with weights prepacked for oneDNN, and a
compiled kernel for decoding attention.

PyTorch's CPU `nn.Linear` calls MKL's sgemm on the weight as stored, which on decoding shapes (a few hundred rows
against a 576 x 49152 output head) reaches 30-70% of the machine's large-matmul rate. oneDNN, with the weight
reordered once into its blocked layout, reaches 90-100% on the same shapes (benchmarks/synth_throughput.py:
1.3-4x per layer, float32 and bfloat16 alike, outputs equal to 1e-6). This is what PyTorch's own compiler
(inductor, `freezing=True`) does on CPU, but compiling a model for every batch shape that continuous batching
produces costs minutes on a laptop, so the reorder is done here directly with the same two operators.
Inference only: a packed layer has no gradient and no usable `.weight` (a meta tensor keeps its shape).

Decoding attention (one new token per row against the row's KV cache) is where PyTorch falls short on a CPU: its
flash kernel for `scaled_dot_product_attention` reads the cache at 8-10 GB/s on these shapes (a few dozen
columns of a few kv heads per row, hundreds of rows), a third of what the memory gives, because it runs two tiny
GEMM calls and a softmax per (row, head) block; the same sum as batched matmuls measured no better, and through
`torch.compile` 1.2x, with a compiler pass in every process. `DECODE_ATTENTION_CPP` below is one pass over each
row's keys and values with an online softmax, the query heads that share a kv head together, masked columns never
read: 2.2x faster per layer call, equal to sdpa within 1e-6 (benchmarks/decode_attention.py;
tests/core/test_cpu_kernels.py). It is compiled on first use with PyTorch's `cpp_extension` (a C++ compiler with
OpenMP and ninja; ~30 s) and cached, once per machine and environment; where it cannot be built the engine says so
in one line and runs sdpa.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

# The row count oneDNN tunes the layout for: a full decoding batch. Any row count works.
_PACK_ROWS = 128


class PackedLinear(torch.nn.Module):
    """An `nn.Linear` whose weight lives in oneDNN's blocked layout."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().to(dtype or linear.weight.dtype)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, _PACK_ROWS)
        self.bias = None if linear.bias is None else linear.bias.detach().to(w.dtype)
        self.weight = torch.empty(w.shape, dtype=w.dtype, device="meta")  # shape and dtype, for inspection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            x.to(self.weight.dtype), self.packed, self.bias, "none", [], ""
        )


def supported(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build and CPU run oneDNN's packed Linear in `dtype`."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    return dtype == torch.float32 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_linears(model: Any) -> int:
    """Replace every float32/bfloat16 `nn.Linear` of a CPU model by a `PackedLinear`; returns how many.

    The output head of a bfloat16 model is packed in float32: bfloat16 logits are rounded to 1/8 around 20, a
    visible change to the distribution sampling at T=1 draws from (Magpie's instructions), for a fifth of the
    matmul work. A layer the packing refuses stays as it was (an unsupported build or CPU packs nothing)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replaced = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear or child.weight.device.type != "cpu":
                continue
            if not supported(child.weight.dtype):
                continue
            try:
                packed = PackedLinear(child, torch.float32 if child is head else None)
            except RuntimeError:  # an old oneDNN without the op for this shape or dtype
                continue
            setattr(module, child_name, packed)
            replaced += 1
    return replaced


# ---------------------------------------------------------------------------------------------- decode attention

DECODE_ATTENTION_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

// out[b, 0, h] = sum_s softmax_s(q[b, h, 0] . k[b, h / G, s] * scale) v[b, h / G, s] over the columns s where
// mask[b, s]; G = query heads per kv head. One task per (row, kv head): its keys and values are read once, in
// one pass (online softmax: the running sums are rescaled when the maximum grows), for all G query heads.
template <typename T>
static void attend(const float* q, const T* k, const T* v, const bool* mask, float* out, int64_t B, int64_t H,
                   int64_t KV, int64_t S, int64_t D, float scale, int64_t qsb, int64_t qsh, int64_t ksb,
                   int64_t ksh, int64_t kss, int64_t vsb, int64_t vsh, int64_t vss, int64_t msb, int64_t mss) {
  const int64_t G = H / KV;
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(G * D), acc(G * D), top(G), total(G), score(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KV, h = task % KV;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qs[g * D + d] = q[b * qsb + (h * G + g) * qsh + d] * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(top.begin(), top.end(), -1e30f);
      std::fill(total.begin(), total.end(), 0.f);
      for (int64_t s = 0; s < S; ++s) {
        if (!mask[b * msb + s * mss]) continue;
        const T* kr = k + b * ksb + h * ksh + s * kss;
        const T* vr = v + b * vsb + h * vsh + s * vss;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qs.data() + g * D;
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * static_cast<float>(kr[d]);
          score[g] = dot;
        }
        for (int64_t g = 0; g < G; ++g) {
          float* a = acc.data() + g * D;
          float p = 1.f;
          if (score[g] > top[g]) {  // a new maximum: rescale what was summed so far
            const float r = std::exp(top[g] - score[g]);
            for (int64_t d = 0; d < D; ++d) a[d] *= r;
            total[g] *= r;
            top[g] = score[g];
          } else {
            p = std::exp(score[g] - top[g]);
          }
          total[g] += p;
          for (int64_t d = 0; d < D; ++d) a[d] += p * static_cast<float>(vr[d]);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = total[g] > 0.f ? 1.f / total[g] : 0.f;  // a row with no column attends to nothing
        float* o = out + (b * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv;
      }
    }
  });
}

// q [B, H, 1, D]; k, v [B, KV, S, D], unit stride in D (a view of a longer cache is fine); mask [B, S] bool.
// Returns [B, 1, H, D] in q's dtype, the layout transformers' attention functions return.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask,
                               double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes(), "decode shapes");
  TORCH_CHECK(k.size(0) == q.size(0) && q.size(1) % k.size(1) == 0 && k.size(3) == q.size(3), "head shapes");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.scalar_type() == v.scalar_type(), "kv layout");
  TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.dim() == 2 && mask.size(0) == q.size(0) &&
              mask.size(1) == k.size(2), "mask shape");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KV = k.size(1), S = k.size(2);
  auto qf = q.to(torch::kFloat).contiguous();
  auto out = torch::empty({B, 1, H, D}, q.options().dtype(torch::kFloat));
  auto run = [&](auto* kp, auto* vp) {
    attend(qf.data_ptr<float>(), kp, vp, mask.data_ptr<bool>(), out.data_ptr<float>(), B, H, KV, S, D,
           static_cast<float>(scale), qf.stride(0), qf.stride(1), k.stride(0), k.stride(1), k.stride(2),
           v.stride(0), v.stride(1), v.stride(2), mask.stride(0), mask.stride(1));
  };
  if (k.scalar_type() == torch::kFloat) {
    run(k.data_ptr<float>(), v.data_ptr<float>());
  } else {
    TORCH_CHECK(k.scalar_type() == torch::kBFloat16, "kv dtype: float32 or bfloat16");
    run(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
  }
  return out.to(q.scalar_type());
}
"""

# Reassociating float sums lets the compiler vectorize the dot products; not -ffast-math, which (GCC < 13) links
# code that flushes denormals to zero in the whole process.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
           "-fno-trapping-math"]  # fmt: skip


_STALE_LOCK_S = 600  # a build takes ~30 s; a lock this old is a killed build's


def _machine_tag() -> str:
    """Names the build after the CPU's instruction sets (-march=native) and the environment (Python, PyTorch and
    their headers): a home directory shared by cluster nodes of different CPUs, or by several venvs, keeps one
    build per kind, never one that faults or fails to load in another, nor one that each rebuilds in turn."""
    flags = f"{platform.machine()} {sys.prefix} {sys.version_info[:2]} {torch.__version__} "
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags += next(
            (ln for ln in cpuinfo.read_text().splitlines() if ln.startswith(("flags", "Features"))), ""
        )
    return hashlib.sha256((flags + DECODE_ATTENTION_CPP).encode()).hexdigest()[:12]


def _build_directory(name: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "harness" / name


@functools.cache
def decode_kernel() -> Any:
    """The compiled decode attention (built on first use, then loaded from the build directory), or None where
    it cannot be built here (no C++ compiler, OpenMP or ninja), said once on stderr."""
    from torch.utils.cpp_extension import load_inline

    name = f"harness_decode_attention_{_machine_tag()}"
    build = _build_directory(name)
    try:  # a build fails in many ways (no compiler, no OpenMP, no ninja, no writable cache); sdpa still runs
        build.mkdir(parents=True, exist_ok=True)
        # PyTorch's build lock: a build killed midway leaves it behind, and every later load would wait on it
        lock = build / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink(missing_ok=True)
        if not (build / f"{name}.so").exists():
            print(
                "engine: building the CPU decode attention kernel (once per machine, ~30 s)", file=sys.stderr
            )
        return load_inline(
            name,
            cpp_sources=DECODE_ATTENTION_CPP,
            functions=["decode_attention"],
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
        )
    except Exception as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        print(
            f"engine: the CPU decode attention kernel could not be built ({first}); decoding uses sdpa "
            f"(build log: {build}; engine.decode_kernel=false skips the build)",
            file=sys.stderr,
        )
        return None


# Attention arguments that change the sum (logit soft-capping, attention sinks): such models run sdpa.
_UNSUPPORTED = ("softcap", "s_aux", "sinks")


def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention function for the engine: the kernel for one-token decoding steps on a CPU with the
    continuous batcher's boolean mask, sdpa for everything else (prefill, other masks, other devices)."""
    kernel = decode_kernel()
    if (
        kernel is None
        or query.device.type != "cpu"
        or query.shape[2] != 1
        or attention_mask is None
        or attention_mask.dtype != torch.bool
        or attention_mask.shape != (query.shape[0], 1, 1, key.shape[2])
        or key.dtype not in (torch.float32, torch.bfloat16)
        or key.stride(-1) != 1
        or value.stride(-1) != 1
        or dropout
        or any(kwargs.get(name) is not None for name in _UNSUPPORTED)
    ):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # off the decoding path

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return kernel.decode_attention(query, key, value, attention_mask[:, 0, 0], scale), None


def use_decode_kernel(model: Any) -> bool:
    """Route the model's attention through `decode_attention`; False (the model unchanged) where the kernel
    cannot be built or the model does not take a registered attention function."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa" or decode_kernel() is None:
        return False
    AttentionInterface.register("harness_cpu_decode", decode_attention)
    # the masks sdpa takes: prefill and every case the kernel leaves to sdpa get what they got before
    ALL_MASK_ATTENTION_FUNCTIONS.register("harness_cpu_decode", sdpa_mask)
    model.set_attn_implementation("harness_cpu_decode")
    return True
