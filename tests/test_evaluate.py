"""evaluate.py against closed forms, brute force, hand-computed values and torchvision's Inception-v3.

The expected values here never come from evaluate.py itself: the Frechet distance is checked
against closed forms and a second (symmetric) float64 route, the Inception Score against cases
computed by hand, precision/recall against a brute-force numpy k-NN, the resize against values
worked out by hand, and the network against torchvision's Inception3 (whose key names the
pytorch-fid weights file uses) with the FID graph's pooling put back in.
"""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
import util
from ports import retry_on_busy_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- Frechet distance

def random_cov(rng, d, n):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)
    return np.cov(x, rowvar=False)


def test_frechet_1d_is_mean_and_std_gap():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2.
    assert evaluate.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, rel=1e-12)


def test_frechet_equal_means_diagonal_covariances():
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert evaluate.frechet_distance(np.zeros(4), np.diag(a), np.zeros(4), np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_rotated_covariances_with_shared_axes():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: tr sqrt(S1 S2) = sum sqrt(a b).
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = evaluate.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_is_invariant_to_a_common_rotation():
    rng = np.random.default_rng(1)
    s1, s2 = random_cov(rng, 8, 50), random_cov(rng, 8, 50)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    base = evaluate.frechet_distance(mu1, s1, mu2, s2)
    assert evaluate.frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T) == pytest.approx(base, rel=1e-10)


def test_frechet_of_identical_statistics_is_zero():
    rng = np.random.default_rng(2)
    s = random_cov(rng, 64, 500)
    mu = rng.standard_normal(64)
    assert abs(evaluate.frechet_distance(mu, s, mu, s)) < 1e-10 * np.trace(s)


