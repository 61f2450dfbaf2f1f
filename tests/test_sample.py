"""Specification of sample.py: grids and the FID .npz from a train.py checkpoint, resumable
parts, samples fixed by (seed, index), a checkpoint in the official release's layout, and the
wiring a user relies on: every flag reaches the sampler, the EMA by default, decoding of
z / scaling_factor, the .npz layout, balanced labels, the same .npz on any number of processes,
the evaluation after sampling, and one-line errors for user mistakes."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import flow
import sample
import train
import util
from encoder import AutoencoderKL
from model import SiT_models, read_checkpoint
from ports import run_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10  # of the built-in run


def tile_grid_size(rows, cols, tile):
    """(width, height) of a save_grid PNG: a 2-pixel border before every tile and after the last."""
    return cols * (2 + tile) + 2, rows * (2 + tile) + 2


def run_sample(*flags):
    sample.main(sample.get_args(list(map(str, flags))))


def npz_images(path):
    with np.load(path) as f:
        assert f.files == ["arr_0"]  # what the ADM evaluator reads
        return f["arr_0"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A train.py checkpoint of the built-in SiT-T/4 (10 classes, 32x32 pixels) after 2 steps;
    EMA decay 0 makes the sampled EMA the trained model."""
    out = tmp_path_factory.mktemp("runs")
    train.main(train.get_args(["--output-dir", str(out), "--global-batch-size", "8", "--max-train-steps", "2",
                               "--sample-steps", "2", "--ema-decay", "0"]))
    return out / "SiT-T-4-builtin" / "checkpoints" / "0000002.pt"


def test_grid_has_a_row_per_class_and_per_class_columns(ckpt, tmp_path):
    out = tmp_path / "grid.png"
    run_sample("--ckpt", ckpt, "--out", out, "--classes", 1, 2, 3, "--per-class", 4, "--num-steps", 2)
    with Image.open(out) as image:
        assert image.mode == "RGB" and image.size == tile_grid_size(3, 4, 32)
        grid = np.asarray(image)
    assert grid[:2].max() == 0 and grid[:, :2].max() == 0  # the border is black
    tile = grid[2:34, 2:34]
    assert tile.std() > 0  # an image, not a blank tile


def test_default_grid_shows_eight_samples_of_the_first_eight_classes(ckpt, tmp_path):
    out = tmp_path / "grid.png"
    run_sample("--ckpt", ckpt, "--out", out, "--num-steps", 2)
    with Image.open(out) as image:
        assert image.size == tile_grid_size(8, 8, 32)


def test_npz_holds_num_samples_uint8_images_as_the_adm_evaluator_reads_them(ckpt, tmp_path):
    out = tmp_path / "samples.npz"
    run_sample("--ckpt", ckpt, "--out", out, "--num-samples", 10, "--per-proc-batch-size", 4, "--num-steps", 2)
    images = npz_images(out)
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    parts = sorted(p for p in os.listdir(f"{out}.parts") if p.endswith(".npz"))
    assert parts == ["000000.npz", "000001.npz", "000002.npz"]  # ceil(10 / 4) batches
    stacked = np.concatenate([np.load(os.path.join(f"{out}.parts", p))["images"] for p in parts])
    assert np.array_equal(images, stacked)


