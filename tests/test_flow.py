"""Specification tests for flow.py: interpolant, loss and samplers (SiT arXiv 2401.08740; REG 2507.01467).

Expectations are closed forms. The samplers are run on a Gaussian data distribution, whose exact
velocity and score are known, so that their outputs can be compared with the exact answer:
x ~ N(mu, sigma^2) per dimension, x_t = alpha_t x + sigma_t eps, var_t = alpha_t^2 sigma^2 + sigma_t^2,
E[x | x_t] = mu + alpha_t sigma^2 / var_t (x_t - alpha_t mu), E[eps | x_t] = sigma_t / var_t (x_t - alpha_t mu),
v(x_t, t) = alpha'_t E[x | x_t] + sigma'_t E[eps | x_t], score(x_t) = -(x_t - alpha_t mu) / var_t.
The ODE flow of this field maps z ~ N(0, 1) at t = 1 to mu + sigma z at t = 0, sample by sample.

    python3 -m pytest -q tests/test_flow.py
"""
import math

import numpy as np
import pytest
import torch

from flow import interpolant, sample_ode, sample_sde, sample_time, score_from_velocity, training_loss
from model import SiT

NULL = 10  # null label of the stub models (num_classes = 10)


def coefficients(t, path):
    """alpha, sigma, alpha', sigma' written out from SiT's interpolants (arXiv 2401.08740) (t: float or tensor)."""
    cos, sin = (torch.cos, torch.sin) if torch.is_tensor(t) else (math.cos, math.sin)
    if path == "linear":
        return 1 - t, t, -1.0, 1.0
    a, s = cos(math.pi * t / 2), sin(math.pi * t / 2)
    return a, s, -math.pi / 2 * s, math.pi / 2 * a


def gaussian_velocity(x, t, mu, sigma, path="linear"):
    a, s, da, ds = coefficients(t, path)
    var = a ** 2 * sigma ** 2 + s ** 2
    r = x - a * mu
    return da * (mu + a * sigma ** 2 / var * r) + ds * (s / var * r)


def gaussian_score(x, t, mu, sigma, path="linear"):
    a, s, _, _ = coefficients(t, path)
    return -(x - a * mu) / (a ** 2 * sigma ** 2 + s ** 2)


class GaussianModel:
    """The exact velocity of Gaussian data as a "model": mean mu_c for real labels, mu_u for the null
    label; the class token likewise with its own means and std."""

    def __init__(self, mu_c, mu_u, sigma, cls_mu_c=None, cls_mu_u=None, cls_sigma=None, path="linear"):
        self.mu, self.sigma = (mu_c, mu_u), sigma
        self.cls_mu, self.cls_sigma = (cls_mu_c, cls_mu_u), cls_sigma
        self.path = path

    def __call__(self, x, t, y, cls=None):
        null = (y == NULL).reshape(-1, 1, 1, 1)
        tt = t.reshape(-1, 1, 1, 1).to(x.dtype)
        v = gaussian_velocity(x, tt, torch.where(null, self.mu[1], self.mu[0]), self.sigma, self.path)
        v_cls = None
        if cls is not None:
            mu = torch.where(null.reshape(-1, 1), self.cls_mu[1], self.cls_mu[0])
            v_cls = gaussian_velocity(cls, tt.reshape(-1, 1), mu, self.cls_sigma, self.path)
        return v, v_cls, None


def gaussian_problem(n=20_000, seed=0):
    """Per-dimension means and stds for a (2, 2, 2) latent and a 3-dim class token, and start noise."""
    g = torch.Generator().manual_seed(seed)
    mu_c = torch.linspace(-1.5, 1.5, 8, dtype=torch.float64).reshape(2, 2, 2)
    mu_u = torch.linspace(0.8, -0.4, 8, dtype=torch.float64).reshape(2, 2, 2)
    sigma = torch.linspace(0.3, 1.2, 8, dtype=torch.float64).reshape(2, 2, 2)
    cls = (torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([-0.5, 0.0, 1.5], dtype=torch.float64),
           torch.tensor([0.4, 1.0, 0.7], dtype=torch.float64))
    z = torch.randn(n, 2, 2, 2, generator=g, dtype=torch.float64)
    z_cls = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)
    return mu_c, mu_u, sigma, cls, z, z_cls, y


# ---------------------------------------------------------------- interpolant


