"""Specification of the closed-form velocity in flow.py (Bertrand et al., arXiv 2506.03719, in our
time convention: data at t = 0): v* against a brute-force float64 computation, its limits, class-
conditional references, the unbiased training estimator (Monte Carlo), the target in the loss, and
the closed-form sampler landing on training points.

    python3 -m pytest -q tests/test_closed_form.py
"""
import math

import pytest
import torch

from flow import (ClosedForm, closed_form_target, closed_form_velocity, interpolant, sample_ode, sample_sde,
                  training_loss)


def brute_force_velocity(x_t, t, refs, path="linear"):
    """v* = sum_j lambda_j v_j written out for one time t (float): lambda = softmax of
    -|x_t - alpha b_j|^2 / (2 sigma^2), v_j = alpha' b_j + sigma' (x_t - alpha b_j) / sigma, float64."""
    a, s, da, ds = (float(c) for c in interpolant(torch.tensor(t, dtype=torch.float64), path))
    x, b = x_t.double().flatten(1), refs.double().flatten(1)  # (N, D), (K, D)
    sq = ((x[:, None] - a * b[None]) ** 2).sum(2)  # (N, K)
    lam = torch.softmax(-sq / (2 * s ** 2), 1)
    v_j = da * b[None] + ds * (x[:, None] - a * b[None]) / s  # (N, K, D)
    return (lam[:, :, None] * v_j).sum(1).reshape(x_t.shape)


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 1.0])
def test_v_star_matches_a_brute_force_float64_computation_in_blocks(path, t):
    g = torch.Generator().manual_seed(0)
    refs = torch.randn(11, 2, 3, 3, generator=g)
    x_t = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    for block in (1, 4, 100):  # blocks smaller than the set, and one block holding it all
        v = closed_form_velocity(x_t, t, refs, path=path, block=block)
        torch.testing.assert_close(v, brute_force_velocity(x_t, t, refs, path), rtol=1e-10, atol=1e-10)


def test_one_reference_gives_the_conditional_velocity_exactly():
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    for t in (0.01, 0.5, 1.0):
        v = closed_form_velocity((1 - t) * x + t * eps, t, x)
        torch.testing.assert_close(v, eps - x, rtol=0, atol=1e-12)  # the stochastic target v = eps - x


def test_near_t_zero_v_star_is_the_velocity_from_the_nearest_reference_and_finite_in_high_dimension():
    g = torch.Generator().manual_seed(2)
    refs = torch.randn(20, 3, 32, 32, generator=g)  # D = 3072: the softmax's exponents reach ~1e9
    eps = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
    nearest = refs[[3, 7, 7, 19]].double()
    for t in (1e-2, 1e-4):
        x_t = (1 - t) * nearest + t * eps
        v = closed_form_velocity(x_t, t, refs)
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v, (x_t - nearest) / t, rtol=1e-6, atol=1e-6)


def test_at_t_one_every_reference_weighs_the_same():
    refs = torch.randn(6, 2, 2, 2, dtype=torch.float64)
    x_t = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(closed_form_velocity(x_t, 1.0, refs), x_t - refs.mean(0))


def test_v_star_at_t_zero_raises():
    with pytest.raises(ValueError, match="t > 0"):
        closed_form_velocity(torch.zeros(1, 1, 2, 2), 0.0, torch.ones(3, 1, 2, 2))


def test_class_conditional_references_never_cross_classes():
    g = torch.Generator().manual_seed(3)
    refs = torch.randn(10, 2, 3, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1] * 5)
    x_t = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2])  # 2: the null label, which sees every reference
    v = closed_form_velocity(x_t, 0.2, refs, y=y, ref_labels=labels, null_label=2, block=3)
    for i, label in enumerate(y.tolist()):
        own = refs if label == 2 else refs[labels == label]
        torch.testing.assert_close(v[i:i + 1], brute_force_velocity(x_t[i:i + 1], 0.2, own))
    # A class-1 reference placed exactly where a class-0 sample's noise came from changes nothing for it.
    moved = refs.clone()
    moved[1] = x_t[0] / 0.8
    v_moved = closed_form_velocity(x_t, 0.2, moved, y=y, ref_labels=labels, null_label=2)
    torch.testing.assert_close(v_moved[[0, 2]], v[[0, 2]])
    with pytest.raises(ValueError, match="no reference of its class"):
        closed_form_velocity(x_t, 0.2, refs, y=torch.tensor([5, 0, 0, 0]), ref_labels=labels)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_training_target_is_v_star_over_the_own_image_and_the_others(path):
    g = torch.Generator().manual_seed(4)
    x, noise = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    others = torch.randn(6, 5, 3, 4, 4, generator=g) * 0.3 + x[:, None]  # near x: weights far from 0 and 1
    t = torch.tensor([1e-3, 0.05, 0.2, 0.5, 0.9, 1.0])
    target = closed_form_target(x, noise, t, others, path)
    a, s, _, _ = interpolant(t.double(), path)
    for i in range(6):
        x_t = a[i] * x[i:i + 1].double() + s[i] * noise[i:i + 1].double()
        expected = brute_force_velocity(x_t, t[i].item(), torch.cat([x[i:i + 1], others[i]]), path)
        torch.testing.assert_close(target[i:i + 1].double(), expected, rtol=1e-4, atol=1e-4)


def test_training_target_without_others_is_the_stochastic_target_exactly_and_finite_at_t_zero():
    x, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.0, 0.4, 1.0])
    assert torch.equal(closed_form_target(x, noise, t, x[:, None][:, :0]), -x + noise)
    far = closed_form_target(x, noise, t[:1].expand(3), x[:, None] + 5.0)  # t = 0: the others weigh nothing
    assert torch.equal(far, -x + noise)


