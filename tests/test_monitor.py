"""Specification of monitor.py (what watches a train.py run) and plot.py (the one line plotter):
every monitor samples the EMA as it was trained, CAR-Flow shifts included, and the plots read."""
import argparse
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import flow
import monitor
import plot
from test_model import C, Z, perturb, tiny

ARGS = argparse.Namespace(seed=3, precision="fp32", path_type="linear", eval_steps=3, sample_steps=3,
                          eval_batch_size=4, eval_samples=4, mem_samples=4, sample_cfg_scale=1.0, cls_coeff=0.03)
DATASET = SimpleNamespace(resolution=8, downsample=1, latent_channels=C, num_classes=10, scaling_factor=1.0)


class Decoder:
    """A VAE stand-in that records the latents it is asked to decode."""

    def __init__(self):
        self.seen = []

    def decode(self, z):
        self.seen.append(z.clone())
        return torch.zeros(len(z), 3, 8, 8)


def car_ema():
    ema = perturb(tiny(car="joint"), seed=1, std=0.2).eval()
    mu0, mu1 = ema.shifts(torch.arange(4))
    assert mu0.abs().min() > 0 and mu1.abs().max() > 0.05  # shifts large enough to change every sample
    return ema


def expected(ema, indices, k, steps, generator=None):
    """What sampling the run's EMA as trained gives: flow.sample_sde with the shifts of the labels."""
    x, cls, y = flow.start_noise(indices, ARGS.seed, (C, 8, 8), Z, 10)
    generator = generator or flow.sde_generator(ARGS.seed, k, "cpu")
    return flow.sample_sde(ema, x, y, cls, steps=steps, null_label=10, generator=generator, shifts=ema.shifts(y),
                           cfg_scale=ARGS.sample_cfg_scale)[0]


def test_fid_while_training_samples_a_car_model_with_its_shifts():
    """Guards --eval-every with --car: Evaluation's samples are the EMA's on its shifted path."""
    ema, vae = car_ema(), Decoder()
    evaluation = monitor.Evaluation.__new__(monitor.Evaluation)  # without the Inception and reference it loads
    evaluation.args, evaluation.dataset, evaluation.z_dim, evaluation.vae = ARGS, DATASET, Z, vae
    evaluation.processes = SimpleNamespace(device=torch.device("cpu"))
    evaluation.images(ema, 0)
    torch.testing.assert_close(vae.seen[0], expected(ema, range(4), 0, ARGS.eval_steps), rtol=0, atol=0)


def test_memorization_samples_a_car_model_with_its_shifts(tmp_path, monkeypatch):
    """Guards --mem-every with --car: the memorized fraction is that of samples of the shifted path
    (before, Memorization.run called the sampler without the shifts)."""
    ema, seen = car_ema(), []
    monkeypatch.setattr(monitor.evaluate, "memorized_fraction", lambda samples, train: seen.append(samples) or 0.0)
    memorization = monitor.Memorization(ARGS, DATASET, Z, torch.device("cpu"), str(tmp_path))
    memorization.run(1, ema, SimpleNamespace(record=lambda row: None, rows=[]))
    torch.testing.assert_close(seen[0], expected(ema, range(4), 0, ARGS.sample_steps), rtol=0, atol=0)


def test_sample_grid_samples_a_car_model_with_its_shifts(tmp_path):
    """Guards the sample grids with --car: the EMA's samples on its shifted path, from the grid's noise."""
    ema, vae = car_ema(), Decoder()
    grid = monitor.SampleGrid(ARGS, DATASET, Z, vae, torch.device("cpu"))
    grid.save(ema, str(tmp_path / "grid.png"))
    want = flow.sample_sde(ema, grid.x, grid.y, grid.cls, steps=ARGS.sample_steps, null_label=10,
                           generator=torch.Generator().manual_seed(ARGS.seed), shifts=ema.shifts(grid.y))[0]
    torch.testing.assert_close(vae.seen[0], want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- plot.py

@pytest.mark.parametrize("lo, hi, labels", [(-0.0376, 9060, ["0", "2000", "4000", "6000", "8000"]),
                                            (0.61, 0.83, ["0.65", "0.70", "0.75", "0.80"]),
                                            (-1.2, 1.2, ["-1.0", "-0.5", "0.0", "0.5", "1.0"])])
def test_tick_labels_are_round_and_share_one_format(lo, hi, labels):
    """Guards the plots' axes: round ticks inside the range, printed with the digits their spacing needs."""
    assert plot.tick_labels(plot.nice_ticks(lo, hi, 4)) == labels


def test_line_plot_draws_panels_with_bands_log_axes_and_sparse_points(tmp_path):
    """Guards plot.line_plot's contract: a grid of panels, several series each, bands, log axes,
    skipped Nones; nothing written when there is no point at all."""
    path = tmp_path / "p.png"
    plot.line_plot([dict(title="loss", series=[dict(name="REG", x=[1, 2, 3], y=[1.0, None, 2.0], band=([0, 0, 1], [2, 2, 3])),
                                               dict(name="REPA", x=[1, 2, 3], y=[2.0, 1.5, 1.0], dots=True)]),
                    dict(title="fid", log_x=True, log_y=True, series=[dict(x=[1, 10, 100], y=[100.0, 10.0, 0.0])])],
                   str(path), columns=2, width=300, height=150)
    assert Image.open(path).size == (600, 150)
    empty = tmp_path / "empty.png"
    plot.line_plot([dict(title="none", series=[dict(x=[1], y=[None])])], str(empty))
    assert not empty.exists()


def test_smoothed_curves_are_debiased_and_lag_little():
    # A constant stays itself from the first point (no pull towards 0); a short run stays raw; on a
    # long linear trend the smoothed line lags by about 2 % of the run, not by half of it.
    assert plot.smooth([3.0] * 500) == pytest.approx([3.0] * 500)
    assert plot.smooth([1.0, 5.0, 2.0]) == [1.0, 5.0, 2.0]
    trend = [1 - i / 4000 for i in range(4000)]
    assert abs(plot.smooth(trend)[-1] - trend[-1]) < 0.025
