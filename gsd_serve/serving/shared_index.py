"""The cross-request index of an application, shared by its target replicas through Redis.

Each target replica keeps its own `core.lookup.SharedSuffixIndex` (bounded, least recently used out), which its
planner matches every round. A `SharedLog` lets the replicas teach each other: a replica publishes every
finished request's tokens to one Redis stream (capped at `max_entries`, the oldest trimmed), and a reader
thread adds what the other replicas published to the local index. A request answered on one replica thus
helps its repeat on any other, which is what agents re-issuing a call, retries and templated requests send.

Redis is an optimisation here, never needed for exactness (every proposal is verified): while it is down a
replica keeps its own index, publishes nothing and retries quietly. The stream's key names the model's
fingerprint, so replicas of different models never mix their tokens.
"""
from __future__ import annotations

import logging
import threading
import time
from array import array

log = logging.getLogger(__name__)


class SharedLog:
    def __init__(self, url: str, fingerprint: str, replica_id: str, max_entries: int = 2000,
                 max_tokens: int = 65536, block_ms: int = 1000):
        self.url = url
        self.key = f"gsd:shared-lookup:{fingerprint}"
        self.replica_id = replica_id
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self.block_ms = block_ms
        self.published = 0
        self.received = 0
        self.failures = 0
        self._client = None
        self._index = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = 0.0

    def _redis(self):
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(self.url, socket_timeout=max(2.0, 2 * self.block_ms / 1000),
                                                socket_connect_timeout=1.0)
        return self._client

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self._client = None
        if time.monotonic() - self._warned > 60:
            self._warned = time.monotonic()
            log.warning("shared lookup index: Redis unavailable (%s); this replica keeps its own index", exc)

    def publish(self, tokens) -> None:
        """Share one finished request's tokens (prompt and output) with the other replicas."""
        tokens = list(tokens)[-self.max_tokens:]
        if not tokens:
            return
        try:
            self._redis().xadd(self.key, {"r": self.replica_id, "t": array("i", tokens).tobytes()},
                               maxlen=self.max_entries, approximate=True)
            self.published += 1
        except Exception as exc:  # noqa: BLE001 (an outage costs sharing, never a request)
            self._failed(exc)

    def attach(self, index) -> None:
        """Feed what the other replicas publish into `index` (a SharedSuffixIndex), from a background thread."""
        self._index = index
        self._thread = threading.Thread(target=self._read, daemon=True, name="gsd-shared-lookup")
        self._thread.start()

    def _read(self) -> None:
        last = "$"          # only what is published from now on: the index starts empty, as a fresh replica's
        while not self._stop.is_set():
            try:
                got = self._redis().xread({self.key: last}, count=256, block=self.block_ms)
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
                self._stop.wait(1.0)
                continue
            for _, entries in got or ():
                for entry_id, fields in entries:
                    last = entry_id
                    if fields.get(b"r", b"").decode() == self.replica_id:
                        continue          # this replica's own: already in its index
                    data = fields.get(b"t", b"")
                    if len(data) % 4:
                        continue
                    self._index.add(array("i", data).tolist())
                    self.received += 1

    def close(self) -> None:
        self._stop.set()
