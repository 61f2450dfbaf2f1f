"""Specification of train.py's FID while training (--eval-every): evaluate.py's metrics of the EMA's
samples by the paper's protocol without guidance, logged to metrics.jsonl and drawn into fid.png,
and an evaluation that fails never ends the run.

The FID Inception's weights cannot be downloaded here, so evaluate.load_inception is stubbed and
evaluate.features is replaced by cheap features of the pixels (the metrics themselves are
evaluate.py's, tested in tests/test_evaluate.py)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
import flow
import monitor
import train
from encoder import PixelSpace
from model import SiT_models
from util import Processes

RUN = "SiT-T-4-builtin"
TINY = ["--global-batch-size", "8", "--sample-steps", "2", "--num-workers", "0", "--log-every", "1",
        "--sample-every", "100", "--checkpoint-every", "100"]


def pixel_features(net, images, batch_size=100, progress=True):
    """evaluate.features' contract (dict of pool, spatial, logits rows per image), from 2x2 average-pooled pixels."""
    evaluate.check_images(images)
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)
    pooled = F.adaptive_avg_pool2d(x, 2).reshape(len(x), 12)  # (N, 12)
    return {"pool": pooled.numpy(), "spatial": pooled[:, :6].numpy() * 2, "logits": 10 * pooled[:, :10].numpy()}


