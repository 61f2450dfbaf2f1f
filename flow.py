"""Interpolant, training loss and samplers of REG (SiT arXiv 2401.08740; REG 2507.01467).

Time runs from data (t = 0) to noise (t = 1): x_t = alpha_t * x + sigma_t * eps, and the model
predicts the velocity v = alpha'_t * x + sigma'_t * eps. The DINOv2 class token follows the same
path with the same t and its own noise. The model is treated as a function
    model(x, t, y, cls) -> (v, v_cls, zs, ...)
with v_cls None when there is no class token and zs None when the projector is off.

    losses = training_loss(model, x, y, cls, patches)          # REG
    losses = training_loss(model, x, y, None, patches)         # REPA: no class token
    x0, cls0 = sample_sde(model, noise, y, cls_noise, steps=250, cfg_scale=2.3, ...)
"""
import math

import torch
import torch.nn.functional as F

PATHS = ("linear", "cosine")


def check_path(path):
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")


def interpolant(t, path="linear"):
    """alpha_t, sigma_t and their time derivatives for t in [0, 1] (any shape, any dtype)."""
    check_path(path)
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    a, s = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)  # cosine (GVP): a^2 + s^2 = 1
    return a, s, -math.pi / 2 * s, math.pi / 2 * a


def sample_time(n, schedule="uniform", path="linear", device=None, generator=None):
    """(n,) training times: uniform on [0, 1], or "lognormal" (s = e^n, n ~ N(0, 1), mapped to [0, 1])."""
    if schedule == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if schedule == "lognormal":
        check_path(path)
        s = torch.randn(n, device=device, generator=generator).exp()
        return s / (1 + s) if path == "linear" else 2 / math.pi * torch.atan(s)
    raise ValueError(f"unknown time schedule {schedule!r}; choose 'uniform' or 'lognormal'")


def _bcast(t, x):
    return t.reshape(-1, *[1] * (x.dim() - 1))  # (N,) -> (N, 1, ..., 1)


def training_loss(model, x, y, cls=None, patches=None, *, path="linear", time_schedule="uniform",
                  proj_coeff=0.5, cls_coeff=0.03, t=None, noise=None, cls_noise=None):
    """REG's loss for one batch; returns per-sample terms and their weighted total.

    x: (N, C, H, W) clean latents; y: (N,) labels; cls: (N, z_dim) clean DINOv2 class token, or None
    for a model without the token (SiT, REPA); patches: (N, T, z_dim) clean DINOv2 patch tokens, or
    None for a model without projector. t, noise, cls_noise may be given (tests); else drawn here.
    Returns {"loss": scalar, "denoise": (N,), "cls": (N,) or None, "proj": (N,) or None}.
    """
    n = x.shape[0]
    if t is None:
        t = sample_time(n, time_schedule, path, device=x.device)
    if noise is None:
        noise = torch.randn_like(x)
    alpha, sigma, d_alpha, d_sigma = interpolant(_bcast(t, x), path)
    x_t = alpha * x + sigma * noise
    target = d_alpha * x + d_sigma * noise

    cls_t = cls_target = None
    if cls is not None:
        if cls_noise is None:
            cls_noise = torch.randn_like(cls)
        alpha, sigma, d_alpha, d_sigma = interpolant(_bcast(t, cls), path)
        cls_t = alpha * cls + sigma * cls_noise
        cls_target = d_alpha * cls + d_sigma * cls_noise

    v, v_cls, zs = model(x_t, t, y, cls_t)[:3]
    losses = {"denoise": (v.float() - target).square().mean(dim=(1, 2, 3)), "cls": None, "proj": None}
    total = losses["denoise"].mean()
    if cls is not None:
        losses["cls"] = (v_cls.float() - cls_target).square().mean(dim=1)
        total = total + cls_coeff * losses["cls"].mean()
    if patches is not None:
        # Align every token of the sequence with its clean encoder token: [cls, patches] for REG.
        z = patches if cls is None else torch.cat([cls.unsqueeze(1), patches], dim=1)  # (N, L, z_dim)
        if zs is None or zs.shape != z.shape:
            raise ValueError(f"projector output {None if zs is None else tuple(zs.shape)} does not "
                             f"match encoder tokens {tuple(z.shape)}: check the model's projector, "
                             "class token and patch size against the encoder")
        losses["proj"] = -F.cosine_similarity(zs.float(), z.float(), dim=-1).mean(dim=1)
        total = total + proj_coeff * losses["proj"].mean()
    losses["loss"] = total
    return losses