def test_rerun_computes_only_the_missing_part_and_gives_the_same_npz(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "samples.npz"
    flags = ["--ckpt", ckpt, "--out", out, "--num-samples", 10, "--per-proc-batch-size", 4, "--num-steps", 2]
    run_sample(*flags)
    first = npz_images(out)
    os.remove(f"{out}.parts/000001.npz")  # as if the run had been killed before this batch

    batches = []
    real = sample.generate

    def counting(model, vae, scale, x, *args, **kwargs):
        batches.append(len(x))
        return real(model, vae, scale, x, *args, **kwargs)
    monkeypatch.setattr(sample, "generate", counting)
    run_sample(*flags)
    assert batches == [4]  # samples 4 to 7 only
    assert np.array_equal(npz_images(out), first)  # batch b's SDE noise is drawn from (seed, b)


@pytest.mark.parametrize("change", [["--cfg-scale", 2], ["--per-proc-batch-size", 3]], ids=["cfg", "batch"])
def test_rerun_with_other_settings_into_the_same_out_is_refused(ckpt, tmp_path, change):
    # Reusing the parts would mix two settings' samples (or, for another batch size, misalign them).
    out = tmp_path / "samples.npz"
    flags = ["--ckpt", ckpt, "--out", out, "--num-samples", 10, "--per-proc-batch-size", 4, "--num-steps", 2]
    run_sample(*flags)
    with pytest.raises(util.UserError, match="other settings.*choose another --out"):
        run_sample(*flags, *change)


def test_start_noise_and_label_of_a_sample_depend_only_on_seed_and_index(ckpt):
    args = sample.get_args(["--ckpt", str(ckpt), "--seed", "3"])
    model = sample.build_model(read_checkpoint(str(ckpt)), args)[0]
    x, cls, y = sample.noise_and_labels(range(6), model, args, "cpu")
    x2, cls2, y2 = sample.noise_and_labels(range(4, 6), model, args, "cpu")
    assert torch.equal(x[4:], x2) and torch.equal(cls[4:], cls2) and torch.equal(y[4:], y2)
    assert not torch.equal(x[4], x[5])
    other = sample.noise_and_labels(range(6), model, sample.get_args(["--ckpt", str(ckpt), "--seed", "4"]), "cpu")
    assert not torch.equal(x, other[0])


def test_ode_samples_do_not_depend_on_the_batch_size(ckpt, tmp_path):
    # The ODE is deterministic given the start noise, which depends only on (seed, index).
    arrays = []
    for batch in (3, 4):
        out = tmp_path / f"batch{batch}.npz"
        run_sample("--ckpt", ckpt, "--out", out, "--num-samples", 10, "--per-proc-batch-size", batch,
                   "--mode", "ode", "--num-steps", 2)
        arrays.append(npz_images(out).astype(int))
    # A matmul may round differently for another batch shape: allow one level, rarely.
    difference = np.abs(arrays[0] - arrays[1])
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


# ---------------------------------------------------------------------------------------------
# Wiring: a spy in place of the samplers, a stub VAE, a checkpoint whose EMA differs from its model.

class SamplerSpy:
    """Stands in for flow.sample_sde and flow.sample_ode as sample.py calls them: records what each
    call receives and returns `latents(x, y)` at once (default: the start noise), without the model."""

    def __init__(self, monkeypatch, latents=None):
        self.calls, self.latents = [], latents or (lambda x, y: x)
        monkeypatch.setattr(flow, "sample_sde", lambda *a, **k: self.record("sde", *a, **k))
        monkeypatch.setattr(flow, "sample_ode", lambda *a, **k: self.record("ode", *a, **k))

    def record(self, sampler, model, x, y, cls=None, **kwargs):
        self.calls.append(dict(sampler=sampler, model=model, x=x, y=y, cls=cls, **kwargs))
        return self.latents(x, y), cls


class StubVAE(torch.nn.Module):
    """Records what decode receives; decodes to an asymmetric pattern in [-1, 1] (N, 3, H, W) whose
    uint8 levels are exact: red 4 h (along H only), green 3 w (along W only), blue 20 z[:, 0, 0, 0]."""
    downsample = 2

    def __init__(self):
        super().__init__()
        self.inputs = []

    def decode(self, z):
        self.inputs.append(z.clone())
        n, _, h, w = z.shape
        H, W = h * self.downsample, w * self.downsample
        levels = torch.zeros(n, 3, H, W)
        levels[:, 0] = 4 * torch.arange(H)[:, None].float()
        levels[:, 1] = 3 * torch.arange(W)[None, :].float()
        levels[:, 2] = 20 * z[:, 0, 0, 0].float()[:, None, None]
        return (2 * levels + 1) / 255 - 1  # to_uint8 floors 255 (x + 1) / 2 = level + 1/2 to the level


def test_default_sampler_settings_are_the_papers_protocol(ckpt, tmp_path, monkeypatch):
    spy = SamplerSpy(monkeypatch)
    run_sample("--ckpt", ckpt, "--out", tmp_path / "grid.png", "--classes", 1, "--per-class", 1)
    (call,) = spy.calls
    assert call["sampler"] == "sde" and call["steps"] == 250 and call["path"] == "linear"
    assert (call["cfg_scale"], call["cls_cfg_scale"]) == (2.3, 2.3)  # the class token guided like the image
    assert (call["guidance_low"], call["guidance_high"]) == (0.0, 0.85)
    assert call["null_label"] == NUM_CLASSES
    assert call["y"].tolist() == [1] and call["cls"].shape == (1, call["model"].z_dim)


@pytest.mark.parametrize("flags, expected", [
    (["--cfg-scale", 1], dict(sampler="sde", cfg_scale=1.0, cls_cfg_scale=1.0)),
    (["--cfg-scale", 3, "--cls-cfg-scale", 0.5, "--guidance-low", 0.1, "--guidance-high", 0.7, "--num-steps", 7,
      "--path-type", "cosine"],
     dict(sampler="sde", cfg_scale=3.0, cls_cfg_scale=0.5, guidance_low=0.1, guidance_high=0.7, steps=7,
          path="cosine")),
    (["--cfg-scale", 4, "--cls-cfg-scale", 0], dict(cfg_scale=4.0, cls_cfg_scale=0.0)),
    (["--mode", "ode", "--num-steps", 5], dict(sampler="ode", steps=5, method="euler", cfg_scale=2.3)),
    (["--mode", "ode", "--heun", "--guidance-high", 1], dict(sampler="ode", steps=250, method="heun",
                                                            guidance_high=1.0)),
], ids=["no-guidance", "sde-flags", "cls-unguided", "ode-euler", "ode-heun"])
def test_every_sampler_flag_reaches_the_sampler(ckpt, tmp_path, monkeypatch, flags, expected):
    spy = SamplerSpy(monkeypatch)
    run_sample("--ckpt", ckpt, "--out", tmp_path / "grid.png", "--classes", 1, "--per-class", 1, *flags)
    (call,) = spy.calls
    assert {k: call[k] for k in expected} == expected


@pytest.fixture(scope="module")
def ema_ckpt(ckpt, tmp_path_factory):
    """The built-in checkpoint with EMA weights that differ from its model's in every tensor."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["ema"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    path = tmp_path_factory.mktemp("ema") / "ema.pt"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("flags, weights", [([], "ema"), (["--no-ema"], "model")], ids=["default", "no-ema"])
def test_ema_weights_by_default_and_raw_weights_only_when_asked(ema_ckpt, tmp_path, monkeypatch, flags, weights):
    path, state = ema_ckpt
    spy = SamplerSpy(monkeypatch)
    run_sample("--ckpt", path, "--out", tmp_path / "grid.png", "--classes", 1, "--per-class", 1, *flags)
    sampled = spy.calls[0]["model"].state_dict()
    assert all(torch.equal(sampled[k], v) for k, v in state[weights].items())


class CompileSpy:
    """Stands in for torch.compile: records each call's keyword arguments, returns the model itself."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(torch, "compile", lambda model, **kwargs: self.calls.append(kwargs) or model)


@pytest.mark.parametrize("flags, calls", [
    ([], []), (["--compile"], [dict(dynamic=False)]),
    (["--num-samples", 4], []), (["--num-samples", 4, "--compile"], [dict(dynamic=False)]),
], ids=["grid", "grid-compile", "npz", "npz-compile"])
def test_the_sit_is_compiled_on_cpu_only_when_asked(ckpt, tmp_path, monkeypatch, flags, calls):
    SamplerSpy(monkeypatch)
    spy = CompileSpy(monkeypatch)
    out = tmp_path / ("samples.npz" if "--num-samples" in flags else "grid.png")
    run_sample("--ckpt", ckpt, "--out", out, "--per-class", 1, "--num-steps", 2, *flags)
    assert spy.calls == calls


@pytest.mark.parametrize("flags, compiled", [
    (["--num-samples", 50000], True), ([], False),
    (["--num-samples", 50000, "--no-compile"], False), (["--compile"], True),
], ids=["npz", "grid", "npz-no-compile", "grid-compile"])
def test_on_gpu_the_npz_is_sampled_compiled_by_default(ckpt, monkeypatch, flags, compiled):
    # Static shapes: one graph for the plain batch and one for the guided (doubled) batch.
    spy = CompileSpy(monkeypatch)
    model = torch.nn.Linear(1, 1)
    args = sample.get_args(["--ckpt", str(ckpt), *map(str, flags)])
    assert sample.compiled(model, args, torch.device("cuda")) is model
    assert spy.calls == ([dict(dynamic=False)] if compiled else [])


OFFICIAL_FLAGS = ["--model", "SiT-T/2", "--resolution", 64, "--encoder-depth", 2]  # 1000 classes, z_dim 768


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = SiT_models["SiT-T/2"](input_size=64 // 8, in_channels=4, num_classes=1000, encoder_depth=2, z_dim=768)
    with torch.no_grad():  # give the zero-initialised output layers weights, as a trained model has
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("official") / "REG_T_2.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {},
                "args": argparse.Namespace(model="SiT-T/2", resolution=64, encoder_depth=2), "steps": 10}, path)
    return path