def test_linear_interpolant_is_one_minus_t_and_t():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    a, s, da, ds = interpolant(t, "linear")
    torch.testing.assert_close(a, 1 - t)
    torch.testing.assert_close(s, t)
    torch.testing.assert_close(da, -torch.ones_like(t))
    torch.testing.assert_close(ds, torch.ones_like(t))


def test_cosine_interpolant_is_gvp_with_closed_form_derivatives():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    a, s, da, ds = interpolant(t, "cosine")
    expected = [np.cos(np.pi * t.numpy() / 2), np.sin(np.pi * t.numpy() / 2),
                -np.pi / 2 * np.sin(np.pi * t.numpy() / 2), np.pi / 2 * np.cos(np.pi * t.numpy() / 2)]
    for got, want in zip((a, s, da, ds), expected):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-15)
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(t))


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_interpolant_derivatives_match_finite_differences(path):
    t, h = torch.linspace(0.05, 0.95, 19, dtype=torch.float64), 1e-6
    a, s, da, ds = interpolant(t, path)
    a_plus, s_plus, _, _ = interpolant(t + h, path)
    a_minus, s_minus, _, _ = interpolant(t - h, path)
    torch.testing.assert_close(da, (a_plus - a_minus) / (2 * h), atol=1e-8, rtol=0)
    torch.testing.assert_close(ds, (s_plus - s_minus) / (2 * h), atol=1e-8, rtol=0)


def test_interpolant_keeps_the_shape_and_dtype_of_t():
    t = torch.rand(3, 1, 1, 1, dtype=torch.float64)
    for path in ("linear", "cosine"):
        for value in interpolant(t, path):
            assert value.shape == t.shape and value.dtype == torch.float64


def test_unknown_path_raises():
    with pytest.raises(ValueError, match="path"):
        interpolant(torch.rand(3), "vp")
    x = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match="path"):
        training_loss(lambda *a: (x, None, None), x, torch.zeros(2, dtype=torch.long), path="vp")
    with pytest.raises(ValueError, match="path"):
        sample_sde(lambda *a: (x, None, None), x, torch.zeros(2, dtype=torch.long), steps=3, path="vp")


# ---------------------------------------------------------------- training times


def test_uniform_times_are_uniform_on_the_unit_interval():
    t = sample_time(200_000, "uniform", generator=torch.Generator().manual_seed(0))
    assert t.shape == (200_000,) and t.min() >= 0 and t.max() <= 1
    for q in (0.1, 0.25, 0.5, 0.9):
        assert (t <= q).float().mean().item() == pytest.approx(q, abs=0.004)


def normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_lognormal_times_follow_the_closed_form_distribution(path):
    t = sample_time(200_000, "lognormal", path, generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.005)  # s = e^n has median 1
    for q in (0.1, 0.3, 0.7, 0.9):
        # P(t <= q) = P(n <= log s(q)), s(q) the inverse of t(s) = s/(1+s) or (2/pi) atan(s)
        s_q = q / (1 - q) if path == "linear" else math.tan(math.pi * q / 2)
        assert (t <= q).float().mean().item() == pytest.approx(normal_cdf(math.log(s_q)), abs=0.004)


def test_unknown_time_schedule_raises():
    with pytest.raises(ValueError, match="schedule"):
        sample_time(4, "logit")


# ---------------------------------------------------------------- training loss


def loss_batch(n=4, t_tokens=4, z=6, seed=0):
    """Clean data, fixed times and noises, and projector outputs zs for a stub model (float64)."""
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(n, 2, 2, 2, generator=g, dtype=torch.float64),
                y=torch.arange(n),
                cls=torch.randn(n, z, generator=g, dtype=torch.float64),
                patches=torch.randn(n, t_tokens, z, generator=g, dtype=torch.float64),
                t=torch.rand(n, generator=g, dtype=torch.float64),
                noise=torch.randn(n, 2, 2, 2, generator=g, dtype=torch.float64),
                cls_noise=torch.randn(n, z, generator=g, dtype=torch.float64),
                zs=torch.randn(n, 1 + t_tokens, z, generator=g, dtype=torch.float64))


