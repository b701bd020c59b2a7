"""The serving benchmark (`gsd-serve bench-serve`): concurrent OpenAI streams against a served stack.

In the spirit of vLLM's benchmark_serving (its metric names: output token throughput, TTFT, TPOT, ITL,
E2EL; `--max-concurrency`-style closed-loop clients): for each method (a served configuration: ar, gsd,
...) and each concurrency c it starts `gsd-serve serve` with that configuration (or uses `--url`), keeps c
streaming chat completions in flight over a prompt file until the level's requests are done, and
records every request's first-token time, inter-token gaps, end-to-end latency, output tokens and text.
Each answer is compared with the in-process engine's greedy answer for the same prompt and dtype (and
with served ar's), so a speed-up can never hide a changed output.

Pieces, each usable alone:

    BenchServeConfig      what to run (validated)
    Workload              prompts (chat messages) and their reference answers
    ServeProcess          `gsd-serve serve --config FILE` as a child process, up until stopped
    _anchor_level         llama.cpp's `llama-server` on the same GGUF, prompts and cores (optional; llama_server.py)
    run_level             c closed-loop clients (asyncio + aiohttp) over n requests -> LevelResult
    run_bench             the sweep: each concurrency level, the methods in A-B-B-A turns, each on a stack
                          started for that level alone; plus the in-process reference
    write_report          results.json, results.md (tables) and tokens_per_s.png (one line per method)

The client costs CPU on the machine it runs on: it is one asyncio loop with a minimal SSE parser (no
OpenAI client objects per event), as light as vLLM's aiohttp client.
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..models.hardware import cpu_description
from .llama_server import ANCHOR
from .processes import LoggedProcess
from .results import git_commit, write_manifest
from ..serving.serve_config import free_port

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "bench_prompts.jsonl"

# what each method name serves: application args merged over the defaults (deploy/local-cpu.yaml's app)
METHODS: dict[str, dict] = {
    "ar": {"spec": {"method": "ar"}},
    "gsd": {"spec": {"method": "gsd"}},                                       # the planner decides each round (the default)
    "gsd-static": {"spec": {"method": "gsd", "planner": False}},  # every round drafts and verifies its whole budget
}


@dataclass
class BenchServeConfig:
    prompts: str = str(DEFAULT_PROMPTS)
    limit: int | None = None                 # prompts used (spread over the file's categories); None: all
    max_tokens: int = 64
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    methods: tuple[str, ...] = ("ar", "gsd")
    min_rounds: int = 2                      # each level sends max(len(prompts), min_rounds * c) requests
    url: str | None = None                   # an already running server: one method, named `label`
    label: str = "served"
    api_key: str | None = None
    model: str = "gsd-smollm2-135m"
    dtype: str = "auto"
    draft_replicas: int = 1
    target_replicas: int = 1
    config: str | None = None                # a Serve config file to start instead of the default
    reference: str = "inprocess"             # inprocess | none: the in-process engine's answers (and speed)
    warmup: int = 2                          # requests per method before the sweep (not counted)
    request_timeout_s: float = 600.0
    start_timeout_s: float = 900.0
    http_port: int = 0                       # 0: a free port
    entries: tuple[str, ...] = ()            # how clients reach the router: direct (the router replicas' own
    #                                          port) and/or proxy (Serve's HTTP proxy); the first keeps the method's
    #                                          name, others are reported as METHOD@ENTRY; () = direct where the
    #                                          config has a direct port, else proxy
    extra_args: dict = field(default_factory=dict)   # application args merged into every method's
    llama_server: str | None = None          # a llama-server binary: adds the ANCHOR method (llama_server.py)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.llama_server and ANCHOR not in self.methods:
            self.methods = (*self.methods, ANCHOR)
        if ANCHOR in self.methods and not self.llama_server:
            raise ValueError(f"method {ANCHOR} needs a llama-server binary (--llama-server PATH or $LLAMA_SERVER)")
        if self.url is None:
            unknown = [m for m in self.methods if m not in METHODS and m != ANCHOR]
            if unknown:
                raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS) + [ANCHOR]}")
        if self.reference not in ("inprocess", "none"):
            raise ValueError(f"reference must be inprocess or none, got {self.reference!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if any(e not in ("direct", "proxy") for e in self.entries) \
                or len(set(self.entries)) != len(self.entries):
            raise ValueError(f"entries must be direct and/or proxy, got {self.entries}")


# ---------------------------------------------------------------- prompts and references

@dataclass
class Item:
    id: str
    category: str
    messages: list[dict]
    reference: str | None = None            # the in-process engine's greedy answer (text)
    reference_finish: str | None = None


@dataclass
class Workload:
    items: list[Item]
    inprocess: dict = field(default_factory=dict)    # method -> {"tokens_per_s" (mean of "runs"), "runs", "tokens"}


def load_workload(cfg: BenchServeConfig) -> Workload:
    from ..core.prompts import load_prompts, spread

    records = load_prompts(cfg.prompts)
    if cfg.limit is not None:
        records = spread(records, cfg.limit)
    items = []
    for i, r in enumerate(records):
        messages = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        items.append(Item(str(r.get("id", i)), str(r.get("category", "")), messages))
    return Workload(items)


def inprocess_reference(work: Workload, cfg: BenchServeConfig, methods=("ar", "gsd")) -> None:
    """The in-process engine's greedy answers (ar: the reference) and its speed for `methods`, same prompts and
    dtype, one prompt after another (what `gsd-serve generate --method M --prompts FILE` does). Runs while no
    server runs, so nothing else competes for the cores. Called again (answers already known) it measures the
    speeds once more, in the reverse order, and keeps each method's runs: the sweep measures before and after
    its first level, so the served-over-in-process ratio is A-B-B-A (these VMs drift 15-25% within minutes)."""
    from ..core.config import SpecConfig
    from ..core.prompts import encode
    from ..models import load_engine

    again = bool(work.inprocess)
    engine, tokenizer = load_engine(dtype=cfg.dtype)
    ids = [encode(tokenizer, {"messages": it.messages}) for it in work.items]
    engine.generate(ids[0], 8, spec=SpecConfig.for_method("gsd"))          # warm-up (packing, first forwards)
    for method in (tuple(reversed(methods)) if again else methods):
        # each method starts with an empty cross-request index, as each served level's fresh stack does: gsd
        # must not read ar's answers to these very prompts
        engine.forget_requests()
        spec = SpecConfig.for_method(method)
        tokens, t0 = 0, time.perf_counter()
        for it, p in zip(work.items, ids):
            r = engine.generate(p, cfg.max_tokens, spec=spec)
            tokens += len(r.token_ids)
            if method == "ar" and not again:
                it.reference = tokenizer.decode(r.token_ids, skip_special_tokens=True)
                it.reference_finish = r.finish_reason
        seconds = time.perf_counter() - t0
        runs = work.inprocess.get(method, {}).get("runs", []) + [round(tokens / seconds, 2)]
        work.inprocess[method] = {"tokens": tokens, "runs": runs,
                                  "tokens_per_s": round(statistics.fmean(runs), 2)}
    work.inprocess["dtype"] = engine.dtype_name
    del engine


# ---------------------------------------------------------------- the server

def serve_config(cfg: BenchServeConfig, method: str, http_port: int, grpc_port: int) -> dict:
    """The Serve config a method runs: the default one-machine config (or cfg.config) with the method's args."""
    from ..serving.serve_config import load_config

    config = load_config(cfg.config, http_port=http_port, grpc_port=grpc_port, draft_replicas=cfg.draft_replicas,
                         dtype=cfg.dtype, api_key=cfg.api_key, direct_http_port=free_port())
    for app in config["applications"]:
        args = app["args"]
        for k, v in {**cfg.extra_args, **METHODS[method]}.items():
            args[k] = {**(args.get(k) or {}), **v} if isinstance(v, dict) and k in ("router",) else v
        args["model_name"] = cfg.model
        for d in app.get("deployments") or []:
            if d["name"] == "Target":
                d["num_replicas"] = cfg.target_replicas
            if d["name"] == "Draft":
                d["num_replicas"] = cfg.draft_replicas
    if cfg.config is None:
        config["http_options"]["port"] = http_port
        config["grpc_options"]["port"] = grpc_port
    return config


