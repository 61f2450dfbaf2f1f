"""Images from a checkpoint (REG, arXiv 2507.01467): a PNG grid, or the paper's FID samples as an
.npz that evaluate.py and ADM's evaluator (arXiv 2105.05233) read.

The defaults are the paper's protocol: SDE Euler-Maruyama, 250 steps, CFG 2.3 on t in [0, 0.85]
(t = 1 is noise), the class token guided like the image, the EMA weights.
A grid, one row per class, from one of our runs or from the official release:
    python sample.py --ckpt runs/SiT-T-4-builtin/checkpoints/0000500.pt --num-steps 50
    python sample.py --ckpt REG_XL_2.pt --classes 207 360 387 974 88 979 417 279 --cfg-scale 4
The paper's FID-50K on 8 GPUs, sampled and evaluated in one command (the .npz and the results line
go to samples/, named after the checkpoint and the settings):
    torchrun --nproc_per_node=8 sample.py --ckpt REG_XL_2.pt --num-samples 50000 \\
        --eval-ref VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth
The paper's no-guidance protocol (its SiT / REPA / REG comparisons): the same with --cfg-scale 1.
Sample i's noise comes from (--seed, i) and its label is i mod the number of classes, so the .npz
does not depend on the number of GPUs, and rerunning a command resumes an interrupted run.
Precision: bf16 autocast on GPU by default; --precision fp32 is the release's arithmetic (fp32
with TF32 matmuls, see --tf32).
"""
import argparse
import json
import os
import zipfile

import numpy as np
import torch
from tqdm import tqdm

import evaluate
from encoder import load_vae
from flow import sample_sit, sde_generator, start_noise
from model import SiT_models, load_weights, read_checkpoint
from util import ArgumentParser, UserError, barrier, cleanup_processes, number, run, save_grid, setup_processes, to_uint8


def make_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", default=None, help="checkpoint .pt written by train.py or the official release (required)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="sample the EMA weights; --no-ema: the raw model's")
    p.add_argument("--out", default=None, help="output .png (grid) or .npz (--num-samples); none: "
                   "samples/<checkpoint>-<settings>")
    g = p.add_argument_group("model, for official checkpoints (ours record their own)")
    g.add_argument("--model", default="SiT-XL/2", choices=sorted(SiT_models), help="SiT size / patch size")
    g.add_argument("--resolution", type=number(int, 8, multiple=8), default=256, help="image side")
    g.add_argument("--num-classes", type=number(int, 1), default=1000, help="classes (the null label is this number)")
    g.add_argument("--encoder-depth", type=number(int, 1), default=8, help="block the projector reads")
    g.add_argument("--z-dim", type=number(int, 1), default=768, help="width of the DINOv2 tokens (768 for ViT-B)")
    g.add_argument("--vae", default="sd-vae-ft-ema", help="VAE the latents decode with")
    p.add_argument("--vae-path", default=None, help="local VAE weights folder or file; none: the HF hub cache")
    s = p.add_argument_group("sampler")
    s.add_argument("--mode", default="sde", choices=["sde", "ode"], help="sde: Euler-Maruyama; ode: Euler or Heun")
    s.add_argument("--num-steps", type=number(int, 1), default=250, help="sampler steps (the SDE: model evaluations per sample)")
    s.add_argument("--heun", action="store_true", help="ODE: Heun's method instead of Euler's")
    s.add_argument("--cfg-scale", type=number(float, 1), default=2.3, help="classifier-free guidance (1: none, the paper's no-guidance protocol)")
    s.add_argument("--cls-cfg-scale", type=number(float, 0), default=None,
                   help="guidance of the class token; none: equal to --cfg-scale; 0: its conditional velocity")
    s.add_argument("--guidance-low", type=number(float, 0, 1), default=0.0, help="guide only for t in [low, high]")
    s.add_argument("--guidance-high", type=number(float, 0, 1), default=0.85, help="guide only for t in [low, high]")
    s.add_argument("--path-type", default="linear", choices=["linear", "cosine"],
                   help="interpolant the checkpoint was trained with (the SDE's score depends on it)")
    s.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="bf16: autocast on GPU; fp32: the release's arithmetic (with --tf32); CPU samples in fp32")
    s.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="let fp32 matmuls and convolutions on GPU use TF32, as the release's sampling does; "
                        "--precision fp32 --no-tf32 is strict fp32")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the SiT; none: for the .npz on GPU, where its minute of compiling pays "
                        "back, not for grids or on CPU")
    o = p.add_argument_group("output")
    o.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="seeds every sample's noise")
    o.add_argument("--classes", type=number(int, 0), nargs="*", default=None, help="grid: one row per class; none: the first 8")
    o.add_argument("--per-class", type=number(int, 1), default=8, help="grid: samples per class")
    o.add_argument("--num-samples", type=number(int, 0), default=0,
                   help="write this many samples to an .npz (0: a grid); a multiple of the classes holds each equally often")
    o.add_argument("--per-proc-batch-size", type=number(int, 1), default=64, help="samples per process and batch "
                   "(also the Inception's batch with --eval-ref)")
    e = p.add_argument_group("evaluation of the .npz (evaluate.py), after sampling")
    e.add_argument("--eval-ref", default=None, help="ADM's reference batch, e.g. VIRTUAL_imagenet256_labeled.npz")
    e.add_argument("--inception", default=None, help="the FID Inception weights, pt_inception-2015-12-05-6726825d.pth")
    return p


