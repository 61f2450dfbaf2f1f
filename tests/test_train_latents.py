"""Specification of train.py's wiring on SD-VAE-like latents: a small dataset in data.py's prepared
format (4-channel posterior moments of 8x8 latents, scaling factor 0.18215) and a tiny random
AutoencoderKL for the decoder. Checks that the flags a run relies on reach the loss, the
optimizer, the EMA and the decoder."""
import json
import os

import numpy as np
import pytest
import torch

import data
import evaluate
import flow
import train
from encoder import AutoencoderKL
from test_train_eval import pixel_features

SCALE = 0.18215


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """16 images of 64x64 in 4 classes with moments (N, 8, 8, 8); the std varies per element."""
    root = tmp_path_factory.mktemp("prepared")
    data.write_synthetic(str(root), count=16, resolution=64, num_classes=4)
    moments = np.lib.format.open_memmap(root / "moments.npy", mode="r+")
    moments[:, 4:] = np.random.default_rng(1).uniform(0.05, 0.5, moments[:, 4:].shape)
    moments.flush()
    return str(root)


def tiny_vae(name, path=None):
    assert name == "sd-vae-ft-ema"  # the prepared dataset's VAE reaches the decoder
    return AutoencoderKL(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, groups=4)


def flags(prepared, out, *extra):
    return ["--data-path", prepared, "--output-dir", str(out), "--model", "SiT-T/2", "--enc-type", "stand-in",
            "--num-workers", "0", "--global-batch-size", "8", "--log-every", "1", "--sample-every", "100",
            "--checkpoint-every", "100", "--sample-steps", "2", *map(str, extra)]


