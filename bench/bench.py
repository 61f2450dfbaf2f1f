"""Time the project's own training step and sampler, as train.py and sample.py run them.

Imports train.train_step / build_model / build_optimizer and sample.sample_latents /
noise_and_labels / get_args, so what is timed is the product's code, not a copy. Random weights
(speed does not depend on them), random DINOv2 (weights=None), data resident on the GPU.
Global settings this script changes, visibly, here: TF32 matmuls on (train.py's --tf32 default).

  python bench/bench.py train --model SiT-XL/2 --batch 32 --steps 20
  python bench/bench.py sample --batch 128 --steps 50        # + relative L2 to a strict fp32 run
  python bench/bench.py optim                                  # the optimizer phase alone, XL/2
  python bench/bench.py train --car joint                      # CAR-Flow's shift maps (train.py --car)
  python bench/bench.py train --target closed-form --cf-refs 128   # Bertrand et al.'s target (references
                               resident on the GPU: reading their moments from disk is not timed)
Levers measured here and left out of the product (BENCHMARKS.md says why), each named by a flag:
  train --opt-phase compiled   clipping + foreach AdamW + EMA as one torch.compile'd function
                               (optim: that function against train.optimizer_step, nothing else)
  train --compile-mode reduce-overhead   CUDA graphs for the SiT's and DINOv2's compiled graphs
  train --fp8                  torchao float8 training (per-tensor scales) of the blocks' Linears
  sample --variants autocast autotune fp8 fp8-tensor   autotune: inductor's max-autotune (Triton
                               GEMM templates tried against cuBLAS, epilogues fused), no CUDA graphs;
                               fp8: bf16 weights, torchao float8 inference in the blocks' Linears,
                               per-row or per-tensor scales
torchao is optional (pip install torchao), imported only for --fp8 / the fp8 variants.
Prints one JSON line per measurement.
"""
import argparse, copy, json, os, sys, time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sample, train  # noqa: E402
from encoder import load_encoder  # noqa: E402

# ImageNet 256 with SD-VAE latents: the shapes train.py's prepared dataset reports.
IMAGENET = SimpleNamespace(resolution=256, downsample=8, latent_channels=4, num_classes=1000,
                           vae="sd-vae-ft-ema", scaling_factor=0.18215)


def timed(fn, n, warm):
    """Seconds per call of fn (mean of n calls after warm ones), and the last call's result."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize(); t0 = time.time()
    for _ in range(n):
        out = fn()
    torch.cuda.synchronize()
    return (time.time() - t0) / n, out


def in_blocks(module, fqn):
    # The blocks' qkv / proj / fc1 / fc2 hold nearly all GEMM FLOPs; the adaLN, embedding and
    # output Linears see only N rows (or few columns) and stay bf16.
    return isinstance(module, torch.nn.Linear) and fqn.startswith("blocks.") and (".attn." in fqn or ".mlp." in fqn)


def fp8_training(model):
    """torchao float8 training (per-tensor scales) of the blocks' Linears, in place."""
    from torchao.float8 import convert_to_float8_training  # optional dependency
    return convert_to_float8_training(model, module_filter_fn=in_blocks)


