"""Interpolant, training loss and samplers of REG (SiT arXiv 2401.08740; REG 2507.01467).

Time runs from data (t = 0) to noise (t = 1): x_t = alpha_t * x + sigma_t * eps, and the model
predicts the velocity v = alpha'_t * x + sigma'_t * eps. The DINOv2 class token follows the same
path with the same t and its own noise. The model is treated as a function
    model(x, t, y, cls) -> (v, v_cls, zs, ...)
with v_cls None when there is no class token and zs None when the projector is off.

    losses = training_loss(model, x, y, cls, patches)          # REG
    losses = training_loss(model, x, y, None, patches)         # REPA: no class token
    losses = training_loss(model, x, y, [cls_a, cls_b], [patches_a, patches_b])  # two encoders at once
    losses = training_loss(model, x, y, cls, patches, target="closed-form", refs=others)
    x0, cls0 = sample_sde(model, noise, y, cls_noise, steps=250, cfg_scale=2.3, ...)
    losses = training_loss(model, x, y, cls, patches, shifts=sit.shifts(y))   # + CAR-Flow
    x0, cls0 = sample_sde(model, noise, y, cls_noise, shifts=sit.shifts(y))  # CAR-Flow: returns z0 - mu1(y)
    x0, _ = sample_ode(ClosedForm(train_latents, train_labels), noise, y)  # the empirical optimum
    x0, cls0 = sample_sit(sit, noise, y, cls_noise, path="linear", cfg_scale=4.0)  # a trained SiT, as trained

CAR-Flow (arXiv 2509.19300) moves the two ends of the path by learned class shifts: the source
to eps + mu0(y) and the target to x + mu1(y) (their data-at-1 convention rewritten in ours, data
at t = 0). Every formula below follows from one substitution, x -> x + mu1, eps -> eps + mu0:
    z_t = alpha_t (x + mu1) + sigma_t (eps + mu0)       linear: (1 - t)(x + mu1) + t (eps + mu0)
    target = alpha'_t (x + mu1) + sigma'_t (eps + mu0)  linear: (eps + mu0) - (x + mu1)
The gradient reaches mu0 and mu1 through both z_t and the target. Sampling starts at eps + mu0(y),
integrates to t = 0 and subtracts mu1(y); the SDE's score must see the shifted source
(score_from_velocity's source_shift). The class token's path is not shifted: the paper shifts
the latent it generates, and shifting REG's token too would be a second change, not CAR-Flow.
Guidance: the shifts always take the true label (class Guidance says why).
"""
import math

import torch
import torch.nn.functional as F

PATHS = ("linear", "cosine")
TARGETS = ("stochastic", "closed-form")
# Which token fills REG's slot: the four rows of REG's Table 5 (arXiv 2507.01467 v2, Sec. 4.3).
CLS_TARGETS = ("cls", "patch-mean", "learned", "latent-mean")
# What training_loss returns, in the order train.py logs it (proj and cls None when not trained).
LOSS_TERMS = ("loss", "denoise", "proj", "cls")


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


def token_target(cls_target, cls, patches):
    """The clean token that REG's slot is trained to generate, from the encoder's class token cls
    (N, z_dim) and patch tokens patches (N, T, z_dim); None where the slot has no target.

      "cls"          the encoder's class token: REG as released (Sec. 3). Noised on the image's path,
                     its velocity predicted (weight cls_coeff), aligned by REPA's loss as token 0;
                     the sampler starts it from N(0, I) and generates it with the image.
      "patch-mean"   the mean of the encoder's patch tokens (Table 5, "avg. of DINOv2 patch
                     features"); everything else as "cls": noised, predicted, aligned, sampled from noise.
      "learned"      no target. The slot holds one learnable vector (model.SiT slot="learned"), the same
                     for every image and time, not noised and not predicted; the sampler needs no start.
      "latent-mean"  no target. The slot holds the mean of the noisy latent's patch embeddings
                     (model.SiT slot="latent-mean"), recomputed from x_t at every call.
    For the last two the paper names the token (Table 5: "learnable token", "avg. of noisy latent
    features") but not its loss; our reading: no loss of its own, and REPA's alignment on the patch
    tokens only, since the encoder has no token to align the slot with (Appendix A reports the learnable
    token's output at cosine 0.007 with DINOv2's class token, i.e. not pulled towards it).
    """
    if cls_target not in CLS_TARGETS:
        raise ValueError(f"unknown class-token target {cls_target!r}; choose one of {CLS_TARGETS}")
    if cls_target == "cls":
        return cls
    if cls_target == "patch-mean":  # (N, z_dim); one per encoder when several are aligned
        return [p.mean(dim=1) for p in patches] if isinstance(patches, (list, tuple)) else patches.mean(dim=1)
    return None


