"""GPU time per step by kind of kernel, for any benchmark script: it runs the script under the
PyTorch profiler (CUDA kernels only) and sorts every kernel into GEMM, attention, optimizer and
EMA, copies, and the rest (elementwise and normalisation). The two sides' steps side by side:

    python bench/kernels.py --steps 26 bench/bench.py train --batch 64
    REF_DIR=$O python bench/kernels.py --steps 30 $O/bench_official.py --model SiT-XL/2 --batch 64

--steps: how many steps the script runs in all (bench.py train: 1 + 5 warm-up + --steps timed;
bench_official.py: 10 warm-up + --steps), so that totals become milliseconds per step.
The totals also hold the script's set-up and compilation, spread over the steps: weights copied
to the GPU (pageable host-to-device copies), and inductor's timing of its Triton kernels (int
fills that flush the cache, extra elementwise runs). GEMM and attention rows are free of both.
"""
import argparse, json, re, runpy, sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

# First match wins; kernel names of cuBLAS/cuDNN/CUTLASS, PyTorch's own kernels and Triton's.
KINDS = [
    ("attention", r"flash|fmha|attention|sdpa|cudnn_generated_fort_native_sdpa"),
    ("GEMM", r"gemm|cutlass|nvjet|xmma|sm90_|sm80_|cublas|matmul|_mm_|splitK"),
    ("optimizer and EMA", r"multi_tensor|adam|foreach|lerp"),
    ("copies and casts", r"memcpy|memset|copy_|CatArrayBatched|to_copy"),
    ("elementwise, normalisation, reductions", r"."),
]


def kind(name):
    return next(k for k, pattern in KINDS if re.search(pattern, name, re.I))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, required=True, help="steps the script runs in all")
    p.add_argument("--top", type=int, default=12, help="also list this many most expensive kernels")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    sys.argv = [a.script, *a.args]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        try:
            runpy.run_path(a.script, run_name="__main__")
        except SystemExit:  # bench_official.py ends with sys.exit() in some modes
            pass
        torch.cuda.synchronize()
    per_kind, per_kernel = defaultdict(float), defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            ms = event.self_device_time_total / 1e3 / a.steps  # microseconds in all -> ms per step
            per_kind[kind(event.key)] += ms
            per_kernel[event.key] += ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:a.top]
    print(json.dumps(dict(script=" ".join(sys.argv), ms_per_step_by_kind={k: round(v, 2) for k, v in per_kind.items()},
                          kernel_ms_per_step=round(sum(per_kind.values()), 2),
                          top_kernels={k[:90]: round(v, 2) for k, v in top})), flush=True)


if __name__ == "__main__":
    main()