def symmetric_route(mu1, s1, mu2, s2):
    """tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), the symmetric PSD form of what scipy's sqrtm computes."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()


def test_frechet_matches_the_symmetric_float64_route_on_2048d():
    rng = np.random.default_rng(3)
    d = 2048
    a, b = (rng.standard_normal((d, d + 512)) * rng.uniform(0.1, 2, (d, 1)) for _ in range(2))
    s1, s2 = a @ a.T / (d + 512), b @ b.T / (d + 512)  # full-rank, unevenly scaled covariances
    mu1, mu2 = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1
    expected = symmetric_route(mu1, s1, mu2, s2)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_singular_product_takes_adms_epsilon_fallback():
    # 5 samples in 16 dimensions: rank-4 covariances, so the product has 12 zero eigenvalues.
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((5, 16)), rng.standard_normal((5, 16))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    with pytest.warns(UserWarning, match="adding 1e-06 to diagonal"):
        got = evaluate.frechet_distance(x.mean(0), s1, y.mean(0), s2)
    eye = np.eye(16) * 1e-6
    assert got == pytest.approx(symmetric_route(x.mean(0), s1 + eye, y.mean(0), s2 + eye) - 2 * 16e-6, rel=1e-8)


def test_frechet_full_rank_takes_no_fallback():
    rng = np.random.default_rng(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate.frechet_distance(np.zeros(16), random_cov(rng, 16, 100), np.zeros(16), random_cov(rng, 16, 100))


def test_frechet_imaginary_square_root_is_an_error():
    # A "covariance" with a negative eigenvalue has no real square root: never a silent number.
    with pytest.raises(ValueError, match="imaginary"):
        evaluate.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -4.0]))


def test_frechet_of_different_sizes_is_a_user_error():
    with pytest.raises(util.UserError, match="differ in size"):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------- Inception Score

def test_inception_score_of_uniform_predictions_is_one():
    assert evaluate.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)


def one_hot_logits(classes, num_classes=1008, margin=1e4):
    logits = np.zeros((len(classes), num_classes))
    logits[np.arange(len(classes)), classes] = margin
    return logits


def test_inception_score_of_k_classes_evenly_spread_is_k():
    for k in (1, 2, 5, 10):
        assert evaluate.inception_score(one_hot_logits(np.arange(400) % k)) == pytest.approx(k, rel=1e-12)


def test_inception_score_uses_consecutive_unshuffled_splits_of_5000():
    # 12,000 rows -> splits of 5,000, 5,000, 2,000 with 2, 1 and 4 classes evenly spread: (2 + 1 + 4) / 3.
    logits = np.concatenate([one_hot_logits(np.arange(5000) % 2), np.zeros((5000, 1008)),
                             one_hot_logits(np.arange(2000) % 4)])
    assert evaluate.inception_score(logits) == pytest.approx(7 / 3, rel=1e-12)
    shuffled = logits[np.random.default_rng(0).permutation(len(logits))]
    assert abs(evaluate.inception_score(shuffled) - 7 / 3) > 0.1


def test_inception_score_matches_the_probability_formula():
    # ADM's formula on softmax probabilities: mean over splits of exp(mean_x sum_y p (log p - log mean p)).
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((700, 50)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = [np.exp((q * (np.log(q) - np.log(q.mean(0, keepdims=True)))).sum(1).mean()) for q in (p[:300], p[300:600], p[600:])]
    assert evaluate.inception_score(logits, split_size=300) == pytest.approx(np.mean(scores), rel=1e-12)


# ----------------------------------------------------------------------------- precision and recall

def brute_force_pr(ref, sam, k=3):
    """k-NN manifolds in float64 with the point itself as its own 0-th neighbour, membership by <=."""
    def dist(u, v):
        return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
    r_ref = np.sort(dist(ref, ref), 1)[:, k]
    r_sam = np.sort(dist(sam, sam), 1)[:, k]
    d = dist(ref, sam)  # (refs, samples)
    return (d <= r_ref[:, None]).any(0).mean(), (d <= r_sam[None, :]).any(1).mean()


def test_precision_recall_match_brute_force():
    # Small integer coordinates: every distance is exact in fp16, so ties are real ties.
    rng = np.random.default_rng(7)
    for trial in range(3):
        ref = rng.integers(-4, 5, (37, 4)).astype(np.float32)
        sam = rng.integers(-4, 5, (29, 4)).astype(np.float32) + trial
        expected = brute_force_pr(ref.astype(np.float64), sam.astype(np.float64))
        for block in (10000, 7):  # one block, and blocks that split both sets unevenly
            got = evaluate.precision_recall(ref, sam, block=block, device="cpu")
            assert got == pytest.approx(expected, abs=1e-12)


def test_precision_counts_a_sample_exactly_on_the_radius_with_the_point_itself_as_a_neighbour():
    # References 0, 1, 2, 3 and a far cluster 100..103. With k = 3 counting the point itself, the
    # radius of reference 0 is its 4th smallest squared distance (0, 1, 4, 9): 9. A sample at -3 lies
    # exactly on it and is inside (membership by <=); -3.5 (12.25) is outside every radius. The
    # samples at 50..53 are inside only if the radius were the 5th smallest (100^2).
    ref = np.array([[0.0], [1.0], [2.0], [3.0], [100.0], [101.0], [102.0], [103.0]], np.float32)
    sam = np.array([[-3.0], [-3.5], [50.0], [51.0], [52.0], [53.0]], np.float32)
    precision, _ = evaluate.precision_recall(ref, sam, device="cpu")
    assert precision == pytest.approx(1 / 6)  # strict < or the 3rd smallest (radius 4) give 0


def test_recall_is_the_share_of_references_inside_the_sample_manifold():
    ref = np.array([[0.0], [10.0], [20.0], [30.0], [40.0]], np.float32)  # reference 0's radius: 30^2
    sam = np.array([[0.0], [1.0], [2.0], [3.0]], np.float32)  # radii 9, 4, 4, 9
    precision, recall = evaluate.precision_recall(ref, sam, device="cpu")
    assert recall == pytest.approx(1 / 5)  # only reference 0 is within a sample's radius
    assert precision == 1.0  # every sample is within 30^2 of reference 0


def test_precision_recall_fall_back_to_fp32_when_fp16_overflows():
    # Squared distances of order 1e5 overflow fp16 (max 65504); the fp32 fallback gives the same
    # memberships as at unit scale, since precision and recall do not change with the scale.
    rng = np.random.default_rng(8)
    ref = rng.integers(-5, 6, (30, 4)).astype(np.float32)
    sam = rng.integers(-5, 6, (25, 4)).astype(np.float32)
    expected = brute_force_pr(ref.astype(np.float64), sam.astype(np.float64))
    assert evaluate.precision_recall(ref * 100, sam * 100, device="cpu") == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- TF1 resize

def test_tf1_resize_2x2_to_4x4_by_hand():
    # source = destination * in/out (0, 0.5, 1, 1.5), the next pixel clamped at the border.
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    expected = torch.tensor([[1.0, 1.5, 2.0, 2.0],
                             [2.0, 2.5, 3.0, 3.0],
                             [3.0, 3.5, 4.0, 4.0],
                             [3.0, 3.5, 4.0, 4.0]])
    assert torch.allclose(evaluate.resize_tf1(x, 4)[0, 0], expected, atol=1e-6)


def test_tf1_resize_4x4_to_6x6_by_hand():
    # x[h, w] = 10 h + w is linear, so bilinear output is 10 s(i) + s(j) where s is the clamped
    # source coordinate: destination * 4/6 = 0, 2/3, 4/3, 2, 8/3, 10/3 -> the last one clamps to 3.
    x = (10 * torch.arange(4.0)[:, None] + torch.arange(4.0)[None])[None, None]
    s = torch.tensor([0, 2 / 3, 4 / 3, 2, 8 / 3, 3])
    expected = 10 * s[:, None] + s[None]
    got = evaluate.resize_tf1(x, 6)[0, 0]
    assert torch.allclose(got, expected, atol=1e-5)
    # A non-linear image: a single bright pixel at (1, 2) spreads with weights (1 - ly)(1 - lx) etc.
    y = torch.zeros(1, 1, 4, 4)
    y[0, 0, 1, 2] = 1.0
    w = torch.tensor([0, 2 / 3, 2 / 3, 0, 0, 0])  # weight of source row 1 in each destination row
    v = torch.tensor([0, 0, 1 / 3, 1, 1 / 3, 0])  # weight of source column 2 in each destination column
    assert torch.allclose(evaluate.resize_tf1(y, 6)[0, 0], w[:, None] * v[None], atol=1e-6)
    # ... and it is not the half-pixel mapping of F.interpolate (nor, therefore, of PIL).
    half_pixel = F.interpolate(x, size=6, mode="bilinear", align_corners=False)[0, 0]
    assert (half_pixel - got).abs().max() > 0.5


def test_tf1_resize_to_the_same_size_is_the_identity():
    x = torch.rand(2, 3, 9, 9)
    assert torch.equal(evaluate.resize_tf1(x, 9), x)


# ----------------------------------------------------------------------------- the network

def torchvision_inception():
    import torchvision  # installed with timm (requirements.txt)
    return torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)


def test_state_dict_has_the_keys_and_shapes_of_the_weights_file():
    # pytorch-fid loads pt_inception-2015-12-05-6726825d.pth strictly into torchvision's Inception3
    # (aux_logits=False, 1008 classes), so that network's state dict is the file's layout.
    ours = {k: tuple(v.shape) for k, v in evaluate.InceptionV3().state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in torchvision_inception().state_dict().items()}
    assert ours == theirs
    # A few entries written out by hand: the stem, the sFID layer, the last block, the classifier.
    assert ours["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert ours["Mixed_6d.branch1x1.conv.weight"] == (192, 768, 1, 1)
    assert ours["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert ours["fc.weight"] == (1008, 2048) and ours["fc.bias"] == (1008,)
    assert len([k for k in ours if k.endswith(".conv.weight")]) == 94


def randomize(net, seed=0):
    """Random weights and batch-norm statistics of a realistic scale (so no layer is the identity and
    activations neither vanish nor explode), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            noise = torch.randn(t.shape, generator=g) if t.is_floating_point() else None
            if name.endswith(".conv.weight"):
                t.copy_(noise * (2 / t[0].numel()) ** 0.5)
            elif name.endswith("bn.weight"):
                t.copy_(1 + 0.1 * noise)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("bn.bias", "running_mean")):
                t.copy_(0.1 * noise)
            elif name.startswith("fc."):
                t.copy_(noise / 2048 ** 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def net():
    return randomize(evaluate.InceptionV3())


def test_forward_matches_torchvision_with_the_fid_graphs_pooling(net, monkeypatch):
    # torchvision's Inception3 with the FID graph's pooling put back (as pytorch-fid's FIDInception*
    # blocks do): average pools exclude the padding, and the last block's pool branch is a max pool.
    import torchvision.models.inception as tv
    images = torch.randint(0, 256, (2, 299, 299, 3), dtype=torch.uint8)  # 299: the resize is the identity
    with torch.no_grad():
        pool, spatial, logits = net(images)
    assert pool.std() > 0.1 and spatial.std() > 0.1  # activations of a realistic scale

    reference = torchvision_inception().eval()
    reference.load_state_dict(net.state_dict())
    in_last_block, avg_pool2d = [], F.avg_pool2d

    def fid_avg_pool(x, kernel_size, stride=None, padding=0, **kwargs):
        if in_last_block:
            return F.max_pool2d(x, kernel_size, stride, padding)
        return avg_pool2d(x, kernel_size, stride, padding, count_include_pad=False)

    monkeypatch.setattr(tv.F, "avg_pool2d", fid_avg_pool)
    reference.Mixed_7c.register_forward_pre_hook(lambda m, i: in_last_block.append(1))
    seen = {}
    reference.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("spatial", o))
    reference.avgpool.register_forward_hook(lambda m, i, o: seen.setdefault("pool", o.flatten(1)))
    with torch.no_grad():
        expected_logits = reference((images.permute(0, 3, 1, 2).float() - 128) / 128)
    assert in_last_block  # the patched pooling was used
    assert torch.allclose(pool, seen["pool"], rtol=1e-4, atol=1e-5)
    expected_spatial = seen["spatial"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.allclose(spatial, expected_spatial, rtol=1e-4, atol=1e-5)
    assert torch.allclose(logits, expected_logits - reference.fc.bias, rtol=1e-4, atol=1e-4)  # no bias, as ADM
    assert not torch.allclose(logits, expected_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [256, 64])
def test_output_shapes(net, size):
    images = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    with torch.no_grad():
        pool, spatial, logits = net(images)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 7 * 17 * 17) and logits.shape == (2, 1008)
    assert pool.dtype == spatial.dtype == logits.dtype == torch.float32


