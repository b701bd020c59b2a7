"""The pipe transport: rank 0 in the calling process, ranks 1..N-1 spawned processes.

Commands (op + small numpy arrays) go to each rank over a pipe, then rank 0 executes the same command
here; the only collectives are the all-reduces inside the model, so an idle runner has nothing that can
time out, and a rank whose parent dies sees the pipe close and exits.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import threading
import time
import traceback
import weakref

import torch

from .rank import Rank, device_for
from .sharding import TensorParallelError, TPGroup, check_tp_size, model_config

_live: "weakref.WeakSet[PipeTransport]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for transport in list(_live):
        try:
            transport.close()
        except Exception:
            pass


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(1.0)


def _rank_main(rank: int, world: int, source, port: int, backend: str, conn, timeout_s: float,
               parent_pid: int, threads: int, dtype: torch.dtype) -> None:
    """Ranks 1..N-1: load the shard, join the group, then execute rank 0's commands until told to close."""
    import warnings
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except Exception:
        pass
    torch.set_num_threads(threads)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        device = device_for(backend, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        me = Rank(rank, world, source, device, dtype)
        conn.send(("loaded", me.load_info))
        me.join(backend, "127.0.0.1", port, timeout_s)
        while True:
            try:
                msg = conn.recv()
            except EOFError:       # rank 0 is gone
                os._exit(0)
            if msg[0] == "close":
                me.leave()
                conn.send(("closed", None))
                return
            me.execute(*msg)
    except BaseException:  # report, then die: rank 0 sees the error on its next call
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass
        os._exit(1)


class PipeTransport:
    """`source`: a model spec for `gsd_serve.models.load_model` (or a checkpoint directory) or a picklable
    zero-argument callable returning the model; every rank loads it and keeps its shard. `model`, if given,
    is rank 0's copy (already loaded from the same source): it is sharded in place. `backend` defaults to
    NCCL when CUDA is available (rank r on GPU r), else gloo. `timeout_s` bounds one collective (a rank that
    hangs mid-forward) and the rendezvous."""

    def __init__(self, source, tp_size: int, *, model: torch.nn.Module | None = None, backend: str | None = None,
                 timeout_s: float = 120.0, startup_timeout_s: float = 600.0, rank_threads: int = 1,
                 dtype: torch.dtype = torch.float32):
        config = model.config if model is not None else model_config(source)
        if config is not None:
            check_tp_size(config, tp_size)        # refuse before starting anything
        self.world = tp_size
        self.dtype = dtype
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.timeout_s = timeout_s
        self.procs: list = []
        self.conns: list = []
        self._closed = False
        self._broken: str | None = None
        self.rank_info: list[dict] = []   # each rank's Rank.load_info, rank 0 first
        store = TPGroup.host_store(tp_size, timeout_s) if tp_size > 1 else None
        ctx = multiprocessing.get_context("spawn")
        try:
            for rank in range(1, tp_size):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_rank_main, name=f"gsd-tp-rank{rank}", daemon=True,
                                args=(rank, tp_size, source, store.port, self.backend, child, timeout_s,
                                      os.getpid(), rank_threads, dtype))
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
            _live.add(self)
            self.local = Rank(0, tp_size, source, device_for(self.backend, 0), dtype, model=model)
            infos = self._wait_loaded(startup_timeout_s)
            self.rank_info = [self.local.load_info] + [infos[i] for i in range(len(self.procs))]
            if tp_size > 1:
                self.local._store = store
                self.local.join(self.backend, "127.0.0.1", store.port, timeout_s)
        except BaseException:
            self._kill_ranks()
            _live.discard(self)
            self._closed = True
            raise
        self.vocab_size = self.local.vocab_size

    @property
    def alive(self) -> bool:
        return not self._closed and self._broken is None

    @property
    def rank_pids(self) -> list[int]:
        """Process ids of ranks 1..N-1."""
        return [p.pid for p in self.procs]

    def call(self, op: str, *args):
        self.check_health()
        for rank, c in enumerate(self.conns, start=1):
            try:
                c.send((op,) + args)
            except (OSError, EOFError, BrokenPipeError) as exc:
                raise self._fail(f"tensor-parallel rank {rank} is unreachable: {exc}") from exc
        try:
            return self.local.execute(op, *args)
        except Exception as exc:
            raise self._fail(f"tensor-parallel {op} failed (a rank died or failed): {exc}") from exc

    def check_health(self) -> None:
        if self._closed:
            raise TensorParallelError("the tensor-parallel runner is closed")
        if self._broken is not None:
            raise TensorParallelError(self._broken)
        for rank, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                raise self._fail(f"tensor-parallel rank {rank} (pid {p.pid}) died, exit code {p.exitcode}")

    def close(self) -> None:
        """Stop the ranks: a barrier, then destroy the group; kills ranks that do not stop."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        if self._broken is None and self.world > 1 and all(p.is_alive() for p in self.procs):
            try:
                for c in self.conns:
                    c.send(("close",))
                self.local.leave()
            except Exception:
                pass
        self.local.group.shutdown()
        for c in self.conns:      # a rank still waiting for a command sees EOF and exits
            c.close()
        for p in self.procs:
            p.join(timeout=10)
        self._kill_ranks()

    def _fail(self, what: str) -> TensorParallelError:
        """Mark the transport broken (every later call raises) and describe what the ranks reported."""
        details = []
        for rank, (p, c) in enumerate(zip(self.procs, self.conns), start=1):
            try:
                while c.poll(0.2 if not p.is_alive() else 0):
                    kind, text = c.recv()
                    if kind == "error":
                        details.append(f"rank {rank}: {text.strip().splitlines()[-1]}")
            except (OSError, EOFError):
                pass
            if not p.is_alive() and f"rank {rank} " not in what:
                details.append(f"rank {rank} (pid {p.pid}) exited with code {p.exitcode}")
        msg = what + ("; " + "; ".join(details) if details else "")
        if self._broken is None:
            self._broken = msg + " (close this runner and start a new one)"
        return TensorParallelError(self._broken)

    def _wait_loaded(self, timeout_s: float) -> dict[int, dict]:
        """Wait for ranks 1..N-1 to load; returns their load_info by index (rank - 1)."""
        deadline = time.monotonic() + timeout_s
        pending = set(range(len(self.procs)))
        infos: dict[int, dict] = {}
        while pending:
            for i in list(pending):
                c, p = self.conns[i], self.procs[i]
                if c.poll(0.05):
                    try:
                        kind, text = c.recv()
                    except EOFError:
                        p.join(timeout=5)
                        raise TensorParallelError(
                            f"tensor-parallel rank {i + 1} exited during start-up with code {p.exitcode} (a "
                            "script that starts ranks needs an `if __name__ == '__main__':` guard)") from None
                    if kind == "error":
                        raise TensorParallelError(f"tensor-parallel rank {i + 1} failed to start:\n{text}")
                    infos[i] = text
                    pending.discard(i)
                elif not p.is_alive() and not c.poll(0):
                    raise TensorParallelError(
                        f"tensor-parallel rank {i + 1} exited during start-up with code {p.exitcode}")
            if time.monotonic() > deadline:
                raise TensorParallelError(f"tensor-parallel ranks {sorted(r + 1 for r in pending)} did not "
                                          f"load the model within {timeout_s:.0f}s")
        return infos

    def _kill_ranks(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
