"""The router: owns each request's committed tokens and drives its decode loop over gRPC.

Each request runs the shared decode loop (gsd_serve.core.decode); the router answers its requests with
calls to replicas: Propose -> Draft.Propose (the tokens committed since the last call to that draft
replica, and the last round's accepted graph path); Verify and Step -> Target.Verify (a plain step is the
root alone). The Verify items of concurrent requests that go to the same target replica are batched into
one call: while a Verify is in flight, the next items queue and leave together.

Replicas are found through a `discover()` coroutine (in Ray: the registry actor the replicas heartbeat
to). A replica that fails a call is marked dead for a while; the request moves to another replica, which
rebuilds the session from the committed tokens (STATUS_RESYNC -> resend from 0). Without any draft
replica a round decodes plainly (still exact) until a draft is back.

How much each round speculates follows the load of its target replica (load_policy.py): the full tree with
one stream, smaller trees as the replica's fused forwards fill, plain decoding at saturation. Requests
are placed by prefix affinity with bounded load: the replica their prompt hashes to, unless it already
carries more than (1 + affinity_slack) x its share of this router's requests (consistent hashing with
bounded loads), so a shared system prompt cannot pin all traffic to one draft and one target.
With a feature-conditioned draft (`feature_layers`), the target's features of each accepted path travel
from Verify to the draft's next Propose.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import grpc

from ..core.config import SpecConfig
from ..core.decode import Chunk, DecodeStats, Prefill, Propose, Sequence, Step, Verify, decode
from ..core.planner import DRAFT, PLAIN, RoundPlan
from ..core.sampling import SamplingParams
from . import rpc
from .auth import SharedSecret
from .errors import BadRequest, DeadlineExceeded, Overloaded, ServingError, TooLarge, Unavailable
from .load_policy import Ema, LoadPolicy, LoadPolicyConfig, spec_for_budget
from .metrics import Metrics

log = logging.getLogger(__name__)
pb = rpc.pb
# a worker's answers that are the request's fault, not the replica's (no failover): for a failed call its
# status code, for a refused Verify item its error_code
CLIENT_STATUS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
CLIENT_ERROR_CODES = tuple(c.value[0] for c in CLIENT_STATUS)


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
    batch_wait_s: float = 0.002                # a Verify batch waits up to this for the router's others (0: never)
    rpc_timeout_s: float = 120.0
    request_timeout_s: float = 600.0           # whole-request deadline; every downstream call gets what is left
    affinity_block: int = 32                   # prompt tokens hashed for prefix-affinity routing
    refresh_s: float = 5.0
    dead_s: float = 10.0
    failover_timeout_s: float = 120.0          # how long a round waits for a target replica (restarts included)
    max_body_bytes: int = 4 * 1024 * 1024      # HTTP request bodies above it get 413, unread
    affinity_slack: float = 0.25               # bounded-load routing: a replica takes at most (1 + slack) x its share
    load_policy: object = "auto"               # speculation by load: auto | off | {LoadPolicyConfig fields}
    feature_layers: tuple = ()                 # a feature-conditioned draft: the target layers it reads
    admit_timeout_s: float = 60.0              # an admitted request whose stream never starts is released after it

    def __post_init__(self) -> None:
        try:
            if not isinstance(self.load_policy, LoadPolicyConfig):
                self.load_policy = LoadPolicyConfig.from_value(self.load_policy)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"router config load_policy: {exc}") from None
        if not isinstance(self.feature_layers, (list, tuple)) or \
                any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.feature_layers):
            raise ValueError(f"router config feature_layers must be a list of layer indices, got "
                             f"{self.feature_layers!r}")
        self.feature_layers = tuple(self.feature_layers)

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
        for name in ("max_batch", "max_inflight", "rpc_timeout_s", "request_timeout_s", "max_body_bytes"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"router config {name} must be > 0, got {getattr(cfg, name)}")
        if isinstance(spec, dict):
            method = spec.get("method", "gsd")
            cfg.spec = SpecConfig.for_method(method, **{k: v for k, v in spec.items() if k != "method"})
        elif isinstance(spec, SpecConfig):
            cfg.spec = spec
        try:
            rpc.check_spec_size(cfg.spec)    # the draft replicas would refuse its rounds
        except TooLarge as exc:
            raise ValueError(f"router spec: {exc}") from None
        return cfg


# ---------------------------------------------------------------- replicas

class Endpoint:
    def __init__(self, kind: str, replica_id: str, address: str, router: "RouterCore"):
        self.kind = kind
        self.replica_id = replica_id
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=rpc.CHANNEL_OPTIONS)
        self.stub = (rpc.pb_grpc.DraftStub if kind == "draft" else rpc.pb_grpc.TargetStub)(self.channel)
        self.dead_until = 0.0
        self.load = 0           # this router's requests whose session lives here (bounded-load routing; a
        #                         Verify batch waits briefly for all of them)
        self.batcher = VerifyBatcher(self, router) if kind == "target" else None
        self.policy = LoadPolicy(router.config.spec.budget, router.config.load_policy) if kind == "target" else None

    @property
    def alive(self) -> bool:
        return time.monotonic() >= self.dead_until


class VerifyBatcher:
    """Queues Verify items for one target replica; one call in flight, the queue leaves as one batch.

    A batch leaves at once when every one of this router's requests on the replica has queued its item; else
    it waits up to `batch_wait_s` for the rest (drafting, or just handed the last call's results). Without the
    wait, sessions fall out of phase for good: while a call for some of them is in flight the others queue, and
    each group then leaves alone, so 4 streams were verified as batches of 1 and 3 in turn (two forwards per
    round instead of one). A lone stream never waits."""

    def __init__(self, ep: Endpoint, router: "RouterCore"):
        self.ep = ep
        self.router = router
        self.queue: list[tuple[pb.VerifyItem, asyncio.Future, float]] = []
        self.task: asyncio.Task | None = None
        self._arrived: asyncio.Event | None = None

    async def submit(self, item: "pb.VerifyItem", deadline: float) -> "pb.VerifyResult":
        """Verify `item` in the next batch; `deadline` (time.monotonic()) is its request's deadline."""
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((item, fut, deadline))
        if self._arrived is not None:
            self._arrived.set()
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._drain())
        return await fut

    def _expected(self) -> int:
        """Items a full batch would hold: this router's requests on the replica (up to max_batch)."""
        return min(self.ep.load, self.router.config.max_batch)

    async def _wait_for_company(self, wait_s: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + wait_s
        if self._arrived is None:
            self._arrived = asyncio.Event()
        while len(self.queue) < self._expected():
            left = end - loop.time()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _drain(self) -> None:
        cfg = self.router.config
        while self.queue:
            if cfg.batch_wait_s > 0 and len(self.queue) < self._expected():
                await self._wait_for_company(cfg.batch_wait_s)
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
                req = pb.VerifyRequest(items=[i for i, _ in batch], feature_layers=self.router.feature_layers)
                resp = await self.ep.stub.Verify(req, timeout=timeout, metadata=self.router.worker_secret.metadata())
            except Exception as exc:  # noqa: BLE001 (the call failed: delivered to every waiting request)
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            call_s = time.perf_counter() - t0
            m = self.router.metrics
            m.batch.labels(model_name=m.model_name).observe(len(batch))
            m.verify_s.labels(model_name=m.model_name).observe(call_s)
            m.forward_s.labels(model_name=m.model_name).observe(resp.forward_seconds)
            self.router.batch_sizes.append(len(batch))      # bounded: the latest calls only
            self.ep.policy.observe_verify(resp.rows, resp.sessions, resp.forward_seconds, call_s)
            by_id = {r.session_id: r for r in resp.results}
            for item, f in batch:
                if not f.done():
                    f.set_result(by_id.get(item.session_id))


def _rendezvous(key: bytes, eps: list[Endpoint]) -> list[Endpoint]:
    """Endpoints ordered by highest-random-weight hashing of `key`: the same prefix goes to the same replica."""
    return sorted(eps, key=lambda e: hashlib.blake2b(key + e.replica_id.encode(), digest_size=8).digest(),
                  reverse=True)


def bounded_pick(key: bytes, eps: list[Endpoint], slack: float) -> Endpoint:
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam): the first replica in `key`'s
    rendezvous order whose load stays within ceil((1 + slack) x (total load + 1) / replicas). Requests that
    share a prompt prefix keep their replica until it carries more than its share; then they spill to the
    next replica in their order (still the same one for all of them), never to a random one."""
    order = _rendezvous(key, eps)
    bound = math.ceil((1 + slack) * (sum(e.load for e in eps) + 1) / len(eps))
    return next((e for e in order if e.load + 1 <= bound), order[0])


# ---------------------------------------------------------------- requests

@dataclass
class GenerateParams:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    request_id: str = ""
    timeout_s: float | None = None     # the client's deadline (capped by RouterConfig.request_timeout_s)


class LoadPlanner:
    """The decode loop's planner for a served request: before each round, the load policy of the request's
    target replica picks the tree budget (1: a plain step); the draft replica proposes its own lookup chain."""

    def __init__(self, run: "Run"):
        self.run = run

    def plan(self, tokens, room: int, method: str, lookup: int, max_depth: int, lag: int = 0) -> RoundPlan:
        budget = self.run.core.round_budget(self.run)
        self.run.round_budget = budget
        if budget <= 1:
            return RoundPlan(PLAIN)
        return RoundPlan(DRAFT, max_depth=min(max_depth, room - 1))

    def tree_size(self, path_probs) -> int:
        return min(len(path_probs), self.run.round_budget)

    def record_round(self, *args, **kwargs) -> None:
        pass


class Run:
    """One request: its sequence, the replicas holding its sessions, and how far each is synced."""

    def __init__(self, core: "RouterCore", params: GenerateParams):
        self.core = core
        self.params = params
        self.id = params.request_id or uuid.uuid4().hex
        self.seq = Sequence(params.prompt_ids, params.max_tokens, core.stop_ids)
        self.stats = DecodeStats(method=core.config.spec.method)
        self.key = bytes(str(self.prompt[: core.config.affinity_block]), "ascii")
        self.draft: Endpoint | None = None
        self.target: Endpoint | None = None
        self.d_synced = 0
        self.t_synced = 0
        self.last_path: list[int] = []
        self.round_budget = core.config.spec.budget
        self.round_overhead = Ema()                  # a round's time outside its target calls (seconds)
        self.target_done: float | None = None        # when the latest target call returned
        self.features: list = []            # pb.Features the draft has not been sent yet (feature drafts)
        self.sampling_pb = rpc.sampling_to_proto(params.sampling)
        budget = core.config.request_timeout_s
        if params.timeout_s is not None and params.timeout_s > 0:
            budget = min(budget, params.timeout_s)
        self.admitted = time.monotonic()
        self.deadline = self.admitted + budget
        self.started = False
        self.released = False

    @property
    def committed(self) -> list[int]:
        return self.seq.tokens

    @property
    def prompt(self) -> list[int]:
        return self.seq.prompt

    @property
    def out(self) -> list[int]:
        return self.seq.output

    @property
    def finish(self) -> str | None:
        return self.seq.finish_reason

    def assign(self, kind: str, ep: Endpoint | None) -> None:
        """Move this request's `kind` session to `ep` (bounded-load accounting follows)."""
        old = self.draft if kind == "draft" else self.target
        if old is ep:
            return
        if old is not None:
            old.load -= 1
        if ep is not None:
            ep.load += 1
        if kind == "draft":
            self.draft = ep
        else:
            self.target = ep

    def release(self) -> None:
        """Give back the request's admission slot and its sessions; idempotent (every way a request can end
        calls it: finished, failed, cancelled, or a stream that was never started)."""
        if self.released:
            return
        self.released = True
        self.core.finished(self)

    def rpc_timeout(self) -> float:
        """The timeout of the next downstream call: the per-call cap or what is left of the request's deadline."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed before it finished")
        return min(self.core.config.rpc_timeout_s, left)

    async def chunks(self) -> AsyncIterator[list[int]]:
        """The request's committed tokens, chunk by chunk, decoded ahead of the reader.

        The decode loop runs in its own task and never waits for the reader: formatting and sending a chunk
        (detokenizing, JSON, SSE, Serve's proxy) used to sit between a Verify's answer and the next Verify,
        with the target idle, on every round; now the next round's target call is in flight meanwhile.
        Whatever piled up while the reader was busy comes as one chunk, so a chunk read after the request
        finished is its last (readers pass `run.finish is not None` as "final" to the detokenizer)."""
        self.started = True
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump() -> None:
            try:
                async for tokens in self._decode_chunks():
                    queue.put_nowait(tokens)
                queue.put_nowait(end)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 (handed to the reader, who raises it)
                queue.put_nowait(exc)

        task = asyncio.get_running_loop().create_task(pump())
        try:
            done = False
            while not done:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                tokens: list[int] = []
                error = None
                for item in items:
                    if item is end:
                        done = True
                    elif isinstance(item, BaseException):
                        error = item
                    else:
                        tokens.extend(item)
                if tokens:
                    yield tokens
                if error is not None:
                    raise error
        finally:
            if not task.done():
                task.cancel()      # the reader left early (disconnect, error): the decode loop stops now
            try:
                await task
            except BaseException:  # noqa: BLE001 (its outcome was delivered above, or nobody wants it)
                pass
            self.release()

    async def _decode_chunks(self) -> AsyncIterator[list[int]]:
        """The decode loop, answered over gRPC, chunk by chunk."""
        core = self.core
        m = core.metrics
        spec = core.config.spec
        loop = decode(self.seq, spec, LoadPlanner(self) if spec.method != "ar" else None, self.stats)
        started = time.perf_counter()
        answer = None
        try:
            while True:
                try:
                    request = loop.send(answer)
                except StopIteration:
                    break
                answer = None
                if isinstance(request, Chunk):
                    if request.tokens:
                        yield request.tokens
                elif isinstance(request, Propose):
                    resp = await core.propose(self, request.max_depth)
                    if resp is not None:
                        answer = rpc.graph_from_proto(resp.graph)
                        m.inc("drafts")
                elif isinstance(request, Verify):
                    t = time.perf_counter()
                    if self.target_done is not None:   # the round's time outside target calls, for tree sizing
                        self.round_overhead.add(t - self.target_done, 0.2)
                    answer = await core.verify(self, rpc.graph_to_proto(request.graph), len(request.tree))
                    self.target_done = time.perf_counter()
                    self.last_path = list(answer.graph_path)
                    n = len(answer.emitted)
                    m.inc("draft_tokens", max(answer.verified_tokens - 1, 0))
                    m.inc("accepted", n - 1)
                    for pos in range(n - 1):
                        m.inc("per_pos", position=str(pos))
                    if self.target is not None:
                        self.target.policy.observe_tree(self.round_budget, answer.verified_tokens, answer.tree_path)
                elif isinstance(request, Step):
                    res = await core.verify(self, rpc.root_graph_proto(self.seq.root), 1)
                    self.last_path = list(res.graph_path)
                    answer = res.emitted[0]
                    self.target_done = time.perf_counter()
                elif isinstance(request, Prefill):
                    answer, cached = await core.prefill(self)
                    self.stats.cached_prompt_tokens = cached
                    m.ttft.labels(model_name=m.model_name).observe(time.perf_counter() - started)
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
            loop.close()
            self.release()


class RouterCore:
    def __init__(self, config: RouterConfig, discover: Callable[[], Awaitable[list[tuple[str, str, str]]]],
                 tokenizer=None, stop_ids: set[int] | None = None, worker_token: str | None = None):
        """discover() returns [(kind, replica_id, address)] of the live draft and target replicas;
        `worker_token` is the application's worker secret (replaceable: `worker_secret.value`)."""
        self.config = config
        self.discover = discover
        self.worker_secret = SharedSecret(worker_token)
        if tokenizer is None:
            from ..models.checkpoints import load_tokenizer

            tokenizer = load_tokenizer(config.target)
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids if stop_ids is not None else self._stop_ids()
        self.vocab_size = len(tokenizer)
        self.metrics = Metrics(config.model_name)
        self.endpoints: dict[str, Endpoint] = {}
        self.inflight = 0
        self.runs: dict[str, Run] = {}           # admitted and not yet released
        self.batch_sizes: deque[int] = deque(maxlen=1024)   # sessions per Verify call, the latest calls only
        self.feature_layers = list(config.feature_layers) if config.spec.method != "ar" else []
        self._spec_pb: dict[int, "pb.SpecConfig"] = {}
        self._refreshed = 0.0
        self._refresh_lock: asyncio.Lock | None = None

    def _stop_ids(self) -> set[int]:
        from ..core.prompts import stop_token_ids

        model = None
        try:
            from types import SimpleNamespace

            from transformers import GenerationConfig

            from ..models.checkpoints import resolve

            model = SimpleNamespace(generation_config=GenerationConfig.from_pretrained(resolve(self.config.target)))
        except Exception:  # noqa: BLE001 (no generation config: the tokenizer's EOS only)
            pass
        return stop_token_ids(self.tokenizer, model)

    # speculation by load ------------------------------------------------------------
    def round_budget(self, run: Run) -> int:
        """The tree budget of the run's next round, from its target replica's load policy (1: plain)."""
        ep = run.target
        if ep is None or ep.policy is None:
            return self.config.spec.budget
        decision = ep.policy.decide(sessions_here=ep.load, session=run.id)
        lag = len(run.committed) - run.d_synced        # tokens the draft has not read (all of them if it never drafted)
        if (decision.budget > 1 and decision.reason == "measured" and lag > self.config.spec.max_depth + 1
                and not ep.policy.catch_up_pays(decision, lag, run.seq.max_new_tokens - len(run.out))):
            return 1
        return decision.budget

    def spec_pb(self, budget: int) -> "pb.SpecConfig":
        msg = self._spec_pb.get(budget)
        if msg is None:
            msg = self._spec_pb[budget] = rpc.spec_to_proto(spec_for_budget(self.config.spec, budget))
        return msg

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
        return bounded_pick(key, eps, self.config.affinity_slack) if eps else None

    def mark_dead(self, ep: Endpoint, exc: Exception) -> None:
        log.warning("router: %s replica %s at %s failed (%s); failing over", ep.kind, ep.replica_id, ep.address,
                    getattr(exc, "code", lambda: exc)())
        ep.dead_until = time.monotonic() + self.config.dead_s
        self.metrics.inc("failovers", kind=ep.kind)

    def fail_over(self, run: "Run", ep: Endpoint, exc: Exception) -> None:
        """`ep` failed `run`'s call: avoid it for a while and drop the run's session there; the next attempt
        picks another replica, which rebuilds the session from the committed tokens."""
        self.mark_dead(ep, exc)
        run.stats.failovers += 1
        run.assign(ep.kind, None)
        if ep.kind == "draft":
            run.d_synced = 0
        else:
            run.t_synced = 0

    @staticmethod
    def _client_bug(exc: Exception) -> bool:
        """A worker refused the call's content (not the replica's fault: no failover)."""
        return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in CLIENT_STATUS

    @staticmethod
    def _refusal(exc: "grpc.aio.AioRpcError") -> ServingError:
        cls = TooLarge if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else BadRequest
        return cls(exc.details())

    # one request ----------------------------------------------------------------
    def validate(self, params: GenerateParams) -> None:
        cfg = self.config
        if not params.prompt_ids:
            raise BadRequest("the prompt is empty", "prompt")
        if len(params.prompt_ids) > cfg.max_prompt_tokens:   # before looking at each id
            raise BadRequest(f"the prompt has {len(params.prompt_ids)} tokens; at most {cfg.max_prompt_tokens} are "
                             "accepted", "prompt", "context_length_exceeded")
        if any((not isinstance(t, int)) or t < 0 or t >= self.vocab_size for t in params.prompt_ids):
            raise BadRequest(f"prompt token ids must be integers in [0, {self.vocab_size})", "prompt")
        if params.max_tokens < 1 or params.max_tokens > cfg.max_tokens_limit:
            raise BadRequest(f"max_tokens must be in [1, {cfg.max_tokens_limit}], got {params.max_tokens}",
                             "max_tokens")
        if len(params.prompt_ids) + params.max_tokens > cfg.max_model_len:
            raise BadRequest(f"prompt ({len(params.prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"the model's {cfg.max_model_len}", "max_tokens", "context_length_exceeded")

    def reap_unstarted(self) -> int:
        """Release admitted requests whose stream never started within admit_timeout_s (a response dropped
        before its generator ran): without this their slots would be held forever. Returns how many."""
        cut = time.monotonic() - self.config.admit_timeout_s
        stale = [r for r in self.runs.values() if not r.started and r.admitted < cut]
        for run in stale:
            log.warning("router: request %s was admitted but never started; releasing it", run.id)
            self.metrics.inc("cancelled", reason="never_started")
            run.release()
        return len(stale)

    def start(self, params: GenerateParams) -> Run:
        """Admit a request (or raise Overloaded / BadRequest); iterate `run.chunks()` to generate, and call
        `run.release()` if it is abandoned before that."""
        self.validate(params)
        if self.inflight >= self.config.max_inflight:
            self.reap_unstarted()
        if self.inflight >= self.config.max_inflight:
            self.metrics.inc("rejected", reason="overloaded")
            raise Overloaded(f"the router is at its limit of {self.config.max_inflight} concurrent requests; "
                             "retry later")
        if not params.sampling.greedy and params.sampling.seed is None:
            params.sampling = SamplingParams(params.sampling.temperature, params.sampling.top_k,
                                             params.sampling.top_p, random.getrandbits(62))
        run = Run(self, params)
        self.inflight += 1
        self.runs[run.id] = run
        self.metrics.running.labels(model_name=self.metrics.model_name).inc()
        self.metrics.inc("prompt_tokens", len(params.prompt_ids))
        return run

    def finished(self, run: Run) -> None:
        self.inflight -= 1
        self.runs.pop(run.id, None)
        self.metrics.running.labels(model_name=self.metrics.model_name).dec()
        for kind in ("draft", "target"):
            ep = run.draft if kind == "draft" else run.target
            if ep is not None:
                asyncio.ensure_future(self._release(ep, run.id))
            run.assign(kind, None)

    async def _release(self, ep: Endpoint, sid: str) -> None:
        try:
            await ep.stub.Release(pb.ReleaseRequest(session_ids=[sid]), timeout=5,
                                  metadata=self.worker_secret.metadata())
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
            run.assign("target", ep)   # before the call, so the session is released even if the call times out
            try:
                resp = await ep.stub.Prefill(pb.PrefillRequest(session_id=run.id, tokens=run.prompt,
                                                               sampling=run.sampling_pb,
                                                               feature_layers=self.feature_layers),
                                             timeout=run.rpc_timeout(), metadata=self.worker_secret.metadata())
            except grpc.aio.AioRpcError as exc:
                run.rpc_timeout()   # a call cut short by the request's own deadline is not the replica's fault
                if self._client_bug(exc):
                    raise self._refusal(exc) from None
                last = exc
                self.fail_over(run, ep, exc)
                await self._backoff(attempt)
                continue
            run.t_synced = len(run.prompt)      # the target holds prompt + first; the next delta resends first
            self._take_features(run, resp)
            m = self.metrics
            m.inc("pc_queries")
            if resp.cached_tokens:
                m.inc("pc_hits")
                m.inc("pc_saved", resp.cached_tokens)
            return int(resp.first_token), int(resp.cached_tokens)
        raise Unavailable(f"no target replica could prefill the prompt ({last})")

    # feature drafts: the target's features travel to the draft's next Propose --------------
    def _take_features(self, run: Run, resp) -> None:
        if self.feature_layers and resp.HasField("features") and resp.features.rows:
            run.features.append(resp.features)
            self._count_feature_bytes(run, resp.features)

    def _count_feature_bytes(self, run: Run, features) -> None:
        """Feature bytes through the router, each hop (target -> router, router -> draft) counted."""
        run.stats.feature_bytes += len(features.bf16)
        self.metrics.inc("feature_bytes", len(features.bf16))

    @staticmethod
    def merge_features(chunks: list) -> "pb.Features | None":
        """The chunks as one message of contiguous positions: a later chunk replaces what it overlaps, and a
        gap drops what came before it (the draft feeds zeros for positions it never gets)."""
        start, width, data = None, 0, b""
        for f in chunks:
            if start is None or f.width != width or f.start > start + len(data) // (2 * width):
                start, width, data = f.start, f.width, bytes(f.bf16)
                continue
            keep = max(f.start - start, 0) * 2 * width
            if f.start < start:              # replaces everything from before our start
                start, data = f.start, bytes(f.bf16)
            else:
                data = data[:keep] + bytes(f.bf16)
        if start is None:
            return None
        return pb.Features(start=start, rows=len(data) // (2 * width), width=width, bf16=data)

    async def propose(self, run: Run, depth: int):
        """The round's draft graph, or None when no draft replica is available (the round then verifies the root)."""
        for attempt in range(3):
            ep = run.draft if (run.draft is not None and run.draft.alive) else await self.pick("draft", run.key)
            if ep is None:
                return None
            if ep is not run.draft:
                run.assign("draft", ep)
                run.d_synced = 0
            budget = run.round_budget
            req = pb.ProposeRequest(session_id=run.id, delta_start=run.d_synced,
                                    delta=run.committed[run.d_synced:],
                                    last_path=run.last_path if run.d_synced else [],
                                    root_index=len(run.committed) - 1, spec=self.spec_pb(budget),
                                    sampling=run.sampling_pb, max_depth=depth)
            if run.features:
                merged = self.merge_features(run.features)
                if merged is not None:
                    req.features.CopyFrom(merged)
                    self._count_feature_bytes(run, merged)
            t0 = time.perf_counter()
            target = run.target
            try:
                resp = await ep.stub.Propose(req, timeout=run.rpc_timeout(), metadata=self.worker_secret.metadata())
            except grpc.aio.AioRpcError as exc:
                run.rpc_timeout()   # a call cut short by the request's own deadline is not the replica's fault
                if self._client_bug(exc):
                    raise ServingError(f"draft replica refused a round: {exc.details()}") from None
                self.fail_over(run, ep, exc)
                continue
            if resp.status == rpc.RESYNC:
                run.d_synced = 0
                run.stats.resyncs += 1
                self.metrics.inc("resyncs", kind="draft")
                continue
            seconds = time.perf_counter() - t0
            m = self.metrics
            m.draft_s.labels(model_name=m.model_name).observe(seconds)
            if target is not None and req.delta_start > 0 and len(req.delta) <= self.config.spec.max_depth + 1:
                # a steady round's cost: a first Propose also feeds the draft the whole prompt (its prefill), and
                # the first after plain rounds feeds it every token since (its catch-up); either would make every
                # tree look expensive to the policy
                target.policy.observe_propose(budget, seconds)
            elif target is not None:
                target.policy.observe_catch_up(len(req.delta), seconds)
            # a fresh session on this replica was fed the whole sequence before the root: its prefill
            prefill = len(run.committed) - 1 if req.delta_start == 0 else 0
            run.stats.draft_forwards += resp.draft_forwards
            run.stats.draft_prefill_tokens += prefill
            run.stats.draft_tokens += max(resp.draft_tokens - prefill, 0)
            run.stats.draft_features_missing += resp.features_missing
            run.features.clear()
            run.d_synced = len(run.committed)
            return resp
        return None

    async def verify(self, run: Run, graph: "pb.TokenGraph", budget: int | None = None) -> "pb.VerifyResult":
        last: Exception | None = None
        for attempt in self._attempts(run):
            ep = run.target if (run.target is not None and run.target.alive) else await self.pick("target", run.key)
            if ep is None:
                await self._backoff(attempt)
                continue
            if ep is not run.target:
                run.assign("target", ep)
                run.t_synced = 0
            item = pb.VerifyItem(session_id=run.id, delta_start=run.t_synced, delta=run.committed[run.t_synced:],
                                 graph=graph, root_index=len(run.committed) - 1,
                                 budget=budget or self.config.spec.budget, sampling=run.sampling_pb,
                                 size_by_cost=self.config.spec.planner,
                                 round_overhead_s=run.round_overhead.value or 0.0)
            try:
                res = await ep.batcher.submit(item, run.deadline)
            except grpc.aio.AioRpcError as exc:
                run.rpc_timeout()   # a call cut short by the request's own deadline is not the replica's fault
                if self._client_bug(exc):
                    raise ServingError(f"target replica refused a round: {exc.details()}") from None
                last = exc
                self.fail_over(run, ep, exc)
                await self._backoff(attempt)
                continue
            if res is None:
                raise ServingError("target replica returned no result for the session")
            if res.status == rpc.ERROR:     # this item alone failed; the batch's others went on
                if res.error_code in CLIENT_ERROR_CODES:     # its content was refused: the request fails
                    raise ServingError(f"target replica refused a round: {res.error}")
                # the replica failed it (its forward raised, e.g. a tensor-parallel rank died): fail over, as
                # for a failed call; the next replica rebuilds the session from the committed tokens
                last = RuntimeError(res.error)
                self.fail_over(run, ep, last)
                await self._backoff(attempt)
                continue
            if res.status == rpc.RESYNC:
                run.t_synced = 0
                run.stats.resyncs += 1
                self.metrics.inc("resyncs", kind="target")
                continue
            run.t_synced = len(run.committed)
            self._take_features(run, res)
            return res
        raise Unavailable(f"no target replica could verify the round ({last})")

    def policy_snapshot(self) -> dict:
        return {e.replica_id: e.policy.snapshot() for e in self.endpoints.values() if e.policy is not None}

    async def close(self) -> None:
        for ep in self.endpoints.values():
            await ep.channel.close()
        self.endpoints.clear()