def test_spatial_features_are_flattened_channels_last(net):
    out = {}
    handle = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: out.setdefault("x", o))
    try:
        with torch.no_grad():
            _, spatial, _ = net(torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8))
    finally:
        handle.remove()
    conv = out["x"]  # (1, 192, 17, 17), after the ReLU
    assert (conv >= 0).all()
    for c, h, w in [(0, 0, 0), (6, 0, 0), (0, 0, 1), (3, 5, 11), (6, 16, 16)]:
        assert spatial[0, (h * 17 + w) * 7 + c] == conv[0, c, h, w]


def test_input_is_resized_then_normalised_as_the_tf_graph(net):
    # The network sees (resize_tf1(x) - 128) / 128: feeding the resized image at 299 gives the same.
    images = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    resized = evaluate.resize_tf1(images.permute(0, 3, 1, 2).float())  # (1, 3, 299, 299) float
    with torch.no_grad():
        a = net(images)[0]
        conv_in = {}
        h = net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, i: conv_in.setdefault("x", i[0]))
        net(images)
        h.remove()
    assert torch.allclose(conv_in["x"], (resized - 128) / 128, atol=1e-6)
    assert a.shape == (1, 2048)


# ----------------------------------------------------------------------------- loading the weights

def test_load_inception_reads_the_weights_file_strictly(net, tmp_path):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)  # as an older torch wrote it: no num_batches_tracked
    with pytest.warns(UserWarning, match="sha256"):  # not the published file's hash
        loaded = evaluate.load_inception(str(path))
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert not loaded.training


