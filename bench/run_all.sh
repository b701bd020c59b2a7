#!/usr/bin/env bash
# The benchmark runs behind the README's tables. Each runs the methods side by side in one process,
# interleaved prompt by prompt, after a warm-up, and checks every output against plain decoding (ar).
# All 72 prompts: LIMIT=0 (about 45 min for greedy on the 2-core dev CPU; the default 24 takes ~15 min).
set -euo pipefail
cd "$(dirname "$0")/.."
GSD=${GSD:-.venv/bin/gsd-serve}
LIMIT=${LIMIT:-24}
"$GSD" bench --limit "$LIMIT" --max-new-tokens 128 --methods ar,chain,tree,gsd,hf-assisted --out bench/results/greedy
"$GSD" bench --limit 6 --max-new-tokens 64 --temperatures 0,0.7,1.0 --methods ar,chain,tree,gsd,gsd-full \
  --out bench/results/sampled
# Against llama.cpp's plain decoding of the same GGUF (needs llama-cpp-python: see README "Against llama.cpp"),
# in the CPU's auto dtype and in fp32, each twice (the spread is part of the result).
if .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  for r in 1 2; do for d in bfloat16 float32; do
    "$GSD" bench --limit 12 --max-new-tokens 128 --methods ar,gsd,llama.cpp --dtype "$d" --out "bench/results/llamacpp-$d-run$r"
  done; done
fi
# Served: concurrent OpenAI streams against `gsd-serve serve`, ar and gsd, 1-32 streams.
"$GSD" bench-serve --limit 12 --max-tokens 64 --methods ar,gsd --out bench/results/serve
# The ceiling on this CPU: speculation with a draft that is always right and free, against plain decoding.
.venv/bin/python bench/oracle_ceiling.py --limit 12 --max-new-tokens 128 --ks 1,2,3,4,6,8,12 --repeats 3 \
  --out bench/results/oracle-ceiling
