"""What watches a train.py run: the metrics log (metrics.jsonl, loss.png), the sample grids, and
FID and the memorized fraction while training (fid.png, mem.png). train.py builds them and calls
them when they are due; each samples the EMA through flow.sample_sit, as it was trained.

    log = MetricsLog(run_dir, step, processes); log.add(metrics); log.write(step, batch_size)
    SampleGrid(args, dataset, z_dim, vae, device).save(ema, "samples_0001000.png")
    Evaluation(args, dataset, z_dim, vae, processes, run_dir).run(step, ema, log)   # --eval-every
    Memorization(args, dataset, z_dim, device, run_dir).run(step, ema, log)        # --mem-every
"""
import json
import os
import time
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

import evaluate
from flow import LOSS_TERMS, sample_sit, sde_generator, start_noise
from plot import line_plot, smooth
from util import UserError, all_mean, amp_dtype, save_grid, to_uint8


def plot_curves(rows, keys, path, smoothing=True):
    """One panel per key, each on its own scale, against the step: raw values light, smoothed dark;
    without smoothing (sparse points, e.g. evaluations) one dark line with a dot per point.
    rows: dicts with "step" and some of `keys`."""
    panels = []
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if not points:
            continue
        steps, values = zip(*points)
        dark = dict(x=steps, y=smooth(values) if smoothing else values, colour=(31, 80, 180), dots=not smoothing,
                    last=True)
        raw = [dict(x=steps, y=values, colour=(160, 190, 230), width=1)] if smoothing else []
        panels.append(dict(title=key, series=raw + [dark]))
    if panels:
        line_plot(panels, path, height=170)


class MetricsLog:
    """Step metrics summed on the device (no host sync per step), averaged over the steps since
    the last log line and over processes, written as one JSON row per log step to
    metrics.jsonl and drawn into loss.png (master process only)."""

    def __init__(self, run_dir, step, processes):
        self.path, self.run_dir, self.processes = os.path.join(run_dir, "metrics.jsonl"), run_dir, processes
        self.rows = []
        if processes.master:
            if os.path.exists(self.path):  # keep the history up to the resumed step only
                with open(self.path) as f:
                    self.rows = [r for r in map(json.loads, f) if r["step"] <= step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)
        self.sums, self.steps, self.start = {}, 0, time.time()

    def add(self, metrics):
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0) + value
        self.steps += 1

    def check_finite(self, step, ckpt_dir):
        if not torch.isfinite(torch.tensor(all_mean({"loss": self.sums["loss"]}, self.processes.world_size)["loss"])):
            raise UserError(f"non-finite loss before step {step}; stopped without saving. The last good "
                            f"checkpoint is in {ckpt_dir}: relaunch to resume from it, with a lower --lr, "
                            "--precision fp32 or another --seed")

    def write(self, step, global_batch_size):
        means = {k: v / self.steps for k, v in all_mean(self.sums, self.processes.world_size).items()}
        device = self.processes.device
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - self.start
        self.record(dict(step=step, **{k: means[k] for k in (*LOSS_TERMS, "grad_norm") if k in means},
                         img_per_s=self.steps * global_batch_size / seconds, step_time=seconds / self.steps,
                         gpu_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0))
        self.sums, self.steps, self.start = {}, 0, time.time()

    def record(self, row):
        """Append a row (the log's, or an evaluation's) to metrics.jsonl, print it and redraw the plots."""
        if not self.processes.master:
            return
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        plot_curves(self.rows, (*LOSS_TERMS, "grad_norm"), os.path.join(self.run_dir, "loss.png"))

    @contextmanager
    def paused(self):
        """Leave the time spent inside (sampling, checkpoints, evaluations) out of the training throughput."""
        since = time.time()
        yield
        self.start += time.time() - since


def fixed_samples(ema, indices, k, steps, args, dataset, z_dim, device):
    """The samples `indices` of a fixed set, as FID and the memorized fraction draw them: start noise
    and label from flow.start_noise (seed and index alone; label index mod classes), batch k's SDE
    noise from flow.sde_generator, `steps` SDE steps, no guidance -> float latents (n, C, h, w)."""
    size = dataset.resolution // dataset.downsample
    x, cls, y = (None if t is None else t.to(device) for t in start_noise(
        indices, args.seed, (dataset.latent_channels, size, size), z_dim if ema.cls_token else None,
        dataset.num_classes))
    z, _ = sample_sit(ema, x, y, cls, steps=steps, path=args.path_type, generator=sde_generator(args.seed, k, device),
                      autocast=amp_dtype(args.precision, device))
    return z.float()


class SampleGrid:
    """Fixed noise and labels for the sample grids, the same on every process and after a resume:
    one row of 8 per class (at most 10 classes), sampled from the EMA with the SDE sampler."""

    def __init__(self, args, dataset, z_dim, vae, device):
        generator = torch.Generator().manual_seed(args.seed)
        size = dataset.resolution // dataset.downsample
        self.y = torch.arange(min(dataset.num_classes, 10)).repeat_interleave(8).to(device)
        self.x = torch.randn(len(self.y), dataset.latent_channels, size, size, generator=generator).to(device)
        self.cls = torch.randn(len(self.y), z_dim, generator=generator).to(device) if args.cls_coeff > 0 else None
        self.vae, self.args, self.dataset = vae, args, dataset

    def save(self, ema, path):
        args, device = self.args, self.x.device
        cls = self.cls if ema.cls_token else None  # a slot without input (--cls-target learned, latent-mean) takes none
        z, _ = sample_sit(ema, self.x, self.y, cls, steps=args.sample_steps, cfg_scale=args.sample_cfg_scale,
                          path=args.path_type, generator=torch.Generator(device).manual_seed(args.seed),
                          autocast=amp_dtype(args.precision, device))
        save_grid(self.vae.decode(z.float() / self.dataset.scaling_factor), path, nrow=8)


