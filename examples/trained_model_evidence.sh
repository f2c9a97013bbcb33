#!/usr/bin/env bash
# Train the small position-dependent ESM-2 (examples/train_small_esm.py), then trace it with
# tracer.run, tracer.experiments and tracer.sweep. Everything goes under OUT (default
# trained-evidence/); rerunning resumes the experiments and the sweep.
#
#   bash examples/trained_model_evidence.sh [OUT] [extra train_small_esm.py options]
#
# Needs a CUDA GPU for the bfloat16 kernels of the packed path (torch-varlen or flash-attn).
set -euo pipefail
OUT=${1:-trained-evidence}
shift || true
mkdir -p "$OUT"
CKPT="$OUT/small_esm.pt"
if [ ! -f "$CKPT" ]; then
    python3 examples/train_small_esm.py --out "$CKPT" --seed 0 "$@" 2>&1 | tee "$OUT/train.log"
fi
python3 -m tracer.run --weights "$CKPT" --seq-len 400 --plot --out "$OUT/run-debug-batch.h5" --force 2>"$OUT/run.err" | tee "$OUT/run.txt"
python3 -m tracer.experiments --weights "$CKPT" --seq-len 400 --out "$OUT/experiments" 2>"$OUT/experiments.err" | tee "$OUT/experiments.txt"
python3 -m tracer.sweep --weights "$CKPT" --lengths 50:1000:50 --out "$OUT/sweep" 2>"$OUT/sweep.err" | tee "$OUT/sweep.txt"
echo "results in $OUT: train.log, small_esm.json, run.txt, experiments/summary.md, sweep/summary.md, sweep/sweep.png"
