"""Specification of toy.py and the built-in world around it: the hard dataset, the pretrained
built-in ViT (DINOv2's interface, loaded through train.py's encoder path) and the toy evaluator."""
import inspect
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import data
import encoder
import toy
import train
from util import UserError

REPO = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))


# ----------------------------------------------------------------------------- the hard dataset

def test_hard_shapes_are_deterministic_and_balanced():
    a, b, c = data.HardShapes(200, seed=0), data.HardShapes(200, seed=0), data.HardShapes(200, seed=1)
    assert a.images.tobytes() == b.images.tobytes() and (a.labels == b.labels).all()
    assert a.images.tobytes() != c.images.tobytes()
    assert np.bincount(a.labels).tolist() == [20] * 10
    assert a.images.shape == (200, 3, 32, 32) and a.images.dtype == np.uint8


def test_hard_shapes_colour_does_not_tell_the_class():
    # In BuiltinShapes the class is its colour; here a nearest-class-mean on the mean colour of the
    # brightest pixels (the shape) must be near chance, while it is perfect on BuiltinShapes.
    def colour_accuracy(dataset_class):
        train, test = dataset_class(1000, seed=0), dataset_class(1000, seed=1)

        def colour(d):
            x = d.images.reshape(len(d.images), 3, -1).astype(np.float64)  # (N, 3, H*W)
            bright = x.sum(1) >= np.quantile(x.sum(1), 0.9, axis=1, keepdims=True)  # (N, H*W)
            return (x * bright[:, None]).sum(2) / bright.sum(1, keepdims=True)  # (N, 3)

        means = np.stack([colour(train)[train.labels == k].mean(0) for k in range(10)])  # (10, 3)
        guess = np.linalg.norm(colour(test)[:, None] - means[None], axis=2).argmin(1)
        return (guess == test.labels).mean()

    assert colour_accuracy(data.BuiltinShapes) > 0.9
    assert colour_accuracy(data.HardShapes) < 0.3


def test_hard_shapes_give_each_class_many_colours():
    """Guards HardShapes' point: the shape's own colour (each image's one flat colour, its most
    frequent pixel; the background is noisy) does not tell the class, even up to brightness."""
    def shape_colours(d):
        pixels = d.images.reshape(len(d.images), 3, -1).transpose(0, 2, 1)  # (N, H*W, 3)
        modes = []
        for p in pixels:
            values, counts = np.unique(p, axis=0, return_counts=True)
            modes.append(values[counts.argmax()])
        colour = np.array(modes, dtype=np.float64)  # (N, 3)
        return colour / colour.max(axis=1, keepdims=True)  # chromaticity: brightness divided out

    train_set, test_set = data.HardShapes(500, seed=0), data.HardShapes(500, seed=1)
    fit, test = shape_colours(train_set), shape_colours(test_set)
    means = np.stack([fit[train_set.labels == k].mean(0) for k in range(10)])  # (10, 3)
    guess = np.linalg.norm(test[:, None] - means[None], axis=2).argmin(1)
    assert (guess == test_set.labels).mean() < 0.3  # chance is 0.1
    assert all(fit[train_set.labels == k].std(0).max() > 0.1 for k in range(10))


def test_default_builtin_dataset_is_unchanged_by_the_variant_flag():
    args = train.get_args([])
    assert args.builtin == "shapes"
    dataset, run_dir = train.open_data(args, type("P", (), {"master": False})())
    assert type(dataset) is data.BuiltinShapes and run_dir.endswith("SiT-T-4-builtin")
    hard, hard_dir = train.open_data(train.get_args(["--builtin", "hard"]), type("P", (), {"master": False})())
    assert type(hard) is data.HardShapes and hard_dir.endswith("SiT-T-4-builtin-hard")


# ----------------------------------------------------------------------------- the built-in ViT

@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "encoder.pt"
    toy.train_encoder(str(path), variant="shapes", num_images=600, epochs=2, probe_images=400, z_dim=64, depth=1,
                      num_heads=2)
    return str(path)


def test_encoder_pretraining_beats_chance_on_a_linear_probe(encoder_file):
    saved = torch.load(encoder_file, weights_only=True)
    assert saved["probe_accuracy"] > 0.5  # chance is 0.1
    # The probe measures the pretraining, not the architecture: a random net of the same size scores lower.
    torch.manual_seed(0)
    assert toy.linear_probe(encoder.BuiltinViT(z_dim=64, depth=1, num_heads=2), "shapes", num_images=400) < \
        saved["probe_accuracy"]