def test_missing_weights_file_says_where_it_comes_from(tmp_path):
    with pytest.raises(util.UserError, match="pytorch-fid/releases"):
        evaluate.load_inception(str(tmp_path / "nothing.pth"))


def test_torchvisions_imagenet_inception_is_refused(tmp_path):
    import torchvision
    other = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)  # 1000 classes
    torch.save(other.state_dict(), tmp_path / "inception.pth")
    with pytest.raises(util.UserError, match="not the FID Inception"):
        evaluate.load_inception(str(tmp_path / "inception.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a weights file")
    with pytest.raises(util.UserError, match="not a PyTorch weights file"):
        evaluate.load_inception(str(tmp_path / "junk.pth"))


# ----------------------------------------------------------------------------- files and the pipeline

class StubInception(torch.nn.Module):
    """A cheap stand-in for the network (small feature sizes keep the metric math fast): features are
    fixed random functions of the image's mean colour per quadrant, so different images give
    different, repeatable features."""

    def __init__(self, pool=32, spatial=24, classes=10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(12, pool + spatial + classes, generator=g))
        self.sizes = (pool, spatial, classes)
        self.calls = 0
        self.weights_hash = "stub"

    def forward(self, images):
        self.calls += 1
        x = images.float() / 255  # (N, H, W, 3)
        h, w = x.shape[1] // 2, x.shape[2] // 2
        quads = torch.cat([x[:, :h, :w].mean((1, 2)), x[:, :h, w:].mean((1, 2)),
                           x[:, h:, :w].mean((1, 2)), x[:, h:, w:].mean((1, 2))], 1)  # (N, 12)
        return (quads @ self.w).split(self.sizes, 1)


def random_images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_read_images_memory_maps_stored_npz_and_reads_compressed(tmp_path):
    images = random_images(5)
    np.savez(tmp_path / "stored.npz", images)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    stored = evaluate.read_images(str(tmp_path / "stored.npz"))
    assert isinstance(stored, np.memmap) and np.array_equal(stored, images)
    assert np.array_equal(evaluate.read_images(str(tmp_path / "compressed.npz")), images)


def test_samples_written_by_sample_py_are_read_back(tmp_path):
    import sample
    images = random_images(7, size=8, seed=1)
    parts = []
    for i, chunk in enumerate((images[:4], images[4:])):
        parts.append(str(tmp_path / f"{i:06d}.npz"))
        np.savez(parts[-1], images=chunk, labels=np.zeros(len(chunk), np.int64))
    sample.write_npz(str(tmp_path / "samples.npz"), parts, images.shape)
    assert np.array_equal(evaluate.read_images(str(tmp_path / "samples.npz")), images)


def test_reference_statistics_use_precomputed_values_when_present(tmp_path):
    net = StubInception()
    images = random_images(40)
    rng = np.random.default_rng(0)
    given = {"mu": rng.standard_normal(32), "sigma": np.eye(32) * 2,
             "mu_s": rng.standard_normal(24), "sigma_s": np.eye(24) * 3}
    np.savez(tmp_path / "with.npz", arr_0=images, **given)
    np.savez(tmp_path / "without.npz", arr_0=images)
    with_stats = evaluate.reference_statistics(str(tmp_path / "with.npz"), net, batch_size=16)
    for k, v in given.items():
        assert np.array_equal(with_stats[k], v)
    without = evaluate.reference_statistics(str(tmp_path / "without.npz"), net, batch_size=16)
    with torch.no_grad():
        pool, spatial, _ = net(torch.as_tensor(images))
    assert np.allclose(without["mu"], pool.double().mean(0).numpy(), rtol=1e-6, atol=1e-6)
    assert np.allclose(without["sigma"], np.cov(pool.double().numpy(), rowvar=False), rtol=1e-5, atol=1e-6)
    assert np.allclose(without["sigma_s"], np.cov(spatial.double().numpy(), rowvar=False), rtol=1e-5, atol=1e-6)
    # Precision/recall always use the reference's images.
    assert np.allclose(with_stats["pool"], pool.numpy(), rtol=1e-6, atol=1e-6)


def test_features_are_cached_beside_the_npz_and_refreshed_when_it_changes(tmp_path):
    net = StubInception()
    path = tmp_path / "x.npz"
    np.savez(path, arr_0=random_images(10))
    first = evaluate.npz_features(str(path), net, batch_size=4)
    calls = net.calls
    again = evaluate.npz_features(str(path), net, batch_size=4)
    assert net.calls == calls  # read from the cache
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(p.name.startswith("x.npz.features-") for p in tmp_path.iterdir())
    np.savez(path, arr_0=random_images(12, seed=5))  # another file under the same name
    changed = evaluate.npz_features(str(path), net, batch_size=4)
    assert net.calls > calls and len(changed["pool"]) == 12


def test_evaluate_prints_adms_lines_and_appends_a_json_line(tmp_path, monkeypatch, capsys):
    net = StubInception()
    monkeypatch.setattr(evaluate, "load_inception", lambda path, device="cpu": net)
    np.savez(tmp_path / "ref.npz", arr_0=random_images(60, seed=1))
    np.savez(tmp_path / "samples.npz", arr_0=random_images(50, seed=2))
    numbers = evaluate.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "weights.pth",
                                batch_size=16, device="cpu", extra={"cfg_scale": 2.3})
    lines = capsys.readouterr().out.strip().splitlines()[-5:]
    labels = ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    keys = ["inception_score", "fid", "sfid", "precision", "recall"]
    for line, label, key in zip(lines, labels, keys):
        assert line == f"{label}: {numbers[key]}"
    row = json.loads((tmp_path / "evaluations.jsonl").read_text().splitlines()[-1])
    assert {k: row[k] for k in keys} == numbers and row["cfg_scale"] == 2.3
    assert row["samples"] == str(tmp_path / "samples.npz")


