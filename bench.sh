#!/usr/bin/env bash
# GPU benchmarks of BENCHMARKS.md: training and sampling throughput of SiT-XL/2 + REG on one GPU.
# Weights are random (speed does not depend on them); data is synthetic with ImageNet's shapes.
#   bash bench.sh [train|sample|loader|all]     (results: one JSON line per run)
# Kernel-level breakdowns: python3 bench_profile.py train|sample|attention
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-all}
syn=${SYN:-/tmp/reg-synthetic}
train() { python3 train.py --data-path "$syn" --enc-path random --num-workers 8 "$@"; }

if [[ ! -f $syn/manifest.json ]]; then python3 data.py synthetic --dst "$syn" --count "${COUNT:-2000}"; fi
if [[ $what == train || $what == all ]]; then
    train --model SiT-XL/2 --global-batch-size 32 --benchmark-steps 30
    train --model SiT-XL/2 --global-batch-size 64 --benchmark-steps 20
    train --model SiT-B/2 --global-batch-size 32 --benchmark-steps 50 --encoder-depth 4
fi
if [[ $what == sample || $what == all ]]; then
    python3 sample.py --benchmark --compile --model SiT-XL/2 --per-proc-batch-size 128 --mode sde \
        --num-steps 50 --cfg-scale 2.3 --cls-cfg-scale 2.3 --guidance-high 0.85
fi
if [[ $what == loader || $what == all ]]; then
    # The loader reads the prepared format from disk with 8 workers; the page cache is dropped
    # first so the reads really come from the disk.
    sync; echo 3 > /proc/sys/vm/drop_caches || true
    train --model SiT-XL/2 --global-batch-size 32 --benchmark-steps 100 --benchmark-data loader
fi
