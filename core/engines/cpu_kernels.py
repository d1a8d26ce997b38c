"""Faster CPU inference for the transformers engine: Linear layers with weights prepacked for oneDNN.

PyTorch's CPU `nn.Linear` calls MKL's sgemm on the weight as stored, which on decoding shapes (a few hundred rows
against a 576 x 49152 output head) reaches 30-70% of the machine's large-matmul rate. oneDNN, with the weight
reordered once into its blocked layout, reaches 90-100% on the same shapes (benchmarks/synth_throughput.py:
1.3-4x per layer, float32 and bfloat16 alike, outputs equal to 1e-6). This is what PyTorch's own compiler
(inductor, `freezing=True`) does on CPU, but compiling a model for every batch shape that continuous batching
produces costs minutes on a laptop, so the reorder is done here directly with the same two operators.
Inference only: a packed layer has no gradient and no usable `.weight` (a meta tensor keeps its shape).
"""

from __future__ import annotations

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
