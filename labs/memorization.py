"""Lab: the memorization clock (Bonnaire et al., "Why diffusion models don't memorize", arXiv
2505.17638, Sec. 3) on train.py's SiT and built-in data.

The same model is trained (train.main) on the first n images of a built-in dataset for several n,
each for the same number of steps per image (steps / n), at the paper's batch rule min(n, cap).
Every few steps the EMA's samples are measured: their memorized fraction (evaluate.memorized_fraction,
d1 / d2 < 1/3 in pixels against the n training images) and their quality against held-out images
(labs/common.py: the FID of toy.py's evaluator).
The paper's finding: quality is reached at tau_gen, independent of n; memorization starts later, at
tau_mem proportional to n, so the curves of memorized fraction against steps / n fall on one another.

    python labs/memorization.py                    # CPU: plain SiT-T/4 on 8x8 MNIST digits, n = 8, 16, 32, 3 seeds
    python labs/memorization.py --data shapes      # the same world on the built-in shapes (8x8)
    python labs/memorization.py --device cuda      # one H200: SiT-T/4 + REG on 32x32 shapes, n = 16 .. 128, 3 seeds
Each invocation runs the (n, seed) pairs not yet done and redraws everything from all results so far.
Definitions: tau_mem = the first step at which the memorized fraction reaches 0.1 (linear between
evaluations; none if it never does); tau_gen = the step of the best (lowest) toy FID.
Writes runs/labs/memorization/: memorization.png, results.json / results.md (with the wall time, CPU
time and load), runs/ (per-run rows, logs).
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from data import BUILTIN_DATASETS  # noqa: E402
from util import ArgumentParser, number  # noqa: E402

# The CPU world is sized for 10 minutes on 2 idle cores (README.md, "Labs on a CPU"): 8x8 images and
# SiT-T/4, i.e. 4 tokens of 4x4x3 pixels, plain SiT (no encoder loss: the clock is the paper's
# question, not REG's), batch min(n, 20). The cuda preset is the built-in REG run on 32x32 shapes.
PRESETS = {
    "cpu": dict(data="digits", resolution=8, ns=[8, 16, 32], steps_per_image=130, cap=20, evals=10, samples=50,
                sample_steps=16, ema=0.99, parallel=2,
                train=["--model", "SiT-T/4", "--proj-coeff", "0", "--cls-coeff", "0", "--lr", "1e-3"]),
    "cuda": dict(data="shapes", resolution=32, ns=[16, 32, 64, 128], steps_per_image=20, cap=64, evals=10,
                 samples=256, sample_steps=30, ema=0.99, parallel=12, train=[]),
}
MEM_LEVEL = 0.1  # tau_mem: when this share of the samples copies a training image


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="picks the preset and the device")
    p.add_argument("--ns", type=number(int, 2), nargs="+", default=None, help="training-set sizes; none: the preset's")
    p.add_argument("--seeds", type=number(int, 0), nargs="+", default=[0, 1, 2], help="one run per (n, seed)")
    p.add_argument("--steps-per-image", type=number(int, 1), default=None, help="training steps = this x n; none: preset")
    p.add_argument("--data", default=None, choices=sorted(BUILTIN_DATASETS), help="built-in dataset; none: the preset's")
    p.add_argument("--out", default=os.path.join(common.REPO, "runs", "labs", "memorization"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one run, in its own process
    args = p.parse_args(argv)
    common.require_gpu(p, args.device)
    preset = dict(PRESETS[args.device])
    preset["ns"] = args.ns or preset["ns"]
    preset["steps_per_image"] = args.steps_per_image or preset["steps_per_image"]
    preset["data"] = args.data or preset["data"]
    args.preset = preset
    return args


def job(n, seed, args):
    """The train.py flags of one run and where its rows go."""
    p = args.preset
    steps, batch = p["steps_per_image"] * n, min(n, p["cap"])  # Bonnaire et al.'s batch: min(n, 512)
    name = f"n{n}-seed{seed}"
    flags = ["--output-dir", os.path.join(args.out, "runs"), "--exp-name", name, "--num-images", str(n),
             "--builtin", p["data"], "--resolution", str(p["resolution"]), *p["train"],
             "--global-batch-size", str(batch), "--max-train-steps", str(steps), "--seed", str(seed),
             "--checkpoint-every", str(max(1, steps // p["evals"])), "--sample-every", str(steps),
             "--sample-steps", str(p["sample_steps"]), "--sample-cfg-scale", "1",  # the last step's grid: cheap
             "--log-every", str(max(1, steps // 20)), "--ema-decay", str(p["ema"]), "--no-compile"]
    return dict(name=name, n=n, seed=seed, flags=flags, samples=p["samples"], sample_steps=p["sample_steps"],
                device=args.device, data=p["data"], resolution=p["resolution"],
                out_json=os.path.join(args.out, "runs", f"{name}.json"))


def worker(spec):
    data = BUILTIN_DATASETS[spec["data"]](resolution=spec["resolution"])
    train_images = data.first(spec["n"]).images  # the run's training set, uint8
    common.train_and_evaluate(spec["flags"], train_images, spec["samples"], spec["sample_steps"], spec["device"],
                              spec["out_json"])


def crossing(rows, key, level):
    """The first step at which rows[key] reaches level, linear between evaluations; None if never."""
    previous = (0, 0.0)
    for r in rows:
        if r[key] >= level:
            (s0, v0), (s1, v1) = previous, (r["step"], r[key])
            return s0 + (level - v0) / (v1 - v0) * (s1 - s0) if v1 > v0 else s1
        previous = (r["step"], r[key])
    return None


def summarise(args, runs):
    """Per n: tau_mem, tau_gen (mean, std over seeds) and the last evaluation; the fit of tau_mem on n."""
    quality_key = "fid"
    table, points = [], []
    for n in sorted({n for n, _ in runs}):
        per_seed = [rows for (m, _), rows in sorted(runs.items()) if m == n]
        tau_mem = [crossing(rows, "mem_frac", MEM_LEVEL) for rows in per_seed]
        tau_gen = [min(rows, key=lambda r: r[quality_key])["step"] for rows in per_seed]
        points += [(n, t) for t in tau_mem if t is not None]
        (tm, tm_sd), (tg, tg_sd) = common.mean_std(tau_mem), common.mean_std(tau_gen)
        (mf, mf_sd), (q, q_sd) = (common.mean_std([rows[-1][k] for rows in per_seed]) for k in ("mem_frac", quality_key))
        table.append(dict(n=n, seeds=len(per_seed), steps=per_seed[0][-1]["step"], tau_mem=tm, tau_mem_sd=tm_sd,
                          runs_memorizing=f"{sum(t is not None for t in tau_mem)}/{len(per_seed)}",
                          tau_gen=tg, tau_gen_sd=tg_sd, final_mem_frac=mf, final_mem_frac_sd=mf_sd,
                          **{f"final_{quality_key}": q, f"final_{quality_key}_sd": q_sd}))
    fit = None
    if len({n for n, _ in points}) >= 2:
        n_, t_ = np.array(points, dtype=float).T
        slope, intercept = np.polyfit(n_, t_, 1)
        exponent = np.polyfit(np.log(n_), np.log(t_), 1)[0]
        fit = dict(slope_steps_per_image=float(slope), intercept=float(intercept), loglog_exponent=float(exponent),
                   points=len(points))
    return table, fit, quality_key


def plot(args, runs, table, fit, quality_key, path):
    def curves(key, x_of):
        series = []
        for n in sorted({n for n, _ in runs}):
            per_seed = [rows for (m, _), rows in sorted(runs.items()) if m == n]
            steps = [r["step"] for r in per_seed[0]]
            values = [[rows[i][key] for rows in per_seed] for i in range(len(steps))]
            series.append((f"n = {n}", [(x_of(s, n), *common.mean_std(v)) for s, v in zip(steps, values)]))
        return series

    taus = [(name, [(r["n"], r[k], r[f"{k}_sd"]) for r in table if r[k] is not None])
            for name, k in (("tau_mem", "tau_mem"), ("tau_gen", "tau_gen"))]
    common.line_panels([
        dict(title="memorized fraction against steps", xlabel="step", series=curves("mem_frac", lambda s, n: s)),
        dict(title="memorized fraction against steps / n", xlabel="steps / n",
             series=curves("mem_frac", lambda s, n: s / n)),
        dict(title=f"sample quality ({quality_key}, lower is better) against steps", xlabel="step",
             series=curves(quality_key, lambda s, n: s)),
        dict(title=f"tau_mem (mem_frac >= {MEM_LEVEL}), tau_gen (best {quality_key}) vs n"
             + (f"; fit {fit['slope_steps_per_image']:.1f} steps/image, exponent {fit['loglog_exponent']:.2f}"
                if fit else ""), xlabel="n",
             log_x=True, series=taus),
    ], path)


def main(args):
    clock, p = common.Clock(), args.preset
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    common.Quality(variant=p["data"], resolution=p["resolution"])  # trains the toy evaluator here, once, if absent
    # Phase 1: the runs not done yet (each trains, then evaluates its checkpoints).
    jobs = [job(n, seed, args) for n in sorted(args.preset["ns"], reverse=True) for seed in args.seeds]  # longest first
    common.run_workers(os.path.abspath(__file__), jobs, args.preset["parallel"])
    # Phase 2: every finished run in the folder, this invocation's or an earlier one's.
    runs = {}
    for name in os.listdir(os.path.join(args.out, "runs")):
        if name.endswith(".json"):
            n, seed = (int(part[1:] if part[0] == "n" else part[4:]) for part in name[:-5].split("-"))
            with open(os.path.join(args.out, "runs", name)) as f:
                runs[(n, seed)] = json.load(f)
    table, fit, quality_key = summarise(args, runs)
    # Phase 3: plot and tables, with the command.
    plot(args, runs, table, fit, quality_key, os.path.join(args.out, "memorization.png"))
    command = "python labs/memorization.py " + " ".join(sys.argv[1:])
    cost = clock.record()
    header = (f"Memorization clock, `{command}` (preset {args.device}: {args.preset}; {common.cost_line(cost)}). "
              f"tau_mem: first step with "
              f"memorized fraction >= {MEM_LEVEL}; tau_gen: step of the best {quality_key}. Fit of tau_mem on n: {fit}")
    common.write_tables(table, ["n", "seeds", "steps", "tau_mem", "tau_mem_sd", "runs_memorizing", "tau_gen",
                                "tau_gen_sd", "final_mem_frac", "final_mem_frac_sd", f"final_{quality_key}",
                                f"final_{quality_key}_sd"], args.out, "results", header)
    with open(os.path.join(args.out, "results.json")) as f:
        rows = json.load(f)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": command, "preset": args.preset, **cost, "fit": fit, "table": rows,
                   "runs": {f"n{n}-seed{s}": r for (n, s), r in sorted(runs.items())}}, f, indent=1)
    print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    a = get_args()
    worker(json.loads(a.worker)) if a.worker else main(a)
