"""ADM's FID, sFID, Inception Score, precision and recall (ADM 2105.05233, App. of its evaluator), in PyTorch.

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples/x.npz --inception pt_inception-2015-12-05-6726825d.pth
    torchrun --nproc_per_node=8 evaluate.py REF.npz SAMPLES.npz --inception PATH

The network is the FID Inception-v3 (the TensorFlow graph of 2015-12-05 that ADM's evaluator and
every published ImageNet FID use), written out here and loaded strictly from the weights file that
pytorch-fid publishes. Features are fp32 with TF32 off; the metric math is float64 numpy.
"""
import contextlib
import hashlib
import json
import math
import os
import struct
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import util

WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"  # pytorch-fid names the file after its hash
FEATURE_SIZES = (2048, 2023)  # the pool and spatial features of the FID Inception (FID's and sFID's sizes)


# ----------------------------------------------------------------------------- the FID Inception-v3

class Conv(nn.Module):
    """conv (no bias) -> batch norm (TF's eps 0.001) -> ReLU, named as torchvision's BasicConv2d."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):
    # The TF graph averages over the valid pixels only at the border (count_include_pad=False),
    # unlike torchvision's Inception-v3.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # mixed, mixed_1, mixed_2 (35x35)
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], 1)


class BlockB(nn.Module):  # mixed_3: 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):  # mixed_4 .. mixed_7 (17x17)
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x, branch1x1=None):
        b1 = self.branch1x1(x) if branch1x1 is None else branch1x1
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([b1, b7, d, self.branch_pool(avg_pool(x))], 1)


class BlockD(nn.Module):  # mixed_8: 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):  # mixed_9 (average pool branch), mixed_10 (max pool branch) (8x8)
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # the TF graph's last block pools by max, not by average
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


def resize_tf1(x, size=299):
    """TF1's resize_bilinear (align_corners=False, no half-pixel centres): source = destination * in/out,
    floored, the next pixel clamped at the border; (N, C, H, W) float32 -> (N, C, size, size).

    This is not F.interpolate's mapping (source = (destination + 0.5) * in/out - 0.5), nor PIL's.
    """
    def taps(n_in):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        i0 = src.floor().long().clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), src - i0.float()

    y0, y1, ly = taps(x.shape[2])
    x0, x1, lx = taps(x.shape[3])
    # TF's arithmetic order: interpolate along W on the two rows, then along H.
    top, bottom = x[:, :, y0], x[:, :, y1]  # (N, C, size, W)
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * lx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * lx
    return top + (bottom - top) * ly[:, None]


class InceptionV3(nn.Module):
    """The FID Inception-v3; state_dict() has the keys and shapes of pt_inception-2015-12-05-6726825d.pth.

    forward(uint8 (N, H, W, 3)) -> pool_3 (N, 2048), mixed_6/conv's first 7 channels flattened
    channels-last (N, 17*17*7 = 2023), logits pool_3 @ fc.weight.T without the bias (N, 1008).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # 1008 classes; ADM uses only the weight (softmax/logits/MatMul)

    def forward(self, images):
        with strict_fp32(images.device.type):
            return self._forward(images)

    def _forward(self, images):
        x = images.permute(0, 3, 1, 2).float()  # (N, 3, H, W) in [0, 255]
        x = (resize_tf1(x) - 128) / 128  # (N, 3, 299, 299)
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        conv = self.Mixed_6d.branch1x1(x)  # mixed_6/conv (N, 192, 17, 17)
        spatial = conv[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)  # (N, 17, 17, 7) -> (N, 2023)
        x = self.Mixed_6e(self.Mixed_6d(x, branch1x1=conv))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean((2, 3))  # pool_3 (N, 2048)
        return pool, spatial, pool @ self.fc.weight.T


