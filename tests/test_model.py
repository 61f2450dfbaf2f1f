"""Specification tests for model.py: SiT + REPA projector + REG class token (REG arXiv 2507.01467; REPA 2410.06940).

Every expectation is computed independently of model.py (loops, numpy, hand-written layers) so
that a deviation from the reference, and so from the official release's numbers, fails a test.
Small configs keep the file fast on CPU; real sizes are checked on the meta device.

    python3 -m pytest -q tests/test_model.py
"""
import argparse
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from model import SiT, SiT_models, SiTBlock, FinalLayer, load_weights, read_checkpoint
from util import UserError

C, Z = 4, 32  # latent channels, encoder token width of the tiny configs


def tiny(**kwargs):
    """A small REG model: 8x8 latent, patch 2 (T = 16), width 64, 3 blocks, projector on block 2."""
    config = dict(input_size=8, patch_size=2, in_channels=C, hidden_size=64, depth=3, num_heads=4,
                  num_classes=10, encoder_depth=2, z_dim=Z, projector_dim=48)
    return SiT(**{**config, **kwargs})


def perturb(model, seed=0, std=0.05):
    """Add noise to every parameter so that zero-initialized layers stop hiding the math."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def inputs(n=3, input_size=8, num_classes=10, z_dim=Z, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, input_size, input_size, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    cls = torch.randn(n, z_dim, generator=g)
    return x, t, y, cls


def layer_norm(x, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, like nn.LayerNorm
    return (x - mean) / torch.sqrt(var + eps)


def silu(x):
    return x / (1 + torch.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def linear(x, layer):
    return x @ layer.weight.T + layer.bias


def capture(module, store, key, output=True):
    """Forward hook storing a module's output (or first input) under store[key]."""
    if output:
        return module.register_forward_hook(lambda m, args, out: store.__setitem__(key, out))
    return module.register_forward_pre_hook(lambda m, args: store.__setitem__(key, args))


# ---------------------------------------------------------------- initialization


@pytest.mark.parametrize("kind", ["reg", "repa", "sit"])
def test_fresh_model_predicts_exactly_zero_velocity(kind):
    model = tiny(cls_token=kind == "reg", projector=kind != "sit").eval()
    x, t, y, cls = inputs()
    v, v_cls, _ = model(x, t, y, cls if kind == "reg" else None)
    assert v.shape == x.shape and torch.equal(v, torch.zeros_like(x))
    if kind == "reg":
        assert v_cls.shape == cls.shape and torch.equal(v_cls, torch.zeros_like(cls))
    else:
        assert v_cls is None
    # The zero output layer alone forces zero velocity; adaLN-Zero also needs zero block gates.
    # With the final layer made non-zero, the output must be that layer applied to the blocks'
    # input: every fresh block is the identity.
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[-1].bias) == 0
    perturb(model.final_layer)
    seen = {}
    capture(model.blocks[0], seen, "in", output=False)  # (h, c): the embedded sequence, the condition
    v, v_cls, _ = model(x, t, y, cls if kind == "reg" else None)
    patches, expected_cls = model.final_layer(*seen["in"])
    assert torch.count_nonzero(v) > 0 and torch.equal(v, model.unpatchify(patches))
    if kind == "reg":
        assert torch.count_nonzero(v_cls) > 0 and torch.equal(v_cls, expected_cls)


def test_fresh_blocks_are_the_identity_on_their_tokens():
    # The zero output layer alone forces zero velocity; this checks the blocks' adaLN-Zero gates.
    model = tiny().eval()
    x, t, y, cls = inputs()
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append(torch.equal(out, args[0])))
    model(x, t, y, cls)
    assert seen == [True] * len(model.blocks)


def test_zero_initialized_layers_are_the_adaln_outputs_and_both_output_linears():
    model = tiny()
    zeroed = [b.adaLN_modulation[1] for b in model.blocks]
    zeroed += [model.final_layer.adaLN_modulation[1], model.final_layer.linear, model.final_layer.linear_cls]
    for layer in zeroed:
        assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0


