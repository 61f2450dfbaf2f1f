"""GPU time per step by kind of kernel, for any benchmark script: it runs the script under the
PyTorch profiler (CUDA kernels only) and sorts every kernel into GEMM, attention, optimizer and
EMA, copies, and the rest (elementwise and normalisation).

Clean per-step numbers come from a difference: the script runs in two child processes, with `{}`
in its arguments replaced by each of two step counts, and the per-kernel totals are subtracted,
so set-up and compilation (weights copied to the GPU, inductor timing its Triton kernels) cancel
out. A third child runs first, uncounted, so that both counted ones find inductor's caches warm:
a cold compile launches kernels that a cached one does not. The two sides' steps side by side:

    python bench/kernels.py --diff 5 25 bench/bench.py train --batch 32 --steps {}
    REF_DIR=$O python bench/kernels.py --diff 5 25 $O/bench_official.py --model SiT-XL/2 --batch 32 --steps {}

Compare kernel_ms_per_step with the step's measured time (the script's own line, printed above,
under the profiler's small overhead): the gap is time the GPU waits on the CPU, which CUDA graphs
would remove. Without --diff, one run, totals divided by --steps (the steps it runs in all);
those totals also hold the set-up.
"""
import argparse, json, re, runpy, subprocess, sys
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


def kernel_ms(script, args):
    """Run the script under the profiler -> {kernel name: GPU milliseconds in all}."""
    sys.argv = [script, *args]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit:  # bench_official.py ends with sys.exit() in some modes
            pass
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return {e.key: e.self_device_time_total / 1e3 for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA}


def child(n, a):
    """kernel_ms of the script with {} -> n, in a fresh process (its own compile, its own set-up)."""
    args = [x.replace("{}", str(n)) for x in a.args]
    out = subprocess.run([sys.executable, __file__, "--raw", a.script, *args], stdout=subprocess.PIPE,
                         text=True, check=True).stdout.splitlines()
    print("\n".join(out[:-1]), flush=True)  # the script's own lines (its measured step time)
    return json.loads(out[-1])


def report(per_kernel, what, top):
    per_kind = defaultdict(float)
    for name, ms in per_kernel.items():
        per_kind[kind(name)] += ms
    best = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    print(json.dumps(dict(script=what, ms_per_step_by_kind={k: round(v, 2) for k, v in per_kind.items()},
                          kernel_ms_per_step=round(sum(per_kind.values()), 2),
                          top_kernels={k[:90]: round(v, 2) for k, v in best})), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--diff", type=int, nargs=2, metavar=("N1", "N2"), help="step counts put in place of {}")
    g.add_argument("--steps", type=int, help="one run: the steps the script runs in all")
    g.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # a child of --diff
    p.add_argument("--top", type=int, default=12, help="also list this many most expensive kernels")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    what = " ".join([a.script, *a.args])
    if a.raw:
        print(json.dumps(kernel_ms(a.script, a.args)), flush=True)
    elif a.diff:
        child(a.diff[0], a)  # warms the compile caches; not counted
        (n1, n2), (t1, t2) = a.diff, [child(n, a) for n in a.diff]
        report({k: (t2.get(k, 0) - t1.get(k, 0)) / (n2 - n1) for k in t1.keys() | t2.keys()}, what, a.top)
    else:
        report({k: v / a.steps for k, v in kernel_ms(a.script, a.args).items()}, what, a.top)


if __name__ == "__main__":
    main()
