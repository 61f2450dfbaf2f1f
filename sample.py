"""Images from a checkpoint: a PNG grid, or 50K samples for FID (REG, arXiv 2507.01467),
written as the ADM evaluator (arXiv 2105.05233) reads them.

A grid from one of our runs, or from the official REG release (its EMA weights):
    python sample.py --ckpt runs/SiT-T-4-builtin/checkpoints/0000600.pt
    python sample.py --ckpt REG_XL_2.pt --classes 207 360 387 974 88 979 417 279 --cfg-scale 4
The paper's FID setting, on 8 GPUs, into samples/<name>.npz for the ADM evaluator:
    torchrun --nproc_per_node=8 sample.py --ckpt REG_XL_2.pt --num-samples 50000 \\
        --mode sde --num-steps 250 --cfg-scale 2.3 --cls-cfg-scale 2.3 --guidance-high 0.85
Every sample i has its own noise and label drawn from (--seed, i), so the result does not depend
on the number of GPUs, and an interrupted run resumes without redoing finished batches.
"""
import argparse
import json
import os
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from tqdm import tqdm

from encoder import load_vae
from flow import sample_ode, sample_sde
from model import SiT_models, load_weights, read_checkpoint
from util import save_grid, to_uint8


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint .pt (ours or the official release)")
    p.add_argument("--out", default=None, help="output .png (grid) or .npz (--num-samples); default: samples/")
    g = p.add_argument_group("model, for official checkpoints (ours record their own)")
    g.add_argument("--model", default="SiT-XL/2", choices=sorted(SiT_models))
    g.add_argument("--resolution", type=int, default=256)
    g.add_argument("--num-classes", type=int, default=1000)
    g.add_argument("--encoder-depth", type=int, default=8)
    g.add_argument("--z-dim", type=int, default=768, help="width of the DINOv2 tokens (768 for ViT-B)")
    g.add_argument("--vae", default="sd-vae-ft-ema")
    p.add_argument("--vae-path", default=None, help="local VAE weights folder or file")
    s = p.add_argument_group("sampler")
    s.add_argument("--mode", default="sde", choices=["sde", "ode"])
    s.add_argument("--num-steps", type=int, default=50)
    s.add_argument("--heun", action="store_true", help="ODE: Heun instead of Euler")
    s.add_argument("--cfg-scale", type=float, default=1.0)
    s.add_argument("--cls-cfg-scale", type=float, default=0.0, help="class-token guidance (0: conditional)")
    s.add_argument("--guidance-low", type=float, default=0.0)
    s.add_argument("--guidance-high", type=float, default=1.0)
    s.add_argument("--path-type", default="linear", choices=["linear", "cosine"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, nargs="*", default=None, help="grid: one row per class")
    p.add_argument("--per-class", type=int, default=8, help="grid: samples per class")
    p.add_argument("--num-samples", type=int, default=0, help="write this many samples to an .npz")
    p.add_argument("--per-proc-batch-size", type=int, default=64)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast on GPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--benchmark", action="store_true", help="time sampling on random weights (GPU), no --ckpt")
    p.add_argument("--benchmark-runs", type=int, default=3)
    args = p.parse_args(argv)
    if args.ckpt is None and not args.benchmark:
        p.error("--ckpt is required (or --benchmark)")
    return args


def build_model(ckpt, args):
    """The EMA model of a checkpoint. Ours store their model config; for official files it
    comes from the command line (the release's SiT-XL/2 on 256x256 is the default)."""
    config = ckpt.get("config")
    if config is None:
        config = dict(model=args.model, input_size=args.resolution // 8, in_channels=4,
                      num_classes=args.num_classes, encoder_depth=args.encoder_depth, z_dim=args.z_dim,
                      vae=args.vae, scaling_factor=0.18215)
    config = dict(config)
    name, vae, scale = config.pop("model"), config.pop("vae"), config.pop("scaling_factor")
    model = SiT_models[name](**config)
    try:  # strict: a missing, unexpected or mis-shaped weight (another patch size, resolution) fails
        model.load_state_dict(load_weights(args.ckpt))
    except RuntimeError as e:
        raise ValueError(f"{args.ckpt} does not fit {name} with {config} (differences above). For official "
                         "checkpoints set --model, --resolution and --encoder-depth to the run's values.") from e
    return model.eval().requires_grad_(False), vae, scale


def noise_and_labels(indices, model, args, device):
    """Start noise (x, cls) and labels of the samples with these global indices; each depends
    only on (seed, index), so any split over processes or batches gives the same samples."""
    xs, clss, ys = [], [], []
    for i in indices:
        g = torch.Generator().manual_seed(args.seed * 10_000_019 + i)
        size = model.grid_size * model.patch_size
        xs.append(torch.randn(model.in_channels, size, size, generator=g))
        clss.append(torch.randn(model.z_dim, generator=g) if model.cls_token else None)
        ys.append(torch.randint(0, model.num_classes, (), generator=g))
    cls = torch.stack(clss).to(device) if model.cls_token else None
    return torch.stack(xs).to(device), cls, torch.stack(ys).to(device)


def sample_latents(model, x, cls, y, args, generator=None):
    """Run the chosen sampler from start noise (x, cls) with labels y -> latents (N, C, h, w)."""
    common = dict(cfg_scale=args.cfg_scale, cls_cfg_scale=args.cls_cfg_scale, guidance_low=args.guidance_low,
                  guidance_high=args.guidance_high, null_label=model.num_classes)
    amp = args.precision == "bf16" and x.device.type == "cuda"
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        if args.mode == "sde":
            z, _ = sample_sde(model, x, y, cls, steps=args.num_steps, path=args.path_type,
                              generator=generator, **common)
        else:
            z, _ = sample_ode(model, x, y, cls, steps=args.num_steps, method="heun" if args.heun else "euler",
                              **common)
    return z


def generate(model, vae, scale, x, cls, y, args, generator=None):
    """Start noise and labels -> uint8 images (N, 3, H, W), decoded by the VAE in float32."""
    z = sample_latents(model, x, cls, y, args, generator)
    return to_uint8(vae.decode(z.float() / scale).float())


def benchmark(args, device):
    """Time the sampler, decoding excluded, on random weights of --model at --per-proc-batch-size,
    and compare its output with a strict-fp32 run (TF32 off) from the same noise."""
    model = SiT_models[args.model](input_size=args.resolution // 8, num_classes=args.num_classes,
                                   encoder_depth=args.encoder_depth, z_dim=args.z_dim).to(device).eval()
    with torch.no_grad():  # zero-initialised layers would make the velocity trivially zero
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    run_model = torch.compile(model, dynamic=False) if args.compile else model
    x, cls, y = noise_and_labels(range(args.per_proc_batch_size), model, args, device)

    def run(net):
        return sample_latents(net, x, cls, y, args, torch.Generator(device).manual_seed(args.seed))

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run(run_model)  # warm-up: compilation, autotuning
    sync()
    start = time.time()
    for _ in range(args.benchmark_runs):
        z = run(run_model)
    sync()
    seconds = (time.time() - start) / args.benchmark_runs
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    precision, args.precision = args.precision, "fp32"
    reference = run(model).float()
    error = ((z.float() - reference).norm() / reference.norm()).item()
    print(json.dumps(dict(model=args.model, batch=args.per_proc_batch_size, mode=args.mode, steps=args.num_steps,
                          cfg=args.cfg_scale, precision=precision, compile=args.compile,
                          img_per_s=round(args.per_proc_batch_size / seconds, 2), seconds_per_batch=round(seconds, 2),
                          peak_mem_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
                          if device.type == "cuda" else 0.0,
                          rel_l2_vs_fp32=round(error, 5))), flush=True)


def check_parts_settings(parts_dir, args):
    """Parts are reused only by a run with the same settings: the first run records them in the
    folder, and a run with other flags (another --cfg-scale, --seed, batch size, ...) is refused
    rather than mixing two runs' samples into one .npz."""
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "compile")}
    path = os.path.join(parts_dir, "settings.json")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"  # every rank may write it: the same text, replaced atomically
        with open(tmp, "w") as f:
            json.dump(settings, f)
        os.replace(tmp, path)
    with open(path) as f:
        found = json.load(f)
    different = {k: (found.get(k), v) for k, v in settings.items() if found.get(k) != v}
    if different:
        raise ValueError(f"{parts_dir} holds samples made with other settings (found, asked): {different}; "
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


def main(args):
    distributed = int(os.environ.get("RANK", -1)) != -1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    if args.benchmark:
        return benchmark(args, device)
    ckpt = read_checkpoint(args.ckpt)
    model, vae_name, scale = build_model(ckpt, args)
    model = model.to(device)
    vae = load_vae(vae_name, path=args.vae_path).to(device)
    # Two static graphs (the plain and the guided batch) rather than one dynamic-shape graph.
    run_model = torch.compile(model, dynamic=False) if args.compile else model
    name = os.path.splitext(os.path.basename(args.ckpt))[0]

    if args.num_samples == 0:  # a grid, one row per class
        if rank == 0:
            classes = args.classes or list(range(min(model.num_classes, 8)))
            labels = torch.tensor(classes).repeat_interleave(args.per_class).to(device)
            x, cls, _ = noise_and_labels(range(len(labels)), model, args, device)
            images = generate(run_model, vae, scale, x, cls, labels, args,
                              torch.Generator(device).manual_seed(args.seed))
            out = args.out or os.path.join("samples", f"{name}-grid.png")
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
            save_grid(images, out, nrow=args.per_class)
            print(f"saved {out}")
    else:
        out = args.out or os.path.join("samples", f"{name}-{args.mode}{args.num_steps}-cfg{args.cfg_scale}.npz")
        parts_dir = f"{out}.parts"
        os.makedirs(parts_dir, exist_ok=True)
        check_parts_settings(parts_dir, args)
        batch = args.per_proc_batch_size
        num_batches = -(-args.num_samples // batch)
        parts = [os.path.join(parts_dir, f"{b:06d}.npz") for b in range(num_batches)]
        mine = [b for b in range(rank, num_batches, world) if not os.path.exists(parts[b])]
        progress = tqdm(total=len(mine) * world, desc="sampling", disable=rank != 0)
        for b in mine:
            indices = range(b * batch, min((b + 1) * batch, args.num_samples))
            x, cls, y = noise_and_labels(indices, model, args, device)
            generator = torch.Generator(device).manual_seed(args.seed * 10_000_019 + b)  # SDE noise of batch b
            images = generate(run_model, vae, scale, x, cls, y, args, generator).permute(0, 2, 3, 1).cpu().numpy()
            with open(f"{parts[b]}.tmp", "wb") as f:  # atomic: a killed run leaves no half part
                np.savez(f, images=images, labels=y.cpu().numpy())
            os.replace(f"{parts[b]}.tmp", parts[b])
            progress.update(world)
        progress.close()
        if distributed:
            dist.barrier()
        if rank == 0:
            size = model.grid_size * model.patch_size * vae.downsample
            write_npz(out, parts, (args.num_samples, size, size, 3))
            print(f"saved {out}: {args.num_samples} samples; parts kept in {parts_dir} (delete when done)")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(get_args())
