"""What every benchmark result records about how it was taken: `manifest.json` beside its figures.

A figure is only worth what its conditions were: the commit, the command, the CPU (these VMs change between
sessions: AVX2-only Zen 3, AVX-512 Zen 4/5, Intel with AMX), and how busy the machine was while it ran. The
load is read from /proc/stat over the whole run: the share of the CPUs' time that went to other processes
(everything busy minus this process and its children) and to the hypervisor (steal: a neighbour on the host
took the CPU). A run is `quiet` when both stayed under a tenth of the machine.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

QUIET_LIMIT = 0.10


def git_commit() -> str | None:
    """The checkout's commit (short), with "+dirty" when it has uncommitted changes; None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=root).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def cpu_record() -> dict:
    """The CPU as results name it: its description, family and model (which tell Zen 3 from Zen 4), cores."""
    from ..models.hardware import cpu_description

    family = model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu family") and family is None:
                    family = int(line.split(":")[1])
                elif line.startswith("model\t") and model is None:
                    model = int(line.split(":")[1])
                if family is not None and model is not None:
                    break
    except (OSError, ValueError):
        pass
    return {"cpu": cpu_description(), "family": family, "model": model, "cores": os.cpu_count(),
            "platform": platform.platform()}


def _cpu_times() -> tuple[int, int, int] | None:
    """(all jiffies, busy jiffies, steal jiffies) of the machine."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]    # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return sum(v), sum(v) - v[3] - v[4] - v[7], v[7]


def _own_jiffies() -> int:
    t = os.times()
    return round((t.user + t.system + t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK"))


class LoadMeter:
    """How busy the machine was with other work between start() and stop()."""

    def start(self) -> "LoadMeter":
        self._t0, self._cpu0, self._own0 = time.time(), _cpu_times(), _own_jiffies()
        return self

    def stop(self) -> dict:
        cpu1, own1 = _cpu_times(), _own_jiffies()
        out = {"seconds": round(time.time() - self._t0, 1)}
        if self._cpu0 is None or cpu1 is None or cpu1[0] <= self._cpu0[0]:
            return dict(out, others=None, steal=None, quiet=None)
        total = cpu1[0] - self._cpu0[0]
        others = max(0.0, (cpu1[1] - self._cpu0[1]) - (own1 - self._own0)) / total
        steal = (cpu1[2] - self._cpu0[2]) / total
        return dict(out, others=round(others, 3), steal=round(steal, 3),
                    quiet=others < QUIET_LIMIT and steal < QUIET_LIMIT)


def write_manifest(out_dir: str | Path, load: dict | None = None, **extra) -> Path:
    """Write `manifest.json` into `out_dir`: commit, command, date, CPU, the load measured over the run, and any
    `extra` fields. Returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"commit": git_commit(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **cpu_record(), "load": load, **extra}
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path
