"""`gsd-serve bench-serve`: the serving benchmark (vLLM benchmark_serving's metrics, closed-loop clients).

For each method (ar, gsd, ...) it starts `gsd-serve serve` with that configuration on this machine (or
uses --url), sweeps the concurrency levels (default 1, 2, 4, 8, 16, 32 concurrent OpenAI streams of chat
completions, greedy, over the held-out bench prompts), and reports output token throughput, TTFT, ITL,
TPOT and E2E latency (mean, p50, p99), failed requests, and whether every answer equals the in-process
engine's greedy answer (and served ar's). Writes results.json, results.md and tokens_per_s.png to --out.

With --llama-server PATH (or $LLAMA_SERVER) it also measures llama.cpp's own `llama-server` serving the default
target's GGUF on the same cores, prompts and client, reported as method llama-server (its answers are compared
but, computed by llama.cpp's own arithmetic, never fail the run). `--methods llama-server` measures it alone.
"""
from __future__ import annotations

import sys

from .args import CliError, positive_int


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CliError(f"--concurrency takes integers separated by commas, got '{text}'") from None
    if not levels or any(c < 1 for c in levels):
        raise CliError(f"--concurrency levels must be >= 1, got '{text}'")
    return levels


def cmd_bench_serve(args) -> int:
    import json

    from ..tools.llama_server import find_binary

    try:
        llama_server = find_binary(args.llama_server)      # before the heavy imports: a bad path answers at once
    except ValueError as exc:
        raise CliError(str(exc)) from None
    extra = {}
    if args.app_args:
        try:
            extra = json.loads(args.app_args)
        except ValueError as exc:
            raise CliError(f"--app-args must be a JSON object: {exc}") from None
        if not isinstance(extra, dict):
            raise CliError("--app-args must be a JSON object")
    from ..tools.bench_serve import BenchServeConfig, run_bench, write_report

    cfg = BenchServeConfig(
        prompts=args.prompts or BenchServeConfig.prompts, limit=args.limit, max_tokens=args.max_tokens,
        concurrency=_levels(args.concurrency), methods=tuple(m for m in args.methods.split(",") if m),
        min_rounds=args.min_rounds, url=args.url, label=args.label, api_key=args.api_key, model=args.model,
        dtype=args.dtype, draft_replicas=args.draft_replicas, target_replicas=args.target_replicas,
        config=args.config, reference="none" if args.no_reference else "inprocess", warmup=args.warmup,
        extra_args=extra, entries=tuple(e for e in (args.entry or "").split(",") if e), llama_server=llama_server)
    report = run_bench(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.out:
        write_report(report, args.out)
    from ..tools.bench_serve import markdown

    print(markdown(report))
    checks = report["checks"]
    return 0 if checks["failed_requests"] == 0 and checks.get("all_identical_to_reference") is not False else 1


def register(sub) -> None:
    p = sub.add_parser("bench-serve", help="serving benchmark: concurrent OpenAI streams, throughput/TTFT/ITL per "
                                           "method and concurrency", description=__doc__)
    p.add_argument("--methods", default="ar,gsd",
                   help="served configurations, comma-separated: ar, gsd (the planner decides each round, the default), "
                        "gsd-static (always the full tree), llama-server (the --llama-server anchor alone or in "
                        "this order) (default ar,gsd)")
    p.add_argument("--concurrency", default="1,2,4,8,16,32", help="concurrent streams per level (default 1,2,4,8,16,32)")
    p.add_argument("--prompts", help="a prompts file (default: the held-out gsd_serve/data/bench_prompts.jsonl)")
    p.add_argument("--limit", type=positive_int("--limit"), help="use N prompts, spread over the categories")
    p.add_argument("--max-tokens", type=positive_int("--max-tokens"), default=64, help="new tokens per answer (64)")
    p.add_argument("--min-rounds", type=positive_int("--min-rounds"), default=2,
                   help="each level sends max(prompts, min_rounds x concurrency) requests (2)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="both models' dtype, served and in process (default auto)")
    p.add_argument("--config", help="a Serve config file to start instead of this machine's default")
    p.add_argument("--app-args", help="JSON merged into the application's args of every method")
    p.add_argument("--draft-replicas", type=positive_int("--draft-replicas"), default=1)
    p.add_argument("--target-replicas", type=positive_int("--target-replicas"), default=1)
    p.add_argument("--entry", metavar="direct|proxy|direct,proxy",
                   help="how the clients reach the router: its replicas' own HTTP port (direct, the default where "
                        "the config has one) or Serve's HTTP proxy (proxy); both: measured one after the other on "
                        "the same server, the second reported as METHOD@ENTRY")
    p.add_argument("--url", help="benchmark a running server instead (one method, named by --label)")
    p.add_argument("--label", default="served", help="the method name of --url's results (default served)")
    p.add_argument("--model", default="gsd-smollm2-135m", help="the served model name")
    p.add_argument("--api-key", help="the server's API key")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the in-process reference run (answers and speed); identity to served ar remains")
    p.add_argument("--llama-server", metavar="PATH",
                   help="also measure llama.cpp's llama-server binary at PATH (default: $LLAMA_SERVER) serving the "
                        "default target's GGUF with the same prompts, client and cores, as method llama-server; "
                        "its answers are compared, never required (docs/benchmarks.md: how to build it)")
    p.add_argument("--warmup", type=int, default=2, help="requests per method before the sweep, not counted (2)")
    p.add_argument("--out", help="write results.json, results.md and tokens_per_s.png here (e.g. bench/results/DATE-CPU-bench-serve)")
    p.set_defaults(func=cmd_bench_serve)
