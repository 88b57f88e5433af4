"""Golden vectors for RTL testbenches: every layer's integers as .npy and as hex text.

Layout of a dump folder:
  manifest.json          layer order, op, inputs, shape, dtype, bits, signed, files
  NNN_<tensor>.npy       the integers (batch first, NCHW)
  NNN_<tensor>.hex       the same, one value per line, two's complement,
                         ceil(bits/4) hex digits, C (row-major) order
  NNN_<tensor>.acc.npy/.hex   accumulators after wrap/saturation (optional)
The folder is written beside its destination and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from qftsim.errors import QftsimError
from qftsim.intmodel import IntModel
from qftsim.sim import SimResult, simulate


def to_hex_lines(values: np.ndarray, bits: int) -> str:
    """Two's-complement hex, one value per line, zero-padded to ceil(bits/4) digits."""
    digits = (bits + 3) // 4
    mask = (1 << bits) - 1
    flat = values.astype(np.int64).ravel() & mask
    return "".join(f"{int(v):0{digits}x}\n" for v in flat)


def from_hex_lines(text: str, bits: int, signed: bool) -> np.ndarray:
    vals = np.array([int(line, 16) for line in text.split()], dtype=np.int64)
    if signed:
        vals = np.where(vals >= 1 << (bits - 1), vals - (1 << bits), vals)
    return vals


def dump(model: IntModel, inputs, out_dir: str | Path, *, accumulators: bool = False) -> dict:
    """Simulate and write every tensor's integers to `out_dir`; returns the manifest."""
    _check_empty(Path(out_dir))
    return write(model, simulate(model, inputs, keep_tensors=True, keep_accumulators=accumulators), out_dir)


def _check_empty(out_dir: Path, replace: bool = False) -> None:
    if not (out_dir.exists() and any(out_dir.iterdir())):
        return
    if not replace:
        raise QftsimError(f"{out_dir}: golden vector folder exists and is not empty (--force replaces it)")
    if not (out_dir / "manifest.json").is_file():
        raise QftsimError(f"{out_dir}: not a golden vector folder (no manifest.json); not replacing it")


def write(model: IntModel, result: SimResult, out_dir: str | Path, replace: bool = False) -> dict:
    """Write a simulation's kept tensors (simulate(..., keep_tensors=True)) to `out_dir`; returns the manifest.

    `replace`: an existing golden vector folder there is swapped for the new one (readers see the old
    folder or the new, never a mix); any other non-empty folder is refused."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise QftsimError(f"{out_dir}: is a file, not a folder for golden vectors")
    _check_empty(out_dir, replace)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as exc:
        raise QftsimError(f"{out_dir}: cannot write there ({exc.strerror})") from None
    try:
        entries = []
        order = [(i.name, "input", []) for i in model.inputs] + [(n.name, n.op, n.inputs) for n in model.nodes]
        for index, (name, op, srcs) in enumerate(order):
            quant = model.quant_of(name)
            stem = f"{index:03d}_{name}"
            entry = {"index": index, "name": name, "op": op, "inputs": list(srcs),
                     **_write(tmp, stem, result.tensors[name], quant.bits, quant.signed),
                     "zero_point": quant.zero_point, "scale": quant.scale}
            if name in result.accumulators:
                entry["accumulator"] = _write(tmp, f"{stem}.acc", result.accumulators[name],
                                              model.profile.accumulator.bits, True)
            entries.append(entry)
        manifest = {"model_hash": model.hash, "profile": model.profile.name, "outputs": model.outputs,
                    "hex": "two's complement, ceil(bits/4) digits, one value per line, row-major NCHW",
                    "tensors": entries}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        old = None
        if out_dir.exists() and any(out_dir.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "folder")
        elif out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise QftsimError(f"{out_dir}: cannot write golden vectors ({exc.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write(folder: Path, stem: str, values: np.ndarray, bits: int, signed: bool) -> dict:
    np.save(folder / f"{stem}.npy", values, allow_pickle=False)
    (folder / f"{stem}.hex").write_text(to_hex_lines(values, bits))
    return {"npy": f"{stem}.npy", "hex": f"{stem}.hex", "shape": list(values.shape), "dtype": str(values.dtype),
            "bits": bits, "signed": signed}
