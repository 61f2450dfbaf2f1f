"""Specification of CAR-Flow (arXiv 2509.19300) on the project's one code path: learned class shifts
of the source (eps + mu0(y)) and/or the target (x + mu1(y)), `--car none|source|target|joint`.

In our convention (data at t = 0, noise at t = 1) the shifted path is z_t = alpha_t (x + mu1) +
sigma_t (eps + mu0) with target alpha'_t (x + mu1) + sigma'_t (eps + mu0). On class-conditional
Gaussian data x ~ N(m, s^2) per dimension with shifts fixed, z_t is Gaussian and everything has a
closed form: z_t = u + sigma_t mu0 where u is the unshifted path of data N(m + mu1, s^2), so the
exact velocity is gaussian_velocity(z - sigma_t mu0; m + mu1) + sigma'_t mu0 and the score is the
unshifted one at z - sigma_t mu0 (tests/test_flow.py has the unshifted closed forms).

    python3 -m pytest -q tests/test_carflow.py
"""
import copy
import os

import numpy as np
import pytest
import torch

import data
import flow
import sample
import train
from flow import sample_ode, sample_sde, score_from_velocity, training_loss
from model import SiT_models, read_checkpoint
from test_flow import (NULL, assert_gaussian_samples, coefficients, gaussian_velocity,
                       predicted_sde_moments)
from test_model import inputs, perturb, tiny
from test_train import REPO, RUN, TINY, run_torchrun
from util import UserError


def shifted_velocity(z, t, m, s, mu0, mu1, path="linear"):
    """Exact velocity of the shifted path on data N(m, s^2): the unshifted one at z - sigma_t mu0
    for data N(m + mu1, s^2), plus sigma'_t mu0."""
    _, sigma, _, d_sigma = coefficients(t, path)
    return gaussian_velocity(z - sigma * mu0, t, m + mu1, s, path) + d_sigma * mu0


class ShiftedGaussianModel:
    """The exact velocity of the shifted problem as a "model". means: (2, *shape), classes 0 and 1;
    the null label gets `null_mean`. shifts_seen(labels) gives the (mu0, mu1) of the path that each
    row's velocity is of (true_label_shifts: the samples' own, in both halves of a guided call)."""

    def __init__(self, means, null_mean, s, shifts_seen, path="linear"):
        self.means, self.null_mean, self.s, self.shifts_seen, self.path = means, null_mean, s, shifts_seen, path

    def __call__(self, z, t, y, cls=None):
        null = (y == NULL).reshape(-1, *[1] * (z.dim() - 1))
        m = torch.where(null, self.null_mean, self.means[y.clamp(max=1)])
        mu0, mu1 = self.shifts_seen(y)
        tt = t.reshape(-1, *[1] * (z.dim() - 1)).to(z.dtype)
        return shifted_velocity(z, tt, m, self.s, mu0, mu1, self.path), None, None


def true_label_shifts(mu0, mu1):
    """Each sample's own shifts (None: zero), repeated for the null half of a guided call."""
    def seen(labels):
        reps = len(labels) // len(mu0 if mu0 is not None else mu1)
        return tuple(torch.zeros(1) if mu is None else mu.repeat(reps, 1, 1, 1) for mu in (mu0, mu1))
    return seen


