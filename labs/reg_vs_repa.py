"""Lab: does entangling one semantic token make a diffusion transformer learn faster? SiT, SiT + REPA
and SiT + REG (REG arXiv 2507.01467, Table 1) at a scale anyone can run, on the real digits (CPU) or
the built-in hard shapes (GPU); and what REG's token must carry to beat REPA (REG Tables 5 and 6),
with a second teacher, on the hard shapes.

    python labs/reg_vs_repa.py                        # CPU, 2 cores: SiT, REPA, REG, with and without labels (8x8 digits)
    python labs/reg_vs_repa.py --data hard            # CPU: the same on the 16x16 hard shapes (200 steps: at chance)
    python labs/reg_vs_repa.py --study tokens         # CPU: the token study (the rich teacher, Table 5 and 6 arms)
    python labs/reg_vs_repa.py --study variants       # CPU: Table 5 and 6 arms on the digits, label teacher
    python labs/reg_vs_repa.py --device cuda          # one GPU: 32x32 hard shapes, a larger SiT, more steps and samples

Every arm is `python train.py --builtin <data> --enc-type builtin-vit ...` through train.main, with
the same seeds and settings except its teacher and its own flags (ARMS): --cls-coeff 0 for REPA,
--cls-coeff 0 --proj-coeff 0 for plain SiT, --cls-target for the token variants of Table 5,
--proj-coeff 0 with the token for Table 6, and --cfg-prob 1 for the unconditional arms (the label
embedder then drops every label to the null one, so only REG's token can carry the class). The
teachers (encoder.BuiltinViT: "label", whose class token is trained on the class, and "rich", on the
class and every global attribute of the image) and the scorer (toy.ToyEvaluator) are trained by
toy.py when their files are missing and cached under runs/toy/. The EMA of every checkpoint is
sampled with flow.sample_sit (no guidance, the paper's protocol) and scored by toy.toy_metrics
against held-out images.

Outputs in --out (default runs/labs/reg_vs_repa, or runs/labs/reg_vs_repa-<study>): results.json
(with the time and the machine's load average before and after), results.md (mean +- std over
seeds, the command, the teachers' linear probes per attribute), curves.png (toy FID and conditional
accuracy against steps, one curve per arm, band = min..max over seeds), steering.png (does REG's
token steer the image's class, and its colour, position, size...?), and the runs. Rerunning the
command reuses finished runs (their scores, runs/<run>.json, made with the same flags).
"""
import argparse
import json
import os
import re
import shlex
import statistics
import sys
import time

import torch
import torch.nn as nn
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # labs/, for common.run_workers

import common  # noqa: E402
import toy  # noqa: E402
import train  # noqa: E402
from flow import interpolant, sample_sit, sde_generator, start_noise  # noqa: E402
from model import SiT_models, load_weights, read_checkpoint  # noqa: E402
from plot import line_plot  # noqa: E402
from util import ArgumentParser, number, run, save_grid  # noqa: E402

# Each arm: the teacher whose tokens it uses (toy.TEACHERS) and its own train.py flags; nothing else
# differs between arms. "<arm> uncond." is the same arm without labels (--cfg-prob 1).
BASE_ARMS = {
    "SiT": ("label", ["--cls-coeff", "0", "--proj-coeff", "0"]),
    "REPA": ("label", ["--cls-coeff", "0"]),
    "REG": ("label", []),
    # The token study: a teacher whose class token knows more than the label (toy.py, "rich").
    "REPA rich": ("rich", ["--cls-coeff", "0"]),
    "REG rich": ("rich", []),
    "REG rich, patch mean": ("rich", ["--cls-target", "patch-mean"]),  # REG Table 5
    "REG rich, learned token": ("rich", ["--cls-target", "learned"]),  # REG Table 5
    "REG rich, latent mean": ("rich", ["--cls-target", "latent-mean"]),  # REG Table 5
    "REG rich, no alignment": ("rich", ["--proj-coeff", "0"]),  # REG Table 6: the token without REPA
    # The same variants with the label teacher: the only teacher of a world without attributes (the digits).
    "REG, patch mean": ("label", ["--cls-target", "patch-mean"]),
    "REG, learned token": ("label", ["--cls-target", "learned"]),
    "REG, latent mean": ("label", ["--cls-target", "latent-mean"]),
    "REG, no alignment": ("label", ["--proj-coeff", "0"]),
}
ARMS = {**BASE_ARMS, **{f"{arm} uncond.": (teacher, [*flags, "--cfg-prob", "1"])
                        for arm, (teacher, flags) in BASE_ARMS.items()}}
