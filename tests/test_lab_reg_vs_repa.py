"""Specification of the lab labs/reg_vs_repa.py: its plumbing on a few steps per arm (the arms reach
train.py with the same flags except their own), its outputs, and its token-steering sampler."""
import importlib.util
import json
import os

import pytest
import torch

import data
import toy
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("reg_vs_repa", os.path.join(REPO, "labs", "reg_vs_repa.py"))
lab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lab)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """A tiny teacher and scorer where the lab looks for them, so the lab trains neither."""
    folder = tmp_path_factory.mktemp("toy")
    toy.train_encoder(str(folder / "encoder-label-16px-p4.pt"), num_images=100, epochs=1, probe_images=100,
                      resolution=16, patch_size=4, z_dim=32, depth=1, num_heads=1)
    toy.train_evaluator(str(folder / "evaluator-16px-4ep.pt"), num_images=100, epochs=1, width=8, sanity_images=50,
                        resolution=16)
    return folder


def test_lab_runs_every_arm_through_train_py_with_only_its_own_flags_and_writes_outputs(toy_dir, tmp_path,
                                                                                       monkeypatch):
    received = []  # the args every train.main call got

    def spy(args, real=train.main):
        received.append(args)
        return real(args)

    monkeypatch.setattr(lab.train, "main", spy)
    monkeypatch.setitem(data.BUILTIN_DATASETS, "hard",  # small, same kind
                        lambda num_images=64, resolution=32, seed=0: data.HardShapes(min(num_images, 64), resolution, seed))
    out = tmp_path / "lab"
    lab.main(lab.get_args(["--data", "hard", "--seeds", "1", "--steps", "2", "--samples", "20", "--out", str(out),
                           "--toy-dir", str(toy_dir), "--parallel", "1"]))

    assert [(a.exp_name, a.seed) for a in received] == [(lab.run_name(arm, 0), 0) for arm in lab.DEFAULT_ARMS]
    flags = {"cls_coeff": {"SiT": 0, "REPA": 0, "REG": 0.03, "SiT uncond.": 0, "REPA uncond.": 0, "REG uncond.": 0.03},
             "proj_coeff": {"SiT": 0, "REPA": 0.5, "REG": 0.5, "SiT uncond.": 0, "REPA uncond.": 0.5, "REG uncond.": 0.5},
             "cfg_prob": {"SiT": 0.1, "REPA": 0.1, "REG": 0.1, "SiT uncond.": 1, "REPA uncond.": 1, "REG uncond.": 1}}
    for args, arm in zip(received, lab.DEFAULT_ARMS):
        for name, by_arm in flags.items():
            assert getattr(args, name) == by_arm[arm], (arm, name)
        common = {k: v for k, v in vars(args).items() if k not in (*flags, "exp_name", "seed")}
        assert common == {k: v for k, v in vars(received[0]).items() if k not in (*flags, "exp_name", "seed")}
    assert received[0].builtin == "hard" and received[0].enc_type == "builtin-vit" and received[0].compile is False
    assert received[0].resolution == 16 and received[0].enc_path.endswith("encoder-label-16px-p4.pt")

    results = json.loads((out / "results.json").read_text())
    assert set(results["final"]) == set(lab.DEFAULT_ARMS)
    assert results["command"] == f"python labs/reg_vs_repa.py --data hard --seeds 1 --steps 2 --samples 20 --out {out} --toy-dir {toy_dir} --parallel 1"
    assert len(results["curves"]["REG"]) == 1 and [r["step"] for r in results["curves"]["REG"][0]] == [1, 2]
    assert sorted(os.listdir(out / "runs" / "REG-seed0" / "checkpoints")) == ["0000002.pt"]  # scored: the last kept
    assert results["final"]["REG"]["fid"]["seeds"] == [run[-1]["fid"] for run in results["curves"]["REG"]]
    assert results["final"]["REG uncond."].get("accuracy") is None and "top_class_share" in results["final"]["REG uncond."]
    assert results["steering"]["arm"] == "REG uncond." and "other token: colour nearer the donor's" in results["steering"]
    assert results["probes"]["label"]["class"] > 0 and "loadavg_before" in results and results["seconds"] > 0
    markdown = (out / "results.md").read_text()
    assert results["command"] in markdown and "| REPA | 2 |" in markdown
    for name in ("curves.png", "steering.png"):
        assert (out / name).stat().st_size > 1000

    # The same command again trains nothing: each run's scores were kept with their flags.
    received.clear()
    lab.main(lab.get_args(["--data", "hard", "--seeds", "1", "--steps", "2", "--samples", "20", "--out", str(out),
                           "--toy-dir", str(toy_dir), "--parallel", "1"]))
    assert received == [] and json.loads((out / "results.json").read_text())["final"] == results["final"]


