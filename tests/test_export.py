"""TVM export: the compiled model's integers equal the simulator's, exactly."""

import hashlib
import json
import tempfile
from pathlib import Path
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import export
from export import build
from export.build import compile_module, has_vnni, resolve_target
from export.lower import lower_into
from qftsim import QftsimError
from qftsim.intmodel import atomic_write_bytes
from qftsim.sim import AccumulatorOverflowWarning, simulate
from qftsim.zoo import random_cnn
from tests import gen

MODELS_PER_MODULE = 25  # compiled together: TVM's per-module overhead dominates tiny models


def _simulate_quietly(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccumulatorOverflowWarning)
        return simulate(model, x).outputs


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                                  HealthCheck.data_too_large])
@given(st.data())
def test_compiled_equals_simulator(data):
    """Hundreds of generated models (every op, rounding, overflow mode, shipped profile) across the examples.

    Where this CPU has AVX-512 VNNI, each model is lowered with or without
    the VNNI convolutions (drawn), so both kernels are held to the simulator.
    """
    import tvm
    from tvm import relax

    models = [data.draw(gen.int_models(compiled=True)) for _ in range(MODELS_PER_MODULE)]
    inputs = [data.draw(gen.model_inputs(m, max_batch=4)) for m in models]
    vnni = has_vnni("host")
    bb = relax.BlockBuilder()
    for i, model in enumerate(models):
        lower_into(bb, model, f"model{i}", vnni=vnni and data.draw(st.booleans(), label="vnni"))
    vm = relax.VirtualMachine(compile_module(bb.get(), "host"), tvm.cpu())
    compared = 0
    for i, (model, x) in enumerate(zip(models, inputs)):
        try:
            expected = _simulate_quietly(model, x)
        except QftsimError:  # overflow under `accumulator.overflow: error`: nothing to compare
            continue
        result = vm[f"model{i}"](tvm.runtime.tensor(x))
        outs = [result] if len(model.outputs) == 1 else list(result)
        for name, out in zip(model.outputs, outs):
            got = out.numpy()
            assert got.dtype == expected[name].dtype
            if not np.array_equal(got, expected[name]):
                keep = Path(tempfile.mkdtemp(prefix="qftsim-parity-"))
                model.save(keep / "model.qft")
                np.save(keep / "input.npy", x)
                raise AssertionError(f"compiled != simulator for output {name} of "
                                     f"{[n.op for n in model.nodes]}; kept in {keep}")
            compared += 1
    assert compared >= MODELS_PER_MODULE // 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    model, _ = random_cnn("tflite-int8", channels=8, size=8, depthwise=True)
    model.save(folder / "m.qft")
    export.export_library(model, folder / "m.so", "host")
    return model, folder


def test_fresh_process_reload_is_bit_exact(exported):
    model, folder = exported
    x = np.random.default_rng(3).integers(-128, 128, size=(5, 3, 8, 8)).astype(np.int8)
    np.save(folder / "x.npy", x)
    script = ("import numpy as np, export, sys; m = export.load(sys.argv[1]); "
              "np.save(sys.argv[3], m.run(np.load(sys.argv[2]))['fc'])")
    subprocess.run([sys.executable, "-c", script, str(folder / "m.so"), str(folder / "x.npy"),
                    str(folder / "y.npy")], check=True)
    assert np.array_equal(np.load(folder / "y.npy"), simulate(model, x).outputs["fc"])
    sidecar = json.loads((folder / "m.so.json").read_text())
    assert sidecar["model_hash"] == model.hash and sidecar["profile"] == "tflite-int8"
    assert export.load(folder / "m.so").sidecar == sidecar  # the copy is the embedded sidecar


def _embedded(image: bytes, sidecar: bytes) -> bytes:
    """A library file as export writes it: the ELF image, the sidecar's JSON, its length, the magic."""
    return image + sidecar + len(sidecar).to_bytes(8, "little") + build.SIDECAR_MAGIC


def _image_and_sidecar(folder) -> tuple[bytes, dict]:
    image, text = build._split_sidecar(folder / "m.so")
    return image, json.loads(text)


def test_runtime_refuses_bad_pairs_and_inputs(exported, tmp_path):
    model, folder = exported
    compiled = export.load(folder / "m.so")
    with pytest.raises(QftsimError, match="shape"):
        compiled.run(np.zeros((1, 3, 9, 8), np.int8))
    real = np.random.default_rng(0).normal(size=(2, 3, 8, 8))
    assert np.array_equal(compiled.run(real)["fc"], simulate(model, model.inputs[0].quant.quantize(real)).outputs["fc"])
    shutil.copy(folder / "m.so", tmp_path / "m.so")  # the library alone: its sidecar travels inside it
    assert export.load(tmp_path / "m.so").sidecar["model_hash"] == model.hash
    # (new files: rewriting a loaded library in place changes its mapped code under the process)
    (tmp_path / "appended.so").write_bytes((folder / "m.so").read_bytes() + b"appended")
    with pytest.raises(QftsimError, match="no embedded sidecar"):
        export.load(tmp_path / "appended.so")
    image, sidecar = _image_and_sidecar(folder)
    tampered = bytearray(image)
    tampered[len(image) // 2] ^= 1
    (tmp_path / "tampered.so").write_bytes(_embedded(bytes(tampered), json.dumps(sidecar).encode()))
    with pytest.raises(QftsimError, match="does not match its sidecar"):
        export.load(tmp_path / "tampered.so")
    with pytest.raises(QftsimError, match="unknown target"):
        resolve_target("riscv")
    in_memory = export.compile_model(model, "x86-64")
    assert np.array_equal(in_memory.run(real)["fc"], compiled.run(real)["fc"])
    with pytest.raises(QftsimError, match="cannot run here"):
        export.compile_model(model, "aarch64")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qftsim.cli", *args], capture_output=True, text=True)


def test_cli_export_and_verify(exported, tmp_path):
    model, folder = exported
    res = _cli("export", str(folder / "m.qft"), "--target", "x86-64", "-o", str(tmp_path / "generic.so"))
    assert res.returncode == 0, res.stderr
    res = _cli("verify", str(folder / "m.qft"), str(tmp_path / "generic.so"), "--samples", "8")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "output fc: equal" in res.stdout
    # a different model (other weights, same shapes) against the same library
    other, _ = random_cnn("tflite-int8", channels=8, size=8, depthwise=True, seed=1)
    other.save(tmp_path / "other.qft")
    res = _cli("verify", str(tmp_path / "other.qft"), str(tmp_path / "generic.so"), "--samples", "8")
    assert res.returncode == 1
    assert "output fc: DIFFERS" in res.stdout and "first at index" in res.stdout


AARCH64_READY = all(shutil.which(tool) for tool in ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "qemu-aarch64"))


