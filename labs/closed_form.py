"""Lab: closed-form flow matching (Bertrand et al., "On the closed-form of flow matching", arXiv
2506.03719) on this repository's REG model and built-in data, in three parts.

(a) The target gap, no training: on batches of built-in images at several resolutions (data
    dimension D = 3 R^2), the stochastic target eps - x against the closed-form target over M
    references of the sample's class (flow.closed_form_target: its own image + M - 1 others), and
    against the full class's v* (flow.closed_form_velocity): their per-dimension squared gap (what
    the closed form removes from the loss) and their cosine, at times t across [0, 1]. Measured
    here: they agree (cosine near 1) except towards the noise end, t -> 1, and the higher D, the
    later they part (README, "Closed-form flow matching").
(b) Training with each target: train.py's built-in preset with --target stochastic and with
    --target closed-form --cf-refs M, the same settings and seeds otherwise; sample quality
    (labs/common.py: the FID of toy.py's evaluator) and memorized fraction (evaluate.memorized_fraction) of the EMA's samples over steps.
(c) The closed-form sampler: flow.ClosedForm (v* over the whole training set, class-conditional)
    in place of the network, with Euler on the ODE as in (b) and with the SDE sampler; its memorized
    fraction should be about 1, and that of held-out real images, for scale, about 0. (The SDE's
    last, deterministic step from t = 0.04 leaves about 0.04 eps on each sample: with few steps its
    samples sit near, not on, training images, and may miss the 1/3 criterion; the ODE's do not.)

    python labs/closed_form.py                  # CPU: (b) and (c) on 16x16 shapes, 1,000 steps
    python labs/closed_form.py --device cuda    # one H200: 32x32 shapes
Writes runs/labs/closed_form/: closed_form.png, results.json / results.md (with the wall time, CPU
time and load), runs/ (per-run rows, logs).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import evaluate  # noqa: E402
from data import BuiltinShapes, ClassReferences  # noqa: E402
from flow import ClosedForm, closed_form_target, closed_form_velocity, sample_ode, sample_sde, start_noise  # noqa: E402
from util import ArgumentParser, number, to_uint8  # noqa: E402

# CPU: 10 minutes on 2 idle cores, sized from per-step costs (README.md, "Labs on a CPU"): (b) and
# (c) on 16x16 images, where SiT-T/4 has 16 tokens (32x32: 64), so that (b) trains 1,000 steps;
# cuda: 10 minutes on one H200, 32x32. `resolution` is that of (b) and (c); (a) runs at each of `resolutions`.
PRESETS = {
    "cpu": dict(resolutions=[8, 16, 32], ms=[4, 16, 64, 256], gap_batch=64, train_refs=64, resolution=16,
                steps=1000, batch=16, evals=5, samples=100, sample_steps=20, ema=0.99, parallel=2,
                sampler_samples=100),
    "cuda": dict(resolutions=[8, 16, 32], ms=[4, 16, 64, 256, 1024], gap_batch=512, train_refs=128, resolution=32,
                 steps=1000, batch=32, evals=5, samples=500, sample_steps=30, ema=0.99, parallel=6,
                 sampler_samples=1000),
}
TIMES = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]
TARGETS = ("stochastic", "closed-form")


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="picks the preset and the device")
    p.add_argument("--seeds", type=number(int, 0), nargs="+", default=[0, 1, 2], help="seeds of every part")
    p.add_argument("--num-images", type=number(int, 2), default=None, help="(b): train on the first N images; none: all 5000")
    p.add_argument("--out", default=os.path.join(common.REPO, "runs", "labs", "closed_form"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one training run, in its own process
    args = p.parse_args(argv)
    common.require_gpu(p, args.device)
    args.preset = PRESETS[args.device]
    return args


# ----------------------------------------------------------------------------- (a) the target gap

@torch.no_grad()
def target_gap(resolution, seed, p, device):
    """Per M (and "all": the class's v*): the squared gap per dimension and the cosine between the
    closed-form and the stochastic target at each time of TIMES, averaged over a batch."""
    data = BuiltinShapes(resolution=resolution)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(data), generator=g)[:p["gap_batch"]]
    pixels = torch.from_numpy(data.images).float() / 127.5 - 1  # (5000, 3, R, R): the data, in [-1, 1]
    x, y = pixels[rows].to(device), torch.from_numpy(data.labels)[rows]
    out = {}
    for m in [*p["ms"], "all"]:
        if m != "all":
            others = ClassReferences(data, m - 1, seed, 0)(y, step=0)[:, :, :3].to(device)  # (N, M - 1, 3, R, R)
        gaps, cosines = [], []
        for t in TIMES:
            noise = torch.randn(x.shape, generator=g).to(device)
            if m == "all":  # v* of the whole class at x_t
                cf = closed_form_velocity((1 - t) * x + t * noise, t, pixels, y=y, ref_labels=torch.from_numpy(data.labels))
            else:
                cf = closed_form_target(x, noise, torch.full((len(x),), t, device=device), others)
            st = noise - x
            gaps.append((cf - st).square().mean().item())
            cosines.append(torch.nn.functional.cosine_similarity(cf.flatten(1), st.flatten(1)).mean().item())
        out[str(m)] = dict(gap=gaps, cosine=cosines, mean_gap=float(np.mean(gaps)))
    return out


# ----------------------------------------------------------------------------- (b) training with each target

def job(target, seed, args):
    p = args.preset
    name = f"{target}-seed{seed}"
    flags = ["--output-dir", os.path.join(args.out, "runs"), "--exp-name", name, "--target", target,
             "--cf-refs", str(p["train_refs"]), "--global-batch-size", str(p["batch"]),
             "--resolution", str(p["resolution"]),
             "--max-train-steps", str(p["steps"]), "--checkpoint-every", str(p["steps"] // p["evals"]),
             "--sample-every", str(p["steps"]), "--log-every", str(max(1, p["steps"] // 20)), "--seed", str(seed),
             "--ema-decay", str(p["ema"]), "--no-compile"]
    flags += ["--num-images", str(args.num_images)] if args.num_images else []
    return dict(name=name, target=target, seed=seed, flags=flags, num_images=args.num_images, samples=p["samples"],
                sample_steps=p["sample_steps"], device=args.device, resolution=p["resolution"],
                out_json=os.path.join(args.out, "runs", f"{name}.json"))


def worker(spec):
    data = BuiltinShapes(resolution=spec["resolution"])
    train_images = (data.first(spec["num_images"]) if spec["num_images"] else data).images
    common.train_and_evaluate(spec["flags"], train_images, spec["samples"], spec["sample_steps"], spec["device"],
                              spec["out_json"])


# ----------------------------------------------------------------------------- (c) the closed-form sampler

@torch.no_grad()
def closed_form_samples(seed, p, args, quality, mode):
    """Samples of v* over the training set with the steps of (b)'s evaluations: Euler on the ODE as
    there ("ode"), whose last step lands exactly on E[x | x_t], or the SDE sampler ("sde")."""
    data = BuiltinShapes(resolution=p["resolution"])
    if args.num_images:
        data = data.first(args.num_images)
    latents = torch.from_numpy(data.images).to(args.device).double() / 127.5 - 1  # pixel space: latents = pixels
    model = ClosedForm(latents, torch.from_numpy(data.labels).to(args.device), null_label=data.num_classes)
    x, _, y = start_noise(range(p["sampler_samples"]), seed, (3, data.resolution, data.resolution),
                          num_classes=data.num_classes)
    x, y = x.double().to(args.device), y.to(args.device)
    if mode == "sde":
        z, _ = sample_sde(model, x, y, steps=p["sample_steps"], generator=torch.Generator(args.device).manual_seed(seed))
    else:
        z, _ = sample_ode(model, x, y, steps=p["sample_steps"], method="euler")
    images = to_uint8(z.float()).cpu()
    return {"mem_frac": evaluate.memorized_fraction(images, data.images), **quality(images, y)}


# ----------------------------------------------------------------------------- main

def main(args):
    clock, p, seeds = common.Clock(), args.preset, args.seeds
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    command = "python labs/closed_form.py " + " ".join(sys.argv[1:])
    quality = common.Quality(device=args.device, resolution=p["resolution"])  # trains the toy evaluator once, if absent
    # Phase (a): the gap between the targets, per resolution, M and seed.
    gap = {r: [target_gap(r, s, p, args.device) for s in seeds] for r in p["resolutions"]}
    # Phase (b): the training runs not done yet, then their rows.
    common.run_workers(os.path.abspath(__file__), [job(t, s, args) for t in TARGETS for s in seeds], p["parallel"])
    runs = {}
    for t in TARGETS:
        for s in seeds:
            with open(os.path.join(args.out, "runs", f"{t}-seed{s}.json")) as f:
                runs[(t, s)] = json.load(f)
    qkey = quality.main
    # Phase (c): the closed-form sampler, and held-out real images for scale.
    sampler = {mode: [closed_form_samples(s, p, args, quality, mode) for s in seeds] for mode in ("ode", "sde")}
    real, labels = quality.reference[:p["sampler_samples"]], quality.labels[:p["sampler_samples"]]
    train_data = BuiltinShapes(resolution=p["resolution"])
    train_images = (train_data.first(args.num_images) if args.num_images else train_data).images
    real_row = {"mem_frac": evaluate.memorized_fraction(real, train_images), **quality(real, labels)}

    # Tables: (a) per resolution and M, (b) per target at the last evaluation, (c) the sampler.
    table_a = []
    for r in p["resolutions"]:
        for m in [*map(str, p["ms"]), "all"]:
            mean_gap, sd = common.mean_std([g[m]["mean_gap"] for g in gap[r]])
            cos = np.mean([g[m]["cosine"] for g in gap[r]], 0)
            table_a.append(dict(resolution=r, dim=3 * r * r, refs=m, gap_mean_over_t=mean_gap, gap_sd=sd,
                                cos_t005=float(cos[0]), cos_t055=float(cos[5]), cos_t095=float(cos[-1])))
    table_b = []
    for t in TARGETS:
        last = [runs[(t, s)][-1] for s in seeds]
        row = dict(target=t, step=last[0]["step"])
        for key in ("mem_frac", *quality.names):
            row[key], row[f"{key}_sd"] = common.mean_std([r[key] for r in last])
        table_b.append(row)
    table_c = [dict(samples=f"closed-form sampler ({mode.upper()}, v* over the training set)",
                    **{k: common.mean_std([s[k] for s in rows])[0] for k in rows[0]},
                    **{f"{k}_sd": common.mean_std([s[k] for s in rows])[1] for k in rows[0]})
               for mode, rows in sampler.items()]
    table_c.append(dict(samples="held-out real images (for scale)", **real_row))
    cost = clock.record()
    header = f"Closed-form flow matching, `{command}` (preset {args.device}: {p}); seeds {seeds}; {common.cost_line(cost)}."
    common.write_tables(table_a, list(table_a[0]), args.out, "results_a", header + "\n\n(a) target gap")
    common.write_tables(table_b, list(table_b[0]), args.out, "results_b", "(b) last evaluation of each target")
    common.write_tables(table_c, list(table_c[0]), args.out, "results_c", "(c) memorized fraction and quality")
    md = "\n".join(open(os.path.join(args.out, f"results_{k}.md")).read() for k in "abc")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": command, "preset": p, "seeds": seeds, **cost, "a": table_a, "b": table_b, "c": table_c,
                   "gap_per_t": {str(r): gap[r] for r in gap}, "times": TIMES,
                   "runs": {f"{t}-seed{s}": rows for (t, s), rows in runs.items()}}, f, indent=1)
    for k in "abc":
        os.remove(os.path.join(args.out, f"results_{k}.md"))
        os.remove(os.path.join(args.out, f"results_{k}.json"))

    # The plot: (a) cosine against t per resolution (the class's v*), gap against M; (b) over steps.
    def over_steps(key):
        series = []
        for t in TARGETS:
            steps = [r["step"] for r in runs[(t, seeds[0])]]
            series.append((t, [(st, *common.mean_std([runs[(t, s)][i][key] for s in seeds])) for i, st in enumerate(steps)]))
        return series

    common.line_panels([
        dict(title="(a) cosine(closed-form v* of the class, eps - x) against t", xlabel="t",
             series=[(f"D = {3 * r * r}", [(t, *common.mean_std([g["all"]["cosine"][i] for g in gap[r]]))
                                          for i, t in enumerate(TIMES)]) for r in p["resolutions"]]),
        dict(title="(a) squared gap per dimension, mean over t, against M", xlabel="M references", log_x=True,
             series=[(f"D = {3 * r * r}", [(m, *common.mean_std([g[str(m)]["mean_gap"] for g in gap[r]]))
                                          for m in p["ms"]]) for r in p["resolutions"]]),
        dict(title=f"(b) {qkey} of the EMA's samples (lower is better)", xlabel="step", series=over_steps(qkey)),
        dict(title="(b) memorized fraction of the EMA's samples", xlabel="step", series=over_steps("mem_frac")),
    ], os.path.join(args.out, "closed_form.png"))
    print(md)


if __name__ == "__main__":
    a = get_args()
    worker(json.loads(a.worker)) if a.worker else main(a)
