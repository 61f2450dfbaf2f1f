"""Lab: does a representation-aligned latent space (ReaLS, arXiv 2502.00359) help SiT, and does it
add to REPA's and REG's alignment (REPA arXiv 2410.06940, REG arXiv 2507.01467) or overlap with it?

    python labs/reals.py                    # CPU: about 10 minutes on 2 idle cores (README, "ReaLS")
    python labs/reals.py --device cuda      # one GPU: a larger SiT, more steps and samples

Two toy KL-VAEs of the SD-VAE design are trained on the built-in hard shapes by toy.train_vae
(`python toy.py vae`), the same run but for the alignment to the toy teacher (align_coeff 0: plain;
ALIGN_COEFF: aligned, our reading of ReaLS, toy.py says which losses). Each is saved as a diffusers
AutoencoderKL folder, and the training images are prepared through it by data.prepare (which
measures the latent scale, as their configs have none). Then every arm (ARMS: SiT, SiT + REPA,
SiT + REG) trains on each latent space through train.main (`python train.py --data-path ...`),
same seeds and settings; the EMA of each checkpoint is sampled with sample.py's functions (SDE, no
guidance; flow.sample_sit through sample.generate), decoded by its VAE and scored by
toy.toy_metrics against held-out images.

Outputs in --out (default runs/labs/reals): results.json (every number, the wall time, the CPU
seconds and os.getloadavg() before and after), results.md (the tables), curves.png (toy FID and
conditional accuracy against steps), and the runs. Rerunning the command reuses what is done.
"""
import argparse
import json
import os
import resource
import shlex
import statistics
import sys

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # labs/, for common

import common  # noqa: E402
import data  # noqa: E402
import sample  # noqa: E402
import toy  # noqa: E402
import train  # noqa: E402
from encoder import load_vae  # noqa: E402
from flow import sde_generator  # noqa: E402
from model import read_checkpoint  # noqa: E402
from plot import line_plot  # noqa: E402
from util import ArgumentParser, number, run  # noqa: E402

# Each arm's own flags; nothing else differs between arms.
ARMS = {"SiT": ["--cls-coeff", "0", "--proj-coeff", "0"], "REPA": ["--cls-coeff", "0"], "REG": []}
# The two latent spaces: the toy VAE's alignment weight (toy.train_vae's align_coeff).
ALIGN_COEFF = 0.5
LATENTS = {"plain": 0.0, "aligned": ALIGN_COEFF}
COLOURS = {"SiT": (160, 160, 160), "REPA": (60, 150, 230), "REG": (240, 70, 60)}  # darker: the aligned latents
# The scale of each device. The toy VAE maps 32-pixel images to (4, 8, 8) latents, so a SiT of
# patch 2 has 16 tokens, on the grid of the teacher's 16 patches (8 pixels each).
SCALES = {
    "cpu": dict(model="SiT-T/2", steps=200, evals=2, batch=32, lr=1e-3, samples=150, sample_steps=15, vae_epochs=3,
                parallel=2),
    "cuda": dict(model="SiT-S/2", steps=1000, evals=5, batch=128, lr=5e-4, samples=1000, sample_steps=40,
                 vae_epochs=10, parallel=6),
}


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu", choices=sorted(SCALES), help="the scale (SCALES) and where it runs")
    p.add_argument("--seeds", type=number(int, 1), default=3, help="seeds per arm and latent space (0, 1, ...)")
    p.add_argument("--steps", type=number(int, 1), default=None, help="training steps per run; none: the scale's")
    p.add_argument("--out", default="runs/labs/reals", help="output folder")
    p.add_argument("--toy-dir", default="runs/toy", help="where the teacher and the evaluator are cached")
    p.add_argument("--parallel", type=number(int, 1), default=None, help="processes at once; none: the scale's")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one job, in its own process
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    args.argv = list(given)
    args.command = shlex.join(["python", "labs/reals.py", *given])
    args.scale = {**SCALES[args.device], **{k: v for k, v in (("steps", args.steps), ("parallel", args.parallel))
                                            if v is not None}}
    common.require_gpu(p, args.device)
    return args