def get_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    if args.cls_cfg_scale is None:
        args.cls_cfg_scale = args.cfg_scale
    if args.mode == "sde" and args.num_steps < 2:  # its last step is deterministic
        p.error(f"argument --num-steps: {args.num_steps} is out of range for --mode sde; give an int in [2, inf)")
    if args.guidance_low > args.guidance_high:  # each lies in [0, 1] (util.number)
        p.error(f"the guidance interval [{args.guidance_low}, {args.guidance_high}] is empty: --guidance-low must not "
                "exceed --guidance-high (both in [0, 1])")
    if args.cfg_scale <= 1 and args.cls_cfg_scale > 1:  # the sampler guides nothing at --cfg-scale <= 1
        p.error(f"--cls-cfg-scale {args.cls_cfg_scale} needs --cfg-scale above 1; "
                "with --cfg-scale 1 neither the image nor the class token is guided")
    if (args.eval_ref is None) != (args.inception is None):
        p.error("--eval-ref and --inception go together: give both (the reference batch and the Inception weights)")
    if args.eval_ref is not None and args.num_samples < 4:
        p.error("--eval-ref evaluates an .npz: give --num-samples, at least 4 for precision/recall (50000 for the paper's FID)")
    if args.classes and args.num_samples:
        p.error("--classes is for the grid; the .npz cycles through every class (drop --classes)")
    return args


def check_files(args):
    """Fail before anything slow: a checkpoint is given, and the evaluation's files exist
    (read_checkpoint says what is wrong with the checkpoint file itself)."""
    if args.ckpt is None:
        raise UserError("--ckpt is required: give a .pt file written by train.py or the official release")
    if args.eval_ref is not None and not os.path.isfile(args.eval_ref):
        raise UserError(f"--eval-ref: no reference batch at {args.eval_ref}; give the path of ADM's .npz "
                        "(e.g. VIRTUAL_imagenet256_labeled.npz)")
    if args.inception is not None and not os.path.isfile(args.inception):
        raise UserError(f"--inception: no weights file at {args.inception}; download {evaluate.WEIGHTS_URL}")
    if args.eval_ref is not None:  # the reference batch's layout, from its headers alone
        evaluate.check_npz(args.eval_ref, reference=True, sizes=evaluate.FEATURE_SIZES)


def check_labels(args, num_classes):
    """Labels must be real classes (num_classes is the null label of guidance)."""
    wrong = [c for c in args.classes or [] if not 0 <= c < num_classes]
    if wrong:
        raise UserError(f"--classes {' '.join(map(str, wrong))} out of range: this checkpoint has {num_classes} "
                        f"classes, 0 to {num_classes - 1}")


# ----------------------------------------------------------------------------- model and sampler

def build_model(ckpt, args):
    """The model of a checkpoint (its EMA weights unless --no-ema), its VAE and latent scaling factor.
    Ours store their model config; for official files it comes from the command line (the release's
    SiT-XL/2 on 256x256 is the default)."""
    config = ckpt.get("config")
    if config is None:
        config = dict(model=args.model, input_size=args.resolution // 8, in_channels=4,
                      num_classes=args.num_classes, encoder_depth=args.encoder_depth, z_dim=args.z_dim,
                      vae=args.vae, scaling_factor=0.18215)
    if not args.ema and "model" not in ckpt:
        raise UserError(f"{args.ckpt} holds no raw model weights (no 'model' entry); sample its EMA without --no-ema")
    config = dict(config)
    name, vae, scale = config.pop("model"), config.pop("vae"), config.pop("scaling_factor")
    enc_type = config.pop("enc_type", None)  # the encoder(s) it was trained with; older checkpoints don't say
    model = SiT_models[name](**config)
    model.enc_type = enc_type
    try:  # strict: a missing, unexpected or mis-shaped weight (another patch size, resolution) fails
        model.load_state_dict(load_weights(ckpt, prefer_ema=args.ema))
    except RuntimeError as e:
        # torch's message: a title, then one line per difference; the first difference says enough.
        first = str(e).splitlines()[1].strip().rstrip(".")[:200]
        raise UserError(f"{args.ckpt} does not fit {name} with {config} ({first}). For official "
                        "checkpoints set --model, --resolution and --encoder-depth to the run's values.") from e
    return model.eval().requires_grad_(False), vae, scale


