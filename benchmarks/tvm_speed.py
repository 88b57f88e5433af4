"""Compiled (TVM) latency next to torch fp32 eager and the simulator, for both reference networks.

    python benchmarks/tvm_speed.py [--profile int8-default] [--target host] [--repeats 20]

Issue 5's target: compiled int8 at least as fast as torch fp32 eager at
batch 1 and batch 64. Ratios are measured in one run on one machine; the
compiled outputs are checked equal to the simulator's on the timed batch.
"""

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from _timing import best_of, steady_malloc

import export
from qftsim.qft import quantize
from qftsim.sim import simulate
from qftsim.zoo import load_mnist, reference_network


def main():
    steady_malloc()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="int8-default")
    ap.add_argument("--target", default="host", choices=["host", "x86-64"])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    x_train, _, x_test, _ = load_mnist()
    print(f"# {platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"TVM target {args.target}, profile {args.profile}; milliseconds, best of {args.repeats}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for network in ("resnet", "mobilenetv2"):
            net = reference_network(network)
            model, _ = quantize(net, x_train[:256], args.profile, method="rtn")
            export.export_library(model, Path(tmp) / f"{network}.so", args.target)
            compiled = export.load(Path(tmp) / f"{network}.so")
            for batch in (1, 64):
                real = x_test[:batch]
                rows.append((network, batch, net, real, model.inputs[0].quant.quantize(real.numpy()), model,
                             compiled))
        # torch and the simulator first: TVM's idle worker threads spin for a while after each
        # run and would slow whatever runs next on the same two cores
        times, expected = {}, {}
        for network, batch, net, real, x, model, _ in rows:
            with torch.no_grad():
                times[network, batch, "torch"] = best_of(lambda: net(real), args.repeats)
            times[network, batch, "sim"] = best_of(lambda: simulate(model, x), args.repeats)
            expected[network, batch] = simulate(model, x).outputs
        for network, batch, _, _, x, _, compiled in rows:
            times[network, batch, "compiled"] = best_of(lambda: compiled.run(x), args.repeats)
            if not all(np.array_equal(compiled.run(x)[k], v) for k, v in expected[network, batch].items()):
                raise SystemExit(f"{network} batch {batch}: compiled output differs from the simulator's")
    print(f"# TVM threads: {os.environ.get('TVM_NUM_THREADS', 'TVM default')}")
    print(f"{'network':12s} {'batch':>5s} {'torch fp32':>10s} {'compiled':>9s} {'simulator':>9s} "
          f"{'compiled/torch':>14s} {'sim/torch':>9s}")
    for network, batch, *_ in rows:
        t_torch, t_compiled, t_sim = (times[network, batch, k] for k in ("torch", "compiled", "sim"))
        print(f"{network:12s} {batch:5d} {t_torch * 1e3:10.2f} {t_compiled * 1e3:9.2f} {t_sim * 1e3:9.2f} "
              f"{t_compiled / t_torch:14.2f} {t_sim / t_torch:9.2f}", flush=True)


if __name__ == "__main__":
    main()
