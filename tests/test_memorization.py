"""Specification of the memorization measure and of the closed-form and memorization flags of
train.py: evaluate.memorized_fraction on constructed cases (Bonnaire et al., arXiv 2505.17638:
d1 / d2 < 1/3), data.ClassReferences, and short built-in runs with --target closed-form and --mem-every.

    python3 -m pytest -q tests/test_memorization.py
"""
import json
import os

import numpy as np
import pytest
import torch

import data
import train
from evaluate import memorized_fraction


def test_exact_copies_are_memorized_and_fresh_points_far_from_all_are_not():
    g = torch.Generator().manual_seed(0)
    train_set = torch.randn(40, 3, 8, 8, generator=g)
    assert memorized_fraction(train_set[5:25], train_set) == 1.0
    assert memorized_fraction(10 + torch.randn(20, 3, 8, 8, generator=g), train_set) == 0.0  # d1 / d2 ~ 1
    half = torch.cat([train_set[:10], torch.randn(10, 3, 8, 8, generator=g)])  # fresh draws: d1 / d2 ~ 0.7
    assert memorized_fraction(half, train_set) == 0.5


def test_the_boundary_is_d1_below_a_third_of_d2():
    # Two training points 1 apart along the first axis; a sample at p has d1 = p, d2 = 1 - p: ratio 1/3 at p = 1/4.
    train_set = torch.zeros(2, 4)
    train_set[1, 0] = 1.0
    at = torch.zeros(3, 4)
    at[:, 0] = torch.tensor([0.24, 0.25, 0.26])
    assert [memorized_fraction(at[i:i + 1], train_set) for i in range(3)] == [1.0, 0.0, 0.0]
    assert memorized_fraction(at[2:], train_set, threshold=0.36) == 1.0


def test_a_duplicated_training_image_counts_once():
    g = torch.Generator().manual_seed(1)
    train_set = torch.randn(30, 2, 4, 4, generator=g)
    with_duplicates = torch.cat([train_set, train_set[:5], train_set[:2]])  # images 0 and 1 three times
    assert memorized_fraction(train_set[:5], with_duplicates, block=4) == 1.0
    with pytest.raises(ValueError, match="two distinct"):
        memorized_fraction(train_set[:1], train_set[:1].repeat(3, 1, 1, 1))


def test_blocks_smaller_than_the_sets_give_the_brute_force_answer():
    g = torch.Generator().manual_seed(2)
    train_set = torch.randn(50, 3, 4, 4, generator=g)
    # copies with noise of growing size: some below the boundary, some above
    samples = train_set[:40] + torch.linspace(0, 1.5, 40)[:, None, None, None] * torch.randn(40, 3, 4, 4, generator=g)
    dist = torch.cdist(samples.flatten(1).double(), train_set.flatten(1).double())
    d1, d2 = dist.topk(2, largest=False).values.T
    expected = (d1 / d2 < 1 / 3).double().mean().item()
    assert 0.2 < expected < 0.8
    for block in (1, 7, 1000):
        assert memorized_fraction(samples, train_set, block=block) == expected


def test_uint8_images_and_memmaps_work_as_pixels(tmp_path):
    images = data.BuiltinShapes(num_images=60).images  # (60, 3, 32, 32) uint8
    path = os.path.join(tmp_path, "train.npy")
    np.save(path, images)
    memmap = np.load(path, mmap_mode="r")
    assert memorized_fraction(images[:12], memmap, block=16) == 1.0
    assert memorized_fraction(torch.from_numpy(images[:12]).float() / 127.5 - 1, memmap / 127.5 - 1) == 1.0


def test_class_references_are_of_the_sample_class_and_the_same_for_the_same_step():
    dataset = data.BuiltinShapes(num_images=100)
    refs = data.ClassReferences(dataset, 6, seed=0, rank=0)
    labels = torch.tensor([3, 3, 7, 0])
    moments = refs(labels, step=5)  # (4, 6, 6, 32, 32)
    assert moments.shape == (4, 6, 6, 32, 32)
    assert torch.equal(moments, refs(labels, step=5)) and not torch.equal(moments, refs(labels, step=6))
    pixels = moments[:, :, :3]
    for i, label in enumerate(labels.tolist()):
        same = torch.from_numpy(dataset.images[dataset.labels == label]).float() / 127.5 - 1  # (10, 3, 32, 32)
        for j in range(6):
            assert (pixels[i, j] == same).flatten(1).all(1).any()  # an image of the same class
    assert (moments[:, :, 3:] == 0).all()  # the built-in data's posterior has no width
    read_per_step = data.ClassReferences(dataset, 6, seed=0, rank=0, bank_bytes=0)  # no moments held in memory
    assert read_per_step.bank is None and torch.equal(read_per_step(labels, step=5), moments)


TINY = ["--global-batch-size", "8", "--sample-steps", "2", "--num-workers", "0", "--log-every", "1",
        "--sample-every", "100", "--checkpoint-every", "100"]


def run_metrics(out, *flags):
    train.main(train.get_args(["--output-dir", str(out), "--exp-name", "run", *TINY, *flags]))
    with open(os.path.join(out, "run", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(rows):
    return [(r["step"], r["loss"], r["denoise"], r["cls"], r["proj"], r["grad_norm"]) for r in rows if "loss" in r]


def test_closed_form_with_one_reference_is_the_stochastic_run_bit_for_bit(tmp_path):
    # M = 1: the sample's own image alone, whose v* is the stochastic target; and no reference
    # latent is drawn, so the random stream is the stochastic run's too.
    steps = ["--max-train-steps", "2"]
    stochastic = losses(run_metrics(tmp_path / "a", *steps))
    assert losses(run_metrics(tmp_path / "b", *steps, "--target", "closed-form", "--cf-refs", "1")) == stochastic


def test_mem_every_logs_the_memorized_fraction_of_a_small_training_set(tmp_path):
    rows = run_metrics(tmp_path, "--max-train-steps", "2", "--num-images", "16", "--mem-every", "1",
                       "--mem-samples", "6", "--target", "closed-form", "--cf-refs", "4")
    mem = [r for r in rows if "mem_frac" in r]
    assert [r["step"] for r in mem] == [1, 2] and all(0 <= r["mem_frac"] <= 1 for r in mem)
    assert os.path.exists(os.path.join(tmp_path, "run", "mem.png"))


@pytest.mark.parametrize("flags, message", [(["--cf-refs", "0"], "argument --cf-refs: 0 is out of range; give an int in [1, inf)"),
                                            (["--num-images", "1"], "argument --num-images: 1 is out of range; give an int in [2, inf)"),
                                            (["--mem-every", "-1"], "argument --mem-every: -1 is out of range; give an int in [0, inf)"),
                                            (["--target", "closed-form", "--car", "joint"], "does not combine with --car joint")])
def test_closed_form_flag_mistakes_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        train.get_args(flags)
    assert stop.value.code == 2 and message in capsys.readouterr().err
