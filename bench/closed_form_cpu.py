"""CPU time of train.py's step on the built-in preset (SiT-T/4 + REG, batch 32) with the stochastic
target and with the closed-form one (--target closed-form --cf-refs M): train.train_step and
data.ClassReferences as train.py runs them, the arms interleaved step by step, one thread, CPU time
of the process (time.process_time), so that other processes on a shared machine count for less.

  python bench/closed_form_cpu.py                 # M = 32 and 128, 7 rounds (the first 2 are warm-up)
  python bench/closed_form_cpu.py --refs 128 1000 --rounds 12
The GPU's cost of the target on ImageNet shapes: python bench/bench.py train --target closed-form.
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train  # noqa: E402
from data import BuiltinShapes, ClassReferences, make_loader  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refs", type=int, nargs="+", default=[32, 128], help="values of --cf-refs to time")
    p.add_argument("--rounds", type=int, default=7, help="steps per arm; the first 2 are not counted")
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dataset = BuiltinShapes()
    base = train.get_args([])
    encoder = train.build_encoder(base, dataset)
    model, _ = train.build_model(base, dataset, encoder.z_dim)
    batch = next(make_loader(dataset, base.global_batch_size, 0, 1, seed=0, num_workers=0))
    arms = {}
    for m in [None, *a.refs]:  # every arm starts from the same weights
        args = train.get_args([] if m is None else ["--target", "closed-form", "--cf-refs", str(m)])
        net = copy.deepcopy(model)
        opt, scaler = train.build_optimizer(args, net)
        refs = None if m is None else ClassReferences(dataset, m - 1, 0, 0)
        arms["stochastic" if m is None else f"closed-form M={m}"] = (args, net, copy.deepcopy(net), opt, scaler, refs)
    seconds = {name: [] for name in arms}
    for step in range(a.rounds):
        for name, (args, net, ema, opt, scaler, refs) in arms.items():
            start = time.process_time()
            drawn = None if refs is None else refs(batch[2], step)  # the reference draw is part of the step
            train.train_step(batch, net=net, encoder=encoder, model=net, ema=ema, opt=opt, scaler=scaler, args=args,
                             scaling_factor=dataset.scaling_factor, refs=drawn)
            if step >= 2:
                seconds[name].append(time.process_time() - start)
    base_time = sorted(seconds["stochastic"])[len(seconds["stochastic"]) // 2]
    for name, values in seconds.items():
        median = sorted(values)[len(values) // 2]
        print(f"{name}: median {median * 1e3:.0f} ms CPU time per step ({median / base_time:.2f}x), "
              f"{len(values)} steps", flush=True)


if __name__ == "__main__":
    main()
