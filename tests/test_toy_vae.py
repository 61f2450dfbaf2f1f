"""The toy VAE of toy.py (ReaLS, arXiv 2502.00359, our reading): the alignment network and its loss
against hand computations, and a tiny aligned VAE trained, saved as a diffusers folder, reloaded."""
import json
import math

import pytest
import torch

import encoder
import toy
from encoder import load_vae
from util import UserError


def test_alignment_loss_is_one_minus_cosine_over_patches_plus_one_minus_cosine_of_the_global_feature():
    patches = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (N=1, T=2, D=2)
    teacher_patches = torch.tensor([[[3.0, 0.0], [1.0, 0.0]]])  # cosines 1 and 0
    cls, teacher_cls = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 5.0]])  # cosine 1/sqrt(2)
    expected = (1 - (1 + 0) / 2) + (1 - 1 / math.sqrt(2))
    assert toy.alignment_loss(patches, cls, teacher_patches, teacher_cls).item() == pytest.approx(expected)


def test_kl_loss_is_the_mean_kl_to_the_standard_normal():
    assert toy.kl_loss(torch.zeros(2, 4), torch.ones(2, 4)).item() == 0
    mean, std = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 2.0]])
    by_hand = (0.5 * 1 + 0.5 * (4 - 1 - 2 * math.log(2))) / 2
    assert toy.kl_loss(mean, std).item() == pytest.approx(by_hand)


def test_the_aligner_reads_the_latent_on_the_teachers_patch_grid():
    torch.manual_seed(0)
    aligner = toy.LatentAligner(latent_channels=4, patch=2, z_dim=8)
    z = torch.zeros(1, 4, 8, 8)
    base, _ = aligner(z)
    z[0, :, 2:4, 4:6] = 1  # latent block (row 1, column 2) of the 4x4 grid: token 1 * 4 + 2
    patches, global_ = aligner(z)
    assert patches.shape == (1, 16, 8) and global_.shape == (1, 8)
    changed = (patches - base).abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [6]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random tiny teacher in toy.py's file format (16 patch tokens on 32 pixels)."""
    path = tmp_path_factory.mktemp("teacher") / "encoder.pt"
    torch.manual_seed(0)
    net = encoder.BuiltinViT(z_dim=32, depth=1, num_heads=2)
    torch.save({"kind": "builtin-vit", "config": net.config, "state_dict": net.vit.state_dict()}, path)
    return str(path)


def small_vae(folder, teacher, align_coeff):
    return toy.train_vae(str(folder), teacher, align_coeff, num_images=40, epochs=1, batch_size=20, probe_images=40)


def test_a_tiny_aligned_vae_trains_saves_a_diffusers_folder_and_loads_through_load_vae(teacher, tmp_path):
    folder, figures = small_vae(tmp_path / "aligned", teacher, 0.5)
    vae = load_vae(folder)
    assert (vae.latent_channels, vae.downsample, vae.scaling_factor) == (4, 4, None)  # prepare measures it
    assert json.loads((tmp_path / "aligned" / "toy_vae.json").read_text())["align_coeff"] == 0.5
    assert set(figures) >= {"psnr", "probe_accuracy", "seconds"}
    plain = load_vae(small_vae(tmp_path / "plain", teacher, 0.0)[0])
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # same seed and data: only the alignment term differs
    assert not torch.equal(vae.encode(x)[0], plain.encode(x)[0])


def test_the_vae_command_without_its_teacher_is_one_line_saying_how_to_make_it(tmp_path):
    with pytest.raises(UserError, match="needs the teacher .*; make it with: python toy.py encoder"):
        toy.main(["vae", "--enc-path", str(tmp_path / "none.pt"), "--out", str(tmp_path / "vae")])