def test_samples_against_themselves_give_zero_fid_and_full_precision_recall(tmp_path, monkeypatch):
    net = StubInception(pool=8, spatial=6, classes=5)
    monkeypatch.setattr(evaluate, "load_inception", lambda path, device="cpu": net)
    np.savez(tmp_path / "a.npz", arr_0=random_images(30, seed=3))
    numbers = evaluate.evaluate(str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "w.pth", device="cpu")
    assert abs(numbers["fid"]) < 1e-8 and abs(numbers["sfid"]) < 1e-8
    assert numbers["precision"] == 1.0 and numbers["recall"] == 1.0


# ----------------------------------------------------------------------------- mistakes

@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 8, 8, 3), np.float32), "float32"),
    (np.zeros((2, 3, 8, 8), np.uint8), "channels-first"),
    (np.zeros((2, 8, 8, 1), np.uint8), "1 channels"),
    (np.zeros((8, 8, 3), np.uint8), "not a batch"),
])
def test_images_that_are_not_uint8_nhwc_rgb_are_refused(tmp_path, array, message):
    np.savez(tmp_path / "bad.npz", arr_0=array)
    with pytest.raises(util.UserError, match=message):
        evaluate.read_images(str(tmp_path / "bad.npz"))


def test_npz_without_arr_0_is_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", images=random_images(2))
    with pytest.raises(util.UserError, match="no arr_0.*images"):
        evaluate.read_images(str(tmp_path / "bad.npz"))
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(util.UserError, match="not an .npz"):
        evaluate.read_images(str(tmp_path / "text.npz"))


