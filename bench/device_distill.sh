#!/usr/bin/env bash
# A feature draft's distillation sized for a lent GPU (under 8 minutes on an H100), after device_check.sh:
#
#   bash bench/device_distill.sh                      # CUDA: the target answers the training prompts, its
#                                                     # features, then training-time test from the shipped draft
#   bash bench/device_distill.sh --device cpu --tiny  # here: the same phases on 4 prompts, 2 steps (a test runs it)
#
# Brings the model as device_check.sh does (the staged pack; see bench/device_pack.sh). Works in
# $DISTILL_WORK (default /tmp/gsd-distill; every phase resumes there, so a rerun on the still-warm machine
# continues) and returns through $OUT (default ./device-out), each file under 16 MiB:
#   $OUT/feature_draft.tar    feature_draft/{config.json,model.safetensors,draft_vocab.json} (the draft, bf16:
#                             gsd-serve ... --draft DIR --draft-kind features) and history.json (held-out top-1)
#   $OUT/distill.json         the command, its seconds, target tokens, steps, held-out top-1 first and last
#   $OUT/distill.log          its output
# --cold starts from the target's last layer instead of the shipped feature draft. DATA_TOKENS (default 450000)
# and TRAIN_SECONDS (default 180) shrink the run to the device time that is left.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/device-out}
WORK=${DISTILL_WORK:-/tmp/gsd-distill}
STAGE=${GSD_DEVICE_STAGE:-/tmp/gsd-device}
PY=${PYTHON:-python3}
device=cuda tiny=0 cold=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device=$2; shift 2 ;;
        --tiny) tiny=1; shift ;;
        --cold) cold=1; shift ;;
        *) echo "device_distill: unknown argument $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT" "$WORK"

bash bench/device_check.sh --stage-only          # stage this run's pack part, join when all have come
if [ -d "$STAGE/site" ]; then
    export PYTHONPATH="$STAGE/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "$tiny" = 1 ]; then
    # the phases' code paths in seconds: 4 prompts of 8 tokens, 2 training steps (on a CPU, one thread: two
    # OpenMP threads stall each other on a shared 2-core machine)
    [ "$device" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    sizes=(--max-prompts 4 --max-new-tokens 8 --gen-batch 4 --steps 2 --batch 2 --ckpt-every 1 --dtype float32)
else
    # on an H100: ~2 x 1922 answers of up to 128 tokens (batches of 128; capped at 450k tokens, ~2 min), the
    # bf16 target's features (~20 s), then training on batches of 32 until 180 s have passed (checked every
    # 100 steps, each with a held-out measurement)
    sizes=(--gen-batch 128 --max-new-tokens 128 --sampled-passes 1 --tokens "${DATA_TOKENS:-450000}" --steps 4000
           --batch 32 --ckpt-every 100 --time-limit "${TRAIN_SECONDS:-180}" --dtype auto)
fi
init=()
[ "$cold" = 1 ] || init=(--init gsd_serve/data/feature_draft)
cmd=("$PY" -m gsd_serve distill --kind features --device "$device" --out "$WORK" --target-weights dense
     "${init[@]}" "${sizes[@]}")
echo "device_distill: ${cmd[*]}"
t0=$(date +%s)
"${cmd[@]}" 2>&1 | tr '\r' '\n' | grep -v '^ *[0-9]*/[0-9]* \[' | tee -a "$OUT/distill.log"
rc=${PIPESTATUS[0]}
t1=$(date +%s)

mkdir -p "$OUT/feature_draft"
for f in config.json draft_vocab.json; do
    [ -f "$WORK/model/$f" ] && cp "$WORK/model/$f" "$OUT/feature_draft/"
done
[ -f "$WORK/history.json" ] && cp "$WORK/history.json" "$OUT/feature_draft/"
"$PY" - "$OUT" "$WORK" "$rc" "$((t1 - t0))" "${cmd[*]}" <<'PYEOF'
import json, sys
from pathlib import Path

out, work, rc, seconds, command = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
history = json.loads((work / "history.json").read_text()) if (work / "history.json").exists() else []
if (work / "model" / "model.safetensors").exists():
    # in bfloat16, as the shipped feature draft is stored: the fp32 file (21 MB) is over $OUT's 16 MiB a file,
    # and a draft's precision changes proposals only, never the output
    import torch
    from safetensors.torch import load_file, save_file

    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(work / "model" / "model.safetensors").items()}
    save_file(tensors, out / "feature_draft" / "model.safetensors", metadata={"format": "pt"})
tokens = json.loads((work / "data" / "tokens.json").read_text()) if (work / "data" / "tokens.json").exists() else {}
report = {"returncode": rc, "seconds": seconds, "command": command, "target_tokens": sum(tokens.values()),
          "steps": history[-1]["step"] if history else 0,
          "heldout_top1_first": history[0]["heldout_top1"] if history else None,
          "heldout_top1_last": history[-1]["heldout_top1"] if history else None,
          "heldout_top1_by_depth_last": history[-1]["heldout_top1_by_depth"] if history else None,
          "files": {f.name: f.stat().st_size for f in sorted((out / "feature_draft").glob("*"))}}
(out / "distill.json").write_text(json.dumps(report, indent=1))
print(json.dumps(report, indent=1))
PYEOF
# one file for the draft: a run brings back 8 files at most, beside device_check's
tar -C "$OUT" -cf "$OUT/feature_draft.tar" feature_draft && rm -rf "$OUT/feature_draft"
exit "$rc"
