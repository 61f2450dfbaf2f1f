"""CAR-Flow's 1-D experiment (arXiv 2509.19300, section 4.1) on flow.py's loss and sampler.

Source N(0, 1); two classes of data, N(-1.5, 0.2^2) and N(+1.5, 0.2^2). A 3-layer MLP (1.9K
parameters) on sinusoidal embeddings of z_t, y and t predicts the velocity; each shift map is a
Linear on a sinusoidal class embedding (9 parameters), zero at the start. Four arms with the same
settings and seeds, differing only in the maps: baseline (none), source (eps + mu0(y)), target
(x + mu1(y)) and joint. Training is flow.training_loss with shifts=(mu0, mu1), sampling is
flow.sample_ode (Euler, 50 steps, the paper's sigma = 0 setting) with the same shifts: the
project's code path, driven here by a 20-line loop over a 1-D toy (train.py trains SiTs on images).

Measured per arm over --seeds runs (mean and std): the mean trajectory length |z_0 - z_1| of
generated paths (z_1 = eps + mu0(y), z_0 = the sample + mu1(y)), the 1-Wasserstein distance of
each class's samples to its Gaussian (averaged over the classes) over training, and the learned
shifts. --learn-scale is the paper's collapse demonstration (its Claim 1): the joint maps learn a
scale too, z_1 = s0(y) eps + mu0(y) and z_0 = s1(y) x + mu1(y), and the scales run to zero, where
the loss has a zero-cost minimum. Writes a PNG, a JSON and a markdown table to --out.
The default is the paper's length, 50,000 steps, and the table stands beside its Table 2. CPU only
(a 2K-parameter MLP gains nothing from a GPU); each command spreads its runs over --workers
processes, and writes its wall and CPU time and the machine's load (common.Clock) into
the JSON (times: README.md, "CAR-Flow"):
    python labs/carflow_1d.py                  # -> labs/results/carflow_1d/cpu/arms.{png,json,md}
    python labs/carflow_1d.py --learn-scale --steps 3000 --eval-every 100   # -> .../cpu/collapse.{png,json,md}
"""
import json
import math
import multiprocessing
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (it puts the repository on the path)
from flow import sample_ode, training_loss  # noqa: E402
from plot import line_plot  # noqa: E402
from util import ArgumentParser, number  # noqa: E402

MEANS, STD = (-1.5, 1.5), 0.2  # the two classes' data, section 4.1
ARMS = ("none", "source", "target", "joint")
# The paper's Table 2 (arXiv 2509.19300, section 4.1): mean trajectory length per arm, mean and its
# "±", which is two standard deviations over 3 runs (ours: one standard deviation over --seeds).
PAPER_LENGTH = {"none": (1.5355, 0.0024), "source": (0.7432, 0.0019), "target": (0.7129, 0.0010),
                "joint": (0.7121, 0.0011)}
COLORS = {"none": (90, 90, 90), "source": (31, 119, 180), "target": (214, 39, 40), "joint": (44, 160, 44)}
MAP_COLORS = {("source", "mu0"): COLORS["source"], ("target", "mu1"): COLORS["target"],
              ("joint", "mu0"): COLORS["joint"], ("joint", "mu1"): (150, 60, 170)}  # the joint arm's two maps apart


