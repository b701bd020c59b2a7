"""How good and how cheap is a draft? Agreement with the target, acceptance lengths, forward cost.

    python bench/draft_quality.py [--draft DIR] [--limit N] [--max-new-tokens N] [--history FILE] --out DIR

Greedy, default settings, on the project's bench prompt set. Writes quality.json, quality.md and (with
--history, a distill run's history.json) the learning curve as learning_curve.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gsd_serve.core.config import SpecConfig  # noqa: E402
from gsd_serve.core.prompts import BENCH_PROMPTS, encode, load_prompts, spread  # noqa: E402
from gsd_serve.models import load_engine  # noqa: E402


def forward_ms(runner, reps: int = 40) -> float:
    """Median time of one forward: batch 1, one new token, after a 200-token cache."""
    cache = runner.new_cache()
    extra = {}
    if getattr(runner, "needs_features", False):
        extra = {"features": torch.zeros(1, runner.feature_width)}
        runner.forward(cache, torch.randint(100, 20000, (200,)), last_only=True,
                       features=torch.zeros(200, runner.feature_width))
    else:
        runner.forward(cache, torch.randint(100, 20000, (200,)), last_only=True)
    times = []
    for _ in range(reps):
        x = torch.randint(100, 20000, (1,))
        t = time.perf_counter()
        runner.forward(cache, x, **extra)
        times.append(time.perf_counter() - t)
        cache.truncate(200)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--draft", default="default")
    ap.add_argument("--prompts", default=str(BENCH_PROMPTS))
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--history", help="history.json of the distill run, for the learning curve")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    engine, tok = load_engine(args.target, args.draft, dtype="float32", compile="off")
    features = getattr(engine.draft, "needs_features", False)
    output_ids = engine.draft.output_ids
    records = spread(load_prompts(args.prompts), args.limit)
    by_cat: dict[str, list[int]] = {}
    chain = SpecConfig.for_method("chain", max_depth=4)
    gsd = SpecConfig.for_method("gsd", budget=32)
    top1 = top4 = positions = 0
    sums = {"chain_depth4": [0, 0], "gsd_budget32": [0, 0], "gsd_default": [0, 0]}
    for i, rec in enumerate(records):
        ids = encode(tok, rec)
        ref = engine.generate(ids, args.max_new_tokens, SpecConfig.for_method("ar")).token_ids
        seq = torch.tensor(ids + ref)
        with torch.inference_mode():
            if features:   # teacher forcing: each token with the target's features of the position before it
                _, feats = engine.target.forward_features(engine.target.new_cache(), seq,
                                                          layers=engine.draft.feature_layers)
                prev = torch.cat([torch.zeros_like(feats[:1]), feats[:-1]])
                logits = engine.draft.forward(engine.draft.new_cache(), seq, features=prev)
            else:
                logits = engine.draft.forward(engine.draft.new_cache(), seq)
            logits = logits[len(ids) - 1: len(ids) - 1 + len(ref)]
        cand = engine.draft.to_full_ids(torch.topk(logits, 4, dim=-1).indices)
        truth = torch.tensor(ref)
        top1 += int((cand[:, 0] == truth).sum())
        top4 += int((cand == truth[:, None]).any(-1).sum())
        positions += len(ref)
        for name, spec in (("chain_depth4", chain), ("gsd_budget32", gsd), ("gsd_default", engine.spec)):
            r = engine.generate(ids, args.max_new_tokens, spec)
            assert r.token_ids == ref, f"{name} differs from ar on {rec.get('id', i)}"
            sums[name][0] += r.stats.new_tokens
            sums[name][1] += r.stats.target_forwards
            if name == "gsd_default":
                cat = by_cat.setdefault(rec.get("category", "all"), [0, 0])
                cat[0] += r.stats.new_tokens
                cat[1] += r.stats.target_forwards
        print(f"\r  {i + 1}/{len(records)} top1 {top1 / positions:.3f}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    t_ms = forward_ms(engine.target, 20)
    d_ms = forward_ms(engine.draft)
    result = {
        "prompts": len(records), "max_new_tokens": args.max_new_tokens, "positions": positions,
        "top1_agreement": top1 / positions, "top4_agreement": top4 / positions,
        "mean_accept_len": {k: v[0] / v[1] for k, v in sums.items()},
        "gsd_default_accept_len_by_category": {c: v[0] / v[1] for c, v in sorted(by_cat.items())},
        "gsd_default_spec": engine.spec.to_dict(), "draft": args.draft,
        "draft_kind": "features" if features else "independent",
        "target_forward_ms": t_ms, "draft_forward_ms": d_ms, "draft_cost_ratio": d_ms / t_ms,
        "draft_layers": 1 if features else engine.draft.model.config.num_hidden_layers,
        "draft_output_vocab": None if output_ids is None else int(output_ids.numel()),
    }
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    md = ["| measure | value | goal |", "|---|---|---|",
          f"| top-1 agreement with the target (greedy continuations) | {result['top1_agreement']:.1%} | >= 60% |",
          f"| top-4 agreement | {result['top4_agreement']:.1%} | |",
          f"| chain (k=1, depth 4) mean acceptance length | {result['mean_accept_len']['chain_depth4']:.2f} | >= 2.2 |",
          f"| gsd (budget 32) mean acceptance length | {result['mean_accept_len']['gsd_budget32']:.2f} | >= 3.0 |",
          f"| gsd (default settings) mean acceptance length | {result['mean_accept_len']['gsd_default']:.2f} | |",
          f"| one draft forward / one target forward | {d_ms:.1f} ms / {t_ms:.1f} ms = {d_ms / t_ms:.3f} | <= 0.125 |"]
    md += ["", "gsd (default settings) mean acceptance length by category:", "",
           "| " + " | ".join(by_cat) + " |", "|" + "---|" * len(by_cat),
           "| " + " | ".join(f"{v[0] / v[1]:.2f}" for v in by_cat.values()) + " |"]
    (out / "quality.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if args.history:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hist = json.loads(Path(args.history).read_text())
        fig, ax = plt.subplots(figsize=(6, 4))
        trained = [h for h in hist if h["train_top1"] is not None]
        ax.plot([h["tokens"] / 1e6 for h in trained], [h["train_top1"] for h in trained], label="training batches")
        ax.plot([h["tokens"] / 1e6 for h in hist], [h["heldout_top1"] for h in hist], label="held-out answers")
        ax.set_xlabel("distilled positions seen (millions)")
        ax.set_ylabel("top-1 agreement with the target")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "learning_curve.png", dpi=110)


if __name__ == "__main__":
    main()
