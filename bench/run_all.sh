#!/usr/bin/env bash
# The benchmark runs behind docs/benchmarks.md. Each writes a folder bench/results/DATE-CPU-EXPERIMENT/ with its
# figures and a manifest.json (commit, command, CPU, the load of other processes over the run): see the index in
# docs/benchmarks.md. In-process runs put the methods side by side in one process, in A-B-B-A order prompt by
# prompt, after a warm-up, and check every output against plain decoding (ar).
# LIMIT=0 runs every prompt of the shipped set; CPU=... overrides the CPU label of the folder names.
set -euo pipefail
cd "$(dirname "$0")/.."
GSD=${GSD:-.venv/bin/gsd-serve}
PY=${PY:-.venv/bin/python}
LIMIT=${LIMIT:-24}
DATE=$(date -u +%F)
# the CPU label of the folder names, from the one CPU record results use (tools/results.py: cpu_record)
CPU=${CPU:-$("$PY" - <<'EOF'
from gsd_serve.tools.results import cpu_record
r = cpu_record()
desc, family, model = r["cpu"], r["family"], r["model"] or 0
if "AMD" in desc:
    label = {23: "zen2" if model >= 0x30 else "zen1", 25: "zen4" if "avx512f" in desc else "zen3",
             26: "zen5"}.get(family, "amd")
elif "Intel" in desc:
    label = "xeon-amx" if "amx_tile" in desc else "xeon-avx512" if "avx512f" in desc else "intel"
else:
    label = "unknown"
print(label)
EOF
)}
out() { echo "bench/results/$DATE-$CPU-$1"; }

# In process, greedy: every method on the shipped prompts (per category: tau, decode tok/s, the planner's rounds).
"$GSD" bench --limit "$LIMIT" --max-new-tokens 128 --methods ar,chain,tree,gsd,gsd-full,hf-assisted --out "$(out bench-greedy)"
# Sampled: every method emits ar's tokens for the same seed.
"$GSD" bench --limit 6 --max-new-tokens 64 --temperatures 0,0.7,1.0 --methods ar,chain,tree,gsd,gsd-full \
  --out "$(out bench-sampled)"
# Against llama.cpp's plain decoding of the same GGUF (needs llama-cpp-python: docs/numeric-modes.md), with the
# dense fp32 reference beside it; twice (the spread is part of the result).
if "$PY" -c "import llama_cpp" 2>/dev/null; then
  for r in 1 2; do
    "$GSD" bench --limit 12 --max-new-tokens 128 --methods ar,gsd,ar-fp32,llama.cpp --out "$(out bench-llamacpp-run$r)"
  done
fi
# Served: concurrent OpenAI streams against `gsd-serve serve`, ar and gsd, 1-32 streams; with LLAMA_SERVER set
# (a llama-server binary: docs/benchmarks.md) also against llama.cpp's own server on the same GGUF and cores.
"$GSD" bench-serve --limit 12 --max-tokens 64 --methods ar,gsd --out "$(out bench-serve)"
# Served without Ray (router core, draft and target workers on loopback gRPC) against in process.
"$PY" bench/served_check.py --limit 12 --max-tokens 64 --out "$(out served-check)"
# The ceiling on this CPU: speculation with a draft that is always right and free, against plain decoding.
oracle=$(out oracle-ceiling)
cmd="python bench/oracle_ceiling.py --limit 12 --max-new-tokens 128 --ks 1,2,3,4,6,8,12 --repeats 3 --out $oracle"
"$PY" bench/oracle_ceiling.py --limit 12 --max-new-tokens 128 --ks 1,2,3,4,6,8,12 --repeats 3 --out "$oracle"
"$PY" -c 'import sys; from gsd_serve.tools.results import write_manifest
write_manifest(sys.argv[1], None, command=sys.argv[2], experiment="oracle-ceiling")' "$oracle" "$cmd"
