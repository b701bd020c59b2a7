"""The C kernels for GGUF block weights (kernels/gguf_matmul.c), built on first use and called via ctypes.

The source is compiled once per machine with the system C compiler (`cc -O3 -march=native -fopenmp`, a few
seconds) into the cache directory, keyed by the source, the flags and the CPU's feature flags (the library is
built for this CPU). It links the OpenMP runtime torch already loaded (both say libgomp.so.1), so the
kernels share torch's thread team and its `torch.set_num_threads`.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..core.config import cache_dir
from .hardware import cpu_identity

SOURCE = Path(__file__).parent / "kernels" / "gguf_matmul.c"
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_libs: dict[str, ctypes.CDLL] = {}


class KernelBuildError(RuntimeError):
    """The C kernels could not be built here (no C compiler, or it failed)."""


def _build(arch: str = "native") -> Path:
    flags = [*FLAGS, f"-march={arch}"]
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(flags).encode() + cpu_identity().encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"gguf_matmul-{key}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise KernelBuildError("no C compiler (cc or gcc) found to build the GGUF kernels; install gcc")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp_out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelBuildError(f"building the GGUF kernels failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp_out, out)   # atomic: concurrent builders (replicas) never load a half-written file
    return out


def library(arch: str = "native") -> ctypes.CDLL:
    """The kernels built for this CPU (`arch` "native"), or for another -march level: the tests build the
    portable C paths (e.g. "x86-64-v2", no AVX) to check them on machines whose own build takes a vector path."""
    if arch not in _libs:
        lib = ctypes.CDLL(str(_build(arch)))
        for name in ("q4_1_matmul", "q8_0_matmul"):
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                           ctypes.c_void_p]
            fn.restype = None
        P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        signatures = {"rms_norm": [P, P, F, I, I, P],
                      "layer_forward": [I, P, I, I, P, F, P, P, P, F, P, I, P, P, P, I, P, P, P, P, P, P,
                                        I, I, I, F, P]}
        for name, args in signatures.items():
            getattr(lib, name).argtypes = args
            getattr(lib, name).restype = None
        _libs[arch] = lib
    return _libs[arch]


def block_matmul(kind: str, x: torch.Tensor, blocks: torch.Tensor, out_features: int,
                 arch: str = "native") -> torch.Tensor:
    """x [M, K] fp32 contiguous times the weight held as GGUF blocks [out_features, K/32 * block bytes]
    (uint8, kind "q4_1" or "q8_0"): [M, out_features] fp32."""
    M, K = x.shape
    y = torch.empty(M, out_features, dtype=torch.float32)
    lib = library(arch)
    fn = lib.q4_1_matmul if kind == "q4_1" else lib.q8_0_matmul
    fn(x.data_ptr(), M, K, blocks.data_ptr(), out_features, y.data_ptr())
    return y
