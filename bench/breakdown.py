"""Where the time goes: component timings and the PyTorch profiler's kernel table for SiT-XL/2
(random weights, one GPU). The numbers behind BENCHMARKS.md's breakdowns.

    python bench/breakdown.py train     # DINOv2 forward, SiT forward+backward, clip, AdamW, EMA at batch 32
    python bench/breakdown.py sample    # one SiT forward at batch 128 and 256 (autocast and bf16 weights)
    python bench/breakdown.py attention # scaled_dot_product_attention backends at our shapes
"""
import copy
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import os; sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the repository root
from encoder import load_encoder
from flow import training_loss
from model import SiT_models


def milliseconds(fn, n=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.time()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.time() - start) / n * 1000


def kernel_table(fn, rows=25):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def random_xl():
    model = SiT_models["SiT-XL/2"]().cuda()
    with torch.no_grad():  # zero-initialised output layers would make every velocity exactly zero
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model


def train(batch=32):
    model, encoder = random_xl(), load_encoder("dinov2-vit-b", 256, weights=None).cuda()
    run_model, run_encoder = torch.compile(model), torch.compile(encoder)
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device="cuda")
    x, y = torch.randn(batch, 4, 32, 32, device="cuda"), torch.randint(0, 1000, (batch,), device="cuda")
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ema = [p.detach().clone() for p in params]

    def encode():
        with torch.autocast("cuda", torch.bfloat16):
            return run_encoder(images)

    cls, patches = (t.float() for t in encode())

    def forward_backward():
        with torch.autocast("cuda", torch.bfloat16):
            loss = training_loss(run_model, x, y, cls, patches)["loss"]
        loss.backward()
        opt.zero_grad(set_to_none=True)

    print(f"DINOv2 forward {milliseconds(encode):.1f} ms")
    print(f"SiT forward + backward {milliseconds(forward_backward):.1f} ms")
    for p in params:  # forward_backward leaves no gradients; the optimizer needs some to work on
        p.grad = torch.randn_like(p)
    print(f"clip {milliseconds(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)):.1f} ms")
    print(f"fused AdamW {milliseconds(opt.step):.1f} ms")
    print(f"EMA {milliseconds(lambda: torch._foreach_lerp_(ema, params, 1e-4)):.1f} ms")
    kernel_table(forward_backward)


def sample(batch=128):
    model = random_xl().eval()
    for mode in ("autocast", "bf16 weights"):
        net = model if mode == "autocast" else copy.deepcopy(model).to(torch.bfloat16)
        dtype = torch.float32 if mode == "autocast" else torch.bfloat16
        compiled = torch.compile(net, dynamic=False)
        for n in (batch, 2 * batch):
            x, t = torch.randn(n, 4, 32, 32, device="cuda", dtype=dtype), torch.rand(n, device="cuda", dtype=dtype)
            y, cls = torch.randint(0, 1000, (n,), device="cuda"), torch.randn(n, 768, device="cuda", dtype=dtype)

            def forward():
                with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=mode == "autocast"):
                    return compiled(x, t, y, cls)

            print(f"{mode}: batch {n} forward {milliseconds(forward):.1f} ms")
        if mode == "autocast":
            kernel_table(forward, rows=20)


def attention():
    shapes = {"training, fwd+bwd": (32, 16, 257, 72, True), "sampling, fwd": (256, 16, 257, 72, False),
              "DINOv2, fwd": (32, 12, 257, 64, False)}
    for name, (n, heads, length, dim, backward) in shapes.items():
        q, k, v = (torch.randn(n, heads, length, dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=backward) for _ in range(3))
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            def run():
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v)
                    if backward:
                        out.sum().backward()
            print(f"{name} {backend.name}: {milliseconds(run, n=20):.3f} ms per layer")


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    {"train": train, "sample": sample, "attention": attention}[sys.argv[1]]()
