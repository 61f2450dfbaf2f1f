"""Specification of train.py: a short run on the built-in data end to end, atomic checkpoints,
bit-exact resume after a kill, a clean stop on a non-finite loss, user mistakes as one line
`error: ...`, and two CPU ranks (gloo): their own noise, a bit-exact resume, another world size."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from model import read_checkpoint
from ports import free_port
from util import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "SiT-T-4-builtin"  # the run directory train.py names after the built-in default model
TINY = ["--global-batch-size", "8", "--sample-steps", "2", "--num-workers", "0", "--log-every", "1"]
LOSS_TERMS = ("step", "loss", "denoise", "proj", "cls", "grad_norm")  # the logged columns that are not timings


def train_run(out, *flags):
    """train.py on the built-in data with tiny settings, in this process -> (model, ema)."""
    return train.main(train.get_args(["--output-dir", str(out), *TINY, *flags]))


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def loss_failing_from_call(k, value):
    """flow.training_loss whose total becomes `value` (nan, inf) from its k-th call (1-based) on."""
    real, calls = train.training_loss, []

    def loss(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls.append(1)
        if len(calls) >= k:
            losses["loss"] = losses["loss"] * value
        return losses
    return loss


def killed_at_call(k):
    """flow.training_loss that raises KeyboardInterrupt (as a kill would stop the run) at its k-th call."""
    real, calls = train.training_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)
    return loss


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    model, ema = train_run(out, "--max-train-steps", "4", "--checkpoint-every", "2", "--sample-every", "2",
                           "--ema-decay", "0.99")
    return dict(dir=os.path.join(out, RUN), model=model, ema=ema)


def test_run_writes_a_checkpoint_every_checkpoint_every_steps_and_nothing_half_written(short_run):
    assert sorted(os.listdir(os.path.join(short_run["dir"], "checkpoints"))) == ["0000002.pt", "0000004.pt"]


def test_checkpoint_has_the_official_layout_plus_what_resume_and_sampling_need(short_run):
    ckpt = read_checkpoint(os.path.join(short_run["dir"], "checkpoints", "0000004.pt"))
    assert {"model", "ema", "opt", "args", "steps"} <= ckpt.keys()  # the REG/REPA release's keys
    assert {"config", "rng", "scaler", "world_size"} <= ckpt.keys()
    assert ckpt["steps"] == 4 and ckpt["world_size"] == 1
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].model == "SiT-T/4"
    assert ckpt["config"]["model"] == "SiT-T/4" and ckpt["config"]["vae"] == "pixels"


def test_last_checkpoint_holds_the_model_and_ema_that_main_returns(short_run):
    ckpt = read_checkpoint(os.path.join(short_run["dir"], "checkpoints", "0000004.pt"))
    for key in ("model", "ema"):
        state = short_run[key].state_dict()
        assert state.keys() == ckpt[key].keys()
        assert all(torch.equal(state[k], ckpt[key][k]) for k in state)


def test_main_runs_train_step_once_per_step_and_the_ema_replays_from_the_model_trajectory(tmp_path, monkeypatch):
    # EMA_k = d * EMA_(k-1) + (1 - d) * model_k, from EMA_0 = the initial model, with d = --ema-decay.
    real, trajectory = train.train_step, []

    def spy(batch, *, model, **kwargs):
        if not trajectory:
            trajectory.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        out = real(batch, model=model, **kwargs)
        trajectory.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return out
    monkeypatch.setattr(train, "train_step", spy)
    decay, steps = 0.7, 3
    model, ema = train_run(tmp_path, "--max-train-steps", str(steps), "--ema-decay", str(decay),
                           "--sample-every", "100", "--checkpoint-every", "100")
    assert len(trajectory) == steps + 1  # main's step function is train.train_step, once per step
    replay = {k: v.clone() for k, v in trajectory[0].items()}
    for weights in trajectory[1:]:
        for k in replay:
            replay[k] = decay * replay[k] + (1 - decay) * weights[k]
    ema_state = ema.state_dict()
    assert all(torch.allclose(ema_state[k], replay[k], rtol=1e-5, atol=1e-7) for k in replay)
    assert not torch.equal(ema_state["final_layer.linear.weight"], model.state_dict()["final_layer.linear.weight"])


def test_metrics_have_a_row_per_logged_step_with_finite_loss_terms(short_run):
    rows = metrics(short_run["dir"])
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert all(torch.isfinite(torch.tensor(row[k])) for k in LOSS_TERMS)


def test_logged_loss_is_the_weighted_sum_of_its_logged_terms(short_run):
    # Defaults: --proj-coeff 0.5, --cls-coeff 0.03 (REG's loss, arXiv 2507.01467 section 3).
    for row in metrics(short_run["dir"]):
        expected = row["denoise"] + 0.5 * row["proj"] + 0.03 * row["cls"]
        assert row["loss"] == pytest.approx(expected, rel=1e-5)


def test_denoising_loss_falls_over_the_first_steps(short_run):
    # A fresh model predicts zero velocity; a few steps at lr 1e-3 learn the data's mean at least.
    rows = metrics(short_run["dir"])
    half = len(rows) // 2
    assert sum(r["denoise"] for r in rows[half:]) < sum(r["denoise"] for r in rows[:half])
    assert rows[-1]["denoise"] < rows[0]["denoise"]


def test_loss_plot_has_one_panel_per_logged_term(short_run):
    # loss, denoise, proj, cls and grad_norm, each on its own scale: 5 panels of 170 pixels.
    with Image.open(os.path.join(short_run["dir"], "loss.png")) as image:
        assert image.size == (720, 5 * 170)


def test_sample_grid_has_a_row_of_eight_for_each_of_the_ten_classes(short_run):
    # save_grid: 32-pixel tiles, each with a 2-pixel border on its top and left, plus one on the far side.
    for step in (2, 4):
        with Image.open(os.path.join(short_run["dir"], f"samples_{step:07d}.png")) as image:
            assert image.mode == "RGB" and image.size == (8 * 34 + 2, 10 * 34 + 2)


def test_another_model_in_the_same_run_directory_is_refused_with_advice(short_run):
    before = sorted(os.listdir(os.path.join(short_run["dir"], "checkpoints")))
    with pytest.raises(UserError, match="--model SiT-T/4.*use another --exp-name"):
        train_run(os.path.dirname(short_run["dir"]), "--exp-name", RUN, "--model", "SiT-T/8",
                  "--max-train-steps", "6")
    assert sorted(os.listdir(os.path.join(short_run["dir"], "checkpoints"))) == before


def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "0000002.pt")
    train.save_checkpoint(path, {"steps": 2})

    def crash_while_writing(obj, f):  # a kill or a full disk in the middle of torch.save
        with open(f, "wb") as partial:
            partial.write(b"half a checkpoint")
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", crash_while_writing)
    with pytest.raises(OSError):
        train.save_checkpoint(path, {"steps": 4})
    monkeypatch.undo()
    assert torch.load(path)["steps"] == 2
    assert train.latest_checkpoint(str(tmp_path)) == path


def test_update_ema_is_decay_times_ema_plus_one_minus_decay_times_model():
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * e + 0.1 * m for e, m in zip(ema.parameters(), model.parameters())]
    train.update_ema(ema, model, 0.9)
    for got, want in zip(ema.parameters(), expected):
        torch.testing.assert_close(got, want)


def test_resume_after_a_kill_continues_the_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch):
    flags = ["--max-train-steps", "6", "--checkpoint-every", "3"]
    train_run(tmp_path / "straight", *flags)

    # Killed during step 5: the step-3 checkpoint exists, metrics already have step 4, and a kill
    # inside a checkpoint write leaves only a .tmp file behind.
    killed = tmp_path / "killed"
    with monkeypatch.context() as m:
        m.setattr(train, "training_loss", killed_at_call(5))
        with pytest.raises(KeyboardInterrupt):
            train_run(killed, *flags)
    ckpt_dir = killed / RUN / "checkpoints"
    assert sorted(os.listdir(ckpt_dir)) == ["0000003.pt"]
    (ckpt_dir / "0000006.pt.tmp").write_bytes(b"half a checkpoint")
    train_run(killed, *flags)

    a = read_checkpoint(str(tmp_path / "straight" / RUN / "checkpoints" / "0000006.pt"))
    b = read_checkpoint(str(ckpt_dir / "0000006.pt"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    for i, state in a["opt"]["state"].items():
        assert all(torch.equal(state[k], b["opt"]["state"][i][k]) for k in state)
    assert torch.equal(a["rng"][0]["cpu"], b["rng"][0]["cpu"])
    rows_a, rows_b = metrics(tmp_path / "straight" / RUN), metrics(killed / RUN)
    assert [[r[k] for k in LOSS_TERMS] for r in rows_b] == [[r[k] for k in LOSS_TERMS] for r in rows_a]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_with_a_user_error_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, bad):
    monkeypatch.setattr(train, "training_loss", loss_failing_from_call(3, bad))
    with pytest.raises(UserError, match="non-finite loss.*last good checkpoint"):
        train_run(tmp_path, "--max-train-steps", "6", "--checkpoint-every", "2", "--log-every", "2")
    ckpt_dir = tmp_path / RUN / "checkpoints"
    assert sorted(os.listdir(ckpt_dir)) == ["0000002.pt"]  # the step-4 checkpoint was not written
    ckpt = read_checkpoint(str(ckpt_dir / "0000002.pt"))
    assert ckpt["steps"] == 2
    assert all(torch.isfinite(t).all() for key in ("model", "ema") for t in ckpt[key].values())
    assert [r["step"] for r in metrics(tmp_path / RUN)] == [2]


WRAPPER = """
import os, sys
import torch
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import data, evaluate, flow, monitor, train
from test_train_eval import pixel_features