def test_nan_features_and_mismatched_sizes_are_refused():
    rng = np.random.default_rng(0)
    ref = {"pool": rng.standard_normal((20, 8)), "mu": np.zeros(8), "sigma": np.eye(8),
           "mu_s": np.zeros(6), "sigma_s": np.eye(6)}
    bad = {"pool": rng.standard_normal((20, 8)), "spatial": rng.standard_normal((20, 6)), "logits": rng.standard_normal((20, 5))}
    bad["pool"][3, 2] = np.nan
    with pytest.raises(util.UserError, match="NaN"):
        evaluate.metrics(ref, bad)
    other = {"pool": rng.standard_normal((20, 9)), "spatial": rng.standard_normal((20, 6)), "logits": rng.standard_normal((20, 5))}
    with pytest.raises(util.UserError, match="differ in size"):
        evaluate.metrics(ref, other)


def test_command_line_mistake_is_one_line(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=random_images(4))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), str(tmp_path / "ref.npz"),
                             str(tmp_path / "ref.npz"), "--inception", str(tmp_path / "missing.pth")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error: no Inception weights") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- several processes

def _features_on_rank(rank, world_size, port, path, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        feats = evaluate.npz_features(path, StubInception(), batch_size=3)
        if rank == 0:
            np.savez(out, **feats)
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_features_of_one_in_the_same_order(tmp_path):
    # 11 images over 2 ranks: unequal shares (5 and 6), gathered back in the file's order.
    path = str(tmp_path / "x.npz")
    np.savez(path, arr_0=random_images(11, seed=4))
    one = {k: v for k, v in evaluate.features(StubInception(), evaluate.read_images(path), progress=False).items()}
    def spawn(port):  # -> the text of a failure, "" when both ranks succeeded
        try:
            torch.multiprocessing.spawn(_features_on_rank, args=(2, port, path, str(tmp_path / "two.npz")), nprocs=2)
        except torch.multiprocessing.ProcessRaisedException as e:
            return str(e)
        return ""
    failure = retry_on_busy_port(spawn)
    assert not failure, failure
    with np.load(tmp_path / "two.npz") as two:
        for k in one:
            assert np.allclose(two[k], one[k], rtol=1e-6, atol=1e-6), k


def test_the_network_computes_in_fp32_under_autocast_and_restores_tf32_settings(net):
    images = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    seen = []
    hook = net.Conv2d_1a_3x3.register_forward_pre_hook(
        lambda m, i: seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # a caller's TF32
        with torch.no_grad():
            plain = net(images)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                autocast = net(images)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored
    finally:
        hook.remove()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert seen == [(False, False), (False, False)]  # off while the network runs
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(autocast, plain))


def test_a_missing_npz_is_a_user_error_not_a_traceback(tmp_path):
    with pytest.raises(util.UserError, match="no file at"):
        evaluate.npz_features(str(tmp_path / "missing.npz"), StubInception())