def _bcast(t, x):
    return t.reshape(-1, *[1] * (x.dim() - 1))  # (N,) -> (N, 1, ..., 1)


def training_loss(model, x, y, cls=None, patches=None, *, path="linear", time_schedule="uniform",
                  proj_coeff=0.5, cls_coeff=0.03, t=None, noise=None, cls_noise=None, shifts=None,
                  target="stochastic", refs=None):
    """REG's loss for one batch; returns per-sample terms and their weighted total.

    x: (N, C, H, W) clean latents; y: (N,) labels; cls: (N, z_dim) clean DINOv2 class token, or None
    for a model without the token (SiT, REPA); patches: (N, T, z_dim) clean DINOv2 patch tokens, or
    None for a model without projector. t, noise, cls_noise may be given (tests); else drawn here.
    Several encoders at once (encoder.Encoders): cls and patches are lists, one per encoder, and the
    model returns one projector output each; the token REG entangles is the first encoder's.
    shifts: CAR-Flow's (mu0, mu1), each (N, C, H, W) or None (SiT.shifts(y)); None: no shifts.
    target: "stochastic", the velocity of the drawn (x, noise) pair, or "closed-form", Bertrand et
    al.'s estimate of the empirically optimal velocity (closed_form_target) from x itself and the
    references refs (N, M - 1, C, H, W) of x's class; the class token keeps the stochastic target.
    Returns {"loss": scalar, "denoise": (N,), "cls": (N,) or None, "proj": (N,) or None}.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    if (target == "closed-form") != (refs is not None):
        raise ValueError("the closed-form target needs refs (N, M - 1, C, H, W), and only it takes them")
    if target == "closed-form" and any(mu is not None for mu in shifts or ()):
        raise ValueError("the closed-form target is derived for the unshifted path; it does not take CAR-Flow's shifts")
    closed_form = target == "closed-form"  # `target` names the target tensor from here on
    cls_all = cls if isinstance(cls, (list, tuple)) else [cls]  # each encoder's class token (None: REPA)
    cls = cls_all[0]  # the token REG entangles: the first encoder's
    n = x.shape[0]
    if t is None:
        t = sample_time(n, time_schedule, path, device=x.device)
    if noise is None:
        noise = torch.randn_like(x)
    if shifts is not None:  # CAR-Flow: the path runs from the shifted data to the shifted noise
        x, noise = shift_ends(x, noise, *shifts)
    alpha, sigma, d_alpha, d_sigma = interpolant(_bcast(t, x), path)
    x_t = alpha * x + sigma * noise
    target = d_alpha * x + d_sigma * noise
    if closed_form:
        target = closed_form_target(x, noise, t, refs, path)

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
        # Align every token of the sequence with its clean encoder token: [cls, patches] for REG;
        # with several encoders, projector k with encoder k (its own class token in the class
        # slot, as REG's release concatenates each encoder's), and the mean of their losses (REPA).
        zs_all = zs if isinstance(zs, (list, tuple)) else [zs]  # one (N, L, z_dim_k) per projector
        patches_all = patches if isinstance(patches, (list, tuple)) else [patches]
        if len(zs_all) != len(patches_all) or (cls is not None and len(cls_all) != len(patches_all)):
            raise ValueError(f"{len(zs_all)} projector outputs for {len(patches_all)} encoders' patch tokens "
                             f"(and {len(cls_all)} class tokens): build the model with one z_dim per encoder")
        terms = []
        for k, (z_tilde, p) in enumerate(zip(zs_all, patches_all)):
            z = p if cls is None else torch.cat([cls_all[k].unsqueeze(1), p], dim=1)  # (N, L, z_dim_k)
            if z_tilde is None or z_tilde.shape != z.shape:
                raise ValueError(f"projector output {None if z_tilde is None else tuple(z_tilde.shape)} does not "
                                 f"match encoder tokens {tuple(z.shape)}: check the model's projector, "
                                 "class token and patch size against the encoder")
            terms.append(-F.cosine_similarity(z_tilde.float(), z.float(), dim=-1).mean(dim=1))  # (N,)
        losses["proj"] = terms[0] if len(terms) == 1 else torch.stack(terms).mean(dim=0)
        total = total + proj_coeff * losses["proj"].mean()
    losses["loss"] = total
    return losses


# ----------------------------------------------------------------------------- the closed-form velocity
#
# Closed-form flow matching (Bertrand et al., arXiv 2506.03719, Sec. 3; their data sits at t = 1,
# ours at t = 0, so every formula below is re-derived for x_t = alpha_t x + sigma_t eps). Take the
# data distribution to be a finite set of references b_1..b_K, each equally likely. Given b_j,
# x_t ~ N(alpha_t b_j, sigma_t^2 I), so the posterior over the references is
#     lambda_j(x_t, t) = p(j | x_t) = softmax_j( -|x_t - alpha_t b_j|^2 / (2 sigma_t^2) ),
# and given b_j the noise is eps = (x_t - alpha_t b_j) / sigma_t, so the velocity is
#     v_j = alpha'_t b_j + sigma'_t (x_t - alpha_t b_j) / sigma_t.
# The regression E|v_theta(x_t, t) - v|^2 is minimised by E[v | x_t] = sum_j lambda_j v_j, which
# is linear in b_j: with the posterior mean x_hat = sum_j lambda_j b_j,
#     v*(x_t, t) = alpha'_t x_hat + sigma'_t (x_t - alpha_t x_hat) / sigma_t,
# on the linear path (alpha = 1 - t, sigma = t): v* = sum_j lambda_j (x_t - b_j) / t = (x_t - x_hat) / t.
# v* is what a network of unlimited capacity trained to the end on the set converges to; its flow
# carries every noise to one of the b_j (it memorises).

def closed_form_velocity(x_t, t, refs, *, y=None, ref_labels=None, null_label=None, path="linear",
                         block=1024):
    """The empirically optimal velocity v*(x_t, t) over the references refs (K, C, H, W).

    x_t: (N, C, H, W); t: a float or (N,) times in (0, 1]. With labels y (N,) and ref_labels (K,)
    row i only sees the references of its class y_i (rows labelled null_label see them all: the
    unconditional v* that classifier-free guidance asks for). The K references are visited in
    blocks of `block` rows, so a whole training set fits: the softmax is accumulated online, in
    log space (running maximum, rescaled sums), as in flash attention. float64 throughout, since
    the log-weights grow as 1/t^2. Returns v* (N, C, H, W) in x_t's dtype.
    """
    x = x_t.flatten(1).double()  # (N, D)
    n = x.shape[0]
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(n)
    if (t <= 0).any():
        raise ValueError("v* is singular at t = 0 (it is x_t's nearest reference, reached); evaluate it at t > 0")
    if (y is None) != (ref_labels is None):
        raise ValueError("class-conditional references need both y (the samples' labels) and ref_labels")
    alpha, sigma, d_alpha, d_sigma = (c[:, None] for c in interpolant(t, path))  # (N, 1) each
    top = torch.full((n, 1), -math.inf, dtype=torch.float64, device=x.device)  # running max log-weight
    total = torch.zeros(n, 1, dtype=torch.float64, device=x.device)  # sum of exp(log-weight - top)
    x_hat = torch.zeros_like(x)  # (N, D): sum of exp(log-weight - top) * b_j
    for start in range(0, len(refs), block):
        b = refs[start:start + block].to(x.device, torch.float64).flatten(1)  # (B, D)
        # -|x_t - alpha b|^2 / (2 sigma^2) up to |x_t|^2 / (2 sigma^2), the same for every j of a row.
        logits = (alpha * (x @ b.T) - alpha ** 2 / 2 * (b * b).sum(1)) / sigma ** 2  # (N, B)
        if y is not None:
            labels = ref_labels[start:start + block].to(x.device)
            same = labels[None] == y.to(x.device)[:, None]
            if null_label is not None:
                same = same | (y.to(x.device) == null_label)[:, None]
            logits = logits.masked_fill(~same, -math.inf)
        new_top = torch.maximum(top, logits.amax(1, keepdim=True))
        shift = torch.where(new_top > -math.inf, new_top, 0.0)  # a row with no reference yet stays at 0
        weights = torch.exp(logits - shift)  # (N, B)
        rescale = torch.exp(top - shift)  # what the sums so far were measured against
        total = total * rescale + weights.sum(1, keepdim=True)
        x_hat = x_hat * rescale + weights @ b
        top = new_top
    if (total == 0).any():
        raise ValueError("a sample has no reference of its class; give references of every label in y")
    x_hat = x_hat / total  # (N, D): E[x | x_t], the posterior mean (Tweedie)
    v = d_alpha * x_hat + d_sigma * (x - alpha * x_hat) / sigma
    return v.reshape(x_t.shape).to(x_t.dtype)


def closed_form_target(x, noise, t, others, path="linear"):
    """Bertrand et al.'s training target (arXiv 2506.03719, Prop. 2): v* over the references
    {x} + others, the sample's own image x (N, C, H, W) and M - 1 others (N, M - 1, C, H, W) of its
    class drawn independently from the data, for x_t = alpha_t x + sigma_t noise at times t (N,).

    Unbiased: averaged over the draws of x, noise and the others, it is the full data set's v*
    at x_t, because the own image makes the references' joint law, given x_t, that of M
    independent data points reweighted by sum_j N(x_t; alpha b_j, sigma^2): the same lambda_j
    then averages out to the posterior p(j | x_t). Without x in the set it is biased.

    Written in the differences d_j = x - b_j, with which it is exact to rounding at every t:
    x_t - alpha b_j = sigma noise + alpha d_j, so, relative to the own image's (d = 0),
        log lambda_j = -(alpha / sigma) noise.d_j - (alpha / sigma)^2 |d_j|^2 / 2   (+ a constant)
        v* = alpha' x + sigma' noise + (sigma' alpha / sigma - alpha') sum_j lambda_j d_j,
    the stochastic target plus a correction (on the linear path: (eps - x) + sum_j lambda_j d_j / t).
    M = 1 (no others) gives the stochastic target exactly. Returns (N, C, H, W) float32.
    """
    with torch.autocast(x.device.type, enabled=False):  # the log-weights need fp32, not bf16
        x, noise = x.float(), noise.float()
        d = (x.unsqueeze(1) - others.float()).flatten(2)  # (N, M - 1, D)
        # t = 0 (drawn with probability 2^-24) is taken as sigma = 1e-6, where the others' weights
        # are already 0 in fp32 unless they copy x: the limit, without the inf * 0 of sigma = 0.
        alpha, sigma, d_alpha, d_sigma = interpolant(t.float(), path)  # (N,) each
        ratio = (alpha / sigma.clamp(min=1e-6))[:, None]  # (N, 1)
        logits = -ratio * torch.einsum("nmd,nd->nm", d, noise.flatten(1)) - ratio ** 2 / 2 * d.square().sum(2)
        own = torch.zeros_like(logits[:, :1])  # the own image: d = 0, log-weight 0
        lam = torch.softmax(torch.cat([own, logits], 1), 1)[:, 1:]  # (N, M - 1); its d adds nothing
        correction = (d_sigma * ratio[:, 0] - d_alpha)[:, None] * torch.einsum("nm,nmd->nd", lam, d)  # (N, D)
        return _bcast(d_alpha, x) * x + _bcast(d_sigma, x) * noise + correction.reshape(x.shape)


class ClosedForm:
    """v* over a whole training set, called like the SiT, model(x, t, y, cls) -> (v*, None, None),
    so that sample_sde / sample_ode sample the empirical optimum instead of a network: every sample
    lands on (a neighbourhood of) a training point. refs (K, C, H, W) latents; labels (K,) or None
    for an unconditional set; the null label (classifier-free guidance) sees every reference."""

    cls_token = False

    def __init__(self, refs, labels=None, null_label=None, path="linear", block=1024):
        self.refs, self.labels, self.null_label, self.path, self.block = refs, labels, null_label, path, block

    def __call__(self, x, t, y, cls=None):
        v = closed_form_velocity(x, t, self.refs, y=None if self.labels is None else y, ref_labels=self.labels,
                                 null_label=self.null_label, path=self.path, block=self.block)
        return v, None, None


class Guidance:
    """Classifier-free guidance inside the interval [low, high] of t (guidance interval: Kynkäänniemi et al., arXiv 2404.07724, as used by REG 2507.01467).

    Inside the interval (and only when scale > 1) the batch is doubled with the null label and
    the velocity becomes u + scale * (c - u); the class token uses its own cls_scale, where 0
    means "take the conditional velocity". Outside the interval: one conditional pass. Guiding
    the velocity equals guiding the SDE drift, which is affine in v with the same coefficients
    for both halves.

    CAR-Flow (arXiv 2509.19300 does not say how it meets guidance; this is our choice): the
    shifts mu0, mu1 take the true label y everywhere, also where the velocity network's label is
    the null one (label dropout in training, the unconditional half here). Then dropout trains
    the unconditional velocity of the same shifted problem (the mixture over classes of the paths
    each class's shifts define), the state z of a guided step, which started at eps + mu0(y), lies
    on the path of both halves, and both halves' SDE scores use the same mu0(y), so the drift stays
    affine in v with shared coefficients and the guided step does nothing with mu0, mu1: the
    sampler adds mu0(y) at the start, subtracts mu1(y) at the end, and passes mu0(y) to the score.
    The other choice, the null label's own shifts, would train the unconditional half on another
    path (data moved by mu1(null), noise by mu0(null)) and evaluate it on class y's states:
    u + s (c - u) would then extrapolate the gap between the two paths' ends and move every sample
    by a multiple of s - 1 of it, whatever the data; on Gaussian data of std sd exactly by
    (s - 1)((mu1(y) - mu1(null)) - sd (mu0(y) - mu0(null))) (tests/test_carflow.py). Not offered.
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


def shift_ends(x, noise, mu0=None, mu1=None):
    """CAR-Flow's ends of the path: data x + mu1(y) at t = 0, noise eps + mu0(y) at t = 1 (a map
    left out, None, is the identity). x, noise, mu0, mu1: (N, C, H, W)."""
    return x if mu1 is None else x + mu1, noise if mu0 is None else noise + mu0


def score_from_velocity(v, x, t, path="linear", source_shift=None):
    """The score of p_t from the velocity: s = (a/a' v - x) / (sigma^2 - a/a' sigma' sigma).

    For the linear path this is -((1 - t) v + x) / t.
    With CAR-Flow's source shift mu0 (N, C, H, W), z = alpha (x + mu1) + sigma (eps + mu0) is
    u + sigma mu0, where u = alpha (x + mu1) + sigma eps is an unshifted path (its data x + mu1) with
    velocity v - sigma' mu0. A translation leaves the score unchanged, so the score of z is the
    formula above at (v - sigma' mu0, z - sigma mu0); linear: -((1 - t) v + z - mu0) / t. (The
    target shift needs nothing: it moves the data, which the formula never sees.)
    """
    alpha, sigma, d_alpha, d_sigma = interpolant(torch.tensor(t, dtype=torch.float64), path)
    if source_shift is not None:
        v, x = v - d_sigma * source_shift, x - sigma * source_shift
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma)