rank = int(os.environ["RANK"])
seen = []  # dataset indices this rank loaded, in order
times = []  # the training times t this rank drew, one (N,) tensor per micro-batch
gathered = []  # rank 0: the number of samples whose features reached the metrics
step_of_evaluation = []


class RecordingShapes(data.BuiltinShapes):
    def __getitem__(self, index):
        seen.append(index)
        return super().__getitem__(index)


def sample_time(*args, real=flow.sample_time, **kwargs):
    times.append(real(*args, **kwargs))
    return times[-1]


def evaluation_run(self, step, ema, log, real=monitor.Evaluation.run):
    step_of_evaluation.append(step)
    return real(self, step, ema, log)


def images(self, ema, k, real=monitor.Evaluation.images):
    if rank == 1 and step_of_evaluation[-1] == 2:
        raise RuntimeError("simulated failure on rank 1")
    return real(self, ema, k)


def metrics(ref, feats, real=evaluate.metrics):
    gathered.append(len(feats["pool"]))
    return real(ref, feats)


train.BuiltinShapes = RecordingShapes
flow.sample_time = sample_time
monitor.Evaluation.run, monitor.Evaluation.images = evaluation_run, images
evaluate.load_inception = lambda path, device="cpu": torch.nn.Linear(1, 1)
evaluate.features, evaluate.metrics = pixel_features, metrics
model, ema = train.main(train.get_args(sys.argv[2:]))
torch.save({{"model": model.state_dict(), "ema": ema.state_dict(), "seen": seen, "times": times,
            "gathered": gathered}}, os.path.join(sys.argv[1], f"rank{{rank}}.pt"))
