"""Specification of the command lines' numbers: every int or float flag of train.py, sample.py,
data.py (both subcommands) and evaluate.py declares its range where it is defined (util.number), so
a value outside is one line `error: argument --flag: VALUE is out of range; give ... in [low, high]`
and exit status 2, at parsing, before any model is built or file written.

TABLE holds one bad and one good value for every such flag. A new int or float flag that is not
in it fails test_every_number_flag_is_checked_where_it_is_parsed: add its row.
"""
import argparse
import re

import pytest

import data
import evaluate
import sample
import train
import util

# script -> {flag: (a value outside its range, a value inside)}
TABLE = {
    "train.py": {
        "--encoder-depth": ("0", "4"),
        "--proj-coeff": ("-0.5", "1.5"),
        "--cls-coeff": ("-1", "0.1"),
        "--cfg-prob": ("1.5", "0.2"),
        "--global-batch-size": ("0", "64"),
        "--gradient-accumulation-steps": ("0", "2"),
        "--max-train-steps": ("-5", "10"),
        "--lr": ("-1", "3e-4"),
        "--adam-beta1": ("1", "0.8"),
        "--adam-beta2": ("-0.1", "0.95"),
        "--adam-weight-decay": ("-0.01", "0.01"),
        "--adam-epsilon": ("-0.1", "1e-6"),
        "--max-grad-norm": ("0", "2"),
        "--ema-decay": ("1.1", "0.999"),
        "--cf-refs": ("0", "16"),
        "--num-images": ("1", "64"),
        "--resolution": ("3", "16"),
        "--mem-every": ("-1", "10"),
        "--mem-samples": ("0", "32"),
        "--seed": ("-1", "7"),
        "--num-workers": ("-1", "2"),
        "--log-every": ("0", "10"),
        "--sample-every": ("0", "10"),
        "--checkpoint-every": ("0", "10"),
        "--sample-steps": ("1", "20"),
        "--sample-cfg-scale": ("0.5", "4"),
        "--eval-every": ("-1", "0"),
        "--eval-samples": ("3", "1000"),
        "--eval-steps": ("1", "100"),
        "--eval-batch-size": ("0", "32"),
    },
    "sample.py": {
        "--resolution": ("100", "512"),
        "--num-classes": ("0", "10"),
        "--encoder-depth": ("0", "4"),
        "--z-dim": ("0", "384"),
        "--num-steps": ("0", "100"),
        "--cfg-scale": ("0.5", "4"),
        "--cls-cfg-scale": ("-1", "0"),
        "--guidance-low": ("-0.1", "0.5"),
        "--guidance-high": ("1.5", "0.9"),
        "--seed": ("4294967296", "3"),
        "--classes": ("-1", "3"),
        "--per-class": ("0", "4"),
        "--num-samples": ("-1", "100"),
        "--per-proc-batch-size": ("0", "32"),
    },
    "data.py prepare": {
        "--resolution": ("0", "512"),
        "--batch-size": ("0", "32"),
        "--workers": ("-1", "0"),
        "--chunk-size": ("0", "500"),
    },
    "data.py synthetic": {
        "--count": ("0", "100"),
        "--resolution": ("12", "64"),
    },
    "evaluate.py": {
        "--batch-size": ("0", "100"),
    },
}

# Ranges that depend on another flag, checked right after parsing: (script, flags, words of the error).
RELATIONS = [
    ("sample.py", ["--num-steps", "1"], "argument --num-steps: 1 is out of range for --mode sde; give an int in [2, inf)"),
    ("sample.py", ["--guidance-low", "0.9", "--guidance-high", "0.5"], "--guidance-low must not exceed --guidance-high"),
    ("sample.py", ["--num-samples", "3", "--eval-ref", "r.npz", "--inception", "i.pth"], "at least 4"),
    ("data.py prepare", ["--resolution", "100"], "argument --resolution: 100 is not a multiple of 8"),
]


class _Built(Exception):
    pass