@contextlib.contextmanager
def strict_fp32(device_type):
    """fp32 arithmetic: no autocast and no TF32 in matmuls or convolutions (PyTorch lets cuDNN use
    TF32 by default, and FID moves with it); the caller's settings are restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_inception(path, device="cpu"):
    """The FID Inception from pytorch-fid's weights file, loaded strictly, in eval mode, fp32, on device."""
    if not path or not os.path.isfile(path):
        raise util.UserError(f"no Inception weights at {path}; download {WEIGHTS_URL} and pass its path to --inception")
    digest = sha256(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise util.UserError(f"{path} is not a PyTorch weights file ({reason}); download {WEIGHTS_URL}")
    net = InceptionV3()
    try:
        net.load_state_dict(state)  # strict: every key and shape of the FID Inception, nothing else
    except (RuntimeError, AttributeError, TypeError) as e:
        raise util.UserError(f"{path} is not the FID Inception-v3 ({str(e).splitlines()[0]}); download {WEIGHTS_URL}")
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        warnings.warn(f"{path} has the FID Inception's shapes but sha256 {digest[:8]}..., not {WEIGHTS_SHA256_PREFIX}...: "
                      f"numbers will not compare with published ones unless these are the weights of {WEIGHTS_URL}")
    net.weights_hash = digest[:16]
    return net.to(device).eval()


# ----------------------------------------------------------------------------- features

def features(net, images, batch_size=100, progress=True):
    """Features of uint8 (N, H, W, 3) images (numpy, memmap or tensor: this process's share) on net's device.

    Returns dict(pool=(N, 2048), spatial=(N, 2023), logits=(N, 1008)) float32 numpy (the network
    computes in strict fp32 whatever the caller's TF32 and autocast settings).
    """
    check_images(images)
    device = next(net.parameters()).device
    out = {"pool": [], "spatial": [], "logits": []}
    with torch.no_grad():
        for i in tqdm(range(0, len(images), batch_size), disable=not progress, desc="inception", unit="batch"):
            batch = torch.from_numpy(np.array(images[i:i + batch_size]))  # a writable copy of one batch
            if device.type == "cuda":
                batch = batch.pin_memory()
            pool, spatial, logits = net(batch.to(device, non_blocking=True))
            for k, v in zip(out, (pool, spatial, logits)):
                out[k].append(v.float().cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros((0, d), np.float32) for (k, v), d in zip(out.items(), (*FEATURE_SIZES, 1008))}


def check_images(images):
    """Images must be uint8 (N, H, W, 3), as ADM's evaluator and sample.py store them; say how they are not."""
    check_layout(tuple(images.shape), str(images.dtype).replace("torch.", ""))


def check_layout(shape, dtype):
    """check_images on an array's shape and dtype (a str) alone, e.g. read from an .npy header."""
    if len(shape) != 4:
        raise util.UserError(f"images of shape {shape} are not a batch (N, H, W, 3); arr_0 must be uint8 (N, H, W, 3)")
    if shape[-1] != 3 and shape[1] in (1, 3):
        raise util.UserError(f"images of shape {shape} look channels-first (N, C, H, W); "
                             "arr_0 must be channels-last uint8 (N, H, W, 3)")
    if shape[-1] != 3:
        raise util.UserError(f"images have {shape[-1]} channels (shape {shape}); arr_0 must be RGB uint8 (N, H, W, 3)")
    if dtype != "uint8":
        raise util.UserError(f"images are {dtype}; arr_0 must be uint8 in [0, 255] (N, H, W, 3), as sample.py writes it")


def gather_features(feats):
    """Every rank's features concatenated in rank order (the features unchanged without torch.distributed)."""
    if not util.distributed():
        return feats
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = {}
    for k, v in feats.items():
        v = torch.as_tensor(v, device=device)
        sizes = [torch.zeros((), dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor(len(v), device=device))
        longest = max(int(s) for s in sizes)
        padded = torch.cat([v, v.new_zeros(longest - len(v), *v.shape[1:])])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        out[k] = torch.cat([p[:int(s)] for p, s in zip(parts, sizes)]).cpu().numpy()
    return out


def npz_headers(path):
    """{name: (shape, dtype)} of the arrays in an .npz, from their .npy headers alone: no data is read
    and nothing is unpickled, so it takes milliseconds whatever the file's size."""
    if not os.path.isfile(path):
        raise util.UserError(f"no file at {path}; give an .npz with arr_0 uint8 (N, H, W, 3)")
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    headers = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if name.endswith(".npy"):
                    with zf.open(name) as f:
                        version = np.lib.format.read_magic(f)
                        if version not in read_header:
                            raise ValueError(f"{name} has .npy format version {version}")
                        shape, _, dtype = read_header[version](f)
                    headers[name[:-4]] = (shape, dtype)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise util.UserError(f"{path} is not an .npz that numpy wrote ({e}); give an .npz with arr_0 uint8 (N, H, W, 3)")
    return headers


def check_npz(path, reference=False, sizes=None):
    """Refuse a file that the evaluation could not use, before any network is loaded or feature
    computed. arr_0 must be uint8 (N, H, W, 3) with N >= 4, and a reference's
    precomputed statistics (ADM's mu, sigma, mu_s, sigma_s), when present, float (d,), (d, d), (d_s,),
    (d_s, d_s), with (d, d_s) = sizes when given (the FID Inception's FEATURE_SIZES). Arrays of
    Python objects are refused: numpy reads them only by unpickling."""
    headers = npz_headers(path)
    if "arr_0" not in headers:
        raise util.UserError(f"{path} has no arr_0 (it has {', '.join(headers) or 'nothing'}); "
                             "give an .npz with arr_0 uint8 (N, H, W, 3)")
    for name, (shape, dtype) in headers.items():
        if dtype.hasobject:
            raise util.UserError(f"{path}: {name} is an array of Python objects (e.g. a list of images saved by "
                                 "np.savez), which numpy reads only by unpickling; save np.stack(images), uint8 (N, H, W, 3)")
    shape, dtype = headers["arr_0"]
    try:
        check_layout(shape, str(dtype))
    except util.UserError as e:
        raise util.UserError(f"{path}: {e}") from None
    if shape[0] < 4:
        raise util.UserError(f"{path} holds {shape[0]} images, fewer than 4; precision and recall need 4 "
                             "(k + 1 neighbours), FID thousands")
    stats = ("mu", "sigma", "mu_s", "sigma_s")
    if reference and all(k in headers for k in stats):
        shapes = {k: headers[k][0] for k in stats}
        d, d_s = sizes or (shapes["mu"][0] if shapes["mu"] else None, shapes["mu_s"][0] if shapes["mu_s"] else None)
        want = dict(zip(stats, ((d,), (d, d), (d_s,), (d_s, d_s))))
        if None in (d, d_s) or any(shapes[k] != want[k] or headers[k][1].kind != "f" for k in stats):
            found = ", ".join(f"{k} {headers[k][1]} {shapes[k]}" for k in stats)
            raise util.UserError(f"{path} has precomputed statistics {found}, where float {', '.join(str(want[k]) for k in stats)} "
                                 "are needed; give the reference batch as published (or one without them)")


def read_images(path):
    """arr_0 of an .npz as uint8 (N, H, W, 3): memory-mapped when stored uncompressed (sample.py's
    ZIP_STORED), so 50K images are read batch by batch rather than held twice in memory."""
    check_npz(path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("arr_0.npy")
    images = None
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)  # the zip local file header: name and extra field lengths at bytes 26..30
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is not None:
                shape, fortran, dtype = read_header(f)
                if not fortran and not dtype.hasobject:
                    images = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape)
    if images is None:  # compressed (np.savez_compressed) or an unusual header: read it whole
        images = np.load(path)["arr_0"]
    check_images(images)
    return images


def shard(n):
    """This rank's contiguous share of n items, so gathering in rank order restores the order."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if util.distributed() else (0, 1)
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def npz_features(path, net, batch_size=100):
    """Features of an .npz's images on every rank, cached beside it by size, mtime and the weights' hash."""
    if not os.path.isfile(path):
        raise util.UserError(f"no file at {path}; give an .npz with arr_0 uint8 (N, H, W, 3)")
    st = os.stat(path)
    key = getattr(net, "weights_hash", None)
    cache = f"{path}.features-{st.st_size}-{st.st_mtime_ns}-{key}.npz" if key else None
    if cache and os.path.isfile(cache):
        with np.load(cache) as f:
            return {k: f[k] for k in ("pool", "spatial", "logits")}
    images = read_images(path)
    progress = not util.distributed() or dist.get_rank() == 0
    feats = gather_features(features(net, images[shard(len(images))], batch_size, progress))
    if cache and (not util.distributed() or dist.get_rank() == 0):
        tmp = cache + ".tmp.npz"
        try:  # atomic, so an interrupted write never leaves a truncated cache
            np.savez(tmp, **feats)
            os.replace(tmp, cache)
        except OSError as e:  # e.g. a read-only folder of reference batches: go on without a cache
            warnings.warn(f"could not cache the features of {path} beside it ({e}); they will be computed again next time")
    return feats


def check_features(name, feats):
    for k, v in feats.items():
        if not np.isfinite(v).all():
            raise util.UserError(f"{name}: the Inception's {k} features contain NaN or inf; check the images and the weights file")


def reference_statistics(ref_path, net, batch_size=100):
    """dict(mu, sigma, mu_s, sigma_s, pool) of a reference batch: ADM's precomputed statistics when the
    file has them (its images then serve only precision/recall), else computed from its images."""
    check_npz(ref_path, reference=True)
    feats = npz_features(ref_path, net, batch_size)
    check_features(ref_path, feats)
    stats = {"pool": feats["pool"]}
    with np.load(ref_path) as f:
        precomputed = all(k in f.files for k in ("mu", "sigma", "mu_s", "sigma_s"))
        if precomputed:
            stats.update({k: f[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s")})
    if not precomputed:
        stats["mu"], stats["sigma"] = mean_cov(feats["pool"])
        stats["mu_s"], stats["sigma_s"] = mean_cov(feats["spatial"])
    return stats


def mean_cov(x):
    x = x.astype(np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


# ----------------------------------------------------------------------------- the metrics (ADM's evaluator)

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) in float64 (Heusel et al., arXiv 1706.08500, eq. 6).

    tr sqrt(S1 S2) is the sum of the square roots of the eigenvalues of S1 S2 (the diagonal of the
    Schur form whose roots scipy's sqrtm takes), so no scipy is needed. As ADM's evaluator: when the
    product is singular, eps is added to both diagonals; an imaginary part that remains is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise util.UserError(f"reference and sample features differ in size ({mu1.shape[0]} vs {mu2.shape[0]}); "
                             "compute both with the same Inception")
    eig = np.linalg.eigvals(sigma1 @ sigma2)
    # scipy's sqrtm divides by sums of pairs of roots, so it returns non-finite values (and ADM
    # takes its fallback) when two eigenvalues are zero: a singular product, e.g. fewer samples than
    # feature dimensions or a feature that never varies. Zero here means zero to rounding.
    tiny = len(eig) * np.finfo(np.float64).eps * np.abs(eig).max(initial=0)
    if not np.isfinite(eig).all() or (np.abs(eig) <= tiny).sum() >= 2:
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(len(sigma1)) * eps
        eig = np.linalg.eigvals((sigma1 + offset) @ (sigma2 + offset))
    roots = np.sqrt(eig.astype(np.complex128))  # tiny negative eigenvalues give tiny imaginary roots
    if not np.allclose(roots.imag, 0, atol=1e-3):
        raise ValueError(f"the square root of the covariance product has imaginary parts up to {np.abs(roots.imag).max():.3g}; "
                         "the statistics are not covariances of real features")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * roots.real.sum())


def inception_score(logits, split_size=5000):
    """Mean over consecutive, unshuffled splits of split_size rows (the last may be shorter) of
    exp(E_x KL(p(y|x) || p(y))) with p(y|x) = softmax(logits) (Salimans et al., arXiv 1606.03498,
    Sec. 4), as ADM's evaluator. In log space, float64, so a class no sample predicts adds 0, not NaN."""
    logp = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), 1)  # (N, classes)
    scores = []
    for part in logp.split(split_size):
        log_marginal = torch.logsumexp(part, 0) - np.log(len(part))  # log p(y) over the split
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def _distances(u, v):
    """Squared distances |u|^2 - 2 u.v + |v|^2 clamped at 0, in fp16 as ADM's DistanceBlock, in fp32
    when fp16 overflows; (n, m) float32."""
    for dtype in (torch.float16, torch.float32):
        a, b = u.to(dtype), v.to(dtype)
        d = ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp(min=0)
        if dtype == torch.float32 or torch.isfinite(d).all():
            return d.float()