"""


def test_help_lists_every_default_and_the_builtin_preset():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60).stdout
    assert "400000" in out and "0.9999" in out and "SiT-XL/2" in out  # defaults of the paper's run
    assert "builtin preset" in out and train.flags(train.BUILTIN) in " ".join(out.split())
    assert "(default: 0.9999)" in out and "(default: 400000)" in out  # each flag says its default
    for flag, default in (("--eval-every", "0"), ("--eval-samples", "10000"), ("--eval-steps", "250")):
        assert re.search(rf"{flag} \S+\s+.*?\(default: {default}\)", out, re.S), flag


def test_a_batch_that_does_not_split_over_accumulation_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--output-dir", str(tmp_path), "--global-batch-size", "6",
                             "--gradient-accumulation-steps", "4", "--max-train-steps", "1"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--global-batch-size" in lines[0]


def test_user_mistakes_exit_2_with_one_line_and_no_traceback(tmp_path):
    def latest_checkpoint_is(name, write):  # --output-dir of a run directory whose latest checkpoint `write` made
        ckpt_dir = tmp_path / name / RUN / "checkpoints"
        ckpt_dir.mkdir(parents=True)
        write(ckpt_dir / "0000002.pt")
        return ["--output-dir", str(tmp_path / name)]
    def prepared_with(name, **manifest):  # a prepared folder (data.py's format) with these manifest entries
        data.write_synthetic(str(tmp_path / name), count=16, resolution=32, num_classes=2)
        with open(tmp_path / name / "manifest.json") as f:
            written = json.load(f)
        with open(tmp_path / name / "manifest.json", "w") as f:
            json.dump({**written, **manifest}, f)
        return ["--data-path", str(tmp_path / name), "--model", "SiT-T/2", "--enc-type", "stand-in"]
    (tmp_path / "partly" / "progress").mkdir(parents=True)
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x02 not a weights file")
    np.savez_compressed(tmp_path / "ref.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    out = ["--output-dir", str(tmp_path / "runs")]
    cases = {
        "missing --data-path folder": ([*out, "--data-path", str(tmp_path / "nowhere")], "is not a folder"),
        "bad flag value": ([*out, "--lr", "fast"], "invalid float value"),
        "unknown flag": ([*out, "--learning-rate", "1e-4"], "unrecognized arguments"),
        "partly prepared --data-path": ([*out, "--data-path", str(tmp_path / "partly")], "only partly prepared"),
        "another format version": ([*out, *prepared_with("v0", format_version=0)], "has format version 0"),
        "unknown VAE": ([*out, *prepared_with("vae", vae="sd-vae-ft-xl")], "Unknown VAE 'sd-vae-ft-xl'"),
        "unknown encoder": ([*out, "--enc-type", "dinov2-vit-z"], "Unknown encoder 'dinov2-vit-z'"),
        "a batch that does not split": ([*out, "--global-batch-size", "6", "--gradient-accumulation-steps", "4"],
                                        "does not split evenly"),
        "corrupt checkpoint": (latest_checkpoint_is("corrupt", lambda p: p.write_bytes(b"half a checkpoint")),
                               "is not a checkpoint written by train.py"),
        "another program's checkpoint": (latest_checkpoint_is("other", lambda p: torch.save({"w": torch.zeros(2)}, p)),
                                         "is not a checkpoint that train.py can resume from"),
        "not a dict": (latest_checkpoint_is("list", lambda p: torch.save([1, 2], p)), "holds a list"),
        "bad Inception file": ([*out, "--eval-every", "2", "--eval-ref", str(tmp_path / "ref.npz"),
                                "--inception", str(tmp_path / "garbage.pth")], "is not a PyTorch weights file"),
    }
    # One Python runs every case as `python train.py ...` would (runpy, as __main__), so torch is
    # imported once; an exception that escapes train.py is what would print a traceback.
    result = subprocess.run([sys.executable, "-c", MISTAKES, json.dumps({k: f for k, (f, _) in cases.items()})],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.splitlines()[-1])
    for name, (_, message) in cases.items():
        code, err = outcomes[name]
        lines = err.strip().splitlines()
        assert code == 2 and "Traceback" not in err, (name, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (name, err[-2000:])


MISTAKES = """
import contextlib, io, json, runpy, sys, traceback
outcomes = {}
for name, flags in json.loads(sys.argv[1]).items():
    sys.argv, err = ["train.py", "--max-train-steps", "1", *flags], io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_path("train.py", run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException:
            code, _ = 1, traceback.print_exc()
    outcomes[name] = (code, err.getvalue())
print(json.dumps(outcomes))
"""


def run_torchrun(args, env, cwd, attempts=3):
    """torchrun on a fresh local port; retried on another port when the port is taken, never skipped."""
    for _ in range(attempts):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--master_addr=127.0.0.1",
                    f"--master_port={free_port()}"]
        result = subprocess.run([*launcher, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
        if not (result.returncode and any(s in result.stderr for s in (
                "Address already in use", "EADDRINUSE", "Cannot assign requested address"))):
            return result
    pytest.fail(f"torchrun could not bind a local port in {attempts} attempts: {result.stderr[-500:]}")


def two_rank_run(tmp, out_dir, wrapper, steps):
    """The wrapper under torchrun with 2 CPU ranks (gloo) on the built-in data, with an evaluation
    every 2 steps that fails at step 2 on rank 1 -> (result, [rank 0's record, rank 1's])."""
    os.makedirs(out_dir, exist_ok=True)
    ref = tmp / "ref.npz"
    if not ref.exists():
        np.savez_compressed(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
        (tmp / "inception.pth").write_bytes(b"weights")
    cmd = ["--nproc_per_node=2", str(wrapper), str(out_dir), "--output-dir", str(tmp / "runs"), *TINY,
           "--max-train-steps", str(steps), "--checkpoint-every", "2", "--eval-every", "2", "--eval-ref", str(ref),
           "--inception", str(tmp / "inception.pth"), "--eval-samples", "6", "--eval-batch-size", "2",
           "--eval-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = run_torchrun(cmd, env, tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """4 steps on 2 CPU ranks, a checkpoint every 2; and a copy of its run directory as it was
    at step 2, to resume from."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    wrapper = tmp / "wrapper.py"
    wrapper.write_text(WRAPPER.format(repo=REPO, tests=os.path.join(REPO, "tests")))
    result, ranks = two_rank_run(tmp, tmp, wrapper, steps=4)
    at_step_2 = tmp / "at_step_2"
    shutil.copytree(tmp / "runs", at_step_2 / "runs")
    os.remove(at_step_2 / "runs" / RUN / "checkpoints" / "0000004.pt")
    return dict(tmp=tmp, wrapper=wrapper, result=result, ranks=ranks, at_step_2=at_step_2)


def test_two_cpu_ranks_hold_identical_weights_and_see_disjoint_data(two_ranks):
    tmp_path, ranks = two_ranks["tmp"], two_ranks["ranks"]
    steps, local_batch = 4, 4  # global batch 8 over 2 ranks
    for key in ("model", "ema"):
        state0, state1 = ranks[0][key], ranks[1][key]
        assert all(torch.equal(state0[k], state1[k]) for k in state0), key
    assert ranks[0]["model"]["final_layer.linear.weight"].abs().sum() > 0  # zero at init: it trained
    seen0, seen1 = ranks[0]["seen"], ranks[1]["seen"]
    assert len(seen0) == len(seen1) == steps * local_batch
    assert not set(seen0) & set(seen1)
    ckpt = read_checkpoint(str(tmp_path / "runs" / RUN / "checkpoints" / f"{steps:07d}.pt"))
    assert ckpt["world_size"] == 2
    assert all(torch.equal(ckpt["model"][k], ranks[0]["model"][k]) for k in ckpt["model"])


def test_each_rank_draws_its_own_noise(two_ranks):
    t0, t1 = (torch.cat(r["times"]) for r in two_ranks["ranks"])
    assert t0.shape == t1.shape == (4 * 4,)  # a time per sample of each rank's 4 steps of 4
    assert not torch.isclose(t0[:, None], t1[None]).any()  # no time shared between the ranks
    ckpt = read_checkpoint(str(two_ranks["tmp"] / "runs" / RUN / "checkpoints" / "0000004.pt"))
    assert not torch.equal(ckpt["rng"][0]["cpu"], ckpt["rng"][1]["cpu"])


def test_an_evaluation_that_fails_on_one_rank_warns_and_all_ranks_train_on(two_ranks):
    stderr = two_ranks["result"].stderr
    assert "evaluation at step 2 failed: it failed on another process; training goes on" in stderr
    assert two_ranks["ranks"][0]["gathered"] == [6]  # step 4: all 6 samples, shared over both ranks
    rows = metrics(two_ranks["tmp"] / "runs" / RUN)
    assert [r["step"] for r in rows if "fid6" in r] == [4] and [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_a_two_rank_run_stopped_and_resumed_continues_bit_for_bit(two_ranks, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(two_ranks["at_step_2"], resumed)
    _, ranks = two_rank_run(resumed, resumed, two_ranks["wrapper"], steps=4)
    a = read_checkpoint(str(two_ranks["tmp"] / "runs" / RUN / "checkpoints" / "0000004.pt"))
    b = read_checkpoint(str(resumed / "runs" / RUN / "checkpoints" / "0000004.pt"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
        assert all(torch.equal(ranks[r][key][k], a[key][k]) for r in range(2) for k in a[key]), key
    for i, state in a["opt"]["state"].items():
        assert all(torch.equal(state[k], b["opt"]["state"][i][k]) for k in state)
    assert all(torch.equal(a["rng"][r]["cpu"], b["rng"][r]["cpu"]) for r in range(2))  # each rank's stream
    # Steps 3 and 4 drew the same times on each rank as the uninterrupted run did.
    assert all(torch.equal(torch.cat(ranks[r]["times"]), torch.cat(two_ranks["ranks"][r]["times"][2:]))
               for r in range(2))
    loss_rows = [[[row[k] for k in LOSS_TERMS] for row in metrics(d / "runs" / RUN) if "loss" in row]
                 for d in (two_ranks["tmp"], resumed)]
    assert loss_rows[0] == loss_rows[1]


def test_resuming_with_another_world_size_warns_and_runs(two_ranks, tmp_path):
    shutil.copytree(two_ranks["at_step_2"], tmp_path / "copy")
    with pytest.warns(UserWarning, match="written by 2 processes and this run has 1: training continues"):
        train_run(tmp_path / "copy" / "runs", "--max-train-steps", "3", "--checkpoint-every", "100")
    ckpt = read_checkpoint(str(tmp_path / "copy" / "runs" / RUN / "checkpoints" / "0000003.pt"))
    assert ckpt["steps"] == 3 and ckpt["world_size"] == 1
    assert [r["step"] for r in metrics(tmp_path / "copy" / "runs" / RUN) if "loss" in r] == [1, 2, 3]