class LossStub:
    """A model function with known outputs: v = 2 x_t + t, v_cls = reversed cls_t, zs fixed."""

    def __init__(self, zs):
        self.zs, self.seen = zs, {}

    def __call__(self, x_t, t, y, cls_t=None):
        self.seen.update(x_t=x_t, t=t, y=y, cls_t=cls_t)
        v_cls = None if cls_t is None else cls_t.flip(-1)
        return 2 * x_t + t.reshape(-1, 1, 1, 1), v_cls, self.zs


def hand_loss(b, path, with_cls=True, with_proj=True, proj_coeff=0.5, cls_coeff=0.03):
    """The loss of REG (arXiv 2507.01467) and REPA (2410.06940) for LossStub, in numpy, sample by sample."""
    x, eps, cls, eps_c = (b[k].numpy() for k in ("x", "noise", "cls", "cls_noise"))
    zs, patches = b["zs"].numpy(), b["patches"].numpy()
    denoise, cls_loss, proj = [], [], []
    for i, t in enumerate(b["t"].tolist()):
        a, s, da, ds = coefficients(t, path)
        v = 2 * (a * x[i] + s * eps[i]) + t
        denoise.append(np.mean((v - (da * x[i] + ds * eps[i])) ** 2))
        v_cls = (a * cls[i] + s * eps_c[i])[::-1]
        cls_loss.append(np.mean((v_cls - (da * cls[i] + ds * eps_c[i])) ** 2))
        targets = np.concatenate([cls[i][None], patches[i]]) if with_cls else patches[i]
        cosines = [zs[i, k] @ targets[k] / (np.linalg.norm(zs[i, k]) * np.linalg.norm(targets[k]))
                   for k in range(len(targets))]
        proj.append(-np.mean(cosines))
    total = np.mean(denoise)
    total += cls_coeff * np.mean(cls_loss) if with_cls else 0
    total += proj_coeff * np.mean(proj) if with_proj else 0
    return dict(loss=total, denoise=np.array(denoise), cls=np.array(cls_loss), proj=np.array(proj))


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_reg_loss_matches_hand_computation(path):
    b = loss_batch()
    stub = LossStub(b["zs"])
    got = training_loss(stub, b["x"], b["y"], b["cls"], b["patches"], path=path,
                        t=b["t"], noise=b["noise"], cls_noise=b["cls_noise"])
    want = hand_loss(b, path)
    for key in ("denoise", "cls", "proj"):
        np.testing.assert_allclose(got[key].numpy(), want[key], rtol=1e-6, atol=1e-6)  # v is cast to float32
    assert got["loss"].item() == pytest.approx(want["loss"], rel=1e-6)
    # The model sees x_t and cls_t at the same t, and the labels untouched (dropout lives in the model).
    a, s, _, _ = coefficients(b["t"], path)
    torch.testing.assert_close(stub.seen["x_t"], a.reshape(-1, 1, 1, 1) * b["x"] + s.reshape(-1, 1, 1, 1) * b["noise"])
    torch.testing.assert_close(stub.seen["cls_t"], a[:, None] * b["cls"] + s[:, None] * b["cls_noise"])
    assert torch.equal(stub.seen["t"], b["t"]) and torch.equal(stub.seen["y"], b["y"])


def test_loss_coefficients_weight_the_batch_means():
    b = loss_batch()
    got = training_loss(LossStub(b["zs"]), b["x"], b["y"], b["cls"], b["patches"], proj_coeff=2.0, cls_coeff=0.7,
                        t=b["t"], noise=b["noise"], cls_noise=b["cls_noise"])
    want = hand_loss(b, "linear", proj_coeff=2.0, cls_coeff=0.7)
    assert got["loss"].item() == pytest.approx(want["loss"], rel=1e-6)


def test_repa_loss_has_no_class_term_and_aligns_patches_only():
    b = loss_batch()
    stub = LossStub(b["zs"][:, 1:])  # a REPA projector returns T tokens
    got = training_loss(stub, b["x"], b["y"], None, b["patches"], t=b["t"], noise=b["noise"])
    b["zs"] = b["zs"][:, 1:]
    want = hand_loss(b, "linear", with_cls=False)
    assert got["cls"] is None and stub.seen["cls_t"] is None
    np.testing.assert_allclose(got["proj"].numpy(), want["proj"], rtol=1e-6, atol=1e-6)
    assert got["loss"].item() == pytest.approx(want["loss"], rel=1e-6)