@torch.no_grad()
def sample_sde(model, x, y, cls=None, *, steps=250, cfg_scale=1.0, cls_cfg_scale=0.0,
               guidance_low=0.0, guidance_high=1.0, null_label=1000, path="linear", generator=None,
               shifts=None):
    """Euler-Maruyama on the reverse SDE with diffusion w(t) = 2t, as the official sampler.

    x: (N, C, H, W) and cls: (N, z_dim) start noise at t = 1; y: (N,) labels. Times: `steps` points
    spaced linearly from 1 to 0.04 (steps - 1 stochastic steps), then one deterministic step to 0:
    `steps` model evaluations. The state is kept in float64; the model sees x's dtype.
    shifts: CAR-Flow's (mu0, mu1) of the labels y (SiT.shifts(y)), each (N, C, H, W) or None: the
    state starts at x + mu0, the score accounts for mu0, and the samples are z_0 - mu1.
    Returns the samples (x, cls) at t = 0 in x's dtype (cls is None when not given).
    """
    check_path(path)
    if steps < 2:
        raise ValueError("the SDE sampler needs steps >= 2")
    guide = Guidance(cfg_scale, cls_cfg_scale, guidance_low, guidance_high, null_label)
    dtype = x.dtype
    x, cls = x.double(), None if cls is None else cls.double()
    mu0, mu1 = _float64_shifts(shifts)
    x = x if mu0 is None else x + mu0  # eps + mu0(y): the shifted source

    def step(s, v, t, dt, stochastic, mu0=None):
        drift = v - t * score_from_velocity(v, s, t, path, mu0)  # v - 1/2 w(t) score, w = 2t
        s = s + drift * dt
        if stochastic:
            noise = torch.randn(s.shape, generator=generator, device=s.device, dtype=s.dtype)
            s = s + math.sqrt(2 * t) * math.sqrt(abs(dt)) * noise
        return s

    times = torch.linspace(1.0, 0.04, steps, dtype=torch.float64).tolist() + [0.0]
    for t, t_next in zip(times[:-1], times[1:]):
        v, v_cls = guide.velocity(model, x, cls, t, y, dtype, guide.active(t))
        stochastic = t_next > 0  # the last step, 0.04 -> 0, is the deterministic mean
        x = step(x, v, t, t_next - t, stochastic, mu0)
        if cls is not None:
            cls = step(cls, v_cls, t, t_next - t, stochastic)
    x = x if mu1 is None else x - mu1  # z_0 - mu1(y): back to the data's space
    return x.to(dtype), None if cls is None else cls.to(dtype)