def teachers(args):
    """The cached teacher's (patch 8: 16 tokens, as the SiT's) and scorer's files."""
    return os.path.join(args.toy_dir, "encoder-p8.pt"), os.path.join(args.toy_dir, "evaluator.pt")


def vae_dir(args, latent):
    return os.path.abspath(os.path.join(args.out, f"vae-{latent}"))


def run_name(latent, arm, seed):
    return f"{latent}-{arm}-seed{seed}"


def train_argv(args, latent, arm, seed):
    """train.py's command line for one run: the common settings, then the arm's own flags. The EMA
    decay, batch and learning rate are the built-in preset's (train.BUILTIN), made for short runs."""
    s = args.scale
    every = max(1, s["steps"] // s["evals"])
    return ["--data-path", os.path.join(args.out, f"data-{latent}"), "--model", s["model"],
            "--enc-type", "builtin-vit", "--enc-path", teachers(args)[0], "--max-train-steps", str(s["steps"]),
            "--checkpoint-every", str(every), "--sample-every", str(s["steps"]), "--log-every", str(max(1, every // 4)),
            "--global-batch-size", str(s["batch"]), "--lr", str(s["lr"]), "--ema-decay", "0.99", "--num-workers", "0",
            "--no-compile", "--seed", str(seed), "--output-dir", os.path.join(args.out, "runs"),
            "--exp-name", run_name(latent, arm, seed), *ARMS[arm]]


# ----------------------------------------------------------------------------- the two latent spaces

def write_image_folder(dst, variant="hard", role="train"):
    """The built-in training images as PNG files, one folder per class (what data.py prepare reads)."""
    if os.path.isfile(os.path.join(dst, "done")):
        return dst
    x, y = toy.images(variant, role)
    for i, (image, label) in enumerate(zip(x.permute(0, 2, 3, 1).numpy(), y.tolist())):
        folder = os.path.join(dst, f"{label:02d}")  # sorted folder names keep the labels
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.png"))
    open(os.path.join(dst, "done"), "w").close()
    return dst


@torch.no_grad()
def reconstruction_fid(vae, evaluator, n=1000):
    """Toy FID of held-out images reconstructed through the posterior mean, against the same images."""
    x, y = toy.images("hard", "reference", n)
    mean, _ = vae.encode(x.float() / 127.5 - 1)
    recon = torch.clamp(255 * (vae.decode(mean) + 1) / 2, 0, 255).to(torch.uint8)  # util.to_uint8
    return toy.toy_metrics(evaluator, recon, y, x)["fid"]


def vae_job(args, latent):
    """One toy VAE, trained and saved as a diffusers folder (toy.train_vae)."""
    folder = vae_dir(args, latent)
    if not os.path.isfile(os.path.join(folder, "toy_vae.json")):
        toy.train_vae(folder, teachers(args)[0], LATENTS[latent], epochs=args.scale["vae_epochs"],
                      device=args.device)


def prepare_latents(args, latent, evaluator):
    """The training images through the VAE folder (data.prepare measures its scale) -> its figures."""
    dst = os.path.join(args.out, f"data-{latent}")
    vae = load_vae(vae_dir(args, latent))
    os.makedirs(dst, exist_ok=True)
    data.prepare(os.path.join(args.out, "images"), dst, vae, vae_dir(args, latent), resolution=32, batch_size=500,
                 workers=0)
    with open(os.path.join(vae_dir(args, latent), "toy_vae.json")) as f:
        figures = json.load(f)
    with open(os.path.join(dst, "manifest.json")) as f:
        figures["scaling_factor"] = json.load(f)["scaling_factor"]
    figures["recon_fid"] = reconstruction_fid(vae, evaluator)
    return figures


# ----------------------------------------------------------------------------- runs

@torch.no_grad()
def sample_run(ckpt, num, steps, device, seed=10_000):
    """num samples of a checkpoint's EMA with sample.py's functions (flow.sample_sit, the SiT as it
    was trained): SDE, no guidance, fp32, decoded by the VAE its config names -> (uint8 (N, 3, R, R),
    labels (N,))."""
    args = sample.get_args(["--ckpt", ckpt, "--mode", "sde", "--num-steps", str(steps), "--cfg-scale", "1",
                            "--seed", str(seed), "--precision", "fp32"])
    model, vae_name, scale = sample.build_model(read_checkpoint(ckpt), args)
    model, vae = model.to(device), load_vae(vae_name).to(device)
    x, cls, y = sample.noise_and_labels(range(num), model, args, device)
    return sample.generate(model, vae, scale, x, cls, y, args, sde_generator(seed, 0, device)).cpu(), y.cpu()


def run_job(args, latent, arm, seed):
    """One run: train.py with the arm's flags on the latent space, then every checkpoint scored."""
    path = os.path.join(args.out, "runs", run_name(latent, arm, seed) + ".json")
    argv = train_argv(args, latent, arm, seed)
    if os.path.isfile(path):
        with open(path) as f:
            if json.load(f)["train_argv"] == argv:
                return
    device = torch.device(args.device)
    train.main(train.get_args(argv))
    evaluator = toy.load_evaluator(teachers(args)[1], device)
    reference, _ = toy.images("hard", "reference", args.scale["samples"])
    ckpt_dir = os.path.join(args.out, "runs", run_name(latent, arm, seed), "checkpoints")
    rows = []
    for name in sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".pt")):
        samples, labels = sample_run(os.path.join(ckpt_dir, name), args.scale["samples"], args.scale["sample_steps"],
                                     device)
        rows.append({"step": int(name[:-3]), **toy.toy_metrics(evaluator, samples, labels, reference)})
    usage = resource.getrusage(resource.RUSAGE_SELF)  # the idle cost of a run: its CPU seconds
    with open(path + ".tmp", "w") as f:
        json.dump({"train_argv": argv, "rows": rows, "cpu_seconds": usage.ru_utime + usage.ru_stime}, f)
    os.replace(path + ".tmp", path)  # whole or absent: an interrupted lab redoes this run


def worker(args, job):
    if job["kind"] == "vae":
        vae_job(args, job["latent"])
    else:
        run_job(args, job["latent"], job["arm"], job["seed"])


# ----------------------------------------------------------------------------- tables and plot

def summary(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": values}


def cell(s, digits=3):
    return f"{s['mean']:.{digits}g} ± {s['std']:.2g}"


def tables(vaes, results, args, seconds, cpu_seconds, load):
    lines = [f"`{args.command}`: {seconds / 60:.1f} min wall, {cpu_seconds / 60:.1f} CPU-minutes, load average "
             f"{load[0]:.1f} before and {load[1]:.1f} after (2 cores shared)", "",
             "| latent space | reconstruction PSNR (dB) | reconstruction toy FID | linear probe on the latent | "
             "measured scaling factor | VAE training (wall s) |", "|---|---|---|---|---|---|"]
    for latent, f in vaes.items():
        lines.append(f"| {latent} (align {LATENTS[latent]:g}) | {f['psnr']:.2f} | {f['recon_fid']:.3g} | "
                     f"{f['probe_accuracy']:.3f} | {f['scaling_factor']:.4g} | {f['seconds']:.0f} |")
    lines += ["", "| latent space | arm | step | toy FID | precision | recall | cond. accuracy |",
              "|---|---|---|---|---|---|---|"]
    final = {}
    for (latent, arm), runs in results.items():
        last = [r[-1] for r in runs]
        final[f"{latent} {arm}"] = row = {k: summary([r[k] for r in last]) for k in
                                          ("fid", "precision", "recall", "accuracy")}
        lines.append(f"| {latent} | {arm} | {last[0]['step']} | " +
                     " | ".join(cell(row[k]) for k in ("fid", "precision", "recall", "accuracy")) + " |")
    return final, "\n".join(lines) + "\n"


def plot(results, path):
    """Toy FID and conditional accuracy against steps: per run family the mean over seeds, and the
    band mean -/+ std; plain latents dashed colours, aligned ones the same colours darker."""
    panels = []
    for key, title in (("fid", "toy FID (lower is better)"), ("accuracy", "conditional accuracy (higher is better)")):
        series = []
        for (latent, arm), runs in results.items():
            steps = [r["step"] for r in runs[0]]
            values = [[run_[i][key] for run_ in runs] for i in range(len(steps))]
            mean = [statistics.fmean(v) for v in values]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            colour = tuple(c // (2 if latent == "aligned" else 1) for c in COLOURS[arm])
            series.append(dict(name=f"{arm}, {latent}", x=steps, y=mean, colour=colour, dots=True,
                               band=([m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)])))
        panels.append(dict(title=f"{title} against training steps; band: mean -/+ std over seeds", xlabel="step",
                           series=series))
    line_plot(panels, path, width=760, height=230)


# ----------------------------------------------------------------------------- the phases

def main(args):
    clock = common.Clock()  # wall and CPU time, load before and after
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    device = torch.device(args.device)

    # The teacher (for REPA, REG and the aligned VAE) and the scorer: trained once, cached.
    encoder_path, evaluator_path = teachers(args)
    if not os.path.isfile(encoder_path):
        toy.train_encoder(encoder_path, patch_size=8, device=device)
    if not os.path.isfile(evaluator_path):
        toy.train_evaluator(evaluator_path)
    evaluator = toy.load_evaluator(evaluator_path, device)

    # The two VAEs (side by side), then the training images prepared through each.
    for latent in LATENTS:
        os.makedirs(vae_dir(args, latent), exist_ok=True)
    jobs = [dict(kind="vae", latent=latent, name=f"vae-{latent}", argv=args.argv,
                 out_json=os.path.join(vae_dir(args, latent), "toy_vae.json")) for latent in LATENTS]
    common.run_workers(os.path.abspath(__file__), jobs, min(2, args.scale["parallel"]))
    write_image_folder(os.path.join(args.out, "images"))
    vaes = {latent: prepare_latents(args, latent, evaluator) for latent in LATENTS}

    # Every latent space x arm x seed through train.py, `parallel` at a time (logs: runs/<run>.json.log).
    keys = [(latent, arm, seed) for latent in LATENTS for arm in ARMS for seed in range(args.seeds)]
    jobs = [dict(kind="run", latent=latent, arm=arm, seed=seed, name=run_name(latent, arm, seed), argv=args.argv,
                 out_json=os.path.join(args.out, "runs", run_name(latent, arm, seed) + ".json"))
            for latent, arm, seed in keys]
    for job in jobs:  # scores made with other flags are dropped, so that run_workers redoes them
        if os.path.isfile(job["out_json"]):
            with open(job["out_json"]) as f:
                if json.load(f)["train_argv"] != train_argv(args, job["latent"], job["arm"], job["seed"]):
                    os.remove(job["out_json"])
    trained = sum(not os.path.isfile(job["out_json"]) for job in jobs)
    common.run_workers(os.path.abspath(__file__), jobs, args.scale["parallel"])
    results = {}
    for job in jobs:
        with open(job["out_json"]) as f:
            results.setdefault((job["latent"], job["arm"]), []).append(json.load(f)["rows"])

    # Outputs: the plot, the tables, every number.
    timing = clock.record()
    old = os.path.join(args.out, "results.json")
    if not trained and os.path.isfile(old):  # a rerun that only redrew: keep the timing of the run that trained
        with open(old) as f:
            saved = json.load(f)
        timing.update({k: saved[k] for k in timing if k in saved})
    plot(results, os.path.join(args.out, "curves.png"))
    final, markdown = tables(vaes, results, args, timing["seconds"], timing["cpu_seconds"],
                             (timing["loadavg_before"][0], timing["loadavg_after"][0]))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": args.command, "scale": args.scale, "seeds": args.seeds, "align_coeff": ALIGN_COEFF,
                   "kl_coeff": toy.KL_COEFF, "vaes": vaes, "final": final,
                   "curves": {f"{latent} {arm}": runs for (latent, arm), runs in results.items()},
                   **timing}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown)
    print(markdown + f"\ncurves.png, results.json and results.md in {args.out}")


if __name__ == "__main__":
    lab_args = get_args()
    if lab_args.worker:
        job = json.loads(lab_args.worker)
        run(worker, get_args(job["argv"]), job)
    else:
        run(main, lab_args)
