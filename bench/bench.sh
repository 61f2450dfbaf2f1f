#!/usr/bin/env bash
# BENCHMARKS.md in commands of < 10 minutes each on one H200. Random weights; data on the GPU.
#   all:    issue 10's table in one command (≈ 8 minutes, estimated from the runs of the other modes):
#           the official step at batch 32 and 64 before and after ours, the official sampler, ours
#   train:  the official REG step at batch 32 and 64 timed before and after ours (32, 64)
#   sample: the official sampler; evaluate.py's time for 50K samples vs 10K reference; our sampler
#           (bf16 autocast, fp8), each against strict fp32, and SDE 250 steps for the 50K estimate
#   levers: ours with --fp8 at batch 32 and 64, at batch 128, and with the compiled optimizer
#           phase, beside the official step
#   fp8-sample: our sampler with per-tensor fp8, beside the official sampler and our default
#   profile: GPU time per step by kind of kernel (bench/kernels.py --diff: set-up subtracted), ours
#           and official at batch $PROFILE_BATCH (default 32)
#   step-levers: CUDA graphs for the step, and the optimizer phase alone (eager against compiled),
#           beside the official step and our default
#   sample-levers: the sampler with max-autotune and per-tensor fp8, beside the official sampler
#           and our default
#   car:    the training step with CAR-Flow's joint shift maps (train.py --car joint) between two
#           runs without (≈ 6 minutes: three compiles of ≈ 100 s and 26 steps each)
# Needs the official release's models/sit.py, loss.py and samplers.py in $REF_DIR (never
# committed) and bench_official.py at $OFFICIAL; the fp8 rows need torchao. Each mode stops
# starting runs when its $BUDGET_S seconds (default 570) are spent.
#   REF_DIR=official-reg OFFICIAL=bench_official.py bash bench/bench.sh all
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
  all)
    for b in 32 64; do off --batch $b --steps 20; ours train --batch $b; off --batch $b --steps 20; done
    off --sample --sample-batch 128 --sample-steps 50
    ours sample --batch 128 --steps 50 ;;
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
    ours train --batch 32
    ours train --batch 32 --fp8
    off --batch 32 --steps 20
    off --batch 64 --steps 20
    ours train --batch 64 --fp8
    off --batch 64 --steps 20
    ours train --batch 128
    ours train --batch 32 --opt-phase compiled ;;  # last: its compile may not finish in the budget
  fp8-sample)  # the sampler with per-tensor fp8 scales, beside the official sampler and our default
    off --sample --sample-batch 128 --sample-steps 50
    ours sample --batch 128 --steps 50 --variants autocast fp8-tensor ;;
  profile)  # GPU time per step by kind of kernel, both steps: 25 steps minus 5 steps, over 20
    b=${PROFILE_BATCH:-32}
    go python3 bench/kernels.py --diff 5 25 bench/bench.py train --batch "$b" --steps {}
    go env REF_DIR="${REF_DIR:-official-reg}" python3 bench/kernels.py --diff 5 25 "${OFFICIAL:-bench_official.py}" \
       --model SiT-XL/2 --batch "$b" --steps {} ;;
  step-levers)
    off --batch 32 --steps 20
    ours train --batch 32
    ours train --batch 32 --compile-mode reduce-overhead
    off --batch 32 --steps 20
    ours optim ;;
  sample-levers)  # slowest compile last
    off --sample --sample-batch 128 --sample-steps 50
    ours sample --batch 128 --steps 50 --variants autocast fp8-tensor autotune ;;
  car)  # CAR-Flow's cost: --car joint between two --car none runs, SiT-XL/2 at batch 32 (no official code needed)
    ours train --batch 32
    ours train --batch 32 --car joint
    ours train --batch 32 ;;
  *) echo "usage: bash bench/bench.sh all|train|sample|levers|fp8-sample|profile|step-levers|sample-levers|car"; exit 2 ;;
esac
