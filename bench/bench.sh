#!/usr/bin/env bash
# All of BENCHMARKS.md in one command (< 10 minutes on one H200): the official REG step timed
# before and after ours, ours at batch 32/64/128, the official sampler and ours with relative L2
# to strict fp32. Random weights; data on the GPU. Needs the official release's models/sit.py,
# loss.py and samplers.py in $REF_DIR (never committed) and bench_official.py at $OFFICIAL.
#   REF_DIR=official-reg OFFICIAL=bench_official.py bash bench/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
off() { REF_DIR=${REF_DIR:-official-reg} python3 "${OFFICIAL:-bench_official.py}" --model SiT-XL/2 "$@"; }
ours() { python3 bench/bench.py "$@"; }
for b in 32 64; do off --batch $b --steps 20; done
for b in 32 64 128; do ours train --batch $b --steps 20; done
for b in 32 64; do off --batch $b --steps 20; done
off --sample --sample-batch 128 --sample-steps 50
ours sample --batch 128 --steps 50
if [[ -f bench/bench_evaluate.py ]]; then python3 bench/bench_evaluate.py; fi