def test_rich_teachers_probes_beat_chance_on_the_attributes_it_learns(tmp_path):
    path = tmp_path / "rich.pt"
    toy.train_encoder(str(path), num_images=600, epochs=3, probe_images=400, resolution=16, patch_size=4, z_dim=64,
                      depth=1, num_heads=2, teacher="rich")
    saved = torch.load(path, weights_only=True)
    assert saved["teacher"] == "rich" and set(saved["probes"]) == {"class", *data.ATTRIBUTES}
    assert saved["probes"]["class"] > 0.12  # chance 0.10
    # R^2 of a linear probe, chance 0. Position and rotation need the lab's larger teacher (its
    # probe table: position 0.32); rotation (+-20 degrees at 16 pixels) no teacher here learns.
    for attribute in ("colour", "size", "background"):
        assert saved["probes"][attribute] > 0.1, attribute


def test_probe_r2_is_one_for_an_attribute_the_token_holds_linearly(monkeypatch):
    last = {}  # the attributes of the images handed out last; probe_table reads each set's tokens at once

    def fake_images(variant, role, n, resolution):
        last["a"] = toy.attributes(variant, role, n, resolution)
        return torch.arange(n), torch.arange(n) % 10  # "images": their indices

    def holds(indices):  # a teacher whose class token is each image's colour and size
        return torch.cat([last["a"]["colour"], last["a"]["size"]], 1)[indices], None

    monkeypatch.setattr(toy, "images", fake_images)
    monkeypatch.setattr(toy, "linear_probe", lambda *a, **k: 0.0)
    table = toy.probe_table(holds, "hard", 16, num_images=200)
    assert table["colour"] > 0.99 and table["size"] > 0.99 and abs(table["rotation"]) < 0.1


def test_builtin_vit_has_dinov2_interface_and_loads_through_train_encoder_path(encoder_file):
    args = train.get_args(["--enc-type", "builtin-vit", "--enc-path", encoder_file, "--model", "SiT-T/8"])
    net = train.build_encoder(args, data.BuiltinShapes(10))
    assert isinstance(net, encoder.BuiltinViT) and not any(p.requires_grad for p in net.parameters())
    images = torch.from_numpy(data.BuiltinShapes(4).images)
    cls, patches = net(images)
    assert cls.shape == (4, 64) and patches.shape == (4, 16, 64)  # (N, z_dim), (N, T = (32 / 8)^2, z_dim)
    tokens = net.vit.forward_features(net.preprocess(images))  # the final norm is applied
    assert torch.equal(cls, tokens[:, 0]) and torch.equal(patches, tokens[:, 1:])
    reloaded = encoder.load_encoder("builtin-vit", 32, weights=encoder_file)
    assert torch.equal(reloaded(images)[0], cls)
    with pytest.raises(UserError, match="toy.py encoder --patch-size 4"):  # 16 tokens for a 8x8 grid
        train.build_encoder(train.get_args(["--enc-type", "builtin-vit", "--enc-path", encoder_file]),
                            data.BuiltinShapes(10))


