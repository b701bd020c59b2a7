"""The router: admits requests and hands each to a target replica, whose stream of committed tokens it relays.

Each request goes to one target replica (Target.Decode), picked by prefix affinity with bounded load: the
replica its prompt hashes to, unless that one already carries more than (1 + affinity_slack) x its share of
this router's requests (consistent hashing with bounded loads), so a shared system prompt cannot pin all
traffic to one replica. That replica runs the request's whole decode loop (its planner, its calls to draft
replicas, fused with its other sessions' rounds), so the router is out of the per-token path: it relays chunks
as they come, and a plain round costs no RPC at all.

A replica that fails mid-request is replaced: the request goes to another replica with its prompt and the
tokens already relayed, and goes on from there. Sampling noise depends only on the seed and each token's
index, so the tokens are the same whichever replica computes them. Replicas are found through a
`discover()` coroutine (in Ray: the registry actor the replicas heartbeat to).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import grpc

from ..core.config import SpecConfig
from ..core.decode import DecodeStats, Sequence
from ..core.grammar import GrammarCompiler, GrammarError, ResponseFormat
from ..core.sampling import SamplingParams
from ..core.stops import StopStrings
from . import rpc
from .auth import SharedSecret
from .errors import BadRequest, DeadlineExceeded, Overloaded, ServingError, TooLarge, Unavailable
from .metrics import Metrics

log = logging.getLogger(__name__)
pb = rpc.pb
# a replica's answers that are the request's fault, not the replica's (no failover)
CLIENT_STATUS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


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
    request_timeout_s: float = 600.0           # whole-request deadline; the target replica's stream gets what is left
    affinity_block: int = 32                   # prompt tokens hashed for prefix-affinity routing
    refresh_s: float = 5.0
    dead_s: float = 10.0
    failover_timeout_s: float = 120.0          # how long a request waits for a target replica (restarts included)
    max_body_bytes: int = 4 * 1024 * 1024      # HTTP request bodies above it get 413, unread
    affinity_slack: float = 0.25               # bounded-load routing: a replica takes at most (1 + slack) x its share
    feature_layers: tuple = ()                 # a feature-conditioned draft: the target layers it reads
    admit_timeout_s: float = 60.0              # an admitted request whose stream never starts is released after it
    # a target replica's Decode stream silent this long counts as failed (a tensor-parallel replica whose rank died
    # hangs in a collective instead of failing): the request goes on elsewhere
    stall_timeout_s: float = 120.0

    def __post_init__(self) -> None:
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
        for name in ("max_inflight", "request_timeout_s", "max_body_bytes", "stall_timeout_s"):
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
    def __init__(self, kind: str, replica_id: str, address: str):
        self.kind = kind
        self.replica_id = replica_id
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=rpc.CHANNEL_OPTIONS)
        self.stub = (rpc.pb_grpc.DraftStub if kind == "draft" else rpc.pb_grpc.TargetStub)(self.channel)
        self.dead_until = 0.0
        self.load = 0           # this router's requests decoding here (bounded-load routing)

    @property
    def alive(self) -> bool:
        return time.monotonic() >= self.dead_until


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
    stop: tuple[str, ...] = ()         # stop strings (core.stops): the output ends before the first one
    top_logprobs: int | None = None    # set: each output token's TokenLogprob, with this many alternatives
    response_format: ResponseFormat | None = None   # JSON mode (the target replica constrains the output)


class Run:
    """One request: its prompt and the tokens relayed so far, and the target replica decoding it."""

    def __init__(self, core: "RouterCore", params: GenerateParams):
        self.core = core
        self.params = params
        self.id = params.request_id or uuid.uuid4().hex
        stops = StopStrings(core.tokenizer, params.stop) if params.stop else None
        self.seq = Sequence(params.prompt_ids, params.max_tokens, core.stop_ids, stops)
        self.logprobs: list | None = [] if params.top_logprobs is not None else None   # one per output token
        self.stats = DecodeStats(method=core.config.spec.method)
        self.key = bytes(str(self.prompt[: core.config.affinity_block]), "ascii")
        self.target: Endpoint | None = None
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

    @property
    def text_end(self) -> int | None:
        """A stop string ended the output: the characters of its decoded text before it."""
        return self.seq.text_end

    def assign(self, ep: Endpoint | None) -> None:
        """Move this request to `ep` (bounded-load accounting follows)."""
        if self.target is ep:
            return
        if self.target is not None:
            self.target.load -= 1
        if ep is not None:
            ep.load += 1
        self.target = ep

    def release(self) -> None:
        """Give back the request's admission slot; idempotent (every way a request can end calls it: finished,
        failed, cancelled, or a stream that was never started)."""
        if self.released:
            return
        self.released = True
        self.core.finished(self)

    def time_left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed before it finished")
        return left

    async def chunks(self) -> AsyncIterator[list[int]]:
        """The request's committed tokens, chunk by chunk, as the target replica streams them.

        The relay runs in its own task and never waits for the reader: whatever arrived while the reader was busy
        (detokenizing, JSON, SSE, Serve's proxy) comes as one chunk, so a chunk read after the request finished
        is its last (readers pass `run.finish is not None` as "final" to the detokenizer)."""
        self.started = True
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump() -> None:
            try:
                async for tokens in self._measured():
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
                task.cancel()      # the reader left early (disconnect, error): the replica's stream is cancelled
            try:
                await task
            except BaseException:  # noqa: BLE001 (its outcome was delivered above, or nobody wants it)
                pass
            self.release()

    async def _measured(self) -> AsyncIterator[list[int]]:
        """The relay, with the request's metrics."""
        m = self.core.metrics
        start = time.perf_counter()
        ttft_seen = False
        try:
            async for tokens in self._relay():
                if not ttft_seen:
                    ttft_seen = True
                    self.stats.ttft = time.perf_counter() - start
                    m.ttft.labels(model_name=m.model_name).observe(self.stats.ttft)
                yield tokens
            self.stats.new_tokens = len(self.out)
            self.stats.finish(time.perf_counter() - start)
            m.latency.labels(model_name=m.model_name).observe(self.stats.seconds)
            m.inc("success", finished_reason=self.finish)
            m.inc("generation_tokens", len(self.out))
            m.inc("drafts", self.stats.drafted_rounds)
            m.inc("lookups", self.stats.lookup_rounds)
            m.inc("draft_tokens", max(self.stats.verified_tokens - self.stats.drafted_rounds - self.stats.lookup_rounds, 0))
            m.inc("accepted", self.stats.accepted_tokens)
        except (asyncio.CancelledError, GeneratorExit):
            m.inc("cancelled", reason="client")
            raise
        except Exception:
            m.inc("cancelled", reason="error")
            raise

    async def _relay(self) -> AsyncIterator[list[int]]:
        """Decode on a target replica, relaying its chunks; on a replica's failure, go on from the tokens relayed so
        far on another one (until failover_timeout_s passes without a replica that serves it)."""
        core = self.core
        attempt = 0
        give_up = time.monotonic() + core.config.failover_timeout_s
        last: Exception | None = None
        while not self.seq.finished:
            left = self.time_left()
            ep = await core.pick("target", self.key)
            if ep is None:
                if attempt >= 2 and time.monotonic() > give_up:
                    raise Unavailable(f"no target replica could decode the request ({last or 'none is live'})")
                attempt += 1
                await asyncio.sleep(min(0.25 * 2 ** attempt, 3.0, left))
                continue
            self.assign(ep)
            req = pb.DecodeRequest(session_id=f"{self.id}.{attempt}", tokens=self.committed,
                                   max_tokens=self.seq.room, sampling=self.sampling_pb, spec=core.spec_pb,
                                   stop_token_ids=sorted(core.stop_ids), feature_layers=core.feature_layers,
                                   top_logprobs=self.params.top_logprobs,
                                   response_format=rpc.format_to_proto(self.params.response_format),
                                   output_tokens=len(self.out))
            call = ep.stub.Decode(req, timeout=left, metadata=core.worker_secret.metadata())
            chunks = call.__aiter__()
            try:
                while True:
                    try:
                        chunk = await asyncio.wait_for(chunks.__anext__(), core.config.stall_timeout_s)
                    except StopAsyncIteration:
                        break
                    except asyncio.TimeoutError:
                        if self.deadline - time.monotonic() <= 0:
                            raise DeadlineExceeded("the request's deadline passed before it finished") from None
                        raise Unavailable(f"the target replica sent nothing for {core.config.stall_timeout_s:.0f} s")
                    if chunk.replica_id:
                        core.metrics.inc("pc_queries")
                        if chunk.cached_tokens:
                            core.metrics.inc("pc_hits")
                            core.metrics.inc("pc_saved", chunk.cached_tokens)
                            self.stats.cached_prompt_tokens += chunk.cached_tokens
                    if chunk.tokens:
                        if self.logprobs is not None and len(chunk.logprobs) != len(chunk.tokens):
                            raise Unavailable("the replica sent tokens without their logprobs")
                        got = self.seq.commit(list(chunk.tokens))
                        if self.logprobs is not None:
                            self.logprobs.extend(rpc.logprob_from_proto(m) for m in chunk.logprobs[: len(got)])
                        if got:
                            yield got
                    if chunk.finish_reason:
                        self._merge_stats(chunk.stats)
                        if not self.seq.finished:     # the replica stopped where this router would not: trust it
                            self.seq.finish_reason = chunk.finish_reason
                        return
                    if self.seq.text_end is not None:
                        # a stop string ended the output: cancelling the stream (below) ends the replica's session,
                        # which releases its draft sessions
                        return
                failure: Exception = Unavailable("the replica's stream ended before the request finished")
            except grpc.aio.AioRpcError as exc:
                if exc.code() in CLIENT_STATUS:
                    cls = TooLarge if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else BadRequest
                    raise cls(exc.details() or "the target replica refused the request") from None
                failure = exc
            except Unavailable as exc:
                failure = exc
            finally:
                call.cancel()
            self.time_left()     # a stream cut short by the request's own deadline is not the replica's fault
            last = failure
            core.mark_dead(ep, failure)
            self.stats.failovers += 1
            self.assign(None)
            attempt += 1
            give_up = time.monotonic() + core.config.failover_timeout_s

    def _merge_stats(self, s: "pb.GenerateStats") -> None:
        st = self.stats
        st.rounds += s.rounds
        st.accepted_tokens += s.accepted_tokens
        st.verified_tokens += s.verified_tokens
        st.draft_tokens += s.draft_tokens
        st.plain_steps += s.plain_rounds
        st.lookup_rounds += s.lookup_rounds
        st.drafted_rounds += s.drafted_rounds
        st.lookup_accepted += s.lookup_accepted
        st.draft_forwards += s.draft_forwards
        st.target_forwards += s.rounds + 1
        st.resyncs += s.resyncs
        st.draft_failovers += s.draft_failovers
        st.draft_features_missing += s.draft_features_missing
        st.feature_bytes += s.feature_bytes
        st.grammar_pruned += s.grammar_pruned


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
        self.feature_layers = list(config.feature_layers) if config.spec.method != "ar" else []
        self.spec_pb = rpc.spec_to_proto(config.spec)
        self._refreshed = 0.0
        self._refresh_lock: asyncio.Lock | None = None
        self._grammars: GrammarCompiler | None = None    # built at the first JSON request (about a second)

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
                    self.endpoints[key] = Endpoint(kind, rid, address)
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
                    exc.code() if isinstance(exc, grpc.aio.AioRpcError) else exc)
        ep.dead_until = time.monotonic() + self.config.dead_s
        self.metrics.inc("failovers", kind=ep.kind)

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
        self.check_format(params.response_format)

    def check_format(self, fmt: ResponseFormat | None) -> None:
        """Refuse a response format whose grammar cannot be built (before any replica sees it)."""
        if fmt is None:
            return
        try:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, self.stop_ids, self.vocab_size)
            self._grammars.check(fmt)
        except GrammarError as exc:
            raise BadRequest(str(exc), "response_format") from None

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
        run.assign(None)

    async def close(self) -> None:
        for ep in self.endpoints.values():
            await ep.channel.close()
        self.endpoints.clear()
