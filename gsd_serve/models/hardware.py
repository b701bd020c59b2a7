"""This machine as the model layer sees it: which CPU it is, how busy it is, and the measurements taken on it.

Kernels, dtypes and verification-tree sizes are chosen per CPU. `cpu_identity()` is what such a choice is
keyed by (the model name and every feature flag), `cpu_description()` what a benchmark result names (the
model name and the extensions that decide kernels and dtypes), and `remembered()` keeps a measurement per
CPU in the cache directory, taking it again when it was taken on a busy machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

from ..core.config import cache_dir

# the extensions a result names: they decide the C kernels' paths and whether bf16 is native
DESCRIBED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve")


def _cpuinfo() -> tuple[str, str] | None:
    """(model name line, flags line) of the first CPU in /proc/cpuinfo ("" for one it lacks); None where there
    is no /proc/cpuinfo."""
    name = flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line
                elif line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        return None
    return name, flags


def cpu_identity() -> str:
    """This CPU's model name and feature flags as /proc/cpuinfo gives them (what kernels and dtypes depend on);
    the platform's processor name where there is no /proc/cpuinfo."""
    info = _cpuinfo()
    if info is None:
        import platform
        return platform.processor()
    return info[0] + info[1]


def cpu_description() -> str:
    """The CPU's model name and the vector/matrix extensions that decide kernels and dtypes here, e.g.
    "AMD EPYC (avx2, avx512f, avx512_bf16)": what every benchmark result names."""
    info = _cpuinfo()
    if info is None:
        import platform
        name, flags = platform.processor(), ""
    else:
        name, flags = info[0].split(":", 1)[-1].strip(), info[1]
    have = [f for f in DESCRIBED_FLAGS if f in set(flags.split(":", 1)[-1].split())]
    return f"{name or 'unknown CPU'} ({', '.join(have)})" if have else (name or "unknown CPU")


def cpu_key() -> str:
    """A short key of what a CPU measurement depends on: this CPU, the torch version and its thread count."""
    import torch

    return hashlib.sha256(f"{cpu_identity()}|{torch.__version__}|{torch.get_num_threads()}".encode()).hexdigest()[:16]


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


def remembered(filename: str, key: str, measure, busy=machine_busy) -> dict:
    """The entry `key` of the JSON file `filename` in the cache directory; measured with `measure()` (a dict)
    and written back atomically when missing. For per-CPU choices that are measured once.

    `busy()` reads how busy the machine is (a share of its CPUs, None: unknown). A measurement taken while
    the machine was busy with other work (more than BUSY_LIMIT: a distill job, a test suite, another replica
    loading) is kept with its `measured_busy` share and taken again by the first call that finds the machine
    quiet: on a 2-core Zen 4 with a distill job running, the default target's 1-token forward measured 16.9 ms
    against 6.4 ms quiet and extra rows looked half their cost, which sized verification trees too large."""
    path = cache_dir() / filename
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if entry is not None and entry.get("measured_busy") is None:
        return entry
    share = busy()
    if entry is not None and (share is None or share > BUSY_LIMIT):
        return entry                  # provisional, and still busy (or unknown): keep it
    entry = measure()
    if share is not None and share > BUSY_LIMIT:
        entry["measured_busy"] = round(share, 2)
    known[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)
    except OSError:
        pass
    return entry
