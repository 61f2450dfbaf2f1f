"""Time the project's own training step and sampler, as train.py and sample.py run them.

Imports train.train_step / build_model / build_optimizer / amp_dtype and sample.sample_latents /
noise_and_labels / get_args, so what is timed is the product's code, not a copy. Random weights
(speed does not depend on them), random DINOv2 (weights=None), data resident on the GPU.
Global settings this script changes, visibly, here: TF32 matmuls on (train.py's --tf32 default).

  python bench/bench.py train --model SiT-XL/2 --batch 32 --steps 30
  python bench/bench.py sample --batch 128 --steps 50          # + relative L2 to a strict fp32 run
Prints one JSON line per measurement.
"""
import argparse, json, os, sys, time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sample, train  # noqa: E402
from encoder import load_encoder  # noqa: E402

# ImageNet 256 with SD-VAE latents: the shapes train.py's prepared dataset reports.
IMAGENET = SimpleNamespace(resolution=256, downsample=8, latent_channels=4, num_classes=1000,
                           vae="sd-vae-ft-ema", scaling_factor=0.18215)


def timed(fn, n, warm):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize(); t0 = time.time()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.time() - t0) / n


def bench_train(a, dev):
    args = train.get_args(["--data-path", "unused", "--model", a.model, "--global-batch-size", str(a.batch),
                           "--precision", a.precision])
    encoder = load_encoder(args.enc_type, resolution=IMAGENET.resolution, weights=None).to(dev).eval()
    model, _ = train.build_model(args, IMAGENET, encoder.z_dim if hasattr(encoder, "z_dim") else 768)
    model = model.to(dev).train()
    ema, _ = train.build_model(args, IMAGENET, encoder.z_dim if hasattr(encoder, "z_dim") else 768)
    ema = ema.to(dev).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt, scaler = train.build_optimizer(args, model)
    net = torch.compile(model) if a.compile else model
    enc = torch.compile(encoder) if a.compile else encoder
    B = a.batch
    batch = (torch.randint(0, 256, (B, 3, 256, 256), dtype=torch.uint8, device=dev),
             torch.randn(B, 8, 32, 32, device=dev), torch.randint(0, 1000, (B,), device=dev))
    step = lambda: train.train_step(batch, net=net, encoder=enc, model=model, ema=ema, opt=opt, scaler=scaler,
                                    args=args, scaling_factor=IMAGENET.scaling_factor)
    torch.cuda.reset_peak_memory_stats()
    s = timed(step, a.steps, warm=5)
    print(json.dumps(dict(side="ours", what="train", model=a.model, batch=B, precision=a.precision,
                          compile=a.compile, img_per_s=round(B / s, 1), ms_per_step=round(1e3 * s, 1),
                          peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))), flush=True)


def bench_sample(a, dev):
    args = sample.get_args(["--model", a.model, "--mode", "sde", "--num-steps", str(a.steps), "--cfg-scale", "2.3",
                            "--cls-cfg-scale", "2.3", "--guidance-high", "0.85", "--precision", a.precision])
    targs = train.get_args(["--data-path", "unused", "--model", a.model])
    model, _ = train.build_model(targs, IMAGENET, 768)
    model = model.to(dev).eval()
    x, cls, y = sample.noise_and_labels(range(a.batch), model, args, dev)
    net = torch.compile(model, dynamic=False) if a.compile else model
    run = lambda m, ar: sample.sample_latents(m, x, cls, y, ar, generator=torch.Generator(dev).manual_seed(0))
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        s = timed(lambda: run(net, args), 2, 1)
        out = run(net, args).float()
        # Strict fp32 reference: no autocast, no TF32, eager; the TF32 switch is restored after.
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        ref = run(model, argparse.Namespace(**{**vars(args), "precision": "fp32"})).float()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    rel = ((out - ref).norm() / ref.norm()).item()
    print(json.dumps(dict(side="ours", what="sample", model=a.model, batch=a.batch, steps=a.steps,
                          precision=a.precision, compile=a.compile, img_per_s=round(a.batch / s, 2),
                          s_per_batch=round(s, 2), rel_l2_vs_fp32=float(f"{rel:.2e}"),
                          peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["train", "sample"])
    p.add_argument("--model", default="SiT-XL/2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30, help="train: timed steps; sample: SDE steps")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py --tf32
    dev = torch.device("cuda")
    (bench_train if a.what == "train" else bench_sample)(a, dev)


if __name__ == "__main__":
    main()
