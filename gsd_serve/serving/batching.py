"""Fusing concurrent calls on a worker: the calls that arrive while its model is busy run next, together.

A worker's gRPC handlers run on a thread pool. Before, each call took the model lock alone, so N sessions
drafting at once cost N separate draft forwards per level. With a BatchGate, a call queues its job; the
first caller that finds the model free takes every queued job (up to `max_batch`) and runs them as one
batch, then hands the model to the next waiting caller. No dedicated thread, no waiting for company: a
lone call runs at once, and a batch forms exactly when calls overlap (the same rule as the router's
Verify batching: one batch in flight, the queue leaves together).
"""
from __future__ import annotations

import threading
from typing import Callable


class Job:
    """One call's work; `run_batch` sets `result` or `error` on each job it is given."""

    __slots__ = ("payload", "result", "error", "done")

    def __init__(self, payload):
        self.payload = payload
        self.result = None
        self.error: BaseException | None = None
        self.done = False


class BatchGate:
    def __init__(self, run_batch: Callable[[list[Job]], None], max_batch: int = 64,
                 execute: Callable | None = None):
        self.run_batch = run_batch
        # how a batch runs: execute(run_batch, batch); e.g. threads.MODEL_THREAD.run (the caller waits)
        self.execute = execute or (lambda fn, batch: fn(batch))
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: list[Job] = []
        self._busy = False
        self.batches = 0
        self.largest = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, payload):
        """Run `payload` in the next batch; returns its result or raises its error."""
        job = Job(payload)
        with self._cond:
            self._queue.append(job)
            while not job.done:
                if self._busy:
                    self._cond.wait()
                    continue
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
                self._busy = True
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
        if job.error is not None:
            raise job.error
        return job.result

    def _run(self, batch: list[Job]) -> None:
        self.batches += 1
        self.largest = max(self.largest, len(batch))
        try:
            self.execute(self.run_batch, batch)
        except BaseException as exc:  # noqa: BLE001 (every job of the batch gets an answer)
            for job in batch:
                if job.result is None and job.error is None:
                    job.error = exc
        finally:
            for job in batch:
                if job.result is None and job.error is None:
                    job.error = RuntimeError("the batch ended without an answer for this call")
                job.done = True
