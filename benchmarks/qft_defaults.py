"""QFT's default rates against the previous ones: does default finetuning end below its start?

For each reference network, profile and seed: the exact calibration loss of the start (the closed-form
initialisation QFT finetunes from), of the finetuned graph, and the held-out accuracy QFT returns. The old
defaults are absolute rates (1e-3, scales x10) without warm-up; the current ones are QftConfig's.

    python benchmarks/qft_defaults.py [--networks mobilenetv2,resnet] [--profiles int8-default,npu-a8w4] [--seeds 3]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch

from qftsim.qft import QftConfig, quantize_graph
from qftsim.zoo import load_mnist, reference_network

OLD = dict(lr_unit="absolute", learning_rate=1e-3, scale_lr_factor=10.0, warmup=0.0)
START = "cle+mse+bias_correction"  # what the init search picks for the demo network at W8A8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", default="mobilenetv2,resnet")
    ap.add_argument("--profiles", default="int8-default,npu-a8w4")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    x, _, x_test, y_test = load_mnist()
    now = QftConfig()
    print(f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; 1024 calibration "
          f"images, 4 epochs, start {START}; accuracy on the 1000 held-out images; current defaults: "
          f"{now.lr_unit} {now.learning_rate:g}, scales x{now.scale_lr_factor:g}, warm-up {now.warmup:g}")
    print(f"{'network':12s} {'profile':13s} {'rates':8s} seed {'start':>9s} {'finetuned':>9s} {'ratio':>6s} "
          f"returned accuracy seconds")
    for network in args.networks.split(","):
        net = reference_network(network)
        for profile in args.profiles.split(","):
            for rates, knobs in (("old", OLD), ("current", {})):
                for seed in range(args.seeds):
                    clock = time.perf_counter()
                    qg, report = quantize_graph(net, x[:1024], profile, progress=False, init=START, seed=seed,
                                                **knobs)
                    with torch.no_grad():
                        accuracy = float((qg.run_integers(x_test)[qg.fg.output].argmax(1) == y_test).float().mean())
                    start, end = report["start_loss"], report["finetuned_loss"]
                    print(f"{network:12s} {profile:13s} {rates:8s} {seed:4d} {start:9.3g} {end:9.3g} "
                          f"{end / start:6.2f} {'start' if report.get('kept_start') else 'finetune':8s} "
                          f"{accuracy:8.4f} {time.perf_counter() - clock:7.1f}", flush=True)


if __name__ == "__main__":
    main()
