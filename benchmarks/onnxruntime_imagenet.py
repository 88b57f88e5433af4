"""EfficientNet-Lite0 against onnxruntime on labelled images, both directions: quantize_static's model imported by
qftsim, or a qftsim model (a QFT one, say) written as .onnx; onnxruntime's logits against the simulator's.

    python benchmarks/onnxruntime_imagenet.py --images ../shared/imagenet-samples
    python benchmarks/imagenet.py --images ../shared/imagenet-samples --profiles onnxruntime-cpu --methods qft \
        --compile-target none --save /tmp/qft
    python benchmarks/onnxruntime_imagenet.py --model /tmp/qft/onnxruntime-cpu-qft.qft

Without --model: the pretrained EfficientNet-Lite0 is exported by torch.onnx and made int8 by
onnxruntime.quantization.quantize_static the way an onnxruntime user does it (QDQ, uint8 activations,
per-channel int8 weights, min-max on the first --calibration images of the folder), then imported with
`qftsim import`. With --model: the .qft (on onnxruntime-cpu, 224x224 inputs in [-1, 1]) is written by
export.onnx. Either way both engines run every labelled image (preprocessing of benchmarks/litert_import.py)
on the same input integers; it prints the logits that differ (the goal: none), both top-1 and both times.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from litert_import import add_image_arguments, labelled_images, load, simulated_logits  # noqa: E402
from qftsim import intmodel  # noqa: E402


def quantize_static_effnet(images: np.ndarray) -> bytes:
    """EfficientNet-Lite0 exported by torch.onnx and quantized by quantize_static on `images`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from qftsim.efficientnet import efficientnet_lite0

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x[None].astype(np.float32)} for x in images])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(efficientnet_lite0(), (torch.zeros(1, 3, 224, 224),), str(source), dynamo=False,
                              input_names=["input"], output_names=["logits"], opset_version=17)
        quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
        return target.read_bytes()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .qft on onnxruntime-cpu to write as .onnx (default: quantize_static's model)")
    ap.add_argument("--calibration", type=int, default=64, help="quantize_static's calibration images (default 64)")
    ap.add_argument("--onnx", help="also keep the .onnx here")
    add_image_arguments(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from qftsim.onnx_import import from_onnx, session

    paths, labels = labelled_images(Path(args.images), args.limit)
    t0 = time.time()
    images = load(paths)
    print(f"{len(paths)} images from {args.images} loaded in {time.time() - t0:.0f} s")
    t0 = time.time()
    if args.model:
        from export.onnx import to_onnx

        model = intmodel.load(args.model)
        data = to_onnx(model)
        made = f"{args.model} written by export.onnx"
    else:
        data = quantize_static_effnet(images[:args.calibration])
        model = from_onnx(data, "onnxruntime-cpu")
        made = f"quantize_static (calibrated on {args.calibration} images), imported"
    print(f"EfficientNet-Lite0: {made} in {time.time() - t0:.0f} s ({len(data)} bytes, {len(model.nodes)} nodes)")
    if args.onnx:
        intmodel.atomic_write_bytes(Path(args.onnx), data)
    q_in, q_out = model.inputs[0].quant, model.quant_of(model.outputs[0])
    x = q_in.quantize(images)
    t0 = time.time()
    engine = session(data)
    name = engine.get_inputs()[0].name
    real = (x.astype(np.float32) - q_in.zero_point) * np.float32(q_in.scale)  # the same input integers
    theirs = np.concatenate([engine.run(None, {name: real[i:i + 1]})[0] for i in range(len(x))])
    t_engine = time.time() - t0
    ours, t_sim = simulated_logits(model, x)
    mine = ((ours.astype(np.float32) - q_out.zero_point) * np.float32(q_out.scale)).reshape(theirs.shape)
    top1 = lambda logits: float((logits.argmax(1) == labels).mean())  # noqa: E731
    print(f"onnxruntime-cpu    images {len(x)}  logits {theirs.size}, differ {int((mine != theirs).sum())}  top-1 "
          f"onnxruntime {top1(theirs):.4f} qftsim {top1(mine):.4f}  time onnxruntime {t_engine:.0f} s, "
          f"simulator {t_sim:.0f} s")


if __name__ == "__main__":
    main()
