"""Frozen pretrained networks: the encoder REPA aligns with and the SD-VAE (REG arXiv 2507.01467;
REPA 2410.06940; DINOv2 2304.07193; SD-VAE of LDM 2112.10752).

REG trains on SD-VAE latents and aligns with a pretrained encoder's tokens (DINOv2 by default);
neither network is ever trained.
  PretrainedViT: every family of the official `--enc-type` names (ENCODERS: DINOv2, DINOv1, CLIP,
    MAE, MoCo v3, I-JEPA) through timm: uint8 images -> (cls (N, z_dim), patches (N, T, z_dim)),
    preprocessed and split as the official REPA/REG code does (FAMILIES says how, per family).
  Encoders: several of them at once (`--enc-type a,b`), one projector each; REG's token is the first's.
  AutoencoderKL: Stable Diffusion's VAE in plain PyTorch with diffusers' parameter names, so
    stabilityai/sd-vae-ft-ema (or -mse) loads with no conversion beyond old attention names.
  StandInEncoder / PixelSpace: stand-ins with the same interfaces, used by the offline built-in
    run where no pretrained weights exist. They exercise the REG code path, nothing more.
  BuiltinViT: DINOv2's design at toy scale, pretrained on the built-in images by toy.py, so that
    the offline lab (labs/reg_vs_repa.py) has a teacher whose tokens mean something.

Usage:
    enc = load_encoder("dinov2-vit-b", resolution=256)        # or weights="/path/dinov2_vitb14_pretrain.pth"
    cls, patches = enc(images)                                # (N, 768), (N, 256, 768)
    enc = load_encoder("dinov2-vit-b,clip-vit-L", 256)        # -> [cls (N, 768), (N, 1024)], [patches ...]
    vae = load_vae("sd-vae-ft-ema")                           # or path="/path/to/sd-vae-ft-ema"
    mean, std = vae.encode(images / 127.5 - 1)                # (N, 4, 32, 32) each
    x = sample_posterior(mean, std) * vae.scaling_factor      # the latent SiT denoises
    recon = vae.decode(x / vae.scaling_factor)                # (N, 3, 256, 256) in about [-1, 1]
"""
import math
import os
from typing import NamedTuple, Optional

import safetensors.torch
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from util import UserError, load_file


def _read_state_dict(path):
    if str(path).endswith(".safetensors"):
        return safetensors.torch.load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _hub_file(repo_id, filenames, alternative):
    """Path of the first of `filenames` in the HF hub repo (from the local cache when offline)."""
    failures = []
    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename)
        except OSError as e:  # hub errors (not found, offline, no connection) are all OSErrors
            failures.append(f"{filename}: {type(e).__name__}")
    raise UserError(
        f"Could not get the pretrained weights {repo_id} ({'; '.join(failures)}). This machine is "
        f"probably offline and the Hugging Face cache does not hold them. On a connected machine run "
        f"`hf download {repo_id}` (older huggingface_hub: `huggingface-cli download {repo_id}`), "
        f"copy its cache (~/.cache/huggingface/hub) here and set HF_HUB_CACHE to it; or {alternative}."
    )


# ----------------------------------------------------------------------------------------------
# The encoders REPA aligns with (REPA arXiv 2410.06940 section 4.1, Table 2; REG 2507.01467
# Table 3), their stand-ins, and several at once.

