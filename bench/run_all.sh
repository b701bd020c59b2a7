#!/usr/bin/env bash
# The benchmark runs behind the README's tables. Each runs the methods side by side in one process,
# interleaved prompt by prompt, after a warm-up, and checks every output against plain decoding (ar).
# Full set: drop --limit (72 prompts; about 1.5 h on a 2-core CPU for greedy).
set -euo pipefail
cd "$(dirname "$0")/.."
GSD=${GSD:-.venv/bin/gsd-serve}
LIMIT=${LIMIT:-12}
"$GSD" bench --limit "$LIMIT" --max-new-tokens 128 --methods ar,chain,tree,gsd,hf-assisted --out bench/results/greedy
"$GSD" bench --limit "$((LIMIT / 2))" --max-new-tokens 64 --temperatures 0.7,1.0 --methods ar,chain,tree,gsd \
  --out bench/results/sampled
