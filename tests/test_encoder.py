"""encoder.py: the frozen DINOv2 wrapper, its stand-in, and the SD-VAE (DINOv2 arXiv 2304.07193; SD-VAE of LDM 2112.10752).

Everything runs on CPU with random weights: tiny VAE configs, one-block DINOv2-S, no network.
"""
import functools
import os

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import encoder
from util import UserError
from encoder import (PretrainedViT, AutoencoderKL, PixelSpace, StandInEncoder, load_encoder, load_vae,
                     sample_posterior)

TINY_VAE = dict(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, groups=4)


def randomized(module, seed=0):
    """`module` with every parameter redrawn (default init leaves norms at 1, biases at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module


def images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# SD-VAE

def diffusers_sd_vae_shapes():
    """Key -> shape of diffusers' AutoencoderKL with the SD config, written out from its layout."""
    shapes = {}

    def layer(name, out, inp=None, k=None):  # conv (k given), linear (inp given) or norm
        shapes[name + ".weight"] = (out, inp, k, k) if k else (out, inp) if inp else (out,)
        shapes[name + ".bias"] = (out,)

    def resnet(name, c_in, c_out):
        layer(name + ".norm1", c_in)
        layer(name + ".conv1", c_out, c_in, 3)
        layer(name + ".norm2", c_out)
        layer(name + ".conv2", c_out, c_out, 3)
        if c_in != c_out:
            layer(name + ".conv_shortcut", c_out, c_in, 1)

    def mid_block(name, c):
        resnet(name + ".resnets.0", c, c)
        resnet(name + ".resnets.1", c, c)
        layer(name + ".attentions.0.group_norm", c)
        for proj in ["to_q", "to_k", "to_v", "to_out.0"]:
            layer(f"{name}.attentions.0.{proj}", c, c)

    layer("encoder.conv_in", 128, 3, 3)
    c_in = 128
    for i, c in enumerate([128, 256, 512, 512]):
        for j in range(2):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", c_in if j == 0 else c, c)
        if i < 3:
            layer(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
        c_in = c
    mid_block("encoder.mid_block", 512)
    layer("encoder.conv_norm_out", 512)
    layer("encoder.conv_out", 8, 512, 3)
    layer("quant_conv", 8, 8, 1)
    layer("post_quant_conv", 4, 4, 1)
    layer("decoder.conv_in", 512, 4, 3)
    mid_block("decoder.mid_block", 512)
    c_in = 512
    for i, c in enumerate([512, 512, 256, 128]):
        for j in range(3):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", c_in if j == 0 else c, c)
        if i < 3:
            layer(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
        c_in = c
    layer("decoder.conv_norm_out", 128)
    layer("decoder.conv_out", 3, 128, 3)
    return shapes


def test_sd_vae_state_dict_has_the_diffusers_keys_and_shapes():
    with torch.device("meta"):  # shapes only; no 84M-parameter allocation
        vae = AutoencoderKL()
    expected = diffusers_sd_vae_shapes()
    got = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert len(expected) == 248  # the key count of diffusers' SD AutoencoderKL
    assert set(got) == set(expected)
    assert got == expected
    assert got["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert got["quant_conv.weight"] == (8, 8, 1, 1)
    assert got["decoder.up_blocks.0.resnets.0.conv1.weight"] == (512, 512, 3, 3)
    assert got["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"] == (128, 256, 1, 1)
    assert got["encoder.mid_block.attentions.0.to_out.0.weight"] == (512, 512)


def test_vae_encode_gives_mean_and_positive_std_at_one_eighth_and_decode_restores_size():
    vae = randomized(AutoencoderKL(**TINY_VAE))
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    mean, std = vae.encode(x)
    assert mean.shape == std.shape == (2, 4, 4, 6)
    assert (std > 0).all()
    assert vae.decode(mean).shape == (2, 3, 32, 48)
    assert (vae.latent_channels, vae.downsample, vae.scaling_factor) == (4, 8, 0.18215)


GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def test_vae_reproduces_the_golden_outputs_of_diffusers():
    # A seeded tiny diffusers AutoencoderKL of the SD-VAE's structure, its weights and outputs
    # stored once by tests/golden/make_vae_golden.py (diffusers is not needed here).
    golden = torch.load(os.path.join(GOLDEN, "vae_tiny.pt"), weights_only=True)
    vae = AutoencoderKL(**golden["config"])
    vae.load_state_dict(golden["state_dict"])  # strict: the diffusers names, nothing else
    assert vae.downsample == 4 and golden["x"].shape == (2, 3, 32, 32)
    mean, std = vae.encode(golden["x"])
    assert mean.shape == std.shape == (2, 4, 8, 8)
    torch.testing.assert_close(mean, golden["mean"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, golden["std"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vae.decode(golden["z"]), golden["decoded"], atol=1e-5, rtol=1e-5)


def test_vae_std_is_exp_of_half_the_clamped_logvar():
    vae = AutoencoderKL(**TINY_VAE)
    with torch.no_grad():  # quant_conv outputs logvar = 100 (clamped to 20) and -100 (to -30)
        vae.quant_conv.weight.zero_()
        vae.quant_conv.bias.copy_(torch.tensor([0, 0, 0, 0, 100.0, -100.0, 0, 0]))
    _, std = vae.encode(torch.zeros(1, 3, 16, 16))
    assert torch.allclose(std[0, :, 0, 0], torch.tensor([10.0, -15.0, 0, 0]).exp())


def test_vae_is_frozen():
    vae = AutoencoderKL(**TINY_VAE)
    assert not vae.training
    assert not any(p.requires_grad for p in vae.parameters())


def to_legacy_attention_names(state_dict):
    """The pre-0.14 diffusers names, with the projections stored as 1x1 convs."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in state_dict.items():
        for new_name, old_name in old.items():
            if f".attentions.0.{new_name}." in key:
                key = key.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
                value = value[:, :, None, None] if value.ndim == 2 else value
        out[key] = value
    return out


def test_old_attention_names_and_conv_shaped_weights_load_to_the_same_outputs():
    vae = randomized(AutoencoderKL(**TINY_VAE))
    legacy = to_legacy_attention_names(vae.state_dict())
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    assert legacy["decoder.mid_block.attentions.0.proj_attn.weight"].shape == (16, 16, 1, 1)
    other = AutoencoderKL(**TINY_VAE)
    other.load_state_dict(legacy)
    x, z = torch.rand(1, 3, 16, 16) * 2 - 1, torch.randn(1, 4, 2, 2)
    assert torch.equal(other.encode(x)[0], vae.encode(x)[0])
    assert torch.equal(other.decode(z), vae.decode(z))


def test_vae_loading_is_strict():
    state = AutoencoderKL(**TINY_VAE).state_dict()
    state["encoder.extra.weight"] = state.pop("encoder.conv_in.weight")
    with pytest.raises(RuntimeError, match="encoder.conv_in.weight"):
        AutoencoderKL(**TINY_VAE).load_state_dict(state)


@pytest.fixture
def tiny_sd_vae(monkeypatch):
    """load_vae builds a tiny AutoencoderKL, so weight files in tests stay small."""
    monkeypatch.setattr(encoder, "AutoencoderKL", functools.partial(AutoencoderKL, **TINY_VAE))
    return randomized(AutoencoderKL(**TINY_VAE))


@pytest.mark.parametrize("filename", ["diffusion_pytorch_model.safetensors",
                                      "diffusion_pytorch_model.bin"])
def test_load_vae_reads_a_local_directory(tiny_sd_vae, tmp_path, filename):
    state = to_legacy_attention_names(tiny_sd_vae.state_dict())  # as the released files are named
    if filename.endswith(".safetensors"):
        safetensors.torch.save_file(state, tmp_path / filename)
    else:
        torch.save(state, tmp_path / filename)
    vae = load_vae("sd-vae-ft-ema", path=str(tmp_path))
    z = torch.randn(1, 4, 2, 2)
    assert torch.equal(vae.decode(z), tiny_sd_vae.decode(z))
    assert not any(p.requires_grad for p in vae.parameters())


def test_load_vae_with_a_missing_path_says_what_is_expected(tmp_path):
    with pytest.raises(UserError, match="diffusion_pytorch_model.safetensors"):
        load_vae("sd-vae-ft-ema", path=str(tmp_path / "nowhere"))


@pytest.fixture
def offline_empty_hub(monkeypatch, tmp_path):
    """No network and an empty HF cache (huggingface_hub reads its env at import, so patch both)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))


def test_load_vae_offline_without_cache_explains_how_to_get_the_weights(offline_empty_hub):
    with pytest.raises(UserError, match="hf download stabilityai/sd-vae-ft-mse"):
        load_vae("sd-vae-ft-mse")


def test_pixel_space_is_an_identity_vae_with_zero_std():
    vae = load_vae("pixels")
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    mean, std = vae.encode(x)
    assert torch.equal(sample_posterior(mean, std), x)
    assert torch.equal(vae.decode(x), x)
    assert isinstance(vae, PixelSpace)
    assert (vae.latent_channels, vae.downsample, vae.scaling_factor) == (3, 1, 1.0)


def test_sample_posterior_is_mean_plus_std_times_standard_normal():
    mean, std = torch.full((4, 4, 8, 8), 2.0), torch.full((4, 4, 8, 8), 3.0)
    sample = sample_posterior(mean, std, torch.Generator().manual_seed(1))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample, mean + std * eps)
    many = sample_posterior(mean.repeat(64, 1, 1, 1), std.repeat(64, 1, 1, 1))  # 65536 draws
    assert abs(many.mean().item() - 2.0) < 0.05 and abs(many.std().item() - 3.0) < 0.05


# ----------------------------------------------------------------------------------------------
# DINOv2 and the stand-in encoder

def reference_preprocess(imgs, size):
    """REPA's preprocess_raw_image for DINOv2, written out."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (imgs.float() / 255 - mean) / std
    return F.interpolate(x, size, mode="bicubic", align_corners=False)


def test_dinov2_preprocessing_normalizes_then_resizes_bicubic_to_seven_eighths():
    enc = PretrainedViT("dinov2-vit-s", 256, weights=None, depth=1)
    imgs = images(2, 256)
    assert torch.equal(enc.preprocess(imgs), reference_preprocess(imgs, 224))
    assert torch.equal(enc.preprocess(imgs.float()), enc.preprocess(imgs))


@pytest.mark.parametrize("resolution, tokens", [(256, 256), (512, 1024)])
def test_dinov2_returns_cls_and_one_token_per_14_pixel_patch(resolution, tokens):
    enc = PretrainedViT("dinov2-vit-s", resolution, weights=None, depth=1)
    cls, patches = enc(images(2, resolution))
    assert enc.z_dim == 384
    assert cls.shape == (2, 384) and patches.shape == (2, tokens, 384)
    assert enc.vit.pos_embed.shape[1] == 1 + tokens  # position embedding on the 16x16 (32x32) grid


def test_dinov2_with_registers_drops_the_four_register_tokens():
    enc = PretrainedViT("dinov2-vit-s-reg", 256, weights=None, depth=1)
    imgs = images(2, 256)
    cls, patches = enc(imgs)
    with torch.no_grad():
        tokens = enc.vit.forward_features(reference_preprocess(imgs, 224))  # after the final norm
    assert tokens.shape == (2, 1 + 4 + 256, 384)
    assert torch.equal(cls, tokens[:, 0])
    assert torch.equal(patches, tokens[:, 5:])


def test_dinov2_loads_a_torch_hub_checkpoint_and_resamples_pos_embed_as_repa(tmp_path):
    # A random DINOv2-S in the facebookresearch layout: 37x37 grid (518 px) and a mask_token.
    hub = timm.create_model("vit_small_patch14_dinov2", depth=1, num_classes=0).state_dict()
    hub["mask_token"] = torch.zeros(1, 384)
    torch.save(hub, tmp_path / "dinov2_vits14_pretrain.pth")
    enc = PretrainedViT("dinov2-vit-s", 256, weights=str(tmp_path / "dinov2_vits14_pretrain.pth"), depth=1)
    # REPA: encoder.pos_embed.data = resample_abs_pos_embed(encoder.pos_embed.data, [16, 16])
    assert torch.equal(enc.vit.pos_embed, resample_abs_pos_embed(hub["pos_embed"], [16, 16]))
    assert torch.equal(enc.vit.blocks[0].attn.qkv.weight, hub["blocks.0.attn.qkv.weight"])
    assert torch.equal(enc.vit.cls_token, hub["cls_token"])


def test_dinov2_loads_a_torch_hub_checkpoint_with_registers(tmp_path):
    # torch.hub's layout adds pos_embed to the class token and keeps registers apart; timm folds
    # the class token's position into the token (its -reg models embed patches only).
    hub = timm.create_model("vit_small_patch14_dinov2", depth=1, num_classes=0).state_dict()
    hub["mask_token"] = torch.zeros(1, 384)
    hub["register_tokens"] = torch.randn(1, 4, 384)
    torch.save(hub, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    enc = PretrainedViT("dinov2-vit-s-reg", 256, weights=str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"),
                 depth=1)
    repa_pos_embed = resample_abs_pos_embed(hub["pos_embed"], [16, 16])  # (1, 1+256, 384)
    assert torch.equal(enc.vit.pos_embed, repa_pos_embed[:, 1:])
    assert torch.equal(enc.vit.cls_token, hub["cls_token"] + hub["pos_embed"][:, :1])
    assert torch.equal(enc.vit.reg_token, hub["register_tokens"])


def test_dinov2_pretrained_offline_raises_an_error_that_says_how_to_get_weights(offline_empty_hub):
    with pytest.raises(UserError, match="hf download timm/vit_small_patch14_dinov2.lvd142m"):
        PretrainedViT("dinov2-vit-s", 256)


def test_dinov2_is_frozen_and_rejects_unknown_names():
    enc = PretrainedViT("dinov2-vit-s", 256, weights=None, depth=1)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(UserError, match="dinov2-vit-b"):
        PretrainedViT("dinov2-vit-x", 256, weights=None)


def test_stand_in_encoder_is_the_same_network_for_the_same_seed():
    config = dict(patch_size=8, z_dim=32, depth=2, num_heads=2)
    a, b = StandInEncoder(64, **config), StandInEncoder(64, **config)
    c = StandInEncoder(64, **config, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["vit.pos_embed"], sc["vit.pos_embed"])


def test_stand_in_encoder_leaves_the_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    StandInEncoder(64, patch_size=8, z_dim=32, depth=2, num_heads=2)
    assert torch.equal(torch.rand(1), expected)


def test_stand_in_encoder_reads_images_at_their_size():
    enc = load_encoder("stand-in", 64, patch_size=8, z_dim=32, depth=2, num_heads=2)
    cls, patches = enc(images(3, 64))
    assert isinstance(enc, StandInEncoder) and enc.z_dim == 32
    assert cls.shape == (3, 32) and patches.shape == (3, 64, 32)
    assert not any(p.requires_grad for p in enc.parameters())


def test_load_encoder_builds_dinov2_for_official_names_and_refuses_weights_for_the_stand_in():
    assert isinstance(load_encoder("dinov2-vit-s", 256, weights=None, depth=1), PretrainedViT)
    with pytest.raises(UserError, match="stand-in"):
        load_encoder("stand-in", 64, weights="/some/file.pth")


def test_load_vae_rejects_an_unknown_name():
    with pytest.raises(UserError, match="Unknown VAE 'sd-vae-x'; choose sd-vae-ft-ema"):
        load_vae("sd-vae-x")


def test_load_encoder_rejects_an_unknown_name():
    with pytest.raises(UserError, match="dinov2-vit-b"):
        load_encoder("dinov3", 256, weights=None)
    with pytest.raises(UserError, match=r"Unknown encoder 'dinov3'; choose one of \[.*'dinov2-vit-s-reg'.*, stand-in or builtin-vit"):
        load_encoder("dinov3", 256, weights=None)


@pytest.mark.parametrize("resolution", [200, 250])
def test_dinov2_rejects_a_resolution_that_gives_no_whole_number_of_patches(resolution):
    with pytest.raises(UserError, match=f"resolution must be a multiple of 16 .got {resolution}. so that "
                                        "224 . resolution / 256 is a whole number of 14-pixel patches"):
        load_encoder("dinov2-vit-s", resolution, weights=None, depth=1)