# The official `--enc-type` names of DINOv2; "-reg" selects the variant with 4 register tokens.
DINOV2_TIMM_NAMES = {
    f"dinov2-vit-{size}{reg}": f"vit_{timm_size}_patch14{'_reg4' if reg else ''}_dinov2.lvd142m"
    for size, timm_size in [("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")]
    for reg in ["", "-reg"]
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's own normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Family(NamedTuple):
    """How the official REPA/REG release feeds a family of encoders, and which tokens it takes.

    resize: the image goes to 224 * R / 256 pixels, bicubic (patch 14: an R/16 grid); otherwise
      the ViT reads it at its own size (patch 16: an R/16 grid too) and its position embedding is
      resampled to that grid instead. Either way R = 256 gives 16x16 tokens and R = 512 32x32.
    normalize_first: the release's order of normalize and resize (the same up to rounding).
    normed_patches: the aligned patch tokens are the final norm's output (else its input).
    mean_cls: the family has no class token; REG entangles the mean of its patch tokens.
    The class token is always the one after the final norm (what the family pools or projects).
    """
    mean: tuple
    std: tuple
    resize: bool
    normalize_first: bool
    normed_patches: bool
    mean_cls: bool = False


IMAGENET = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
FAMILIES = {  # each as the release's preprocess_raw_image (train.py) and load_encoders (utils.py) do it
    "dinov2": Family(*IMAGENET, resize=True, normalize_first=True, normed_patches=True),  # x_norm_patchtokens
    "dinov1": Family(*IMAGENET, resize=False, normalize_first=True, normed_patches=True),
    "clip": Family(CLIP_MEAN, CLIP_STD, resize=True, normalize_first=False, normed_patches=False),  # no ln_post
    "mae": Family(*IMAGENET, resize=False, normalize_first=True, normed_patches=False),  # blocks, no norm
    "mocov3": Family(*IMAGENET, resize=False, normalize_first=True, normed_patches=True),  # norm, then z[:, 1:]
    "jepa": Family(*IMAGENET, resize=True, normalize_first=True, normed_patches=True, mean_cls=True),
}


class Spec(NamedTuple):
    family: str
    arch: str            # timm architecture (create_model name)
    hub: Optional[str]   # HF hub repo of the weights in timm's layout; None: only the official file
    file: str            # the official file --enc-path may give instead (REPA reads it from ckpts/)
    arch_kwargs: dict = {}


ENCODERS = {
    **{name: Spec("dinov2", arch, "timm/" + arch,
                  f"torch.hub's dinov2_vit{name[11]}14{'_reg4' if 'reg' in name else ''}_pretrain.pth")
       for name, arch in DINOV2_TIMM_NAMES.items()},
    "dinov1-vit-b": Spec("dinov1", "vit_base_patch16_224.dino", "timm/vit_base_patch16_224.dino",
                         "dino_vitbase16_pretrain.pth of facebookresearch/dino (REPA: ckpts/dinov1_vitb.pth)"),
    # OpenAI's CLIP uses QuickGELU: timm's plain "vit_large_patch14_clip_224" would misread its weights.
    "clip-vit-L": Spec("clip", "vit_large_patch14_clip_quickgelu_224.openai", "timm/vit_large_patch14_clip_224.openai",
                       "model.safetensors of timm/vit_large_patch14_clip_224.openai (or open_clip's state dict)"),
    "mae-vit-l": Spec("mae", "vit_large_patch16_224.mae", "timm/vit_large_patch16_224.mae",
                      "mae_pretrain_vit_large.pth of facebookresearch/mae (REPA: ckpts/mae_vitl.pth)"),
    # MoCo v3's ViTs are timm's with 12 heads at every size; their weights exist only as the release's files.
    "mocov3-vit-s": Spec("mocov3", "vit_small_patch16_224", None,
                         "vit-s-300ep.pth.tar of facebookresearch/moco-v3 (REPA: ckpts/mocov3_vits.pth)",
                         dict(num_heads=12)),
    "mocov3-vit-b": Spec("mocov3", "vit_base_patch16_224", None,
                         "vit-b-300ep.pth.tar of facebookresearch/moco-v3 (REPA: ckpts/mocov3_vitb.pth)"),
    "jepa-vit-h": Spec("jepa", "vit_huge_patch14_gap_224.in1k_ijepa", None,
                       "IN1K-vit.h.14-300e.pth.tar of facebookresearch/ijepa (REPA: ckpts/ijepa_vith.pth)"),
}


class _FrozenViT(nn.Module):
    """A frozen timm ViT `self.vit` behind a family's input convention and token split."""

    def _setup(self, vit, input_size, family=FAMILIES["dinov2"]):
        self.vit = vit
        self.input_size = input_size  # side of the ViT's input; None = the images' own size
        self.family = family
        self.z_dim = vit.embed_dim  # the width of its tokens
        self.z_dims = [self.z_dim]  # one per encoder (Encoders has several)
        self.grid_size = vit.patch_embed.grid_size[0]  # T = grid_size ** 2 patch tokens
        self.register_buffer("mean", torch.tensor(family.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(family.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def preprocess(self, images):
        """uint8 (or float 0..255) (N, 3, R, R) -> normalized float (N, 3, S, S), as REPA's preprocess_raw_image."""
        x = images.float() / 255
        if self.family.normalize_first:
            x = (x - self.mean) / self.std
        if self.input_size is not None:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        if not self.family.normalize_first:
            x = (x - self.mean) / self.std
        return x

    @torch.no_grad()
    def forward(self, images):
        """uint8 images -> float32 (class token (N, D), patch tokens (N, T, D))."""
        x, vit = self.preprocess(images), self.vit
        if self.family.normed_patches:
            tokens = vit.forward_features(x)  # (N, prefix+T, D), final norm applied
        else:  # forward_features up to its final norm, which only the class token gets
            tokens = vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))))
        # timm orders the sequence [cls, registers..., patches]; registers are dropped.
        patches = tokens[:, vit.num_prefix_tokens:]  # (N, T, D)
        if self.family.mean_cls:
            cls = patches.mean(dim=1)  # (N, D)
        else:
            cls = (tokens if self.family.normed_patches else vit.norm(tokens[:, :1]))[:, 0]  # (N, D)
        return cls.float(), patches.float()