class ServeProcess(LoggedProcess):
    """`gsd-serve serve --config FILE` in a child process (its own Ray cluster), as a user starts it."""

    def __init__(self, config: dict, timeout_s: float, log_path: Path | None = None):
        import yaml

        self.config = config
        http = config["http_options"]
        self.url = f"http://127.0.0.1:{http['port']}"
        direct = (config["applications"][0].get("args") or {}).get("direct_http_port")
        self.direct_url = f"http://127.0.0.1:{direct}" if direct else None
        self._dir = tempfile.TemporaryDirectory(prefix="gsd-bench-serve-")
        path = Path(self._dir.name) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log_path = log_path or Path(self._dir.name) / "serve.log"
        self._log = open(self.log_path, "w", encoding="utf-8")
        env = dict(os.environ)
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.proc = subprocess.Popen([sys.executable, "-m", "gsd_serve", "serve", "--config", str(path),
                                      "--timeout", str(int(timeout_s))],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        from .local_stack import wait_healthy

        app = self.config["applications"][0]
        want = {d["name"]: int(d.get("num_replicas", 1)) for d in app.get("deployments") or []}

        def alive() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gsd-serve serve exited with {self.proc.returncode}; log: {self.log_path}: "
                                   + self.log_tail())

        wait_healthy(self.url, lambda h: h.get("target_replicas", 0) >= want.get("Target", 1)
                     and h.get("draft_replicas", 0) >= want.get("Draft", 1),
                     timeout_s, poll_s=1.0, alive=alive, what=f"the server (log: {self.log_path})")


