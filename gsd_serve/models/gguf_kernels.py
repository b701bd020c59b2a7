"""The C kernels for GGUF block weights (kernels/gguf_matmul.c), built on first use and called via ctypes.

The source is compiled once per machine with the system C compiler (`cc -O3 -march=native -fopenmp`, a few
seconds) into the cache directory, keyed by the source, the flags and the CPU's feature flags (the library is
built for this CPU). It links the OpenMP runtime torch already loaded (both say libgomp.so.1), so the
kernels share torch's thread team and its `torch.set_num_threads`.

The ctypes signatures come from the C file's own declarations (`declarations`), which the compiler checks
against the definitions: one source of truth for 27 positional arguments. Where no C compiler is found (or
the build fails) `library()` raises KernelBuildError, and the factory runs dense weights instead.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..core.config import cache_dir
from .hardware import cpu_identity

SOURCE = Path(__file__).parent / "kernels" / "gguf_matmul.c"
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
# "portable": the C paths only, as built where there are no x86 intrinsics (no <immintrin.h>); any other arch
# is a -march level ("native": this CPU's vector paths)
PORTABLE = "portable"
C_TYPES = {"int": ctypes.c_int, "long": ctypes.c_long, "float": ctypes.c_float, "double": ctypes.c_double,
           "size_t": ctypes.c_size_t}
_libs: dict[str, ctypes.CDLL] = {}


class KernelBuildError(RuntimeError):
    """The C kernels could not be built here (no C compiler, or it failed)."""


def _param_type(param: str):
    """The ctypes type of one C parameter declaration: a void pointer for any pointer, else its scalar type."""
    if "*" in param:
        return ctypes.c_void_p
    words = [w for w in param.split() if w not in ("const", "volatile", "register")]
    if len(words) != 2 or words[0] not in C_TYPES:
        raise ValueError(f"no ctypes type for the C parameter '{param.strip()}'")
    return C_TYPES[words[0]]


def declarations(source: str) -> dict[str, tuple]:
    """{name: (restype, argtypes)} of the functions a C source declares at file scope (prototypes, ending in
    ';'), for ctypes: pointers as c_void_p, int/long/float/double/size_t as themselves, void as None."""
    text = re.sub(r"/\*.*?\*/", " ", source, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    found = {}
    for ret, name, params in re.findall(r"^[ \t]*(void|int|long|float|double)\s+(\w+)\s*\(([^;{}]*?)\)\s*;", text, re.M):
        args = [] if params.strip() in ("", "void") else [_param_type(p) for p in params.split(",")]
        found[name] = (None if ret == "void" else C_TYPES[ret], args)
    return found


def compile_flags(arch: str = "native") -> list[str]:
    """The compiler flags of the build for `arch` (a -march level, or PORTABLE)."""
    return [*FLAGS, "-DGSD_PORTABLE"] if arch == PORTABLE else [*FLAGS, f"-march={arch}"]


def compiler() -> str:
    """The C compiler: $CC, else cc, else gcc; KernelBuildError where there is none."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc or shutil.which(cc) is None:
        raise KernelBuildError(f"no C compiler ({cc or 'cc or gcc'}) found to build the GGUF kernels; install gcc")
    return cc


def _build(arch: str = "native") -> Path:
    flags = compile_flags(arch)
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(flags).encode() + cpu_identity().encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"gguf_matmul-{key}.so"
    if out.exists():
        return out
    cc = compiler()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        try:
            proc = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp_out)], capture_output=True, text=True)
        except OSError as exc:
            raise KernelBuildError(f"running the C compiler {cc} failed: {exc}") from None
        if proc.returncode != 0:
            raise KernelBuildError(f"building the GGUF kernels failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp_out, out)   # atomic: concurrent builders (replicas) never load a half-written file
    return out


def library(arch: str = "native") -> ctypes.CDLL:
    """The kernels built for this CPU (`arch` "native"), for another -march level, or PORTABLE: the tests build
    the portable C paths to check them on machines whose own build takes a vector path. Every function the C
    file declares is typed from its declaration."""
    if arch not in _libs:
        lib = ctypes.CDLL(str(_build(arch)))
        for name, (restype, argtypes) in declarations(SOURCE.read_text()).items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
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
