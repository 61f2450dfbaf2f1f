"""SiT with REG's entangled class token and REPA's projector (REG arXiv 2507.01467; REPA 2410.06940; SiT 2401.08740).

One class, `SiT`, covers the three models of the REG paper:
  plain SiT   SiT(..., cls_token=False, projector=False)
  SiT + REPA  SiT(..., cls_token=False)                  a projector on block `encoder_depth`
  SiT + REG   SiT(...)                                   + the DINOv2 class token at index 0
  several encoders at once: SiT(..., z_dim=[768, 1024])  one projector per encoder (REPA's `projectors.{i}`)

Checkpoint compatibility: parameter and buffer names here *are* the official release's names
(`x_embedder.proj`, `blocks.{i}.attn.qkv`, `cls_projectors2`, `wg_norm`, `final_layer.linear_cls`,
...), so the `ema` dict of an official REG checkpoint loads with a plain `load_state_dict`; no
conversion function is needed. `load_weights` below only picks the right dict out of the file.

Usage:
    model = SiT_models['SiT-XL/2'](input_size=32)
    v, v_cls, zs = model(x, t, y, cls)   # (N, C, H, W), (N, 768), (N, 1+T, 768)
"""
import argparse
import math
import os
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from util import UserError, load_file


def modulate(x, shift, scale):
    # x: (N, L, D); shift, scale: (N, D), broadcast over the L tokens.
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (N, D). Sinusoidal features laid out [cos, sin], then an MLP.

    SiT feeds t as is (no x1000 as in DiT's integer timesteps); the official layout is
    [cos, sin] (not [sin, cos]), which matters when loading released weights.
    """

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def sinusoidal(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (N, dim/2)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)

    def forward(self, t):
        features = self.sinusoidal(t, self.frequency_embedding_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> (N, D). Row `num_classes` is the null label of classifier-free guidance.

    Label dropout (probability `dropout_prob`) happens here and only here, in training mode:
    the official code's "legacy" flag dropped labels a second time in the training loop.
    """

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        # The fused qkv output is laid out (3, heads, head_dim), as in the official (timm) layer.
        qkv = rearrange(self.qkv(x), "n l (k h d) -> k n h l d", k=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, heads, L, head_dim)
        return self.proj(rearrange(x, "n h l d -> n l (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on c = t_emb + y_emb."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then one Linear for the patches and one for the class token."""

    def __init__(self, hidden_size, patch_size, out_channels, z_dim=None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.linear_cls = nn.Linear(hidden_size, z_dim) if z_dim else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)  # (N, L, D)
        if self.linear_cls is None:
            return self.linear(x), None
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])  # (N, T, p*p*C), (N, z_dim)


def build_projector(hidden_size, projector_dim, z_dim):
    """REPA's projector: a 3-layer MLP from the SiT width to the encoder width."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2-D sin-cos position table (grid_size**2, dim), row-major over (h, w).

    The MAE recipe: the first dim/2 channels encode the column (w) coordinate and the last
    dim/2 the row (h); each half is [sin(pos * omega), cos(pos * omega)], omega_k = 10000^(-k/(dim/4)).
    Computed in float64 like the official numpy code, then rounded to float32.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    h, w = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                          torch.arange(grid_size, dtype=torch.float64), indexing="ij")

    def encode(pos):  # (grid, grid) -> (grid*grid, dim/2)
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([encode(w), encode(h)], dim=1).float()  # (grid*grid, dim)


CAR_VARIANTS = ("none", "source", "target", "joint")  # which maps CAR-Flow learns (arXiv 2509.19300)
SLOTS = ("input", "learned", "latent-mean")  # what fills REG's token slot (REG arXiv 2507.01467, Table 5)


class ShiftNet(nn.Module):
    """Class -> an additive shift of the latent's shape, for CAR-Flow (arXiv 2509.19300).

    A class embedding, a Linear to a (width, H/4, W/4) map, then 3x3 convs: one at H/4, one after
    each of two nearest-neighbour x2 upsamplings (width/2, width/4 channels), one to C channels.
    The paper's ImageNet maps are "lightweight convolutional networks" of about 2.3M parameters
    each; these sizes give 2.35M for 1000 classes and a 4x32x32 latent, most of them in the
    embedding and the Linear, which cost little compute. The output conv is zero-initialised: a
    fresh map is the identity (shift 0), so training starts exactly as without CAR-Flow.
    """

    def __init__(self, num_classes, channels, size, embed_dim=448, width=64):
        super().__init__()
        if size % 4:
            raise ValueError(f"CAR-Flow's shift maps need a latent side divisible by 4, got {size}")
        self.num_classes, self.width, self.base = num_classes, width, size // 4
        self.embedding = nn.Embedding(num_classes, embed_dim)  # real classes only: shifts never see the null label
        self.linear = nn.Linear(embed_dim, width * self.base ** 2)
        self.head = nn.Sequential(
            nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(width, width // 2, 3, padding=1), nn.SiLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(width // 2, width // 4, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width // 4, channels, 3, padding=1),
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, y):
        # A batch with more labels than there are classes (the built-in data) maps every class once.
        classes = torch.arange(self.num_classes, device=y.device) if len(y) > self.num_classes else y
        h = self.linear(self.embedding(classes)).view(-1, self.width, self.base, self.base)  # (n, width, H/4, W/4)
        mu = self.head(h).float()  # (n, C, H, W); fp32 even under autocast, like the latents it shifts
        return mu[y] if classes is not y else mu


class ModelOutput(NamedTuple):
    v: torch.Tensor                  # (N, C, H, W) latent velocity
    v_cls: Optional[torch.Tensor]    # (N, z_dim) class-token velocity, None without the token
    zs: Optional[torch.Tensor]       # (N, 1+T, z_dim) projector outputs, None when not computed; a tuple
                                     # of one per projector when there are several


class SiT(nn.Module):
    """Scalable interpolant transformer with REG's entangled class token.

    input_size: latent side (32 for 256x256 images with the SD-VAE); in_channels: C.
    cls_token: prepend the (noised) DINOv2 class token and predict its velocity (REG).
    projector: REPA's projector on the output of block `encoder_depth` (1-indexed).
    z_dim: width of the encoder tokens (768 for DINOv2-B), used by both REG heads; or a list, one
    width per encoder aligned at once: a projector each, and the class token has the first's width.
    slot: what sits in the token slot when cls_token is set (SLOTS; the module docstring). Only
    "input" takes a token and predicts its velocity; the other two make cls_token False from the
    outside (no cls argument, v_cls None) and keep the slot inside.
    car: CAR-Flow's learned class shifts (arXiv 2509.19300), not part of the velocity network:
    "source" a map mu0(y) of the noise, "target" a map mu1(y) of the data, "joint" both, "none"
    neither (the parameters and names of the official release). flow.py applies them.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 encoder_depth=8, z_dim=768, projector_dim=2048, cls_token=True, projector=True,
                 car="none", slot="input"):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if projector and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, {depth}], got {encoder_depth}")
        if car not in CAR_VARIANTS:
            raise ValueError(f"unknown CAR-Flow variant {car!r}; choose one of {CAR_VARIANTS}")
        if slot not in SLOTS:
            raise ValueError(f"unknown token slot {slot!r}; choose one of {SLOTS}")
        self.in_channels = in_channels
        z_dims = list(z_dim) if isinstance(z_dim, (list, tuple)) else [z_dim]
        self.z_dim = z_dims[0]  # width of the encoder tokens: the class token's and the (first) projector's
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.slot = slot if cls_token else None  # what fills index 0 (None: no slot)
        self.cls_token = cls_token and slot == "input"  # takes a noisy token and predicts its velocity
        self.grid_size = input_size // patch_size
        num_extra = 1 if cls_token else 0

        self.x_embedder = nn.Module()  # named like timm's PatchEmbed so `x_embedder.proj` matches
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if self.cls_token:
            self.cls_projectors2 = nn.Linear(self.z_dim, hidden_size)
            self.wg_norm = nn.LayerNorm(hidden_size, eps=1e-6)  # with affine weights, unlike the blocks
        # Not trained; a buffer (saved under the official key) rather than a frozen Parameter, so
        # optimizers and DDP never see it. The class-token row is zero: that token has no position.
        pos = sincos_pos_embed_2d(hidden_size, self.grid_size)
        pos = torch.cat([torch.zeros(num_extra, hidden_size), pos])[None]  # (1, extra+T, D)
        self.register_buffer("pos_embed", pos)

        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        if projector:
            self.projectors = nn.ModuleList([build_projector(hidden_size, projector_dim, d) for d in z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, self.z_dim if self.cls_token else None)
        self.initialize_weights()
        if self.slot == "learned":  # after the SiT's weights: their initial values stay those of slot="input"
            with torch.random.fork_rng(devices=[]):
                self.learned_token = nn.Parameter(0.02 * torch.randn(1, 1, hidden_size))  # (1, 1, D)
        # CAR-Flow's maps come last and draw their initial weights from a forked RNG, so the SiT's
        # weights and every later random draw are those of car="none" with the same seed.
        self.car = car
        with torch.random.fork_rng(devices=[]):
            if car in ("source", "joint"):
                self.source_shift = ShiftNet(num_classes, in_channels, input_size)  # mu0: noise -> noise + mu0(y)
            if car in ("target", "joint"):
                self.target_shift = ShiftNet(num_classes, in_channels, input_size)  # mu1: data -> data + mu1(y)

    def initialize_weights(self):
        def xavier(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(xavier)
        # The patch embedding is a Linear on flattened patches, so initialise it like one.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: zero gates make every block start as the identity, and zero output layers
        # make a fresh model predict exactly zero velocity for both the latent and the token.
        zeroed = [block.adaLN_modulation[-1] for block in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.cls_token:
            zeroed.append(self.final_layer.linear_cls)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        # (N, T, p*p*C) -> (N, C, H, W); tokens are row-major over the (h, w) patch grid.
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)",
                         h=self.grid_size, p=self.patch_size, q=self.patch_size)

    def shifts(self, y):
        """CAR-Flow's (mu0, mu1) for the labels y (N,): each (N, C, H, W) float32, or None for a map
        this model does not learn. Always the true labels, also where the velocity network sees
        the null label (label dropout, the unconditional half of guidance): flow.py says why."""
        mu0 = self.source_shift(y) if hasattr(self, "source_shift") else None
        mu1 = self.target_shift(y) if hasattr(self, "target_shift") else None
        return mu0, mu1

    def forward(self, x, t, y, cls=None, return_zs=None):
        """x: (N, C, H, W) noisy latent; t: (N,) time in [0, 1]; y: (N,) labels (num_classes = null);
        cls: (N, z_dim) noisy class token, required iff the model has one.
        return_zs: run the projector (a training-only head); by default only in training mode.
        """
        if (cls is None) == self.cls_token:
            raise ValueError("pass cls= exactly when the model was built with cls_token=True")
        if return_zs is None:
            return_zs = self.training
        h = rearrange(self.x_embedder.proj(x), "n d h w -> n (h w) d")  # (N, T, D)
        if self.cls_token:
            token = self.wg_norm(self.cls_projectors2(cls)).unsqueeze(1)  # (N, 1, D)
        elif self.slot == "learned":
            token = self.learned_token.expand(len(h), -1, -1)  # (N, 1, D)
        elif self.slot == "latent-mean":
            token = h.mean(dim=1, keepdim=True)  # (N, 1, D): the mean of x_t's patch embeddings
        if self.slot is not None:
            h = torch.cat([token, h], dim=1)  # (N, 1+T, D)
        h = h + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)

        zs = None
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c)
            if i == self.encoder_depth and return_zs and hasattr(self, "projectors"):
                # Each (N, 1+T, z_dim_k): all tokens, the class slot included; one projector per encoder.
                zs = tuple(projector(h) for projector in self.projectors)
                zs = zs[0] if len(zs) == 1 else zs
        if self.slot is not None and not self.cls_token:
            # A slot without a teacher token: nothing to align it with, nothing to predict for it.
            if zs is not None:  # (N, T, z_dim_k) each
                zs = tuple(z[:, 1:] for z in zs) if isinstance(zs, tuple) else zs[:, 1:]
            h = h[:, 1:]  # (N, T, D)
        patches, v_cls = self.final_layer(h, c)
        return ModelOutput(self.unpatchify(patches), v_cls, zs)


# Sizes. S is not reported by REG; encoder_depth 4 is our choice (REG arXiv 2507.01467 does not report it).
# The official S configs are broken (a head-width mismatch); these are not. T (tiny) is ours:
# it makes the built-in offline run train in minutes on a laptop CPU.
SIZES = {
    "T": dict(depth=6, hidden_size=192, num_heads=3, encoder_depth=2, projector_dim=768),
    "S": dict(depth=12, hidden_size=384, num_heads=6, encoder_depth=4),
    "B": dict(depth=12, hidden_size=768, num_heads=12, encoder_depth=4),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, encoder_depth=8),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16, encoder_depth=8),
}


def _constructor(size, patch_size):
    def build(**kwargs):
        return SiT(**{**SIZES[size], "patch_size": patch_size, **kwargs})
    build.__name__ = f"SiT_{size}_{patch_size}"
    return build


SiT_models = {f"SiT-{size}/{p}": _constructor(size, p) for size in SIZES for p in (2, 4, 8)}


def read_checkpoint(path):
    """A checkpoint file written by train.py or by the official release, as a dict.

    Both hold `model`, `ema`, `opt`, `args`, `steps`; `args` is an argparse Namespace, which
    `weights_only` loading (no arbitrary code from the file) must be told is safe.
    """
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; give the path of a .pt file written by "
                        "train.py (runs/<exp>/checkpoints/) or an official REG checkpoint")
    torch.serialization.add_safe_globals([argparse.Namespace])
    return load_file(path, "a checkpoint written by train.py (or the official release)",
                     "give the path of such a .pt file")


def load_weights(ckpt, prefer_ema=True):
    """The model state dict of a checkpoint (a file's path, or what read_checkpoint returned): its
    EMA weights by default (used for sampling)."""
    ckpt = read_checkpoint(ckpt) if isinstance(ckpt, (str, os.PathLike)) else ckpt
    state = next((ckpt[k] for k in (("ema", "model") if prefer_ema else ("model", "ema")) if k in ckpt), ckpt)
    # Weights saved from a DDP-wrapped or torch.compile'd model carry these prefixes.
    for prefix in ("module.", "_orig_mod."):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state