def test_plain_sit_loss_is_the_mean_denoising_loss():
    b = loss_batch()
    got = training_loss(LossStub(None), b["x"], b["y"], None, None, t=b["t"], noise=b["noise"])
    want = hand_loss(b, "linear", with_cls=False, with_proj=False)
    assert got["cls"] is None and got["proj"] is None
    np.testing.assert_allclose(got["denoise"].numpy(), want["denoise"], rtol=1e-6, atol=1e-6)
    assert got["loss"].item() == pytest.approx(want["loss"], rel=1e-6)


def test_projector_tokens_not_matching_encoder_tokens_raise():
    b = loss_batch()
    reg_without_cls_slot = LossStub(b["zs"][:, 1:])
    with pytest.raises(ValueError, match="projector"):
        training_loss(reg_without_cls_slot, b["x"], b["y"], b["cls"], b["patches"])
    with pytest.raises(ValueError, match="projector"):
        training_loss(LossStub(None), b["x"], b["y"], b["cls"], b["patches"])


@pytest.mark.parametrize("with_cls", [True, False])
def test_several_encoders_average_their_alignment_losses_and_reg_entangles_the_first_token(with_cls):
    b, other = loss_batch(), loss_batch(z=5, seed=1)  # a second encoder of another width
    stub = LossStub((b["zs"], other["zs"]) if with_cls else (b["zs"][:, 1:], other["zs"][:, 1:]))
    cls = [b["cls"], other["cls"]] if with_cls else None
    got = training_loss(stub, b["x"], b["y"], cls, [b["patches"], other["patches"]], t=b["t"], noise=b["noise"],
                        cls_noise=b["cls_noise"])
    # By hand: each encoder's tokens [its own cls, its patches] against its projector, then the mean.
    proj = []
    for i in range(4):
        per_encoder = []
        for e in (b, other):
            targets = torch.cat([e["cls"][i][None], e["patches"][i]]) if with_cls else e["patches"][i]
            outputs = e["zs"][i] if with_cls else e["zs"][i, 1:]
            per_encoder.append(-np.mean([float(o @ z / (o.norm() * z.norm())) for o, z in zip(outputs, targets)]))
        proj.append(np.mean(per_encoder))
    np.testing.assert_allclose(got["proj"].numpy(), proj, rtol=1e-6, atol=1e-6)
    if with_cls:  # the class token the model sees and predicts is the first encoder's
        want = hand_loss(b, "linear")
        np.testing.assert_allclose(got["cls"].numpy(), want["cls"], rtol=1e-6, atol=1e-6)
        assert stub.seen["cls_t"].shape == b["cls"].shape
    else:
        assert got["cls"] is None and stub.seen["cls_t"] is None


def test_one_projector_per_encoder_or_an_error():
    b, other = loss_batch(), loss_batch(z=5, seed=1)
    with pytest.raises(ValueError, match="1 projector outputs for 2 encoders"):
        training_loss(LossStub(b["zs"]), b["x"], b["y"], [b["cls"], other["cls"]], [b["patches"], other["patches"]])


@pytest.mark.parametrize("schedule, below_tenth", [("uniform", 0.1), ("lognormal", normal_cdf(math.log(1 / 9)))])
def test_loss_draws_times_from_the_schedule(schedule, below_tenth):
    stub, x = LossStub(None), torch.zeros(20_000, 1, 1, 1)
    torch.manual_seed(0)
    training_loss(stub, x, torch.zeros(20_000, dtype=torch.long), time_schedule=schedule)
    t = stub.seen["t"]
    assert t.shape == (20_000,) and t.min() >= 0 and t.max() <= 1
    assert (t < 0.1).float().mean().item() == pytest.approx(below_tenth, abs=0.01)