def test_the_estimator_with_the_own_image_is_unbiased_and_without_it_is_not():
    """Bertrand et al.'s Prop. 2 by Monte Carlo: fix x_t; draw the image x from its posterior given
    x_t (so eps = (x_t - (1 - t) x) / t), and M - 1 others uniformly from the set; the target's mean
    is the full set's v*(x_t). With M references all drawn uniformly (no own image) it is not."""
    g = torch.Generator().manual_seed(5)
    data = 2 * torch.randn(6, 2, generator=g, dtype=torch.float64)  # a tiny set in 2-D
    t, m, rows = 0.5, 3, 200_000
    x_t = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    v_star = closed_form_velocity(x_t, t, data)[0]
    posterior = torch.softmax(-((x_t - (1 - t) * data) ** 2).sum(1) / (2 * t ** 2), 0)
    x = data[torch.multinomial(posterior, rows, replacement=True, generator=g)]  # (rows, 2)
    eps = (x_t - (1 - t) * x) / t
    others = data[torch.randint(len(data), (rows, m - 1), generator=g)]
    with_own = closed_form_target(x, eps, torch.full((rows,), t), others).double()
    uniform = data[torch.randint(len(data), (rows, m), generator=g)]  # (rows, M, 2)
    lam = torch.softmax(-((x_t[:, None] - (1 - t) * uniform) ** 2).sum(2) / (2 * t ** 2), 1)
    without_own = (lam[:, :, None] * (x_t[:, None] - uniform) / t).sum(1)
    for estimate, unbiased in ((with_own, True), (without_own, False)):
        error = (estimate.mean(0) - v_star).abs()
        stderr = estimate.std(0) / math.sqrt(rows)
        assert (error < 5 * stderr).all() == unbiased, (error, stderr)
        if not unbiased:
            assert (error > 20 * stderr).any()


def test_training_loss_regresses_the_closed_form_target_on_the_image_only():
    g = torch.Generator().manual_seed(6)
    x, noise, cls, cls_noise = (torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g),
                                torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g))
    others, t = torch.randn(4, 2, 3, 4, 4, generator=g), torch.rand(4, generator=g)

    def zero_model(x_t, t, y, cls_t):
        return torch.zeros_like(x_t), torch.zeros_like(cls_t), None

    kw = dict(t=t, noise=noise, cls_noise=cls_noise, cls_coeff=0.5)
    cf = training_loss(zero_model, x, None, cls, target="closed-form", refs=others, **kw)
    st = training_loss(zero_model, x, None, cls, **kw)
    target = closed_form_target(x, noise, t, others)
    torch.testing.assert_close(cf["denoise"], target.square().mean(dim=(1, 2, 3)))
    assert torch.equal(cf["cls"], st["cls"])  # REG's class token keeps the stochastic target
    assert not torch.allclose(cf["denoise"], st["denoise"])
    with pytest.raises(ValueError, match="needs refs"):
        training_loss(zero_model, x, None, cls, target="closed-form", **kw)
    with pytest.raises(ValueError, match="unknown target"):
        training_loss(zero_model, x, None, cls, target="optimal", **kw)


def test_training_loss_takes_the_closed_form_target_on_its_own_path():
    """Guards --target closed-form --path-type cosine: the regressed target is v* on the cosine path,
    not the linear one."""
    g = torch.Generator().manual_seed(8)
    x, noise = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    others, t = torch.randn(4, 2, 3, 4, 4, generator=g), torch.rand(4, generator=g) * 0.8 + 0.1

    def zero_model(x_t, t, y, cls_t):
        return torch.zeros_like(x_t), None, None

    loss = training_loss(zero_model, x, None, path="cosine", t=t, noise=noise, target="closed-form", refs=others)
    cosine, linear = (closed_form_target(x, noise, t, others, path).square().mean(dim=(1, 2, 3))
                      for path in ("cosine", "linear"))
    torch.testing.assert_close(loss["denoise"], cosine)
    assert not torch.allclose(cosine, linear)


def test_closed_form_sampler_returns_training_points_of_the_asked_class():
    g = torch.Generator().manual_seed(7)
    data = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    labels = torch.arange(8) % 2
    model = ClosedForm(data, labels, null_label=2, block=3)
    y = torch.tensor([0, 1] * 6)
    noise = torch.randn(12, 3, 4, 4, generator=g, dtype=torch.float64)
    # The ODE's last Euler step from t = 1/steps lands exactly on E[x | x_t]: a training point. The
    # SDE's last step, from t = 0.04, is the official deterministic one: it stops within ~0.04 eps of it.
    for samples, tolerance in ((sample_ode(model, noise, y, steps=100, method="euler")[0], 1e-6),
                               (sample_sde(model, noise, y, steps=100, generator=g)[0], 0.1)):
        dist = ((samples[:, None] - data[None]) ** 2).flatten(2).sum(2).sqrt()  # (12, 8)
        near = dist.argmin(1)
        assert (labels[near] == y).all()
        assert dist.min(1).values.max() < tolerance * dist.median()


@pytest.mark.parametrize("car", ["source", "target", "joint"])
def test_closed_form_target_refuses_car_flow_shifts(car):
    """Guards: the closed-form target, derived for the unshifted path, is never silently combined with
    CAR-Flow's shifts (in flow.training_loss and at train.py's command line), whichever --car."""
    import flow
    import train
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="unshifted"):
        flow.training_loss(lambda *a: (x, None, None), x, torch.zeros(2, dtype=torch.long), target="closed-form",
                           refs=torch.zeros(2, 1, 3, 4, 4), shifts=(x, x))
    with pytest.raises(SystemExit):
        train.get_args(["--target", "closed-form", "--car", car])