def test_linear_layers_are_xavier_uniform_with_zero_bias():
    torch.manual_seed(0)
    model = tiny(hidden_size=128, projector_dim=256)
    xavier = [model.cls_projectors2, *model.projectors[0][::2]]
    for block in model.blocks:
        xavier += [block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2]
    for layer in xavier:
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = layer.weight.detach()
        assert w.abs().max() <= bound  # uniform, not normal
        assert w.abs().max() > 0.95 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert torch.count_nonzero(layer.bias) == 0


def test_patch_embedding_is_initialized_as_a_linear_on_flattened_patches():
    torch.manual_seed(0)
    model = tiny(hidden_size=128)
    w = model.x_embedder.proj.weight.detach()  # (D, C, p, p)
    bound = math.sqrt(6 / (C * 2 * 2 + 128))  # fan_in C*p*p, fan_out D
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert torch.count_nonzero(model.x_embedder.proj.bias) == 0


def test_time_mlp_and_label_table_are_normal_with_std_0_02():
    torch.manual_seed(0)
    model = tiny(hidden_size=128, num_classes=100)
    for w in (model.t_embedder.mlp[0].weight, model.t_embedder.mlp[2].weight,
              model.y_embedder.embedding_table.weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.1)
        assert w.abs().max() > 3 * 0.02  # normal tails: a uniform of this std stops at 0.035
    assert torch.count_nonzero(model.t_embedder.mlp[0].bias) == 0
    assert torch.count_nonzero(model.t_embedder.mlp[2].bias) == 0


@pytest.mark.parametrize("kind", ["reg", "repa", "sit"])
def test_every_parameter_gets_a_nonzero_gradient(kind):
    # Nothing unused: DDP then runs without find_unused_parameters.
    model = perturb(tiny(cls_token=kind == "reg", projector=kind != "sit", class_dropout_prob=0.0)).train()
    x, t, y, cls = inputs()
    v, v_cls, zs = model(x, t, y, cls if kind == "reg" else None)
    g = torch.Generator().manual_seed(2)
    loss = (v * torch.randn(v.shape, generator=g)).sum()
    if kind == "reg":
        loss = loss + (v_cls * torch.randn(v_cls.shape, generator=g)).sum()
    if kind != "sit":
        loss = loss + (zs * torch.randn(zs.shape, generator=g)).sum()
    else:
        assert zs is None and not hasattr(model, "projectors")
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


# ---------------------------------------------------------------- embeddings


def test_time_features_are_cos_then_sin_of_raw_t_with_max_period_10000():
    t = torch.tensor([0.0, 0.013, 0.5, 0.97, 1.0])
    model = tiny()
    got = model.t_embedder.sinusoidal(t, 256)
    expected = np.zeros((len(t), 256))
    for n, tn in enumerate(t.tolist()):
        for i in range(128):
            freq = 10000 ** (-i / 128)
            expected[n, i] = math.cos(tn * freq)  # t as is: no x1000
            expected[n, 128 + i] = math.sin(tn * freq)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_conditioning_is_time_mlp_of_the_features_plus_label_embedding():
    model = perturb(tiny(class_dropout_prob=0.0)).eval()
    x, t, y, cls = inputs()
    seen = {}
    capture(model.blocks[0].adaLN_modulation, seen, "c", output=False)
    model(x, t, y, cls)
    features = torch.tensor([[math.cos(tn * 10000 ** (-i / 128)) for i in range(128)]
                             + [math.sin(tn * 10000 ** (-i / 128)) for i in range(128)] for tn in t.tolist()])
    mlp = model.t_embedder.mlp
    c = linear(silu(linear(features, mlp[0])), mlp[2]) + model.y_embedder.embedding_table.weight[y]
    torch.testing.assert_close(seen["c"][0], c, atol=1e-5, rtol=1e-5)


def mae_pos_table(dim, grid):
    """The MAE 2-D sin-cos table, entry by entry: token i*grid + j is at row i, column j."""
    table = np.zeros((grid * grid, dim))
    quarter = dim // 4
    for i in range(grid):
        for j in range(grid):
            for half, pos in enumerate((j, i)):  # first half: the column (w) coordinate
                for k in range(quarter):
                    omega = 1.0 / 10000 ** (k / quarter)
                    table[i * grid + j, half * dim // 2 + k] = math.sin(pos * omega)
                    table[i * grid + j, half * dim // 2 + quarter + k] = math.cos(pos * omega)
    return table


def test_position_table_is_the_mae_2d_sincos_with_a_zero_class_row():
    model = tiny(input_size=12, patch_size=2, hidden_size=64)  # grid 6x6
    pos = model.pos_embed
    assert pos.shape == (1, 1 + 36, 64)
    assert torch.count_nonzero(pos[0, 0]) == 0
    np.testing.assert_allclose(pos[0, 1:].numpy(), mae_pos_table(64, 6), atol=1e-6)


def test_position_table_without_class_token_has_no_extra_row():
    model = tiny(cls_token=False)
    assert model.pos_embed.shape == (1, 16, 64)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), mae_pos_table(64, 4), atol=1e-6)