def test_reg_loss_of_a_real_sit_matches_hand_computation():
    torch.manual_seed(0)
    model = SiT(input_size=4, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=NULL,
                encoder_depth=1, z_dim=6, projector_dim=16, class_dropout_prob=0.0).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # wake up the zero-initialized layers
    x, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    cls, cls_eps, patches = torch.randn(3, 6), torch.randn(3, 6), torch.randn(3, 4, 6)
    t, y = torch.tensor([0.1, 0.5, 0.8]), torch.tensor([0, 4, 9])
    got = training_loss(model, x, y, cls, patches, t=t, noise=eps, cls_noise=cls_eps)

    x_t = (1 - t).reshape(-1, 1, 1, 1) * x + t.reshape(-1, 1, 1, 1) * eps
    cls_t = (1 - t)[:, None] * cls + t[:, None] * cls_eps
    with torch.no_grad():
        v, v_cls, zs = model(x_t, t, y, cls_t)
    denoise = ((v - (eps - x)) ** 2).mean(dim=(1, 2, 3))
    cls_loss = ((v_cls - (cls_eps - cls)) ** 2).mean(dim=1)
    target = torch.cat([cls[:, None], patches], dim=1)  # (N, 1+T, z_dim)
    proj = -((zs / zs.norm(dim=-1, keepdim=True)) * (target / target.norm(dim=-1, keepdim=True))).sum(-1).mean(1)
    torch.testing.assert_close(got["denoise"], denoise)
    torch.testing.assert_close(got["cls"], cls_loss)
    torch.testing.assert_close(got["proj"], proj)
    torch.testing.assert_close(got["loss"], denoise.mean() + 0.5 * proj.mean() + 0.03 * cls_loss.mean())
    assert got["loss"].requires_grad


# ---------------------------------------------------------------- score


def test_linear_score_from_velocity_is_minus_one_minus_t_v_plus_x_over_t():
    g = torch.Generator().manual_seed(0)
    v, x = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    for t in (0.04, 0.3, 0.5, 0.9, 1.0):
        torch.testing.assert_close(score_from_velocity(v, x, t, "linear"), -((1 - t) * v + x) / t)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_score_from_exact_velocity_is_the_exact_gaussian_score(path):
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    mu, sigma = 0.7, 0.4
    for t in (0.04, 0.2, 0.5, 0.8, 0.99):
        v = gaussian_velocity(x, t, mu, sigma, path)
        torch.testing.assert_close(score_from_velocity(v, x, t, path), gaussian_score(x, t, mu, sigma, path))


# ---------------------------------------------------------------- ODE sampler on Gaussian data


def ode_error(method, steps, path="linear"):
    mu_c, mu_u, sigma, _, z, _, y = gaussian_problem(n=64)
    x0, _ = sample_ode(GaussianModel(mu_c, mu_u, sigma, path=path), z, y, steps=steps, method=method)
    return (x0 - (mu_c + sigma * z)).abs().max().item()


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_heun_ode_maps_noise_to_the_exact_gaussian_transport(path):
    assert ode_error("heun", 50, path) < 5e-3


def test_euler_ode_error_shrinks_first_order_and_heun_second_order():
    euler = [ode_error("euler", n) for n in (10, 40)]
    heun = [ode_error("heun", n) for n in (10, 40)]
    assert 2.5 < euler[0] / euler[1] < 6  # ~4 for a first-order method
    assert heun[0] / heun[1] > 10  # ~16 for a second-order method
    assert heun[1] < euler[1] / 10


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_guided_ode_samples_the_guided_gaussian_and_class_token(method):
    mu_c, mu_u, sigma, (cls_c, cls_u, cls_sigma), z, z_cls, y = gaussian_problem(n=64)
    model = GaussianModel(mu_c, mu_u, sigma, cls_c, cls_u, cls_sigma)
    # The exact velocity is affine in mu, so guidance with scale s transports to mu_u + s (mu_c - mu_u).
    for cls_scale, cls_mu in ((0.0, cls_c), (1.7, cls_u + 1.7 * (cls_c - cls_u))):
        x0, c0 = sample_ode(model, z, y, z_cls, steps=200, method=method, cfg_scale=2.5,
                            cls_cfg_scale=cls_scale, null_label=NULL)
        tol = 5e-2 if method == "euler" else 1e-3
        torch.testing.assert_close(x0, mu_u + 2.5 * (mu_c - mu_u) + sigma * z, atol=tol, rtol=0)
        torch.testing.assert_close(c0, cls_mu + cls_sigma * z_cls, atol=tol, rtol=0)


# ---------------------------------------------------------------- SDE sampler on Gaussian data