def _mocov3_to_timm(state):
    """MoCo v3's checkpoint -> a timm ViT's keys: its base encoder without the `module.base_encoder.`
    prefix and without the head, as REPA's fix_mocov3_state_dict (the momentum encoder and the
    predictor are dropped)."""
    prefix = "module.base_encoder."
    return {k[len(prefix):]: v for k, v in state.get("state_dict", state).items()
            if k.startswith(prefix) and not k.startswith(prefix + "head.")}


class PretrainedViT(_FrozenViT):
    """A frozen encoder of an official `--enc-type` name (ENCODERS): timm's network, the family's
    preprocessing and its (class token (N, D), patch tokens (N, T, D)), T = (R / 16)^2.

    Networks that read 224 * R / 256 pixels and those that read R have their position embedding
    resampled once, at load time, to the R/16 grid, as REPA does with timm's resample_abs_pos_embed.
    `weights`: "pretrained" (HF hub cache), a local file (timm's layout or the official file), or
    None (random; tests only). Extra keyword arguments go to timm.create_model (e.g. depth=1).
    """

    def __init__(self, name, resolution=256, weights="pretrained", **timm_kwargs):
        super().__init__()
        if name not in ENCODERS:
            raise UserError(f"Unknown encoder {name!r}; choose one of {sorted(ENCODERS)}, stand-in or builtin-vit.")
        if resolution % 16:
            raise UserError(f"resolution must be a multiple of 16 (got {resolution}) so that "
                            f"224 * resolution / 256 is a whole number of 14-pixel patches.")
        spec = ENCODERS[name]
        family = FAMILIES[spec.family]
        if weights == "pretrained" and spec.hub is None:
            raise UserError(f"{name} has no weights on the Hugging Face hub: download {spec.file} and "
                            f"pass its path with --enc-path")
        if weights == "pretrained":
            weights = _hub_file(spec.hub, ["model.safetensors", "pytorch_model.bin"],
                                f"pass {spec.file} with --enc-path")
        elif weights is not None and not os.path.isfile(weights):
            raise UserError(f"--enc-path {weights}: no such file; download {spec.file} for {name} and give its path")
        input_size = 224 * resolution // 256 if family.resize else resolution
        vit = timm.create_model(spec.arch, pretrained=False, img_size=input_size, num_classes=0,
                                **{**spec.arch_kwargs, **timm_kwargs})
        if weights is not None:
            self._load(vit, weights, name, spec)
        self._setup(vit, input_size if family.resize else None, family)

    @staticmethod
    def _load(vit, path, name, spec):
        try:
            state = _read_state_dict(path)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError (zip) or others for a non-weights file
            raise UserError(f"--enc-path {path} is not a weights file torch can read safely ({type(e).__name__}); "
                            f"give {spec.file} for {name}") from e
        if spec.family == "mocov3":
            state = _mocov3_to_timm(state)
        # timm's filter converts the official layouts (torch.hub DINOv2, OpenAI/open_clip CLIP,
        # MAE's {"model"}, I-JEPA's {"encoder"}) and resamples pos_embed to the model's grid
        # (bicubic, antialiased, as REPA's resample_abs_pos_embed). Heads (CLIP's projection) go.
        state = {k: v for k, v in checkpoint_filter_fn(state, vit).items() if not k.startswith("head.")}
        try:
            vit.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip()[:200] if "\n" in str(e) else str(e)[:200]
            raise UserError(f"--enc-path {path} does not fit {name} ({first}); give {spec.file}") from e