def noise_and_labels(indices, model, args, device):
    """flow.start_noise of the samples with these global indices, in this model's shapes, on device:
    x (N, C, h, w), cls (N, z_dim) or None, labels (N,)."""
    size = model.grid_size * model.patch_size
    x, cls, y = start_noise(indices, args.seed, (model.in_channels, size, size),
                            model.z_dim if model.cls_token else None, model.num_classes)
    return x.to(device), None if cls is None else cls.to(device), y.to(device)


def sample_latents(model, x, cls, y, args, generator=None):
    """Run the sampler of args (mode, steps, guidance, path, precision) from start noise (x, cls)
    with labels y -> latents (N, C, h, w). `generator` draws the SDE's noise. A CAR-Flow model
    (its checkpoint's config says which maps) starts at x + mu0(y) and returns z_0 - mu1(y)."""
    z, _ = sample_sit(model, x, y, cls, mode=args.mode, steps=args.num_steps, method="heun" if args.heun else "euler",
                      cfg_scale=args.cfg_scale, cls_cfg_scale=args.cls_cfg_scale, guidance_low=args.guidance_low,
                      guidance_high=args.guidance_high, path=args.path_type, generator=generator,
                      autocast=torch.bfloat16 if args.precision == "bf16" and x.device.type == "cuda" else None)
    return z


def generate(model, vae, scale, x, cls, y, args, generator=None):
    """Start noise and labels -> uint8 images (N, 3, H, W), decoded by the VAE in float32."""
    z = sample_latents(model, x, cls, y, args, generator)
    return to_uint8(vae.decode(z.float() / scale).float())


# ----------------------------------------------------------------------------- names and settings

def checkpoint_name(path):
    """REG_XL_2 for REG_XL_2.pt; SiT-XL-2-data-0400000 for runs/SiT-XL-2-data/checkpoints/0400000.pt."""
    folder, stem = os.path.split(os.path.splitext(os.path.abspath(path))[0])
    if os.path.basename(folder) == "checkpoints":
        return f"{os.path.basename(os.path.dirname(folder))}-{stem}"
    return stem


def run_name(args):
    """The checkpoint and every setting that changes the samples, e.g.
    REG_XL_2-sde250-cfg2.3-cls2.3-0-0.85-bf16-seed0."""
    sampler = f"{args.mode}{args.num_steps}" + ("-heun" if args.mode == "ode" and args.heun else "")
    name = [checkpoint_name(args.ckpt), sampler, f"cfg{args.cfg_scale:g}", f"cls{args.cls_cfg_scale:g}",
            f"{args.guidance_low:g}-{args.guidance_high:g}", args.precision]
    name += [] if args.tf32 else ["notf32"]
    name += [] if args.path_type == "linear" else [args.path_type]
    name += [] if args.ema else ["raw"]
    return "-".join(name + [f"seed{args.seed}"])


def settings(args, device):
    """What the results line records about the samples, beside evaluate.py's numbers."""
    return dict(ckpt=os.path.abspath(args.ckpt), ema=args.ema, mode=args.mode, num_steps=args.num_steps,
                heun=args.heun, cfg_scale=args.cfg_scale, cls_cfg_scale=args.cls_cfg_scale,
                guidance_low=args.guidance_low, guidance_high=args.guidance_high, path_type=args.path_type,
                precision=args.precision, tf32=args.tf32, device=device.type, seed=args.seed,
                num_samples=args.num_samples)


def compiled(model, args, device):
    """The SiT as the sampler runs it. Compiling fuses its elementwise kernels; compiled, in bf16, the
    XL/2 sampler runs at 2.7x the release's fp32 one (BENCHMARKS.md; compiling alone was not timed).
    Its minute of compiling pays back over the thousands of samples of an .npz, not over a grid.
    Two static graphs (the plain and the guided batch) rather than one dynamic-shape graph."""
    wanted = args.compile if args.compile is not None else device.type == "cuda" and args.num_samples > 0
    return torch.compile(model, dynamic=False) if wanted else model


# ----------------------------------------------------------------------------- a grid, or the .npz

def sample_grid(run_model, model, vae, scale, args, device):
    """One row of --per-class samples for each of --classes (default: the first 8 classes)."""
    classes = args.classes or list(range(min(model.num_classes, 8)))
    labels = torch.tensor(classes).repeat_interleave(args.per_class).to(device)
    x, cls, _ = noise_and_labels(range(len(labels)), model, args, device)
    images = generate(run_model, vae, scale, x, cls, labels, args, torch.Generator(device).manual_seed(args.seed))
    out = args.out or os.path.join("samples", f"{run_name(args)}-grid.png")
    save_grid(images, out, nrow=args.per_class)
    print(f"saved {out}")