def predicted_sde_moments(steps, mu, sigma, path):
    """Mean and variance of the Euler-Maruyama output on Gaussian data, propagated exactly.

    Each step x <- x + (v - t score) dt + sqrt(2t) sqrt|dt| xi is affine in x (v and score are),
    so with x ~ N(m, V): m <- a m + b, V <- a^2 V + c^2, starting from N(0, 1) at t = 1.
    """
    times = list(np.linspace(1.0, 0.04, steps)) + [0.0]
    m, var = np.zeros_like(mu), np.ones_like(mu)
    for k, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        dt = t_next - t

        def drift(x):
            return gaussian_velocity(x, t, mu, sigma, path) - t * gaussian_score(x, t, mu, sigma, path)

        b = dt * drift(np.zeros_like(mu))
        a = 1 + dt * (drift(np.ones_like(mu)) - drift(np.zeros_like(mu)))
        c2 = 2 * t * abs(dt) if k < steps - 1 else 0.0
        m, var = a * m + b, a ** 2 * var + c2
    return m, var


def assert_gaussian_samples(samples, m, var, n):
    """Per-dimension sample mean and std within 5 standard errors of the predicted moments."""
    mean, std = samples.mean(0).numpy(), samples.std(0).numpy()
    np.testing.assert_array_less(np.abs(mean - m), 5 * np.sqrt(var / n))
    np.testing.assert_array_less(np.abs(std - np.sqrt(var)), 5 * np.sqrt(var / (2 * n)))


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_sde_samples_the_gaussian_data_distribution(path):
    mu_c, mu_u, sigma, (cls_c, cls_u, cls_sigma), z, z_cls, y = gaussian_problem()
    model = GaussianModel(mu_c, mu_u, sigma, cls_c, cls_u, cls_sigma, path=path)
    x0, c0 = sample_sde(model, z, y, z_cls, steps=100, path=path, generator=torch.Generator().manual_seed(1))
    m, var = predicted_sde_moments(100, mu_c.numpy(), sigma.numpy(), path)
    # The discretized sampler is close to the data distribution (stopping the noise at t = 0.04
    # leaves a bias of a few percent in the std) ...
    np.testing.assert_allclose(m, mu_c.numpy(), atol=0.03)
    np.testing.assert_allclose(np.sqrt(var), sigma.numpy(), rtol=0.05)
    # ... and the samples follow exactly the moments of that discretization.
    assert_gaussian_samples(x0, m, var, len(z))
    m, var = predicted_sde_moments(100, cls_c.numpy(), cls_sigma.numpy(), path)
    assert_gaussian_samples(c0, m, var, len(z))


def test_guided_sde_samples_the_guided_gaussian_and_class_token():
    mu_c, mu_u, sigma, (cls_c, cls_u, cls_sigma), z, z_cls, y = gaussian_problem()
    model = GaussianModel(mu_c, mu_u, sigma, cls_c, cls_u, cls_sigma)
    for cls_scale, cls_mu in ((0.0, cls_c), (1.7, cls_u + 1.7 * (cls_c - cls_u))):
        x0, c0 = sample_sde(model, z, y, z_cls, steps=100, cfg_scale=2.5, cls_cfg_scale=cls_scale,
                            null_label=NULL, generator=torch.Generator().manual_seed(2))
        m, var = predicted_sde_moments(100, (mu_u + 2.5 * (mu_c - mu_u)).numpy(), sigma.numpy(), "linear")
        assert_gaussian_samples(x0, m, var, len(z))
        m, var = predicted_sde_moments(100, cls_mu.numpy(), cls_sigma.numpy(), "linear")
        assert_gaussian_samples(c0, m, var, len(z))


def record_randn(monkeypatch):
    """Let torch.randn run as usual but keep every tensor it returns, in order."""
    draws, randn = [], torch.randn

    def recording_randn(*args, **kwargs):
        draws.append(randn(*args, **kwargs))
        return draws[-1]

    monkeypatch.setattr(torch, "randn", recording_randn)
    return draws


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_sde_steps_are_euler_maruyama_with_diffusion_2t(monkeypatch, path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 2, 2, generator=g, dtype=torch.float64)
    cls = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)

    def model(x, t, y, cls):
        return 0.3 * x - 0.2 + t.reshape(-1, 1, 1, 1), -0.5 * cls + t[:, None] ** 2, None

    draws = record_randn(monkeypatch)
    got_x, got_cls = sample_sde(model, x, y, cls, steps=3, path=path)
    xi = [d for d in draws if d.shape == x.shape]
    xi_cls = [d for d in draws if d.shape == cls.shape]
    assert len(xi) == len(xi_cls) == 2 and len(draws) == 4  # none on the last step

    def expected(s, velocity, noises):
        s = s.numpy().copy()
        for k, (t, t_next) in enumerate([(1.0, 0.52), (0.52, 0.04), (0.04, 0.0)]):
            a, sg, da, ds = coefficients(t, path)
            v = velocity(s, t)
            score = (a / da * v - s) / (sg ** 2 - a / da * ds * sg)  # score from velocity, SiT arXiv 2401.08740
            s = s + (v - 0.5 * (2 * t) * score) * (t_next - t)
            if k < 2:
                s = s + math.sqrt(2 * t) * math.sqrt(abs(t_next - t)) * noises[k].numpy()
        return s

    np.testing.assert_allclose(got_x.numpy(), expected(x, lambda s, t: 0.3 * s - 0.2 + t, xi), rtol=1e-10)
    np.testing.assert_allclose(got_cls.numpy(), expected(cls, lambda s, t: -0.5 * s + t ** 2, xi_cls), rtol=1e-10)