def test_the_vae_decodes_latents_divided_by_the_scaling_factor(official_ckpt, tmp_path, monkeypatch):
    vae, names = StubVAE(), []
    monkeypatch.setattr(sample, "load_vae", lambda name, path=None: names.append(name) or vae)
    latents = torch.linspace(-2, 2, 2 * 4 * 8 * 8).view(2, 4, 8, 8)  # (N, C, h, w) the sampler "returns"
    SamplerSpy(monkeypatch, latents=lambda x, y: latents)
    run_sample("--ckpt", official_ckpt, *OFFICIAL_FLAGS, "--out", tmp_path / "grid.png", "--classes", 1, 2,
               "--per-class", 1)
    assert names == ["sd-vae-ft-ema"]
    (decoded,) = vae.inputs
    assert torch.allclose(decoded, latents / 0.18215, rtol=1e-6, atol=0)


def test_npz_holds_images_as_n_h_w_rgb_uint8_in_sample_order(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "load_vae", lambda name, path=None: StubVAE())
    # Latents filled with each sample's label, which the stub decodes into the blue level.
    SamplerSpy(monkeypatch, latents=lambda x, y: y.float().view(-1, 1, 1, 1).expand_as(x))
    out = tmp_path / "samples.npz"
    run_sample("--ckpt", ckpt, "--out", out, "--num-samples", 20, "--per-proc-batch-size", 8)
    images = npz_images(out)
    assert images.dtype == np.uint8 and images.shape == (20, 64, 64, 3)  # 32x32 latents, the stub upsamples 2x
    i, h, w = np.meshgrid(np.arange(20), np.arange(64), np.arange(64), indexing="ij")
    assert np.array_equal(images[..., 0], 4 * h)
    assert np.array_equal(images[..., 1], 3 * w)
    assert np.array_equal(images[..., 2], 20 * (i % NUM_CLASSES))  # sample i has label i mod 10


