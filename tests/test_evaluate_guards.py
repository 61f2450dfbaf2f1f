"""evaluate.py's guards: both .npz files are checked from their headers before any work, the feature
cache notices a rewritten file, and metrics() hands precision/recall their arguments in order.

The checks before work read only the .npy headers inside the zip (no data, nothing unpickled), so a
bad sample file is refused in milliseconds, before the Inception is loaded or the reference's
(possibly 10,000-image) features are computed.
"""
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import evaluate
import util
from test_evaluate import StubInception, random_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def object_array(n=4):
    """What np.savez stores for a list of images of different sizes: an array of Python objects."""
    images = np.empty(n, dtype=object)
    for i in range(n):
        images[i] = np.zeros((8 + i, 8, 3), np.uint8)
    return images


SAMPLE_MISTAKES = {  # name: (what the file holds, or None for no file; words of the one-line error)
    "missing": (None, "no file at"),
    "not a zip": (b"hello", "is not an .npz"),
    "no arr_0": (dict(images=random_images(4)), "has no arr_0 (it has images)"),
    "object arr_0": (dict(arr_0=object_array()), "arr_0 is an array of Python objects"),
    "float images": (dict(arr_0=np.zeros((4, 8, 8, 3), np.float32)), "images are float32"),
    "channels first": (dict(arr_0=np.zeros((4, 3, 8, 8), np.uint8)), "channels-first"),
    "one image": (dict(arr_0=np.zeros((8, 8, 3), np.uint8)), "not a batch"),
    "three images": (dict(arr_0=random_images(3)), "holds 3 images, fewer than 4"),
}


def write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.savez(path, **content)
    return str(path)


@pytest.fixture
def no_work(monkeypatch):
    """evaluate's network and features, replaced by tripwires: a check that comes after them fails."""
    def tripwire(*args, **kwargs):
        raise AssertionError("work started before the files were checked")
    monkeypatch.setattr(evaluate, "load_inception", tripwire)
    monkeypatch.setattr(evaluate, "features", tripwire)
    monkeypatch.setattr(evaluate, "npz_features", tripwire)


@pytest.fixture(scope="module")
def large_ref(tmp_path_factory):
    """A reference batch of 2,000 images (its size does not matter: only headers are read)."""
    ref = str(tmp_path_factory.mktemp("ref") / "ref.npz")
    np.savez(ref, arr_0=np.zeros((2000, 32, 32, 3), np.uint8))
    return ref


@pytest.mark.parametrize("name", SAMPLE_MISTAKES)
def test_a_bad_sample_file_is_refused_in_under_a_second_before_any_work(name, large_ref, tmp_path, no_work):
    """Guards: each bad sample file is a UserError before the Inception is loaded or a feature
    computed, in under a second beside a 2,000-image reference."""
    ref = large_ref
    content, words = SAMPLE_MISTAKES[name]
    samples = write(tmp_path / "samples.npz", content)
    start = time.perf_counter()
    with pytest.raises(util.UserError, match=re.escape(words)) as refused:
        evaluate.evaluate(ref, samples, "weights.pth", device="cpu")
    assert time.perf_counter() - start < 1.0
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("stats, words", [
    (dict(arr_0=object_array()), "arr_0 is an array of Python objects"),
    (dict(arr_0=random_images(4), mu=np.zeros(2048), sigma=np.eye(2048, 2000), mu_s=np.zeros(2023),
          sigma_s=np.eye(2023)), r"sigma float64 \(2048, 2000\)"),
    (dict(arr_0=random_images(4), mu=np.zeros(64), sigma=np.eye(64), mu_s=np.zeros(2023), sigma_s=np.eye(2023)),
     r"\(2048,\), \(2048, 2048\), \(2023,\), \(2023, 2023\) are needed"),
    (dict(arr_0=random_images(4), mu=np.zeros(2048, object), sigma=np.eye(2048), mu_s=np.zeros(2023),
          sigma_s=np.eye(2023)), "mu is an array of Python objects"),
], ids=["object arr_0", "sigma not square", "statistics of another network", "object mu"])
def test_a_bad_reference_is_refused_before_any_work(stats, words, tmp_path, no_work):
    """Guards: a reference whose arr_0 or precomputed statistics the evaluation cannot use is refused
    before any work, the statistics' sizes checked against the FID Inception's (2048, 2023)."""
    np.savez(tmp_path / "ref.npz", **stats)
    np.savez(tmp_path / "samples.npz", arr_0=random_images(4))
    with pytest.raises(util.UserError, match=words):
        evaluate.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "weights.pth", device="cpu")


