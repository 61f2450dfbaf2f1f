"""Train SiT + REG (REFERENCE.md section 5): flow matching on VAE latents, entangled with the
DINOv2 class token, plus REPA's alignment of block `encoder_depth` with DINOv2's tokens.

The default run needs no download: the built-in dataset in pixel space with a stand-in encoder
(README, "The built-in run"); a few minutes on a laptop CPU:
    python train.py
ImageNet 256x256 (prepared with `python data.py prepare ...`), one GPU:
    python train.py --data-path /data/imagenet256 --model SiT-XL/2
One node with 8 GPUs:
    torchrun --nproc_per_node=8 train.py --data-path /data/imagenet256 --model SiT-XL/2
Two nodes (run on each, with the first node's address):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 \\
        train.py --data-path /data/imagenet256 --model SiT-XL/2
Baselines: --cls-coeff 0 is REPA (no class token), and --proj-coeff 0 as well is plain SiT.
Relaunching the same command resumes from the latest checkpoint in the run directory.
"""
import argparse
import copy
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode
from PIL import Image, ImageDraw

from data import BuiltinShapes, PreparedDataset, make_loader, save_grid
from encoder import load_encoder, load_vae, sample_posterior
from flow import sample_sde, training_loss
from model import SiT_models, read_checkpoint

# What `python train.py` without --data-path changes: a tiny model on 32x32 pixels that learns
# the built-in shapes in minutes on a CPU. Everything else keeps the paper's recipe, except a
# shorter EMA horizon (0.9999 would still mostly average the random initial weights), a larger
# learning rate for such a short run, and sample grids with classifier-free guidance.
BUILTIN_DEFAULTS = dict(model="SiT-T/4", enc_type="stand-in", global_batch_size=32, lr=1e-3,
                        max_train_steps=500, ema_decay=0.99, log_every=25, sample_every=250,
                        checkpoint_every=250, sample_steps=30, sample_cfg_scale=4.0, num_workers=0)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default=None, help="prepared dataset (data.py prepare); none: built-in")
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--exp-name", default=None, help="run directory name (default: from model and data)")
    p.add_argument("--model", default="SiT-XL/2", choices=sorted(SiT_models))
    p.add_argument("--encoder-depth", type=int, default=None, help="block the projector reads (default: per size)")
    p.add_argument("--enc-type", default="dinov2-vit-b", help="dinov2-vit-{s,b,l,g}[-reg], or stand-in")
    p.add_argument("--enc-path", default=None, help="local DINOv2 weights file (default: timm's hub weights); "
                   "'random' for speed benchmarks only")
    p.add_argument("--vae-path", default=None, help="local SD-VAE weights, to decode the sample grids")
    p.add_argument("--proj-coeff", type=float, default=0.5, help="REPA alignment weight (0: no projector)")
    p.add_argument("--cls-coeff", type=float, default=0.03, help="class-token loss weight (0: no class token)")
    p.add_argument("--path-type", default="linear", choices=["linear", "cosine"])
    p.add_argument("--weighting", default="uniform", choices=["uniform", "lognormal"], help="time sampling")
    p.add_argument("--cfg-prob", type=float, default=0.1, help="label dropout for classifier-free guidance")
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--max-train-steps", type=int, default=400_000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.999)
    p.add_argument("--adam-weight-decay", type=float, default=0.0)
    p.add_argument("--adam-epsilon", type=float, default=1e-8)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="autocast on GPU")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=8, help="data loader workers per rank")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--sample-every", type=int, default=10_000)
    p.add_argument("--checkpoint-every", type=int, default=10_000)
    p.add_argument("--sample-steps", type=int, default=50, help="SDE steps of the sample grid")
    p.add_argument("--sample-cfg-scale", type=float, default=1.0, help="CFG of the sample grid")
    p.add_argument("--benchmark-steps", type=int, default=0, help="time this many steps, then exit")
    p.add_argument("--benchmark-data", default="memory", choices=["memory", "loader"],
                   help="benchmark on one batch held in GPU memory, or on the data loader")
    args, _ = p.parse_known_args(argv)
    if args.data_path is None:
        p.set_defaults(**BUILTIN_DEFAULTS)
    args = p.parse_args(argv)
    if args.global_batch_size % args.gradient_accumulation_steps:
        p.error("--global-batch-size must be divisible by --gradient-accumulation-steps")
    return args


