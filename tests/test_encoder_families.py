"""Every encoder family of the official `--enc-type` names (REPA arXiv 2410.06940 section 4.1; REG
2507.01467 Table 3): preprocessing, token split, weights and grids, several encoders at once, and a
3-step train.py run per family.

The expectations are the official release's functions written out from their definitions (its
train.py `preprocess_raw_image`, utils.py `load_encoders` and `fix_mocov3_state_dict`, and the
forwards of its models/*.py), on random weights of the real architectures (timm, pretrained=False)
at reduced width and depth; the full-size architectures are checked on the meta device.

    python3 -m pytest -q tests/test_encoder_families.py
"""
import functools

import huggingface_hub.constants
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

import data
import encoder
import sample
import train
from encoder import ENCODERS, AutoencoderKL, Encoders, load_encoder
from model import SIZES, SiT, SiT_models, read_checkpoint
from util import UserError

SMALL = dict(depth=1, embed_dim=64, num_heads=2)  # the family's architecture at test size
FAMILY_NAMES = ["dinov2-vit-b", "dinov1-vit-b", "clip-vit-L", "mae-vit-l", "mocov3-vit-b", "jepa-vit-h"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


from test_encoder import images, randomized  # noqa: E402  (random weights and images, as there)


def official_preprocess(x, enc_type):
    """The release's preprocess_raw_image (train.py), written out: /255, then per family the mean
    and std (CLIP's own for CLIP) and a bicubic resize to 224 * (R // 256) or none."""
    def normalize(x, mean, std):  # torchvision's Normalize
        return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    resolution = x.shape[-1]
    x = x / 255.
    if "clip" in enc_type:
        x = F.interpolate(x, 224 * (resolution // 256), mode="bicubic")
        return normalize(x, CLIP_MEAN, CLIP_STD)
    x = normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    if "dinov2" in enc_type or "jepa" in enc_type:
        x = F.interpolate(x, 224 * (resolution // 256), mode="bicubic")
    return x  # mocov3, mae, dinov1: the image's own size


def official_tokens(vit, x, enc_type):
    """(class token, patch tokens) from the release's forwards, written out on the ViT's modules.
    Patches: I-JEPA's forward (models/jepa.py) ends with the norm; CLIP's UpdatedVisionTransformer
    (models/clip_vit.py) and MAE's forward_features (models/mae_vit.py) stop before it; DINOv2
    (x_norm_patchtokens), MoCo v3 (timm's forward_features, then z[:, 1:]) and DINOv1 end with it.
    Class token (ours, the release's loop accepts DINOv2 only): after the final norm; I-JEPA has
    none: the mean of its patch tokens."""
    h = vit.patch_embed(x)  # (N, T, D)
    if "jepa" in enc_type:
        h = h + vit.pos_embed
        for block in vit.blocks:
            h = block(h)
        patches = vit.norm(h)
        return patches.mean(dim=1), patches
    h = torch.cat([vit.cls_token.expand(len(h), -1, -1), h], dim=1) + vit.pos_embed  # (N, 1+T, D)
    h = vit.norm_pre(h)  # CLIP's ln_pre; identity for the others
    for block in vit.blocks:
        h = block(h)
    if "clip" in enc_type or "mae" in enc_type:
        return vit.norm(h)[:, 0], h[:, 1:]
    h = vit.norm(h)
    return h[:, 0], h[:, 1:]


# ----------------------------------------------------------------------------------------------
# Preprocessing, token split and grid

@pytest.mark.parametrize("resolution", [256, 512])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_family_preprocesses_and_splits_tokens_as_the_official_release(name, resolution):
    enc = randomized(load_encoder(name, resolution, weights=None, **SMALL))
    imgs = images(2, resolution)
    x = official_preprocess(imgs, name)
    assert torch.equal(enc.preprocess(imgs), x)
    cls, patches = enc(imgs)
    grid = resolution // 16  # the SiT's grid on SD-VAE latents with patch 2
    assert enc.grid_size == grid and patches.shape == (2, grid * grid, 64) and cls.shape == (2, 64)
    assert enc.vit.pos_embed.shape[1] == enc.vit.num_prefix_tokens + grid * grid  # resampled to the grid
    with torch.no_grad():
        want_cls, want_patches = official_tokens(enc.vit, x, name)
    assert torch.equal(patches, want_patches)
    torch.testing.assert_close(cls, want_cls, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, width, heads, patch, prefix, act", [
    ("dinov2-vit-b", 768, 12, 14, 1, "GELU"), ("dinov2-vit-l", 1024, 16, 14, 1, "GELU"),
    ("dinov1-vit-b", 768, 12, 16, 1, "GELU"), ("clip-vit-L", 1024, 16, 14, 1, "QuickGELU"),
    ("mae-vit-l", 1024, 16, 16, 1, "GELU"), ("mocov3-vit-s", 384, 12, 16, 1, "GELU"),
    ("mocov3-vit-b", 768, 12, 16, 1, "GELU"), ("jepa-vit-h", 1280, 16, 14, 0, "GELU")])
def test_every_name_builds_its_full_size_architecture(name, width, heads, patch, prefix, act):
    with torch.device("meta"):
        enc = load_encoder(name, 512, weights=None)
    vit = enc.vit
    assert enc.z_dim == width and vit.blocks[0].attn.num_heads == heads and vit.patch_embed.patch_size == (patch, patch)
    assert vit.num_prefix_tokens == prefix and enc.grid_size == 32  # I-JEPA has no class token
    assert type(vit.blocks[0].mlp.act).__name__ == act  # OpenAI's CLIP was trained with QuickGELU


# ----------------------------------------------------------------------------------------------
# Weights: the official files, the position embedding resampled to the grid, and the errors

def official_file(name, state):
    """A state dict of timm's layout at 224 pixels, stored as the family's release stores it."""
    if name == "mae-vit-l":
        return {"model": state}
    if name == "jepa-vit-h":
        return {"encoder": {"module." + k: v for k, v in state.items()}, "predictor": {"module.x": torch.zeros(1)}}
    if name == "mocov3-vit-b":
        return {"arch": "vit_base", "epoch": 300, "state_dict": {
            **{"module.base_encoder." + k: v for k, v in state.items()},
            "module.base_encoder.head.0.weight": torch.zeros(4, 64), "module.base_encoder.head.1.running_mean": torch.zeros(4),
            "module.momentum_encoder.cls_token": torch.zeros(1, 1, 64), "module.predictor.0.weight": torch.zeros(4, 4)}}
    if name == "clip-vit-L":
        return {**state, "head.weight": torch.zeros(8, 64)}  # timm's layout keeps CLIP's projection as head
    return state


@pytest.mark.parametrize("resolution", [256, 512])
@pytest.mark.parametrize("name", FAMILY_NAMES[1:])
def test_official_files_load_with_the_position_embedding_resampled_to_the_grid(tmp_path, name, resolution):
    spec = ENCODERS[name]
    state = randomized(timm.create_model(spec.arch, img_size=224, num_classes=0, **{**spec.arch_kwargs, **SMALL})).state_dict()
    torch.save(official_file(name, state), tmp_path / "weights.pth")
    enc = load_encoder(name, resolution, weights=str(tmp_path / "weights.pth"), **SMALL)
    grid = resolution // 16
    prefix = enc.vit.num_prefix_tokens
    # REPA: resample_abs_pos_embed(pos_embed, [16, 16]) at 256 (bicubic, antialiased); [32, 32] at 512.
    assert torch.equal(enc.vit.pos_embed, resample_abs_pos_embed(state["pos_embed"], [grid, grid], num_prefix_tokens=prefix))
    assert torch.equal(enc.vit.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert torch.equal(enc.vit.norm.weight, state["norm.weight"])


def test_mocov3_weights_load_as_the_release_s_fix_mocov3_state_dict(tmp_path):
    torch.manual_seed(0)
    vit224 = randomized(VisionTransformer(img_size=224, patch_size=16, num_classes=0, **SMALL))
    torch.save(official_file("mocov3-vit-b", vit224.state_dict()), tmp_path / "vit-b-300ep.pth.tar")
    enc = load_encoder("mocov3-vit-b", 256, weights=str(tmp_path / "vit-b-300ep.pth.tar"), **SMALL)
    # The release: strip `module.base_encoder.`, drop the head, resample pos_embed to 16x16, load into a
    # 256-pixel timm ViT strictly; then timm's forward_features and z[:, 1:].
    ckpt = torch.load(tmp_path / "vit-b-300ep.pth.tar", weights_only=True)["state_dict"]
    fixed = {k[len("module.base_encoder."):]: v for k, v in ckpt.items()
             if k.startswith("module.base_encoder.") and "head" not in k}
    fixed["pos_embed"] = resample_abs_pos_embed(fixed["pos_embed"], [16, 16])
    release = VisionTransformer(img_size=256, patch_size=16, num_classes=0, **SMALL).eval()
    release.load_state_dict(fixed, strict=True)
    imgs = images(2, 256)
    with torch.no_grad():
        z = release.forward_features(official_preprocess(imgs, "mocov3"))
    cls, patches = enc(imgs)
    assert torch.equal(patches, z[:, 1:]) and torch.equal(cls, z[:, 0])


def test_mocov3_key_mapping_fits_the_full_size_vit_b():
    with torch.device("meta"):
        full = timm.create_model("vit_base_patch16_224", num_classes=0).state_dict()  # MoCo v3's ViT-B at 224
        enc = load_encoder("mocov3-vit-b", 256, weights=None)
    mapped = encoder._mocov3_to_timm(official_file("mocov3-vit-b", full))
    want = enc.vit.state_dict()
    assert mapped.keys() == want.keys()
    assert all(mapped[k].shape == want[k].shape for k in want if k != "pos_embed")
    assert mapped["pos_embed"].shape == (1, 1 + 14 * 14, 768) and want["pos_embed"].shape == (1, 1 + 16 * 16, 768)


@pytest.mark.parametrize("name, file", [("mocov3-vit-b", "vit-b-300ep.pth.tar"), ("jepa-vit-h", "IN1K-vit.h.14-300e.pth.tar")])
def test_a_family_without_hub_weights_names_the_file_to_fetch(name, file):
    with pytest.raises(UserError, match=f"{name} has no weights on the Hugging Face hub: download {file}.*--enc-path"):
        load_encoder(name, 256)


@pytest.mark.parametrize("name, repo", [("clip-vit-L", "timm/vit_large_patch14_clip_224.openai"),
                                        ("mae-vit-l", "timm/vit_large_patch16_224.mae"),
                                        ("dinov1-vit-b", "timm/vit_base_patch16_224.dino")])
def test_hub_weights_offline_say_how_to_get_them_or_which_file_to_give(monkeypatch, tmp_path, name, repo):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # huggingface_hub reads its env at import: patch both
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=f"hf download {repo}.*or pass .* with --enc-path") as e:
        load_encoder(name, 256)
    assert "\n" not in str(e.value)


def test_a_missing_or_unreadable_enc_path_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no such file; download vit-b-300ep.pth.tar"):
        load_encoder("mocov3-vit-b", 256, weights=str(tmp_path / "nowhere.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a weights file")
    with pytest.raises(UserError, match="is not a weights file torch can read safely"):
        load_encoder("mae-vit-l", 256, weights=str(tmp_path / "garbage.pth"), **SMALL)
    torch.save({"model": {"pos_embed": torch.zeros(1, 197, 64)}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="does not fit mae-vit-l"):
        load_encoder("mae-vit-l", 256, weights=str(tmp_path / "other.pth"), **SMALL)


# ----------------------------------------------------------------------------------------------
# Several encoders at once

def test_a_comma_separated_list_gives_each_encoder_s_tokens_in_order():
    enc = load_encoder("mae-vit-l,jepa-vit-h", 256, weights=None, **SMALL)
    alone = [load_encoder(n, 256, weights=None, **SMALL) for n in ("mae-vit-l", "jepa-vit-h")]
    for one, other in zip(enc.encoders, alone):
        other.load_state_dict(one.state_dict())
    assert isinstance(enc, Encoders) and enc.z_dims == [64, 64] and enc.z_dim == 64
    imgs = images(2, 256)
    cls, patches = enc(imgs)
    for k, one in enumerate(alone):
        want_cls, want_patches = one(imgs)
        assert torch.equal(cls[k], want_cls) and torch.equal(patches[k], want_patches)


def test_enc_path_gives_one_file_per_encoder():
    with pytest.raises(UserError, match="gives 1 files for the 2 encoders"):
        load_encoder("mae-vit-l,mocov3-vit-b", 256, weights="/a.pth")


# ----------------------------------------------------------------------------------------------
# train.py with every family (tiny encoders and VAE; 64-pixel synthetic data, SiT-T/2: a 4x4 grid)

def tiny_encoder(name, resolution, weights=None):
    return load_encoder(name, resolution, weights=None, depth=1, embed_dim=32, num_heads=2)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    path = tmp_path_factory.mktemp("prepared")
    data.write_synthetic(str(path), count=8, resolution=64, num_classes=2)
    return str(path)


@pytest.fixture
def tiny_networks(monkeypatch):
    """train.py's frozen networks at test size, and a SiT-T/2 of two narrow blocks (sample.py builds the same)."""
    monkeypatch.setitem(SiT_models, "SiT-T/2", functools.partial(
        SiT, **{**SIZES["T"], "depth": 2, "hidden_size": 64, "num_heads": 2, "encoder_depth": 1, "projector_dim": 64,
                "patch_size": 2}))
    monkeypatch.setattr(train, "load_encoder", tiny_encoder)
    monkeypatch.setattr(train, "load_vae", lambda name, path=None: AutoencoderKL(ch=4, ch_mult=(1, 1, 1, 1),
                                                                                 num_res_blocks=1, groups=2))


def train_3_steps(prepared, out, enc_type, *flags):
    return train.main(train.get_args([
        "--data-path", prepared, "--model", "SiT-T/2", "--enc-type", enc_type, "--output-dir", str(out),
        "--exp-name", "run", "--global-batch-size", "2", "--max-train-steps", "3", "--num-workers", "0",
        "--log-every", "1", "--checkpoint-every", "3", "--sample-every", "100", "--sample-steps", "2", *flags]))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_train_runs_3_steps_with_every_family(prepared, tmp_path, tiny_networks, name):
    model, _ = train_3_steps(prepared, tmp_path, name)
    ckpt = read_checkpoint(str(tmp_path / "run" / "checkpoints" / "0000003.pt"))
    assert ckpt["config"]["enc_type"] == name and ckpt["config"]["z_dim"] == 32
    assert len(model.projectors) == 1


def test_train_with_two_encoders_and_sample_and_resume_read_them_back(prepared, tmp_path, tiny_networks):
    model, _ = train_3_steps(prepared, tmp_path, "clip-vit-L,mocov3-vit-b")
    assert len(model.projectors) == 2
    path = str(tmp_path / "run" / "checkpoints" / "0000003.pt")
    ckpt = read_checkpoint(path)
    assert ckpt["config"]["enc_type"] == "clip-vit-L,mocov3-vit-b" and ckpt["config"]["z_dim"] == [32, 32]
    rebuilt = sample.build_model(ckpt, sample.get_args(["--ckpt", path]))[0]
    assert rebuilt.enc_type == "clip-vit-L,mocov3-vit-b" and len(rebuilt.projectors) == 2
    with pytest.raises(UserError, match="written by a run with --enc-type clip-vit-L,mocov3-vit-b and this run has "
                                        "--enc-type clip-vit-L; resume with --enc-type clip-vit-L,mocov3-vit-b"):
        train_3_steps(prepared, tmp_path, "clip-vit-L", "--max-train-steps", "4")


def test_a_checkpoint_from_before_enc_type_was_recorded_still_samples(prepared, tmp_path, tiny_networks):
    train_3_steps(prepared, tmp_path, "dinov2-vit-b")
    path = str(tmp_path / "run" / "checkpoints" / "0000003.pt")
    ckpt = read_checkpoint(path)
    del ckpt["config"]["enc_type"]
    rebuilt = sample.build_model(ckpt, sample.get_args(["--ckpt", path]))[0]
    assert rebuilt.enc_type is None and rebuilt.z_dim == 32


def test_an_encoder_grid_unlike_the_sit_s_is_one_line_naming_both(prepared, tmp_path, tiny_networks):
    with pytest.raises(UserError, match="--enc-type mae-vit-l has a 4x4 patch grid and SiT-T/4 a 2x2 one") as e:
        train_3_steps(prepared, tmp_path, "mae-vit-l", "--model", "SiT-T/4")
    assert "\n" not in str(e.value)