class Guidance:
    """Classifier-free guidance inside the interval [low, high] of t (guidance interval: Kynkäänniemi et al., arXiv 2404.07724, as used by REG 2507.01467).

    Inside the interval (and only when scale > 1) the batch is doubled with the null label and
    the velocity becomes u + scale * (c - u); the class token uses its own cls_scale, where 0
    means "take the conditional velocity". Outside the interval: one conditional pass. Guiding
    the velocity equals guiding the SDE drift, which is affine in v with the same coefficients
    for both halves.
    """

    def __init__(self, scale=1.0, cls_scale=0.0, low=0.0, high=1.0, null_label=1000):
        self.scale, self.cls_scale, self.low, self.high = scale, cls_scale, low, high
        self.null_label = null_label

    def active(self, t):
        return self.scale > 1 and self.low <= t <= self.high

    def velocity(self, model, x, cls, t, y, dtype, guided):
        """(v, v_cls) at the scalar time t: model inputs in `dtype`, outputs in x's dtype."""
        n = x.shape[0]
        if guided:
            x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, self.null_label)])
            cls = None if cls is None else torch.cat([cls, cls])
        t_in = torch.full((x.shape[0],), t, device=x.device, dtype=dtype)
        v, v_cls = model(x.to(dtype), t_in, y, None if cls is None else cls.to(dtype))[:2]
        v, v_cls = v.to(x.dtype), None if v_cls is None else v_cls.to(x.dtype)
        if not guided:
            return v, v_cls
        v = v[n:] + self.scale * (v[:n] - v[n:])  # (N, C, H, W): uncond + s * (cond - uncond)
        if v_cls is not None:
            cond, uncond = v_cls[:n], v_cls[n:]
            v_cls = cond if self.cls_scale == 0 else uncond + self.cls_scale * (cond - uncond)
        return v, v_cls


def score_from_velocity(v, x, t, path="linear"):
    """The score of p_t from the velocity: s = (a/a' v - x) / (sigma^2 - a/a' sigma' sigma).

    For the linear path this is -((1 - t) v + x) / t.
    """
    alpha, sigma, d_alpha, d_sigma = interpolant(torch.tensor(t, dtype=torch.float64), path)
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma)


