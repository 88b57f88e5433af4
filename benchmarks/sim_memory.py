"""Peak memory of the simulator and of `qftsim verify` against the batch size: flat, since batches run in chunks.

The MNIST MobileNetV2 reference network at int8-default (rtn), random integer inputs; each figure is the peak
resident set of a fresh process that loads the model and runs it (so it includes Python, torch and the model).

    python benchmarks/sim_memory.py [--samples 64,20000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys, warnings
import numpy as np
from qftsim import intmodel
from qftsim.sim import simulate
model = intmodel.load(sys.argv[1])
spec = model.inputs[0]
x = np.random.default_rng(0).integers(spec.quant.qmin, spec.quant.qmax + 1, size=(int(sys.argv[2]), *spec.shape))
x = x.astype(spec.quant.dtype)
chunk = int(sys.argv[3]) or None
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    simulate(model, x, chunk=chunk)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""

VERIFY = """
import resource, sys
from qftsim.cli import main
status = main(["verify", *sys.argv[1:]])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
sys.exit(status)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default="64,20000")
    args = ap.parse_args()
    import export
    from qftsim.qft import quantize
    from qftsim.sim import chunk_samples
    from qftsim.zoo import load_mnist, reference_network

    with tempfile.TemporaryDirectory() as tmp:
        model, _ = quantize(reference_network("mobilenetv2"), load_mnist()[0][:256], "int8-default", method="rtn",
                            progress=False)
        path = Path(tmp) / "m.qft"
        model.save(path)
        export.export_library(model, Path(tmp) / "m.so", "x86-64")
        print(f"# mobilenetv2 (MNIST), int8-default rtn; default chunk {chunk_samples(model)} samples; "
              "peak resident set of a fresh process, GiB")
        print(f"{'samples':>8s} {'simulate':>9s} {'simulate, one chunk':>20s} {'verify':>7s}")
        for count in (int(v) for v in args.samples.split(",")):
            peaks = [float(subprocess.run([sys.executable, "-c", CHILD, str(path), str(count), str(c)],
                                          check=True, capture_output=True, text=True).stdout.split()[-1])
                     for c in (0, count)]
            run = subprocess.run([sys.executable, "-c", VERIFY, str(path), str(Path(tmp) / "m.so"), "--samples",
                                  str(count)], capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(run.stdout + run.stderr)
            print(f"{count:8d} {peaks[0]:9.2f} {peaks[1]:20.2f} {float(run.stdout.split()[-1]):7.2f}", flush=True)


if __name__ == "__main__":
    main()