def test_an_object_array_on_the_command_line_is_one_line_without_a_traceback(tmp_path):
    """Guards the issue's traceback: numpy's 'Object arrays cannot be loaded when allow_pickle=False'."""
    np.savez(tmp_path / "ref.npz", arr_0=random_images(4))
    np.savez(tmp_path / "samples.npz", arr_0=object_array())
    (tmp_path / "w.pth").write_bytes(b"not read")
    result = subprocess.run([sys.executable, "evaluate.py", str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"),
                             "--inception", str(tmp_path / "w.pth")], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ") and "array of Python objects" in lines[0]


def test_the_feature_cache_notices_a_file_rewritten_with_as_many_images(tmp_path):
    """Guards: samples of a new checkpoint written under the old name (same count, same size on
    disk) get their own features, not the cached ones of the old file (or the new checkpoint would
    get the old one's FID)."""
    net = StubInception()
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=random_images(10, seed=1))
    old = evaluate.npz_features(str(path), net, batch_size=4)
    size, mtime = os.stat(path).st_size, os.stat(path).st_mtime_ns
    np.savez(path, arr_0=random_images(10, seed=2))  # rewritten, as a later sample.py run would
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # a second later, even on a coarse clock
    assert os.stat(path).st_size == size
    new = evaluate.npz_features(str(path), net, batch_size=4)
    fresh = evaluate.features(net, random_images(10, seed=2), progress=False)
    assert not np.allclose(new["pool"], old["pool"])
    for k in fresh:
        np.testing.assert_allclose(new[k], fresh[k], rtol=1e-6, atol=1e-6)


def brute_force_coverage(points, others, k=3):
    """Share of `others` within some point's k-NN radius (the point itself the 0-th neighbour), float64."""
    d_self = ((points[:, None] - points[None]) ** 2).sum(-1)
    radii = np.sort(d_self, 1)[:, k]
    d = ((points[:, None] - others[None]) ** 2).sum(-1)  # (points, others)
    return float((d <= radii[:, None]).any(0).mean())


def test_metrics_puts_precision_and_recall_under_their_names(monkeypatch):
    """Guards the order in which metrics() hands reference and samples to precision_recall: on
    asymmetric sets, a tight cluster of samples inside a spread reference (precision 1, recall
    low), swapping them swaps the two numbers."""
    rng = np.random.default_rng(0)
    ref_pool = rng.standard_normal((40, 8))
    sample_pool = 0.05 * rng.standard_normal((40, 8))
    ref = {"pool": ref_pool, "mu": ref_pool.mean(0), "sigma": np.cov(ref_pool, rowvar=False),
           "mu_s": np.zeros(6), "sigma_s": np.eye(6)}
    samples = {"pool": sample_pool, "spatial": rng.standard_normal((40, 6)), "logits": rng.standard_normal((40, 5))}
    numbers = evaluate.metrics(ref, samples)
    precision = brute_force_coverage(ref_pool, sample_pool)  # samples inside the reference's manifold
    recall = brute_force_coverage(sample_pool, ref_pool)  # references inside the samples' manifold
    assert precision == 1.0 and recall < 0.5
    assert (numbers["precision"], numbers["recall"]) == (precision, recall)