def _radii(x, k, block):
    """Each point's distance to its k-th nearest neighbour, the point itself counted as the 0-th."""
    radii = []
    for i in range(0, len(x), block):
        d = torch.cat([_distances(x[i:i + block], x[j:j + block]) for j in range(0, len(x), block)], 1)
        radii.append(d.kthvalue(k + 1, 1).values)
    return torch.cat(radii)


def precision_recall(ref_pool, sample_pool, k=3, block=10000, device=None):
    """(precision, recall) of Kynkaanniemi et al. (arXiv 1904.06991, Sec. 2) as ADM's ManifoldEstimator:
    precision is the share of samples within some reference's k-NN radius, recall the share of
    references within some sample's; on the GPU when there is one."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    ref, sam = (torch.as_tensor(np.asarray(x, np.float32), device=device) for x in (ref_pool, sample_pool))
    r_ref, r_sam = _radii(ref, k, block), _radii(sam, k, block)
    sam_in = torch.zeros(len(sam), dtype=torch.bool, device=device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    for i in range(0, len(ref), block):
        for j in range(0, len(sam), block):
            d = _distances(ref[i:i + block], sam[j:j + block])  # (refs, samples)
            sam_in[j:j + block] |= (d <= r_ref[i:i + block, None]).any(0)
            ref_in[i:i + block] |= (d <= r_sam[None, j:j + block]).any(1)
    return sam_in.double().mean().item(), ref_in.double().mean().item()


def metrics(ref, sample_feats):
    """The five numbers of samples' features against reference_statistics(); floats."""
    check_features("samples", sample_feats)
    if ref["pool"].shape[1] != sample_feats["pool"].shape[1] or len(ref["mu_s"]) != sample_feats["spatial"].shape[1]:
        raise util.UserError(f"reference and sample features differ in size ({len(ref['mu'])}/{len(ref['mu_s'])} vs "
                             f"{sample_feats['pool'].shape[1]}/{sample_feats['spatial'].shape[1]}); compute both with the same Inception")
    mu, sigma = mean_cov(sample_feats["pool"])
    mu_s, sigma_s = mean_cov(sample_feats["spatial"])
    precision, recall = precision_recall(ref["pool"], sample_feats["pool"])
    return {"inception_score": inception_score(sample_feats["logits"]),
            "fid": frechet_distance(ref["mu"], ref["sigma"], mu, sigma),
            "sfid": frechet_distance(ref["mu_s"], ref["sigma_s"], mu_s, sigma_s),
            "precision": precision, "recall": recall}


