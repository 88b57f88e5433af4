"""The .qft format: round trip, determinism, and a named error for every kind of defect."""

import errno
import io
import json
import os
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qftsim import QftsimError, golden, intmodel
from qftsim.sim import AccumulatorOverflowWarning, simulate
from qftsim.zoo import random_cnn
from tests import gen


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.data())
def test_round_trip_is_exact_and_deterministic(tmp_path_factory, data):
    model = data.draw(gen.int_models())
    path = tmp_path_factory.mktemp("rt") / "m.qft"
    model.save(path)
    loaded = intmodel.load(path)
    assert loaded.to_bytes() == model.to_bytes() == path.read_bytes()
    assert loaded.hash == model.hash
    x = data.draw(gen.model_inputs(model))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AccumulatorOverflowWarning)
            a, b = simulate(model, x), simulate(loaded, x)
    except QftsimError:
        return
    for name in model.outputs:
        assert np.array_equal(a.outputs[name], b.outputs[name])


@pytest.fixture
def saved(tmp_path):
    model, _ = random_cnn(channels=4, size=6)
    path = tmp_path / "m.qft"
    model.save(path)
    return model, path


def _rewrite(path, edit_manifest=None, drop=None, replace=None):
    """Copy a .qft with the manifest edited, a member dropped, or a member replaced."""
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    if edit_manifest:
        manifest = json.loads(members["manifest.json"])
        edit_manifest(manifest)
        members["manifest.json"] = json.dumps(manifest).encode()
    if drop:
        del members[drop]
    if replace:
        members.update(replace)
    out = path.with_name("edited.qft")
    with zipfile.ZipFile(out, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return out


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _set(path, value):
    def edit(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


CORRUPTIONS = {
    "wrong version": (dict(edit_manifest=_set(["format_version"], 99)), "format_version"),
    "foreign format": (dict(edit_manifest=_set(["format"], "onnx")), "not a qftsim model"),
    "missing array": (dict(drop="arrays/conv1/weight.npy"), "'conv1'.*weight.*missing"),
    "weight out of range": (dict(replace={"arrays/conv0/weight.npy": _npy(np.full((4, 3, 3, 3), -128, np.int8))}),
                            "'conv0'.*weight holds -128"),
    "shape mismatch": (dict(replace={"arrays/conv1/weight.npy": _npy(np.zeros((4, 3, 3, 3), np.int8))}),
                       "'conv1'.*does not fit"),
    "bias shape": (dict(replace={"arrays/fc/bias.npy": _npy(np.zeros(3, np.int32))}), "'fc'.*bias shape"),
    "float array": (dict(replace={"arrays/fc/bias.npy": _npy(np.zeros(10, np.float32))}), "'fc'.*integer array"),
    "pickled array": (dict(replace={"arrays/fc/bias.npy": _npy(np.array([{}], dtype=object))}), "'fc'.*unreadable"),
    "shift out of range": (dict(replace={"arrays/fc/shift.npy": _npy(np.array([70] * 10, np.int32))}),
                           "'fc'.*output shift holds 70"),
    "unknown op": (dict(edit_manifest=lambda m: m["nodes"][0].update(op="softmax")), "'conv0'.*unknown op"),
    "dangling input": (dict(edit_manifest=lambda m: m["nodes"][1].update(inputs=["nope"])), "'conv1'.*'nope'"),
    "profile hash": (dict(edit_manifest=_set(["profile_hash"], "0" * 16)), "profile_hash"),
    "missing field": (dict(edit_manifest=lambda m: m.pop("outputs")), "missing or malformed field 'outputs'"),
    "fractional bits": (dict(edit_manifest=lambda m: m["nodes"][0]["quant"].update(bits=8.9)), "bits must be an integer"),
    "fractional zero point": (dict(edit_manifest=lambda m: m["nodes"][0]["quant"].update(zero_point=-94.3)),
                              "zero_point must be an integer"),
    "boolean zero point": (dict(edit_manifest=lambda m: m["nodes"][0]["quant"].update(zero_point=True)),
                           "zero_point must be an integer"),
    "string signed": (dict(edit_manifest=lambda m: m["nodes"][0]["quant"].update(signed="false")),
                      "signed must be true or false"),
    "NaN scale": (dict(edit_manifest=lambda m: m["nodes"][0]["quant"].update(scale=float("nan"))),
                  "scale must be a finite number"),
    "path in a name": (dict(edit_manifest=lambda m: m["inputs"][0].update(name="../x")), "name '../x' must be"),
    "empty member": (dict(replace={"arrays/fc/bias.npy": b""}), "'fc'.*bias.*unreadable"),
    "zero outputs": (dict(replace={"arrays/fc/weight.npy": _npy(np.zeros((0, 4), np.int8))}), "'fc'.*does not fit"),
    "zero point out of range": (dict(edit_manifest=lambda m: m["nodes"][0]["quant"].update(zero_point=500)),
                                "conv0.*zero point 500"),
}


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=3), max_leaves=6)


