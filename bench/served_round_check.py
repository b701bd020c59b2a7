"""Where a served round's time goes, without Ray: the draft and target workers in their own processes on
loopback gRPC (as the replicas run them), the router's core in this process, one stream.

For each method it decodes the same prompts three ways and times each round's calls:
    in process     the engine (what `gsd-serve generate` does)
    over gRPC      RouterCore -> Draft.Propose / Target.Verify in worker processes
and reports, per round: the Verify call's time against the forward time the target measured inside it,
the Propose call's time, and the time outside those calls (the router's decode loop, and each request's
Prefill). The difference between this and the full stack (`gsd-serve bench-serve`) is Ray Serve's proxy,
the router replica and HTTP streaming. `--load-policy auto` runs the router's load policy (default off:
every gsd round speculates); `--target-env` / `--draft-env` set a worker's environment (OpenMP settings).

    python bench/served_round_check.py --limit 6 --max-tokens 64 --out bench/results/served-round
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path



def worker_main(kind: str, threads: int, args: dict, ready, env: dict) -> None:
    """A worker process: the model on its model thread, served over gRPC until killed."""
    os.environ.update(env)     # before torch loads (OpenMP reads its settings once)
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
        return TargetWorker(model, replica_id="t1")

    worker = MODEL_THREAD.run(build)
    _, port = serve_grpc(worker)
    ready.put(port)
    while True:
        time.sleep(3600)


def start_worker(kind: str, threads: int, args: dict, env: dict):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=worker_main, args=(kind, threads, args, q, env), daemon=True)
    p.start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            return p, q.get(timeout=1)
        except Exception:  # noqa: BLE001 (queue.Empty)
            if not p.is_alive():
                raise RuntimeError(f"the {kind} worker process died (exit {p.exitcode})")
    raise RuntimeError(f"the {kind} worker did not start")


def mean(xs):
    return round(statistics.fmean(xs) * 1000, 3) if xs else None


async def served(core, prompts, max_tokens, concurrency=1):
    """Decode each prompt through the router core, `concurrency` requests at a time; per-round call timings and
    the load policy's decisions (reason, budget) -> rounds."""
    from gsd_serve.core.sampling import SamplingParams
    from gsd_serve.serving.router import GenerateParams

    from gsd_serve.serving.load_policy import LoadPolicy

    calls = {"propose": [], "verify": [], "verify_forward": [], "verify_call": []}
    orig_obs = LoadPolicy.observe_verify

    def observe_verify(self, rows, sessions, forward_s, call_s):
        calls["verify_forward"].append(forward_s)
        calls["verify_call"].append(call_s)
        return orig_obs(self, rows, sessions, forward_s, call_s)

    LoadPolicy.observe_verify = observe_verify
    orig_p, orig_v = core.propose, core.verify

    async def propose(run, depth):
        t = time.perf_counter()
        r = await orig_p(run, depth)
        calls["propose"].append(time.perf_counter() - t)
        return r

    async def verify(run, graph, budget=None):
        t = time.perf_counter()
        r = await orig_v(run, graph, budget)
        calls["verify"].append(time.perf_counter() - t)
        return r

    decisions: dict = {}
    orig_decide = LoadPolicy.decide

    def decide(self, sessions_here=1, session=None):
        d = orig_decide(self, sessions_here, session)
        key = f"{d.reason}:{d.budget}@{sessions_here}"    # @ the router's sessions on the replica then
        decisions[key] = decisions.get(key, 0) + 1
        return d

    LoadPolicy.decide = decide
    core.propose, core.verify = propose, verify
    outs = [None] * len(prompts)
    queue = list(range(len(prompts)))

    async def client():
        while queue:
            i = queue.pop(0)
            run = core.start(GenerateParams(list(prompts[i]), max_tokens, SamplingParams()))
            out = []
            async for chunk in run.chunks():
                out.extend(chunk)
            outs[i] = out

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    tokens = sum(len(o) for o in outs)
    core.propose, core.verify = orig_p, orig_v
    LoadPolicy.observe_verify, LoadPolicy.decide = orig_obs, orig_decide
    calls["decisions"] = decisions
    return outs, tokens, seconds, calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--methods", default="ar,gsd")
    ap.add_argument("--target-threads", type=int, default=os.cpu_count())
    ap.add_argument("--draft-threads", type=int, default=1)
    ap.add_argument("--target-env", default="", help="VAR=VALUE,... for the target worker process")
    ap.add_argument("--draft-env", default="", help="VAR=VALUE,... for the draft worker process")
    ap.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (default 1)")
    ap.add_argument("--load-policy", default="off", help="the router's load policy: off (default), auto, or JSON of LoadPolicyConfig fields")
    ap.add_argument("--draft", default="default", help="the draft both sides load (default, default-features, a path)")
    ap.add_argument("--profile", action="store_true", help="cProfile the router side (top functions)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from gsd_serve.core.config import SpecConfig
    from gsd_serve.core.prompts import encode
    from gsd_serve.models import load_engine
    from gsd_serve.models.hardware import cpu_description
    from gsd_serve.tools.bench_serve import BenchServeConfig, load_workload
    from gsd_serve.serving.router import RouterConfig, RouterCore

    work = load_workload(BenchServeConfig(limit=a.limit))     # bench-serve's prompts, same selection
    engine, tok = load_engine(draft_spec=a.draft)
    from gsd_serve.services.router import draft_feature_layers

    layers = draft_feature_layers(a.draft)      # a feature draft: the router asks the target for these
    prompts = [encode(tok, {"messages": it.messages}) for it in work.items]
    methods = a.methods.split(",")
    report = {"command": "python bench/served_round_check.py " + " ".join(argv or sys.argv[1:]),
              "cpu": cpu_description(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "cores": os.cpu_count(), "methods": {}}
    engine.generate(prompts[0], 8, spec=SpecConfig.for_method("gsd"))
    ref = {}
    for m in methods:
        spec = SpecConfig.for_method(m)
        t0, n = time.perf_counter(), 0
        for i, p in enumerate(prompts):
            r = engine.generate(p, a.max_tokens, spec=spec)
            n += len(r.token_ids)
            ref.setdefault(i, r.token_ids)
        report["methods"][m] = {"inprocess_tok_s": round(n / (time.perf_counter() - t0), 2)}
    del engine

    def env(text):
        return dict(kv.split("=", 1) for kv in text.split(",") if kv)

    dp, dport = start_worker("draft", a.draft_threads, {"draft": a.draft}, env(a.draft_env))
    tp, tport = start_worker("target", a.target_threads, {}, env(a.target_env))

    async def discover():
        return [("draft", "d1", f"127.0.0.1:{dport}"), ("target", "t1", f"127.0.0.1:{tport}")]

    policy = json.loads(a.load_policy) if a.load_policy.startswith("{") else a.load_policy

    async def go():
        for m in methods:
            core = RouterCore(RouterConfig(spec=SpecConfig.for_method(m), load_policy=policy,
                                           feature_layers=layers if m != "ar" else ()), discover,
                              tokenizer=tok)
            await served(core, prompts[:1], 16)      # warm-up: channels, sessions, first forwards
            if a.profile:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.enable()
            outs, n, s, calls = await served(core, prompts, a.max_tokens, a.concurrency)
            drafted = len(calls["propose"])
            if a.profile:
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            rounds = len(calls["verify"])
            r = report["methods"][m]
            r.update(served_tok_s=round(n / s, 2), identical=sum(o == ref[i] for i, o in enumerate(outs)),
                     prompts=len(outs), concurrency=a.concurrency, rounds=rounds,
                     policy_decisions=calls["decisions"], drafted_rounds=drafted,
                     round_ms=round(s / max(rounds, 1) * 1000, 3),
                     verify_ms=mean(calls["verify"]), verify_rpc_ms=mean(calls["verify_call"]),
                     target_forward_ms=mean(calls["verify_forward"]), propose_call_ms=mean(calls["propose"]),
                     outside_calls_ms=round((s - sum(calls["verify"]) - sum(calls["propose"]))
                                            / max(rounds, 1) * 1000, 3))
            r["served_over_inprocess"] = round(r["served_tok_s"] / r["inprocess_tok_s"], 3)
            if a.concurrency > 1:     # rounds overlap: per-round wall times do not add up
                r.pop("round_ms"), r.pop("outside_calls_ms")
            r["policy"] = core.policy_snapshot()
            sizes = list(core.batch_sizes)
            r["verify_batch_sizes"] = {str(k): sizes.count(k) for k in sorted(set(sizes))}
            print(m, json.dumps(r), flush=True)
            await core.close()

    asyncio.run(go())
    dp.kill(), tp.kill()
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "results.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
