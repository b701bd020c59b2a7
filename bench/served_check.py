"""Served against in-process speed, without Ray: the draft and target workers in their own processes on
loopback gRPC (as the replicas run them), the router's core in this process, against the in-process engine
on the same prompts. Each prompt is decoded by every (method, path) pair in A-B-B-A order, so a machine that
drifts favours none of them; every served answer is checked against the in-process one.

What the difference measures: the router's relay of the Decode stream, the target replica's scheduler and the
gRPC hops. `gsd-serve bench-serve` adds Ray Serve's proxy, the router replica and HTTP streaming on top.

    python bench/served_check.py --limit 12 --max-tokens 64 --out DIR
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import time


def worker_main(kind: str, threads: int, args: dict, ready, drafts: list) -> None:
    """A worker process: the model on its model thread, served over gRPC until killed."""
    from gsd_serve.serving.threads import MODEL_THREAD, apply_threads

    apply_threads(threads)
    MODEL_THREAD.run(apply_threads, threads)
    from gsd_serve.services.common import load_models
    from gsd_serve.serving.grpc_server import serve_grpc

    def build():
        if kind == "draft":
            from gsd_serve.serving.draft_worker import DraftWorker

            model, ids = load_models(args, "draft")
            return DraftWorker(model, ids, replica_id="d1")
        from gsd_serve.serving.target_worker import TargetWorker

        model, _ = load_models(args, "target")
        return TargetWorker(model, replica_id="t1", drafts=(lambda: drafts) if drafts else None)

    worker = MODEL_THREAD.run(build)
    _, port = serve_grpc(worker)
    ready.put(port)
    while True:
        time.sleep(3600)


def start_worker(kind: str, threads: int, args: dict, drafts: list | None = None):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=worker_main, args=(kind, threads, args, q, drafts or []), daemon=True)
    p.start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            return p, q.get(timeout=1)
        except Exception:  # noqa: BLE001 (queue.Empty)
            if not p.is_alive():
                raise RuntimeError(f"the {kind} worker process died (exit {p.exitcode})")
    raise RuntimeError(f"the {kind} worker did not start")


async def served_one(core, ids, max_tokens) -> tuple[list[int], float, object]:
    from gsd_serve.core.sampling import SamplingParams
    from gsd_serve.serving.router import GenerateParams

    t0 = time.perf_counter()
    run = core.start(GenerateParams(list(ids), max_tokens, SamplingParams()))
    out = []
    async for chunk in run.chunks():
        out.extend(chunk)
    return out, time.perf_counter() - t0, run.stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--methods", default="ar,gsd")
    ap.add_argument("--prompts", default=None, help="a prompts file (default: bench-serve's held-out prompts)")
    ap.add_argument("--target-threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from gsd_serve.core.config import SpecConfig
    from gsd_serve.core.engine import Engine
    from gsd_serve.core.prompts import encode, load_prompts, spread
    from gsd_serve.models import load_engine
    from gsd_serve.serving.router import RouterConfig, RouterCore
    from gsd_serve.tools.bench_serve import DEFAULT_PROMPTS
    from gsd_serve.tools.results import LoadMeter, write_manifest

    records = spread(load_prompts(a.prompts or DEFAULT_PROMPTS), a.limit)
    base, tok = load_engine()
    prompts = [encode(tok, r) for r in records]
    methods = a.methods.split(",")
    # one engine per method, as a user running that method alone would have (its own planner and index)
    engines = {m: Engine(base.target, base.draft, stop_token_ids=base.stop_token_ids) for m in methods}
    dp, dport = start_worker("draft", 1, {})
    tp, tport = start_worker("target", a.target_threads, {}, [("d1", f"127.0.0.1:{dport}")])

    async def discover():
        return [("draft", "d1", f"127.0.0.1:{dport}"), ("target", "t1", f"127.0.0.1:{tport}")]

    results = {m: {"inprocess": [0, 0.0], "served": [0, 0.0], "identical": 0, "stats": []} for m in methods}
    load = LoadMeter().start()

    async def go():
        cores = {m: RouterCore(RouterConfig(spec=SpecConfig.for_method(m)), discover, tokenizer=tok) for m in methods}
        for m in methods:        # warm-up: channels, the worker's first forwards, the engines' cost tables
            await served_one(cores[m], prompts[0], 8)
            engines[m].generate(prompts[0], 8, spec=SpecConfig.for_method(m))
            engines[m].forget_requests()
        pairs = [(m, path) for m in methods for path in ("inprocess", "served")]
        for i, ids in enumerate(prompts):
            order = pairs if i % 2 == 0 else list(reversed(pairs))
            outs = {}
            for m, path in order:
                if path == "served":
                    out, secs, _ = await served_one(cores[m], ids, a.max_tokens)
                else:
                    t0 = time.perf_counter()
                    out = engines[m].generate(ids, a.max_tokens, spec=SpecConfig.for_method(m)).token_ids
                    secs = time.perf_counter() - t0
                outs[(m, path)] = out
                r = results[m][path]
                r[0] += len(out)
                r[1] += secs
            for m in methods:
                results[m]["identical"] += outs[(m, "served")] == outs[(m, "inprocess")]
            print(f"  [{i + 1}/{len(prompts)}]", file=sys.stderr, flush=True)
        for core in cores.values():
            await core.close()

    asyncio.run(go())
    dp.kill(), tp.kill()
    report = {"prompts": len(prompts), "max_tokens": a.max_tokens, "methods": {}}
    for m, r in results.items():
        ip = r["inprocess"][0] / r["inprocess"][1]
        sv = r["served"][0] / r["served"][1]
        report["methods"][m] = {"inprocess_tok_s": round(ip, 2), "served_tok_s": round(sv, 2),
                                "served_over_inprocess": round(sv / ip, 3),
                                "identical": f"{r['identical']}/{len(prompts)}"}
    print(json.dumps(report, indent=1))
    if a.out:
        from pathlib import Path

        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "results.json").write_text(json.dumps(report, indent=1) + "\n")
        write_manifest(a.out, load.stop(), experiment="served-check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
