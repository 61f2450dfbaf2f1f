"""Specification of sample.py: grids and the FID .npz from a train.py checkpoint, resumable
parts, samples fixed by (seed, index), and a checkpoint in the official release's layout."""
import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from encoder import AutoencoderKL
from model import SiT_models, read_checkpoint


def tile_grid_size(rows, cols, tile):
    """(width, height) of a save_grid PNG: a 2-pixel border before every tile and after the last."""
    return cols * (2 + tile) + 2, rows * (2 + tile) + 2


def run_sample(*flags):
    sample.main(sample.get_args(list(map(str, flags))))


def npz_images(path):
    with np.load(path) as f:
        assert f.files == ["arr_0"]  # what the ADM evaluator reads
        return f["arr_0"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A train.py checkpoint of the built-in SiT-T/4 (10 classes, 32x32 pixels) after 2 steps;
    EMA decay 0 makes the sampled EMA the trained model."""
    out = tmp_path_factory.mktemp("runs")
    train.main(train.get_args(["--output-dir", str(out), "--global-batch-size", "8", "--max-train-steps", "2",
                               "--sample-steps", "2", "--ema-decay", "0"]))
    return out / "SiT-T-4-builtin" / "checkpoints" / "0000002.pt"


def test_grid_has_a_row_per_class_and_per_class_columns(ckpt, tmp_path):
    out = tmp_path / "grid.png"
    run_sample("--ckpt", ckpt, "--out", out, "--classes", 1, 2, 3, "--per-class", 4, "--num-steps", 2)
    with Image.open(out) as image:
        assert image.mode == "RGB" and image.size == tile_grid_size(3, 4, 32)
        grid = np.asarray(image)
    assert grid[:2].max() == 0 and grid[:, :2].max() == 0  # the border is black
    tile = grid[2:34, 2:34]
    assert tile.std() > 0  # an image, not a blank tile


def test_default_grid_shows_eight_samples_of_the_first_eight_classes(ckpt, tmp_path):
    out = tmp_path / "grid.png"
    run_sample("--ckpt", ckpt, "--out", out, "--num-steps", 2)
    with Image.open(out) as image:
        assert image.size == tile_grid_size(8, 8, 32)


def test_npz_holds_num_samples_uint8_images_as_the_adm_evaluator_reads_them(ckpt, tmp_path):
    out = tmp_path / "samples.npz"
    run_sample("--ckpt", ckpt, "--out", out, "--num-samples", 5, "--per-proc-batch-size", 2, "--num-steps", 2)
    images = npz_images(out)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    parts = sorted(p for p in os.listdir(f"{out}.parts") if p.endswith(".npz"))
    assert parts == ["000000.npz", "000001.npz", "000002.npz"]  # ceil(5 / 2) batches
    stacked = np.concatenate([np.load(os.path.join(f"{out}.parts", p))["images"] for p in parts])
    assert np.array_equal(images, stacked)


def test_rerun_computes_only_the_missing_part_and_gives_the_same_npz(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "samples.npz"
    flags = ["--ckpt", ckpt, "--out", out, "--num-samples", 5, "--per-proc-batch-size", 2, "--num-steps", 2]
    run_sample(*flags)
    first = npz_images(out)
    os.remove(f"{out}.parts/000001.npz")  # as if the run had been killed before this batch

    batches = []
    real = sample.generate

    def counting(model, vae, scale, x, *args, **kwargs):
        batches.append(len(x))
        return real(model, vae, scale, x, *args, **kwargs)
    monkeypatch.setattr(sample, "generate", counting)
    run_sample(*flags)
    assert batches == [2]  # samples 2 and 3 only
    assert np.array_equal(npz_images(out), first)  # batch b's SDE noise is drawn from (seed, b)


@pytest.mark.parametrize("change", [["--cfg-scale", 2], ["--per-proc-batch-size", 3]], ids=["cfg", "batch"])
def test_rerun_with_other_settings_into_the_same_out_is_refused(ckpt, tmp_path, change):
    # Reusing the parts would mix two settings' samples (or, for another batch size, misalign them).
    out = tmp_path / "samples.npz"
    flags = ["--ckpt", ckpt, "--out", out, "--num-samples", 5, "--per-proc-batch-size", 2, "--num-steps", 2]
    run_sample(*flags)
    with pytest.raises(ValueError, match="other settings.*choose another --out"):
        run_sample(*flags, *change)


def test_start_noise_and_label_of_a_sample_depend_only_on_seed_and_index(ckpt):
    args = sample.get_args(["--ckpt", str(ckpt), "--seed", "3"])
    model = sample.build_model(read_checkpoint(str(ckpt)), args)[0]
    x, cls, y = sample.noise_and_labels(range(6), model, args, "cpu")
    x2, cls2, y2 = sample.noise_and_labels(range(4, 6), model, args, "cpu")
    assert torch.equal(x[4:], x2) and torch.equal(cls[4:], cls2) and torch.equal(y[4:], y2)
    assert not torch.equal(x[4], x[5])
    other = sample.noise_and_labels(range(6), model, sample.get_args(["--ckpt", str(ckpt), "--seed", "4"]), "cpu")
    assert not torch.equal(x, other[0])


def test_ode_samples_do_not_depend_on_the_batch_size(ckpt, tmp_path):
    # The ODE is deterministic given the start noise, which depends only on (seed, index).
    arrays = []
    for batch in (2, 3):
        out = tmp_path / f"batch{batch}.npz"
        run_sample("--ckpt", ckpt, "--out", out, "--num-samples", 5, "--per-proc-batch-size", batch,
                   "--mode", "ode", "--num-steps", 2)
        arrays.append(npz_images(out).astype(int))
    # A matmul may round differently for another batch shape: allow one level, rarely.
    difference = np.abs(arrays[0] - arrays[1])
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


# ---------------------------------------------------------------------------------------------
# The official release's layout: {model, ema, opt, args, steps}, SD-VAE latents (4 channels, /8).

OFFICIAL_FLAGS = ["--model", "SiT-T/2", "--resolution", 64, "--encoder-depth", 2]  # 1000 classes, z_dim 768


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = SiT_models["SiT-T/2"](input_size=64 // 8, in_channels=4, num_classes=1000, encoder_depth=2, z_dim=768)
    with torch.no_grad():  # give the zero-initialised output layers weights, as a trained model has
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("official") / "REG_T_2.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {},
                "args": argparse.Namespace(model="SiT-T/2", resolution=64, encoder_depth=2), "steps": 10}, path)
    return path


@pytest.fixture(scope="module")
def sd_vae_folder(tmp_path_factory):
    """A download-like folder holding a full-size SD-VAE with random weights (fp16 to halve the file)."""
    folder = tmp_path_factory.mktemp("sd-vae-ft-ema")
    state = {k: v.half() for k, v in AutoencoderKL().state_dict().items()}
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    return folder


def test_official_layout_checkpoint_samples_a_grid_through_the_sd_vae(official_ckpt, sd_vae_folder, tmp_path):
    out = tmp_path / "grid.png"
    run_sample("--ckpt", official_ckpt, *OFFICIAL_FLAGS, "--vae-path", sd_vae_folder, "--out", out,
               "--classes", 1, 2, "--per-class", 2, "--num-steps", 2)
    with Image.open(out) as image:
        assert image.mode == "RGB" and image.size == tile_grid_size(2, 2, 64)  # 8x8 latents decoded 8x
        assert np.asarray(image)[2:66, 2:66].std() > 0


def test_official_checkpoint_with_the_wrong_model_flags_says_which_flags_to_set(official_ckpt):
    with pytest.raises(ValueError, match="set --model, --resolution and --encoder-depth"):
        run_sample("--ckpt", official_ckpt, "--model", "SiT-T/4", "--resolution", 64, "--encoder-depth", 2,
                   "--classes", 1)