@pytest.mark.skipif(not AARCH64_READY, reason="aarch64 cross toolchain or qemu-user missing "
                    "(apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user; .ci/run does)")
def test_aarch64_cross_compile_runs_under_qemu(exported, tmp_path):
    from tests import aarch64

    model, folder = exported
    x = np.random.default_rng(4).integers(-128, 128, size=(3, 3, 8, 8)).astype(np.int8)
    got = aarch64.run_under_qemu(model, x, tmp_path)
    assert np.array_equal(got, simulate(model, x).outputs["fc"])


@pytest.mark.parametrize("where", ["folder", "under a file"])
def test_export_refuses_an_unwritable_output_before_compiling(tmp_path, monkeypatch, where):
    import export.build as build

    monkeypatch.setattr(build, "_build", lambda *a: pytest.fail("compiled before checking the output"))
    (tmp_path / "file").write_text("x")
    model, _ = random_cnn(channels=4, size=4)
    target = tmp_path if where == "folder" else tmp_path / "file" / "m.so"
    with pytest.raises(QftsimError, match="is a folder|cannot write the library there"):
        build.export_library(model, target)


@pytest.mark.parametrize("sidecar", [b"\xff\xfe garbage", b"[1, 2]", b'{"format": "qftsim.tvm"}', b"[" * 100000])
def test_verify_refuses_a_bad_sidecar_in_one_line(exported, tmp_path, sidecar):
    model, folder = exported
    copy = tmp_path / "m.so"
    copy.write_bytes(_embedded(_image_and_sidecar(folder)[0], sidecar))
    with pytest.raises(QftsimError, match="sidecar"):
        export.load(copy)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(claimed=st.integers(0, 2**64 - 1), cut=st.integers(0, 40))
def test_a_damaged_sidecar_trailer_is_refused_in_one_line(exported, tmp_path, claimed, cut):
    """Any claimed sidecar length, and a file cut anywhere in its last bytes: a one-line refusal."""
    _, folder = exported
    data = (folder / "m.so").read_bytes()
    assume(claimed != int.from_bytes(data[-16:-8], "little"))
    for damaged in (data[:-16] + claimed.to_bytes(8, "little") + build.SIDECAR_MAGIC, data[:len(data) - cut - 1]):
        (tmp_path / "m.so").write_bytes(damaged)
        with pytest.raises(QftsimError, match="sidecar"):
            export.load(tmp_path / "m.so")


def test_a_kill_between_the_library_and_its_copy_leaves_a_whole_pair(exported, tmp_path, monkeypatch):
    """Killed before the library's rename, the old pair loads; after it (before the JSON copy), the new one."""
    model, folder = exported
    executable = build._build(model, "host")
    monkeypatch.setattr(build, "_build", lambda *a: executable)  # one compile for the three exports
    models = [random_cnn("tflite-int8", channels=8, size=8, depthwise=True, seed=s)[0] for s in (11, 12)]
    build.export_library(model, tmp_path / "m.so")
    for killed_at, new in ((1, models[0]), (2, models[1])):
        writes = []

        def write_then_die(path, data, mode=0o666, count=killed_at):
            writes.append(path)
            if len(writes) == count:
                raise KeyboardInterrupt  # as SIGINT/SIGTERM arrive mid-export
            atomic_write_bytes(path, data, mode)

        monkeypatch.setattr(build, "atomic_write_bytes", write_then_die)
        with pytest.raises(KeyboardInterrupt):
            build.export_library(new, tmp_path / "m.so")
        monkeypatch.setattr(build, "atomic_write_bytes", atomic_write_bytes)
        expected = model if killed_at == 1 else new
        assert export.load(tmp_path / "m.so").sidecar["model_hash"] == expected.hash


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_a_truncated_library_with_a_matching_sidecar_is_refused(exported, tmp_path, keep):
    """A library cut short, its sidecar's SHA-256 edited to match: refused before the loader maps it (mapping
    it would kill the process with SIGBUS), in a child process so that a regression cannot kill the tests."""
    model, folder = exported
    image, sidecar = _image_and_sidecar(folder)
    cut = image[: int(len(image) * keep)]
    sidecar["library_sha256"] = hashlib.sha256(cut).hexdigest()
    (tmp_path / "m.so").write_bytes(_embedded(cut, json.dumps(sidecar).encode()))
    res = _cli("verify", str(folder / "m.qft"), str(tmp_path / "m.so"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, (res.returncode, res.stderr)
    assert "truncated" in res.stderr or "not a readable shared library" in res.stderr
