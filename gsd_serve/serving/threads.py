"""How many torch threads a replica computes with: set from the CPUs the replica is given.

A Ray worker starts with OMP_NUM_THREADS=1 when its actor reserves no CPU (`num_cpus: 0`, this project's
one-machine default), so a replica's forwards ran on one thread while the in-process engine used every
core: a Verify took 57 ms where an in-process step takes 33 ms (issue 13). A replica now sets its thread
count explicitly, in this order:

    the app arg `torch_threads` (or `draft_torch_threads` / `target_torch_threads`), a number > 0
    $GSD_TORCH_THREADS
    the CPUs Ray assigned to the replica (num_cpus > 0), rounded up
    else (num_cpus 0: the replica shares the machine) the cores this process may run on for a target, and
         one thread for a draft

A draft's forwards are a few rows of a small model: more threads buy it little, and their idle spinning
takes the cores the target is computing on when the two share a machine. Served gsd on the 2-core dev
machine, full speculation, 12 prompts x 64 tokens: a 2-thread draft gave 40.7 / 23.4 / 29.5 tok/s at 1 / 2 / 4
streams, a 1-thread draft 52.8 / 48.2 / 71.7 (served ar: about 41 / 41 / 60).

OpenMP's wait policy is left as the environment sets it. PASSIVE (idle threads sleep at once) makes each
of a forward's parallel regions wake its threads with a futex: a bf16 step took 31-32 ms instead of 16.5
(bench/results/2026-12-01-epyc-avx512-serve-threads/model_thread.jsonl); a short spin (GOMP_SPINCOUNT=10000) gave no clear
difference (one sweep each, within this machine's noise), so replicas keep OpenMP's default.
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
                   cores: int | None = None, kind: str = "target") -> tuple[int, str]:
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
    if kind == "draft":
        return 1, "num_cpus 0: a draft shares the machine with one thread"
    return cores, "num_cpus 0: all cores of the machine"


def openmp_wait_setting() -> str:
    """How this replica's idle OpenMP threads wait (reported in its Info)."""
    if "OMP_WAIT_POLICY" in os.environ:
        return "OMP_WAIT_POLICY=" + os.environ["OMP_WAIT_POLICY"]
    return "GOMP_SPINCOUNT=" + os.environ.get("GOMP_SPINCOUNT", "default")


def apply_threads(n: int) -> int:
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


class ModelThread:
    """The one thread that does all of a worker process's model work: loading, packing, every forward.

    OpenMP keeps a team of worker threads per thread that starts parallel regions. A replica used to load
    its model on one thread and run forwards on whichever gRPC handler thread took the call, so several
    teams lived on the same cores, and a forward on a handler thread was ~1.8x slower than the same forward
    on the loading thread (bf16 step of the default target on 2 cores: 16.5 ms on the loading thread, 28.5-30.9
    ms on another; bench/model_thread_check.py). Handlers hand their model work here and wait for it.
    torch's inference mode is per thread: work run here enters it itself."""

    def __init__(self, name: str = "gsd-model"):
        from concurrent.futures import ThreadPoolExecutor

        self._ident: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name,
                                            initializer=self._remember)

    def _remember(self) -> None:
        import threading

        self._ident = threading.get_ident()

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the model thread (at once when called from it); returns or raises its result."""
        import threading

        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        return self._executor.submit(fn, *args, **kwargs).result()


MODEL_THREAD = ModelThread()
