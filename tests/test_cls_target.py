"""Specification of REG's token variants (arXiv 2507.01467 v2, Table 5; train.py --cls-target,
flow.token_target, model.SiT slot=): what enters the slot, what it is trained to predict, what
the sampler starts it from. Each expectation is computed here, independently of the code under test."""
import pytest
import torch

import flow
import train
from flow import token_target, training_loss
from model import SiT
from test_train import TINY
from util import UserError

C, Z, D, T = 3, 16, 32, 16  # latent channels, encoder width, SiT width, patch tokens (8x8, patch 2)


def tiny(**kwargs):
    config = dict(input_size=8, patch_size=2, in_channels=C, hidden_size=D, depth=2, num_heads=2, num_classes=10,
                  encoder_depth=1, z_dim=Z, projector_dim=24, class_dropout_prob=0.0)
    return SiT(**{**config, **kwargs})


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, 8, 8, generator=g)
    cls, patches = torch.randn(n, Z, generator=g), torch.randn(n, T, Z, generator=g)
    return x, torch.randint(0, 10, (n,), generator=g), cls, patches, torch.rand(n, generator=g)


def test_class_token_target_is_the_encoders_class_token_itself():
    _, _, cls, patches, _ = batch()
    assert token_target("cls", cls, patches) is cls  # the default: the very tensor REG used before


def test_patch_mean_target_is_the_average_of_the_encoders_patch_tokens():
    _, _, cls, patches, _ = batch()
    expected = torch.stack([sum(patches[i, j] for j in range(T)) / T for i in range(len(patches))])
    torch.testing.assert_close(token_target("patch-mean", cls, patches), expected)


@pytest.mark.parametrize("kind", ["learned", "latent-mean"])
def test_slots_without_a_teacher_token_have_no_target(kind):
    _, _, cls, patches, _ = batch()
    assert token_target(kind, cls, patches) is None


def test_patch_mean_is_noised_on_the_image_path_and_its_velocity_is_the_target():
    x, y, cls, patches, t = batch()
    seen = {}

    def model(x_t, t_, y_, cls_t):  # a spy: records the slot's input, predicts zero velocities
        seen["cls_t"] = cls_t
        return torch.zeros_like(x_t), torch.zeros_like(cls_t), None

    mean = patches.mean(1)
    noise = torch.randn(4, Z, generator=torch.Generator().manual_seed(3))
    losses = training_loss(model, x, y, token_target("patch-mean", cls, patches), t=t, cls_noise=noise)
    torch.testing.assert_close(seen["cls_t"], (1 - t[:, None]) * mean + t[:, None] * noise)
    torch.testing.assert_close(losses["cls"], (noise - mean).square().mean(1))  # linear path: v = eps - x


def test_default_model_is_unchanged_by_the_slot_argument():
    torch.manual_seed(0)
    before = tiny()
    torch.manual_seed(0)
    after = tiny(slot="input")
    assert before.cls_token and after.slot == "input"
    for (k, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("kind", ["learned", "latent-mean"])
def test_slot_without_input_takes_no_token_predicts_none_and_aligns_only_the_patches(kind):
    model = tiny(slot=kind).train()
    x, y, cls, _, t = batch()
    assert not model.cls_token and model.pos_embed.shape[1] == 1 + T  # the slot is there, inside
    v, v_cls, zs = model(x, t, y)
    assert v.shape == x.shape and v_cls is None and zs.shape == (4, T, Z)
    with pytest.raises(ValueError, match="cls="):
        model(x, t, y, cls)


def test_learned_slot_is_one_trained_vector_shared_by_every_image():
    model = tiny(slot="learned")
    with torch.no_grad():
        model.learned_token.normal_()
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0]))
    x, y, _, _, t = batch()
    model(x, t, y)
    for i in range(len(x)):  # its position row is zero
        torch.testing.assert_close(seen["h"][i, 0], model.learned_token[0, 0])
    assert model.learned_token.requires_grad


def test_latent_mean_slot_is_the_mean_of_the_noisy_latents_patch_embeddings():
    model = tiny(slot="latent-mean")
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0]))
    x, y, _, _, t = batch()
    model(x, t, y)
    w, b = model.x_embedder.proj.weight.reshape(D, -1), model.x_embedder.proj.bias  # (D, C*p*p)
    patches = [x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(len(x), -1) @ w.T + b
               for i in range(4) for j in range(4)]
    torch.testing.assert_close(seen["h"][:, 0], sum(patches) / T, atol=1e-5, rtol=1e-5)


def test_samplers_start_no_token_for_a_slot_without_input():
    model = tiny(slot="learned").eval()
    x, y, _, _, _ = batch()
    z, cls = flow.sample_sde(model, x, y, None, steps=3, null_label=10)
    assert z.shape == x.shape and cls is None


def test_a_token_variant_without_the_slot_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as stop:  # --cls-coeff 0 removes the slot, so the variant would be ignored
        train.get_args(["--cls-target", "patch-mean", "--cls-coeff", "0"])
    assert stop.value.code == 2 and "--cls-target patch-mean needs REG's token slot" in capsys.readouterr().err


def test_resuming_with_another_token_variant_is_a_one_line_user_error(tmp_path):
    # cls and patch-mean build the same network: without the check the run would switch targets silently.
    train.main(train.get_args(["--output-dir", str(tmp_path), *TINY, "--max-train-steps", "1"]))
    with pytest.raises(UserError, match="--cls-target cls and this run has --cls-target patch-mean; resume with"):
        train.main(train.get_args(["--output-dir", str(tmp_path), *TINY, "--max-train-steps", "2",
                                   "--cls-target", "patch-mean"]))