@torch.no_grad()
def sample_sde(model, x, y, cls=None, *, steps=250, cfg_scale=1.0, cls_cfg_scale=0.0,
               guidance_low=0.0, guidance_high=1.0, null_label=1000, path="linear", generator=None):
    """Euler-Maruyama on the reverse SDE with diffusion w(t) = 2t, as the official sampler.

    x: (N, C, H, W) and cls: (N, z_dim) start noise at t = 1; y: (N,) labels. Times: `steps` points
    spaced linearly from 1 to 0.04 (steps - 1 stochastic steps), then one deterministic step to 0:
    `steps` model evaluations. The state is kept in float64; the model sees x's dtype.
    Returns the samples (x, cls) at t = 0 in x's dtype (cls is None when not given).
    """
    check_path(path)
    if steps < 2:
        raise ValueError("the SDE sampler needs steps >= 2")
    guide = Guidance(cfg_scale, cls_cfg_scale, guidance_low, guidance_high, null_label)
    dtype = x.dtype
    x, cls = x.double(), None if cls is None else cls.double()

    def step(s, v, t, dt, stochastic):
        drift = v - t * score_from_velocity(v, s, t, path)  # v - 1/2 w(t) score, w = 2t
        s = s + drift * dt
        if stochastic:
            noise = torch.randn(s.shape, generator=generator, device=s.device, dtype=s.dtype)
            s = s + math.sqrt(2 * t) * math.sqrt(abs(dt)) * noise
        return s

    times = torch.linspace(1.0, 0.04, steps, dtype=torch.float64).tolist() + [0.0]
    for t, t_next in zip(times[:-1], times[1:]):
        v, v_cls = guide.velocity(model, x, cls, t, y, dtype, guide.active(t))
        stochastic = t_next > 0  # the last step, 0.04 -> 0, is the deterministic mean
        x = step(x, v, t, t_next - t, stochastic)
        if cls is not None:
            cls = step(cls, v_cls, t, t_next - t, stochastic)
    return x.to(dtype), None if cls is None else cls.to(dtype)


@torch.no_grad()
def sample_ode(model, x, y, cls=None, *, steps=50, method="heun", cfg_scale=1.0, cls_cfg_scale=0.0,
               guidance_low=0.0, guidance_high=1.0, null_label=1000):
    """Euler or Heun on dx/dt = v from t = 1 to 0 over `steps` equal intervals; the class token is
    integrated jointly. As in the official sampler, Heun skips its correction on the last interval
    (it would evaluate the model at t = 0) and both of its evaluations follow the guidance
    decision taken at the interval's start. State in float64, model inputs in x's dtype.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown ODE method {method!r}; choose 'euler' or 'heun'")
    guide = Guidance(cfg_scale, cls_cfg_scale, guidance_low, guidance_high, null_label)
    dtype = x.dtype
    x, cls = x.double(), None if cls is None else cls.double()
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        dt, guided = t_next - t, guide.active(t)
        v, v_cls = guide.velocity(model, x, cls, t, y, dtype, guided)
        x_next = x + v * dt
        cls_next = None if cls is None else cls + v_cls * dt
        if method == "heun" and i < steps - 1:
            v2, v2_cls = guide.velocity(model, x_next, cls_next, t_next, y, dtype, guided)
            x_next = x + 0.5 * (v + v2) * dt
            cls_next = None if cls is None else cls + 0.5 * (v_cls + v2_cls) * dt
        x, cls = x_next, cls_next
    return x.to(dtype), None if cls is None else cls.to(dtype)


def start_noise(indices, seed, latent_shape, z_dim=None, num_classes=1000):
    """Start noise and labels of the samples with these global indices (the FID sets of sample.py
    and train.py): x (N, *latent_shape), the class token's cls (N, z_dim) or None, and y (N,) =
    index mod num_classes. A sample's noise comes from a generator seeded by (seed, index) alone,
    so any split of the indices over processes or batches gives the same samples, and
    num_classes * k samples hold each class k times. Seeds are even; sde_generator's are odd."""
    gens = [torch.Generator().manual_seed(_seed(seed, i, 0)) for i in indices]
    x = torch.stack([torch.randn(latent_shape, generator=g) for g in gens])
    cls = torch.stack([torch.randn(z_dim, generator=g) for g in gens]) if z_dim else None
    return x, cls, torch.tensor([i % num_classes for i in indices])


def sde_generator(seed, batch, device):
    """The generator of the SDE noise of batch `batch` of a FID set: an odd seed, never a sample's."""
    return torch.Generator(device).manual_seed(_seed(seed, batch, 1))


def _seed(seed, n, parity):
    # The CPU generator keeps only 32 bits of its seed, so the (seed, n) pairs are folded into 32
    # bits: distinct for every n below 10M, and across seeds for the first 200 seeds.
    return ((seed * 10_000_019 + n) * 2 + parity) % 2**32
