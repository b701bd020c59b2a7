"""Which floating-point type the models run in: `--dtype auto|float32|bfloat16|float16`.

`auto` is bfloat16 on GPUs. On a CPU it is bfloat16 only where this CPU multiplies bf16 matrices
natively and measurably faster than fp32 at the shapes speculation uses (a verification tree of 16
tokens), else float32: Intel's AMX and AVX512_BF16 units make a 16-row bf16 GEMM 2.5-3x faster than fp32,
while an AVX2-only CPU emulates bf16 and loses. The choice is measured once per CPU model (a ~0.3 s
micro-benchmark) and remembered in the cache directory.

float32 is the exact reference: every method is token-identical to plain decoding there. In bf16 a
one-token step and a tree forward can round differently, so a near-tie can flip (see README, Exactness).
"""
from __future__ import annotations

import time

import torch

from .hardware import cpu_key, remembered
from .switches import forced

NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
         "float16": torch.float16, "fp16": torch.float16}
CHOICES = ("auto", "float32", "bfloat16", "float16")
BF16_MIN_GAIN = 1.3    # bf16 must be this much faster than fp32 on a 16-row GEMM to be chosen on a CPU


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(name: str | torch.dtype | None = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """The torch dtype for a --dtype value on `device` (None: CUDA if present, else CPU)."""
    if isinstance(name, torch.dtype):
        return name
    name = (name or "auto").lower()
    if name != "auto":
        try:
            return NAMES[name]
        except KeyError:
            raise ValueError(f"unknown dtype '{name}' (choose from {', '.join(CHOICES)})") from None
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_prefers_bf16() else torch.float32


def measure_bf16_gain(rows: int = 16, repeats: int = 30) -> float:
    """fp32 time / bf16 time of a [rows x 576] @ [576 x 1536] GEMM (a SmolLM2 MLP projection; the ratio is
    what matters, and it holds for wider models)."""
    def best(dtype) -> float:
        x = torch.randn(rows, 576, dtype=dtype)
        w = torch.randn(1536, 576, dtype=dtype)
        times = []
        with torch.inference_mode():
            for _ in range(5):
                torch.nn.functional.linear(x, w)
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(4):
                    torch.nn.functional.linear(x, w)
                times.append(time.perf_counter() - t0)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def cpu_prefers_bf16() -> bool:
    """Whether bf16 GEMMs are measurably faster than fp32 on this CPU (measured once, then remembered)."""
    force = forced("GSD_SERVE_CPU_BF16")
    if force is not None:
        return force

    def measure() -> dict:
        gain = measure_bf16_gain()
        return {"bf16_gain": round(gain, 3), "prefers_bf16": gain >= BF16_MIN_GAIN}

    return bool(remembered("cpu-dtype.json", cpu_key(), measure)["prefers_bf16"])