def fp8_inference(model, variant):
    """bf16 weights; the blocks' Linears (in_blocks) quantised by torchao: per-row scales
    ("fp8") or one scale per tensor ("fp8-tensor") for both the weight and each activation."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_
    model = copy.deepcopy(model).to(torch.bfloat16)
    granularity = PerRow() if variant == "fp8" else PerTensor()
    # set_inductor_config=False: keep inductor's default settings (its recommended ones add
    # coordinate-descent tuning, minutes of compile time for XL).
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False),
              filter_fn=in_blocks)
    return model


def compiled_optimizer_phase(args, model, ema):
    """The lever 'one compiled optimizer phase': clip + AdamW + EMA in one torch.compile'd
    function over foreach AdamW (inductor writes its own fused kernels for the foreach ops).
    Returns the optimizer and a drop-in replacement for train.optimizer_step."""
    params, ema_params = list(model.parameters()), list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, foreach=True)

    @torch.compile
    def phase():
        norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm, foreach=True)
        opt.step()
        torch._foreach_lerp_(ema_params, params, 1 - args.ema_decay)
        return norm

    def optimizer_step(model, ema, opt_, scaler, max_grad_norm, ema_decay):
        norm = phase()
        opt.zero_grad(set_to_none=True)
        return norm.float()

    return opt, optimizer_step


def bench_train(a, dev):
    args = train.get_args(["--data-path", "unused", "--model", a.model, "--global-batch-size", str(a.batch),
                           "--precision", a.precision, "--car", a.car, "--target", a.target,
                           "--cf-refs", str(a.cf_refs)])
    encoder = load_encoder(args.enc_type, resolution=IMAGENET.resolution, weights=None).to(dev).eval()
    # Weights as at initialisation (adaLN-Zero), as the official side's bench_official.py has them.
    model, _ = train.build_model(args, IMAGENET, encoder.z_dim)
    model = model.to(dev).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    if a.fp8:
        fp8_training(model)
    opt, scaler = train.build_optimizer(args, model)
    if a.opt_phase == "compiled":
        opt, train.optimizer_step = compiled_optimizer_phase(args, model, ema)
    net = torch.compile(model, mode=a.compile_mode) if a.compile else model
    enc = torch.compile(encoder, mode=a.compile_mode) if a.compile else encoder
    B = a.batch
    batch = (torch.randint(0, 256, (B, 3, 256, 256), dtype=torch.uint8, device=dev),
             torch.randn(B, 8, 32, 32, device=dev), torch.randint(0, 1000, (B,), device=dev))
    refs = torch.randn(B, a.cf_refs - 1, 8, 32, 32, device=dev) if a.target == "closed-form" else None

    def step():
        if a.compile_mode == "reduce-overhead":  # a new step: CUDA graph outputs of the last may be reused
            torch.compiler.cudagraph_mark_step_begin()
        return train.train_step(batch, net=net, encoder=enc, model=model, ema=ema, opt=opt, scaler=scaler,
                                args=args, scaling_factor=IMAGENET.scaling_factor, refs=refs)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    step()
    torch.cuda.synchronize()
    first = time.time() - t0  # compilation, mostly
    s, metrics = timed(step, a.steps, warm=5)
    print(json.dumps(dict(side="ours", what="train", model=a.model, car=a.car, batch=B, precision=a.precision,
                          params=sum(p.numel() for p in model.parameters()),
                          compile=a.compile and (a.compile_mode or "default"), opt_phase=a.opt_phase, fp8=a.fp8,
                          target=a.target, cf_refs=a.cf_refs if a.target == "closed-form" else None,
                          img_per_s=round(B / s, 1),
                          ms_per_step=round(1e3 * s, 1), first_step_s=round(first, 1),
                          loss=round(metrics["loss"].item(), 4),
                          peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))), flush=True)


def random_sampling_model(targs, dev):
    model, _ = train.build_model(targs, IMAGENET, 768)
    with torch.no_grad():  # adaLN-Zero: zero layers would make every velocity exactly 0, and the
        for p in model.parameters():  # comparison with fp32 trivial
            if not p.any():
                p.normal_(0, 0.02)
    return model.to(dev).eval()


def guided_steps(args):
    """(plain, guided) model evaluations of sample_sde's time grid under args' guidance interval."""
    times = torch.linspace(1.0, 0.04, args.num_steps, dtype=torch.float64).tolist()
    guided = sum(args.guidance_low <= t <= args.guidance_high for t in times) if args.cfg_scale > 1 else 0
    return args.num_steps - guided, guided


def bench_sample(a, dev):
    def sampler_args(steps, precision):  # what sample.py's flags give sample_latents
        return argparse.Namespace(mode="sde", num_steps=steps, heun=False, cfg_scale=2.3, cls_cfg_scale=2.3,
                                  guidance_low=0.0, guidance_high=0.85, path_type="linear", seed=0,
                                  precision=precision)
    args = sampler_args(a.steps, "bf16")
    targs = train.get_args(["--data-path", "unused", "--model", a.model])
    model = random_sampling_model(targs, dev)
    x, cls, y = sample.noise_and_labels(range(a.batch), model, args, dev)

    def run(m, ar):
        return sample.sample_latents(m, x, cls, y, ar,
                                     generator=torch.Generator(dev).manual_seed(0)).float()

    with torch.no_grad():
        # Strict fp32 reference: no autocast, no TF32, eager; the TF32 switch is restored after.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        ref = run(model, sampler_args(a.steps, "fp32"))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        for variant in a.variants:
            torch.cuda.reset_peak_memory_stats()
            # autocast: the product's default, fp32 weights under bf16 autocast. fp8: bf16 weights
            # with fp8 GEMMs in the blocks, under the same autocast and fp32 inputs.
            m = model if variant in ("autocast", "autotune") else fp8_inference(model, variant)
            mode = "max-autotune-no-cudagraphs" if variant == "autotune" else None
            net = torch.compile(m, dynamic=False, mode=mode) if a.compile else m  # two static graphs, as sample.py
            t0 = time.time()
            run(net, args)
            first = time.time() - t0
            s, out = timed(lambda: run(net, args), a.runs, 0)
            rel = ((out - ref).norm() / ref.norm()).item()
            # Launch overhead check: the sampler's time against its model evaluations alone.
            forward = {}
            for n in (a.batch, 2 * a.batch):
                xi, ci = x.repeat(n // a.batch, 1, 1, 1), cls.repeat(n // a.batch, 1)
                yi, ti = y.repeat(n // a.batch), torch.full((n,), 0.5, device=dev)
                with torch.autocast("cuda", torch.bfloat16):
                    forward[n] = timed(lambda: net(xi, ti, yi, ci), 5, 2)[0]
            plain, guided = guided_steps(args)
            model_s = plain * forward[a.batch] + guided * forward[2 * a.batch]
            row = dict(side="ours", what="sample", variant=variant, model=a.model, batch=a.batch, steps=a.steps,
                       compile=a.compile, img_per_s=round(a.batch / s, 2), s_per_batch=round(s, 2),
                       first_run_s=round(first, 1), rel_l2_vs_fp32=float(f"{rel:.2e}"),
                       forward_ms={n: round(1e3 * f, 1) for n, f in forward.items()},
                       model_evals_s=round(model_s, 2), outside_model_s=round(s - model_s, 2),
                       peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))
            if a.long_steps:  # one batch of the paper's protocol (SDE 250 steps), for the 50K estimate
                long_s, _ = timed(lambda: run(net, sampler_args(a.long_steps, "bf16")), 1, 0)
                row.update(long_steps=a.long_steps, long_s_per_batch=round(long_s, 2),
                           long_hours_per_50k=round(50_000 / a.batch * long_s / 3600, 2))
            print(json.dumps(row), flush=True)
            del net, m
            torch._dynamo.reset()


def bench_optim(a, dev):
    """The optimizer phase alone, on the SiT's parameters with random gradients: train.optimizer_step
    (foreach clipping, fused AdamW, foreach EMA lerp) against compiled_optimizer_phase."""
    args = train.get_args(["--data-path", "unused", "--model", a.model])
    model = train.build_model(args, IMAGENET, 768)[0].to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    grads = [torch.randn_like(p) for p in model.parameters()]
    n = sum(p.numel() for p in model.parameters())
    for phase in ("eager", "compiled"):
        opt, scaler = train.build_optimizer(args, model)
        step = train.optimizer_step
        if phase == "compiled":
            opt, step = compiled_optimizer_phase(args, model, ema)

        def run():
            for p, g in zip(model.parameters(), grads):
                p.grad = g  # no copy: the gradients stand ready, as after a backward
            return step(model, ema, opt, scaler, args.max_grad_norm, args.ema_decay)
        t0 = time.time()
        run()
        torch.cuda.synchronize()
        first = time.time() - t0
        s, _ = timed(run, a.steps, warm=3)
        print(json.dumps(dict(side="ours", what="optimizer phase", model=a.model, phase=phase, params=n,
                              tensors=len(grads), ms_per_step=round(1e3 * s, 2), first_call_s=round(first, 1))),
              flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["train", "sample", "optim"])
    p.add_argument("--model", default="SiT-XL/2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="train: timed steps; sample: SDE steps")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="train")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-mode", default=None, choices=["reduce-overhead"], help="train: see above")
    p.add_argument("--opt-phase", default="eager", choices=["eager", "compiled"], help="train: see above")
    p.add_argument("--fp8", action="store_true", help="train: torchao float8 training of the blocks")
    p.add_argument("--car", default="none", choices=["none", "source", "target", "joint"],
                   help="train: CAR-Flow's shift maps, as train.py --car")
    p.add_argument("--target", default="stochastic", choices=["stochastic", "closed-form"], help="train: train.py's --target")
    p.add_argument("--cf-refs", type=int, default=128, help="train: train.py's --cf-refs")
    p.add_argument("--variants", nargs="+", default=["autocast"], choices=["autocast", "autotune", "fp8", "fp8-tensor"], help="sample")
    p.add_argument("--runs", type=int, default=2, help="sample: timed runs after one warm-up run")
    p.add_argument("--long-steps", type=int, default=0, help="sample: also time one batch of this many steps")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py --tf32
    dev = torch.device("cuda")
    dict(train=bench_train, sample=bench_sample, optim=bench_optim)[a.what](a, dev)


if __name__ == "__main__":
    main()