def test_position_table_is_not_trained_but_is_saved_under_pos_embed():
    model = tiny()
    assert all(p is not model.pos_embed for p in model.parameters())
    assert "pos_embed" not in dict(model.named_parameters())
    assert torch.equal(model.state_dict()["pos_embed"], model.pos_embed)
    model.train()
    loss = perturb(model)(*inputs())[0].square().sum()
    loss.backward()
    assert not model.pos_embed.requires_grad


def test_sequence_is_class_token_then_row_major_patches_plus_positions():
    model = perturb(tiny(class_dropout_prob=0.0)).eval()
    with torch.no_grad():  # a non-trivial affine LayerNorm, so that the affine part is checked
        model.wg_norm.weight.normal_(1.0, 0.5)
        model.wg_norm.bias.normal_(0.0, 0.5)
    assert model.wg_norm.eps == 1e-6
    x, t, y, cls = inputs()
    seen = {}
    capture(model.blocks[0], seen, "h", output=False)
    model(x, t, y, cls)
    h = seen["h"][0]
    assert h.shape == (3, 1 + 16, 64)

    token = model.wg_norm.weight * layer_norm(linear(cls, model.cls_projectors2)) + model.wg_norm.bias
    torch.testing.assert_close(h[:, 0], token, atol=1e-5, rtol=1e-5)  # its position row is zero

    conv = model.x_embedder.proj
    w = conv.weight.reshape(64, -1)  # (D, C*p*p)
    table = torch.tensor(mae_pos_table(64, 4), dtype=torch.float32)
    for i in range(4):
        for j in range(4):
            patch = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(3, -1)  # (N, C*p*p)
            expected = patch @ w.T + conv.bias + table[i * 4 + j]
            torch.testing.assert_close(h[:, 1 + i * 4 + j], expected, atol=1e-5, rtol=1e-5)


def test_label_table_has_a_null_row_after_the_classes():
    model = tiny(num_classes=10)
    assert model.y_embedder.embedding_table.weight.shape == (11, 64)


def test_label_dropout_with_probability_one_gives_the_null_label_in_training_only():
    model = tiny(num_classes=10, class_dropout_prob=1.0)
    table = model.y_embedder.embedding_table.weight
    y = torch.arange(10)
    torch.testing.assert_close(model.y_embedder.train()(y), table[10].expand(10, -1), rtol=0, atol=0)
    torch.testing.assert_close(model.y_embedder.eval()(y), table[y], rtol=0, atol=0)


def test_label_dropout_default_rate_is_ten_percent():
    with torch.device("meta"):
        assert SiT().y_embedder.dropout_prob == 0.1
    embedder = tiny(num_classes=10).y_embedder.train()
    torch.manual_seed(0)
    out = embedder(torch.zeros(100_000, dtype=torch.long))
    dropped = (out == embedder.embedding_table.weight[10]).all(dim=1).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.005)


# ---------------------------------------------------------------- blocks and heads


def test_layernorms_have_eps_1e_6_and_only_the_class_token_norm_is_affine():
    model = tiny()
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert len(norms) == 2 * 3 + 2  # two per block, the final one, wg_norm
    for name, norm in norms.items():
        assert norm.eps == 1e-6, name
        assert norm.elementwise_affine == (name == "wg_norm"), name


def manual_attention(x, qkv, proj, heads):
    """softmax(q k^T / sqrt(d)) v per head; the fused output is laid out (3, heads, head_dim)."""
    n, length, dim = x.shape
    d = dim // heads
    out = linear(x, qkv)  # (N, L, 3D)
    result = torch.zeros_like(x)
    for h in range(heads):
        q = out[..., 0 * dim + h * d:0 * dim + (h + 1) * d]
        k = out[..., 1 * dim + h * d:1 * dim + (h + 1) * d]
        v = out[..., 2 * dim + h * d:2 * dim + (h + 1) * d]
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)  # (N, L, L)
        result[..., h * d:(h + 1) * d] = weights @ v
    return linear(result, proj)


