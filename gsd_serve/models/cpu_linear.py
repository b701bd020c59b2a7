"""CPU linear layers with weights prepacked for oneDNN (fp32, and bf16 where the CPU has bf16 units): the
CPU's answer to verification's small GEMMs.

Verification multiplies a handful of rows (the tree's 8-32 tokens) by every weight of the target. With
the default kernels (MKL, called with an unpacked row-major weight) such a GEMM costs on an AMD EPYC
2x-3x a one-row GEMV, which is what makes a verification tree expensive on CPU. oneDNN with the weight
reordered once into its blocked layout is ~2x faster for 1-32 rows (measured on the 2-core dev machine,
SmolLM2-135M: one forward over 1 token 67 -> 46 ms, over 16 tokens 117 -> 63 ms). It changes no
arithmetic that matters here: plain decoding and verification use the same kernels. bf16 weights are
packed the same way where oneDNN runs bf16 natively (AMX / AVX512_BF16): 1.2-1.6x faster than unpacked bf16.

Set GSD_SERVE_PACKED_LINEAR=0 to keep the stock kernels (for A/B runs and for debugging).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .switches import forced

# Rows the reorder is tuned for: the size of a typical verification tree (a one-row decode step is as fast).
BATCH_HINT = 32


def packing_available(weight: torch.Tensor) -> bool:
    if forced("GSD_SERVE_PACKED_LINEAR") is False:
        return False
    if not (weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedWeight:
    """y = x @ W.T (+ b) with W kept twice: as given (state_dict, ties) and reordered for oneDNN."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), BATCH_HINT)
        self.bias = None if bias is None else bias.detach()
        self.out_features = weight.shape[0]
        self.dtype = weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype or x.requires_grad:
            raise RuntimeError(f"PackedWeight is for {self.dtype} inference, got {x.dtype} input")
        flat = x.reshape(-1, x.shape[-1])
        if not flat.is_contiguous():
            flat = flat.contiguous()
        if flat.shape[0] == 1 and self.dtype != torch.float32:
            # A single bf16 row takes oneDNN's GEMV path, which on some CPUs sums K in another order than its
            # GEMM does for 2..32 rows (AMD EPYC Zen 4, avx512_bf16: at K=1536 one row in ~16 rounds to
            # another bf16 value). A decoding step would then differ from the same token verified in a
            # tree, and near-ties would flip (5 of 12 prompts left bf16 ar within 128 tokens). Two rows take
            # the GEMM path: a step costs the same (27 us for 1 or 2 rows of the 576x1536 projection) and
            # computes each row bit for bit as a tree does.
            y = torch.ops.mkldnn._linear_pointwise(flat.expand(2, -1).contiguous(), self.packed, self.bias,
                                                   "none", [], "")[:1]
        else:
            y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


class PackedLinear(nn.Module):
    """A drop-in for an inference-only nn.Linear; `weight`/`bias` stay the original parameters."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._kernel = PackedWeight(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad and not torch.is_inference_mode_enabled():
            return F.linear(x, self.weight, self.bias)   # training through it: the stock path, with autograd
        if torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)   # let the compiler choose (it cannot lower the packed op)
        return self._kernel(x)


def pack_linears(module: nn.Module) -> int:
    """Replace every plain nn.Linear under `module` by a PackedLinear, in place; returns how many.

    Subclasses of nn.Linear (quantized, tensor-parallel...) are left alone. Does nothing where packing is
    unavailable (GPU, non-fp32, no oneDNN, or GSD_SERVE_PACKED_LINEAR=0).
    """
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            if not packing_available(child.weight):
                return count
            setattr(module, name, PackedLinear(child))
            count += 1
        else:
            count += pack_linears(child)
    return count