def check_parts_settings(parts_dir, args):
    """Parts are reused only by a run with the same settings: the first run records them in the
    folder, and a run with other flags (another --cfg-scale, --seed, batch size, ...) is refused
    rather than mixing two runs' samples into one .npz. Flags that leave the samples unchanged
    (where to write, compiling, what to evaluate against) may differ."""
    asked = {k: v for k, v in vars(args).items() if k not in ("out", "compile", "eval_ref", "inception")}
    path = os.path.join(parts_dir, "settings.json")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"  # every rank may write it: the same text, replaced atomically
        with open(tmp, "w") as f:
            json.dump(asked, f)
        os.replace(tmp, path)
    with open(path) as f:
        found = json.load(f)
    different = {k: (found.get(k), v) for k, v in asked.items() if found.get(k) != v}
    if different:
        raise UserError(f"{parts_dir} holds samples made with other settings (found, asked): {different}; "
                        "rerun with the same flags, or choose another --out")


def write_npz(path, parts, shape):
    """Stream the parts into one .npz with `arr_0` (N, H, W, 3) uint8, as the ADM evaluator reads
    it, without holding all 50K images in memory."""
    tmp = f"{path}.tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for part in parts:
                f.write(np.ascontiguousarray(np.load(part)["images"]).tobytes())
    os.replace(tmp, path)


def sample_npz(run_model, model, vae, scale, args, processes):
    """--num-samples images in batches spread over the processes, each batch saved as a part (so a
    rerun does only the missing ones), joined by rank 0 into one .npz; returns its path."""
    out = args.out or os.path.join("samples", f"{run_name(args)}-{args.num_samples}.npz")
    parts_dir = f"{out}.parts"
    os.makedirs(parts_dir, exist_ok=True)
    check_parts_settings(parts_dir, args)
    batch, device, world_size = args.per_proc_batch_size, processes.device, processes.world_size
    num_batches = -(-args.num_samples // batch)
    parts = [os.path.join(parts_dir, f"{b:06d}.npz") for b in range(num_batches)]
    mine = [b for b in range(processes.rank, num_batches, world_size) if not os.path.exists(parts[b])]
    progress = tqdm(total=len(mine) * world_size, desc="sampling", unit="batch", disable=not processes.master)
    for b in mine:
        indices = range(b * batch, min((b + 1) * batch, args.num_samples))
        x, cls, y = noise_and_labels(indices, model, args, device)
        images = generate(run_model, vae, scale, x, cls, y, args, sde_generator(args.seed, b, device))  # (n, 3, H, W)
        with open(f"{parts[b]}.tmp", "wb") as f:  # atomic: a killed run leaves no half part
            np.savez(f, images=images.permute(0, 2, 3, 1).cpu().numpy(), labels=y.cpu().numpy())  # (n, H, W, 3)
        os.replace(f"{parts[b]}.tmp", parts[b])
        progress.update(world_size)
    progress.close()
    barrier()  # every rank's parts are written
    if processes.master:
        size = model.grid_size * model.patch_size * vae.downsample
        write_npz(out, parts, (args.num_samples, size, size, 3))
        print(f"saved {out}: {args.num_samples} samples; parts kept in {parts_dir} (delete when done)")
    barrier()  # the .npz is whole before any rank reads it
    return out


# ----------------------------------------------------------------------------- main

def main(args):
    # The request: a checkpoint, and the evaluation's files, before anything slow.
    check_files(args)

    # Processes: one per GPU under torchrun, or a single one. TF32 is the one global setting, and --tf32 sets it.
    processes = setup_processes()
    device = processes.device
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32

    # Model and VAE: the checkpoint's EMA (or raw) weights, and the VAE that decodes its latents.
    model, vae_name, scale = build_model(read_checkpoint(args.ckpt), args)
    check_labels(args, model.num_classes)
    model = model.to(device)
    vae = load_vae(vae_name, path=args.vae_path).to(device)
    run_model = compiled(model, args, device)
    if processes.master:
        print(f"sampling {json.dumps(settings(args, device))} on {processes.world_size} process(es); "
              f"trained with --enc-type {model.enc_type or 'unknown (not recorded)'}", flush=True)

    # A grid (rank 0, while the others wait), or the .npz (every rank).
    if args.num_samples == 0:
        if processes.master:
            sample_grid(run_model, model, vae, scale, args, device)
        barrier()
    else:
        path = sample_npz(run_model, model, vae, scale, args, processes)

        # Evaluate: ADM's five numbers on rank 0, and a results line with the settings beside the samples.
        if args.eval_ref is not None:
            evaluate.evaluate(args.eval_ref, path, args.inception, batch_size=args.per_proc_batch_size,
                              device=device, results=None, extra=settings(args, device))
    cleanup_processes()


if __name__ == "__main__":
    run(main, get_args())