def random_double(module, seed=3):
    module.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return module


def block_input(seed=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 64, generator=g, dtype=torch.float64)
    x[:, 0] *= 1e-3  # variance ~1e-6: LayerNorm's eps visibly matters on this token
    c = torch.randn(2, 64, generator=g, dtype=torch.float64)
    return x, c


def test_attention_is_scaled_dot_product_with_qkv_laid_out_3_heads_headdim():
    block = random_double(SiTBlock(64, num_heads=4))
    x, _ = block_input()
    torch.testing.assert_close(block.attn(x), manual_attention(x, block.attn.qkv, block.attn.proj, 4))


def test_block_is_adaln_zero_with_shift_scale_gate_for_attention_then_mlp():
    block = random_double(SiTBlock(64, num_heads=4))
    x, c = block_input()
    mod = linear(silu(c), block.adaLN_modulation[1])  # (N, 6D)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = [mod[:, k * 64:(k + 1) * 64, None].transpose(1, 2)
                                                          for k in range(6)]  # each (N, 1, D)
    h = x + gate_a * manual_attention(layer_norm(x) * (1 + scale_a) + shift_a, block.attn.qkv, block.attn.proj, 4)
    mlp_in = layer_norm(h) * (1 + scale_m) + shift_m
    h = h + gate_m * linear(gelu_tanh(linear(mlp_in, block.mlp.fc1)), block.mlp.fc2)
    assert block.mlp.fc1.weight.shape == (4 * 64, 64)
    torch.testing.assert_close(block(x, c), h)


def test_final_layer_modulates_then_splits_class_slot_and_patches():
    final = random_double(FinalLayer(64, patch_size=2, out_channels=C, z_dim=Z))
    x, c = block_input()
    mod = linear(silu(c), final.adaLN_modulation[1])
    shift, scale = mod[:, None, :64], mod[:, None, 64:]
    h = layer_norm(x) * (1 + scale) + shift
    patches, v_cls = final(x, c)
    torch.testing.assert_close(patches, linear(h[:, 1:], final.linear))
    torch.testing.assert_close(v_cls, linear(h[:, 0], final.linear_cls))


def manual_unpatchify(tokens, grid, p, channels):
    """token i*grid + j holds the p x p patch at (i, j), its features ordered (row, column, channel)."""
    n = tokens.shape[0]
    out = torch.zeros(n, channels, grid * p, grid * p, dtype=tokens.dtype)
    for i in range(grid):
        for j in range(grid):
            for a in range(p):
                for b in range(p):
                    for ch in range(channels):
                        out[:, ch, i * p + a, j * p + b] = tokens[:, i * grid + j, (a * p + b) * channels + ch]
    return out


def test_unpatchify_places_patches_row_major_with_features_ordered_p_q_c():
    model = tiny(input_size=12, patch_size=3)
    tokens = torch.randn(2, 16, 3 * 3 * C)
    torch.testing.assert_close(model.unpatchify(tokens), manual_unpatchify(tokens, 4, 3, C), rtol=0, atol=0)


def test_unpatchify_inverts_patchify():
    model = tiny(input_size=8, patch_size=2)
    x = torch.randn(2, C, 8, 8)
    tokens = x.reshape(2, C, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 2 * 2 * C)  # (N, T, p*p*C)
    torch.testing.assert_close(model.unpatchify(tokens), x, rtol=0, atol=0)


def test_forward_composes_blocks_final_layer_and_unpatchify():
    model = perturb(tiny(class_dropout_prob=0.0)).eval()
    x, t, y, cls = inputs()
    seen = {}
    capture(model.blocks[-1], seen, "h")
    capture(model.blocks[0].adaLN_modulation, seen, "c", output=False)
    v, v_cls, zs = model(x, t, y, cls)
    assert zs is None
    h, c = seen["h"], seen["c"][0]
    mod = linear(silu(c), model.final_layer.adaLN_modulation[1])
    h = layer_norm(h) * (1 + mod[:, None, 64:]) + mod[:, None, :64]
    torch.testing.assert_close(v_cls, linear(h[:, 0], model.final_layer.linear_cls), atol=1e-5, rtol=1e-5)
    expected = manual_unpatchify(linear(h[:, 1:], model.final_layer.linear), 4, 2, C)
    torch.testing.assert_close(v, expected, atol=1e-5, rtol=1e-5)


