"""What the closed-form and memorization labs share: sampling a train.py checkpoint with sample.py's
own functions, the sample-quality measure, line plots drawn with PIL, the markdown table, and the
clock that writes a lab's wall time, CPU time and the machine's load into its results.

Not an experiment: labs/closed_form.py and labs/memorization.py import it.
"""
import json
import math
import os
import resource
import sys
import time
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import evaluate  # noqa: E402
import sample  # noqa: E402
from data import BUILTIN_DATASETS  # noqa: E402
from encoder import load_vae  # noqa: E402
from model import read_checkpoint  # noqa: E402

# The held-out images that sample quality is measured against: the built-in data of another seed
# (train.py trains on seed 0; toy.py's "reference" role), so no training image is among them.
REFERENCE_SEED = 2


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
    resolution). With toy.py's evaluator (a small classifier trained on other held-out images), its
    FID, precision, recall and accuracy. Without toy.py, two measures in
    pixel space that need no trained network: `pixel_fd`, the Frechet distance (evaluate.py's) of
    pixels average-pooled to 4x4 (48 numbers per image), and `nn_accuracy`, the share of samples whose
    nearest held-out image (L2 in pixels) has the label the sample was asked for."""

    def __init__(self, evaluator=None, num_reference=2000, device="cpu", variant="shapes", resolution=32):
        ref = BUILTIN_DATASETS[variant](num_reference, resolution, seed=REFERENCE_SEED)  # digits: its 1,000
        self.reference, self.labels = torch.from_numpy(ref.images), torch.from_numpy(ref.labels)
        self.net, self.device = None, device
        if evaluator:
            import toy  # issue 18's toy evaluator (toy.py at the repository root)
            if not os.path.exists(evaluator):  # trained on held-out images of the lab's data
                toy.train_evaluator(evaluator, variant=variant, resolution=resolution)
            self.net, self.toy = toy.load_evaluator(evaluator, device), toy
        self.names = ("fid", "precision", "recall", "accuracy") if self.net else ("pixel_fd", "nn_accuracy")
        self.main = self.names[0]  # the number whose minimum over training is tau_gen

    def __call__(self, samples, labels):
        if self.net is not None:
            return self.toy.toy_metrics(self.net, samples, labels, self.reference)
        pooled = [torch.nn.functional.adaptive_avg_pool2d(x.double() / 127.5 - 1, 4).flatten(1).numpy()
                  for x in (samples, self.reference)]
        with warnings.catch_warnings():  # a collapsed set of samples has a singular covariance
            warnings.simplefilter("ignore")
            fd = evaluate.frechet_distance(*evaluate.mean_cov(pooled[1]), *evaluate.mean_cov(pooled[0]))
        dist = torch.cdist(samples.flatten(1).double(), self.reference.flatten(1).double())  # (N, refs)
        accuracy = (self.labels[dist.argmin(1)] == labels).double().mean().item()
        return {"pixel_fd": fd, "nn_accuracy": accuracy}


def default_evaluator(variant="shapes", resolution=32):
    """The toy evaluator's file for this built-in dataset and resolution when toy.py exists (trained
    on first use), else None (pixel measures)."""
    name = f"evaluator-{variant}{'' if resolution == 32 else f'-{resolution}px'}.pt"
    return os.path.join(REPO, "runs", "toy", name) if os.path.exists(os.path.join(REPO, "toy.py")) else None


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

COLOURS = [(31, 80, 180), (200, 60, 40), (40, 150, 60), (150, 60, 170), (230, 140, 20), (20, 160, 170),
           (120, 120, 120), (0, 0, 0)]


def line_panels(panels, path, width=640, height=300, columns=2):
    """Several panels of lines, drawn with PIL. panels: dicts with title, xlabel, log_x (bool) and
    series: [(name, [(x, y, spread or None), ...])]; a spread is drawn as a vertical bar."""
    rows = -(-len(panels) // columns)
    image = Image.new("RGB", (width * columns, height * rows), "white")
    draw = ImageDraw.Draw(image)
    for k, panel in enumerate(panels):
        ox, oy = (k % columns) * width, (k // columns) * height
        left, right, top, bottom = ox + 60, ox + width - 130, oy + 28, oy + height - 36
        points = [(x, y, s) for _, series in panel["series"] for x, y, s in series if y is not None]
        if not points:
            continue
        fx = (lambda v: math.log10(v)) if panel.get("log_x") else (lambda v: v)
        xs = [fx(x) for x, _, _ in points]
        ys = [y + sgn * (s or 0) for _, y, s in points for sgn in (-1, 1)]
        x0, x1 = min(xs), max(max(xs), min(xs) + 1e-9)
        y0, y1 = min(ys), max(ys)
        y0, y1 = (y0, y1) if y1 - y0 > 1e-9 * max(1.0, abs(y1)) else (y0 - 0.5, y1 + 0.5)  # a flat line: a unit range
        y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)

        def px(x, y):
            return (left + (fx(x) - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

        draw.rectangle([left, top, right, bottom], outline=(150, 150, 150))
        for i in range(5):
            yv = y0 + i / 4 * (y1 - y0)
            draw.text((ox + 4, px(x0 if not panel.get("log_x") else 10 ** x0, yv)[1] - 6), f"{yv:.3g}", fill=(90, 90, 90))
            xv = x0 + i / 4 * (x1 - x0)
            label = 10 ** xv if panel.get("log_x") else xv
            draw.text((left + i / 4 * (right - left) - 12, bottom + 4), f"{label:.3g}", fill=(90, 90, 90))
        draw.text((left, oy + 8), panel["title"], fill=(0, 0, 0))
        draw.text((right - 80, bottom + 18), panel.get("xlabel", ""), fill=(0, 0, 0))
        for i, (name, series) in enumerate(panel["series"]):
            colour = COLOURS[i % len(COLOURS)]
            series = [(x, y, s) for x, y, s in series if y is not None]
            if len(series) > 1:
                draw.line([px(x, y) for x, y, _ in series], fill=colour, width=2)
            for x, y, s in series:
                u, v = px(x, y)
                draw.ellipse([u - 3, v - 3, u + 3, v + 3], fill=colour)
                if s:
                    draw.line([px(x, y - s), px(x, y + s)], fill=colour)
            draw.text((right + 8, top + 14 * i), name, fill=colour)
    image.save(path)


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

def train_and_evaluate(flags, train_images, num_samples, sample_steps, device, evaluator, out_json):
    """One training run with train.py's main, then every checkpoint it wrote evaluated from the same
    samples: the memorized fraction against train_images (evaluate.memorized_fraction, pixels) and
    the Quality numbers; the checkpoints are deleted once read (disk), the rows go to out_json."""
    import train  # here, not at the top: the workers import it, the lab's own process need not
    args = train.get_args(flags)
    train.main(args)
    ckpt_dir = os.path.join(args.output_dir, args.exp_name, "checkpoints")
    quality = Quality(evaluator, device=device, variant=args.builtin, resolution=args.resolution or 32)
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