def test_builtin_vit_file_missing_is_one_line_saying_which_command_makes_it(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--enc-type", "builtin-vit", "--enc-path",
                             str(tmp_path / "none.pt"), "--output-dir", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "python toy.py encoder" in lines[0]
    with pytest.raises(UserError, match="toy.py encoder"):
        encoder.load_encoder("builtin-vit", 32)


def test_builtin_vit_load_gives_the_saved_network(tmp_path):
    """Guards --enc-type builtin-vit: the loaded teacher computes what the saved one did, not what a
    network drawn at random (here from another seed) would."""
    config = dict(resolution=32, patch_size=8, z_dim=32, depth=1, num_heads=2)
    torch.manual_seed(1)
    saved = encoder.BuiltinViT(**config)
    torch.manual_seed(2)
    other = encoder.BuiltinViT(**config)
    path = str(tmp_path / "vit.pt")
    torch.save({"kind": "builtin-vit", "config": saved.config, "state_dict": saved.vit.state_dict()}, path)
    torch.manual_seed(2)  # a load that kept its random initialisation would give `other`
    loaded = encoder.BuiltinViT.load(path, 32)
    images = torch.from_numpy(data.BuiltinShapes(4).images)
    for got, want in zip(loaded(images), saved(images)):
        assert torch.equal(got, want)
    assert not torch.allclose(other(images)[0], saved(images)[0])


@pytest.mark.parametrize("content", ["corrupt", "code"])
def test_a_corrupt_or_code_carrying_encoder_file_is_one_line_and_runs_nothing(tmp_path, content):
    """Guards --enc-path: read like checkpoints (weights only), a bad file is a UserError and nothing
    else (no warning lines), and a pickle's payload never runs."""
    path, marker = tmp_path / "vit.pt", tmp_path / "ran"
    if content == "corrupt":
        path.write_bytes(b"half an encoder file")
    else:
        path.write_bytes(pickle.dumps({"kind": "builtin-vit", "x": Payload(str(marker))}))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(UserError, match="is not a builtin-vit encoder"):
        warnings.simplefilter("always")
        encoder.load_encoder("builtin-vit", 32, weights=str(path))  # what train.py's build_encoder calls
    assert not caught and not marker.exists()  # util.run prints the UserError alone: one line, exit 2


class Payload:
    """A pickle that would create a file if unpickled with code allowed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_builtin_vit_without_enc_path_names_the_file_to_make():
    """Guards the message of --enc-type builtin-vit without --enc-path: a real command, no 'None'."""
    with pytest.raises(UserError, match="none given; make one with: python toy.py encoder") as error:
        encoder.load_encoder("builtin-vit", 32, weights=None)
    assert "None" not in str(error.value)


@pytest.mark.parametrize("command", ["encoder", "evaluator"])
def test_toy_output_that_cannot_be_written_is_one_line_before_training(tmp_path, command, monkeypatch):
    """Guards toy.py --out: a path in no writable folder fails in one line before any training."""
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(toy, "images", lambda *a, **k: pytest.fail("trained before checking --out"))
    with pytest.raises(UserError, match="cannot write .*file/x.pt .*is a file"):
        toy.main([command, "--out", str(tmp_path / "file" / "x.pt")])


# ----------------------------------------------------------------------------- the toy evaluator

@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "evaluator.pt"
    toy.train_evaluator(str(path), variant="shapes", num_images=1000, epochs=4, width=16, sanity_images=300)
    return toy.load_evaluator(str(path))


def test_evaluator_trains_on_its_own_held_out_seed(tmp_path, monkeypatch):
    """Guards the toy FID: the evaluator's training images come from its own seed, neither the
    SiT's training seed (train.py's data.BuiltinShapes()) nor the reference images' seed."""
    seeds = []

    class Enough(Exception):
        pass

    class Recorder(data.BuiltinShapes):
        def __init__(self, num_images=5000, resolution=32, seed=0):
            seeds.append(seed)
            raise Enough  # the seed is all this test needs; no training

    monkeypatch.setitem(toy.BUILTIN_DATASETS, "shapes", Recorder)
    with pytest.raises(Enough):
        toy.train_evaluator(str(tmp_path / "evaluator.pt"), variant="shapes")
    sit_seed = inspect.signature(data.BuiltinShapes).parameters["seed"].default  # train.py's BuiltinShapes()
    assert seeds == [toy.SEEDS["evaluator"]] and seeds[0] not in (sit_seed, toy.SEEDS["train"], toy.SEEDS["reference"])


def test_evaluator_scores_real_images_better_than_noise_and_a_repeated_image(evaluator):
    reference, _ = toy.images("shapes", "reference", 300)
    real, labels = toy.images("shapes", "train", 300)
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    repeated = real[:1].expand_as(real)
    good = toy.toy_metrics(evaluator, real, labels, reference)
    with pytest.warns(UserWarning, match="singular"):  # one image: a zero covariance
        same = toy.toy_metrics(evaluator, repeated, labels, reference)
    bad = toy.toy_metrics(evaluator, noise, labels, reference)
    assert good["accuracy"] > 0.8 and bad["accuracy"] < 0.3 and same["accuracy"] < 0.2
    assert good["fid"] < same["fid"] / 5 and good["fid"] < bad["fid"] / 5
    assert good["precision"] > 0.8 and good["recall"] > 0.8
    assert bad["precision"] < 0.1 and same["recall"] < 0.1


def test_toy_metrics_are_evaluate_py_metrics_of_the_pooled_features(evaluator):
    reference, _ = toy.images("shapes", "reference", 200)
    samples, labels = toy.images("shapes", "train", 200)
    feats, logits = evaluator(samples)
    ref_feats, _ = evaluator(reference)
    mu, sigma = (np.mean(feats.double().numpy(), 0), np.cov(feats.double().numpy(), rowvar=False))
    mu_r, sigma_r = (np.mean(ref_feats.double().numpy(), 0), np.cov(ref_feats.double().numpy(), rowvar=False))
    got = toy.toy_metrics(evaluator, samples, labels, reference)
    assert got["fid"] == pytest.approx(toy.evaluate.frechet_distance(mu_r, sigma_r, mu, sigma), rel=1e-6)
    assert got["accuracy"] == pytest.approx((logits.argmax(1) == labels).double().mean().item())
    wrong = toy.toy_metrics(evaluator, samples, (labels + 1) % 10, reference)["accuracy"]
    assert wrong < got["accuracy"] - 0.5