def test_sde_draws_float64_noise_once_per_stochastic_step_and_token(monkeypatch):
    def zero(x, t, y, cls=None):
        return torch.zeros_like(x), None if cls is None else torch.zeros_like(cls), None

    draws = record_randn(monkeypatch)
    x, cls, y = torch.ones(2, 1, 2, 2), torch.ones(2, 3), torch.zeros(2, dtype=torch.long)
    sample_sde(zero, x, y, cls, steps=7)
    assert len(draws) == 2 * 6 and all(d.dtype == torch.float64 for d in draws)
    draws.clear()
    sample_sde(zero, x, y, steps=7)
    assert len(draws) == 6


def test_sde_is_reproducible_with_a_generator():
    mu_c, mu_u, sigma, (cls_c, cls_u, cls_sigma), z, z_cls, y = gaussian_problem(n=8)
    model = GaussianModel(mu_c, mu_u, sigma, cls_c, cls_u, cls_sigma)
    runs = [sample_sde(model, z, y, z_cls, steps=10, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0]) and not torch.equal(runs[0][1], runs[2][1])


def test_sde_needs_two_steps():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="steps"):
        sample_sde(lambda *a: (x, None, None), x, torch.zeros(1, dtype=torch.long), steps=1)


# ---------------------------------------------------------------- schedules and guidance interval


def counting_model(calls):
    def model(x, t, y, cls=None):
        assert torch.all(t == t[0]) and t.shape == (x.shape[0],)
        calls.append((round(t[0].item(), 12), x.shape[0]))
        if x.shape[0] == 4:  # a doubled batch: inputs duplicated, conditional labels first, then null
            assert torch.equal(x[:2], x[2:]) and torch.equal(cls[:2], cls[2:])
            assert y.tolist() == [3, 5, NULL, NULL]
        return torch.zeros_like(x), torch.zeros_like(cls), None
    return model


def run_counting(sampler, **kwargs):
    calls = []
    x, cls = torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    sampler(counting_model(calls), x, torch.tensor([3, 5]), cls, null_label=NULL, **kwargs)
    return calls


def test_sde_evaluates_the_model_at_linspace_1_to_0_04():
    calls = []

    def model(x, t, y, cls=None):
        calls.append(t)
        return torch.zeros_like(x), None, None

    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    sample_sde(model, x, torch.zeros(2, dtype=torch.long), steps=250)
    assert len(calls) == 250
    np.testing.assert_allclose([t[0].item() for t in calls], np.linspace(1.0, 0.04, 250), rtol=0, atol=1e-12)


def test_sde_guidance_doubles_the_batch_only_inside_the_interval():
    # times 1, 0.808, 0.616, 0.424, 0.232, 0.04; interval [0.3, 0.7]
    calls = run_counting(sample_sde, steps=6, cfg_scale=2.0, guidance_low=0.3, guidance_high=0.7)
    assert [n for _, n in calls] == [2, 2, 4, 4, 2, 2]


def test_euler_ode_guidance_interval_is_inclusive_and_model_called_once_per_step():
    calls = run_counting(sample_ode, steps=4, method="euler", cfg_scale=2.0, guidance_low=0.25, guidance_high=0.75)
    assert calls == [(1.0, 2), (0.75, 4), (0.5, 4), (0.25, 4)]