def test_token_study_arms_differ_from_reg_with_the_rich_teacher_only_in_their_own_flags():
    args = lab.get_args(["--study", "tokens"])
    assert args.out.endswith("reg_vs_repa-tokens") and len(args.arms) == 6
    assert lab.get_args(["--study", "tokens-uncond"]).arms == [arm + " uncond." for arm in args.arms]
    parsed = {arm: train.get_args(lab.train_argv(args, arm, 0)) for arm in lab.ARMS if "rich" in arm}
    own = {"REPA rich": {"cls_coeff": 0}, "REG rich": {},
           "REG rich, patch mean": {"cls_target": "patch-mean"}, "REG rich, learned token": {"cls_target": "learned"},
           "REG rich, latent mean": {"cls_target": "latent-mean"}, "REG rich, no alignment": {"proj_coeff": 0}}
    for arm, expected in own.items():
        for name, flags in ((arm, expected), (arm + " uncond.", {**expected, "cfg_prob": 1})):
            differ = {k: v for k, v in vars(parsed[name]).items() if vars(parsed["REG rich"])[k] != v and k != "exp_name"}
            assert differ == flags, name
            assert parsed[name].enc_path.endswith("encoder-rich-16px-p4.pt")
    main = train.get_args(lab.train_argv(lab.get_args(["--data", "hard"]), "REPA", 0))  # the label teacher's REPA: the teacher apart
    assert {k for k, v in vars(main).items() if vars(parsed["REPA rich"])[k] != v} == {"enc_path", "exp_name",
                                                                                        "output_dir"}


def test_variants_study_differs_from_the_main_studys_reg_only_in_each_variants_flag():
    args = lab.get_args(["--study", "variants"])  # Tables 5 and 6 with the label teacher, on the CPU's digits
    assert args.data == "digits" and args.out.endswith("reg_vs_repa-variants") and len(args.arms) == 4
    reg = vars(train.get_args(lab.train_argv(lab.get_args([]), "REG", 0)))  # the main study's REG
    own = {"REG, patch mean": {"cls_target": "patch-mean"}, "REG, learned token": {"cls_target": "learned"},
           "REG, latent mean": {"cls_target": "latent-mean"}, "REG, no alignment": {"proj_coeff": 0}}
    assert set(own) == set(args.arms)
    for study, extra in (("variants", {}), ("variants-uncond", {"cfg_prob": 1})):
        args = lab.get_args(["--study", study])
        for arm in args.arms:
            parsed = vars(train.get_args(lab.train_argv(args, arm, 0)))
            differ = {k: v for k, v in parsed.items() if reg[k] != v and k not in ("exp_name", "output_dir")}
            assert differ == {**own[arm.removesuffix(" uncond.")], **extra}, arm


def test_the_cpu_default_is_the_digits_and_the_token_studies_keep_the_hard_shapes(capsys):
    args = lab.get_args([])  # the plain CPU command: the real digits at the digits' CPU scale
    parsed = train.get_args(lab.train_argv(args, "REG", 0))
    assert args.data == "digits" and args.scale == lab.SCALES["cpu", "digits"]
    assert parsed.builtin == "digits" and parsed.resolution == args.scale["resolution"]
    assert parsed.enc_path.endswith(f"encoder-label-digits-{args.scale['resolution']}px-p2.pt")
    assert lab.evaluator_file(args).endswith(f"evaluator-digits-{args.scale['resolution']}px-8ep.pt")
    # Not the memorization lab's scorer of the same world (trained for another number of epochs).
    assert os.path.basename(lab.evaluator_file(args)) != os.path.basename(lab.common.evaluator_path("digits", 8))
    assert lab.get_args(["--study", "tokens"]).data == "hard" and lab.DEFAULT_DATA["cuda"] == "hard"
    with pytest.raises(SystemExit):  # the rich teacher needs the hard shapes' attributes
        lab.get_args(["--study", "tokens", "--data", "digits"])
    assert "give --data hard" in capsys.readouterr().err


def test_unconditional_arm_trains_and_samples_with_the_null_label_only():
    model = train.SiT_models["SiT-T/8"](input_size=32, in_channels=3, num_classes=10, class_dropout_prob=1.0,
                                         cls_token=False, projector=False)  # "SiT uncond."
    model.train()
    seen = []
    model.y_embedder.embedding_table.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].clone()))
    model(torch.zeros(4, 3, 32, 32), torch.rand(4), torch.tensor([0, 3, 5, 9]))  # --cfg-prob 1 in training
    model.eval()
    lab.generate(model, range(4), 0, True, torch.device("cpu"), steps=2)  # the lab's unconditional sampling
    assert all((y == 10).all() for y in seen) and len(seen) == 3


class Recorder(torch.nn.Module):
    """A model that records the class token it reads and returns zero velocities."""

    num_classes = 10  # what flow.sample_sit reads of a SiT, besides its call

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.read = []

    def shifts(self, y):
        return None, None

    def forward(self, x, t, y, cls):
        self.read.append((t[0].item(), cls.clone()))
        return torch.zeros_like(x), torch.zeros_like(cls), None


def test_given_token_reads_the_donor_path_or_fresh_noise():
    model = Recorder()
    clean, start = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    other = lab.GivenToken(model, "other", clean=clean, start=start)
    for t in (1.0, 0.5, 0.04):
        other(torch.zeros(3, 1), torch.full((3,), t), None, torch.zeros(3, 5))
    for t, cls in model.read:
        assert torch.allclose(cls.double(), (1 - t) * clean + t * start, atol=1e-6)  # the linear path x_t
    model.read.clear()
    noise = lab.GivenToken(model, "noise", seed=0)
    for _ in range(2):
        noise(torch.zeros(3, 1), torch.full((3,), 0.5), None, torch.zeros(3, 5))
    (_, a), (_, b) = model.read
    assert not torch.equal(a, b) and a.std() > 0.5  # re-drawn each step, unit scale