# ---------------------------------------------------------------- the anchor: llama.cpp's own server

# llama-server renders the GGUF's chat template itself; a few tokens of slack in case its rendering differs
# from the transformers tokenizer's by a newline or a special token
TEMPLATE_SLACK_TOKENS = 16


def max_prompt_tokens(work: Workload) -> int:
    """The workload's longest prompt in tokens, chat template included (the default target's tokenizer)."""
    from ..core.prompts import encode
    from ..models.checkpoints import DEFAULT_TARGET, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_TARGET)
    return max(len(encode(tokenizer, {"messages": it.messages})) for it in work.items)


def anchor_command(cfg: BenchServeConfig, prompt_tokens: int, port: int) -> list[str]:
    """The llama-server command line for this sweep: the default target's GGUF on all of this process's
    cores, a slot per stream of the highest level (at least 16), context for every slot's longest request."""
    from .llama_server import context_size, default_gguf, server_command, server_slots, server_threads

    slots = server_slots(cfg.concurrency)
    context = context_size(slots, prompt_tokens + TEMPLATE_SLACK_TOKENS, cfg.max_tokens)
    return server_command(cfg.llama_server, default_gguf(), port=port, threads=server_threads(), slots=slots,
                          context=context, model=cfg.model)


# ---------------------------------------------------------------- load

@dataclass
class RequestResult:
    item: int
    ok: bool
    error: str | None
    text: str
    finish: str | None
    output_tokens: int
    ttft: float            # seconds to the first content
    e2el: float            # seconds to the end of the stream
    itl: list[float]       # gaps between content events
    stats: dict            # the server's gsd_stats