@pytest.fixture
def eval_files(tmp_path, monkeypatch):
    """A reference batch of 8 random 32x32 images and a weights file (any file: the loader is stubbed)."""
    ref = tmp_path / "ref.npz"
    # Compressed: evaluate.read_images' memory-mapped path for stored .npz calls a numpy 1.x private function.
    np.savez_compressed(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    inception = tmp_path / "inception.pth"
    inception.write_bytes(b"weights")
    loaded = []
    monkeypatch.setattr(evaluate, "load_inception",
                        lambda path, device="cpu": loaded.append(path) or torch.nn.Linear(1, 1))
    monkeypatch.setattr(evaluate, "features", pixel_features)
    return dict(ref=str(ref), inception=str(inception), loaded=loaded,
                flags=["--eval-ref", str(ref), "--inception", str(inception)])


def train_run(out, *flags):
    return train.main(train.get_args(["--output-dir", str(out), *TINY, *map(str, flags)]))


def rows_of(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_evaluations_log_fid_sfid_is_precision_recall_and_draw_fid_png(tmp_path, eval_files, monkeypatch):
    seen, real_sde = [], flow.sample_sde

    def spy(model, x, y, cls=None, **kwargs):
        seen.append(dict(model=model, x=x.clone(), y=y.clone(), **kwargs))
        return real_sde(model, x, y, cls, **kwargs)
    monkeypatch.setattr(flow, "sample_sde", spy)
    model, ema = train_run(tmp_path, "--max-train-steps", 2, "--eval-every", 1, *eval_files["flags"],
                           "--eval-samples", 6, "--eval-steps", 3, "--eval-batch-size", 4)
    assert eval_files["loaded"] == [eval_files["inception"]]  # the Inception is loaded once, at start-up
    rows = [r for r in rows_of(tmp_path / RUN) if "fid6" in r]
    assert [r["step"] for r in rows] == [1, 2]  # --eval-every 1: after each step
    for row in rows:
        assert {"fid6", "sfid6", "is6", "precision6", "recall6"} <= row.keys()
        assert np.isfinite(row["fid6"]) and row["fid6"] > 0 and 0 <= row["precision6"] <= 1
    with Image.open(tmp_path / RUN / "fid.png") as image:
        assert image.size == (720, 5 * 170)  # a panel for each of the five numbers

    # The protocol: the EMA, no guidance, --eval-steps SDE steps; labels i mod 10 for samples 0..5 in
    # batches of 4 and 2; the grid (80 samples at the last step) is the other sampler call.
    evals = [s for s in seen if s["steps"] == 3]
    assert [len(s["y"]) for s in evals] == [4, 2, 4, 2]
    assert all(s["model"] is ema and s["cfg_scale"] == 1.0 and s["null_label"] == 10 for s in evals)
    assert torch.equal(torch.cat([s["y"] for s in evals[:2]]), torch.arange(6))
    # The same start noise at every evaluation, and different noise for every sample.
    assert torch.equal(evals[0]["x"], evals[2]["x"])
    start = torch.cat([evals[0]["x"], evals[1]["x"]]).flatten(1)  # (6, 3 * 32 * 32)
    assert all(not torch.equal(start[i], start[j]) for i in range(6) for j in range(i))


def test_the_evaluation_leaves_the_training_run_unchanged(tmp_path, eval_files):
    model_a, _ = train_run(tmp_path / "a", "--max-train-steps", 2)
    model_b, _ = train_run(tmp_path / "b", "--max-train-steps", 2, "--eval-every", 1, *eval_files["flags"],
                           "--eval-samples", 4, "--eval-steps", 2)
    a, b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # no training noise is drawn by the evaluation
    loss = [[r["loss"] for r in rows_of(tmp_path / run / RUN) if "loss" in r] for run in ("a", "b")]
    assert loss[0] == loss[1]


@pytest.mark.parametrize("where", ["sampling", "metrics"])
def test_a_failed_evaluation_warns_and_training_goes_on(tmp_path, eval_files, monkeypatch, where):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")
    if where == "sampling":
        monkeypatch.setattr(monitor.Evaluation, "images", broken)
    else:
        monkeypatch.setattr(evaluate, "metrics", broken)
    with pytest.warns(UserWarning) as caught:
        train_run(tmp_path, "--max-train-steps", 2, "--eval-every", 1, "--checkpoint-every", 1, *eval_files["flags"],
                  "--eval-samples", 4, "--eval-steps", 2)
    assert [str(w.message) for w in caught] == [f"evaluation at step {step} failed: RuntimeError: CUDA out of memory "
                                                "(simulated); training goes on" for step in (1, 2)]
    rows = rows_of(tmp_path / RUN)
    assert [r["step"] for r in rows] == [1, 2] and not any("fid4" in r for r in rows)
    assert sorted(os.listdir(tmp_path / RUN / "checkpoints")) == ["0000001.pt", "0000002.pt"]


def test_eval_flags_are_checked_before_anything_is_built(tmp_path, eval_files, capsys):
    for flags, message in [(["--eval-every", "5"], "--eval-every needs --eval-ref: not given"),
                           (["--eval-every", "5", "--eval-ref", str(tmp_path / "no.npz"), "--inception",
                             eval_files["inception"]], "no file at"),
                           (["--eval-every", "5", "--eval-ref", eval_files["ref"]], "needs --inception"),
                           (["--eval-every", "-1"], "argument --eval-every: -1 is out of range")]:
        with pytest.raises(SystemExit) as stop:
            train.get_args(["--output-dir", str(tmp_path), *flags])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and len(err.splitlines()) == 1


def test_the_samples_do_not_depend_on_the_number_of_processes(tmp_path, eval_files):
    # Each process samples a contiguous run of batches; gathered in rank order they are the samples
    # of one process, bit for bit, for 1, 2 or 4 processes (4 > 3 batches: one process has none).
    args = train.get_args(["--output-dir", str(tmp_path), *eval_files["flags"], "--eval-every", "1",
                           "--eval-samples", "5", "--eval-batch-size", "2", "--eval-steps", "2"])
    dataset = type("Latents", (), dict(resolution=8, downsample=1, latent_channels=3, num_classes=4,
                                       scaling_factor=1.0))
    ema = SiT_models["SiT-T/4"](input_size=8, in_channels=3, num_classes=4, z_dim=16).eval()
    with torch.no_grad():
        ema.final_layer.linear.weight.normal_()  # zero at init: the samples would not depend on the model
    shares = {}
    for world in (1, 2, 4):
        feats = [monitor.Evaluation(args, dataset, 16, PixelSpace(), Processes(rank, rank, world, torch.device("cpu")),
                                  str(tmp_path)).features(ema) for rank in range(world)]
        shares[world] = np.concatenate([f["pool"] for f in feats])
    # The images behind the features: those of the single process.
    images = np.concatenate([monitor.Evaluation(args, dataset, 16, PixelSpace(), Processes(0, 0, 1, torch.device("cpu")),
                                              str(tmp_path)).images(ema, k) for k in range(3)])
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8 and images.std() > 0
    assert np.array_equal(pixel_features(None, images)["pool"], shares[1])
    assert np.array_equal(shares[2], shares[1]) and np.array_equal(shares[4], shares[1])