def rows_of(out):
    with open(os.path.join(out, "SiT-T-2-data", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def latent_run(prepared, tmp_path_factory):
    """3 steps (EMA decay 0.9, cosine path, lognormal times, an evaluation at step 3) with spies
    on everything train.py hands on: posterior draws, loss inputs, sampler outputs, decoder inputs."""
    out = tmp_path_factory.mktemp("latent_run")
    ref = out / "ref.npz"
    np.savez_compressed(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8))
    (out / "inception.pth").write_bytes(b"weights")
    rec = dict(posterior=[], loss=[], sde=[], decode=[], trajectory=[])
    real_loss, real_sde, real_step = train.training_loss, flow.sample_sde, train.train_step

    def posterior(mean, std, generator=None):
        eps = torch.randn(mean.shape)
        rec["posterior"].append((mean.clone(), std.clone(), eps))
        return mean + std * eps

    def loss(model, x, y, cls=None, patches=None, **kwargs):
        rec["loss"].append(dict(x=x.clone(), **kwargs))
        return real_loss(model, x, y, cls, patches, **kwargs)

    def sde(*args, **kwargs):
        z, cls = real_sde(*args, **kwargs)
        rec["sde"].append(z.clone())
        return z, cls

    def step(batch, *, model, **kwargs):
        if not rec["trajectory"]:
            rec["trajectory"].append(snapshot(model))
        metrics = real_step(batch, model=model, **kwargs)
        rec["trajectory"].append(snapshot(model))
        return metrics

    def vae(name, path=None):
        net = tiny_vae(name, path)
        decode = net.decode
        net.decode = lambda z: rec["decode"].append(z.clone()) or decode(z)
        return net

    with pytest.MonkeyPatch.context() as m:
        for name, spy in dict(sample_posterior=posterior, training_loss=loss, train_step=step, load_vae=vae).items():
            m.setattr(train, name, spy)
        m.setattr(flow, "sample_sde", sde)  # under flow.sample_sit, which every monitor samples with
        m.setattr(evaluate, "load_inception", lambda path, device="cpu": torch.nn.Linear(1, 1))
        m.setattr(evaluate, "features", pixel_features)
        model, ema = train.main(train.get_args(flags(
            prepared, out, "--max-train-steps", 3, "--ema-decay", 0.9, "--path-type", "cosine", "--weighting",
            "lognormal", "--proj-coeff", 0.25, "--cls-coeff", 0.5, "--eval-every", 3, "--eval-ref", ref,
            "--inception", out / "inception.pth", "--eval-samples", 4, "--eval-steps", 2)))
    return dict(rec=rec, model=model, ema=ema, out=out)


def test_latents_given_to_the_loss_are_posterior_samples_of_the_stored_moments_times_the_scaling_factor(
        latent_run, prepared):
    rec = latent_run["rec"]
    assert len(rec["posterior"]) == len(rec["loss"]) == 3  # one draw per step (no accumulation)
    stored = torch.from_numpy(np.load(os.path.join(prepared, "moments.npy")))  # (16, 8, 8, 8)
    for (mean, std, eps), call in zip(rec["posterior"], rec["loss"]):
        assert mean.shape == std.shape == (8, 4, 8, 8)
        # Each row's (mean, std) is one stored row's two halves: the moments are split along channels.
        rows = [int((stored[:, :4] - m).flatten(1).abs().sum(1).argmin()) for m in mean]
        assert torch.equal(mean, stored[rows, :4]) and torch.equal(std, stored[rows, 4:])
        torch.testing.assert_close(call["x"], (mean + std * eps) * SCALE, rtol=1e-6, atol=0)


def test_path_type_weighting_and_coefficients_reach_the_loss_and_the_sampler(latent_run):
    rec = latent_run["rec"]
    for call in rec["loss"]:
        assert (call["path"], call["time_schedule"]) == ("cosine", "lognormal")
        assert (call["proj_coeff"], call["cls_coeff"]) == (0.25, 0.5)
    for row in (r for r in rows_of(latent_run["out"]) if "loss" in r):
        assert row["loss"] == pytest.approx(row["denoise"] + 0.25 * row["proj"] + 0.5 * row["cls"], rel=1e-5)


def test_sampler_outputs_are_decoded_as_latent_over_scaling_factor(latent_run):
    # The grid at step 3 (32 samples: 4 classes x 8), then the evaluation's 4 samples.
    rec = latent_run["rec"]
    assert [len(z) for z in rec["sde"]] == [32, 4]
    assert len(rec["decode"]) == 2
    for z, decoded in zip(rec["sde"], rec["decode"]):
        torch.testing.assert_close(decoded, z.float() / SCALE, rtol=1e-6, atol=0)
    row = next(r for r in rows_of(latent_run["out"]) if "fid4" in r)
    assert row["step"] == 3 and np.isfinite(row["fid4"])


def test_ema_after_k_steps_is_the_ema_replayed_from_the_model_trajectory_with_the_given_decay(latent_run):
    # EMA_k = lerp(EMA_(k-1), model_k, 1 - d) from EMA_0 = the initial model, d = --ema-decay 0.9.
    trajectory = latent_run["rec"]["trajectory"]
    assert len(trajectory) == 4
    replay = dict(trajectory[0])
    for weights in trajectory[1:]:
        replay = {k: torch.lerp(replay[k], weights[k], 1 - 0.9) for k in replay}
    ema = latent_run["ema"].state_dict()
    assert all(torch.equal(ema[k], replay[k]) for k in replay)
    key = "final_layer.linear.weight"  # zero at init: after 3 steps the EMA is a known fraction of the way
    assert not torch.equal(ema[key], trajectory[-1][key])


def deterministic_noise(monkeypatch):
    """Posterior eps, t and noise as functions of each sample alone, so that how a batch is split
    into micro-batches cannot change them."""
    real = train.training_loss

    def loss(model, x, y, cls=None, patches=None, **kwargs):
        key = x.flatten(1).sum(1)  # (n,)
        t = 0.05 + 0.9 * torch.frac(key.abs() * 7.3)
        return real(model, x, y, cls, patches, t=t, noise=torch.sin(3.1 * x + key[:, None, None, None]),
                    cls_noise=None if cls is None else torch.cos(2.3 * cls), **kwargs)
    monkeypatch.setattr(train, "training_loss", loss)
    monkeypatch.setattr(train, "sample_posterior", lambda mean, std, generator=None: mean + std * torch.cos(5 * mean))


def gradients_of_first_step(monkeypatch, prepared, out, *extra):
    """(gradients before clipping, update of the weights) of the first step, and the metrics rows."""
    seen, real = {}, train.optimizer_step

    def step(model, ema, opt, scaler, max_grad_norm, ema_decay):
        if not seen:
            seen["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            seen["before"] = snapshot(model)
        grad_norm = real(model, ema, opt, scaler, max_grad_norm, ema_decay)
        if "update" not in seen:
            seen["update"] = {k: v - seen["before"][k] for k, v in model.state_dict().items()}
        return grad_norm
    monkeypatch.setattr(train, "optimizer_step", step)
    monkeypatch.setattr(train, "load_vae", tiny_vae)
    train.main(train.get_args(flags(prepared, out, "--max-train-steps", 1, *extra)))
    return seen, rows_of(out)


def test_gradient_accumulation_2_equals_1_at_the_same_global_batch(prepared, tmp_path, monkeypatch):
    deterministic_noise(monkeypatch)
    one, rows_one = gradients_of_first_step(monkeypatch, prepared, tmp_path / "a", "--cfg-prob", 0)
    two, rows_two = gradients_of_first_step(monkeypatch, prepared, tmp_path / "b", "--cfg-prob", 0,
                                            "--gradient-accumulation-steps", 2)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    total = sum(g.square().sum() for g in one["grads"].values()).sqrt()
    assert total > 0
    for name, g in one["grads"].items():  # the mean over the global batch, however it is split
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-6 * total.item())
    for key in ("loss", "denoise", "proj", "cls", "grad_norm"):
        assert rows_two[0][key] == pytest.approx(rows_one[0][key], rel=1e-5)


def test_clipping_bounds_the_update(prepared, tmp_path, monkeypatch):
    # AdamW's first step is lr * g / (|g| + eps) elementwise: with eps 1 and lr 1 it is at most g,
    # so the update's norm is at most the clipped gradient's norm, --max-grad-norm.
    seen, rows = gradients_of_first_step(monkeypatch, prepared, tmp_path, "--max-grad-norm", 1e-3,
                                         "--adam-epsilon", 1, "--lr", 1)
    norm = sum(u.square().sum() for u in seen["update"].values()).sqrt().item()
    assert rows[0]["grad_norm"] > 0.1  # logged: the norm before clipping
    assert 0.99e-3 < norm <= 1e-3 * (1 + 1e-5)


def test_resume_on_latents_continues_bit_for_bit(prepared, tmp_path, monkeypatch):
    # The frozen VAE's random initialisation (before its weights would load) must not shift the
    # training noise of a resumed run: stopped after step 1 and resumed equals 2 straight steps.
    monkeypatch.setattr(train, "load_vae", tiny_vae)
    straight = train.main(train.get_args(flags(prepared, tmp_path / "a", "--max-train-steps", 2)))
    train.main(train.get_args(flags(prepared, tmp_path / "b", "--max-train-steps", 1)))
    resumed = train.main(train.get_args(flags(prepared, tmp_path / "b", "--max-train-steps", 2)))
    for a, b in zip(straight, resumed):  # model, ema
        assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    terms = ("step", "loss", "denoise", "proj", "cls", "grad_norm")
    logged = [[[r[k] for k in terms] for r in rows_of(tmp_path / run)] for run in ("a", "b")]
    assert logged[0] == logged[1]