def sinusoidal(v, dim=8, max_period=100.0):
    """(N,) -> (N, dim): [cos, sin] of v at dim/2 geometric frequencies (as the SiT embeds t)."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2) / (dim // 2))
    args = v.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class VelocityMLP(nn.Module):
    """Sinusoidal embeddings of z_t, y and t, concatenated (24), then 24 -> 32 -> 32 -> 1."""

    def __init__(self, width=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(24, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 1))

    def forward(self, z, t, y, cls=None):  # flow.py's model interface; z: (N, 1, 1, 1)
        h = torch.cat([sinusoidal(z.reshape(-1)), sinusoidal(y), sinusoidal(t)], dim=1)
        return self.net(h).reshape(z.shape).to(z.dtype), None, None


class ClassMap(nn.Module):
    """A Linear on the class's sinusoidal embedding: 9 parameters, output `start` for every class."""

    def __init__(self, start=0.0):
        super().__init__()
        self.linear = nn.Linear(8, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.constant_(self.linear.bias, start)

    def forward(self, y):
        return self.linear(sinusoidal(y)).reshape(-1, 1, 1, 1)  # (N, 1, 1, 1)


def make_maps(arm, learn_scale):
    maps = nn.ModuleDict()
    if arm in ("source", "joint"):
        maps["mu0"] = ClassMap()
    if arm in ("target", "joint"):
        maps["mu1"] = ClassMap()
    if learn_scale:  # the collapse demonstration only: scales of the noise and of the data, from 1
        maps["s0"], maps["s1"] = ClassMap(1.0), ClassMap(1.0)
    return maps


def shifts(maps, y):
    return tuple(maps[k](y) if k in maps else None for k in ("mu0", "mu1"))


def data(y, generator):
    return torch.tensor(MEANS)[y].reshape(-1, 1, 1, 1) + STD * torch.randn(len(y), 1, 1, 1, generator=generator)


@torch.no_grad()
def evaluate(model, maps, n, generator):
    """Samples of both classes from the Euler ODE -> W1 to each class's Gaussian (mean over the
    classes), the mean trajectory length |z_0 - z_1|, and the samples."""
    y = torch.arange(2).repeat_interleave(n)
    eps = torch.randn(2 * n, 1, 1, 1, generator=generator)
    mu0, mu1 = shifts(maps, y)
    if "s0" in maps:  # a learned scale multiplies the noise before the shift
        eps = eps * maps["s0"](y)
    x = sample_ode(model, eps, y, steps=50, method="euler", shifts=(mu0, mu1))[0]
    z1 = eps if mu0 is None else eps + mu0
    z0 = x if mu1 is None else x + mu1
    length = (z0 - z1).abs().mean().item()
    if "s1" in maps:  # undo the learned data scale: x = (z_0 - mu1) / s1
        x = x / maps["s1"](y)
    # Exact W1 in 1-D: the sorted samples against the Gaussian's quantiles at (i + 1/2) / n.
    quantiles = STD * torch.special.ndtri((torch.arange(n) + 0.5) / n)
    w1 = [(x[y == c].reshape(-1).sort().values - (MEANS[c] + quantiles)).abs().mean().item() for c in (0, 1)]
    return sum(w1) / 2, length, x.reshape(-1)


def train_arm(arm, seed, args):
    """One run: the model and the arm's maps trained jointly by flow.training_loss -> its record."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model, maps = VelocityMLP(), make_maps(arm, args.learn_scale)
    opt = torch.optim.Adam([*model.parameters(), *maps.parameters()], lr=args.lr)
    curve = []
    for step in range(1, args.steps + 1):
        y = torch.randint(0, 2, (args.batch,), generator=g)
        x, noise = data(y, g), torch.randn(args.batch, 1, 1, 1, generator=g)
        if args.learn_scale:  # z_0 = s1 x + mu1, z_1 = s0 eps + mu0: the loss sees scaled ends
            x, noise = maps["s1"](y) * x, maps["s0"](y) * noise
        loss = training_loss(model, x, y, t=torch.rand(args.batch, generator=g), noise=noise,
                             shifts=shifts(maps, y))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == 1:
            w1, length, _ = evaluate(model, maps, args.eval_samples, torch.Generator().manual_seed(10_000 + seed))
            row = dict(step=step, loss=loss.item(), w1=w1, length=length)
            row.update({f"{k}_{c}": maps[k](torch.tensor([c])).item() for k in maps for c in (0, 1)})
            curve.append(row)
    return dict(arm=arm, seed=seed, final=curve[-1], curve=curve)


# ----------------------------------------------------------------------------- outputs

def mean_std(values):
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5


def exact_lengths():
    """Trajectory lengths of the exact flows: without shifts the 1-D ODE maps eps to m + 0.2 eps, so
    the length is E|m - 0.8 eps| (the same for both classes); with mu0 - mu1 = m it is E|0.8 eps|."""
    mu, sd = 1.5, 1 - STD
    folded = sd * math.sqrt(2 / math.pi) * math.exp(-mu ** 2 / (2 * sd ** 2)) + mu * math.erf(mu / (sd * math.sqrt(2)))
    return folded, sd * math.sqrt(2 / math.pi)


def contrast(row):
    """How far apart the maps move the two classes' paths: (mu0 - mu1)(+1.5) - (mu0 - mu1)(-1.5), 3.0
    (the class means' gap) for the shortest paths; 0 without maps."""
    return (row.get("mu0_1", 0) - row.get("mu1_1", 0)) - (row.get("mu0_0", 0) - row.get("mu1_0", 0))


def _band(name, curves, value, colour):
    """A series of plot.line_plot: value(row) over training, mean over seeds, band min..max over seeds."""
    per_step = [[value(c[j]) for c in curves] for j in range(len(curves[0]))]  # [step][seed]
    return dict(name=name, colour=colour, x=[row["step"] for row in curves[0]], y=[sum(v) / len(v) for v in per_step],
                band=([min(v) for v in per_step], [max(v) for v in per_step]))


def plot(runs, keys, path, title, shifts=False):
    """One panel per (key, label, log-scale) of `keys`: each arm's mean over seeds against the step,
    band min..max over seeds. shifts: then also the paper's Fig. 3b, each map's learned shift of
    each class over training, and the maps' class contrast."""
    arms = {arm: [r["curve"] for r in runs if r["arm"] == arm] for arm in dict.fromkeys(r["arm"] for r in runs)}
    panels = [dict(title=label, xlabel="step", log_y=log,
                   series=[_band(arm, curves, lambda row, k=key: row[k], COLORS.get(arm, (0, 0, 0)))
                           for arm, curves in arms.items()]) for key, label, log in keys]
    if shifts:
        maps = [(arm, m) for arm in arms for m in ("mu0", "mu1") if f"{m}_0" in arms[arm][0][0]]
        for c, mean in enumerate(MEANS):
            panels.append(dict(title=f"learned shifts of class {c} (data mean {mean:+.1f}), as the paper's Fig. 3b",
                               xlabel="step", series=[_band(f"{arm} {m}", arms[arm], lambda row, k=f"{m}_{c}": row[k],
                                                            MAP_COLORS[(arm, m)]) for arm, m in maps]))
        panels.append(dict(title="class contrast of the maps (3.0: the shortest paths)", xlabel="step",
                           series=[_band(arm, arms[arm], contrast, COLORS[arm]) for arm in arms if arm != "none"]))
    line_plot(panels, path, width=760, height=240, title=title)


def report(runs, args, cost):
    """The table (markdown and JSON) and the plot of the four arms."""
    command = "python labs/carflow_1d.py" + (" --learn-scale" if args.learn_scale else "")
    rows = []
    for run in runs:  # how far apart the maps move the two classes' paths: 3.0 (the class means' gap) at best
        f = run["final"]
        f["contrast"] = contrast(f)
    for arm in dict.fromkeys(r["arm"] for r in runs):
        finals = [r["final"] for r in runs if r["arm"] == arm]
        row = dict(arm=arm, runs=len(finals))
        for key in finals[0]:
            if key != "step":
                row[key] = mean_std([f[key] for f in finals])
        rows.append(row)
    baseline, shortest = exact_lengths()
    maps = ["mu0_0", "mu0_1", "mu1_0", "mu1_1", "contrast"] + (["s0_0", "s0_1", "s1_0", "s1_1"] if args.learn_scale else [])
    lines = [f"`{command}` ({args.steps} Adam steps of batch {args.batch}, lr {args.lr}; Euler ODE, 50 steps; "
             f"{len(runs) // len(rows)} seeds, mean ± std; {common.cost_line(cost)})", "",
             "| arm | trajectory length \\|z0 − z1\\| | the paper's (Table 2, ± 2σ) | W1 to the class Gaussians | loss | "
             + " | ".join(maps) + " |", "| --- " * (5 + len(maps)) + "|"]
    for row in rows:
        cells = [f"{row[k][0]:+.3f} ± {row[k][1]:.3f}" if k in row and (k != "contrast" or row["arm"] != "none")
                 else "—" for k in maps]
        paper = "{:.4f} ± {:.4f}".format(*PAPER_LENGTH[row["arm"]]) if not args.learn_scale else "—"
        lines.append(f"| {row['arm']} | {row['length'][0]:.3f} ± {row['length'][1]:.3f} | {paper} | "
                     f"{row['w1'][0]:.4f} ± {row['w1'][1]:.4f} | {row['loss'][0]:.4f} ± {row['loss'][1]:.4f} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"Exact flows: {baseline:.3f} without shifts (E|1.5 − 0.8 ε|), {shortest:.3f} at the shortest "
              f"(μ0(y) − μ1(y) equal to the class mean). mu0_c, mu1_c: the learned shift of class c (mean −1.5 "
              "for c = 0, +1.5 for c = 1); contrast: (mu0_1 − mu1_1) − (mu0_0 − mu1_0), 3.0 for the shortest paths; "
              "s0_c, s1_c: the learned scales (--learn-scale)."]
    os.makedirs(args.out, exist_ok=True)
    name = "collapse" if args.learn_scale else "arms"
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(dict(command=command, args=vars(args), **cost, table=rows, exact_lengths=dict(
            baseline=baseline, shortest=shortest), runs=runs), f, indent=1)
    keys = [("w1", "W1 to the class Gaussians", True), ("length", "trajectory length |z0 - z1|", False)]
    if args.learn_scale:
        keys = [("s0_1", "learned noise scale s0 (class 1)", False), ("s1_1", "learned data scale s1 (class 1)", False),
                ("loss", "training loss", True)]
    plot(runs, keys, os.path.join(args.out, f"{name}.png"), f"CAR-Flow 1-D (arXiv 2509.19300 section 4.1): {command}",
         shifts=not args.learn_scale)
    print("\n".join(lines))


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=number(int, 1), default=50_000, help="Adam steps per run (the paper's)")
    p.add_argument("--batch", type=number(int, 1), default=256, help="samples per step")
    p.add_argument("--lr", type=number(float, above=0), default=3e-3, help="Adam learning rate (model and maps)")
    p.add_argument("--seeds", type=number(int, 1), default=3, help="runs per arm (seeds 0, 1, ...)")
    p.add_argument("--eval-every", type=number(int, 1), default=500, help="steps between W1 / length evaluations")
    p.add_argument("--eval-samples", type=number(int, 2), default=2000, help="samples per class per evaluation")
    p.add_argument("--learn-scale", action="store_true",
                   help="the collapse demonstration: joint maps that learn a scale too (lab only)")
    p.add_argument("--workers", type=number(int, 1), default=6, help="runs trained at once, one process and thread each")
    p.add_argument("--out", default=os.path.join("labs", "results", "carflow_1d", "cpu"), help="where the outputs go")
    args = p.parse_args()
    clock = common.Clock()  # a time under load is not an idle time: it records the load too
    jobs = [(arm, seed, args) for arm in (("joint",) if args.learn_scale else ARMS) for seed in range(args.seeds)]
    # The runs are independent: one process each, --workers at a time, one thread per process.
    with multiprocessing.get_context("spawn").Pool(args.workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        runs = pool.starmap(train_arm, jobs)
    for run in runs:
        print(f"{run['arm']} seed {run['seed']}: {run['final']}")
    report(runs, args, clock.record())


if __name__ == "__main__":
    main()
