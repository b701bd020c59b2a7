"""The most any draft could give on this machine: speculation with an oracle proposer, against plain decoding.

The oracle proposes, every round, the next k tokens of the target's own greedy answer (recorded by a plain
run first) as a chain, so every proposal is accepted: k+1 tokens per target forward, and drafting costs
nothing. Each round runs the real decode loop and the real verifier (the full chain verified, no tree sizing)
on the target the engine loads by default (the same weights and kernels as `gsd-serve generate`). Plain
decoding and the oracle at every k run in the same process, interleaved, on the same prompts, `--repeats`
times, so the ratio is paired. No real draft can beat the oracle at the same k: it pays for its own forwards
and is sometimes wrong. This is the ceiling of "gsd / ar in process" on this CPU for fp32-exact verification.

    python bench/oracle_ceiling.py --limit 12 --max-new-tokens 128 --ks 1,2,3,4,6,8 --out bench/results/DATE-CPU-oracle-ceiling
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from gsd_serve.core.config import SpecConfig
from gsd_serve.core.decode import Chunk, Prefill, Propose, Sequence, Step, Verify, decode
from gsd_serve.core.drafting import add_proposal
from gsd_serve.core.graph import TokenGraph
from gsd_serve.core.prompts import encode, load_prompts
from gsd_serve.core.sampling import SamplingParams, TokenChooser
from gsd_serve.core.verification import TargetSession
from gsd_serve.models.hardware import cpu_description
from gsd_serve.models.factory import load_engine


def run_one(engine, prompt: list[int], max_new: int, k: int, answer: list[int] | None):
    """One generation through decode(): plain (k=0) or with the oracle chain of `k` tokens of `answer`.

    Answers the loop's requests itself, as Engine._run does, because the Engine always drafts with a
    DraftSession; plain decoding goes through this same driver so that both sides pay the same loop."""
    chooser = TokenChooser(SamplingParams(), engine.target.vocab_size)
    target = TargetSession(engine.target)
    seq = Sequence(prompt, max_new, engine.stop_token_ids)
    spec = SpecConfig.for_method("ar" if k == 0 else "gsd", budget=max(k + 1, 2), planner=False)
    loop = decode(seq, spec)
    reply = None
    with torch.inference_mode():
        while True:
            try:
                req = loop.send(reply)
            except StopIteration as done:
                return seq.output, done.value
            reply = None
            if isinstance(req, Prefill):
                reply = target.prefill(seq.tokens, chooser)
            elif isinstance(req, Step):
                reply = target.step(seq.root, seq.root_index, chooser)
            elif isinstance(req, Propose):
                graph = TokenGraph(seq.root, 0, ())
                done_n = len(seq.output)
                add_proposal(graph, [-1], answer[done_n: done_n + min(k, req.max_depth)], prob=1.0)
                reply = graph if len(graph) > 1 else None
            elif isinstance(req, Verify):
                reply = target.verify(req.graph, spec.budget, seq.root_index, chooser)
            elif isinstance(req, Chunk):
                chooser.forget_before(seq.root_index)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default=str(Path(__file__).resolve().parents[1] / "gsd_serve/data/bench_prompts.jsonl"))
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--ks", default="1,2,3,4,6,8", help="oracle chain lengths (comma-separated)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="directory for results.json")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    engine, tokenizer = load_engine(draft_spec=None)
    prompts = [encode(tokenizer, rec) for rec in load_prompts(args.prompts)[: args.limit]]
    answers = [run_one(engine, p, args.max_new_tokens, 0, None)[0] for p in prompts]   # warm-up and the oracle
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for k in [0] + ks:
            tokens = forwards = 0
            t0 = time.perf_counter()
            for p, a in zip(prompts, answers):
                out, stats = run_one(engine, p, args.max_new_tokens, k, a)
                if out != a:
                    raise SystemExit(f"k={k}: the output differs from plain decoding (not batch-invariant?)")
                tokens += len(out)
                forwards += stats.target_forwards
            seconds = time.perf_counter() - t0
            name = "ar" if k == 0 else f"oracle-k{k}"
            runs.setdefault(name, []).append({"tokens_per_s": round(tokens / seconds, 1),
                                              "tokens_per_forward": round(tokens / forwards, 2)})
            print(f"repeat {rep} {name}: {tokens / seconds:.1f} tok/s, {tokens / forwards:.2f} tokens per target "
                  "forward (prefill included), identical to ar", flush=True)
    ar = [r["tokens_per_s"] for r in runs["ar"]]
    summary = {}
    for name, rs in runs.items():
        ratios = [r["tokens_per_s"] / a for r, a in zip(rs, ar)]   # paired: same repeat
        summary[name] = {"tokens_per_s": [r["tokens_per_s"] for r in rs],
                         "tokens_per_forward": rs[0]["tokens_per_forward"],
                         "over_ar": [round(x, 3) for x in ratios], "over_ar_median": round(statistics.median(ratios), 3)}
    best = max((n for n in summary if n != "ar"), key=lambda n: summary[n]["over_ar_median"])
    report = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "target_weights": getattr(engine.target, "weights", "?"),
              "dtype": engine.dtype_name, "prompts": args.prompts, "limit": args.limit,
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "runs": summary,
              "best": {"k": best, **summary[best]}}
    print(json.dumps(report["best"]))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
