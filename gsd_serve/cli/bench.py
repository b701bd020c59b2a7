"""`gsd-serve bench`: methods side by side in one process (tools/bench.py runs them).

Every method runs on the same prompts, interleaved prompt by prompt, after a warm-up; each output is checked
against plain decoding; results.json, results.md and PNG plots go to --out.
"""
from __future__ import annotations

from .args import add_model_args, add_spec_args, build_engine, spec_from_args


def cmd_bench(args) -> int:
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    from ..tools.bench import run_bench

    run_bench(args, build_engine, spec_from_args)
    return 0


def register(sub) -> None:
    from ..tools.bench import ALL_METHODS

    b = sub.add_parser("bench", help="benchmark methods side by side on a prompt set",
                       description="Run methods on the same prompts in one process, interleaved, after a warm-up; "
                                   "check outputs against ar; write results.json, results.md and plots.")
    b.add_argument("--prompts", help="JSONL prompt file (default: the shipped 100-prompt set: 6 Spec-Bench-style categories, code editing, long documents (summaries, RAG) and repeated requests)")
    b.add_argument("--methods", default="ar,chain,tree,gsd,hf-assisted",
                   help=f"comma-separated, from {','.join(ALL_METHODS)}")
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--limit", type=int, default=0, help="use N prompts spread over the categories (0 = all)")
    b.add_argument("--temperatures", default="0", help="comma-separated, e.g. 0,0.7,1.0 (0 = greedy)")
    b.add_argument("--top-p", type=float, default=1.0)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="also run the methods with the target as N tensor-parallel ranks (reported as METHOD@tpN)")
    add_model_args(b)
    add_spec_args(b)
    b.set_defaults(func=cmd_bench)