async def _one(session, url: str, model: str, item: Item, max_tokens: int, headers: dict,
               timeout_s: float) -> RequestResult:
    import aiohttp

    body = {"model": model, "messages": item.messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, last, itl, text, finish, tokens, stats, error = None, None, [], [], None, 0, {}, None
    try:
        async with session.post(url, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
            buf = b""
            async for data in r.content.iter_any():
                buf += data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    if not event.startswith(b"data: ") or event == b"data: [DONE]":
                        continue
                    d = json.loads(event[6:])
                    if "error" in d:
                        raise RuntimeError(f"stream error: {d['error'].get('message')}")
                    now = time.perf_counter()
                    for ch in d.get("choices") or []:
                        content = (ch.get("delta") or {}).get("content")
                        if content:
                            if ttft is None:
                                ttft = now - t0
                            else:
                                itl.append(now - last)
                            last = now
                            text.append(content)
                        finish = ch.get("finish_reason") or finish
                    if d.get("usage"):
                        tokens = int(d["usage"].get("completion_tokens", 0))
                    if d.get("gsd_stats"):
                        stats = d["gsd_stats"]
    except Exception as exc:  # noqa: BLE001 (every failure is a result)
        error = f"{type(exc).__name__}: {exc}"
    e2el = time.perf_counter() - t0
    ok = error is None and finish is not None
    if error is None and finish is None:
        error = "the stream ended without a finish_reason"
    return RequestResult(-1, ok, error, "".join(text), finish, tokens, ttft if ttft is not None else e2el, e2el,
                         itl, stats)


@dataclass
class LevelResult:
    method: str
    concurrency: int
    requests: int
    completed: int
    failed: int
    duration_s: float
    output_tokens: int
    output_throughput: float           # output tokens / s (vLLM's "Output token throughput")
    request_throughput: float
    ttft_ms: dict                      # mean, p50, p99
    tpot_ms: dict                      # time per output token after the first
    itl_ms: dict                       # gaps between streamed events
    e2el_ms: dict
    identical_to_reference: int | None   # answers equal to the in-process greedy answer
    identical_to_ar: int | None          # ... to served ar's answer for the same prompt
    mean_accept_len: float | None        # server-side: tokens per target forward, over the level
    feature_bytes_per_round: int | None  # feature drafts: target features through the router per round (in + out)
    plain_round_share: float | None      # rounds without a drafted tree (load policy, no draft, ...)
    errors: list[str]
    load_before: float                   # 1-minute load average when the level started
    load_after: float
    texts: list = field(default_factory=list, repr=False)   # (item index, text) per answer, for compare_with_ar


def _dist(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "p50": None, "p99": None}
    s = sorted(xs)

    def pct(p):
        k = (len(s) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)
    return {"mean": round(1000 * statistics.fmean(s), 2), "p50": round(1000 * pct(50), 2),
            "p99": round(1000 * pct(99), 2)}


def fresh_connections(method: str) -> bool:
    """Whether `method`'s clients open a connection per request: llama-server (cpp-httplib) closes a connection
    after a streamed answer, and aiohttp's next request on it fails ("Can not write request body")."""
    return method == ANCHOR


async def _level(url: str, model: str, work: Workload, concurrency: int, n_requests: int, max_tokens: int,
                 headers: dict, timeout_s: float, force_close: bool = False) -> tuple[list[RequestResult], float]:
    import aiohttp

    order = [i % len(work.items) for i in range(n_requests)]
    results: list[RequestResult] = []
    nxt = 0

    async def client(session):
        nonlocal nxt
        while nxt < len(order):
            i = order[nxt]
            nxt += 1
            r = await _one(session, url, model, work.items[i], max_tokens, headers, timeout_s)
            r.item = i
            results.append(r)

    conn = aiohttp.TCPConnector(limit=0, force_close=force_close)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(session) for _ in range(concurrency)])
        return results, time.perf_counter() - t0


def load_average() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def run_level(base_url: str, cfg: BenchServeConfig, work: Workload, method: str, concurrency: int) -> LevelResult:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    n = max(len(work.items), cfg.min_rounds * concurrency)
    before = load_average()
    results, duration = asyncio.run(_level(base_url.rstrip("/") + "/v1/chat/completions", cfg.model, work,
                                           concurrency, n, cfg.max_tokens, headers, cfg.request_timeout_s,
                                           fresh_connections(method)))
    done = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in done)
    tpot = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    refs = [r for r in done if work.items[r.item].reference is not None]
    same_ref = sum(1 for r in refs if r.text == work.items[r.item].reference
                   and r.finish == work.items[r.item].reference_finish) if refs else None
    rounds = sum(r.stats.get("rounds", 0) for r in done)
    drafted = sum(r.stats.get("drafted_rounds", 0) for r in done)
    forwards = sum(r.stats.get("target_forwards", 0) for r in done)
    new = sum(r.stats.get("new_tokens", 0) for r in done)
    feature_bytes = sum(r.stats.get("feature_bytes", 0) for r in done)
    return LevelResult(
        method=method, concurrency=concurrency, requests=len(results), completed=len(done),
        failed=len(results) - len(done), duration_s=round(duration, 2), output_tokens=tokens,
        output_throughput=round(tokens / duration, 2) if duration > 0 else 0.0,
        request_throughput=round(len(done) / duration, 3) if duration > 0 else 0.0,
        ttft_ms=_dist([r.ttft for r in done]), tpot_ms=_dist(tpot), itl_ms=_dist([g for r in done for g in r.itl]),
        e2el_ms=_dist([r.e2el for r in done]), identical_to_reference=same_ref, identical_to_ar=None,
        mean_accept_len=round(new / forwards, 3) if forwards else None,
        plain_round_share=round(1 - drafted / rounds, 3) if rounds else None,
        feature_bytes_per_round=round(feature_bytes / rounds) if rounds and feature_bytes else None,
        errors=sorted({r.error for r in results if r.error})[:5], load_before=before, load_after=load_average(),
        texts=[(r.item, r.text) for r in done])