def test_fid_labels_are_real_classes_each_equally_often(ckpt, tmp_path, monkeypatch):
    spy = SamplerSpy(monkeypatch)
    out = tmp_path / "samples.npz"
    run_sample("--ckpt", ckpt, "--out", out, "--num-samples", 3 * NUM_CLASSES, "--per-proc-batch-size", 8)
    labels = torch.cat([call["y"] for call in spy.calls])
    assert len(labels) == 30 and labels.min() >= 0 and labels.max() < NUM_CLASSES  # never the null label 10
    assert torch.bincount(labels, minlength=NUM_CLASSES).tolist() == [3] * NUM_CLASSES
    parts = sorted(p for p in os.listdir(f"{out}.parts") if p.endswith(".npz"))
    stored = np.concatenate([np.load(os.path.join(f"{out}.parts", p))["labels"] for p in parts])
    assert stored.tolist() == labels.tolist()


def test_two_processes_write_the_same_npz_as_one(ckpt, tmp_path, monkeypatch):
    flags = ["--ckpt", ckpt, "--num-samples", 10, "--per-proc-batch-size", 3, "--num-steps", 2]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on CPU, as the two gloo processes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes below: the same arithmetic
    try:
        run_sample(*flags, "--out", tmp_path / "one.npz")
    finally:
        torch.set_num_threads(threads)
    command = [sys.executable, "sample.py", *map(str, flags), "--out", str(tmp_path / "two.npz")]
    results = run_ranks(command, {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}, cwd=REPO)
    for r, (code, output) in enumerate(results):
        assert code == 0, f"rank {r} of the 2-process gloo run failed:\n{output[-3000:]}"
    assert np.array_equal(npz_images(tmp_path / "two.npz"), npz_images(tmp_path / "one.npz"))


