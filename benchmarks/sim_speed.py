"""Simulator throughput next to torch fp32 eager on the same network, measured in one run.

    python benchmarks/sim_speed.py [--batch 64] [--channels 32] [--size 32] [--repeats 20]
    python benchmarks/sim_speed.py --efficientnet [--batch 64] [--repeats 3]

--efficientnet: the ImageNet EfficientNet-Lite0 at 224x224 instead (rtn on 16 random calibration inputs; the
weights and ranges do not change the simulator's work), for int8-default and litert-xnnpack.

Target (issue 3): the simulator within 3x of torch fp32 when the profile
does not saturate at every MAC.
"""

import argparse
import platform

import numpy as np
import torch
from _timing import best_of, steady_malloc

from qftsim import list_profiles
from qftsim.sim import simulate
from qftsim.zoo import random_cnn


def main():
    steady_malloc()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--efficientnet", action="store_true", help="EfficientNet-Lite0 at 224x224")
    args = ap.parse_args()
    if args.efficientnet:
        return efficientnet(args)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}, {args.channels}ch {args.size}x{args.size}")
    print(f"{'profile':24s} {'depthwise':>9s} {'torch fp32 ms':>14s} {'simulator ms':>13s} {'ratio':>6s}  accumulator")
    for name in list_profiles():
        for depthwise in (False, True):
            model, net = random_cnn(name, args.channels, args.size, depthwise=depthwise)
            rng = np.random.default_rng(0)
            real = rng.normal(size=(args.batch, 3, args.size, args.size)).astype(np.float32)
            x = model.inputs[0].quant.quantize(real)
            xt = torch.from_numpy(real)
            with torch.no_grad():
                t_torch = best_of(lambda: net(xt), args.repeats)
            t_sim = best_of(lambda: simulate(model, x), args.repeats)
            acc = model.profile.accumulator
            print(f"{name:24s} {str(depthwise):>9s} {t_torch * 1e3:14.1f} {t_sim * 1e3:13.1f} "
                  f"{t_sim / t_torch:6.2f}  {acc.overflow}/{acc.saturate_at}")


def efficientnet(args):
    from qftsim.efficientnet import efficientnet_lite0
    from qftsim.qft import quantize
    from qftsim.sim import chunk_samples

    net = efficientnet_lite0().eval()
    rng = np.random.default_rng(0)
    real = rng.normal(size=(args.batch, 3, 224, 224)).astype(np.float32)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, EfficientNet-Lite0 224x224, batch {args.batch}, best of {args.repeats}")
    print(f"{'profile':24s} {'torch fp32 s':>13s} {'simulator s':>12s} {'ratio':>6s} {'chunk':>6s}")
    with torch.no_grad():
        t_torch = best_of(lambda: net(torch.from_numpy(real)), args.repeats)
    for name in ("int8-default", "litert-xnnpack"):
        model, _ = quantize(net, torch.from_numpy(real[:16]), name, method="rtn", progress=False)
        x = model.inputs[0].quant.quantize(real)
        t_sim = best_of(lambda: simulate(model, x), args.repeats)
        print(f"{name:24s} {t_torch:13.2f} {t_sim:12.2f} {t_sim / t_torch:6.2f} {chunk_samples(model):6d}", flush=True)


if __name__ == "__main__":
    main()