# ---------------------------------------------------------------- the sweep

# a warm-up prompt outside every workload: what it leaves in a stack's cross-request index helps no measured prompt
WARMUP_MESSAGES = [{"role": "user", "content": "List the days of the week, one per line."}]


def _sweep(cfg: BenchServeConfig, work: Workload, url: str, label: str, concurrency: tuple[int, ...], log) -> list:
    """The warm-up and the given concurrency levels of one method through one entry (`url`)."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    if cfg.warmup:
        warm = Workload([Item("warmup", "", WARMUP_MESSAGES)])
        asyncio.run(_level(url.rstrip("/") + "/v1/chat/completions", cfg.model, warm, 1, cfg.warmup,
                           cfg.max_tokens, headers, cfg.request_timeout_s, fresh_connections(label)))
    levels = []
    for c in concurrency:
        lv = run_level(url, cfg, work, label, c)
        levels.append(lv)
        log(f"bench-serve: {label} ({url}) c={c}: {lv.output_throughput} tok/s, TTFT p50 {lv.ttft_ms['p50']} ms, "
            f"ITL p50 {lv.itl_ms['p50']} ms, failed {lv.failed}, identical {lv.identical_to_reference}/"
            f"{lv.completed}, plain rounds {lv.plain_round_share}, load {lv.load_before}->{lv.load_after}")
    return levels


def _served_level(cfg: BenchServeConfig, work: Workload, method: str, concurrency: int, served: dict,
                  log) -> list:
    """One concurrency level of one method on a stack started for it alone (and stopped after): every level
    begins as a fresh `gsd-serve serve` does, its cross-request index empty, so no level reads the answers an
    earlier level gave to these same prompts."""
    port = cfg.http_port or free_port()
    config = serve_config(cfg, method, port, free_port())
    t0 = time.monotonic()
    server = ServeProcess(config, cfg.start_timeout_s)
    try:
        served.setdefault(method, {"args": config["applications"][0]["args"], "start_s": []})["start_s"].append(
            round(time.monotonic() - t0, 1))
        log(f"bench-serve: {method} serving at {server.url} after {round(time.monotonic() - t0, 1)}s")
        wanted = cfg.entries or (("direct",) if server.direct_url else ("proxy",))
        levels = []
        for i, entry in enumerate(wanted):
            url = server.direct_url if entry == "direct" else server.url
            if url is None:
                raise ValueError("--entry direct: the config gives the router no direct_http_port")
            levels += _sweep(cfg, work, url, method if i == 0 else f"{method}@{entry}", (concurrency,), log)
        return levels
    finally:
        server.stop()


def _anchor_level(cfg: BenchServeConfig, work: Workload, concurrency: int, served: dict, log) -> list:
    """One concurrency level of llama-server (ANCHOR), started for it alone like the served methods' stacks."""
    from .llama_server import LlamaServerProcess

    port = free_port()
    command = anchor_command(cfg, max_prompt_tokens(work), port)
    t0 = time.monotonic()
    server = LlamaServerProcess(command, port, cfg.start_timeout_s)
    try:
        served.setdefault(ANCHOR, {"command": command, "start_s": []})["start_s"].append(
            round(time.monotonic() - t0, 1))
        log(f"bench-serve: {ANCHOR} serving at {server.url}: {' '.join(command)}")
        return _sweep(cfg, work, server.url, ANCHOR, (concurrency,), log)
    finally:
        server.stop()


