"""A .tflite made by LiteRT's own tools, imported by qftsim: the simulator's logits against LiteRT's interpreter.

    python benchmarks/litert_import.py --tflite effnet_int8.tflite --images ../shared/imagenet-samples

The .tflite comes from benchmarks/efficientnet_tflite.py (EfficientNet-Lite0,
litert-torch + ai-edge-quantizer) or any fully-int8 image classifier that
takes (1, 3, 224, 224) or (1, 224, 224, 3) inputs in [-1, 1]. For each
profile (and the interpreter's matching op resolver) it prints the images
compared, the logits that differ (the goal: none), labelled top-1 of both
engines (labels.tsv: class_index and file columns) and the seconds each took.
Images: shorter side resized to 256, centre crop 224, scaled to [-1, 1].
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from export.tflite import run_tflite  # noqa: E402
from qftsim.importers import from_tflite  # noqa: E402
from qftsim.loaders import load_calibration  # noqa: E402
from qftsim.sim import AccumulatorOverflowWarning, simulate  # noqa: E402



def labelled_images(folder: Path, limit: int | None):
    """(paths, labels) of the folder's images that labels.tsv names, in its order."""
    with open(folder / "labels.tsv", newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if (folder / r["file"]).is_file()]
    rows = rows[:limit] if limit else rows
    return [folder / r["file"] for r in rows], np.array([int(r["class_index"]) for r in rows])


def load(paths: list[Path]) -> np.ndarray:
    """NCHW float images in [-1, 1] (loaded in chunks of 50 through qftsim's own loader)."""
    import tempfile

    chunks = []
    for i in range(0, len(paths), 50):
        with tempfile.TemporaryDirectory() as tmp:
            for j, p in enumerate(paths[i:i + 50]):
                (Path(tmp) / f"{j:03d}{p.suffix}").symlink_to(p.resolve())
            chunks.append(load_calibration(tmp, 256, 224, mean=(0.5,) * 3, std=(0.5,) * 3)[:].numpy())
    return np.concatenate(chunks)


def add_image_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared" / "imagenet-samples"),
                    help="a folder with labels.tsv (default ../shared/imagenet-samples)")
    ap.add_argument("--limit", type=int, help="only the first N images")


def simulated_logits(model, x: np.ndarray) -> tuple[np.ndarray, float]:
    """The simulator's first output on x (25 samples at a time) and the seconds it took."""
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccumulatorOverflowWarning)
        ours = np.concatenate([simulate(model, x[i:i + 25]).outputs[model.outputs[0]] for i in range(0, len(x), 25)])
    return ours, time.time() - t0


def compare(model, model_bytes: bytes, profile: str, x: np.ndarray, channels_first: bool, labels) -> str:
    """One line: the logits of LiteRT and of the simulator on x, how many differ, both top-1, both times."""
    t0 = time.time()
    theirs = run_tflite(model_bytes, profile, x, channels_first).reshape(len(x), -1)
    t_engine = time.time() - t0
    ours, t_sim = simulated_logits(model, x)
    ours = ours.reshape(theirs.shape)
    top1 = lambda logits: float((logits.argmax(1) == labels).mean())  # noqa: E731
    return (f"images {len(x)}  logits {theirs.size}, differ {int((ours != theirs).sum())}  top-1 LiteRT "
            f"{top1(theirs):.4f} qftsim {top1(ours):.4f}  time LiteRT {t_engine:.0f} s, simulator {t_sim:.0f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tflite", required=True, help="a fully-int8 classifier (benchmarks/efficientnet_tflite.py)")
    add_image_arguments(ap)
    ap.add_argument("--profiles", default="litert-xnnpack,litert-reference")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model_bytes = Path(args.tflite).read_bytes()
    paths, labels = labelled_images(Path(args.images), args.limit)
    t0 = time.time()
    images = load(paths)
    print(f"{args.tflite}: {len(paths)} images from {args.images} loaded in {time.time() - t0:.0f} s")
    for profile in args.profiles.split(","):
        model = from_tflite(model_bytes, profile)
        x = model.inputs[0].quant.quantize(images)
        channels_first = _input_is_nchw(model_bytes)
        print(f"{profile:18s} {compare(model, model_bytes, profile, x, channels_first, labels)}  "
              f"(channels-first input: {channels_first})")

def _input_is_nchw(model: bytes) -> bool:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    return int(interpreter.get_input_details()[0]["shape"][1]) == 3


if __name__ == "__main__":
    main()
