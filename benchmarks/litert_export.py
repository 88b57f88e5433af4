"""A model qftsim wrote as .tflite (a QFT one, say): LiteRT's logits against the simulator's.

    python benchmarks/imagenet.py --images ../shared/imagenet-samples --profiles litert-xnnpack --methods qft \
        --save /tmp/qft
    python benchmarks/litert_export.py --model /tmp/qft/litert-xnnpack-qft.qft --images ../shared/imagenet-samples

The .qft (any IntModel on a litert profile that takes 224x224 images in [-1, 1]) is written as .tflite by
export.tflite, run by the LiteRT interpreter with its profile's op resolver on every labelled image (the
preprocessing of benchmarks/litert_import.py) and by the simulator; it prints the logits that differ (the
goal: none), both engines' labelled top-1 and the seconds each took.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from litert_import import add_image_arguments, compare, labelled_images, load  # noqa: E402
from export.tflite import litert_profile_of, to_tflite  # noqa: E402
from qftsim import intmodel  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a .qft IntModel on a litert profile")
    add_image_arguments(ap)
    ap.add_argument("--tflite", help="also keep the written .tflite here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model = intmodel.load(args.model)
    t0 = time.time()
    data = to_tflite(model)
    print(f"{args.model}: written as {len(data)} bytes of .tflite in {time.time() - t0:.0f} s "
          f"(profile {model.profile.name})")
    if args.tflite:
        intmodel.atomic_write_bytes(Path(args.tflite), data)
    paths, labels = labelled_images(Path(args.images), args.limit)
    x = model.inputs[0].quant.quantize(load(paths))
    print(f"{model.profile.name:18s} {compare(model, data, litert_profile_of(model.profile), x, False, labels)}")


if __name__ == "__main__":
    main()