def test_projector_reads_all_tokens_after_block_encoder_depth():
    model = perturb(tiny(depth=4, encoder_depth=2, class_dropout_prob=0.0)).train()
    seen = {}
    capture(model.blocks[1], seen, "h")  # block 2, 1-indexed
    _, _, zs = model(*inputs())
    h = seen["h"]
    layers = model.projectors[0]
    assert [type(m) for m in layers] == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    expected = linear(silu(linear(silu(linear(h, layers[0])), layers[2])), layers[4])
    assert zs.shape == (3, 1 + 16, Z)
    torch.testing.assert_close(zs, expected, atol=1e-5, rtol=1e-5)


def test_several_encoders_get_one_projector_each_on_the_same_block_and_the_first_one_s_class_token():
    model = perturb(tiny(depth=4, encoder_depth=2, class_dropout_prob=0.0, z_dim=[Z, 12])).train()
    assert [k for k in model.state_dict() if k.startswith("projectors.") and k.endswith(".4.weight")] == \
        ["projectors.0.4.weight", "projectors.1.4.weight"]  # the official release's names
    assert model.z_dim == Z and model.cls_projectors2.in_features == Z and model.final_layer.linear_cls.out_features == Z
    seen = {}
    capture(model.blocks[1], seen, "h")
    _, _, zs = model(*inputs())
    assert isinstance(zs, tuple) and [z.shape for z in zs] == [(3, 1 + 16, Z), (3, 1 + 16, 12)]
    for z, layers in zip(zs, model.projectors):
        expected = linear(silu(linear(silu(linear(seen["h"], layers[0])), layers[2])), layers[4])
        torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)


def test_projector_runs_in_training_mode_or_when_asked():
    model = tiny()
    args = inputs()
    assert model.train()(*args).zs is not None
    assert model.train()(*args, return_zs=False).zs is None
    assert model.eval()(*args).zs is None
    assert model.eval()(*args, return_zs=True).zs.shape == (3, 17, Z)
    plain = tiny(cls_token=False, projector=False).train()
    assert plain(*args[:3]).zs is None


# ---------------------------------------------------------------- sizes


OFFICIAL_SIZES = {"S": (12, 384, 6, 4), "B": (12, 768, 12, 4), "L": (24, 1024, 16, 8), "XL": (28, 1152, 16, 8)}


def expected_parameter_count(depth, d, p, in_channels=4, z=768, proj=2048, classes=1000, freq=256):
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    embed = (in_channels * p * p * d + d) + (freq * d + d) + (d * d + d) + (classes + 1) * d
    cls_embed = (z * d + d) + 2 * d
    projector = (d * proj + proj) + (proj * proj + proj) + (proj * z + z)
    final = (d * 2 * d + 2 * d) + (d * p * p * in_channels + p * p * in_channels) + (d * z + z)
    return depth * block + embed + cls_embed + projector + final


def test_model_table_has_every_official_name():
    official = {f"SiT-{size}/{p}" for size in OFFICIAL_SIZES for p in (2, 4, 8)}
    assert len(official) == 12 and official <= set(SiT_models)