def test_npz_is_named_after_the_checkpoint_and_settings(ckpt, tmp_path, monkeypatch):
    SamplerSpy(monkeypatch)
    monkeypatch.chdir(tmp_path)
    run_sample("--ckpt", ckpt, "--num-samples", 10, "--per-proc-batch-size", 10)
    run_sample("--ckpt", ckpt, "--num-samples", 10, "--per-proc-batch-size", 10, "--precision", "fp32",
               "--cfg-scale", 1, "--no-ema")
    assert sorted(f for f in os.listdir("samples") if f.endswith(".npz")) == [
        "SiT-T-4-builtin-0000002-sde250-cfg1-cls1-0-0.85-fp32-raw-seed0-10.npz",
        "SiT-T-4-builtin-0000002-sde250-cfg2.3-cls2.3-0-0.85-bf16-seed0-10.npz"]


def test_eval_ref_evaluates_the_written_npz_with_the_settings(ckpt, tmp_path, monkeypatch):
    SamplerSpy(monkeypatch)
    ref, inception = tmp_path / "ref.npz", tmp_path / "inception.pth"
    np.savez(ref, arr_0=np.zeros((4, 8, 8, 3), np.uint8))  # sample.py reads its layout before sampling
    inception.touch()  # only its path matters to the stand-in below
    calls = []

    def evaluate(ref_path, sample_path, inception_path, **kwargs):
        calls.append(dict(ref=ref_path, images=npz_images(sample_path), inception=inception_path, **kwargs))
    monkeypatch.setattr(sample.evaluate, "evaluate", evaluate)
    out = tmp_path / "samples.npz"
    run_sample("--ckpt", ckpt, "--out", out, "--num-samples", 10, "--per-proc-batch-size", 4,
               "--eval-ref", ref, "--inception", inception, "--cfg-scale", 1.5)
    (call,) = calls
    assert (call["ref"], call["inception"]) == (str(ref), str(inception))
    assert call["images"].shape == (10, 32, 32, 3)  # the whole .npz is written before it is evaluated
    assert call["batch_size"] == 4 and call["device"].type == ("cuda" if torch.cuda.is_available() else "cpu")
    extra = call["extra"]
    assert extra["ckpt"] == os.path.abspath(ckpt) and extra["ema"] is True and extra["num_samples"] == 10
    assert {k: extra[k] for k in ("mode", "num_steps", "cfg_scale", "cls_cfg_scale", "guidance_low",
                                  "guidance_high", "precision", "seed")} == \
        dict(mode="sde", num_steps=250, cfg_scale=1.5, cls_cfg_scale=1.5, guidance_low=0.0, guidance_high=0.85,
             precision="bf16", seed=0)


