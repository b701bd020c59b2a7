"""The router: owns each request's committed tokens and drives its rounds over gRPC.

One round of one request: Draft.Propose (the tokens committed since the last call to that draft replica,
and the last round's accepted graph path) -> a token graph; Target.Verify -> the accepted path and the
emitted tokens. The Verify items of concurrent requests that go to the same target replica are batched
into one call: while a Verify is in flight, the next items queue and leave together.

Replicas are found through a `discover()` coroutine (in Ray: the registry actor the replicas heartbeat
to). A replica that fails a call is marked dead for a while; the request moves to another replica, which
rebuilds the session from the committed tokens (STATUS_RESYNC -> resend from 0). Without any draft
replica a round verifies the root alone (plain decoding, still exact) until a draft is back.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import grpc

from . import rpc
from .config import SpecConfig
from .governor import SpeculationGovernor
from .sampling import SamplingParams

log = logging.getLogger(__name__)
pb = rpc.pb


# ---------------------------------------------------------------- errors

class RouterError(Exception):
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    type = "internal_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(RouterError):
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    type = "invalid_request_error"


class Overloaded(RouterError):
    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    type = "rate_limit_error"


class DeadlineExceeded(RouterError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    type = "timeout"


class Unavailable(RouterError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    type = "service_unavailable"


# ---------------------------------------------------------------- config

@dataclass
class RouterConfig:
    model_name: str = "gsd-smollm2-135m"
    target: str = "smollm2-135m-instruct"     # for the tokenizer and generation config
    spec: SpecConfig = field(default_factory=SpecConfig)
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_prompt_tokens: int = 4096
    max_model_len: int = 8192
    max_inflight: int = 64                     # admission control: more concurrent requests get 429
    max_batch: int = 32                        # Verify items per call
    batch_wait_s: float = 0.002                # how long a lone Verify item waits for company
    rpc_timeout_s: float = 120.0
    request_timeout_s: float = 600.0           # whole-request deadline; every downstream call gets what is left
    affinity_block: int = 32                   # prompt tokens hashed for prefix-affinity routing
    refresh_s: float = 5.0
    dead_s: float = 10.0
    failover_timeout_s: float = 120.0          # how long a round waits for a target replica (restarts included)

    @classmethod
    def from_dict(cls, d: dict | None) -> "RouterConfig":
        d = dict(d or {})
        spec = d.pop("spec", None)
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown router config field(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        cfg = cls(**d)
        for name, f in cls.__dataclass_fields__.items():
            value = getattr(cfg, name)
            if f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"router config {name} must be a number, got {value!r}")
            if f.type in ("int", "float") and value < 0:
                raise ValueError(f"router config {name} must be >= 0, got {value}")
        for name in ("max_batch", "max_inflight", "rpc_timeout_s", "request_timeout_s"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"router config {name} must be > 0, got {getattr(cfg, name)}")
        if isinstance(spec, dict):
            method = spec.get("method", "gsd")
            cfg.spec = SpecConfig.for_method(method, **{k: v for k, v in spec.items() if k != "method"})
        elif isinstance(spec, SpecConfig):
            cfg.spec = spec
        return cfg


# ---------------------------------------------------------------- metrics

class Metrics:
    """Prometheus metrics, named after vLLM's spec-decode metrics (gsd_ prefix)."""

    def __init__(self, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        m = ["model_name"]
        self.model_name = model_name
        lat = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
        self._c = {
            "drafts": Counter("gsd_num_drafts", "Speculation rounds with a draft", m, registry=r),
            "draft_tokens": Counter("gsd_num_draft_tokens", "Draft tokens verified by the target", m, registry=r),
            "accepted": Counter("gsd_num_accepted_tokens", "Draft tokens accepted", m, registry=r),
            "per_pos": Counter("gsd_num_accepted_tokens_per_pos", "Draft tokens accepted per position",
                               m + ["position"], registry=r),
            "prompt_tokens": Counter("gsd_prompt_tokens", "Prompt tokens", m, registry=r),
            "generation_tokens": Counter("gsd_generation_tokens", "Generated tokens", m, registry=r),
            "success": Counter("gsd_request_success", "Finished requests", m + ["finished_reason"], registry=r),
            "rejected": Counter("gsd_request_rejected", "Refused requests", m + ["reason"], registry=r),
            "cancelled": Counter("gsd_request_cancelled", "Requests cancelled (client gone) or failed", m + ["reason"],
                                 registry=r),
            "failovers": Counter("gsd_replica_failovers", "Calls that failed over to another replica",
                                 m + ["kind"], registry=r),
            "resyncs": Counter("gsd_session_resyncs", "Sessions rebuilt on a replica", m + ["kind"], registry=r),
            "pc_queries": Counter("gsd_prefix_cache_queries", "Prefills that asked the prefix cache", m, registry=r),
            "pc_hits": Counter("gsd_prefix_cache_hits", "Prefills that restored cached blocks", m, registry=r),
            "pc_saved": Counter("gsd_prefix_cache_tokens_saved", "Prompt tokens not prefilled", m, registry=r),
        }
        self.running = Gauge("gsd_num_requests_running", "Requests in flight", m, registry=r)
        self.latency = Histogram("gsd_e2e_request_latency_seconds", "Request latency", m, buckets=lat, registry=r)
        self.ttft = Histogram("gsd_time_to_first_token_seconds", "Time to first token", m, buckets=lat, registry=r)
        self.batch = Histogram("gsd_verify_batch_size", "Sessions per Verify call", m,
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.draft_s = Histogram("gsd_draft_seconds", "Propose call latency", m, buckets=lat, registry=r)
        self.verify_s = Histogram("gsd_verify_seconds", "Verify call latency", m, buckets=lat, registry=r)

    def inc(self, name: str, n: float = 1, **labels) -> None:
        if n:
            self._c[name].labels(model_name=self.model_name, **labels).inc(n)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---------------------------------------------------------------- replicas

class Endpoint:
    def __init__(self, kind: str, replica_id: str, address: str, router: "RouterCore"):
        self.kind = kind
        self.replica_id = replica_id
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=rpc.CHANNEL_OPTIONS)
        self.stub = (rpc.pb_grpc.DraftStub if kind == "draft" else rpc.pb_grpc.TargetStub)(self.channel)
        self.dead_until = 0.0
        self.batcher = VerifyBatcher(self, router) if kind == "target" else None

    @property
    def alive(self) -> bool:
        return time.monotonic() >= self.dead_until


class VerifyBatcher:
    """Queues Verify items for one target replica; one call in flight, the queue leaves as one batch."""

    def __init__(self, ep: Endpoint, router: "RouterCore"):
        self.ep = ep
        self.router = router
        self.queue: list[tuple[pb.VerifyItem, asyncio.Future, float]] = []
        self.task: asyncio.Task | None = None

    async def submit(self, item: "pb.VerifyItem", deadline: float) -> "pb.VerifyResult":
        """Verify `item` in the next batch; `deadline` (time.monotonic()) is its request's deadline."""
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((item, fut, deadline))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        cfg = self.router.config
        while self.queue:
            if cfg.batch_wait_s > 0:
                await asyncio.sleep(cfg.batch_wait_s)
            now = time.monotonic()
            batch = []
            for i, f, deadline in self.queue[: cfg.max_batch]:
                if f.done():
                    continue
                if deadline <= now:
                    f.set_exception(DeadlineExceeded("the request's deadline passed before it finished"))
                    continue
                batch.append((i, f, deadline))
            del self.queue[: cfg.max_batch]
            if not batch:
                continue
            # the call lives as long as its longest-lived item needs; shorter ones time out on their own
            timeout = min(cfg.rpc_timeout_s, max(d for _, _, d in batch) - now)
            batch = [(i, f) for i, f, _ in batch]
            t0 = time.perf_counter()
            try:
                resp = await self.ep.stub.Verify(pb.VerifyRequest(items=[i for i, _ in batch]), timeout=timeout)
            except Exception as exc:  # noqa: BLE001 (delivered to every waiting request)
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            m = self.router.metrics
            m.batch.labels(model_name=m.model_name).observe(len(batch))
            m.verify_s.labels(model_name=m.model_name).observe(time.perf_counter() - t0)
            self.router.batch_sizes.append(len(batch))
            by_id = {r.session_id: r for r in resp.results}
            for item, f in batch:
                if not f.done():
                    f.set_result(by_id.get(item.session_id))


def _rendezvous(key: bytes, eps: list[Endpoint]) -> list[Endpoint]:
    """Endpoints ordered by highest-random-weight hashing of `key`: the same prefix goes to the same replica."""
    return sorted(eps, key=lambda e: hashlib.blake2b(key + e.replica_id.encode(), digest_size=8).digest(),
                  reverse=True)


# ---------------------------------------------------------------- requests

@dataclass
class GenerateParams:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    request_id: str = ""
    timeout_s: float | None = None     # the client's deadline (capped by RouterConfig.request_timeout_s)


@dataclass
class RunStats:
    rounds: int = 0
    drafted_rounds: int = 0
    plain_steps: int = 0         # adaptive speculation decoded plainly
    accepted_tokens: int = 0
    verified_tokens: int = 0
    draft_tokens: int = 0
    cached_prompt_tokens: int = 0
    resyncs: int = 0
    failovers: int = 0
    seconds: float = 0.0
    ttft: float = 0.0
    target_forwards: int = 0
    accept_lengths: dict = field(default_factory=dict)

    def mean_accept_len(self, new_tokens: int) -> float:
        return new_tokens / self.target_forwards if self.target_forwards else 0.0

    def to_dict(self, new_tokens: int) -> dict:
        return {"rounds": self.rounds, "drafted_rounds": self.drafted_rounds, "plain_steps": self.plain_steps,
                "accepted_tokens": self.accepted_tokens,
                "verified_tokens": self.verified_tokens, "draft_tokens": self.draft_tokens,
                "mean_accept_len": round(self.mean_accept_len(new_tokens), 4),
                "cached_prompt_tokens": self.cached_prompt_tokens, "resyncs": self.resyncs,
                "failovers": self.failovers, "seconds": round(self.seconds, 4), "ttft": round(self.ttft, 4),
                "accept_lengths": {str(k): v for k, v in sorted(self.accept_lengths.items())}}

    def to_proto(self, new_tokens: int) -> "pb.GenerateStats":
        return pb.GenerateStats(rounds=self.rounds, accepted_tokens=self.accepted_tokens,
                                verified_tokens=self.verified_tokens, draft_tokens=self.draft_tokens,
                                mean_accept_len=self.mean_accept_len(new_tokens),
                                cached_prompt_tokens=self.cached_prompt_tokens, resyncs=self.resyncs,
                                seconds=self.seconds)


class Run:
    """One request: its committed tokens, the replicas holding its sessions, and how far each is synced."""

    def __init__(self, core: "RouterCore", params: GenerateParams):
        self.core = core
        self.params = params
        self.id = params.request_id or uuid.uuid4().hex
        self.prompt = list(params.prompt_ids)
        self.committed = list(params.prompt_ids)
        self.out: list[int] = []
        self.finish: str | None = None
        self.stats = RunStats()
        self.key = bytes(str(self.prompt[: core.config.affinity_block]), "ascii")
        self.draft: Endpoint | None = None
        self.target: Endpoint | None = None
        self.d_synced = 0
        self.t_synced = 0
        self.last_path: list[int] = []
        sp = params.sampling
        self.sampling_pb = rpc.sampling_to_proto(sp)
        self.spec_pb = rpc.spec_to_proto(core.config.spec)
        budget = core.config.request_timeout_s
        if params.timeout_s is not None and params.timeout_s > 0:
            budget = min(budget, params.timeout_s)
        self.deadline = time.monotonic() + budget

    def rpc_timeout(self) -> float:
        """The timeout of the next downstream call: the per-call cap or what is left of the request's deadline."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed before it finished")
        return min(self.core.config.rpc_timeout_s, left)

    def _emit(self, tokens: list[int]) -> list[int]:
        tokens = tokens[: self.params.max_tokens - len(self.out)]
        for i, t in enumerate(tokens):
            if t in self.core.stop_ids:
                tokens = tokens[: i + 1]
                self.finish = "stop"
                break
        self.out.extend(tokens)
        self.committed.extend(tokens)
        if self.finish is None and len(self.out) >= self.params.max_tokens:
            self.finish = "length"
        return tokens

    async def chunks(self) -> AsyncIterator[list[int]]:
        core = self.core
        m = core.metrics
        start = time.perf_counter()
        try:
            first, cached = await core.prefill(self)
            self.stats.target_forwards += 1
            self.stats.cached_prompt_tokens = cached
            self.stats.ttft = time.perf_counter() - start
            m.ttft.labels(model_name=m.model_name).observe(self.stats.ttft)
            yield self._emit([first])
            spec = core.config.spec
            governor = core.new_governor() if spec.adaptive and spec.method != "ar" else None
            while self.finish is None:
                depth = self.params.max_tokens - len(self.out) - 1
                graph = None
                t0 = time.perf_counter()
                if spec.method != "ar" and depth > 0 and (governor is None or governor.speculate()):
                    resp = await core.propose(self, depth)
                    if resp is not None:
                        graph = resp.graph
                        self.stats.drafted_rounds += 1
                        m.inc("drafts")
                if graph is None:
                    graph = rpc.root_graph_proto(self.committed[-1])
                res = await core.verify(self, graph)
                self.last_path = list(res.graph_path)
                n = len(res.emitted)
                if governor is not None:
                    if len(graph.tokens) > 1:
                        governor.record_round(n, time.perf_counter() - t0)
                    else:   # a plain step (or a round the draft could not serve)
                        governor.record_step(time.perf_counter() - t0)
                        core.step_seconds = governor.step_seconds
                        self.stats.plain_steps += 1
                self.stats.rounds += 1
                self.stats.target_forwards += 1
                self.stats.accepted_tokens += n - 1
                self.stats.verified_tokens += res.verified_tokens
                self.stats.draft_tokens += max(res.verified_tokens - 1, 0)
                self.stats.cached_prompt_tokens += res.cached_tokens
                self.stats.accept_lengths[n] = self.stats.accept_lengths.get(n, 0) + 1
                m.inc("draft_tokens", max(res.verified_tokens - 1, 0))
                m.inc("accepted", n - 1)
                for pos in range(n - 1):
                    m.inc("per_pos", position=str(pos))
                chunk = self._emit(list(res.emitted))
                if chunk:
                    yield chunk
            self.stats.seconds = time.perf_counter() - start
            m.latency.labels(model_name=m.model_name).observe(self.stats.seconds)
            m.inc("success", finished_reason=self.finish)
            m.inc("generation_tokens", len(self.out))
        except (asyncio.CancelledError, GeneratorExit):
            m.inc("cancelled", reason="client")
            raise
        except Exception:
            m.inc("cancelled", reason="error")
            raise
        finally:
            core.finished(self)


class RouterCore:
    def __init__(self, config: RouterConfig, discover: Callable[[], Awaitable[list[tuple[str, str, str]]]],
                 tokenizer=None, stop_ids: set[int] | None = None):
        """discover() returns [(kind, replica_id, address)] of the live draft and target replicas."""
        self.config = config
        self.discover = discover
        if tokenizer is None:
            from .models import load_tokenizer

            tokenizer = load_tokenizer(config.target)
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids if stop_ids is not None else self._stop_ids()
        self.vocab_size = len(tokenizer)
        self.metrics = Metrics(config.model_name)
        self.endpoints: dict[str, Endpoint] = {}
        self.inflight = 0
        self.step_seconds: float | None = None   # latest plain round time, seeds adaptive sequences
        self.batch_sizes: list[int] = []
        self._refreshed = 0.0
        self._refresh_lock: asyncio.Lock | None = None

    def new_governor(self) -> SpeculationGovernor:
        return SpeculationGovernor(step_seconds=self.step_seconds)

    def _stop_ids(self) -> set[int]:
        from .prompts import stop_token_ids

        model = None
        try:
            from types import SimpleNamespace

            from transformers import GenerationConfig

            from .models import resolve

            model = SimpleNamespace(generation_config=GenerationConfig.from_pretrained(resolve(self.config.target)))
        except Exception:  # noqa: BLE001 (no generation config: the tokenizer's EOS only)
            pass
        return stop_token_ids(self.tokenizer, model)

    # replicas -----------------------------------------------------------------
    async def refresh(self, force: bool = False) -> None:
        if self._refresh_lock is None:
            self._refresh_lock = asyncio.Lock()
        async with self._refresh_lock:
            if not force and time.monotonic() - self._refreshed < self.config.refresh_s:
                return
            if force and time.monotonic() - self._refreshed < 0.2:
                return
            try:
                found = await self.discover()
            except Exception as exc:  # noqa: BLE001 (keep the replicas we know)
                log.warning("router: replica discovery failed: %s", exc)
                return
            self._refreshed = time.monotonic()
            seen = set()
            for kind, rid, address in found:
                key = f"{kind}|{rid}|{address}"
                seen.add(key)
                if key not in self.endpoints:
                    self.endpoints[key] = Endpoint(kind, rid, address, self)
            for key in [k for k in self.endpoints if k not in seen]:
                ep = self.endpoints.pop(key)
                asyncio.create_task(ep.channel.close(grace=30))

    def live(self, kind: str) -> list[Endpoint]:
        return [e for e in self.endpoints.values() if e.kind == kind and e.alive]

    async def pick(self, kind: str, key: bytes) -> Endpoint | None:
        await self.refresh()
        eps = self.live(kind)
        if not eps:
            await self.refresh(force=True)
            eps = self.live(kind)
        return _rendezvous(key, eps)[0] if eps else None

    def mark_dead(self, ep: Endpoint, exc: Exception) -> None:
        log.warning("router: %s replica %s at %s failed (%s); failing over", ep.kind, ep.replica_id, ep.address,
                    getattr(exc, "code", lambda: exc)())
        ep.dead_until = time.monotonic() + self.config.dead_s
        self.metrics.inc("failovers", kind=ep.kind)

    @staticmethod
    def _client_bug(exc: Exception) -> bool:
        return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.INVALID_ARGUMENT

    # one request ----------------------------------------------------------------
    def validate(self, params: GenerateParams) -> None:
        cfg = self.config
        if not params.prompt_ids:
            raise BadRequest("the prompt is empty", "prompt")
        if any((not isinstance(t, int)) or t < 0 or t >= self.vocab_size for t in params.prompt_ids):
            raise BadRequest(f"prompt token ids must be integers in [0, {self.vocab_size})", "prompt")
        if params.max_tokens < 1 or params.max_tokens > cfg.max_tokens_limit:
            raise BadRequest(f"max_tokens must be in [1, {cfg.max_tokens_limit}], got {params.max_tokens}",
                             "max_tokens")
        if len(params.prompt_ids) > cfg.max_prompt_tokens:
            raise BadRequest(f"the prompt has {len(params.prompt_ids)} tokens; at most {cfg.max_prompt_tokens} are "
                             "accepted", "prompt", "context_length_exceeded")
        if len(params.prompt_ids) + params.max_tokens > cfg.max_model_len:
            raise BadRequest(f"prompt ({len(params.prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"the model's {cfg.max_model_len}", "max_tokens", "context_length_exceeded")

    def start(self, params: GenerateParams) -> Run:
        """Admit a request (or raise Overloaded / BadRequest); iterate `run.chunks()` to generate."""
        self.validate(params)
        if self.inflight >= self.config.max_inflight:
            self.metrics.inc("rejected", reason="overloaded")
            raise Overloaded(f"the router is at its limit of {self.config.max_inflight} concurrent requests; "
                             "retry later")
        if not params.sampling.greedy and params.sampling.seed is None:
            params.sampling = SamplingParams(params.sampling.temperature, params.sampling.top_k,
                                             params.sampling.top_p, random.getrandbits(62))
        self.inflight += 1
        self.metrics.running.labels(model_name=self.metrics.model_name).inc()
        self.metrics.inc("prompt_tokens", len(params.prompt_ids))
        return Run(self, params)

    def finished(self, run: Run) -> None:
        self.inflight -= 1
        self.metrics.running.labels(model_name=self.metrics.model_name).dec()
        for ep in (run.draft, run.target):
            if ep is not None:
                asyncio.ensure_future(self._release(ep, run.id))

    async def _release(self, ep: Endpoint, sid: str) -> None:
        try:
            await ep.stub.Release(pb.ReleaseRequest(session_ids=[sid]), timeout=5)
        except Exception:  # noqa: BLE001 (the lease's TTL frees it anyway)
            pass

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(min(0.25 * 2 ** attempt, 3.0))

    def _attempts(self, run: Run):
        """Attempt numbers until failover_timeout_s has passed (at least two attempts), within the run's deadline."""
        deadline = time.monotonic() + self.config.failover_timeout_s
        attempt = 0
        while attempt < 2 or time.monotonic() < deadline:
            run.rpc_timeout()   # raises DeadlineExceeded once the request is out of time
            yield attempt
            attempt += 1

    async def prefill(self, run: Run) -> tuple[int, int]:
        last: Exception | None = None
        for attempt in self._attempts(run):
            ep = await self.pick("target", run.key)
            if ep is None:
                await self._backoff(attempt)
                continue
            run.target = ep     # set before the call, so the session is released even if the call times out
            try:
                resp = await ep.stub.Prefill(pb.PrefillRequest(session_id=run.id, tokens=run.prompt,
                                                               sampling=run.sampling_pb),
                                             timeout=run.rpc_timeout())
            except grpc.aio.AioRpcError as exc:
                run.rpc_timeout()   # a call cut short by the request's own deadline is not the replica's fault
                if self._client_bug(exc):
                    raise BadRequest(exc.details()) from None
                last = exc
                self.mark_dead(ep, exc)
                run.stats.failovers += 1
                await self._backoff(attempt)
                continue
            run.target = ep
            run.committed = run.prompt + []     # the first token is committed by _emit
            run.t_synced = len(run.prompt)      # the target holds prompt + first; the next delta resends first
            m = self.metrics
            m.inc("pc_queries")
            if resp.cached_tokens:
                m.inc("pc_hits")
                m.inc("pc_saved", resp.cached_tokens)
            return int(resp.first_token), int(resp.cached_tokens)
        raise Unavailable(f"no target replica could prefill the prompt ({last})")

    async def propose(self, run: Run, depth: int):
        """The round's draft graph, or None when no draft replica is available (the round then verifies the root)."""
        for attempt in range(3):
            ep = run.draft if (run.draft is not None and run.draft.alive) else await self.pick("draft", run.key)
            if ep is None:
                return None
            if ep is not run.draft:
                run.draft, run.d_synced = ep, 0
            req = pb.ProposeRequest(session_id=run.id, delta_start=run.d_synced,
                                    delta=run.committed[run.d_synced:],
                                    last_path=run.last_path if run.d_synced else [],
                                    root_index=len(run.committed) - 1, spec=run.spec_pb, sampling=run.sampling_pb,
                                    max_depth=depth)
            t0 = time.perf_counter()
            try:
                resp = await ep.stub.Propose(req, timeout=run.rpc_timeout())
            except grpc.aio.AioRpcError as exc:
                run.rpc_timeout()   # a call cut short by the request's own deadline is not the replica's fault
                if self._client_bug(exc):
                    raise RouterError(f"draft replica refused a round: {exc.details()}") from None
                self.mark_dead(ep, exc)
                run.stats.failovers += 1
                run.draft, run.d_synced = None, 0
                continue
            if resp.status == rpc.RESYNC:
                run.d_synced = 0
                run.stats.resyncs += 1
                self.metrics.inc("resyncs", kind="draft")
                continue
            m = self.metrics
            m.draft_s.labels(model_name=m.model_name).observe(time.perf_counter() - t0)
            run.d_synced = len(run.committed)
            return resp
        return None

    async def verify(self, run: Run, graph: "pb.TokenGraph") -> "pb.VerifyResult":
        last: Exception | None = None
        for attempt in self._attempts(run):
            ep = run.target if (run.target is not None and run.target.alive) else await self.pick("target", run.key)
            if ep is None:
                await self._backoff(attempt)
                continue
            if ep is not run.target:
                run.target, run.t_synced = ep, 0
            item = pb.VerifyItem(session_id=run.id, delta_start=run.t_synced, delta=run.committed[run.t_synced:],
                                 graph=graph, root_index=len(run.committed) - 1, budget=self.config.spec.budget,
                                 sampling=run.sampling_pb)
            try:
                res = await ep.batcher.submit(item, run.deadline)
            except grpc.aio.AioRpcError as exc:
                run.rpc_timeout()   # a call cut short by the request's own deadline is not the replica's fault
                if self._client_bug(exc):
                    raise RouterError(f"target replica refused a round: {exc.details()}") from None
                last = exc
                self.mark_dead(ep, exc)
                run.stats.failovers += 1
                run.target, run.t_synced = None, 0
                await self._backoff(attempt)
                continue
            if res is None:
                raise RouterError("target replica returned no result for the session")
            if res.status == rpc.RESYNC:
                run.t_synced = 0
                run.stats.resyncs += 1
                self.metrics.inc("resyncs", kind="target")
                continue
            run.t_synced = len(run.committed)
            return res
        raise Unavailable(f"no target replica could verify the round ({last})")

    async def close(self) -> None:
        for ep in self.endpoints.values():
            await ep.channel.close()
        self.endpoints.clear()


# ---------------------------------------------------------------- detokenization

class Detokenizer:
    """Incremental text of a growing token list; holds back an incomplete UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, ids: list[int], final: bool = False) -> str:
        self.ids.extend(ids)
        text = self.text()
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta
