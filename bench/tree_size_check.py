"""Whether the draft's path probabilities stand in for acceptance, and what sizing trees by cost would give,
from recorded rounds of full trees (the check behind core.graph.best_tree_size). Greedy gsd with full trees
on prompts written for this check (bench/tree_size_prompts.jsonl, not the bench prompts); for every round it
records each verified node's path probability and the accepted path, then replays the rounds offline with
the target's measured forward times: a cut tree accepts the full tree's path up to its first missing node.

    python bench/tree_size_check.py --out bench/results/tree-size-study
"""
import argparse
import json
from pathlib import Path

import torch

from gsd_serve.core.config import SpecConfig
from gsd_serve.core.graph import best_tree_size
from gsd_serve.core.prompts import encode
from gsd_serve.core.verification import TargetSession
from gsd_serve.models.hardware import cpu_description
from gsd_serve.models.factory import load_engine


def record(engine, tokenizer, prompts, max_new_tokens: int, budget: int) -> tuple[list[dict], float]:
    """The rounds, and the mean seconds of a drafting round."""
    rounds, draft_s, drafted = [], 0.0, 0
    verify_tree = TargetSession.verify_tree

    def recording(self, tree, root_index, chooser):
        verdict = verify_tree(self, tree, root_index, chooser)
        rounds.append({"p": tree.path_probs, "path": verdict.tree_path})
        return verdict

    TargetSession.verify_tree = recording
    try:
        spec = SpecConfig.for_method("gsd", budget=budget, size_by_cost=False)
        for rec in prompts:
            stats = engine.generate(encode(tokenizer, rec), max_new_tokens, spec).stats
            draft_s += stats.draft_seconds
            drafted += stats.drafted_rounds
    finally:
        TargetSession.verify_tree = verify_tree
    return rounds, draft_s / max(drafted, 1)


def replay(rounds, size, forward_seconds, draft_seconds) -> dict:
    tokens, seconds, verified = 0, 0.0, 0
    for r in rounds:
        n = size(r["p"])
        accepted = 1
        for node in r["path"][1:]:
            if node >= n:
                break
            accepted += 1
        tokens += accepted
        verified += n
        seconds += forward_seconds(n) + draft_seconds
    return {"tokens_per_round": round(tokens / len(rounds), 3), "verified_per_round": round(verified / len(rounds), 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default=str(Path(__file__).parent / "tree_size_prompts.jsonl"))
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    engine, tokenizer = load_engine()
    prompts = [json.loads(line) for line in open(args.prompts) if line.strip()]
    rounds, draft_s = record(engine, tokenizer, prompts, args.max_new_tokens, args.budget)
    buckets = {}
    for r in rounds:
        for i, p in enumerate(r["p"][1:], 1):
            b = buckets.setdefault(min(int(p * 10), 9), [0, 0.0, 0])
            b[0] += 1
            b[1] += p
            b[2] += i in r["path"]
    calibration = [{"p_from": k / 10, "nodes": n, "mean_p": round(sp / n, 3), "accepted": round(hit / n, 3)}
                   for k, (n, sp, hit) in sorted(buckets.items())]
    costs = engine.target.forward_seconds
    out = {
        "cpu": cpu_description(), "threads": torch.get_num_threads(), "prompts": args.prompts,
        "rounds": len(rounds), "budget": args.budget, "draft_seconds_per_round": round(draft_s, 5),
        "forward_ms": {n: round(costs(n) * 1e3, 2) for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)},
        "calibration": calibration,
        "replay": {"ar": {"tokens_per_s": round(1 / costs(1), 1)},
                   "full trees": replay(rounds, len, costs, draft_s),
                   "sized by cost": replay(rounds, lambda p: best_tree_size(p, costs, draft_s), costs, draft_s)},
        "command": "python bench/tree_size_check.py --out " + args.out,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