@pytest.mark.parametrize("flag, expected", [([], True), (["--no-tf32"], False)], ids=["default", "no-tf32"])
def test_tf32_is_set_by_the_tf32_flag(ckpt, tmp_path, monkeypatch, flag, expected):
    SamplerSpy(monkeypatch)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not expected
        run_sample("--ckpt", ckpt, "--out", tmp_path / "grid.png", "--classes", 1, "--per-class", 1, *flag)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (expected, expected)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_help_shows_every_default_and_the_papers_protocol(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per option, so flags are not hyphen-wrapped
    with pytest.raises(SystemExit) as exit_:
        sample.get_args(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    options = [a for a in sample.make_parser()._actions if a.option_strings and a.dest != "help"]
    assert text.count("(default: ") == len(options)
    for shown in ("--mode {sde,ode}", "(default: sde)", "(default: 250)", "(default: 2.3)", "(default: 0.85)",
                  "none: equal to --cfg-scale", "(default: bf16)", "--tf32, --no-tf32", "--ema, --no-ema"):
        assert shown in text, shown


# ---------------------------------------------------------------------------------------------
# User mistakes: one line `error: ...`, exit status 2, no traceback, and nothing sampled.

@pytest.fixture(scope="module")
def not_a_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "notes.pt"
    path.write_text("not a checkpoint")
    return path


MISTAKES = {  # flags -> words the message must contain
    "no-ckpt": ([], "--ckpt is required"),
    "missing-ckpt": (["--ckpt", "missing.pt"], "no checkpoint at missing.pt"),
    "corrupt-ckpt": (["--ckpt", "{bad}"], "is not a checkpoint"),
    "bad-flag": (["--ckpt", "{ckpt}", "--mode", "euler"], "--mode"),
    "class-out-of-range": (["--ckpt", "{ckpt}", "--classes", 3, 10], "--classes 10 out of range"),
    "eval-ref-without-inception": (["--ckpt", "{ckpt}", "--num-samples", 10, "--eval-ref", "ref.npz"],
                                   "--eval-ref and --inception go together"),
    "missing-eval-ref": (["--ckpt", "{ckpt}", "--num-samples", 10, "--eval-ref", "ref.npz", "--inception",
                          "{bad}"], "no reference batch at ref.npz"),
    "missing-inception": (["--ckpt", "{ckpt}", "--num-samples", 10, "--eval-ref", "{bad}", "--inception",
                           "inc.pth"], "no weights file at inc.pth"),
    "eval-ref-without-num-samples": (["--ckpt", "{ckpt}", "--eval-ref", "{bad}", "--inception", "{bad}"],
                                     "give --num-samples"),
    "cls-guidance-without-cfg": (["--ckpt", "{ckpt}", "--cfg-scale", 1, "--cls-cfg-scale", 2],
                                 "needs --cfg-scale above 1"),
    "guidance-interval": (["--ckpt", "{ckpt}", "--guidance-low", 0.9, "--guidance-high", 0.5], "guidance interval"),
    "sde-one-step": (["--ckpt", "{ckpt}", "--num-steps", 1], "argument --num-steps: 1 is out of range for --mode sde"),
    "no-raw-weights": (["--ckpt", "{bare}", "--no-ema"], "holds no raw model weights"),
}


@pytest.fixture(scope="module")
def bare_ckpt(ckpt, tmp_path_factory):
    """A checkpoint holding only one state dict (as some releases publish their EMA weights)."""
    path = tmp_path_factory.mktemp("bare") / "bare.pt"
    torch.save(torch.load(ckpt, map_location="cpu", weights_only=False)["ema"], path)
    return path


def mistake_flags(name, ckpt, bad, bare):
    flags, words = MISTAKES[name]
    return [str(f).format(ckpt=ckpt, bad=bad, bare=bare) for f in flags], words


@pytest.mark.parametrize("name", MISTAKES)
def test_a_user_mistake_is_one_line_and_exit_status_2(name, ckpt, not_a_checkpoint, bare_ckpt, tmp_path,
                                                      monkeypatch, capsys):
    flags, words = mistake_flags(name, ckpt, not_a_checkpoint, bare_ckpt)
    spy = SamplerSpy(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # as `python sample.py`: util.run(main, get_args())
        util.run(lambda: sample.main(sample.get_args(flags)))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert words in err
    assert not spy.calls and not os.path.exists("samples")  # found before anything was sampled


def test_the_script_prints_a_user_mistake_without_a_traceback(ckpt, not_a_checkpoint, bare_ckpt, tmp_path):
    # The in-process test above covers each mistake; this one, that `python sample.py` goes through util.run.
    flags, words = mistake_flags("corrupt-ckpt", ckpt, not_a_checkpoint, bare_ckpt)
    result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), *flags], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and words in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# The official release's layout: {model, ema, opt, args, steps}, SD-VAE latents (4 channels, /8).

@pytest.fixture(scope="module")
def sd_vae_folder(tmp_path_factory):
    """A download-like folder holding a full-size SD-VAE with random weights (fp16 to halve the file)."""
    folder = tmp_path_factory.mktemp("sd-vae-ft-ema")
    state = {k: v.half() for k, v in AutoencoderKL().state_dict().items()}
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    return folder


def test_official_layout_checkpoint_samples_a_grid_through_the_sd_vae(official_ckpt, sd_vae_folder, tmp_path):
    out = tmp_path / "grid.png"
    run_sample("--ckpt", official_ckpt, *OFFICIAL_FLAGS, "--vae-path", sd_vae_folder, "--out", out,
               "--classes", 1, 2, "--per-class", 2, "--num-steps", 2)
    with Image.open(out) as image:
        assert image.mode == "RGB" and image.size == tile_grid_size(2, 2, 64)  # 8x8 latents decoded 8x
        assert np.asarray(image)[2:66, 2:66].std() > 0


def test_official_checkpoint_with_the_wrong_model_flags_says_which_flags_to_set(official_ckpt):
    with pytest.raises(util.UserError, match="set --model, --resolution and --encoder-depth"):
        run_sample("--ckpt", official_ckpt, "--model", "SiT-T/4", "--resolution", 64, "--encoder-depth", 2,
                   "--classes", 1)
