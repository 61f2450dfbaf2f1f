#!/usr/bin/env bash
# BENCHMARKS.md in commands of < 10 minutes each on one H200. Random weights; data on the GPU.
#   train:  the official REG step at batch 32 and 64 timed before and after ours (32, 64)
#   sample: the official sampler; evaluate.py's time for 50K samples vs 10K reference; our sampler
#           (bf16 autocast, fp8), each against strict fp32, and SDE 250 steps for the 50K estimate
#   levers: ours with the compiled optimizer phase, fp8 training, batch 128 (not yet measured:
#           each XL compile takes ~95 s, so these need a call of their own)
# Needs the official release's models/sit.py, loss.py and samplers.py in $REF_DIR (never
# committed) and bench_official.py at $OFFICIAL; the fp8 rows need torchao. Each mode stops
# starting runs when its $BUDGET_S seconds (default 570) are spent.
#   REF_DIR=official-reg OFFICIAL=bench_official.py bash bench/bench.sh train|sample|levers
set -uo pipefail
cd "$(dirname "$0")/.."
deadline=$((SECONDS + ${BUDGET_S:-570}))
# Each run gets the time left; a run that fails or is cut off is reported and the rest go on.
go() {
  local left=$((deadline - SECONDS))
  if ((left < 30)); then echo "skipped (budget spent): $*"; return; fi
  echo "+ $* ($((SECONDS))s)"
  timeout "$left" "$@" || echo "failed or cut off (status $?): $*"
}
off() { go env REF_DIR="${REF_DIR:-official-reg}" python3 "${OFFICIAL:-bench_official.py}" --model SiT-XL/2 "$@"; }
ours() { go python3 bench/bench.py "$@"; }
case "${1:-}" in
  train)
    for b in 32 64; do off --batch $b --steps 20; done
    for b in 32 64; do ours train --batch $b; done
    for b in 32 64; do off --batch $b --steps 20; done ;;
  sample)
    off --sample --sample-batch 128 --sample-steps 50
    go python3 bench/bench_evaluate.py
    ours sample --batch 128 --steps 50 --variants autocast fp8 --long-steps 250 ;;
  levers)
    off --batch 32 --steps 20
    ours train --batch 32 --opt-phase compiled
    ours train --batch 32 --fp8
    ours train --batch 128
    off --batch 32 --steps 20 ;;
  *) echo "usage: bash bench/bench.sh train|sample|levers"; exit 2 ;;
esac
