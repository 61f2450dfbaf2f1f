"""labs/reals.py without training: its runs differ only in the arm's flags and the latent space's
data, they train on prepared latents with the toy teacher, and a cuda preset needs a GPU."""
import importlib.util
import os
import sys

import pytest

import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "labs"))
import common  # noqa: E402


@pytest.fixture(scope="module")
def lab():
    spec = importlib.util.spec_from_file_location("reals", os.path.join(REPO, "labs", "reals.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_differ_only_in_the_arms_flags_and_the_latent_spaces_data(lab):
    args = lab.get_args(["--out", "out"])
    parsed = {(latent, arm): vars(train.get_args(lab.train_argv(args, latent, arm, 0)))
              for latent in lab.LATENTS for arm in lab.ARMS}
    base = parsed["plain", "REG"]
    assert base["enc_type"] == "builtin-vit" and base["data_path"] == os.path.join("out", "data-plain")
    assert (base["proj_coeff"], base["cls_coeff"], base["ema_decay"]) == (0.5, 0.03, 0.99)
    for (latent, arm), flags in parsed.items():
        differ = {k for k, v in flags.items() if base[k] != v} - {"exp_name"}
        expected = ({"data_path"} if latent == "aligned" else set()) | \
                   {"SiT": {"proj_coeff", "cls_coeff"}, "REPA": {"cls_coeff"}, "REG": set()}[arm]
        assert differ == expected, (latent, arm)


def test_the_cpu_preset_trains_a_patch_2_sit_on_the_teachers_16_token_grid(lab):
    import toy
    downsample = 2 ** (len(toy.VAE_CONFIG["ch_mult"]) - 1)
    patch = int(lab.get_args([]).scale["model"].split("/")[1])
    assert (32 // downsample // patch) ** 2 == (32 // 8) ** 2 == 16  # SiT tokens = the teacher's 8-pixel patches


def test_a_cuda_lab_without_a_gpu_is_a_one_line_error(lab, monkeypatch, capsys):
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        lab.get_args(["--device", "cuda"])
    assert exit_.value.code == 2 and "torch sees no GPU" in capsys.readouterr().err