def compare_with_ar(levels: list[LevelResult]) -> None:
    """Each non-ar level's answers against served ar's for the same prompts (identical_to_ar), once every level
    has run (the levels interleave the methods, so ar does not always run first)."""
    ar_texts: dict = {}
    for lv in levels:
        if lv.method == "ar":
            for item, text in lv.texts:
                ar_texts.setdefault(item, text)
    if not ar_texts:
        return
    for lv in levels:
        if lv.method != "ar" and lv.method != ANCHOR:
            comparable = [(i, t) for i, t in lv.texts if i in ar_texts]
            lv.identical_to_ar = sum(1 for i, t in comparable if t == ar_texts[i])


def run_bench(cfg: BenchServeConfig, log=print) -> dict:
    """The whole sweep; returns the report (see write_report). Started stacks run one level each, and the
    methods take turns level by level in A-B-B-A order (these VMs drift 15-25% within minutes)."""
    work = load_workload(cfg)
    log(f"bench-serve: {len(work.items)} prompts from {cfg.prompts}, {cfg.max_tokens} tokens each")
    if cfg.reference == "inprocess":
        t0 = time.monotonic()
        inprocess_reference(work, cfg)
        log(f"bench-serve: in-process reference in {time.monotonic() - t0:.0f}s: {work.inprocess}")
    levels: list[LevelResult] = []
    served: dict[str, dict] = {}
    if cfg.url:         # a running server: its sweep as it is (its index keeps what earlier levels added)
        levels += _sweep(cfg, work, cfg.url, cfg.label, cfg.concurrency, log)
        if ANCHOR in cfg.methods:
            for c in cfg.concurrency:
                levels += _anchor_level(cfg, work, c, served, log)
    else:
        for k, c in enumerate(cfg.concurrency):
            for method in (cfg.methods if k % 2 == 0 else tuple(reversed(cfg.methods))):
                if method == ANCHOR:
                    levels += _anchor_level(cfg, work, c, served, log)
                else:
                    levels += _served_level(cfg, work, method, c, served, log)
            if k == 0 and cfg.reference == "inprocess":    # the in-process speeds again, after the first level
                inprocess_reference(work, cfg)
                log(f"bench-serve: in-process speeds again: {work.inprocess}")
    compare_with_ar(levels)
    return make_report(cfg, work, levels, served)


def over_anchor(by: dict) -> dict:
    """Each gsd-serve method's tok/s over llama-server's, per concurrency: {method: {c: ratio}}."""
    anchor = by[ANCHOR]
    return {m: {c: round(lv["output_throughput"] / anchor[c]["output_throughput"], 3)
                for c, lv in res.items() if c in anchor and anchor[c]["output_throughput"] > 0}
            for m, res in by.items() if m != ANCHOR}


def make_report(cfg: BenchServeConfig, work: Workload, levels: list[LevelResult], served: dict) -> dict:
    by = {}
    for lv in levels:
        d = asdict(lv)
        d.pop("texts")
        by.setdefault(lv.method, {})[str(lv.concurrency)] = d
    inproc = work.inprocess
    checks = {}
    if "ar" in by and "gsd" in by:
        ratios = {c: round(by["gsd"][c]["output_throughput"] / by["ar"][c]["output_throughput"], 3)
                  for c in by["gsd"] if c in by["ar"] and by["ar"][c]["output_throughput"] > 0}
        checks["gsd_over_ar"] = ratios
        checks["gsd_never_slower"] = all(r >= 1.0 for r in ratios.values())
        checks["gsd_over_ar_at_1"] = ratios.get("1")
    for m in ("ar", "gsd"):
        if m in by and "1" in by[m] and inproc.get(m):
            checks[f"served_{m}_c1_over_inprocess_{m}"] = round(
                by[m]["1"]["output_throughput"] / inproc[m]["tokens_per_s"], 3)
    if ANCHOR in by:
        checks["over_llama_server"] = over_anchor(by)
    checks["failed_requests"] = sum(lv.failed for lv in levels)
    # llama-server computes with its own arithmetic (Q4_1 times 8-bit activations): its identity is reported
    # in its rows, never required
    checks["all_identical_to_reference"] = all(
        lv.identical_to_reference == lv.completed for lv in levels
        if lv.method != ANCHOR) if cfg.reference == "inprocess" else None
    return {
        "command": "gsd-serve " + " ".join(sys.argv[1:]) if "bench-serve" in sys.argv[1:2] else "gsd-serve bench-serve",
        "cpu": cpu_description(), "cores": os.cpu_count(), "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "dtype": cfg.dtype if cfg.dtype != "auto" else f"auto ({inproc.get('dtype', 'see server')})",
        "prompts": cfg.prompts, "n_prompts": len(work.items), "max_tokens": cfg.max_tokens,
        "concurrency": list(cfg.concurrency), "methods": list(by), "min_rounds": cfg.min_rounds,
        "url": cfg.url, "served": served, "inprocess": inproc, "results": by, "checks": checks,
    }


