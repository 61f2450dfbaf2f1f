"""The plumbing every script shares: processes under torchrun, errors for people, images out.

    processes = setup_processes()      # rank, local_rank, world_size, device; torchrun or not
    raise UserError("no checkpoint at x.pt; give the path of a .pt file written by train.py")
    parser = ArgumentParser(description=__doc__)   # --help shows every default
    parser.add_argument("--lr", type=number(float, above=0))  # `error: argument --lr: -1 is out of range ...`
    run(main)                          # a UserError becomes one line `error: ...` and exit status 2
    save_grid(to_uint8(images), "grid.png", nrow=8)
    save_checkpoint(path, state)       # atomic: a temporary file, then a rename
"""
import argparse
import datetime
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from PIL import Image


# ----------------------------------------------------------------------------- errors for people

class UserError(Exception):
    """A mistake the user can fix (a path, a missing weight file, a bad flag, a corrupt checkpoint).

    The message says what is wrong and what to do. Scripts print it as one line `error: ...` and
    exit with status 2, without a traceback; tracebacks are kept for bugs.
    """


def load_file(path, what, how):
    """A .pt file as a dict, read with torch.load(weights_only=True), so no code in it runs; a file
    that is missing, corrupt, a pickle carrying code or not a dict is one line: `{path} is not
    {what} ...; {how}`. The one reader of checkpoints (model.read_checkpoint) and encoder files."""
    try:
        with warnings.catch_warnings(record=True) as caught:  # a foreign file's warnings would be a second line
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError (zip) or others for a foreign file
        raise UserError(f"{path} is not {what} ({type(e).__name__}); {how}") from e
    for w in caught:  # a good file's warnings still reach the user
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not isinstance(state, dict):
        raise UserError(f"{path} is not {what}: it holds a {type(state).__name__}, not a dict; {how}")
    return state


def run(main, *args):
    """Call main(*args) as a script's entry point, turning a UserError into one line on stderr."""
    try:
        return main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout (its shell examples) and shows every default."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with every default in --help, and one line `error: ...` for a bad flag."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=_HelpFormatter, **kwargs)

    def error(self, message):
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr, flush=True)
        sys.exit(2)


class number:
    """An argparse `type=` that parses an int or a float and checks its range where the flag is
    defined, so a number out of range is one line that names the flag, the value and the range:

        p.add_argument("--lr", type=number(float, above=0))    # (0, inf)
        p.add_argument("--ema-decay", type=number(float, 0, 1))  # [0, 1]
        error: argument --lr: -1 is out of range; give a float in (0, inf); see train.py --help

    low and high are inclusive bounds, above and below exclusive ones; `multiple` asks for a
    multiple of it (e.g. an image side that the VAE's downsampling divides). inf and NaN are refused.
    """

    def __init__(self, kind, low=None, high=None, *, above=None, below=None, multiple=None):
        self.kind, self.low, self.high, self.above, self.below, self.multiple = kind, low, high, above, below, multiple
        self.__name__ = kind.__name__  # what argparse calls the type in its messages

    def range(self):
        left = f"[{self.low}" if self.low is not None else f"({self.above}" if self.above is not None else "(-inf"
        right = f"{self.high}]" if self.high is not None else f"{self.below})" if self.below is not None else "inf)"
        what = f"a multiple of {self.multiple}" if self.multiple else "an int" if self.kind is int else "a float"
        return f"{what} in {left}, {right}"

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {self.kind.__name__} value: {text!r}")
        inside = (value == value and abs(value) != float("inf")  # finite (NaN differs from itself)
                  and (self.low is None or value >= self.low) and (self.high is None or value <= self.high)
                  and (self.above is None or value > self.above) and (self.below is None or value < self.below)
                  and (not self.multiple or value % self.multiple == 0))
        if not inside:
            raise argparse.ArgumentTypeError(f"{text} is out of range; give {self.range()}")
        return value


# ----------------------------------------------------------------------------- processes

@dataclass(frozen=True)
class Processes:
    """Where this process stands: rank among world_size processes, and its device."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def master(self):
        return self.rank == 0  # the one process that logs, plots and writes shared files


def setup_processes(timeout_minutes=30):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process.

    One process per GPU (NCCL), or gloo processes on CPU. `timeout_minutes` bounds how long a
    collective waits for a slow rank (data.py prepare lists 1.28M files on rank 0 meanwhile).
    """
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:
        return Processes(0, 0, 1, device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return Processes(dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size(), device)


def distributed():
    return dist.is_available() and dist.is_initialized()


def barrier():
    if distributed():
        dist.barrier()


def all_mean(values, world_size):
    """{name: 0-d tensor} -> {name: float}, averaged over processes (one all-reduce, one host sync)."""
    stacked = torch.stack([values[k] for k in sorted(values)])
    if world_size > 1:
        dist.all_reduce(stacked)
        stacked /= world_size
    return dict(zip(sorted(values), stacked.tolist()))


def amp_dtype(precision, device):
    """train.py's autocast dtype: bf16 or fp16 on GPU; none on CPU, where autocast is slower than fp32 here."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision] if device.type == "cuda" else None


def cleanup_processes():
    if distributed():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- images out

def to_uint8(x):
    """Decoder output in [-1, 1] (N, 3, H, W) -> uint8 (N, 3, H, W) by floor(255 (x + 1) / 2).

    Truncation, not rounding, as the REPA/REG release's generate.py writes its FID samples:
    FID is sensitive enough to a half-level shift of every pixel to keep this identical.
    """
    return torch.clamp(255 * (x + 1) / 2, 0, 255).to(torch.uint8)


def save_grid(images, path, nrow=8, padding=2):
    """Save (N, 3, H, W) images (uint8, or floats in [-1, 1]) as a PNG grid, `nrow` images per row."""
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        images = to_uint8(images.float())
    n, _, h, w = images.shape
    rows = -(-n // nrow)
    # Blank tiles fill the last row; each tile gets a border on its top and left, the grid on its bottom and right.
    images = torch.cat([images, images.new_zeros(rows * nrow - n, 3, h, w)])
    tiles = torch.nn.functional.pad(images, (padding, 0, padding, 0))  # (rows*nrow, 3, p+H, p+W)
    grid = tiles.view(rows, nrow, 3, padding + h, padding + w).permute(0, 3, 1, 4, 2)  # (rows, p+H, nrow, p+W, 3)
    grid = grid.reshape(rows * (padding + h), nrow * (padding + w), 3)
    grid = torch.nn.functional.pad(grid, (0, 0, 0, padding, 0, padding))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)


# ----------------------------------------------------------------------------- checkpoint files

def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path, state):
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def latest_checkpoint(ckpt_dir):
    names = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".pt")) if os.path.isdir(ckpt_dir) else []
    return os.path.join(ckpt_dir, names[-1]) if names else None
