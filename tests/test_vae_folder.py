"""A diffusers AutoencoderKL folder as the VAE (ReaLS's release, arXiv 2502.00359; toy.py's toy VAE):
loading, its one-line errors, the latent scale measured where the config has none, and the same
commands as the SD-VAE (prepare, train, sample) on a tiny random folder written here."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import sample
import train
from encoder import AutoencoderKL, load_vae, save_vae_folder
from util import UserError

TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, groups=4)  # downsample 2, 4 latent channels

# What diffusers writes for an AutoencoderKL (its config.json keys), at the tiny sizes.
DIFFUSERS_CONFIG = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "act_fn": "silu",
                    "block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
                    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "latents_mean": None,
                    "latents_std": None, "layers_per_block": 1, "mid_block_add_attention": True,
                    "norm_num_groups": 4, "out_channels": 3, "sample_size": 16, "scaling_factor": 0.3,
                    "shift_factor": None, "up_block_types": ["UpDecoderBlock2D"] * 2, "use_post_quant_conv": True,
                    "use_quant_conv": True}


def random_vae(seed=0, **kwargs):
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY, **kwargs)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return vae


@pytest.fixture
def folder(tmp_path):
    """A random tiny VAE written as diffusers writes one: its config.json and safetensors weights."""
    vae = random_vae()
    save_vae_folder(vae, tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text(json.dumps(DIFFUSERS_CONFIG))
    return vae, str(tmp_path / "vae")


def test_a_diffusers_folder_loads_its_sizes_weights_and_scaling_factor(folder):
    vae, path = folder
    loaded = load_vae(path)
    assert (loaded.latent_channels, loaded.downsample, loaded.scaling_factor) == (4, 2, 0.3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode(x), vae.encode(x)))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_save_vae_folder_round_trips_and_a_config_without_scale_gives_none(tmp_path):
    vae = random_vae(scaling_factor=None)
    loaded = load_vae(save_vae_folder(vae, str(tmp_path / "toy")))
    assert loaded.scaling_factor is None and "scaling_factor" not in json.loads((tmp_path / "toy" / "config.json").read_text())
    z = torch.randn(1, 4, 4, 4)
    assert torch.equal(loaded.decode(z), vae.decode(z))


def test_vae_path_says_where_a_moved_folder_is_now(folder, tmp_path):
    _, path = folder
    assert load_vae("/gone/reals-vae", path=path).scaling_factor == 0.3


@pytest.mark.parametrize("damage, message", [
    (lambda p: os.remove(os.path.join(p, "config.json")), "has no config.json; a diffusers AutoencoderKL folder holds"),
    (lambda p: os.remove(os.path.join(p, "diffusion_pytorch_model.safetensors")), "has a config.json but no weights"),
    (lambda p: open(os.path.join(p, "config.json"), "w").write("{"), "is not readable JSON"),
    (lambda p: open(os.path.join(p, "config.json"), "w").write(json.dumps({**DIFFUSERS_CONFIG, "block_out_channels": [8, 32]})),
     "does not fit .*config.json .size mismatch"),
    (lambda p: open(os.path.join(p, "config.json"), "w").write(json.dumps({**DIFFUSERS_CONFIG, "shift_factor": 0.1})),
     "sets shift_factor=0.1, which this code does not implement"),
    (lambda p: open(os.path.join(p, "config.json"), "w").write(json.dumps({**DIFFUSERS_CONFIG, "_class_name": "VQModel"})),
     "describes 'VQModel', not an AutoencoderKL"),
    (lambda p: open(os.path.join(p, "diffusion_pytorch_model.safetensors"), "wb").write(b"\x08\0\0\0\0\0\0\0{"),
     "is not a readable weights file"),
])
def test_missing_or_mismatched_files_are_one_line_errors(folder, damage, message):
    _, path = folder
    damage(path)
    with pytest.raises(UserError, match=message) as e:
        load_vae(path)
    assert "\n" not in str(e.value)


def test_an_unknown_name_that_is_no_folder_lists_the_choices():
    with pytest.raises(UserError, match="Unknown VAE '/no/such/vae'; choose .* or a diffusers AutoencoderKL folder"):
        load_vae("/no/such/vae")


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(tmp_path / "src" / f"class{c}")
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(tmp_path / "src" / f"class{c}" / f"{i}.png")
    return str(tmp_path / "src")


def prepare_flags(src, dst, vae):
    return ["prepare", "--src", src, "--dst", dst, "--vae", vae, "--resolution", "16", "--batch-size", "3",
            "--workers", "0"]


def test_prepare_measures_the_scale_where_the_config_has_none_and_says_so(image_folder, tmp_path, capsys):
    path = save_vae_folder(random_vae(scaling_factor=None), str(tmp_path / "toy"))
    data.main(prepare_flags(image_folder, str(tmp_path / "data"), path))
    assert "measured 1/std of the latents" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    # By hand: the spread of z = mean + std * eps over all numbers, Var z = Var mean + E std^2.
    moments = np.load(tmp_path / "data" / "moments.npy").astype(np.float64)
    mean, std = moments[:, :4], moments[:, 4:]
    expected = 1 / np.sqrt(mean.var() + (std ** 2).mean())
    assert manifest["scaling_factor"] == pytest.approx(expected, rel=1e-9)
    assert manifest["scaling_factor_source"].startswith("measured") and manifest["vae"] == path
    z = mean + std * np.random.default_rng(0).standard_normal(std.shape)  # and it gives unit spread
    assert (z * manifest["scaling_factor"]).std() == pytest.approx(1, abs=0.05)
    data.main(prepare_flags(image_folder, str(tmp_path / "data"), path))  # a rerun: nothing to do, no mismatch
    assert "already prepared" in capsys.readouterr().out


def test_a_folder_prepares_trains_and_samples_through_the_sd_vae_commands(folder, image_folder, tmp_path):
    vae, path = folder
    dst = str(tmp_path / "data")
    data.main(prepare_flags(image_folder, dst, path))
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["scaling_factor"] == 0.3  # the config's
    args = train.get_args(["--data-path", dst, "--model", "SiT-T/2", "--enc-type", "stand-in", "--output-dir",
                           str(tmp_path / "runs"), "--exp-name", "reals", "--max-train-steps", "2",
                           "--global-batch-size", "4", "--num-workers", "0", "--checkpoint-every", "2",
                           "--sample-every", "2", "--sample-steps", "2", "--no-compile"])
    train.main(args)
    ckpt = str(tmp_path / "runs" / "reals" / "checkpoints" / "0000002.pt")
    config = torch.load(ckpt, weights_only=False)["config"]
    assert (config["vae"], config["scaling_factor"], config["in_channels"], config["input_size"]) == (path, 0.3, 4, 8)
    sample.main(sample.get_args(["--ckpt", ckpt, "--out", str(tmp_path / "grid.png"), "--classes", "0", "1",
                                 "--per-class", "2", "--num-steps", "2"]))
    assert Image.open(tmp_path / "grid.png").size[1] > 2 * 16


def test_training_refuses_a_vae_path_that_does_not_fit_the_data(folder, image_folder, tmp_path):
    _, path = folder
    dst = str(tmp_path / "data")
    data.main(prepare_flags(image_folder, dst, path))
    other = save_vae_folder(AutoencoderKL(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, groups=4), str(tmp_path / "other"))
    args = train.get_args(["--data-path", dst, "--model", "SiT-T/2", "--enc-type", "stand-in", "--output-dir",
                           str(tmp_path / "runs"), "--max-train-steps", "1", "--global-batch-size", "4",
                           "--num-workers", "0", "--vae-path", other, "--no-compile"])
    with pytest.raises(UserError, match="makes 4-channel latents at 1/4 and .* holds 4 at 1/2; give --vae-path"):
        train.main(args)
