"""The labs' shared plumbing (labs/common.py) and their summaries, without training: running runs in
their own processes, reusing finished ones, the sampler the labs measure with, and the memorization
clock's tau_mem and fit on constructed curves."""
import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "labs"))
import common  # noqa: E402


def load_lab(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "labs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WORKER = """import json, sys
job = json.loads(sys.argv[2])
if job["fail"]:
    sys.exit("planted failure")
with open(job["out_json"], "w") as f:
    json.dump({"name": job["name"]}, f)
"""


def test_run_workers_runs_each_job_once_skips_finished_ones_and_names_the_log_of_a_failure(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    jobs = [dict(name=f"job{i}", fail=False, out_json=str(tmp_path / f"job{i}.json")) for i in range(3)]
    (tmp_path / "job1.json").write_text(json.dumps({"name": "done before"}))
    common.run_workers(str(script), jobs, parallel=2)
    assert [json.loads((tmp_path / f"job{i}.json").read_text())["name"] for i in range(3)] == ["job0", "done before", "job2"]
    assert not (tmp_path / "job1.json.log").exists()  # a finished job is not started again

    bad = dict(name="bad", fail=True, out_json=str(tmp_path / "bad.json"))
    with pytest.raises(RuntimeError, match="bad failed; see .*bad.json.log"):
        common.run_workers(str(script), [bad], parallel=1)
    assert "planted failure" in (tmp_path / "bad.json.log").read_text()


def test_the_labs_sample_checkpoints_with_euler_on_the_ode(monkeypatch):
    """The memorized fraction needs samples that can land on training images: the SDE's last step
    leaves noise (labs/closed_form.py (c)), so sample_checkpoint must ask sample.py for the ODE."""
    seen = []

    def stop(argv):
        seen.append(argv)
        raise StopIteration

    monkeypatch.setattr(common.sample, "get_args", stop)
    with pytest.raises(StopIteration):
        common.sample_checkpoint("run.pt", num=4, steps=7)
    argv = seen[0]
    assert argv[argv.index("--mode") + 1] == "ode" and "--heun" not in argv
    assert argv[argv.index("--num-steps") + 1] == "7" and argv[argv.index("--cfg-scale") + 1] == "1"


def test_reg_vs_repa_reuses_scores_only_when_made_with_the_same_train_flags(tmp_path):
    lab = load_lab("reg_vs_repa")
    path = tmp_path / "REG-seed0.json"
    assert not lab.finished(str(path), ["--seed", "0"])
    path.write_text(json.dumps({"train_argv": ["--seed", "0", "--max-train-steps", "100"], "rows": []}))
    assert lab.finished(str(path), ["--seed", "0", "--max-train-steps", "100"]) and path.exists()
    assert not lab.finished(str(path), ["--seed", "0", "--max-train-steps", "200"])
    assert not path.exists()  # stale scores are dropped, so the run is redone


def test_a_worker_rebuilds_the_labs_own_arguments():
    lab = load_lab("reg_vs_repa")
    given = ["--seeds", "2", "--steps", "5", "--arms", "REG", "SiT uncond.", "--parallel", "3"]
    args = lab.get_args(given)
    again = lab.get_args(args.argv)
    assert vars(again) == vars(args) and args.scale["parallel"] == 3
    assert args.command == "python labs/reg_vs_repa.py --seeds 2 --steps 5 --arms REG 'SiT uncond.' --parallel 3"


def test_memorization_tau_mem_is_the_linear_crossing_and_the_fit_recovers_a_clock_proportional_to_n():
    lab = load_lab("memorization")
    rows = [{"step": 100, "mem_frac": 0.0}, {"step": 200, "mem_frac": 0.05}, {"step": 300, "mem_frac": 0.25}]
    assert lab.crossing(rows, "mem_frac", 0.1) == pytest.approx(225.0)  # between 200 (0.05) and 300 (0.25)
    assert lab.crossing(rows, "mem_frac", 0.5) is None
    assert lab.crossing([{"step": 50, "mem_frac": 0.4}], "mem_frac", 0.1) == pytest.approx(12.5)  # from (0, 0)

    # Constructed runs whose memorized fraction rises from 0 at 40 n steps by 0.002 / n per step:
    # tau_mem = 40 n + 0.1 / (0.002 / n) = 90 n exactly; quality is best at step 300 whatever n.
    runs = {}
    for n in (8, 16, 32):
        for seed in (0, 1):
            steps = range(10 * n, 200 * n + 1, 10 * n)
            runs[(n, seed)] = [{"step": s, "mem_frac": max(0.0, min(1.0, (s - 40 * n) * 0.002 / n)),
                                "fid": abs(s - 300) + 1.0} for s in steps]
    table, fit, key = lab.summarise(None, runs)
    assert key == "fid"
    assert [row["tau_mem"] for row in table] == pytest.approx([90 * 8, 90 * 16, 90 * 32])
    assert fit["slope_steps_per_image"] == pytest.approx(90) and fit["loglog_exponent"] == pytest.approx(1)
    assert fit["intercept"] == pytest.approx(0, abs=1e-6) and fit["points"] == 6
    assert [row["runs_memorizing"] for row in table] == ["2/2"] * 3


def test_memorization_tau_gen_is_the_step_of_the_best_quality():
    """Guards the memorization lab's tau_gen: the step of the lowest FID of each run (the best),
    averaged over seeds, not of the highest."""
    lab = load_lab("memorization")
    runs = {(8, seed): [{"step": s, "mem_frac": 0.0, "fid": fid} for s, fid in zip((10, 20, 30), fids)]
            for seed, fids in ((0, (5.0, 1.0, 9.0)), (1, (9.0, 5.0, 1.0)))}
    table, _, key = lab.summarise(None, runs)
    assert key == "fid" and table[0]["tau_gen"] == pytest.approx(25.0)  # steps 20 and 30


def test_the_unconditional_repa_arm_differs_from_the_others_only_in_its_own_flags():
    import train
    lab = load_lab("reg_vs_repa")
    args = lab.get_args(["--arms", "REPA uncond."])
    assert args.arms == ["REPA uncond."] and "REPA uncond." in lab.DEFAULT_ARMS  # run by default
    parsed = {arm: train.get_args(lab.train_argv(args, arm, 0, "enc.pt")) for arm in ("REPA", "REPA uncond.", "REG uncond.")}
    assert (parsed["REPA uncond."].cls_coeff, parsed["REPA uncond."].proj_coeff, parsed["REPA uncond."].cfg_prob) == (0, 0.5, 1)
    assert lab.unconditional("REPA uncond.") and not lab.unconditional("REPA")
    for other in ("REPA", "REG uncond."):  # one flag apart: the labels, or the class token's loss
        differ = {k for k, v in vars(parsed["REPA uncond."]).items() if vars(parsed[other])[k] != v}
        assert differ == ({"cfg_prob", "exp_name"} if other == "REPA" else {"cls_coeff", "exp_name"})


@pytest.mark.parametrize("name", ["reg_vs_repa", "closed_form", "memorization"])
def test_a_cuda_lab_without_a_gpu_is_a_one_line_error(name, monkeypatch, capsys):
    lab = load_lab(name)
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        lab.get_args(["--device", "cuda"])
    assert exit_.value.code == 2 and "torch sees no GPU" in capsys.readouterr().err


def test_the_memorization_cpu_preset_trains_plain_sit_on_8px_digits_at_batch_min_n_cap():
    import train
    lab = load_lab("memorization")
    args = lab.get_args([])
    for n in args.preset["ns"]:
        run = train.get_args(lab.job(n, 0, args)["flags"])
        assert (run.builtin, run.resolution, run.model, run.num_images) == ("digits", 8, "SiT-T/4", n)
        assert (run.proj_coeff, run.cls_coeff) == (0, 0)  # plain SiT: train.py's, through train.main
        assert run.global_batch_size == min(n, args.preset["cap"])  # Bonnaire et al.'s rule, cap ours
        assert run.max_train_steps == args.preset["steps_per_image"] * n


def test_a_memorization_run_at_smoke_size_writes_its_rows(tmp_path, monkeypatch):
    """One worker end to end (train.main, then each checkpoint sampled and measured), on 8x8 shapes
    for 4 steps; the toy evaluator replaced by a stub that sees the run's data and the samples."""
    seen = []

    class Stub:
        def __init__(self, device="cpu", variant="shapes", resolution=32):
            seen.append((variant, resolution))

        def __call__(self, samples, labels):
            assert samples.shape == (4, 3, 8, 8) and len(labels) == 4
            return {"fid": 1.0}

    monkeypatch.setattr(common, "Quality", Stub)
    lab = load_lab("memorization")
    args = lab.get_args(["--data", "shapes", "--ns", "4", "--steps-per-image", "1", "--out", str(tmp_path)])
    args.preset.update(evals=2, samples=4, sample_steps=2)
    spec = lab.job(4, 0, args)
    lab.worker(json.loads(json.dumps(spec)))
    rows = json.loads(open(spec["out_json"]).read())
    assert [r["step"] for r in rows] == [2, 4] and all(0 <= r["mem_frac"] <= 1 and r["fid"] == 1 for r in rows)
    assert seen == [("shapes", 8)]


def test_carflow_1d_at_smoke_size_writes_the_paper_column_the_shift_panels_and_its_load(tmp_path):
    import argparse
    lab = load_lab("carflow_1d")
    args = argparse.Namespace(steps=4, batch=16, lr=3e-3, seeds=1, eval_every=2, eval_samples=20, learn_scale=False,
                              workers=1, out=str(tmp_path))
    runs = [lab.train_arm(arm, 0, args) for arm in lab.ARMS]
    assert [row["step"] for row in runs[-1]["curve"]] == [1, 2, 4] and "mu1_1" in runs[-1]["curve"][0]
    lab.report(runs, args, dict(seconds=1.0, cpu_seconds=2.0, cores=2, loadavg_before=(3.0, 2.0, 1.0),
                                loadavg_after=(4.0, 2.5, 1.2)))
    saved = json.loads((tmp_path / "arms.json").read_text())
    assert (saved["loadavg_before"], saved["loadavg_after"]) == ([3.0, 2.0, 1.0], [4.0, 2.5, 1.2])
    assert "| joint |" in (tmp_path / "arms.md").read_text() and "0.7121 ± 0.0011" in (tmp_path / "arms.md").read_text()
    assert (tmp_path / "arms.png").stat().st_size > 0
