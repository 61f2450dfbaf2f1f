"""Specification of util.py: one-line user errors, --help with defaults, processes, images out."""

import numpy as np
import pytest
import torch
from PIL import Image

import util


def test_a_user_error_is_one_line_on_stderr_and_exit_status_2(capsys):
    def main():
        raise util.UserError("no checkpoint at x.pt; give the path of a .pt file")
    with pytest.raises(SystemExit) as exit_:
        util.run(main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: no checkpoint at x.pt; give the path of a .pt file\n"


def test_a_bug_keeps_its_traceback():
    def main():
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        util.run(main)


def test_a_bad_flag_is_one_line_and_exit_status_2(capsys):
    parser = util.ArgumentParser(prog="x.py")
    parser.add_argument("--steps", type=int, default=3)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--steps", "many"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--steps" in err


def test_help_shows_every_default(capsys):
    parser = util.ArgumentParser(prog="x.py")
    parser.add_argument("--steps", type=int, default=3, help="how many")
    parser.add_argument("--name", default="abc", help="a name")
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "how many (default: 3)" in out and "(default: abc)" in out


def test_without_torchrun_there_is_one_process_of_rank_zero(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    processes = util.setup_processes()
    assert (processes.rank, processes.world_size, processes.master) == (0, 1, True)


def test_to_uint8_truncates_255_times_half_x_plus_one_and_clamps():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6)
    out = util.to_uint8(x)
    # 255 * (x + 1) / 2 = -127.5, 0, 127.5, 254.87, 255, 510 -> clamp, then truncate.
    assert out.dtype == torch.uint8 and out.flatten().tolist() == [0, 0, 127, 254, 255, 255]


def test_save_grid_places_image_k_at_row_k_div_nrow_and_column_k_mod_nrow(tmp_path):
    images = torch.arange(5, dtype=torch.uint8).mul(40).view(5, 1, 1, 1).expand(5, 3, 4, 6)
    util.save_grid(images, tmp_path / "grid.png", nrow=3, padding=2)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 6 + 2, 3 * 8 + 2, 3)
    for k in range(6):
        tile = grid[2 + (k // 3) * 6:(k // 3 + 1) * 6, 2 + (k % 3) * 8:(k % 3 + 1) * 8]
        assert tile.shape == (4, 6, 3) and np.all(tile == (40 * k if k < 5 else 0)), k


def test_save_grid_of_floats_equals_grid_of_their_uint8(tmp_path):
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    util.save_grid(x, tmp_path / "a.png", nrow=2)
    util.save_grid(util.to_uint8(x), tmp_path / "b.png", nrow=2)
    a, b = (np.asarray(Image.open(tmp_path / name)) for name in ["a.png", "b.png"])
    np.testing.assert_array_equal(a, b)
