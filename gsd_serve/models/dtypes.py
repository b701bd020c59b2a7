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

import hashlib
import json
import os
import time

import torch

from ..core.config import cache_dir

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


def cpu_description() -> str:
    """The CPU's model name and the vector/matrix extensions that decide kernels and dtypes here, e.g.
    "AMD EPYC (avx2, avx512f, avx512_bf16)": what every benchmark result names."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        import platform
        name = platform.processor()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve")
    have = [f for f in wanted if f in flags]
    return f"{name or 'unknown CPU'} ({', '.join(have)})" if have else (name or "unknown CPU")


def cpu_identity() -> str:
    """This CPU's model name and feature flags as /proc/cpuinfo gives them (what kernels and dtypes depend on)."""
    info = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    info += line
                if line.startswith("flags"):
                    break
    except OSError:
        import platform
        info = platform.processor()
    return info


def _cpu_key() -> str:
    info = cpu_identity()
    return hashlib.sha256(f"{info}|{torch.__version__}|{torch.get_num_threads()}".encode()).hexdigest()[:16]


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


BUSY_LIMIT = 0.25     # a measurement taken while other work used more than this share of the CPUs is provisional


def machine_busy(interval_s: float = 0.2) -> float | None:
    """The share of all CPUs' time spent busy over `interval_s` (/proc/stat), while this process waits; None
    where that cannot be read."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]    # user nice system idle iowait irq softirq steal
        return sum(fields), fields[3] + fields[4]

    try:
        total0, idle0 = sample()
        time.sleep(interval_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return None if total <= 0 else max(0.0, 1.0 - (idle1 - idle0) / total)


def remembered(filename: str, key: str, measure) -> dict:
    """The entry `key` of the JSON file `filename` in the cache directory; measured with `measure()` (a dict)
    and written back atomically when missing. For per-CPU choices that are measured once.

    A measurement taken while the machine was busy with other work (more than BUSY_LIMIT of its CPUs: a
    distill job, a test suite, another replica loading) is kept with its `measured_busy` share and taken
    again by the first call that finds the machine quiet: on a 2-core Zen 4 with a distill job running, the
    default target's 1-token forward measured 16.9 ms against 6.4 ms quiet and extra rows looked half their
    cost, which sized verification trees too large for good."""
    path = cache_dir() / filename
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if entry is not None and entry.get("measured_busy") is None:
        return entry
    busy = machine_busy()
    if entry is not None and (busy is None or busy > BUSY_LIMIT):
        return entry                  # provisional, and still busy (or unknown): keep it
    entry = measure()
    if busy is not None and busy > BUSY_LIMIT:
        entry["measured_busy"] = round(busy, 2)
    known[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)
    except OSError:
        pass
    return entry


def cpu_prefers_bf16() -> bool:
    """Whether bf16 GEMMs are measurably faster than fp32 on this CPU (measured once, then remembered)."""
    forced = os.environ.get("GSD_SERVE_CPU_BF16")
    if forced is not None:
        return forced.lower() in ("1", "true", "yes", "on")

    def measure() -> dict:
        gain = measure_bf16_gain()
        return {"bf16_gain": round(gain, 3), "prefers_bf16": gain >= BF16_MIN_GAIN}

    return bool(remembered("cpu-dtype.json", _cpu_key(), measure)["prefers_bf16"])