def parser_of(script, monkeypatch):
    """The argparse parser of a script (of a data.py subcommand), as its command line builds it."""
    if script == "train.py":  # get_args builds its parser inline: catch it where it first parses
        class Spy(util.ArgumentParser):
            def parse_known_args(self, *args, **kwargs):
                raise _Built(self)
        monkeypatch.setattr(train, "ArgumentParser", Spy)
        with pytest.raises(_Built) as built:
            train.get_args([])
        return built.value.args[0]
    if script.startswith("data.py"):
        commands = next(a for a in data.make_parser()._actions if isinstance(a, argparse._SubParsersAction))
        return commands.choices[script.split()[1]]
    return {"sample.py": sample.make_parser, "evaluate.py": evaluate.make_parser}[script]()


def number_flags(parser):
    """{flag: action} of the options that parse an int or a float."""
    return {a.option_strings[-1]: a for a in parser._actions if a.option_strings
            and (a.type in (int, float) or isinstance(a.type, util.number))}


@pytest.mark.parametrize("script", TABLE)
def test_every_number_flag_is_checked_where_it_is_parsed(script, monkeypatch, capsys):
    """Guards: each int/float flag has a row in TABLE, declares its range with util.number, refuses a value
    outside it in one line naming the flag, the value and the range (exit 2), and accepts one inside."""
    flags = number_flags(parser_of(script, monkeypatch))
    monkeypatch.undo()
    missing = sorted(set(flags) - set(TABLE[script]))
    assert not missing, f"{script}: add rows to TABLE for {missing} (a value outside the range, one inside)"
    assert not sorted(set(TABLE[script]) - set(flags)), "rows of TABLE for flags that no longer exist"
    plain = sorted(f for f, a in flags.items() if not isinstance(a.type, util.number))
    assert not plain, f"{script}: declare the range of {plain} with type=util.number(...)"
    for flag, (bad, good) in TABLE[script].items():
        with pytest.raises(SystemExit) as stop:
            parse_only(script, [flag, bad])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), (flag, err)
        assert f"argument {flag}: {bad} is out of range; give " in err, (flag, err)
        assert re.search(r"in [\[(]\S+, \S+[\])]", err), (flag, err)  # the range, as [low, high) etc.
        args = parse_only(script, [flag, good])
        value = getattr(args, flags[flag].dest)
        assert value == flags[flag].type(good) or value == [flags[flag].type(good)], (flag, value)


def parse_only(script, flags):
    """Parse a command line as the script does, up to and including its flag checks (no work)."""
    if script.startswith("data.py"):
        command = script.split()[1]
        required = ["--src", "in", "--dst", "out"] if command == "prepare" else ["--dst", "out"]
        return data.make_parser().parse_args([command, *required, *flags])
    if script == "evaluate.py":
        return evaluate.make_parser().parse_args(["ref.npz", "samples.npz", "--inception", "w.pth", *flags])
    return {"train.py": train.get_args, "sample.py": sample.get_args}[script](flags)


@pytest.mark.parametrize("script, flags, words", RELATIONS)
def test_a_range_that_depends_on_another_flag_is_one_line_before_any_work(script, flags, words, monkeypatch,
                                                                         tmp_path, capsys):
    """Guards the checks made right after parsing (sample.py's SDE steps and guidance interval,
    data.py's VAE-divisible resolution): one line, exit 2, nothing loaded or written."""
    monkeypatch.chdir(tmp_path)
    loaded = []
    monkeypatch.setattr("encoder.load_vae", lambda *a, **k: loaded.append(a))
    with pytest.raises(SystemExit) as stop:
        if script == "data.py prepare":
            data.main(["prepare", "--src", "in", "--dst", "out", *flags])
        else:
            sample.get_args(flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert not loaded and not list(tmp_path.iterdir())


def test_number_states_its_range_and_refuses_what_is_not_a_finite_number():
    """Guards util.number's message: the range as written in mathematics, bounds open or closed."""
    assert util.number(float, 0, below=1).range() == "a float in [0, 1)"
    assert util.number(float, above=0).range() == "a float in (0, inf)"
    assert util.number(int, 8, multiple=8).range() == "a multiple of 8 in [8, inf)"
    assert util.number(int, 0, 9).range() == "an int in [0, 9]"
    for kind, text in ((float, "nan"), (float, "inf"), (int, "1.5"), (int, "12")):
        with pytest.raises(argparse.ArgumentTypeError):
            util.number(kind, 0, multiple=8 if text == "12" else None)(text)
    assert util.number(float, 0, 1)("1") == 1.0 and util.number(int, 8, multiple=8)("16") == 16