def two_class_problem(n=20_000, seed=0):
    """Two classes of (2, 2, 2) Gaussian latents, labels half 0 and half 1, and start noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.stack([torch.linspace(-1.5, 1.5, 8, dtype=torch.float64),
                         torch.linspace(2.0, -1.0, 8, dtype=torch.float64)]).reshape(2, 2, 2, 2)
    s = torch.linspace(0.3, 1.2, 8, dtype=torch.float64).reshape(2, 2, 2)
    y = torch.arange(n) % 2
    z = torch.randn(n, 2, 2, 2, generator=g, dtype=torch.float64)
    return means, s, y, z


def oracle_shifts(means, y, variant):
    """Shifts fixed to the class means: the source moved onto the class mean (mu0 = m_y), the data
    moved to be centred (mu1 = -m_y); a variant keeps its own maps only."""
    m = means[y]
    return (m if variant in ("source", "joint") else None, -m if variant in ("target", "joint") else None)


def zeros_or(mu, like):
    return torch.zeros_like(like) if mu is None else mu


# ---------------------------------------------------------------- the model's maps


def test_car_none_has_exactly_the_official_parameters_and_variants_add_only_their_maps():
    keys = set(tiny().state_dict())
    assert set(tiny(car="none").state_dict()) == keys
    for variant, maps in (("source", {"source_shift"}), ("target", {"target_shift"}),
                          ("joint", {"source_shift", "target_shift"})):
        extra = set(tiny(car=variant).state_dict()) - keys
        assert {k.split(".")[0] for k in extra} == maps and keys <= set(tiny(car=variant).state_dict())


def test_shift_maps_leave_the_sits_weights_and_the_random_stream_as_car_none_has_them():
    torch.manual_seed(0)
    plain = tiny()
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    joint = tiny(car="joint")
    assert torch.equal(torch.rand(3), after_plain)
    assert all(torch.equal(v, joint.state_dict()[k]) for k, v in plain.state_dict().items())


def test_fresh_shift_maps_are_zero_and_an_xl2_imagenet_map_has_2_35m_parameters():
    model = tiny(car="joint")
    mu0, mu1 = model.shifts(torch.tensor([0, 3, 9]))
    assert mu0.shape == mu1.shape == (3, 4, 8, 8) and mu0.dtype == torch.float32
    assert not mu0.any() and not mu1.any()
    assert tiny().shifts(torch.tensor([1])) == (None, None)
    with torch.device("meta"):
        xl = SiT_models["SiT-XL/2"](car="joint")  # 4x32x32 latents, 1000 classes
    count = sum(p.numel() for p in xl.source_shift.parameters())
    assert count == sum(p.numel() for p in xl.target_shift.parameters()) == 2_347_700  # README, BENCHMARKS.md


def test_a_batch_with_more_labels_than_classes_gets_each_class_own_shift():
    model = perturb(tiny(car="source", num_classes=3))
    y = torch.tensor([2, 0, 1, 2, 2])  # 5 labels > 3 classes: the map runs once per class and gathers
    mu0, _ = model.shifts(y)
    one_by_one = torch.cat([model.shifts(y[i:i + 1])[0] for i in range(len(y))])
    torch.testing.assert_close(mu0, one_by_one)
    assert not torch.allclose(mu0[0], mu0[1])


# ---------------------------------------------------------------- none and zero shifts are today's code


def sit_pair():
    """A trained-looking REG SiT (every weight perturbed) and a joint CAR-Flow model holding the same
    SiT weights with its fresh, zero-output shift maps."""
    plain = perturb(tiny(class_dropout_prob=0.0))
    joint = tiny(car="joint", class_dropout_prob=0.0)
    joint.load_state_dict(plain.state_dict(), strict=False)
    return plain, joint


def test_no_shifts_and_zero_shifts_give_bit_identical_losses():
    plain, joint = sit_pair()
    x, t, y, cls = inputs(n=4)
    g = torch.Generator().manual_seed(5)
    noise, cls_noise, patches = (torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 32, generator=g),
                                 torch.randn(4, 16, 32, generator=g))
    kw = dict(t=t, noise=noise, cls_noise=cls_noise)
    today = training_loss(plain.train(), x, y, cls, patches, **kw)
    for shifts in (None, (None, None), joint.shifts(y)):
        got = training_loss(joint.train(), x, y, cls, patches, shifts=shifts, **kw)
        assert all(torch.equal(today[k], got[k]) for k in ("loss", "denoise", "cls", "proj")), shifts


@pytest.mark.parametrize("sampler, kwargs", [
    (sample_sde, dict(steps=4, generator=True)), (sample_ode, dict(steps=3, method="euler")),
    (sample_ode, dict(steps=3, method="heun"))], ids=["sde", "euler", "heun"])
def test_no_shifts_and_zero_shifts_give_bit_identical_samples(sampler, kwargs):
    plain, joint = sit_pair()
    x, _, y, cls = inputs(n=4)
    common = dict(kwargs, cfg_scale=2.0, cls_cfg_scale=1.5, guidance_high=0.7, null_label=10)

    def run(model, shifts):
        if "generator" in common:
            common["generator"] = torch.Generator().manual_seed(3)
        return sampler(model.eval(), x, y, cls, shifts=shifts, **common)

    today = run(plain, None)
    for got in (run(joint, None), run(joint, joint.shifts(y))):
        assert torch.equal(today[0], got[0]) and torch.equal(today[1], got[1])


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_loss_regresses_the_shifted_velocity_on_the_shifted_path(path):
    g = torch.Generator().manual_seed(0)
    x, noise, mu0, mu1 = (torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.rand(5, generator=g, dtype=torch.float64)
    seen = []

    def model(z, t_, y, cls=None):
        seen.append(z)
        return 0.3 * z + 0.1, None, None

    losses = training_loss(model, x, torch.zeros(5, dtype=torch.long), path=path, t=t, noise=noise,
                           shifts=(mu0, mu1))
    a, s, da, ds = (c if isinstance(c, float) else c.reshape(-1, 1, 1, 1) for c in coefficients(t, path))
    z = a * (x + mu1) + s * (noise + mu0)  # (1 - t)(x + mu1) + t (eps + mu0) on the linear path
    target = da * (x + mu1) + ds * (noise + mu0)  # (eps + mu0) - (x + mu1) on the linear path
    torch.testing.assert_close(seen[0], z)
    torch.testing.assert_close(losses["denoise"], (0.3 * z + 0.1 - target).square().mean(dim=(1, 2, 3)))


def test_shift_gradients_flow_through_both_the_noisy_input_and_the_target():
    # Model v = c z: per sample L = mean_d (c z - target)^2, so dL/dmu1 = 2/D (c z - target)(c alpha - alpha')
    # and dL/dmu0 = 2/D (c z - target)(c sigma - sigma'); through z_t alone the factors would be
    # c alpha and c sigma, through the target alone -alpha' and -sigma'.
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(3, 1, 2, 2, generator=g), torch.randn(3, 1, 2, 2, generator=g)
    mu0, mu1 = torch.randn(3, 1, 2, 2, generator=g, requires_grad=True), torch.randn(3, 1, 2, 2, generator=g, requires_grad=True)
    t, c = torch.tensor([0.2, 0.5, 0.9]), 0.7
    loss = training_loss(lambda z, *a: (c * z, None, None), x, torch.zeros(3, dtype=torch.long), t=t, noise=noise,
                         shifts=(mu0, mu1))["loss"]
    loss.backward()
    tt = t.reshape(-1, 1, 1, 1)
    z = (1 - tt) * (x + mu1) + tt * (noise + mu0)
    residual = (c * z - ((noise + mu0) - (x + mu1))).detach() * 2 / 4 / 3  # 2/D per sample, mean over 3 samples
    torch.testing.assert_close(mu1.grad, residual * (c * (1 - tt) + 1))
    torch.testing.assert_close(mu0.grad, residual * (c * tt - 1))


def test_every_parameter_of_a_joint_model_gets_a_gradient_from_the_loss():
    model = perturb(tiny(car="joint", class_dropout_prob=0.0)).train()
    x, _, y, cls = inputs(n=4)
    patches = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(2))
    training_loss(model, x, y, cls, patches, shifts=model.shifts(y))["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


@pytest.mark.parametrize("variant", ["source", "target", "joint"])
def test_the_closed_form_shifted_velocity_is_what_the_loss_target_averages_to(variant):
    # The loss is quadratic in the prediction, so its gradient along any direction g(z, y) at the
    # closed-form v* is E[(v*(z, y) - target) g(z, y)], zero for every g iff v* = E[target | z, y]. On
    # Gaussian data E[target | z, y] is affine in z for each class, so g = [y = c] and g = [y = c] z
    # suffice; the unshifted field must fail.
    means, s, y, _ = two_class_problem(n=100_000, seed=1)
    g = torch.Generator().manual_seed(2)
    x = means[y] + s * torch.randn(len(y), 2, 2, 2, generator=g, dtype=torch.float64)
    mu0, mu1 = oracle_shifts(means, y, variant)
    unshifted = []
    for t_value in (0.3, 0.7):
        t = torch.full((len(y),), t_value, dtype=torch.float64)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64)

        def directional_gradients(field):
            h = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)  # v = field + h[y, 0] + h[y, 1] z

            def model(z, *a):
                return field(z) + h[y, 0, None, None, None] + h[y, 1, None, None, None] * z, None, None
            training_loss(model, x, y, t=t, noise=noise, shifts=(mu0, mu1))["loss"].backward()
            return h.grad

        m0, m1 = zeros_or(mu0, x), zeros_or(mu1, x)
        exact = directional_gradients(lambda z: shifted_velocity(z, t_value, means[y], s, m0, m1))
        assert exact.abs().max() < 0.04, (t_value, exact)
        unshifted.append(directional_gradients(lambda z: gaussian_velocity(z, t_value, means[y], s)).abs().max())
    assert max(unshifted) > 0.2, unshifted


# ---------------------------------------------------------------- samplers on class-conditional Gaussians


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_the_score_with_the_source_shift_is_the_exact_score_of_the_shifted_path(path):
    z = torch.linspace(-3, 3, 13, dtype=torch.float64)
    m, s, mu0, mu1 = 0.7, 0.4, 1.3, -0.5
    for t in (0.04, 0.3, 0.7, 0.99):
        a, sg, _, _ = coefficients(t, path)
        v = shifted_velocity(z, t, m, s, mu0, mu1, path)
        exact = -(z - (a * (m + mu1) + sg * mu0)) / (a ** 2 * s ** 2 + sg ** 2)  # z_t ~ N(a (m + mu1) + sigma mu0, .)
        torch.testing.assert_close(score_from_velocity(v, z, t, path, torch.tensor(mu0, dtype=torch.float64)), exact)
        assert not torch.allclose(score_from_velocity(v, z, t, path), exact)
    if path == "linear":  # the form: -((1 - t) v + z - mu0) / t
        torch.testing.assert_close(score_from_velocity(v, z, 0.99, path, torch.tensor(mu0, dtype=torch.float64)),
                                   -(0.01 * v + z - mu0) / 0.99)


@pytest.mark.parametrize("variant", ["source", "target", "joint"])
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_heun_ode_with_shifts_maps_noise_to_each_class_gaussian(variant, path):
    means, s, y, z = two_class_problem(n=64)
    mu0, mu1 = oracle_shifts(means, y, variant)
    model = ShiftedGaussianModel(means, means[0], s, true_label_shifts(mu0, mu1), path)
    x0, _ = sample_ode(model, z, y, steps=50, method="heun", shifts=(mu0, mu1))
    # The exact flow of Gaussians is affine: eps + mu0 -> (m + mu1) + s eps, then minus mu1.
    torch.testing.assert_close(x0, means[y] + s * z, atol=5e-3, rtol=0)


def test_samplers_start_at_noise_plus_mu0_and_return_z0_minus_mu1():
    g = torch.Generator().manual_seed(0)
    eps, mu0, mu1 = (torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    starts = []

    def still(z, t, y, cls=None):  # zero velocity: the path stays where it starts
        starts.append(z.clone())
        return torch.zeros_like(z), None, None

    y = torch.zeros(2, dtype=torch.long)
    for method in ("euler", "heun"):
        x0, _ = sample_ode(still, eps, y, steps=2, method=method, shifts=(mu0, mu1))
        torch.testing.assert_close(starts[0], eps + mu0)
        torch.testing.assert_close(x0, eps + mu0 - mu1)
        starts.clear()
    sample_sde(still, eps, y, steps=3, shifts=(mu0, mu1), generator=g)
    torch.testing.assert_close(starts[0], eps + mu0)


def sde_moments(means, s, mu1, y, steps):
    """Per sample, the mean and variance of the corrected Euler-Maruyama output. In u = z - t mu0 the
    shifted linear-path SDE is, step for step, the unshifted one on data N(m + mu1, s^2) (the drift
    gains mu0 = d(t mu0)/dt and the score is the unshifted score of u), and z_0 = u_0; minus mu1."""
    mu1 = zeros_or(mu1, means[y])
    m = torch.empty_like(means[y])
    var = torch.empty_like(m)
    for c in (0, 1):
        rows = y == c
        mc, vc = predicted_sde_moments(steps, (means[c] + mu1[rows][0]).numpy(), s.numpy(), "linear")
        m[rows], var[rows] = torch.from_numpy(mc) - mu1[rows][0], torch.from_numpy(vc)
    return m, var


def assert_class_samples(x0, m, var, y):
    for c in (0, 1):
        rows = y == c
        assert_gaussian_samples(x0[rows], m[rows][0].numpy(), var[rows][0].numpy(), int(rows.sum()))


@pytest.mark.parametrize("variant", ["target", "joint"])
def test_sde_with_the_corrected_score_samples_each_class_gaussian_and_the_uncorrected_fails(variant):
    means, s, y, z = two_class_problem(n=4000)
    mu0, mu1 = oracle_shifts(means, y, variant)
    model = ShiftedGaussianModel(means, means[0], s, true_label_shifts(mu0, mu1))
    m, var = sde_moments(means, s, mu1, y, 100)
    np.testing.assert_allclose(m.numpy(), means[y].numpy(), atol=0.03)  # the discretization is close to the data
    x0, _ = sample_sde(model, z, y, steps=100, shifts=(mu0, mu1), generator=torch.Generator().manual_seed(1))
    assert_class_samples(x0, m, var, y)
    # By hand without the score's correction: start at eps + mu0, the plain sampler, minus mu1.
    wrong, _ = sample_sde(model, z + zeros_or(mu0, z), y, steps=100, generator=torch.Generator().manual_seed(1))
    wrong = wrong - zeros_or(mu1, z)
    if variant == "target":  # no source shift: nothing to correct, the two are one sampler
        torch.testing.assert_close(wrong, x0)
    else:
        with pytest.raises(AssertionError):
            assert_class_samples(wrong, m, var, y)


# ---------------------------------------------------------------- guidance: the shifts take the true label


@pytest.mark.parametrize("sampler", ["heun", "sde"])
def test_guided_sampling_with_true_label_shifts_lands_on_the_guided_gaussian_of_unshifted_flow(sampler):
    # Both halves see the true label's shifts, so the guided field is the shifted field of the guided
    # mean m_u + s (m_c - m_u), and both halves' scores use mu0(y): the samples are those of
    # guidance without CAR-Flow.
    means, s, y, z = two_class_problem(n=64 if sampler == "heun" else 4000)
    mu0, mu1 = oracle_shifts(means, y, "joint")
    null_mean = torch.full_like(means[0], 0.25)
    model = ShiftedGaussianModel(means, null_mean, s, true_label_shifts(mu0, mu1))
    guided = null_mean + 2.5 * (means - null_mean)
    kw = dict(cfg_scale=2.5, null_label=NULL, shifts=(mu0, mu1))
    if sampler == "heun":
        x0, _ = sample_ode(model, z, y, steps=100, method="heun", **kw)
        torch.testing.assert_close(x0, guided[y] + s * z, atol=2e-3, rtol=0)
    else:
        x0, _ = sample_sde(model, z, y, steps=100, generator=torch.Generator().manual_seed(2), **kw)
        assert_class_samples(x0, *sde_moments(guided, s, mu1, y, 100), y)


def test_null_label_shifts_for_the_unconditional_half_would_move_every_sample():
    # The alternative flow.Guidance turns down: the unconditional half on the null label's own path
    # (shifts 0.5 and -0.8 here). The guided ODE then lands off the guided Gaussian by
    # (s - 1)((mu1(y) - mu1(null)) - sd (mu0(y) - mu0(null))), sd the data's std.
    means, s, y, z = two_class_problem(n=64)
    mu0, mu1 = oracle_shifts(means, y, "joint")

    def null_label_shifts(labels):
        own0, own1 = true_label_shifts(mu0, mu1)(labels)
        null = (labels == NULL).reshape(-1, 1, 1, 1)
        return torch.where(null, 0.5, own0), torch.where(null, -0.8, own1)

    null_mean, scale = torch.full_like(means[0], 0.25), 2.5
    model = ShiftedGaussianModel(means, null_mean, s, null_label_shifts)
    x0, _ = sample_ode(model, z, y, steps=100, method="heun", cfg_scale=scale, null_label=NULL, shifts=(mu0, mu1))
    offset = (scale - 1) * ((mu1 + 0.8) - s * (mu0 - 0.5))
    torch.testing.assert_close(x0, null_mean + scale * (means[y] - null_mean) + s * z + offset, atol=2e-3, rtol=0)
    assert offset.abs().mean() > 1


# ---------------------------------------------------------------- train.py and sample.py


def test_train_step_gives_the_shift_maps_the_true_labels_even_when_the_sit_drops_them(monkeypatch):
    args = train.get_args(["--car", "joint", "--cfg-prob", "1.0", *TINY])
    dataset = data.BuiltinShapes()
    encoder = train.build_encoder(args, dataset)
    model, _ = train.build_model(args, dataset, encoder.z_dim)
    ema = copy.deepcopy(model)
    opt, scaler = train.build_optimizer(args, model)
    seen_by_maps, seen_by_sit = [], []
    real = model.shifts
    monkeypatch.setattr(model, "shifts", lambda y: seen_by_maps.append(y.clone()) or real(y))
    model.y_embedder.embedding_table.register_forward_hook(lambda mod, inp, out: seen_by_sit.append(inp[0].clone()))
    labels = torch.tensor([3, 1, 4, 1])
    batch = (torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.zeros(4, 6, 32, 32), labels)
    train.train_step(batch, net=model.train(), encoder=encoder, model=model, ema=ema, opt=opt, scaler=scaler,
                     args=args, scaling_factor=1.0)
    assert torch.equal(seen_by_maps[0], labels)
    assert seen_by_sit[0].tolist() == [10] * 4  # --cfg-prob 1: the SiT saw the null label only


@pytest.fixture(scope="module")
def joint_runs(tmp_path_factory):
    """--car joint on the built-in data: 2 steps straight, and 1 step then resumed to 2."""
    out = tmp_path_factory.mktemp("car")
    flags = ["--car", "joint", "--checkpoint-every", "1", "--sample-every", "100", "--ema-decay", "0.5"]
    straight = train.main(train.get_args(["--output-dir", str(out / "straight"), *TINY, "--max-train-steps", "2", *flags]))
    train.main(train.get_args(["--output-dir", str(out / "resumed"), *TINY, "--max-train-steps", "1", *flags]))
    resumed = train.main(train.get_args(["--output-dir", str(out / "resumed"), *TINY, "--max-train-steps", "2", *flags]))
    return dict(out=out, straight=straight, resumed=resumed)


def test_a_joint_run_trains_its_shifts_and_keeps_their_ema_in_the_checkpoint(joint_runs):
    ckpt = read_checkpoint(str(joint_runs["out"] / "resumed" / RUN / "checkpoints" / "0000002.pt"))
    assert ckpt["args"].car == "joint" and ckpt["config"]["car"] == "joint"
    for key in ("model", "ema"):
        weight = ckpt[key]["target_shift.head.9.weight"]  # the zero-initialised output conv
        assert weight.abs().sum() > 0, key
    assert not torch.equal(ckpt["model"]["source_shift.head.9.weight"], ckpt["ema"]["source_shift.head.9.weight"])


def test_a_resumed_joint_run_continues_its_shifts_and_their_ema_bit_for_bit(joint_runs):
    for i, key in enumerate(("model", "ema")):
        a, b = joint_runs["straight"][i].state_dict(), joint_runs["resumed"][i].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), key
        assert any(k.startswith("source_shift.") for k in a)


def test_resuming_with_another_car_variant_is_a_one_line_user_error(joint_runs):
    with pytest.raises(UserError, match=r"--car joint and this run has --car target; resume with --car joint"):
        train.main(train.get_args(["--output-dir", str(joint_runs["out"] / "resumed"), *TINY, "--car", "target",
                                   "--max-train-steps", "3"]))


@pytest.mark.parametrize("flags", [["--num-steps", "3"], ["--mode", "ode", "--num-steps", "2"],
                                   ["--mode", "ode", "--heun", "--num-steps", "2"]], ids=["sde", "euler", "heun"])
def test_sample_py_reads_the_variant_from_the_checkpoint_and_shifts_every_sampler(joint_runs, tmp_path, monkeypatch, flags):
    path = joint_runs["out"] / "resumed" / RUN / "checkpoints" / "0000002.pt"
    calls = []
    for name in ("sample_sde", "sample_ode"):
        real = getattr(flow, name)
        monkeypatch.setattr(flow, name, lambda *a, real=real, **k: calls.append(k["shifts"]) or real(*a, **k))
    sample.main(sample.get_args(["--ckpt", str(path), "--out", str(tmp_path / "grid.png"), "--classes", "1", "2",
                                 "--per-class", "2", *flags]))
    model = sample.build_model(read_checkpoint(str(path)), sample.get_args(["--ckpt", str(path)]))[0]
    assert model.car == "joint"
    (mu0, mu1), = calls
    expected = model.shifts(torch.tensor([1, 1, 2, 2]))
    torch.testing.assert_close(mu0, expected[0])
    torch.testing.assert_close(mu1, expected[1])
    assert mu1.abs().sum() > 0 and os.path.exists(tmp_path / "grid.png")


WRAPPER = """
import os, sys
import torch
sys.path.insert(0, {repo!r})
import train
from encoder import AutoencoderKL
train.load_vae = lambda name, path=None: AutoencoderKL(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, groups=4)
model, ema = train.main(train.get_args(sys.argv[2:]))
torch.save({{"model": model.state_dict(), "ema": ema.state_dict()}}, os.path.join(sys.argv[1], f"rank{{os.environ['RANK']}}.pt"))
"""


def test_two_processes_on_prepared_data_average_the_shift_gradients(tmp_path):
    # The shift maps run outside DDP's forward; the ranks see different labels, so only averaged
    # gradients keep their weights equal.
    data.write_synthetic(str(tmp_path / "prepared"), count=32, resolution=32, num_classes=4)
    (tmp_path / "wrapper.py").write_text(WRAPPER.format(repo=REPO))
    cmd = ["--nproc_per_node=2", str(tmp_path / "wrapper.py"), str(tmp_path), "--data-path", str(tmp_path / "prepared"),
           "--model", "SiT-T/2", "--enc-type", "stand-in", "--output-dir", str(tmp_path / "runs"), "--car", "joint",
           "--global-batch-size", "8", "--num-workers", "0", "--max-train-steps", "2", "--checkpoint-every", "100",
           "--sample-every", "100", "--log-every", "1", "--lr", "1e-2"]
    result = run_torchrun(cmd, {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ("model", "ema"):
        shift_keys = [k for k in ranks[0][key] if "_shift." in k]
        assert len(shift_keys) == 2 * 11  # embedding, Linear, 4 convs: 11 tensors per map
        assert all(torch.equal(ranks[0][key][k], ranks[1][key][k]) for k in shift_keys), key
    assert ranks[0]["model"]["source_shift.head.9.weight"].abs().sum() > 0
