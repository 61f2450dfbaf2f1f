"""The seeds of the FID samples' noise: sample i's start noise comes from (seed, i), batch b's SDE
noise from (seed, b) (flow.start_noise, flow.sde_generator), in sample.py's .npz and in train.py's
evaluation alike.

Reruns and process counts cannot catch a batch that draws from another batch's generator: both
sides of such a comparison share the bug. These tests look at the seed each batch receives.
"""
import argparse
from types import SimpleNamespace

import numpy as np
import torch

import flow
import monitor
import sample
from util import Processes

RANK_1_OF_2 = Processes(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"))


def test_each_npz_batch_draws_its_sde_noise_from_its_own_generator(tmp_path, monkeypatch):
    """Guards sample.py: batch b of the .npz (here on rank 1 of 2: batches 1 and 3) samples with
    flow.sde_generator(--seed, b), its global batch number, not a shared or a local one."""
    seen = []

    def generate(model, vae, scale, x, cls, y, args, generator=None):  # records, then returns blank images
        seen.append((y.tolist(), generator.initial_seed()))
        return torch.zeros(len(y), 3, 4, 4, dtype=torch.uint8)
    monkeypatch.setattr(sample, "generate", generate)
    monkeypatch.setattr(sample, "barrier", lambda: None)
    args = sample.get_args(["--ckpt", "x.pt", "--num-samples", "11", "--per-proc-batch-size", "3", "--seed", "5",
                            "--out", str(tmp_path / "s.npz")])
    model = SimpleNamespace(grid_size=2, patch_size=2, in_channels=3, z_dim=4, cls_token=True, num_classes=10)
    sample.sample_npz(model, model, SimpleNamespace(downsample=1), 1.0, args, RANK_1_OF_2)
    assert seen == [([3, 4, 5], flow.sde_generator(5, 1, "cpu").initial_seed()),
                    ([9, 0], flow.sde_generator(5, 3, "cpu").initial_seed())]


def test_each_evaluation_batch_draws_its_sde_noise_from_its_own_generator(monkeypatch):
    """Guards train.py's evaluation: batch k (here on rank 1 of 2: batches 2 and 3 of 4) samples
    with flow.sde_generator(--seed, k), its global batch number."""
    seen = []

    def sample_sde(model, x, y, cls=None, *, generator=None, **kwargs):
        seen.append((y.tolist(), generator.initial_seed()))
        return x, cls
    monkeypatch.setattr(flow, "sample_sde", sample_sde)
    monkeypatch.setattr(monitor.evaluate, "features", lambda net, images, progress=True: {"pool": images[:, 0, 0]})
    evaluation = monitor.Evaluation.__new__(monitor.Evaluation)  # without the Inception and reference it loads
    evaluation.net, evaluation.z_dim, evaluation.processes = None, 4, RANK_1_OF_2
    evaluation.args = argparse.Namespace(eval_samples=7, eval_batch_size=2, seed=9, eval_steps=2, precision="fp32",
                                         path_type="linear")
    evaluation.dataset = SimpleNamespace(resolution=4, downsample=1, latent_channels=3, num_classes=10,
                                         scaling_factor=1.0)
    evaluation.vae = SimpleNamespace(decode=lambda z: z.clamp(-1, 1))
    evaluation.features(SimpleNamespace(cls_token=True, num_classes=10, shifts=lambda y: (None, None)))  # no CAR-Flow shifts
    assert seen == [([4, 5], flow.sde_generator(9, 2, "cpu").initial_seed()),
                    ([6], flow.sde_generator(9, 3, "cpu").initial_seed())]


def test_noise_seeds_are_distinct_for_every_sample_and_batch_of_a_50k_set_over_200_seeds():
    """Guards flow.py's promise: the generator seed of start noise (seed, index) and of SDE batch
    (seed, batch) differ for every one of the 50,000 indices and every seed below 200 (so no two
    samples, of one seed or of two, share noise), checked over the whole range, not the first few."""
    seeds, indices = np.arange(200)[:, None, None], np.arange(50_000)[None, :, None]
    folded = flow._seed(seeds, indices, np.array([0, 1]))  # (200, 50000, 2): start noise, SDE batch
    assert folded.min() >= 0 and folded.max() < 2**32  # what a CPU generator keeps of its seed
    ordered = np.sort(folded.astype(np.uint32), axis=None)  # (20M,); a sort is faster than np.unique here
    assert (ordered[1:] != ordered[:-1]).all()
    # The public generators are seeded with these folded values, at the far end of the range too.
    x, _, _ = flow.start_noise([49_999], 199, (2,))
    assert torch.equal(x[0], torch.randn(2, generator=torch.Generator().manual_seed(int(folded[199, 49_999, 0]))))
    assert flow.sde_generator(199, 49_999, "cpu").initial_seed() == folded[199, 49_999, 1]
