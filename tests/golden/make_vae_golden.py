"""Writes tests/golden/vae_tiny.pt: a seeded tiny diffusers AutoencoderKL and its outputs.

The file holds the state dict (diffusers' names), a fixed input image batch, the posterior
mean and std of its encoding and the decoding of a fixed latent, all computed by diffusers.
tests/test_encoder.py loads the weights into encoder.AutoencoderKL and compares; CI needs no
diffusers. Run once, from the repository root, with diffusers importable, e.g.

    pip install --target /tmp/diffusers_site diffusers
    PYTHONPATH=/tmp/diffusers_site python tests/golden/make_vae_golden.py

The stored file was made with diffusers 0.42.1 (its version is also stored in the file).
"""
import os

import diffusers
import torch
from diffusers import AutoencoderKL

# The SD-VAE's block structure (DownEncoderBlock2D / UpDecoderBlock2D, mid-block attention,
# quant and post-quant convs) at a width that keeps the file small. Three levels, so the
# file covers two downsamplers and two upsamplers, one level that keeps its width and one that
# changes it (a conv_shortcut). Our equivalent: AutoencoderKL(ch=8, ch_mult=(1, 2, 2),
# num_res_blocks=1, groups=4).
CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
              block_out_channels=(8, 16, 16), norm_num_groups=4,
              down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
OURS = dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, groups=4)


def main():
    torch.manual_seed(0)
    vae = AutoencoderKL(**CONFIG).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # Default init leaves every norm at (1, 0) and every bias at 0; move them so that the
        # affine parts of the norms and the biases count in the outputs.
        for name, p in vae.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    # An asymmetric input (a ramp plus noise): a flipped or shifted output cannot match.
    ramp = torch.linspace(-1, 1, 32)
    x = (0.5 * ramp[None, None, :, None] * ramp[None, None, None, :]
         + 0.3 * torch.randn(2, 3, 32, 32, generator=g)).clamp(-1, 1)  # (2, 3, 32, 32)
    z = torch.randn(2, 4, 8, 8, generator=g)  # an unscaled latent, as decode takes it
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        decoded = vae.decode(z).sample
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    out = {"diffusers_version": diffusers.__version__, "config": OURS, "state_dict": state,
           "x": x, "mean": posterior.mean.clone(), "std": posterior.std.clone(), "z": z,
           "decoded": decoded.clone()}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vae_tiny.pt")
    torch.save(out, path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {sum(v.numel() for v in state.values())} "
          f"parameters, diffusers {diffusers.__version__}); mean std {posterior.mean.std():.3f}, "
          f"std range [{posterior.std.min():.3f}, {posterior.std.max():.3f}], decoded std {decoded.std():.3f}")


if __name__ == "__main__":
    main()
