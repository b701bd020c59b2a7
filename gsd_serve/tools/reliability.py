"""Reliability runs against a live gsd-serve application: steady streaming load, faults (chaos) and soak.

The pieces, each usable alone (the tests use them on the session's Ray cluster and redis-server; the
`gsd-serve chaos` and `gsd-serve soak` commands start their own on loopback with local_stack.LocalStack, and
look into the application with local_stack.AppProbe):

    Case, make_cases      chat prompts sharing a long system prompt (prefix-cache hits) with the
                          in-process engine's greedy output for each: what every served answer must equal
    LoadGenerator         N client threads, each streaming one chat completion after another over HTTP
                          (SSE) until stopped; every outcome is recorded (error, text == reference, stalls)
    run_chaos             kills a draft replica, kills a target replica, restarts Redis, in turn, until the
                          time is up; measures each recovery; all under load
    run_soak              load for a while; resident memory of every process sampled, sessions and
                          in-flight counts checked back at 0 afterwards

Everything is bounded in time and talks to loopback addresses only.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

from ..models.hardware import cpu_description
from .local_stack import AppProbe, LocalStack

log = logging.getLogger(__name__)

SYSTEM = ("You are a careful assistant for a small bookshop. Answer briefly, politely and in plain English. "
          "The shop opens at nine and closes at six, sells new and used books, runs a reading club on "
          "Thursdays and offers gift wrapping. Never invent prices.")
QUESTIONS = ["When do you open?", "Do you wrap gifts?", "Is there a reading club?", "Do you sell used books?",
             "What time do you close?", "Can I order a book?", "Write a haiku about books.",
             "Name three classic novels.", "What is a good book for a child?", "Describe the shop in one sentence.",
             "Do you buy old books?", "Recommend a mystery novel.", "What should I read on holiday?",
             "Tell me a fun fact about libraries.", "How do I join the club?", "Say thank you in French."]


# ---------------------------------------------------------------- prompts and their reference answers

@dataclass
class Case:
    messages: list[dict]
    ids: list[int]
    text: str               # the in-process engine's greedy answer
    finish: str


def make_cases(engine, tokenizer, spec, n: int, max_tokens: int) -> list[Case]:
    """n chat prompts (a shared system prompt, different questions) and the engine's greedy answers."""
    from ..core.prompts import encode

    cases = []
    for q in (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
        ids = encode(tokenizer, {"messages": messages})
        r = engine.generate(ids, max_tokens, spec=spec)
        cases.append(Case(messages, ids, tokenizer.decode(r.token_ids, skip_special_tokens=True), r.finish_reason))
    return cases


# ---------------------------------------------------------------- load

@dataclass
class Outcome:
    case: int
    ok: bool                # an answer came back, without error
    exact: bool             # ... and it equals the reference
    error: str | None
    started: float          # time.monotonic()
    ended: float
    max_gap_s: float        # the longest wait between two events of the stream (a stall)


class LoadGenerator:
    """`streams` client threads, each streaming chat completions one after another until stopped."""

    def __init__(self, base_url: str, model: str, cases: list[Case], max_tokens: int, streams: int,
                 api_key: str | None = None, request_timeout_s: float = 600.0):
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.model, self.cases, self.max_tokens, self.streams = model, cases, max_tokens, streams
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.request_timeout_s = request_timeout_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._next = 0

    def start(self) -> "LoadGenerator":
        for i in range(self.streams):
            t = threading.Thread(target=self._loop, name=f"gsd-load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout_s: float = 900.0) -> list[Outcome]:
        """Stop sending; the requests in flight finish (bounded by their own timeout)."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return self.outcomes

    def _take(self) -> int:
        with self._lock:
            i = self._next
            self._next += 1
            return i % len(self.cases)

    def _loop(self) -> None:
        import httpx

        with httpx.Client(timeout=httpx.Timeout(self.request_timeout_s, connect=30)) as client:
            while not self._stop.is_set():
                outcome = self._one(client, self._take())
                with self._lock:
                    self.outcomes.append(outcome)

    def _one(self, client, i: int) -> Outcome:
        case = self.cases[i]
        body = {"model": self.model, "messages": case.messages, "max_tokens": self.max_tokens, "temperature": 0,
                "stream": True}
        started = last = time.monotonic()
        max_gap, text, finish, error = 0.0, [], None, None
        try:
            with client.stream("POST", self.url, json=body, headers=self.headers) as r:
                if r.status_code != 200:
                    r.read()
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                for line in r.iter_lines():
                    now = time.monotonic()
                    max_gap, last = max(max_gap, now - last), now
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(f"stream error: {event['error'].get('message')}")
                    for choice in event.get("choices") or []:
                        text.append((choice.get("delta") or {}).get("content") or "")
                        finish = choice.get("finish_reason") or finish
        except Exception as exc:  # noqa: BLE001 (every failure is an outcome)
            error = f"{type(exc).__name__}: {exc}"
        ended = time.monotonic()
        ok = error is None and finish is not None
        if error is None and finish is None:
            error = "the stream ended without a finish_reason"
        exact = ok and "".join(text) == case.text and finish == case.finish
        return Outcome(i, ok, exact, error, started, ended, max_gap)


def summarize(outcomes: list[Outcome]) -> dict:
    done = [o for o in outcomes if o.ok]
    return {"requests": len(outcomes), "completed": len(done), "failed": len(outcomes) - len(done),
            "mismatches": sum(1 for o in done if not o.exact),
            "errors": sorted({o.error for o in outcomes if o.error})[:10],
            "max_stall_s": round(max((o.max_gap_s for o in outcomes), default=0.0), 2),
            "mean_latency_s": round(statistics.fmean([o.ended - o.started for o in done]), 2) if done else None}


# ---------------------------------------------------------------- chaos

@dataclass
class ChaosConfig:
    duration_s: float = 180.0           # faults are injected until then; the load stops after the last recovery
    cycles: int = 1                     # ... and at least this many rounds of every fault kind
    faults: tuple = ("draft", "target", "redis")
    settle_s: float = 5.0               # pause after each recovery before the next fault
    recovery_timeout_s: float = 300.0
    redis_down_s: float = 2.0
    drafts: int = 2
    targets: int = 2


@dataclass
class Fault:
    kind: str
    at_s: float                         # since the run started
    victim: str
    recovery_s: float | None            # replica replaced and answering / Redis serving hits again
    error: str | None = None


def run_chaos(cfg: ChaosConfig, load: LoadGenerator, probe: AppProbe, redis=None) -> dict:
    """Faults in turn under load until cfg.duration_s; then the load stops and the application must be
    idle again. `redis` has stop() and start() (None: Redis faults are skipped)."""
    faults: list[Fault] = []
    t0 = time.monotonic()
    load.start()
    try:
        time.sleep(cfg.settle_s)
        i = 0
        while time.monotonic() - t0 < cfg.duration_s or i < cfg.cycles * len(cfg.faults):
            kind = cfg.faults[i % len(cfg.faults)]
            i += 1
            if kind == "redis" and redis is None:
                continue
            faults.append(_inject(kind, cfg, probe, redis, time.monotonic() - t0))
            log.info("chaos: %s", faults[-1])
            time.sleep(cfg.settle_s)
    finally:
        outcomes = load.stop()
    idle = probe.wait_idle()
    report = summarize(outcomes)
    rec = [f.recovery_s for f in faults if f.recovery_s is not None]
    report.update({
        "duration_s": round(time.monotonic() - t0, 1),
        "streams": load.streams,
        "faults": len(faults),
        "faults_by_kind": {k: sum(f.kind == k for f in faults) for k in cfg.faults},
        "fault_errors": [f.error for f in faults if f.error],
        "recovery_s": {k: [round(f.recovery_s, 1) for f in faults if f.kind == k and f.recovery_s is not None]
                       for k in cfg.faults},
        "max_recovery_s": round(max(rec), 1) if rec else None,
        "after": idle,
        "fault_log": [asdict(f) for f in faults],
    })
    report["passed"] = (report["failed"] == 0 and report["mismatches"] == 0 and not report["fault_errors"]
                        and idle["sessions_held"] == 0 and idle["inflight"] == 0 and report["completed"] > 0)
    return report


def _inject(kind: str, cfg: ChaosConfig, probe: AppProbe, redis, at_s: float) -> Fault:
    try:
        if kind == "redis":
            hits = probe.prefix_hits()
            redis.stop()
            time.sleep(cfg.redis_down_s)
            redis.start()
            return Fault(kind, at_s, "redis", _wait_hits(probe, hits, cfg.recovery_timeout_s))
        victim = probe.kill(kind)
        n = cfg.drafts if kind == "draft" else cfg.targets
        recovery = probe.wait_replicas(kind, n, victim["replica_id"], cfg.recovery_timeout_s)
        return Fault(kind, at_s, victim["replica_id"], recovery)
    except Exception as exc:  # noqa: BLE001 (a fault the service did not recover from fails the run)
        return Fault(kind, at_s, "", None, f"{type(exc).__name__}: {exc}")


def _wait_hits(probe: AppProbe, before: dict[str, int], timeout_s: float) -> float:
    """Seconds until some target restores a prefix from the restarted Redis."""
    t0 = time.monotonic()
    while True:
        if any(h > before.get(rid, 0) for rid, h in probe.prefix_hits().items()):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"no prefix-cache hit within {timeout_s:.0f}s of Redis restarting")
        time.sleep(0.25)


# ---------------------------------------------------------------- soak

@dataclass
class SoakConfig:
    duration_s: float = 600.0
    warmup_s: float = 60.0              # memory is compared from here on
    sample_every_s: float = 5.0
    max_drift: float = 0.10             # resident memory may grow at most this much after warm-up


@dataclass
class MemorySeries:
    pid: int
    samples: list = field(default_factory=list)     # (seconds since start, resident bytes)


def run_soak(cfg: SoakConfig, load: LoadGenerator, probe: AppProbe) -> dict:
    series: dict[str, MemorySeries] = {}
    structures = []
    t0 = time.monotonic()
    load.start()
    try:
        while (t := time.monotonic() - t0) < cfg.duration_s:
            for name, (pid, rss) in probe.memory().items():
                s = series.setdefault(name, MemorySeries(pid))
                if s.pid == pid:            # a replaced process would be another series
                    s.samples.append((round(t, 1), rss))
            stats = probe.router_stats()
            structures.append({"t": round(t, 1), "endpoints": stats["endpoints"], "runs": stats["runs"]})
            time.sleep(max(0.0, cfg.sample_every_s - (time.monotonic() - t0 - t)))
    finally:
        outcomes = load.stop()
    idle = probe.wait_idle()
    report = summarize(outcomes)
    drift = {}
    for name, s in series.items():
        warm = [rss for t, rss in s.samples if t >= cfg.warmup_s]
        if len(warm) >= 2 and warm[0] > 0:
            drift[name] = {"after_warmup_mb": round(warm[0] / 2**20, 1), "end_mb": round(warm[-1] / 2**20, 1),
                           "max_mb": round(max(warm) / 2**20, 1), "drift": round(max(warm) / warm[0] - 1, 4)}
    report.update({
        "duration_s": round(time.monotonic() - t0, 1), "streams": load.streams, "memory": drift,
        "max_drift": max((d["drift"] for d in drift.values()), default=None),
        "after": idle,
        # the router's endpoint table must track the replicas, not the calls
        "endpoints": [structures[0]["endpoints"], structures[-1]["endpoints"]] if structures else None,
        # the router's table of requests in flight holds what is in flight, never what has finished
        "max_runs": max((x["runs"] for x in structures), default=None),
    })
    report["passed"] = (report["failed"] == 0 and report["mismatches"] == 0 and report["completed"] > 0
                        and report["max_drift"] is not None and report["max_drift"] <= cfg.max_drift
                        and len(drift) == len(series)
                        and idle == {"sessions_held": 0, "inflight": 0, "runs": 0}
                        and structures[-1]["endpoints"] <= structures[0]["endpoints"])
    return report


# ---------------------------------------------------------------- the long runs (gsd-serve chaos / soak)

def local_run(kind: str, duration_s: float, streams: int, max_tokens: int = 32, n_cases: int = 16,
              drafts: int = 2, targets: int = 2, settle_s: float = 10.0, warmup_s: float | None = None) -> dict:
    """`kind` = "chaos" or "soak" on a LocalStack (its own Ray cluster, Serve on free loopback ports and a
    redis-server), with an API key; every answer is compared with the in-process fp32 engine's."""
    import secrets
    import tempfile

    from ..core.config import SpecConfig
    from ..models import load_engine

    spec = SpecConfig.for_method("gsd")
    engine, tokenizer = load_engine(dtype="float32")
    t0 = time.monotonic()
    cases = make_cases(engine, tokenizer, spec, n_cases, max_tokens)
    log.info("references: %d cases in %.0fs", len(cases), time.monotonic() - t0)
    del engine
    key = secrets.token_urlsafe(16)
    args = {"model_name": "gsd-reliability", "spec": spec.to_dict(), "dtype": "float32", "api_key": key,
            "max_sessions": 64, "prefix_block_size": 16,
            "router": {"max_inflight": max(64, 2 * streams), "default_max_tokens": max_tokens}}
    with tempfile.TemporaryDirectory(prefix="gsd-redis-") as workdir:
        stack = LocalStack(args, drafts, targets, workdir)
        try:
            load = LoadGenerator(stack.base_url, args["model_name"], cases, max_tokens, streams, api_key=key)
            if kind == "chaos":
                report = run_chaos(ChaosConfig(duration_s=duration_s, settle_s=settle_s, drafts=drafts,
                                               targets=targets), load, stack.probe, stack.redis)
            else:
                warm = warmup_s if warmup_s is not None else min(120.0, duration_s / 4)
                report = run_soak(SoakConfig(duration_s=duration_s, warmup_s=warm), load, stack.probe)
        finally:
            stack.close()
    report.update({"kind": kind, "cpu": cpu_description(), "cores": os.cpu_count(), "drafts": drafts, "targets": targets,
                   "max_tokens": max_tokens, "cases": len(cases), "spec": spec.to_dict()})
    return report