class Evaluation:
    """FID, sFID, IS, precision and recall of the EMA with evaluate.py's code (ADM's evaluator,
    arXiv 2105.05233), by the paper's protocol without guidance (REG 2507.01467, Table 1): SDE
    Euler-Maruyama, --eval-steps steps, CFG 1. All processes sample; rank 0 computes the metrics,
    logs them as e.g. fid10k (the 10k from --eval-samples) and draws fid.png.

    Sample i is fixed_samples' (start noise and label from (seed, i), batch k's SDE noise from
    (seed, k)). Each process takes a contiguous run of batches, so the samples and their order
    do not depend on the number of processes.
    """

    def __init__(self, args, dataset, z_dim, vae, processes, run_dir):
        self.net = evaluate.load_inception(args.inception, processes.device)
        self.ref = evaluate.reference_statistics(args.eval_ref, self.net)  # cached beside the file
        n = args.eval_samples
        tag = f"{n // 1000}k" if n % 1000 == 0 else str(n)
        self.names = {"fid": f"fid{tag}", "sfid": f"sfid{tag}", "inception_score": f"is{tag}",
                      "precision": f"precision{tag}", "recall": f"recall{tag}"}
        self.plot = os.path.join(run_dir, "fid.png")
        self.args, self.dataset, self.z_dim, self.vae, self.processes = args, dataset, z_dim, vae, processes

    def images(self, ema, k):
        """Batch k of the samples as uint8 (n, H, W, 3), decoded from latent / scaling_factor."""
        args = self.args
        indices = range(k * args.eval_batch_size, min((k + 1) * args.eval_batch_size, args.eval_samples))
        z = fixed_samples(ema, indices, k, args.eval_steps, args, self.dataset, self.z_dim, self.processes.device)
        images = to_uint8(self.vae.decode(z / self.dataset.scaling_factor).float())  # (n, 3, H, W)
        return images.permute(0, 2, 3, 1).cpu().numpy()

    def features(self, ema):
        """This process's share of the samples -> their Inception features (evaluate.features' dict)."""
        rank, world_size = self.processes.rank, self.processes.world_size
        batches = -(-self.args.eval_samples // self.args.eval_batch_size)
        parts = [evaluate.features(self.net, self.images(ema, k), progress=False)
                 for k in range(batches * rank // world_size, batches * (rank + 1) // world_size)]
        if not parts:  # more processes than batches: this one contributes no rows
            size = self.dataset.resolution
            parts = [evaluate.features(self.net, np.zeros((0, size, size, 3), np.uint8), progress=False)]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def run(self, step, ema, log):
        """Evaluate; any failure becomes a warning and training goes on. Every process takes the
        same path through the collectives, whichever process failed."""
        start, error, numbers = time.time(), None, None
        try:
            feats = self.features(ema)
        except Exception as e:  # an evaluation must never end the run
            feats, error = None, e
        ok = torch.tensor(float(error is None), device=self.processes.device)
        if self.processes.world_size > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item():
            feats = evaluate.gather_features(feats)
            if self.processes.master:
                try:
                    numbers = evaluate.metrics(self.ref, feats)
                except Exception as e:
                    error = e
        if not self.processes.master:
            return
        if numbers is None:
            reason = f"{type(error).__name__}: {error}" if error else "it failed on another process"
            warnings.warn(f"evaluation at step {step} failed: {reason}; training goes on", stacklevel=2)
            return
        log.record(dict(step=step, **{name: numbers[key] for key, name in self.names.items()},
                        eval_seconds=time.time() - start))
        plot_curves(log.rows, self.names.values(), self.plot, smoothing=False)


class TrainingLatents:
    """The training set as latents, read a block at a time: posterior mean x scaling factor (for the
    built-in data, the pixels in [-1, 1]). The means, not posterior samples: the question is which
    training image a sample copies, and the mean is the image's latent."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, block):
        mean = self.dataset.moments(np.arange(len(self.dataset))[block]).chunk(2, dim=1)[0]  # (B, C, h, w)
        return mean * self.dataset.scaling_factor


class Memorization:
    """The memorized fraction of the EMA's samples (evaluate.memorized_fraction: the share whose
    nearest training latent is closer than a third of the second nearest; Bonnaire et al., arXiv
    2505.17638), logged as mem_frac and drawn into mem.png. The samples: --mem-samples from fixed
    noise (flow.start_noise, labels cycling over the classes), SDE with --sample-steps, no
    guidance; compared in latent space with the training set (pixel space for the built-in data).
    The master process samples alone."""

    def __init__(self, args, dataset, z_dim, device, run_dir):
        self.args, self.dataset, self.z_dim, self.device = args, dataset, z_dim, device
        self.latents, self.plot = TrainingLatents(dataset), os.path.join(run_dir, "mem.png")

    def run(self, step, ema, log):
        args, batch = self.args, self.args.eval_batch_size
        samples = [fixed_samples(ema, range(start, min(start + batch, args.mem_samples)), k, args.sample_steps, args,
                                 self.dataset, self.z_dim, self.device)
                   for k, start in enumerate(range(0, args.mem_samples, batch))]
        log.record(dict(step=step, mem_frac=evaluate.memorized_fraction(torch.cat(samples), self.latents)))
        plot_curves(log.rows, ["mem_frac"], self.plot, smoothing=False)