# ----------------------------------------------------------------------------- memorization

def memorized_fraction(samples, train_set, threshold=1 / 3, block=4096, device=None):
    """The share of samples that copy a training image: d1 / d2 < threshold, d1 and d2 the L2
    distances to the nearest and the second-nearest training image (Bonnaire et al., arXiv
    2505.17638, Sec. 2 and their compute_fmem.py, on raw pixels; here in whatever space the two
    sets share: pixels for the built-in data, latents for prepared data).

    samples: (N, ...) tensor or array; train_set: (K, ...) anything that slices into row blocks
    (a tensor, a numpy array or memmap, train.TrainingLatents), read twice, `block` rows at a time,
    so it need not fit in memory. A training image present several times counts once: d2 is the
    distance to the nearest training point that differs from the nearest one (to rounding), so a
    copy of a duplicated image is memorized, not a tie. float64 (TF32 or fp16 would blur the
    distances of near copies), on the GPU when there is one. Returns a float in [0, 1].
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    def rows(a):  # a tensor, or an array (a copy: memmaps are read-only) -> (n, D) float64 on the device
        return (a if torch.is_tensor(a) else torch.from_numpy(np.array(a))).to(device, torch.float64).flatten(1)

    x = rows(samples)  # (N, D)
    x_norm = (x * x).sum(1, keepdim=True)  # (N, 1)

    def blocks():  # (B, D) blocks of the training set
        for start in range(0, len(train_set), block):
            yield rows(train_set[start:start + block])

    def squared(a, a_norm, b):  # (n, B): |a|^2 - 2 a.b + |b|^2, clamped at 0
        return (a_norm - 2 * a @ b.T + (b * b).sum(1)[None]).clamp(min=0)

    # Pass 1: each sample's nearest training point (its squared distance d1^2 and the point itself).
    d1 = torch.full((len(x),), math.inf, dtype=torch.float64, device=device)
    nearest = torch.zeros_like(x)
    for b in blocks():
        dist = squared(x, x_norm, b)  # (N, B)
        best, index = dist.min(1)
        closer = best < d1
        d1 = torch.where(closer, best, d1)
        nearest[closer] = b[index[closer]]
    # Pass 2: the nearest training point that is not a copy of the nearest one (d2^2).
    near_norm = (nearest * nearest).sum(1, keepdim=True)  # (N, 1)
    d2 = torch.full_like(d1, math.inf)
    for b in blocks():
        dist = squared(x, x_norm, b)
        same = squared(nearest, near_norm, b) <= 1e-12 * (near_norm + (b * b).sum(1)[None])  # a copy of it
        d2 = torch.minimum(d2, dist.masked_fill(same, math.inf).amin(1))
    if torch.isinf(d2).any():
        raise ValueError("the training set holds fewer than two distinct images; memorization needs two")
    return (d1 < threshold ** 2 * d2).double().mean().item()


# ----------------------------------------------------------------------------- the script

def evaluate(ref_path, sample_path, inception_path, batch_size=100, device=None, results=None, extra=None):
    """The five numbers of an .npz of samples against a reference batch; on rank 0 prints ADM's lines
    and appends one JSON line to `results` (default: evaluations.jsonl beside the samples), with the
    settings in `extra` (e.g. sample.py's sampler flags) added to it."""
    for path, reference in ((ref_path, True), (sample_path, False)):  # in milliseconds, before any work
        check_npz(path, reference, FEATURE_SIZES)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    net = load_inception(inception_path, device)
    start = time.time()
    ref = reference_statistics(ref_path, net, batch_size)
    numbers = metrics(ref, npz_features(sample_path, net, batch_size))
    if not util.distributed() or dist.get_rank() == 0:
        print(f"Inception Score: {numbers['inception_score']}")
        print(f"FID: {numbers['fid']}")
        print(f"sFID: {numbers['sfid']}")
        print(f"Precision: {numbers['precision']}")
        print(f"Recall: {numbers['recall']}")
        results = results or os.path.join(os.path.dirname(os.path.abspath(sample_path)), "evaluations.jsonl")
        line = {**numbers, "ref": os.path.abspath(ref_path), "samples": os.path.abspath(sample_path),
                "inception": os.path.abspath(inception_path), "inception_sha256": net.weights_hash,
                "batch_size": batch_size, "seconds": round(time.time() - start, 1), **(extra or {})}
        with open(results, "a") as f:
            f.write(json.dumps(line) + "\n")
    return numbers


def make_parser():
    p = util.ArgumentParser(description=__doc__)
    p.add_argument("ref", help="reference batch .npz (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("samples", help=".npz of samples with arr_0 uint8 (N, H, W, 3), as sample.py writes")
    p.add_argument("--inception", required=True, help=f"pt_inception-2015-12-05-6726825d.pth from {WEIGHTS_URL}")
    p.add_argument("--batch-size", type=util.number(int, 1), default=250, help="images per Inception forward, per process")
    p.add_argument("--device", default=None, help="default: this process's GPU, else cpu")
    p.add_argument("--results", default=None, help="JSON lines file to append to; default: evaluations.jsonl beside the samples")
    return p


def main(argv=None):
    args = make_parser().parse_args(argv)
    processes = util.setup_processes()
    try:
        evaluate(args.ref, args.samples, args.inception, args.batch_size, args.device or processes.device, args.results)
    finally:
        util.cleanup_processes()


if __name__ == "__main__":
    util.run(main)
