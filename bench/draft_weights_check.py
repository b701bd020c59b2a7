"""The draft on dense weights against the draft on Q8_0 blocks (--draft-weights q8), with the same target (the
run's --target-weights, default auto), in one process, interleaved prompt by prompt: outputs (must be identical),
tokens per target forward, draft seconds, tokens/s. Prints one JSON line.

    python bench/draft_weights_check.py [N_PROMPTS] [MAX_NEW_TOKENS] >> bench/results/DATE-CPU-draft-q8/draft-q8.jsonl
"""
import json
import sys

import torch

from gsd_serve.core.config import SpecConfig
from gsd_serve.core.engine import Engine
from gsd_serve.core.prompts import BENCH_PROMPTS, encode, load_prompts, spread
from gsd_serve.models import ModelRunner, load_default_pair, load_engine
from gsd_serve.models.hardware import cpu_description
from gsd_serve.models.factory import apply_draft_weights


def main() -> None:
    n, max_new = (int(sys.argv[1]) if len(sys.argv) > 1 else 12), (int(sys.argv[2]) if len(sys.argv) > 2 else 96)
    dense, tokenizer = load_engine(draft_weights="dense")
    _, draft, _ = load_default_pair(torch.float32)
    q8 = Engine(dense.target, ModelRunner(apply_draft_weights(draft, "q8"), dense.draft.output_ids),
                stop_token_ids=dense.stop_token_ids)
    spec = SpecConfig.for_method("gsd")
    records = spread(load_prompts(BENCH_PROMPTS), n)
    dense.generate(encode(tokenizer, records[0]), 8, spec)
    q8.generate(encode(tokenizer, records[0]), 8, spec)
    totals = {name: {"tokens": 0, "seconds": 0.0, "draft_seconds": 0.0, "target_forwards": 0}
              for name in ("dense", "q8")}
    identical = 0
    for rec in records:
        ids = encode(tokenizer, rec)
        outs = {}
        for name, engine in (("dense", dense), ("q8", q8)):
            res = engine.generate(ids, max_new, spec)
            s, t = res.stats, totals[name]
            outs[name] = res.token_ids
            t["tokens"] += s.new_tokens
            t["seconds"] += s.seconds
            t["draft_seconds"] += s.draft_seconds
            t["target_forwards"] += s.target_forwards
        identical += outs["dense"] == outs["q8"]
    report = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "prompts": n, "max_new_tokens": max_new,
              "target_weights": dense.target.weights, "identical_outputs": f"{identical}/{n}"}
    for name, t in totals.items():
        report[name] = {"tok_s": round(t["tokens"] / t["seconds"], 2), "draft_seconds": round(t["draft_seconds"], 2),
                        "tokens_per_target_forward": round(t["tokens"] / t["target_forwards"], 3)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