# ---------------------------------------------------------------- output

def write_report(report: dict, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(report), encoding="utf-8")
    write_manifest(out, report.get("load"), experiment="bench-serve", methods=list(report["results"]))
    try:
        plot(report, out / "tokens_per_s.png")
    except Exception as exc:  # noqa: BLE001 (a missing matplotlib costs the plot, not the results)
        print(f"bench-serve: no plot ({exc})", file=sys.stderr)


def markdown(report: dict) -> str:
    res = report["results"]
    methods = list(res)
    levels = sorted({int(c) for m in res.values() for c in m})
    lines = ["# Serving benchmark", "",
             f"`{report['command']}`", "",
             f"CPU: {report['cpu']} ({report['cores']} cores); dtype {report['dtype']}; {report['n_prompts']} prompts "
             f"from {Path(report['prompts']).name}, {report['max_tokens']} new tokens, greedy; commit "
             f"{report.get('commit')}, {report['date']}.", ""]
    if report.get("inprocess"):
        ip = report["inprocess"]
        lines += ["In process, same prompts, one after another (before and after the first level): " + ", ".join(
            f"{m} {v['tokens_per_s']} tok/s" + (f" ({' and '.join(map(str, v['runs']))})" if len(v.get("runs", [])) > 1
                                               else "") for m, v in ip.items() if isinstance(v, dict)) + ".", ""]
    head = "| concurrency | " + " | ".join(f"{m} tok/s" for m in methods)
    if "ar" in res and len(methods) > 1:
        head += " | " + " | ".join(f"{m} / ar" for m in methods if m != "ar")
    head += " |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for c in levels:
        row = [str(c)] + [str(res[m].get(str(c), {}).get("output_throughput", "-")) for m in methods]
        if "ar" in res and len(methods) > 1:
            ar = res["ar"].get(str(c), {}).get("output_throughput")
            for m in methods:
                if m == "ar":
                    continue
                v = res[m].get(str(c), {}).get("output_throughput")
                row.append(f"{v / ar:.2f}x" if v and ar else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| method | concurrency | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | TPOT p50 ms | "
                  "failed | identical to in-process | identical to served ar | mean acceptance | plain rounds | "
                  "load before -> after |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        for c in levels:
            d = res[m].get(str(c))
            if not d:
                continue
            lines.append(f"| {m} | {c} | {d['output_throughput']} | {d['ttft_ms']['p50']} / {d['ttft_ms']['p99']} | "
                         f"{d['itl_ms']['p50']} / {d['itl_ms']['p99']} | {d['tpot_ms']['p50']} | {d['failed']} | "
                         f"{d['identical_to_reference']}/{d['completed']} | "
                         f"{'-' if d['identical_to_ar'] is None else str(d['identical_to_ar']) + '/' + str(d['completed'])} | "
                         f"{d['mean_accept_len']} | {d['plain_round_share']} | {d['load_before']} -> {d['load_after']} |")
    if report.get("checks"):
        lines += ["", "Checks: `" + json.dumps(report["checks"]) + "`"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, levels in report["results"].items():
        cs = sorted(int(c) for c in levels)
        ax.plot(cs, [levels[str(c)]["output_throughput"] for c in cs], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["concurrency"])
    ax.set_xticklabels([str(c) for c in report["concurrency"]])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"served throughput ({report['cpu'][:40]}, {report['dtype']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