@torch.no_grad()
def sample_ode(model, x, y, cls=None, *, steps=50, method="heun", cfg_scale=1.0, cls_cfg_scale=0.0,
               guidance_low=0.0, guidance_high=1.0, null_label=1000, shifts=None):
    """Euler or Heun on dx/dt = v from t = 1 to 0 over `steps` equal intervals; the class token is
    integrated jointly. As in the official sampler, Heun skips its correction on the last interval
    (it would evaluate the model at t = 0) and both of its evaluations follow the guidance
    decision taken at the interval's start. State in float64, model inputs in x's dtype.
    shifts: CAR-Flow's (mu0, mu1), as for sample_sde; the ODE needs them only at its two ends.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown ODE method {method!r}; choose 'euler' or 'heun'")
    guide = Guidance(cfg_scale, cls_cfg_scale, guidance_low, guidance_high, null_label)
    dtype = x.dtype
    x, cls = x.double(), None if cls is None else cls.double()
    mu0, mu1 = _float64_shifts(shifts)
    x = x if mu0 is None else x + mu0  # eps + mu0(y)
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
    x = x if mu1 is None else x - mu1  # z_0 - mu1(y)
    return x.to(dtype), None if cls is None else cls.to(dtype)


def sample_sit(sit, x, y, cls=None, *, mode="sde", steps=250, method="heun", cfg_scale=1.0, cls_cfg_scale=0.0,
               guidance_low=0.0, guidance_high=1.0, path="linear", generator=None, autocast=None):
    """The one way to sample a SiT as it was trained (train.py's grids, FID and memorized fraction,
    sample.py, the labs): its CAR-Flow shifts of the true labels (sit.shifts(y); (None, None)
    without --car), its null label (sit.num_classes) and the path it was trained on, with
    guidance as given. The one place flow.py reads more of the model than its call.

    x: (N, C, H, W), cls: (N, z_dim) or None, start noise; y: (N,) labels. mode "sde" (sample_sde,
    `path`, `generator` for its noise) or "ode" (sample_ode with `method`). autocast: the dtype
    the model runs in on x's device (torch.bfloat16, torch.float16), None for fp32.
    Returns (x, cls) at t = 0, as the samplers.
    """
    guidance = dict(cfg_scale=cfg_scale, cls_cfg_scale=cls_cfg_scale, guidance_low=guidance_low,
                    guidance_high=guidance_high, null_label=sit.num_classes)
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        shifts = sit.shifts(y)  # (mu0, mu1), each (N, C, H, W) or None
        if mode == "sde":
            return sample_sde(sit, x, y, cls, steps=steps, path=path, generator=generator, shifts=shifts, **guidance)
        if mode == "ode":
            return sample_ode(sit, x, y, cls, steps=steps, method=method, shifts=shifts, **guidance)
    raise ValueError(f"unknown sampler mode {mode!r}; choose 'sde' or 'ode'")


def _float64_shifts(shifts):
    """(mu0, mu1) as float64 tensors (or None), like the samplers' state."""
    return tuple(None if mu is None else mu.double() for mu in (shifts or (None, None)))


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