def test_heun_ode_calls_the_model_twice_per_step_but_once_on_the_last():
    calls = run_counting(sample_ode, steps=4, method="heun", cfg_scale=2.0, guidance_low=0.25, guidance_high=0.75)
    # Both evaluations of a step follow the guidance decision taken at the step's start time.
    assert calls == [(1.0, 2), (0.75, 2), (0.75, 4), (0.5, 4), (0.5, 4), (0.25, 4), (0.25, 4)]
    assert len(run_counting(sample_ode, steps=9, method="heun")) == 2 * 9 - 1


@pytest.mark.parametrize("cfg_scale", [1.0, 0.5])
def test_no_guidance_unless_cfg_scale_exceeds_one(cfg_scale):
    for sampler in (sample_sde, sample_ode):
        calls = run_counting(sampler, steps=5, cfg_scale=cfg_scale, cls_cfg_scale=3.0)
        assert len(calls) == (5 if sampler is sample_sde else 9) and all(n == 2 for _, n in calls)


def test_guided_velocity_is_uncond_plus_scale_times_difference():
    def model(x, t, y, cls):
        null = (y == NULL).to(x.dtype)
        return (1 - 0.75 * null).reshape(-1, 1, 1, 1).expand_as(x), (2 - 1.5 * null)[:, None].expand_as(cls), None

    x, cls, y = torch.zeros(2, 1, 2, 2), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    # One Euler step from t = 1 to 0: the output is minus the guided velocity.
    x0, c0 = sample_ode(model, x, y, cls, steps=1, method="euler", cfg_scale=3.0, null_label=NULL)
    assert torch.all(x0 == -(0.25 + 3.0 * 0.75)) and torch.all(c0 == -2.0)  # cls_cfg_scale 0: conditional
    x0, c0 = sample_ode(model, x, y, cls, steps=1, method="euler", cfg_scale=3.0, cls_cfg_scale=1.5, null_label=NULL)
    assert torch.all(c0 == -(0.5 + 1.5 * 1.5))


# ---------------------------------------------------------------- precision and grad mode


def test_samplers_run_without_grad_and_return_the_input_dtype():
    model = torch.nn.Linear(1, 1)

    def with_params(x, t, y, cls=None):
        assert x.dtype == t.dtype == cls.dtype == torch.float32  # the model sees x's dtype
        return model.weight * x, model.weight * cls, None

    x, cls, y = torch.randn(2, 1, 2, 2), torch.randn(2, 3), torch.zeros(2, dtype=torch.long)
    with torch.enable_grad():
        for out in (sample_sde(with_params, x, y, cls, steps=3), sample_ode(with_params, x, y, cls, steps=3)):
            assert all(o.dtype == torch.float32 and not o.requires_grad for o in out)


def test_ode_state_is_accumulated_in_float64():
    # 100 increments of 4e-8 each vanish when added to 1.0 in float32 but sum to 4e-6 in float64.
    x, y = torch.ones(1, 1, 1, 1), torch.zeros(1, dtype=torch.long)
    x0, _ = sample_ode(lambda x, t, y, cls=None: (torch.full_like(x, -4e-6), None, None), x, y,
                       steps=100, method="euler")
    assert x0.dtype == torch.float32
    assert x0.item() == pytest.approx(1 + 4e-6, abs=2e-7)


def test_unknown_ode_method_raises():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="method"):
        sample_ode(lambda *a: (x, None, None), x, torch.zeros(1, dtype=torch.long), method="rk4")


def test_start_noise_depends_on_seed_and_index_and_never_shares_a_stream_with_the_sde_noise():
    from flow import sde_generator, start_noise
    x, cls, y = start_noise(range(6), seed=3, latent_shape=(2, 4, 4), z_dim=5, num_classes=4)
    x2, cls2, y2 = start_noise(range(4, 6), seed=3, latent_shape=(2, 4, 4), z_dim=5, num_classes=4)
    assert torch.equal(x[4:], x2) and torch.equal(cls[4:], cls2) and y.tolist() == [0, 1, 2, 3, 0, 1]
    assert not torch.equal(start_noise(range(6), 4, (2, 4, 4), 5, 4)[0], x)  # another seed, other noise
    # Batch b's SDE noise stream is not sample b's start noise (odd against even seeds).
    for b in range(3):
        sde = torch.randn(2, 4, 4, generator=sde_generator(3, b, "cpu"))
        assert not torch.allclose(sde, start_noise([b], 3, (2, 4, 4))[0][0])
    assert start_noise([0, 1], 0, (2, 4, 4))[1] is None