def _leaves(node, path=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield path, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from _leaves(value, (*path, key))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_manifest_edit_loads_and_simulates_or_is_refused_in_one_line(saved, data):
    """A value anywhere in the manifest replaced by any JSON value (NaN and infinities, wrong types, huge
    integers, containers), or a key removed: the file is refused with a QftsimError, or it loads and
    simulates (a model that loads must simulate)."""
    model, path = saved
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    where, _ = data.draw(st.sampled_from([leaf for leaf in _leaves(manifest) if leaf[0]]), label="where")
    remove = data.draw(st.booleans(), label="remove")
    value = None if remove else data.draw(JSON_VALUES, label="value")

    def edit(m):
        *parents, last = where
        for key in parents:
            m = m[key]
        if remove and isinstance(m, dict):
            del m[last]
        else:
            m[last] = value

    edited = _rewrite(path, edit_manifest=edit)
    try:
        loaded = intmodel.load(edited)
    except QftsimError as exc:
        assert "\n" not in str(exc)
        return
    x = np.zeros((2, *loaded.inputs[0].shape), loaded.inputs[0].quant.dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AccumulatorOverflowWarning)
            simulate(loaded, np.clip(x, loaded.inputs[0].quant.qmin, loaded.inputs[0].quant.qmax))
    except QftsimError as exc:  # e.g. an accumulator overflow under `overflow: error`
        assert "\n" not in str(exc)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_permissions_of_any_new_file(tmp_path, umask):
    model, _ = random_cnn(channels=4, size=4)
    old = os.umask(umask)
    try:
        model.save(tmp_path / "m.qft")
    finally:
        os.umask(old)
    assert (tmp_path / "m.qft").stat().st_mode & 0o777 == 0o666 & ~umask


def test_format1_files_still_load_and_compute_the_same():
    """A .qft written before format 2 (no mean op, no depthwise attribute): same profile hash, same integers."""
    from pathlib import Path

    old = intmodel.load(Path(__file__).parent / "fixtures" / "intmodel_format1.qft")
    new, _ = random_cnn("tflite-int8", channels=8, size=8, depthwise=True)  # what wrote it, at 11477a2
    assert old.profile.hash == "446c03d98527f1a9"  # its embedded profile (whose op list predates mean)
    x = np.random.default_rng(0).integers(-128, 128, (4, *new.inputs[0].shape)).astype(np.int8)
    assert np.array_equal(simulate(old, x).outputs["fc"], simulate(new, x).outputs["fc"])


def test_deep_json_and_unsupported_compression_are_named(saved, tmp_path):
    _, path = saved
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    deep = tmp_path / "deep.qft"
    with zipfile.ZipFile(deep, "w") as zf:
        zf.writestr("manifest.json", "[" * 100000 + "]" * 100000)
    with pytest.raises(QftsimError, match="nested too deeply|not valid JSON"):
        intmodel.load(deep)
    odd = tmp_path / "lzma.qft"
    with zipfile.ZipFile(odd, "w", compression=zipfile.ZIP_LZMA) as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    raw = bytearray(odd.read_bytes())
    for marker in (b"PK\x03\x04", b"PK\x01\x02"):  # claim an unknown compression method (99) everywhere
        start = 0
        while (i := raw.find(marker, start)) >= 0:
            offset = i + (8 if marker == b"PK\x03\x04" else 10)
            raw[offset:offset + 2] = (99).to_bytes(2, "little")
            start = i + 4
    odd.write_bytes(bytes(raw))
    with pytest.raises(QftsimError, match="not a readable qftsim model file"):
        intmodel.load(odd)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_files_name_the_problem(saved, kind):
    _, path = saved
    change, pattern = CORRUPTIONS[kind]
    bad = _rewrite(path, **change)
    with pytest.raises(QftsimError, match=pattern) as info:
        intmodel.load(bad)
    assert str(bad) in str(info.value)


def test_truncated_and_non_zip_files(saved, tmp_path):
    _, path = saved
    cut = tmp_path / "cut.qft"
    cut.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(QftsimError, match="not a readable"):
        intmodel.load(cut)
    text = tmp_path / "text.qft"
    text.write_text("hello")
    with pytest.raises(QftsimError, match="not a readable"):
        intmodel.load(text)
    with pytest.raises(QftsimError, match="no such file"):
        intmodel.load(tmp_path / "absent.qft")


def test_save_is_atomic(saved, monkeypatch):
    model, path = saved
    before = path.read_bytes()
    monkeypatch.setattr(intmodel.IntModel, "to_bytes", lambda self: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_a_failed_write_is_one_line_and_keeps_the_old_file(saved, monkeypatch, error):
    """A full disk (or quota, or I/O error) mid-write: a QftsimError naming the file, the old file whole, no
    temporary left."""
    model, path = saved
    before = path.read_bytes()

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(error, os.strerror(error))

    def fdopen(fd, *args, **kwargs):
        os.close(fd)
        return FullDisk()

    monkeypatch.setattr(intmodel.os, "fdopen", fdopen)
    with pytest.raises(QftsimError, match=f"{path}: cannot write \\({os.strerror(error)}\\); the old file"):
        model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_golden_folder_is_replaced_only_when_asked_and_only_if_golden(saved, tmp_path):
    model, _ = saved
    x = np.random.default_rng(1).integers(-128, 128, size=(2, 3, 6, 6)).astype(np.int8)
    result = simulate(model, x, keep_tensors=True)
    golden.write(model, result, tmp_path / "gold")
    with pytest.raises(QftsimError, match="not empty .--force replaces it"):
        golden.write(model, result, tmp_path / "gold")
    (tmp_path / "gold" / "stale.txt").write_text("old run")
    golden.write(model, result, tmp_path / "gold", replace=True)
    assert not (tmp_path / "gold" / "stale.txt").exists() and (tmp_path / "gold" / "manifest.json").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(QftsimError, match="not a golden vector folder"):
        golden.write(model, result, tmp_path / "mine", replace=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_golden_vectors_reload_to_the_same_integers(saved, tmp_path):
    model, _ = saved
    x = np.random.default_rng(1).integers(-128, 128, size=(2, 3, 6, 6)).astype(np.int8)
    manifest = golden.dump(model, x, tmp_path / "gold", accumulators=True)
    tensors = simulate(model, x, keep_tensors=True).tensors
    assert [e["name"] for e in manifest["tensors"]] == ["x"] + [n.name for n in model.nodes]
    for entry in manifest["tensors"]:
        npy = np.load(tmp_path / "gold" / entry["npy"])
        assert np.array_equal(npy, tensors[entry["name"]])
        hex_vals = golden.from_hex_lines((tmp_path / "gold" / entry["hex"]).read_text(), entry["bits"],
                                         entry["signed"])
        assert np.array_equal(hex_vals, npy.ravel().astype(np.int64))
    assert "accumulator" in manifest["tensors"][1]
    with pytest.raises(QftsimError, match="not empty"):
        golden.dump(model, x, tmp_path / "gold")


def test_cli_simulate(saved, tmp_path):
    model, path = saved
    x = np.random.default_rng(2).normal(size=(3, 3, 6, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cmd = [sys.executable, "-m", "qftsim.cli", "simulate", str(path), "--input", str(tmp_path / "x.npy"),
           "--report", "--dump", str(tmp_path / "gold"), "--output", str(tmp_path / "y.npy")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "real values quantized" in res.stdout and "headroom" in res.stdout and "conv1" in res.stdout
    expected = simulate(model, model.inputs[0].quant.quantize(x)).outputs["fc"]
    assert np.array_equal(np.load(tmp_path / "y.npy"), expected)
    gold = json.loads((tmp_path / "gold" / "manifest.json").read_text())
    assert np.array_equal(np.load(tmp_path / "gold" / gold["tensors"][-1]["npy"]), expected)
    np.save(tmp_path / "bad.npy", np.zeros((1, 5), np.int8))
    res = subprocess.run(cmd[:6] + [str(tmp_path / "bad.npy")], capture_output=True, text=True)
    assert res.returncode == 2 and "shape (1, 5)" in res.stderr


def test_stale_temporaries_of_killed_writes_are_removed_on_the_next_write(saved):
    import os
    import time

    model, path = saved
    old_file, old_dir, young = (path.parent / f".{path.name}.{s}" for s in ("k1ll3d", "d1r", "runn1ng"))
    old_file.write_bytes(b"half a model")
    old_dir.mkdir()
    (old_dir / "lib.so").write_bytes(b"x")
    young.write_bytes(b"a write still under way")
    hour_ago = time.time() - intmodel.STALE_SECONDS - 1
    for p in (old_file, old_dir):
        os.utime(p, (hour_ago, hour_ago))
    model.save(path)
    assert not old_file.exists() and not old_dir.exists() and young.exists()
    young.unlink()


def test_sigterm_during_a_write_leaves_no_temporary(tmp_path):
    """qftsim's CLI turns SIGTERM into SystemExit, so a write under way removes its temporary file."""
    import signal
    import subprocess
    import sys

    script = (
        "import os, signal, sys, threading\n"
        "from pathlib import Path\n"
        "from qftsim import cli, intmodel\n"
        "signal.signal(signal.SIGTERM, cli._exit_on_sigterm)\n"
        "real = os.replace\n"
        "def slow(*a):\n"
        "    print('writing', flush=True)\n"
        "    threading.Event().wait(60)\n"
        "    real(*a)\n"
        "os.replace = slow\n"
        "intmodel.atomic_write_bytes(Path(sys.argv[1]), b'x' * 1000)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "m.qft")], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "writing"  # the temporary file is written, not yet renamed
    assert len(list(tmp_path.iterdir())) == 1
    child.send_signal(signal.SIGTERM)
    assert child.wait() == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_quantize_is_reproducible_byte_for_byte(tmp_path):
    """The same model, data, profile and seed give the same .qft bytes, in two processes."""
    import subprocess
    import sys

    import torch

    from qftsim.zoo import load_mnist, reference_network

    np.save(tmp_path / "calib.npy", load_mnist()[0][:64].numpy())
    torch.save(reference_network("resnet").state_dict(), tmp_path / "resnet.pt")
    for name in ("a", "b"):
        res = subprocess.run([sys.executable, "-m", "qftsim.cli", "quantize", "--factory",
                              "qftsim.zoo:SmallResNet", "--weights", str(tmp_path / "resnet.pt"),
                              "--data", str(tmp_path / "calib.npy"), "--profile",
                              "npu-a8w4", "--epochs", "1", "--dataset-size", "64", "--quiet", "-o",
                              str(tmp_path / f"{name}.qft")], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    assert (tmp_path / "a.qft").read_bytes() == (tmp_path / "b.qft").read_bytes()


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(claimed=st.integers(0, 2**40).filter(lambda n: n != 10))
def test_an_array_header_that_lies_about_its_size_is_refused_before_reading(saved, claimed):
    """A member whose .npy header declares another length than its bytes (10 int32 biases) is refused from
    the header alone, however large the claim."""
    model, path = saved
    honest = _npy(np.zeros(10, np.int32))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<i4", "fortran_order": False, "shape": (claimed,)})
    lying = header.getvalue() + honest[len(header.getvalue()):]
    with pytest.raises(QftsimError, match="'fc': array 'bias' declares"):
        intmodel.load(_rewrite(path, replace={"arrays/fc/bias.npy": lying}))


def test_a_decompression_bomb_is_refused_before_reading(saved, monkeypatch):
    model, path = saved
    bomb = _rewrite(path, replace={"arrays/fc/extra.npy": _npy(np.zeros(2**22, np.int8))})  # 4 MiB of zeros
    with zipfile.ZipFile(bomb) as zf:  # (zlib: ZipFile.writestr stores; recompress)
        members = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    assert bomb.stat().st_size < 2**16
    monkeypatch.setattr(intmodel, "EXPANSION_ALLOWANCE", 0)
    with pytest.raises(QftsimError, match="decompression bomb"):
        intmodel.load(bomb)
    monkeypatch.setattr(intmodel, "MANIFEST_BYTES", 100)
    with pytest.raises(QftsimError, match="manifest.json declares"):
        intmodel.load(path)
