"""How many torch threads a replica computes with: set from the CPUs the replica is given.

A Ray worker starts with OMP_NUM_THREADS=1 when its actor reserves no CPU (`num_cpus: 0`, this project's
one-machine default), so a replica's forwards ran on one thread while the in-process engine used every
core: a Verify took 57 ms where an in-process step takes 33 ms (issue 13). A replica now sets its thread
count explicitly, in this order:

    the app arg `torch_threads` (or `draft_torch_threads` / `target_torch_threads`), a number > 0
    $GSD_TORCH_THREADS
    the CPUs Ray assigned to the replica (num_cpus > 0), rounded up
    else (num_cpus 0: the replica shares the machine) the cores this process may run on

and OMP_WAIT_POLICY=PASSIVE (unless set), so that a replica's idle OpenMP threads sleep instead of spinning
on the cores the other replicas are computing on (the draft and the target alternate within a round).
"""
from __future__ import annotations

import math
import os
import sys


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(requested=None, env: str | None = None, assigned_cpus: float | None = None,
                   cores: int | None = None) -> tuple[int, str]:
    """(threads, why) by the rule above; `cores` defaults to this process's available cores."""
    cores = cores or available_cores()
    if requested not in (None, "", "auto", 0):
        n = int(requested)
        if n < 1:
            raise ValueError(f"torch_threads must be >= 1 or auto, got {requested!r}")
        return n, "app args"
    if env:
        return max(1, int(env)), "GSD_TORCH_THREADS"
    if assigned_cpus:
        return max(1, min(cores, math.ceil(assigned_cpus))), f"{assigned_cpus:g} CPUs assigned by Ray"
    return cores, "num_cpus 0: all cores of the machine"


def prepare_openmp() -> bool:
    """Ask OpenMP to sleep when idle, if torch (which loads OpenMP and reads this once) is not loaded yet."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


def apply_threads(n: int) -> int:
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()