# The arms of each study. "main" (the plain command): SiT, REPA and REG, with and without labels, so
# that the token's own effect without labels (REG uncond. against REPA uncond.) is measured too.
# "tokens": what REG's token must carry to beat REPA (REG Tables 5 and 6) with the rich teacher;
# "tokens-uncond": the same arms without labels (two commands, so that each fits 15 minutes on 2 cores).
# "variants" (and "-uncond"): Tables 5 and 6 with the label teacher, in a world without attributes
# (the CPU's digits, where the accuracy leaves chance); the main study gives their SiT, REPA and REG.
STUDIES = {
    "main": ["SiT", "REPA", "REG", "SiT uncond.", "REPA uncond.", "REG uncond."],
    "tokens": [arm for arm in BASE_ARMS if "rich" in arm],
    "tokens-uncond": [f"{arm} uncond." for arm in BASE_ARMS if "rich" in arm],
    "variants": [arm for arm in BASE_ARMS if arm.startswith("REG, ")],
    "variants-uncond": [f"{arm} uncond." for arm in BASE_ARMS if arm.startswith("REG, ")],
}
DEFAULT_ARMS = STUDIES["main"]
PALETTE = [(120, 120, 120), (31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (23, 190, 207), (188, 189, 34)]
COLOURS = {arm: PALETTE[i % len(PALETTE)] for i, arm in enumerate(BASE_ARMS)}
COLOURS.update({f"{arm} uncond.": tuple(c // 2 + 64 for c in colour) for arm, colour in COLOURS.items()})
# The scale of each device and world (--data): the world's resolution, the SiT, its training and its
# evaluation, the teachers' and the scorer's pretraining, and how many runs go at once. A SiT-S/4 step at
# batch 128 is launch-bound on an H200 (about 55 ms, the GPU mostly idle), so the cuda scales run all
# their runs side by side in their own processes (a study's 18 runs: 67 GB of GPU memory, measured).
# The 2-core CPU scales are smaller: two runs at a time, one thread each. On the hard shapes (16x16,
# SiT-T/4, 200 steps; a step costs about 0.3 s of one core) every arm stays at chance accuracy; the real digits (data.Digits) at 8x8 are learned within the
# CPU budget, so they are the CPU default (README, the lab, says how each was sized).
SCALES = {
    ("cpu", "digits"): dict(resolution=8, model="SiT-T/2", steps=400, evals=4, batch=32, lr=1e-3, samples=200,
                            sample_steps=10, teacher_images=3000, teacher_epochs=4, evaluator_epochs=8, parallel=2),
    ("cpu", "hard"): dict(resolution=16, model="SiT-T/4", steps=200, evals=2, batch=64, lr=1e-3, samples=200,
                          sample_steps=10, teacher_images=3000, teacher_epochs=4, evaluator_epochs=4, parallel=2),
    ("cuda", "hard"): dict(resolution=32, model="SiT-S/4", steps=1000, evals=5, batch=128, lr=5e-4, samples=1000,
                           sample_steps=40, teacher_images=5000, teacher_epochs=5, evaluator_epochs=4, parallel=18),
    # Not measured: the hard shapes' GPU settings on the digits (their 3,000 training images, 1,000 to score).
    ("cuda", "digits"): dict(resolution=32, model="SiT-S/4", steps=1000, evals=5, batch=128, lr=5e-4, samples=1000,
                             sample_steps=40, teacher_images=3000, teacher_epochs=5, evaluator_epochs=8, parallel=18),
}
# The world of the plain command on each device (the token studies need the hard shapes' attributes).
DEFAULT_DATA = {"cpu": "digits", "cuda": "hard"}


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu", choices=sorted(DEFAULT_DATA), help="the scale (SCALES) and where it runs")
    p.add_argument("--data", default=None, choices=["digits", "hard"], help="the world: the real digits or the hard "
                   "shapes; none: the hard shapes for the token studies, else the device's (DEFAULT_DATA)")
    p.add_argument("--seeds", type=number(int, 1), default=3, help="seeds per arm (0, 1, ...)")
    p.add_argument("--study", default="main", choices=sorted(STUDIES), help="which arms (STUDIES): main; tokens "
                   "(the rich teacher and REG's token variants); variants (the token variants, label teacher); "
                   "each but main also -uncond (without labels)")
    p.add_argument("--arms", nargs="+", default=None, choices=list(ARMS), help="which arms; none: the study's")
    p.add_argument("--steps", type=number(int, 1), default=None, help="training steps per run; none: the scale's")
    p.add_argument("--samples", type=number(int, 4), default=None, help="samples per evaluation; none: the scale's")
    p.add_argument("--out", default=None, help="output folder; none: runs/labs/reg_vs_repa (main) or "
                   "runs/labs/reg_vs_repa-<study>")
    p.add_argument("--toy-dir", default="runs/toy", help="where the teacher and the evaluator are cached")
    p.add_argument("--parallel", type=number(int, 1), default=None, help="runs at once, each in its own process; "
                   "none: the scale's")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one run, in its own process (run_workers)
    args = p.parse_args(argv)
    args.arms = args.arms or STUDIES[args.study]
    args.out = args.out or "runs/labs/reg_vs_repa" + ("" if args.study == "main" else f"-{args.study}")
    given = sys.argv[1:] if argv is None else argv
    args.argv = list(given)  # a worker rebuilds these args from them
    args.command = shlex.join(["python", "labs/reg_vs_repa.py", *given])  # what the tables quote
    args.data = args.data or ("hard" if args.study.startswith("tokens") else DEFAULT_DATA[args.device])
    if args.data != "hard" and any(ARMS[arm][0] == "rich" for arm in args.arms):
        p.error(f"the rich teacher learns the hard shapes' attributes, which the {args.data} lack; give --data hard")
    args.scale = {**SCALES[args.device, args.data], **{k: v for k, v in (("steps", args.steps), ("samples", args.samples),
                                                              ("parallel", args.parallel)) if v is not None}}
    common.require_gpu(p, args.device)
    if min(args.seeds, args.scale["steps"], args.scale["samples"]) < 1:
        p.error("--seeds, --steps and --samples must be at least 1")
    return args


def train_argv(args, arm, seed, encoder_path=None):
    """train.py's command line for one run: the common settings, then the arm's own flags; the
    encoder is the arm's teacher (encoder_file) unless encoder_path is given."""
    s = args.scale
    every = max(1, s["steps"] // s["evals"])
    encoder_path = encoder_path or encoder_file(args, ARMS[arm][0])
    return ["--builtin", args.data, "--resolution", str(s["resolution"]), "--model", s["model"], "--enc-type",
            "builtin-vit", "--enc-path", encoder_path,
            "--max-train-steps", str(s["steps"]), "--checkpoint-every", str(every), "--sample-every", str(s["steps"]),
            "--log-every", str(max(1, every // 4)), "--global-batch-size", str(s["batch"]), "--lr", str(s["lr"]),
            "--no-compile",  # short runs: compiling (about a minute per run) would cost more than it saves
            "--seed", str(seed), "--output-dir", os.path.join(args.out, "runs"),
            "--exp-name", run_name(arm, seed), *ARMS[arm][1]]


def patch_size(args):
    """The SiT's patch ("SiT-S/4" -> 4), which the teacher's patches must match."""
    return int(args.scale["model"].split("/")[1])


def encoder_file(args, teacher):
    """The cached file of one teacher (toy.TEACHERS) of this world at this scale's resolution and patch size."""
    return os.path.join(args.toy_dir, f"encoder-{teacher}-{world(args)}{args.scale['resolution']}px-p{patch_size(args)}.pt")


def evaluator_file(args):
    """The cached scorer's file of this world at this scale's resolution and training epochs: named by
    all three, since another lab (labs/common.py) caches its own scorer of the same world in runs/toy."""
    s = args.scale
    return os.path.join(args.toy_dir, f"evaluator-{world(args)}{s['resolution']}px-{s['evaluator_epochs']}ep.pt")


def world(args):
    """The world's part of a cached file's name: none for the hard shapes (the lab's first world)."""
    return "" if args.data == "hard" else f"{args.data}-"


def run_json(args, arm, seed):
    """Where one run's scores go: the rows of evaluate_run and the train.py flags that made them."""
    return os.path.join(args.out, "runs", run_name(arm, seed) + ".json")


def finished(path, argv):
    """Whether `path` holds the scores of a run that train.py made with exactly these flags; scores
    made with other flags are removed, so that the run is redone."""
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        if json.load(f)["train_argv"] == argv:
            return True
    os.remove(path)
    return False


def run_name(arm, seed):
    return f"{re.sub('[^A-Za-z0-9]+', '-', arm).strip('-')}-seed{seed}"  # "REG-rich-patch-mean-uncond-seed0"


def unconditional(arm):
    return "--cfg-prob" in ARMS[arm][1]


# ----------------------------------------------------------------------------- evaluation

def load_ema(path, device):
    """The EMA SiT of a train.py checkpoint, and its config."""
    ckpt = read_checkpoint(path)
    config = dict(ckpt["config"])
    model = SiT_models[config.pop("model")](**{k: v for k, v in config.items() if k not in ("vae", "scaling_factor", "enc_type")})
    model.load_state_dict(load_weights(ckpt))
    return model.to(device).eval().requires_grad_(False), ckpt["config"]


@torch.no_grad()
def generate(model, indices, seed, unconditional, device, steps, batch_size=500, token=None):
    """uint8 samples (N, 3, R, R) and the labels asked for (N,), from flow.start_noise (sample i's
    noise depends on (seed, i) only; label i mod 10, or the null label for an unconditional model).
    token: an optional nn.Module wrapper class that replaces the class token the SiT reads."""
    size, images, labels = model.grid_size * model.patch_size, [], []
    for k, start in enumerate(range(0, len(indices), batch_size)):
        part = indices[start:start + batch_size]
        x, cls, y = start_noise(part, seed, (model.in_channels, size, size), model.z_dim if model.cls_token else None,
                                model.num_classes)
        asked = torch.full_like(y, model.num_classes) if unconditional else y
        net = model if token is None else token(model, cls.to(device))
        z, _ = sample_sit(net, x.to(device), asked.to(device), None if cls is None else cls.to(device), steps=steps,
                          generator=sde_generator(seed, k, device))
        images.append(torch.clamp(255 * (z.float() + 1) / 2, 0, 255).to(torch.uint8).cpu())  # util.to_uint8
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def checkpoints(run_dir):
    """A run's checkpoint files, by step (train.py names them by the zero-padded step)."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    return [os.path.join(ckpt_dir, f) for f in sorted(os.listdir(ckpt_dir)) if f.endswith(".pt")]


def evaluate_run(run_dir, unconditional, evaluator, reference, args, device):
    """toy_metrics of the EMA at every checkpoint of a run -> [{step, fid, precision, recall, accuracy}]."""
    rows = []
    for path in checkpoints(run_dir):
        model, _ = load_ema(path, device)
        samples, labels = generate(model, range(args.scale["samples"]), 10_000, unconditional, device,
                                   args.scale["sample_steps"])
        numbers = toy.toy_metrics(evaluator, samples, labels, reference)
        if unconditional:  # no class was asked for: the share of the commonest class says if all are made
            numbers["accuracy"] = None
            numbers["top_class_share"] = torch.bincount(evaluator(samples.to(device))[1].argmax(1), minlength=10
                                                        ).max().item() / len(samples)
        rows.append({"step": int(os.path.basename(path)[:-3]), **numbers})
    return rows


# ----------------------------------------------------------------------------- does the token steer the image?

class GivenToken(nn.Module):
    """The SiT, reading a class token that we choose instead of the one it is sampling.

    mode "other": at time t it reads alpha_t * c + sigma_t * n, the noisy path of another sample's
    clean generated token c (with that sample's own start noise n): the image is made to go with
    someone else's token. mode "noise": it reads fresh Gaussian noise at every step, a token that
    carries nothing. The samplers treat the model as a function, so no sampler hook is needed.
    """

    def __init__(self, model, mode, clean=None, start=None, seed=0):
        super().__init__()
        self.model, self.mode, self.clean, self.start = model, mode, clean, start
        self.generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
        self.num_classes, self.shifts = model.num_classes, model.shifts  # what flow.sample_sit reads of a SiT

    def forward(self, x, t, y, cls):
        if self.mode == "other":
            alpha, sigma, _, _ = interpolant(t[:, None].to(self.clean.dtype))
            cls = (alpha * self.clean + sigma * self.start).to(cls.dtype)
        else:
            cls = torch.randn(cls.shape, generator=self.generator, device=cls.device, dtype=cls.dtype)
        return self.model(x, t, y, cls)


@torch.no_grad()
def steering(model, unconditional, evaluator, device, steps, n=200, shown=8, reader=None):
    """The same start noise sampled three ways: with its own token, with the next sample's token,
    with a token re-drawn as noise at each step. -> (images of `shown` samples per way, numbers):
    the share of images whose class (by the evaluator) follows the token's donor or stays its own,
    and, with a toy.AttributeReader, per attribute the share of images given the donor's token whose
    attribute lies nearer the donor's own image's than their own image's (0: the token moves
    nothing, the start noise decides; 1: the attribute follows the token)."""
    size = model.grid_size * model.patch_size
    indices = list(range(n))
    x, cls, y = start_noise(indices, 20_000, (model.in_channels, size, size), model.z_dim, model.num_classes)
    x, cls = x.to(device), cls.to(device)
    y = (torch.full_like(y, model.num_classes) if unconditional else y).to(device)
    donor = torch.roll(torch.arange(n), -1)  # sample i is given the token of sample i + 1

    def sample(net):
        z, c = sample_sit(net, x, y, cls, steps=steps, generator=sde_generator(20_000, 0, device))
        return torch.clamp(255 * (z.float() + 1) / 2, 0, 255).to(torch.uint8), c

    own, tokens = sample(model)
    other, _ = sample(GivenToken(model, "other", clean=tokens[donor].double(), start=cls[donor].double()))
    noise, _ = sample(GivenToken(model, "noise", seed=1))
    classes = {name: evaluator(images)[1].argmax(1).cpu() for name, images in
               (("own", own), ("other", other), ("noise", noise))}
    numbers = {"other token: class of the donor": (classes["other"] == classes["own"][donor]).double().mean().item(),
               "other token: class kept": (classes["other"] == classes["own"]).double().mean().item(),
               "noise token: class kept": (classes["noise"] == classes["own"]).double().mean().item(),
               "chance": 0.1}
    if reader is not None:
        read = {name: reader(images) for name, images in (("own", own), ("other", other))}
        for attribute in read["own"]:
            own_a, other_a = read["own"][attribute], read["other"][attribute]  # (n, k) in std units
            nearer = (other_a - own_a[donor]).norm(dim=1) < (other_a - own_a).norm(dim=1)
            numbers[f"other token: {attribute} nearer the donor's"] = nearer.double().mean().item()
    return torch.stack([own[:shown], other[:shown], noise[:shown]]).cpu(), numbers


def save_steering(rows, numbers, path, scale=3):
    """The three rows of `steering` side by side, enlarged, each named on its left."""
    grid_path = path + ".grid.png"
    save_grid(rows.flatten(0, 1), grid_path, nrow=rows.shape[1])
    grid = Image.open(grid_path)
    os.remove(grid_path)
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    names = ["own token", "next sample's token", "noise token"]
    lines = [f"{k}: {v:.2f}" for k, v in numbers.items()]
    image = Image.new("RGB", (max(grid.width + 170, 420), grid.height + 16 + 14 * len(lines)), "white")
    image.paste(grid, (170, 0))
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(names):
        draw.text((6, (i + 0.5) * grid.height / 3 - 6), name, fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((6, grid.height + 8 + 14 * i), line, fill=(0, 0, 0))
    image.save(path)


# ----------------------------------------------------------------------------- plot and tables

def plot(results, path):
    """Toy FID and conditional accuracy against steps: per arm the mean over seeds (a line) and
    the band from the smallest to the largest seed."""
    panels = []
    for key, title in (("fid", "toy FID (lower is better)"), ("accuracy", "conditional accuracy (higher is better)")):
        series = []
        for arm, runs in results.items():
            points = per_step(runs, key)  # [(step, [value per seed])]
            if points:
                steps, values = zip(*points)
                series.append(dict(name=arm, colour=COLOURS[arm], x=steps, y=[statistics.fmean(v) for v in values],
                                   band=([min(v) for v in values], [max(v) for v in values]), dots=True))
        panels.append(dict(title=f"{title} against training steps; band: min..max over seeds", series=series))
    line_plot(panels, path, width=760, height=230)


def per_step(runs, key):
    """[(step, [value of each seed])] for the steps every seed has; empty when the key is None."""
    steps = sorted(set.intersection(*[{r["step"] for r in run_ if r.get(key) is not None} for run_ in runs]))
    return [(s, [next(r[key] for r in run_ if r["step"] == s) for run_ in runs]) for s in steps]


def summary(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": values}


def tables(results, command):
    """The last evaluation of every arm, mean and std over seeds -> (JSON-able dict, markdown)."""
    keys = ("fid", "precision", "recall", "accuracy", "top_class_share")
    final = {}
    for arm, runs in results.items():
        last = [run_[-1] for run_ in runs]
        final[arm] = {"step": last[0]["step"], **{k: summary([r[k] for r in last]) for k in keys
                                                  if last[0].get(k) is not None}}
    lines = [f"`{command}`", "", "| arm | step | toy FID | precision | recall | cond. accuracy | top-class share |",
             "|---|---|---|---|---|---|---|"]
    for arm, row in final.items():
        cells = [f"{row[k]['mean']:.3g} ± {row[k]['std']:.2g}" if k in row else "—" for k in keys]
        lines.append(f"| {arm} | {row['step']} | " + " | ".join(cells) + " |")
    return final, "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the phases

def one_run(args, arm, seed, evaluator, reference, start):
    """One run: train.py with the arm's flags, then every checkpoint's EMA scored -> run_json (the
    rows and the flags); a run whose scores are there already is not redone."""
    path, argv = run_json(args, arm, seed), train_argv(args, arm, seed)
    if finished(path, argv):
        return
    print(f"[lab {time.time() - start:.0f} s] {arm}, seed {seed}: python train.py {' '.join(argv)}", flush=True)
    train.main(train.get_args(argv))
    run_dir = os.path.join(args.out, "runs", run_name(arm, seed))
    rows = evaluate_run(run_dir, unconditional(arm), evaluator, reference, args, torch.device(args.device))
    with open(path + ".tmp", "w") as f:
        json.dump({"train_argv": argv, "rows": rows}, f)
    os.replace(path + ".tmp", path)  # whole or absent: an interrupted lab redoes this run
    # Scored: only the last checkpoint is read again (steering). At the GPU scale each is 0.5 GB, and
    # 18 runs side by side keeping all five filled a 64 GB disk.
    for path_ in checkpoints(run_dir)[:-1]:
        os.remove(path_)
    print(f"[lab] {arm}, seed {seed}: {rows[-1]}", flush=True)


def worker(args, job):
    """`--worker JSON`: one run in its own process, with the teachers and scorer main() made."""
    evaluator = toy.load_evaluator(evaluator_file(args), torch.device(args.device))
    reference, _ = toy.images(args.data, "reference", args.scale["samples"], args.scale["resolution"])
    one_run(args, job["arm"], job["seed"], evaluator, reference, time.time())


def make_teachers(args, device):
    """Each teacher the arms use, and the scorer: trained once, cached (toy.py prints their quality
    figures) -> {teacher: its probe table (toy.probe_table)}."""
    s, probes = args.scale, {}
    for teacher in sorted({ARMS[arm][0] for arm in args.arms}):
        path = encoder_file(args, teacher)
        if not os.path.isfile(path):
            toy.train_encoder(path, variant=args.data, resolution=s["resolution"], patch_size=patch_size(args), teacher=teacher,
                              num_images=s["teacher_images"], epochs=s["teacher_epochs"], device=device)
        probes[teacher] = torch.load(path, map_location="cpu", weights_only=True).get("probes")
    if not os.path.isfile(evaluator_file(args)):
        toy.train_evaluator(evaluator_file(args), variant=args.data, resolution=s["resolution"], epochs=s["evaluator_epochs"])
    return probes


def probe_markdown(probes):
    names = [k for k in next(iter(probes.values()))]
    lines = ["| teacher | " + " | ".join(f"{k} ({'accuracy' if k == 'class' else 'R²'})" for k in names) + " |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {teacher} | " + " | ".join(f"{table[k]:.3f}" for k in names) + " |" for teacher, table in probes.items()]
    return "\n".join(lines) + "\n"


def main(args):
    device = torch.device(args.device)
    clock = common.Clock()  # wall and CPU time, load before and after
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    command = args.command

    # The teachers and the scorer, and what each teacher's class token carries (linear probes).
    probes = make_teachers(args, device)
    evaluator = toy.load_evaluator(evaluator_file(args), device)
    reference, _ = toy.images(args.data, "reference", args.scale["samples"], args.scale["resolution"])

    # Training: every arm and seed through train.py, then the EMA of each checkpoint scored (one_run);
    # here one after another, or `parallel` at a time in their own processes (logs: runs/<run>.json.log).
    jobs = [dict(name=run_name(arm, seed), arm=arm, seed=seed, argv=args.argv, out_json=run_json(args, arm, seed))
            for arm in args.arms for seed in range(args.seeds)]
    for job in jobs:  # scores made with other flags (another --steps, say) are dropped here, since
        # run_workers skips every run whose file exists; their runs are redone
        finished(job["out_json"], train_argv(args, job["arm"], job["seed"]))
    if args.scale["parallel"] == 1:
        for job in jobs:
            one_run(args, job["arm"], job["seed"], evaluator, reference, clock.start)
    else:
        print(f"[lab] {len(jobs)} runs, {args.scale['parallel']} at a time; logs in {args.out}/runs/*.json.log", flush=True)
        common.run_workers(os.path.abspath(__file__), jobs, args.scale["parallel"])
    results = {}
    for job in jobs:
        with open(job["out_json"]) as f:
            results.setdefault(job["arm"], []).append(json.load(f)["rows"])

    # Does the token steer the image, and which attributes does it carry? The last EMA of seed 0 of
    # the first REG arm (the rich teacher's first, unconditional first), read by the evaluator and
    # an attribute reader on its features.
    steer = {}
    reg_arms = [arm for arm in args.arms if arm.startswith("REG") and "," not in arm]
    reg_arms.sort(key=lambda arm: (ARMS[arm][0] != "rich", not unconditional(arm)))
    if reg_arms:
        arm = reg_arms[0]
        reader = toy.AttributeReader(evaluator, args.data, args.scale["resolution"]) if args.data == "hard" else None
        ckpt_dir = os.path.join(args.out, "runs", run_name(arm, 0), "checkpoints")
        model, _ = load_ema(train.latest_checkpoint(ckpt_dir), device)
        rows, steer = steering(model, unconditional(arm), evaluator, device, args.scale["sample_steps"], reader=reader)
        save_steering(rows, steer, os.path.join(args.out, "steering.png"))
        steer = {"arm": arm, **steer, **({"reader R^2 (held out)": reader.r2} if reader else {})}

    # Outputs: the plot, the tables, the probes, the steering numbers, the time and the machine's load.
    plot(results, os.path.join(args.out, "curves.png"))
    final, markdown = tables(results, command)
    markdown += "\nLinear probes on each teacher's class token (held out; chance: class 0.10, R² 0):\n\n" + \
        probe_markdown(probes) if all(probes.values()) else ""
    timing = clock.record()
    markdown += f"\n{common.cost_line(timing)}\n"
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": command, "scale": args.scale, "seeds": args.seeds, "final": final, "curves": results,
                   "probes": probes, "steering": steer, **timing}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown)
    print(markdown + (f"\nsteering ({steer['arm']}): {steer}\n" if steer else "") +
          f"\ncurves.png, {'steering.png, ' if steer else ''}results.json and results.md in {args.out}")


if __name__ == "__main__":
    lab_args = get_args()
    if lab_args.worker:  # the job names the lab's own flags: the worker rebuilds the same args from them
        job = json.loads(lab_args.worker)
        run(worker, get_args(job["argv"]), job)
    else:
        run(main, lab_args)
