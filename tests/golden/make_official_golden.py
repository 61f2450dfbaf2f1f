"""Writes tests/golden/official_tiny.pt: a seeded tiny SiT of the official REG release and its outputs.

The official model file (models/sit.py of github.com/Martinser/REG) is imported from the path
given on the command line; it is never copied into this repository. The golden file holds the
official state dict, fixed inputs (x, t, y, class token) and the official outputs: velocity,
projector output and class-token velocity. tests/test_model.py loads the state dict into
model.SiT through model.load_weights and compares. Run once, from the repository root:

    git --git-dir=<REG clone>/.git show HEAD:models/sit.py > /tmp/reg_official/sit.py
    python tests/golden/make_official_golden.py /tmp/reg_official/sit.py

Needs timm (the official file builds on its PatchEmbed, Attention and Mlp). The stored file was
made from the release at commit 021ea2e50c38c5803bd9afff16316958a01fbd1d with timm 1.0.31.
"""
import importlib.util
import os
import sys

import torch

# Tiny, in the official constructor's terms. decoder_hidden_size must equal hidden_size: the
# official S configs leave it at its default 768 for a width of 384, which cannot run, so no
# official named config is used. qk_norm is a required key of the official blocks.
OFFICIAL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, decoder_hidden_size=32,
                depth=3, num_heads=2, num_classes=10, encoder_depth=2, z_dims=[24], projector_dim=40,
                class_dropout_prob=0.1, qk_norm=False)
# The same network in model.SiT's terms.
OURS = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
            num_classes=10, encoder_depth=2, z_dim=24, projector_dim=40, class_dropout_prob=0.1)


def main(sit_path):
    spec = importlib.util.spec_from_file_location("official_sit", sit_path)
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)

    torch.manual_seed(0)
    model = official.SiT(**OFFICIAL).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # The official init zeroes the adaLN and output layers (a fresh model outputs zeros);
        # noise on every trained parameter makes each layer count. pos_embed is fixed: kept.
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    n = 3
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.tensor([0.05, 0.5, 0.93])
    y = torch.tensor([3, 7, 10])  # 10 = num_classes: the null label of guidance
    cls = torch.randn(n, 24, generator=g)
    with torch.no_grad():
        v, zs, v_cls = model(x, t, y, cls_token=cls)  # eval mode: no label dropout
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = {"config": OURS, "state_dict": state, "x": x, "t": t, "y": y, "cls": cls,
           "v": v.clone(), "zs": zs[0].clone(), "v_cls": v_cls.clone()}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_tiny.pt")
    torch.save(out, path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {sum(p.numel() for p in state.values())} values); "
          f"v {tuple(v.shape)} std {v.std():.3f}, zs {tuple(zs[0].shape)} std {zs[0].std():.3f}, "
          f"v_cls {tuple(v_cls.shape)} std {v_cls.std():.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} /path/to/official/models/sit.py")
    main(sys.argv[1])