class StandInEncoder(_FrozenViT):
    """A small, randomly initialised, frozen ViT of the DINOv2 design (class token, final norm).

    Honest caveat: random frozen features carry image statistics, not semantics. This encoder
    only exists so that the offline built-in run exercises the same REG code path (class token,
    projection loss) without pretrained weights; its results say nothing about REG's benefit.
    It reads images at their own size (no resize); T = (resolution / patch_size)^2. Weights
    are drawn from a private RNG seeded with `seed`, so every machine and rank gets the same net.
    """

    def __init__(self, resolution=256, patch_size=16, z_dim=384, depth=4, num_heads=6, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
            torch.manual_seed(seed)
            vit = VisionTransformer(img_size=resolution, patch_size=patch_size, embed_dim=z_dim,
                                    depth=depth, num_heads=num_heads, num_classes=0)
        self._setup(vit, input_size=None)


class ConvStem(PatchEmbed):
    """timm's PatchEmbed with its one strided convolution replaced by log2(patch_size) 3x3 convolutions
    of stride 2 (the convolutional stem of Xiao et al., arXiv 2106.14881): same tokens (N, T, D),
    but a ViT trained on a few thousand small images learns shapes from it several times faster."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        d, levels = kwargs["embed_dim"], int(math.log2(kwargs["patch_size"]))
        widths = [kwargs.get("in_chans", 3)] + [d // 2 ** (levels - 1 - i) for i in range(levels)]
        layers = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1)] + ([nn.GELU()] if i < levels - 1 else [])
        self.proj = nn.Sequential(*layers)  # (N, 3, R, R) -> (N, D, R / p, R / p)


class BuiltinViT(_FrozenViT):
    """A small ViT of the DINOv2 design (class token, final norm), pretrained on the built-in images
    by `python toy.py encoder` (toy.py says with which objective, and why): the teacher of the lab
    labs/reg_vs_repa.py. Reads images at their own size; T = (resolution / patch_size)^2.
    Its patch embedding is a small convolutional stem (ConvStem) instead of DINOv2's single
    convolution: with 5,000 images and 2 CPU minutes, a plain ViT learns too little.
    Built randomly here (toy.py trains it); `BuiltinViT.load(path)` reads a trained one.
    """

    def __init__(self, resolution=32, patch_size=8, z_dim=128, depth=3, num_heads=2):
        super().__init__()
        self.config = dict(resolution=resolution, patch_size=patch_size, z_dim=z_dim, depth=depth, num_heads=num_heads)
        if patch_size & (patch_size - 1):
            raise UserError(f"the builtin-vit patch size must be a power of two (got {patch_size})")
        vit = VisionTransformer(img_size=resolution, patch_size=patch_size, embed_dim=z_dim, depth=depth,
                                num_heads=num_heads, num_classes=0, embed_layer=ConvStem)
        self._setup(vit, input_size=None)

    @classmethod
    def load(cls, path, resolution):
        given = path not in (None, "pretrained")
        how = (f"make it with: python toy.py encoder --out {path}" if given else
               "make one with: python toy.py encoder (it writes runs/toy/encoder-p8.pt), and pass that file")
        if not given or not os.path.isfile(path):
            raise UserError(f"the builtin-vit encoder needs the file that toy.py writes (--enc-path): "
                            f"{'no file at ' + str(path) if given else 'none given'}; {how}")
        state = load_file(path, "a builtin-vit encoder file", how)  # as checkpoints: corrupt or code, one line
        if state.get("kind") != "builtin-vit":
            raise UserError(f"{path} is not a builtin-vit encoder file; {how}")
        if state["config"]["resolution"] != resolution:
            raise UserError(f"{path} was pretrained on {state['config']['resolution']}-pixel images and the data "
                            f"has {resolution}; pretrain one at that size with toy.train_encoder(path, resolution={resolution})")
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the caller's RNG alone
            net = cls(**state["config"])
        net.vit.load_state_dict(state["state_dict"])
        return net


class Encoders(nn.Module):
    """Several frozen encoders at once, REPA's comma-separated `--enc-type a,b`: the SiT gets one
    projector per encoder and the alignment loss is the mean of theirs (REPA arXiv 2410.06940,
    section 4.1). REG's class token is the first encoder's: the list's order matters.
    forward: images -> ([class token (N, D_k)], [patch tokens (N, T, D_k)]), one of each per encoder.
    """

    def __init__(self, encoders):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.z_dims = [e.z_dim for e in encoders]
        self.z_dim = self.z_dims[0]  # the width of the class token REG entangles

    def forward(self, images):
        outputs = [e(images) for e in self.encoders]
        return [cls for cls, _ in outputs], [patches for _, patches in outputs]


def load_encoder(name, resolution, weights="pretrained", **kwargs):
    """The frozen encoder of an official `--enc-type` name (PretrainedViT), StandInEncoder for
    "stand-in", or the trained BuiltinViT of toy.py for "builtin-vit" (weights: its file).
    A comma-separated list of names gives Encoders, with comma-separated weights (an empty entry,
    or weights "pretrained" or None for all: the default of each)."""
    names = name.split(",")
    if len(names) > 1:
        paths = weights.split(",") if weights not in ("pretrained", None) else [weights] * len(names)
        if len(paths) != len(names):
            raise UserError(f"--enc-path {weights} gives {len(paths)} files for the {len(names)} encoders of "
                            f"{name}; give one per encoder, comma-separated (empty for the hub's weights)")
        return Encoders([load_encoder(n, resolution, "pretrained" if p == "" else p, **kwargs)
                         for n, p in zip(names, paths)])
    if name == "builtin-vit":
        return BuiltinViT.load(weights, resolution)
    if name == "stand-in":
        if weights not in ("pretrained", None):
            raise UserError("The stand-in encoder is random by design and loads no weights; "
                            "drop --enc-path or choose a pretrained encoder.")
        return StandInEncoder(resolution, **kwargs)
    return PretrainedViT(name, resolution, weights, **kwargs)


# ----------------------------------------------------------------------------------------------
# SD-VAE. Module and parameter names follow diffusers' AutoencoderKL exactly (state-dict keys
# such as encoder.down_blocks.0.resnets.1.conv2.weight), which is the layout the
# stabilityai/sd-vae-ft-* files use.

class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # A 1x1 conv on the skip path only where the width changes (no parameter otherwise).
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # "to_out.0": diffusers' index 1 is a dropout

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, H*W, C)
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))  # scale 1/sqrt(C)
        h = self.to_out[0](h).transpose(1, 2).reshape(N, C, H, W)
        return x + h


class MidBlock(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([Attention(c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        # Asymmetric padding (right and bottom only), as the original LDM/diffusers VAE does.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, c_in, c_out, num_resnets, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(num_resnets)])
        self.downsamplers = nn.ModuleList([Downsample(c_out)] if downsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, c_in, c_out, num_resnets, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(num_resnets)])
        self.upsamplers = nn.ModuleList([Upsample(c_out)] if upsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """(N, 3, H, W) -> (N, 2*z, H/f, W/f), f = 2^(levels-1): mean and log-variance channels."""

    def __init__(self, in_channels, widths, num_res_blocks, z_channels, groups):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        last = len(widths) - 1
        self.down_blocks = nn.ModuleList(
            [DownBlock(widths[max(i - 1, 0)], w, num_res_blocks, groups, downsample=i < last)
             for i, w in enumerate(widths)])
        self.mid_block = MidBlock(widths[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * z_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(N, z, h, w) -> (N, 3, h*f, w*f). Mirrors the encoder with one extra resnet per level."""

    def __init__(self, out_channels, widths, num_res_blocks, z_channels, groups):
        super().__init__()
        widths = widths[::-1]  # deepest level first
        self.conv_in = nn.Conv2d(z_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups)
        last = len(widths) - 1
        self.up_blocks = nn.ModuleList(
            [UpBlock(widths[max(i - 1, 0)], w, num_res_blocks + 1, groups, upsample=i < last)
             for i, w in enumerate(widths)])
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# Names of the mid-block attention weights in diffusers before 0.14 (and in the
# stabilityai/sd-vae-ft-* files); very old files store them as 1x1 convs (C, C, 1, 1).
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy_attention(state_dict):
    renamed = {}
    for key, value in state_dict.items():
        prefix, _, rest = key.rpartition(".attentions.0.")
        name, _, kind = rest.rpartition(".")
        if prefix and name in _LEGACY_ATTENTION_NAMES:
            key = f"{prefix}.attentions.0.{_LEGACY_ATTENTION_NAMES[name]}.{kind}"
            if value.ndim == 4:
                value = value[:, :, 0, 0]  # (C, C, 1, 1) conv -> (C, C) linear
        renamed[key] = value
    return renamed


class AutoencoderKL(nn.Module):
    """Stable Diffusion's KL autoencoder (the SD config by default), frozen.

    encode: image in [-1, 1] (N, 3, H, W) -> posterior (mean, std), each (N, 4, H/8, W/8).
    decode: unscaled latent (N, 4, h, w) -> image in about [-1, 1] (N, 3, 8h, 8w).
    Latents fed to SiT are posterior samples times `scaling_factor` (the SD-VAE's scaling factor, LDM arXiv 2112.10752).
    """
    scaling_factor = 0.18215

    def __init__(self, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4,
                 groups=32, in_channels=3):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.latent_channels = latent_channels
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(in_channels, widths, num_res_blocks, latent_channels, groups)
        self.decoder = Decoder(in_channels, widths, num_res_blocks, latent_channels, groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.requires_grad_(False).eval()

    def load_state_dict(self, state_dict, strict=True, assign=False):
        # Accept the old attention names too; strict loading reports any other mismatch.
        return super().load_state_dict(_rename_legacy_attention(state_dict), strict, assign)

    @torch.no_grad()
    def encode(self, x):
        moments = self.quant_conv(self.encoder(x))  # (N, 2*C, h, w)
        mean, logvar = moments.chunk(2, dim=1)
        # diffusers' DiagonalGaussianDistribution clamps the log-variance before exp.
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    @torch.no_grad()
    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


class PixelSpace(nn.Module):
    """A stand-in "VAE" for the offline built-in run: the latent is the image itself.

    Same interface as AutoencoderKL: encode returns (x, 0) so a posterior sample is x exactly.
    """
    scaling_factor = 1.0
    latent_channels = 3
    downsample = 1

    def encode(self, x):
        return x, torch.zeros_like(x)

    def decode(self, z):
        return z


def sample_posterior(mean, std, generator=None):
    """One latent sample mean + std * eps (unscaled; the caller multiplies by scaling_factor)."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * eps


VAE_WEIGHT_FILES = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]


def _local_vae_file(path):
    if os.path.isfile(path):
        return path
    # A VAE repo directory, or a whole SD pipeline directory with the VAE in vae/.
    for folder in [path, os.path.join(path, "vae")]:
        for filename in VAE_WEIGHT_FILES:
            if os.path.isfile(os.path.join(folder, filename)):
                return os.path.join(folder, filename)
    raise UserError(
        f"No VAE weights at {path!r}: expected a weights file or a directory holding one of "
        f"{VAE_WEIGHT_FILES} (e.g. a download of stabilityai/sd-vae-ft-ema).")


def load_vae(name="sd-vae-ft-ema", path=None):
    """The frozen SD-VAE `name` (sd-vae-ft-ema or sd-vae-ft-mse), or PixelSpace for "pixels".

    Weights come from `path` (a file or directory) if given, else from the HF hub cache.
    """
    if name == "pixels":
        return PixelSpace()
    if name not in ("sd-vae-ft-ema", "sd-vae-ft-mse"):
        raise UserError(f"Unknown VAE {name!r}; choose sd-vae-ft-ema, sd-vae-ft-mse or pixels.")
    if path is not None:
        file = _local_vae_file(path)
    else:
        file = _hub_file("stabilityai/" + name, VAE_WEIGHT_FILES,
                         "pass a local directory or weights file with --vae-path")
    vae = AutoencoderKL()
    vae.load_state_dict(_read_state_dict(file))
    return vae
