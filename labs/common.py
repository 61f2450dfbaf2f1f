"""What the labs share: sampling a train.py checkpoint with sample.py's own functions, the
sample-quality measure, the plots of summaries (plot.py), the markdown table, the workers that run a
lab's runs side by side, and the clock that writes a lab's wall time, CPU time and the machine's load
into its results.

Not an experiment: closed_form.py and memorization.py use all of it; reg_vs_repa.py and reals.py the
workers, the GPU check and the clock.
"""
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import evaluate  # noqa: E402
import sample  # noqa: E402
import toy  # noqa: E402
from data import BUILTIN_DATASETS  # noqa: E402
from encoder import load_vae  # noqa: E402
from model import read_checkpoint  # noqa: E402
from plot import line_plot  # noqa: E402

# The held-out images that sample quality is measured against: the built-in data of another seed
# (train.py trains on seed 0; toy.py's "reference" role), so no training image is among them.
REFERENCE_SEED = 2


def evaluator_path(variant="shapes", resolution=32):
    """toy.py's evaluator of a lab's data (a built-in dataset at a resolution), cached under runs/toy/
    as reg_vs_repa.py's are: evaluator-shapes.pt, evaluator-digits-8px.pt, ..."""
    return os.path.join(REPO, "runs", "toy", f"evaluator-{variant}{'' if resolution == 32 else f'-{resolution}px'}.pt")


class Clock:
    """A lab's cost, for its results JSON: wall seconds, CPU seconds of the lab and of its finished
    workers, the core count and the 1, 5, 15-minute load averages before and after. On a busy
    machine the wall time is not the idle time; CPU seconds / cores is closer to it (README.md,
    "Labs on a CPU", says how the presets were sized)."""

    def __init__(self):
        self.start, self.load = time.time(), os.getloadavg()

    def record(self):
        used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return dict(seconds=time.time() - self.start, cpu_seconds=sum(u.ru_utime + u.ru_stime for u in used),
                    cores=os.cpu_count(), loadavg_before=self.load, loadavg_after=os.getloadavg())


def cost_line(cost):
    """A Clock's record as the phrase the labs' tables quote."""
    return (f"{cost['seconds']:.0f} s, {cost['cpu_seconds']:.0f} CPU s on {cost['cores']} cores at load "
            f"{cost['loadavg_before'][0]:.1f} before, {cost['loadavg_after'][0]:.1f} after (1-minute averages)")


def sample_checkpoint(path, num, steps, seed=0, device="cpu"):
    """num samples of a train.py checkpoint's EMA with sample.py's code: Euler on the ODE, `steps`
    steps, no guidance, noise from (seed, index), labels index mod classes -> (uint8 (N, 3, R, R),
    labels (N,)). The ODE, not the SDE: the SDE's last step leaves some noise on every sample, so
    even the exact memorising velocity's samples miss the 1/3 criterion (labs/closed_form.py (c):
    memorized fraction 1.0 with Euler on the ODE, 0.04 with the SDE, 20 steps each)."""
    args = sample.get_args(["--ckpt", path, "--mode", "ode", "--num-steps", str(steps), "--cfg-scale", "1",
                            "--seed", str(seed), "--precision", "fp32"])
    model, vae_name, scale = sample.build_model(read_checkpoint(path), args)
    model, vae = model.to(device), load_vae(vae_name).to(device)
    x, cls, y = sample.noise_and_labels(range(num), model, args, device)
    generator = torch.Generator(device).manual_seed(seed)
    return sample.generate(model, vae, scale, x, cls, y, args, generator).cpu(), y.cpu()


class Quality:
    """Sample quality against held-out images of a built-in dataset (data.BUILTIN_DATASETS: variant,
    resolution): toy.py's evaluator of that data (a small classifier trained on other held-out
    images; trained here on first use) gives their FID, precision, recall and conditional accuracy
    (toy.toy_metrics)."""

    def __init__(self, evaluator=None, num_reference=2000, device="cpu", variant="shapes", resolution=32):
        ref = BUILTIN_DATASETS[variant](num_reference, resolution, seed=REFERENCE_SEED)  # digits: its 1,000
        self.reference, self.labels = torch.from_numpy(ref.images), torch.from_numpy(ref.labels)  # (c) of closed_form
        evaluator = evaluator or evaluator_path(variant, resolution)
        if not os.path.exists(evaluator):  # trained on held-out images of the lab's data
            toy.train_evaluator(evaluator, variant=variant, resolution=resolution)
        self.net = toy.load_evaluator(evaluator, device)
        self.names = ("fid", "precision", "recall", "accuracy")
        self.main = "fid"  # the number whose minimum over training is tau_gen

    def __call__(self, samples, labels):
        return toy.toy_metrics(self.net, samples, labels, self.reference)


def require_gpu(parser, device):
    """A lab's `--device cuda` on a machine where torch sees no GPU: one line, exit 2 (not runs on the CPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU; run on a GPU machine or drop --device")


def mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------- plots and tables

def line_panels(panels, path):
    """plot.line_plot of the labs' summaries, two panels a row. panels: dicts with title, xlabel,
    log_x (optional) and series: [(name, [(x, mean, std or None), ...])], a mean of None skipped;
    each series a line with dots and the band mean -/+ std."""
    def series(name, points):
        points = [(x, m, s or 0.0) for x, m, s in points if m is not None]
        return dict(name=name, x=[x for x, _, _ in points], y=[m for _, m, _ in points], dots=True,
                    band=([m - s for _, m, s in points], [m + s for _, m, s in points]))

    line_plot([dict(panel, series=[series(*s) for s in panel["series"]]) for panel in panels], path, columns=2,
              width=640, height=300)


def write_tables(rows, columns, out_dir, name, header):
    """rows (dicts) -> out_dir/name.json and out_dir/name.md (a markdown table under `header`)."""
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _cell(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


# ----------------------------------------------------------------------------- runs

def train_and_evaluate(flags, train_images, num_samples, sample_steps, device, out_json):
    """One training run with train.py's main, then every checkpoint it wrote evaluated from the same
    samples: the memorized fraction against train_images (evaluate.memorized_fraction, pixels) and
    the Quality numbers of the run's data (--builtin, --resolution); the checkpoints are deleted once
    read (disk), the rows go to out_json."""
    import train  # here, not at the top: the workers import it, the lab's own process need not
    args = train.get_args(flags)
    train.main(args)
    ckpt_dir = os.path.join(args.output_dir, args.exp_name, "checkpoints")
    quality = Quality(device=device, variant=args.builtin, resolution=args.resolution or 32)
    rows = []
    for name in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, name)
        images, labels = sample_checkpoint(path, num_samples, sample_steps, device=device)
        rows.append({"step": int(name.split(".")[0]), "mem_frac": evaluate.memorized_fraction(images, train_images),
                     **quality(images, labels)})
        os.remove(path)
    with open(out_json, "w") as f:
        json.dump(rows, f)
    return rows


def run_workers(script, jobs, parallel):
    """Run `python script --worker JSON` for each job (a dict), `parallel` at a time; each writes its
    own result file, so an interrupted lab resumes with the jobs not yet done."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    def one(job):
        if os.path.exists(job["out_json"]):
            return
        print(f"run: {job['name']}", flush=True)
        log = open(job["out_json"] + ".log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel))}  # no oversubscription
        done = subprocess.run([sys.executable, script, "--worker", json.dumps(job)], stdout=log,
                              stderr=subprocess.STDOUT, env=env)
        if done.returncode:
            raise RuntimeError(f"{job['name']} failed; see {job['out_json']}.log")

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, jobs))
