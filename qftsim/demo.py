"""`qftsim demo`: the whole path on bundled data, from a float network to a verified integer model: compiled by
TVM, or written as .tflite or .onnx and run by its own engine (LiteRT, onnxruntime)."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from qftsim.errors import QftsimError
from qftsim.intmodel import atomic_write_bytes
from qftsim.profile import load_profile
from qftsim.qft import quantize_graph
from qftsim.report import write_report
from qftsim.sim import AccumulatorOverflowWarning, simulate
from qftsim.zoo import load_mnist, reference_network


def run_demo(profile_name: str = "int8-default", out: str | Path = "qftsim-demo", epochs: int = 4,
             progress: bool = True, target: str = "host", network: str = "mobilenetv2", fmt: str = "tvm") -> dict:
    """Train/load `network` (a zoo reference network), quantize (rtn and QFT), simulate, export (`fmt`: a TVM
    library, a .tflite or an .onnx), run the export in its engine and compare; write artifacts; return the
    summary."""
    profile = load_profile(profile_name)
    engine = _engine_check(fmt, profile)  # before any training: a profile the engine cannot run stops here
    seconds = {}

    def stage(name):
        seconds[name] = time.perf_counter()

    def done(name):
        seconds[name] = round(time.perf_counter() - seconds[name], 2)

    stage("float_model")
    net = reference_network(network, progress=progress)
    x_train, _, x_test, y_test = load_mnist()
    calibration, labels = x_train[:1024], y_test.numpy()
    with torch.no_grad():
        float_acc = _accuracy(net(x_test).numpy(), labels)
    done("float_model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    stage("rtn")
    rtn_graph, rtn_report = quantize_graph(net, calibration, profile, method="rtn", progress=progress)
    rtn_acc = _accuracy(_graph_outputs(rtn_graph, x_test), labels)
    done("rtn")

    stage("qft")
    qft_graph, qft_report = quantize_graph(net, calibration, profile, method="qft", epochs=epochs, progress=progress)
    qft_acc = _accuracy(_graph_outputs(qft_graph, x_test), labels)  # QFT's own (evaluation-mode) number
    int_model = qft_graph.integerize()
    int_model.save(out / "model.qft")
    done("qft")

    stage("simulate")
    x_int = int_model.inputs[0].quant.quantize(x_test.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccumulatorOverflowWarning)
        sim = simulate(int_model, x_int)
    sim_out = sim.outputs[int_model.outputs[0]]
    sim_acc = _accuracy(sim_out, labels)
    np.save(out / "inputs.npy", x_int[:64], allow_pickle=False)
    done("simulate")

    stage("export")
    run = _export(fmt, int_model, out, target)
    done("export")

    stage("verify")
    engine_out = run(x_int)
    engine_acc = _accuracy(engine_out, labels)
    parity = bool(np.array_equal(engine_out.reshape(sim_out.shape), sim_out))
    done("verify")

    headroom = min(r.headroom_bits for r in sim.report if r.acc_bits is not None)
    summary = {
        "profile": profile.name, "network": network, "float_accuracy": float_acc, "rtn_accuracy": rtn_acc,
        "qft_accuracy": qft_acc, "simulator_accuracy": sim_acc, "engine": engine, "engine_accuracy": engine_acc,
        "engine_equals_simulator": parity, "accumulator_overflows": sim.overflows,
        "min_accumulator_headroom_bits": round(headroom, 2), "qft_initialisation": qft_report.get("chosen_init"),
        "qft_outcome": qft_report.get("outcome"),
        "test_images": int(len(labels)), "calibration_images": int(len(calibration)), "seconds": seconds,
    }
    stage("report")
    rows = [(k, v) for k, v in summary.items() if k != "seconds"]
    write_report(out / "report", profile, {"rtn": rtn_report, "qft": qft_report}, sim.report, rows)
    done("report")
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
    return summary


def _engine_check(fmt: str, profile) -> str:
    """The engine label of an export format, after checking that the engine runs the profile."""
    if fmt == "tflite":
        from export.tflite import litert_profile_of

        return f"LiteRT ({litert_profile_of(profile)}'s kernels)"
    if fmt == "onnx":
        from export.onnx import onnxruntime_profile_of

        return f"onnxruntime ({onnxruntime_profile_of(profile)}'s kernels)"
    from export.lower import unlowered_arithmetic

    missing = unlowered_arithmetic(profile)
    if missing:
        raise QftsimError(f"profile {profile.name}: {', '.join(missing.values())} has no TVM lowering yet; "
                          "end the demo in its own engine (--format onnx)")
    return "compiled (TVM)"


def _export(fmt: str, int_model, out: Path, target: str):
    """Write the model in `fmt` under `out` and return the function that runs it on input integers."""
    if fmt == "tflite":
        from export.tflite import litert_profile_of, run_tflite, to_tflite

        data = to_tflite(int_model)
        atomic_write_bytes(out / "model.tflite", data)
        return lambda x: run_tflite(data, litert_profile_of(int_model.profile), x)
    if fmt == "onnx":
        from export.onnx import run_onnx, to_onnx

        data = to_onnx(int_model)
        atomic_write_bytes(out / "model.onnx", data)
        return lambda x: run_onnx(data, int_model, x)
    import export

    export.export_library(int_model, out / "model.so", target)
    compiled = export.load(out / "model.so")
    return lambda x: compiled.run(x)[int_model.outputs[0]]


def _graph_outputs(qgraph, x) -> np.ndarray:
    with torch.no_grad():
        return qgraph.run_integers(x)[qgraph.fg.output].numpy()


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == labels).mean())


def format_summary(s: dict) -> str:
    rows = [
        ("network / profile", f"{s['network']} / {s['profile']}"),
        ("float accuracy", f"{s['float_accuracy']:.4f}"),
        ("rtn accuracy", f"{s['rtn_accuracy']:.4f}"),
        ("QFT accuracy (eval graph)", f"{s['qft_accuracy']:.4f}"),
        ("QFT outcome", s["qft_outcome"]),
        ("simulator accuracy", f"{s['simulator_accuracy']:.4f}"),
        (f"{s['engine']} accuracy", f"{s['engine_accuracy']:.4f}"),
        (f"{s['engine'].split(' (')[0]} == simulator", "yes, every output" if s["engine_equals_simulator"] else "NO"),
        ("accumulator overflows", str(s["accumulator_overflows"])),
        ("min accumulator headroom", f"{s['min_accumulator_headroom_bits']} bits"),
    ] + [(f"time: {k}", f"{v:.1f} s") for k, v in s["seconds"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