def setup_distributed():
    """torchrun sets RANK; without it this is a single process. NCCL on GPU, gloo on CPU."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return rank, local_rank, world, torch.device("cuda", local_rank)
    return rank, local_rank, world, torch.device("cpu")


def all_mean(x, world):
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


@torch.no_grad()
def update_ema(ema, model, decay):
    # One fused foreach kernel over all parameters: ema <- decay * ema + (1 - decay) * param.
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path, state):
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def latest_checkpoint(ckpt_dir):
    names = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".pt")) if os.path.isdir(ckpt_dir) else []
    return os.path.join(ckpt_dir, names[-1]) if names else None


def plot_losses(rows, path, keys=("loss", "denoise", "proj", "cls")):
    """A small PNG of the loss curves drawn with PIL, to keep matplotlib out. Linear axis: the
    total and the projection term (a negative cosine similarity) go below zero."""
    colors = {"loss": (20, 20, 20), "denoise": (31, 119, 180), "proj": (214, 39, 40), "cls": (44, 160, 44)}
    series = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k in keys}
    series = {k: s for k, s in series.items() if len(s) > 1}
    if not series:
        return
    W, H, pad = 640, 360, 40
    steps = [x for s in series.values() for x, _ in s]
    values = [y for s in series.values() for _, y in s]
    x0, x1 = min(steps), max(steps) + 1e-9
    lo, hi = min(values), max(values) + 1e-9

    def to_px(x, y):
        return pad + (x - x0) / (x1 - x0) * (W - 2 * pad), H - pad - (y - lo) / (hi - lo) * (H - 2 * pad)

    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([pad, pad, W - pad, H - pad], outline=(160, 160, 160))
    if lo < 0 < hi:
        draw.line([to_px(x0, 0), to_px(x1, 0)], fill=(200, 200, 200))
    for i, (k, s) in enumerate(series.items()):
        draw.line([to_px(x, y) for x, y in s], fill=colors[k], width=2)
        draw.text((pad + 10 + 110 * i, 12), k, fill=colors[k])
    draw.text((pad, H - pad + 8), f"step {x0}", fill=(0, 0, 0))
    draw.text((W - pad - 80, H - pad + 8), f"step {int(x1)}", fill=(0, 0, 0))
    draw.text((4, pad - 6), f"{hi:.3g}", fill=(0, 0, 0))
    draw.text((4, H - pad - 6), f"{lo:.3g}", fill=(0, 0, 0))
    img.save(path)


def benchmark(train_step, loader, args, device, world, master, eager):
    """Time --benchmark-steps optimizer steps after 10 warm-up steps (compilation, autotuning).

    --benchmark-data memory: one batch stays in GPU memory, so the number is the model's own;
    loader: batches come from the data loader with --num-workers, as in a real run. FLOPs per
    image are counted once by PyTorch's FlopCounterMode on an eager step.
    """
    batch = [t.to(device) for t in next(loader)]
    next_batch = (lambda: batch) if args.benchmark_data == "memory" else (lambda: next(loader))
    with FlopCounterMode(display=False) as counter:
        train_step(*batch, net=eager[0], enc=eager[1])
    flops_per_image = counter.get_total_flops() / len(batch[0])
    for _ in range(10):
        train_step(*next_batch())
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.time()
    for _ in range(args.benchmark_steps):
        train_step(*next_batch())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.time() - start) / args.benchmark_steps
    per_gpu = args.global_batch_size / world / seconds
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    if master:
        print(json.dumps(dict(model=args.model, batch_per_gpu=args.global_batch_size // world, world=world,
                              data=args.benchmark_data, precision=args.precision, compile=args.compile,
                              img_per_s_per_gpu=round(per_gpu, 1), step_ms=round(1000 * seconds, 1),
                              peak_mem_gib=round(peak, 1), gflop_per_img=round(flops_per_image / 1e9, 1),
                              mfu=round(per_gpu * flops_per_image / 989e12, 3))), flush=True)


def main(args):
    rank, local_rank, world, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(args.seed * world + rank)  # a different noise stream on every rank
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if args.compile is None:  # on by default on GPU; on CPU compilation costs more than it saves
        args.compile = device.type == "cuda"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    if device.type == "cpu":
        amp_dtype = None  # CPU autocast is slower than fp32 for these shapes
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    local_batch = args.global_batch_size // (world * args.gradient_accumulation_steps)
    if local_batch * world * args.gradient_accumulation_steps != args.global_batch_size:
        raise ValueError(f"global batch {args.global_batch_size} does not split over {world} ranks "
                         f"x {args.gradient_accumulation_steps} accumulation steps")

    # Data: images (for DINOv2) and VAE posterior moments (for the latents), or the built-in set.
    dataset = BuiltinShapes() if args.data_path is None else PreparedDataset(args.data_path)
    exp_name = args.exp_name or f"{args.model.replace('/', '-')}-{'builtin' if args.data_path is None else 'data'}"
    run_dir = os.path.join(args.output_dir, exp_name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if master and not args.benchmark_steps:
        os.makedirs(ckpt_dir, exist_ok=True)

    latent_size = dataset.resolution // dataset.downsample
    # The stand-in encoder (built-in run) is a small random ViT whose patches tile the image
    # on the same grid as the SiT's tokens; DINOv2 gets that grid from its 224-pixel input.
    grid = latent_size // int(args.model.split("/")[1])
    stand_in = dict(patch_size=dataset.resolution // grid, embed_dim=192, depth=2, num_heads=3)
    weights = None if args.enc_path == "random" else args.enc_path or "pretrained"
    encoder = load_encoder(args.enc_type, resolution=dataset.resolution, weights=weights,
                           **(stand_in if args.enc_type == "stand-in" else {})).to(device)
    model_kwargs = dict(input_size=latent_size, in_channels=dataset.latent_channels,
                        num_classes=dataset.num_classes, class_dropout_prob=args.cfg_prob,
                        z_dim=encoder.embed_dim, cls_token=args.cls_coeff > 0, projector=args.proj_coeff > 0)
    if args.encoder_depth is not None:
        model_kwargs["encoder_depth"] = args.encoder_depth
    model = SiT_models[args.model](**model_kwargs).to(device)
    # What sample.py needs to rebuild the model and decode its samples, stored with each checkpoint.
    config = {"model": args.model, **model_kwargs, "encoder_depth": model.encoder_depth,
              "vae": dataset.vae, "scaling_factor": dataset.scaling_factor}
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                            fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step = 0
    resume = None if args.benchmark_steps else latest_checkpoint(ckpt_dir)
    if resume:
        ckpt = read_checkpoint(resume)
        if ckpt["args"].model != args.model:
            raise ValueError(f"{resume} was written by a run with --model {ckpt['args'].model}; this "
                             f"run has {args.model}. Use another --exp-name for a new run.")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["steps"]

    train_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
    if world > 1 and not resume:  # DDP gave every rank rank 0's initial weights: start the EMA there too
        ema.load_state_dict(model.state_dict())
    run_encoder = encoder
    if args.compile:
        train_model, run_encoder = torch.compile(train_model), torch.compile(encoder)
    loader = make_loader(dataset, local_batch * args.gradient_accumulation_steps, rank, world,
                         seed=args.seed, num_workers=args.num_workers, start_step=step)
    if resume and ckpt["world_size"] == world:  # only now: the loader's iterator draws from the RNG
        set_rng_state(ckpt["rng"][rank], device)
    elif resume:  # e.g. more nodes than before: fine, but not the run an uninterrupted job would be
        torch.manual_seed((args.seed * world + rank) * 1_000_003 + step)
        if master:
            print(f"note: {resume} was written by {ckpt['world_size']} processes and this run has "
                  f"{world}: training continues, with another data order and noise than an "
                  "uninterrupted run would have had")

    accum = args.gradient_accumulation_steps

    def train_step(images, moments, labels, net=train_model, enc=run_encoder):
        """One optimizer step on this rank's batch (split into `accum` micro-batches)."""
        images = images.to(device, non_blocking=True)
        moments = moments.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        for micro in range(accum):
            part = slice(micro * local_batch, (micro + 1) * local_batch)
            with torch.no_grad():
                mean, std = moments[part].chunk(2, dim=1)
                x = sample_posterior(mean, std) * dataset.scaling_factor  # (N, C, h, w)
                with autocast:
                    cls, patches = enc(images[part])  # (N, Dz), (N, T, Dz)
                cls, patches = cls.float(), patches.float()
            sync = world == 1 or micro == accum - 1  # DDP all-reduces only on the last micro-batch
            with (nullcontext() if sync else net.no_sync()), autocast:
                losses = training_loss(net, x, labels[part],
                                       cls if args.cls_coeff > 0 else None,
                                       patches if args.proj_coeff > 0 else None,
                                       path=args.path_type, time_schedule=args.weighting,
                                       proj_coeff=args.proj_coeff, cls_coeff=args.cls_coeff)
            scaler.scale(losses["loss"] / accum).backward()
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, args.ema_decay)
        return losses, grad_norm

    if args.benchmark_steps:
        return benchmark(train_step, loader, args, device, world, master, eager=(model, encoder))

    # Fixed noise and labels for the sample grids: the same on every rank and after a resume.
    grid_gen = torch.Generator().manual_seed(args.seed)
    grid_y = torch.arange(min(dataset.num_classes, 10)).repeat_interleave(8)  # a row of 8 per class
    grid_n = len(grid_y)
    grid_x = torch.randn(grid_n, dataset.latent_channels, latent_size, latent_size, generator=grid_gen)
    grid_cls = torch.randn(grid_n, encoder.embed_dim, generator=grid_gen)
    vae = load_vae(dataset.vae, path=args.vae_path).to(device) if master else None

    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    rows = []
    if master:
        if os.path.exists(metrics_path):  # keep the history up to the resumed step only
            with open(metrics_path) as f:
                rows = [r for r in map(json.loads, f) if r["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{args.model} ({n_params / 1e6:.1f}M parameters) on {dataset.__class__.__name__} "
              f"({len(dataset)} images), {world} process(es) on {device.type}, local batch {local_batch}, "
              f"{'resuming at step ' + str(step) + ' from ' + resume if resume else 'new run'} -> {run_dir}")

    sums = torch.zeros(5, device=device)  # loss, denoise, proj, cls, grad norm since the last log
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    t_log, steps_logged = time.time(), 0
    train_model.train()
    while step < args.max_train_steps:
        losses, grad_norm = train_step(*next(loader))
        step += 1

        # Accumulate on the device; the host only syncs at log and checkpoint steps.
        terms = [losses[k].detach().mean() if losses[k] is not None else torch.zeros((), device=device)
                 for k in ("loss", "denoise", "proj", "cls")]
        sums += torch.stack([*terms, grad_norm.float()])
        nonfinite |= ~torch.isfinite(losses["loss"].detach())
        steps_logged += 1

        if step % args.log_every == 0 or step % args.checkpoint_every == 0 or step == args.max_train_steps:
            if bool(all_mean(nonfinite.float(), world) > 0):
                raise FloatingPointError(
                    f"non-finite loss before step {step}; stopping without saving. The last good "
                    f"checkpoint is in {ckpt_dir}: relaunch to resume from it, with a lower --lr, "
                    "--precision fp32 or a different --seed.")
            if step % args.log_every == 0 or step == args.max_train_steps:
                avg = (all_mean(sums, world) / steps_logged).tolist()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.time() - t_log
                row = dict(step=step, loss=avg[0], denoise=avg[1], proj=avg[2] if args.proj_coeff > 0 else None,
                           cls=avg[3] if args.cls_coeff > 0 else None, grad_norm=avg[4],
                           img_per_s=steps_logged * args.global_batch_size / dt, step_time=dt / steps_logged,
                           gpu_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0)
                if master:
                    rows.append(row)
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    plot_losses(rows, os.path.join(run_dir, "loss.png"))
                    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in row.items() if v is not None), flush=True)
                sums.zero_()
                t_log, steps_logged = time.time(), 0

        paused = time.time()  # sampling and checkpoint time is not training throughput
        if master and (step % args.sample_every == 0 or step == args.max_train_steps):
            with autocast:
                z, _ = sample_sde(ema, grid_x.to(device), grid_y.to(device),
                                  grid_cls.to(device) if args.cls_coeff > 0 else None,
                                  steps=args.sample_steps, cfg_scale=args.sample_cfg_scale,
                                  null_label=dataset.num_classes,
                                  generator=torch.Generator(device).manual_seed(args.seed))
            images_out = vae.decode(z.float() / dataset.scaling_factor)
            save_grid(images_out, os.path.join(run_dir, f"samples_{step:07d}.png"), nrow=8)

        if step % args.checkpoint_every == 0 or step == args.max_train_steps:
            rngs = [None] * world
            if world > 1:
                dist.all_gather_object(rngs, rng_state(device))
            else:
                rngs = [rng_state(device)]
            if master:
                save_checkpoint(os.path.join(ckpt_dir, f"{step:07d}.pt"), {
                    "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "scaler": scaler.state_dict(), "args": args, "steps": step, "rng": rngs,
                    "world_size": world, "config": config})
        t_log += time.time() - paused

    if master:
        print(f"done: {step} steps; checkpoints, samples and loss.png in {run_dir}")
    if world > 1:
        dist.destroy_process_group()
    return model, ema


if __name__ == "__main__":
    main(get_args())