@pytest.mark.parametrize("size", OFFICIAL_SIZES)
@pytest.mark.parametrize("p", [2, 4, 8])
def test_every_official_size_builds_with_the_paper_shape(size, p):
    depth, width, heads, encoder_depth = OFFICIAL_SIZES[size]
    with torch.device("meta"):
        model = SiT_models[f"SiT-{size}/{p}"](input_size=32)
    assert len(model.blocks) == depth and model.blocks[0].attn.num_heads == heads
    assert model.encoder_depth == encoder_depth and model.patch_size == p
    assert model.x_embedder.proj.weight.shape == (width, 4, p, p)
    assert sum(q.numel() for q in model.parameters()) == expected_parameter_count(depth, width, p)
    model.eval()
    x = torch.empty(2, 4, 32, 32, device="meta")
    out = model(x, torch.empty(2, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"),
                torch.empty(2, 768, device="meta"), return_zs=True)
    assert out.v.shape == x.shape and out.v_cls.shape == (2, 768)
    assert out.zs.shape == (2, 1 + (32 // p) ** 2, 768)


def test_sit_xl2_with_reg_heads_has_about_685m_parameters():
    with torch.device("meta"):
        model = SiT_models["SiT-XL/2"]()
    count = sum(q.numel() for q in model.parameters())
    assert count == pytest.approx(684.7e6, rel=0.001)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["cls_projectors2.weight"] == (1152, 768)
    assert shapes["wg_norm.weight"] == shapes["wg_norm.bias"] == (1152,)
    assert shapes["final_layer.linear_cls.weight"] == (768, 1152)
    assert shapes["final_layer.linear.weight"] == (2 * 2 * 4, 1152)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (2 * 1152, 1152)
    assert shapes["projectors.0.0.weight"] == (2048, 1152)
    assert shapes["projectors.0.2.weight"] == (2048, 2048)
    assert shapes["projectors.0.4.weight"] == (768, 2048)
    assert shapes["blocks.27.attn.qkv.weight"] == (3 * 1152, 1152)
    assert shapes["blocks.27.adaLN_modulation.1.weight"] == (6 * 1152, 1152)
    assert shapes["y_embedder.embedding_table.weight"] == (1001, 1152)
    assert shapes["t_embedder.mlp.0.weight"] == (1152, 256)
    assert shapes["pos_embed"] == (1, 257, 1152)


@pytest.mark.parametrize("p", [2, 8])
def test_small_size_runs_for_real(p):
    # The official S configs could not run; ours must, forward and backward.
    torch.manual_seed(0)
    model = perturb(SiT_models[f"SiT-S/{p}"](input_size=16, num_classes=10)).train()
    x, t, y, cls = inputs(n=2, input_size=16, z_dim=768)
    v, v_cls, zs = model(x, t, y, cls)
    assert v.shape == x.shape and v_cls.shape == (2, 768) and zs.shape == (2, 1 + (16 // p) ** 2, 768)
    (v.square().mean() + v_cls.square().mean() + zs.square().mean()).backward()
    assert torch.isfinite(model.blocks[0].attn.qkv.weight.grad).all()


# ---------------------------------------------------------------- checkpoints


def official_keys(depth, reg=True):
    """Parameter names of the official release (github.com/Martinser/REG, models/sit.py), written out independently."""
    keys = ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "projectors.0.0", "projectors.0.2",
            "projectors.0.4", "final_layer.linear", "final_layer.adaLN_modulation.1"]
    if reg:
        keys += ["cls_projectors2", "wg_norm", "final_layer.linear_cls"]
    for i in range(depth):
        keys += [f"blocks.{i}.{name}" for name in
                 ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")]
    return {f"{k}.{w}" for k in keys for w in ("weight", "bias")} | {"y_embedder.embedding_table.weight", "pos_embed"}


@pytest.mark.parametrize("reg", [True, False])
def test_state_dict_keys_are_exactly_the_official_names(reg):
    assert set(tiny(depth=3, cls_token=reg).state_dict()) == official_keys(3, reg)


def official_checkpoint(model_state, ema_state, prefix=""):
    """A checkpoint laid out like the official train.py writes it."""
    net = tiny()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0)
    net(*inputs())[0].square().sum().backward()
    opt.step()
    args = argparse.Namespace(model="SiT-XL/2", proj_coeff=0.5, cls=0.03, encoder_depth=8,
                              enc_type="dinov2-vit-b", resolution=256, path_type="linear",
                              mixed_precision="fp16", allow_tf32=True, output_dir="exps", seed=0)
    return {"model": {prefix + k: v for k, v in model_state.items()},
            "ema": {prefix + k: v for k, v in ema_state.items()},
            "opt": opt.state_dict(), "args": args, "steps": 7}


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_official_checkpoint_loads_strictly_and_reproduces_outputs(tmp_path, prefix):
    trained, ema = perturb(tiny(), seed=5).eval(), perturb(tiny(), seed=6).eval()
    path = tmp_path / "0000007.pt"
    torch.save(official_checkpoint(trained.state_dict(), ema.state_dict(), prefix), path)
    args = inputs()
    for prefer_ema, source in ((True, ema), (False, trained)):
        fresh = tiny().eval()
        fresh.load_state_dict(load_weights(str(path), prefer_ema=prefer_ema), strict=True)
        for got, expected in zip(fresh(*args), source(*args)):
            assert (got is None and expected is None) or torch.equal(got, expected)
    assert not torch.equal(ema(*args).v, trained(*args).v)


GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def test_official_model_weights_give_the_official_outputs(tmp_path):
    # A seeded, perturbed tiny SiT built by the official release's models/sit.py; its state dict
    # and outputs were stored once by tests/golden/make_official_golden.py.
    golden = torch.load(os.path.join(GOLDEN, "official_tiny.pt"), weights_only=True)
    state = golden["state_dict"]
    # The official pos_embed is the MAE table with a zero class row: ours, computed, must match it.
    torch.testing.assert_close(SiT(**golden["config"]).pos_embed, state["pos_embed"], atol=1e-6, rtol=0)
    path = tmp_path / "0000001.pt"  # laid out as the official train.py saves a checkpoint
    torch.save({"model": state, "ema": state, "opt": {}, "steps": 1,
                "args": argparse.Namespace(model="SiT-XL/2", encoder_depth=2)}, path)
    model = SiT(**golden["config"]).eval()
    model.load_state_dict(load_weights(str(path)), strict=True)
    v, v_cls, zs = model(golden["x"], golden["t"], golden["y"], golden["cls"], return_zs=True)
    assert golden["y"].max() == model.num_classes  # the null label's row is compared too
    torch.testing.assert_close(v, golden["v"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zs, golden["zs"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_cls, golden["v_cls"], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- misuse


def test_reg_model_without_class_token_input_raises():
    x, t, y, _ = inputs()
    with pytest.raises(ValueError, match="cls"):
        tiny()(x, t, y)


def test_non_reg_model_given_a_class_token_raises():
    with pytest.raises(ValueError, match="cls"):
        tiny(cls_token=False)(*inputs())


@pytest.mark.parametrize("config, word", [(dict(hidden_size=60, num_heads=8), "num_heads"),
                                          (dict(input_size=9, patch_size=2), "patch_size"),
                                          (dict(depth=3, encoder_depth=4), "encoder_depth"),
                                          (dict(depth=3, encoder_depth=0), "encoder_depth")])
def test_inconsistent_configuration_raises(config, word):
    with pytest.raises(ValueError, match=word):
        tiny(**config)


# ----------------------------------------------------------------------------- checkpoint errors

def test_read_checkpoint_of_a_missing_file_says_what_to_give(tmp_path):
    with pytest.raises(UserError, match="no checkpoint at .*train.py") as error:
        read_checkpoint(str(tmp_path / "nothing.pt"))
    assert str(error.value).startswith(f"no checkpoint at {tmp_path / 'nothing.pt'}; give the path of a .pt file")
    assert "official REG checkpoint" in str(error.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", b"PK\x03\x04garbage"])
def test_read_checkpoint_of_a_file_that_is_not_a_checkpoint_says_so(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="is not a checkpoint written by train.py"):
        read_checkpoint(str(path))


def test_read_checkpoint_of_a_non_dict_says_so(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(UserError, match="is not a checkpoint written by train.py.*not a dict") as error:
        read_checkpoint(str(path))
    assert "it holds a list, not a dict; give the path of such a .pt file" in str(error.value)


def test_load_weights_gives_the_ema_weights_unless_told_otherwise(tmp_path):
    """Guards load_weights' documented default, prefer_ema=True (sample.py's --ema relies on it): the
    EMA weights of a checkpoint holding both, from a path or a loaded dict; the model's without EMA."""
    path = tmp_path / "0000001.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "ema": {"w": torch.ones(2)}, "steps": 1}, path)
    for ckpt in (str(path), torch.load(path)):
        assert torch.equal(load_weights(ckpt)["w"], torch.ones(2))
        assert torch.equal(load_weights(ckpt, prefer_ema=False)["w"], torch.zeros(2))
    assert torch.equal(load_weights({"model": {"w": torch.zeros(2)}})["w"], torch.zeros(2))
