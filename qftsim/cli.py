"""The `qftsim` command line.

Exit codes: 0 success; 1 a check failed (an invalid profile, a parity
mismatch); 2 a usage or input error (bad file, unknown profile, bad shape),
reported as one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml

from qftsim.errors import QftsimError
from qftsim.profile import list_profiles, load_profile, trainer_refusals

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USER_ERROR = 0, 1, 2


def _profiles_list(args) -> int:
    for name in list_profiles():
        p = load_profile(name)
        w, a, acc = p.weights, p.activations, p.accumulator
        per_op = f" (per op: {', '.join(p.arithmetic_overrides)})" if p.arithmetic_overrides else ""
        print(f"{name:24s} W{w.bits} A{a.bits} acc{acc.bits} {acc.overflow:8s} "
              f"{p.requant.scheme}/{p.requant.rounding}{per_op}")
    return EXIT_OK


def _profiles_show(args) -> int:
    p = load_profile(args.profile)
    print(f"# hash {p.hash}")
    print(yaml.safe_dump(p.to_dict(), sort_keys=False), end="")
    return EXIT_OK


def _profiles_validate(args) -> int:
    status = EXIT_OK
    for path in args.files:
        try:
            p = load_profile(path)
            refusals = trainer_refusals(p)
            if refusals:  # the simulator runs it; quantize would refuse it later
                print(f"invalid  {path}: quantize refuses it ({'; '.join(refusals)}); simulate and import "
                      "accept it", file=sys.stderr)
                status = EXIT_CHECK_FAILED
            else:
                print(f"ok       {path} ({p.name})")
        except QftsimError as exc:
            print(f"invalid  {exc}", file=sys.stderr)
            status = EXIT_CHECK_FAILED
    return status


def load_input_array(model, path: str):
    """An .npy batch for the model's single input: integers as they are, reals quantized; says which."""
    from qftsim.loaders import read_npy

    arr = read_npy(path, mmap=True)  # a header claiming more than the file is refused
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise QftsimError(f"{path}: an .npz archive; give one .npy array (np.save)")
    if arr.ndim == 0 or len(arr) == 0:
        raise QftsimError(f"{path}: holds no samples (shape {arr.shape})")
    arr = np.array(arr)
    spec = model.inputs[0]
    if arr.dtype.kind in "iu":
        print(f"input {path}: {arr.dtype} {arr.shape}, taken as already-quantized integers")
        return arr
    if arr.dtype.kind != "f":
        raise QftsimError(f"{path}: dtype {arr.dtype}; expected integers or floats")
    if not np.isfinite(arr).all():
        raise QftsimError(f"{path}: contains NaN or Inf")
    print(f"input {path}: {arr.dtype} {arr.shape}, real values quantized with scale {spec.quant.scale:.6g}, "
          f"zero point {spec.quant.zero_point}")
    return spec.quant.quantize(arr)


def _simulate(args) -> int:
    from qftsim import golden, intmodel
    from qftsim.sim import format_report, simulate

    model = intmodel.load(args.model)
    x = load_input_array(model, args.input)
    result = simulate(model, x, keep_tensors=bool(args.dump), keep_accumulators=args.accumulators)
    if args.dump:
        golden.write(model, result, args.dump, replace=args.force)
        print(f"golden vectors: {args.dump}/manifest.json")
    if args.output:
        if len(result.outputs) != 1:
            raise QftsimError("--output writes one .npy; this model has several outputs (use --dump)")
        (arr,) = result.outputs.values()
        intmodel.atomic_write_bytes(Path(args.output), _npy_bytes(arr))
        print(f"output: {args.output}")
    for name, arr in result.outputs.items():
        print(f"output {name}: {arr.dtype} {arr.shape}, min {arr.min()}, max {arr.max()}")
    if args.report:
        print(format_report(result.report))
    print(f"accumulator overflows: {result.overflows}")
    return EXIT_OK


def _npy_bytes(arr) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _export(args) -> int:
    from export import export_library
    from qftsim import intmodel

    model = intmodel.load(args.model)
    if args.format == "tflite":
        from export.tflite import litert_profile_of, to_tflite

        intmodel.atomic_write_bytes(Path(args.output), to_tflite(model))
        print(f"wrote {args.output}: fully-int8 TFLite that LiteRT ({litert_profile_of(model.profile)}'s kernels) "
              "runs to the simulator's integers (checked by importing it back)")
        return EXIT_OK
    if args.format == "onnx":
        from export.onnx import onnxruntime_profile_of, to_onnx

        intmodel.atomic_write_bytes(Path(args.output), to_onnx(model))
        print(f"wrote {args.output}: int8 QOperator ONNX that onnxruntime "
              f"({onnxruntime_profile_of(model.profile)}'s kernels) runs to the simulator's integers (checked by "
              "importing it back)")
        return EXIT_OK
    sidecar = export_library(model, args.output, args.target)
    print(f"compiled {args.model} for {sidecar['target_string']}: {args.output} (+ {Path(args.output).name}.json)")
    return EXIT_OK


def _import(args) -> int:
    import collections

    from qftsim.importers import from_tflite
    from qftsim.onnx_import import from_onnx

    kind = Path(args.model).suffix.lower()
    if kind not in (".tflite", ".onnx"):
        raise QftsimError(f"{args.model}: qftsim imports .tflite (fully-int8 TFLite) and .onnx (int8 QOperator or "
                          "QDQ) files")
    profile = args.profile or ("litert-xnnpack" if kind == ".tflite" else "onnxruntime-cpu")
    model = (from_tflite if kind == ".tflite" else from_onnx)(args.model, profile)
    model.save(args.output)
    ops = collections.Counter(n.op for n in model.nodes)
    spec = model.inputs[0]
    print(f"imported {args.model} for {model.profile.name}: {len(model.nodes)} ops "
          f"({', '.join(f'{k} {v}' for k, v in sorted(ops.items()))}) -> {args.output}")
    layout = "(TFLite's NHWC transposed)" if kind == ".tflite" else "(as in the ONNX model)"
    print(f"input {spec.name!r}: (batch, {', '.join(map(str, spec.shape))}) {spec.quant.dtype}, channels first "
          f"{layout}, scale {spec.quant.scale:.6g}, zero point {spec.quant.zero_point}")
    return EXIT_OK


def _verify(args) -> int:
    import warnings

    import export
    from qftsim import intmodel
    from qftsim.sim import chunk_samples, simulate

    model = intmodel.load(args.model)
    compiled = export.load(args.library)
    spec = model.inputs[0]
    rng = np.random.default_rng(args.seed)
    chunk = chunk_samples(model)  # memory stays flat whatever --samples
    differ = {name: 0 for name in model.outputs}
    first: dict[str, tuple] = {}
    for start in range(0, args.samples, chunk):
        x = rng.integers(spec.quant.qmin, spec.quant.qmax + 1, size=(min(chunk, args.samples - start), *spec.shape))
        x = x.astype(spec.quant.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = simulate(model, x).outputs
        got = compiled.run(x)
        for name, want in expected.items():
            have = got.get(name)
            if have is None or have.shape != want.shape:
                print(f"output {name}: MISSING or shape {None if have is None else have.shape} != {want.shape}")
                return EXIT_CHECK_FAILED
            diff = np.argwhere(have != want)
            differ[name] += len(diff)
            if len(diff) and name not in first:
                index = tuple(int(i) for i in diff[0])
                first[name] = ((start + index[0], *index[1:]), have[index], want[index])
    status = EXIT_OK
    for name, count in differ.items():
        values = args.samples * int(np.prod(model.shapes[name]))
        if count:
            index, have, want = first[name]
            print(f"output {name}: DIFFERS in {count} of {values} values; first at index {index}: "
                  f"compiled {have}, simulator {want}")
            status = EXIT_CHECK_FAILED
        else:
            print(f"output {name}: equal ({values} values, {args.samples} samples)")
    if compiled.model_hash != model.hash:
        print(f"the library was built from model {compiled.model_hash}, not {args.model} ({model.hash})")
        status = EXIT_CHECK_FAILED
    return status


def _demo(args) -> int:
    from qftsim.demo import format_summary, run_demo

    summary = run_demo(args.profile, args.out, epochs=args.epochs, progress=not args.quiet, target=args.target,
                       network=args.network, fmt=args.format)
    print(format_summary(summary))
    exported = {"tvm": "model.so + model.so.json", "tflite": "model.tflite", "onnx": "model.onnx"}[args.format]
    print(f"artifacts: {args.out}/ (model.qft, {exported}, inputs.npy, report/summary.md, summary.json)")
    equal = summary["simulator_accuracy"] == summary["engine_accuracy"] == summary["qft_accuracy"]
    return EXIT_OK if equal and summary["engine_equals_simulator"] else EXIT_CHECK_FAILED


def _count(text: str) -> int:
    """An argparse type: an integer of at least 1 (a size, a count of epochs or samples)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _loss_layers(items: list[str] | None) -> dict[str, float]:
    layers = {}
    for item in items or []:
        name, sep, factor = item.partition("=")
        try:
            layers[name] = float(factor) if sep else 1.0
        except ValueError:
            raise QftsimError(f"--loss-layer {item!r}: expected NODE=FACTOR with a number, e.g. conv3=0.5") from None
        if not name or not np.isfinite(layers[name]) or layers[name] < 0:
            raise QftsimError(f"--loss-layer {item!r}: expected NODE=FACTOR with a node name and a factor >= 0")
    return layers


def _input_size(text: str) -> tuple[int, ...]:
    """An argparse type: a per-sample shape such as 3,224,224."""
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape such as 3,224,224, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected positive dimensions, got {text!r}")
    return dims


def _check_input_size(data_shape: tuple[int, ...], wanted: tuple[int, ...] | None,
                      exported: tuple[int | None, ...] | None) -> None:
    """The calibration samples' shape becomes the .qft's only input shape: refuse one that is not --input-size,
    and say so where it differs from the shape a torch.export program was exported at."""
    if wanted is not None and data_shape != wanted:
        raise QftsimError(f"the calibration samples have shape {data_shape}, not --input-size {wanted} "
                          "(set --resize/--crop, or give the data at that size)")
    differs = exported is not None and (len(exported) != len(data_shape) or
                                        any(e not in (None, d) for e, d in zip(exported, data_shape)))
    if wanted is None and differs:
        print(f"warning: the program was exported at input {exported}, the calibration samples are {data_shape}; "
              "the .qft takes the samples' shape (give --input-size to make this an error)", file=sys.stderr)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise QftsimError(f"expected comma-separated numbers, got {text!r}") from None


@contextmanager
def _torchrun_group(device: str):
    """Under torchrun (WORLD_SIZE > 1): be a member of its process group, so that QFT trains data-parallel
    with one shard of the calibration data per process; yields (rank, world size, this process's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield 0, 1, device
        return
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):  # one GPU per process, as torchrun numbers them on each machine
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield dist.get_rank(), world, device
    finally:
        dist.destroy_process_group()


def _quantize(args) -> int:
    import json
    import warnings

    from qftsim.intmodel import atomic_write_bytes, check_writable
    from qftsim.loaders import (exported_input_shape, first_sample, load_calibration, load_exported_program,
                                load_factory)
    from qftsim.qft import QftConfig, quantize
    from qftsim.report import write_report
    from qftsim.sim import simulate

    if bool(args.model) == bool(args.factory):
        raise QftsimError("give exactly one of --model FILE.pt2 or --factory package.module:function")
    from qftsim.qft import capture_checked
    from qftsim.qgraph import check_profile_can_express

    check_writable(Path(args.output), "the model")  # before the training, which can take long
    model = load_exported_program(args.model) if args.model else load_factory(args.factory, args.weights)
    mean, std = _floats(args.mean), _floats(args.std)
    for flag, values in (("--mean", mean), ("--std", std)):
        if len(values) not in (1, args.channels):
            raise QftsimError(f"{flag} has {len(values)} values; give 1 or --channels ({args.channels})")
    if any(v <= 0 for v in std):
        raise QftsimError(f"--std must be positive, got {args.std}")
    image_options = (args.resize, args.crop, mean, std, args.channels, args.npz_key)
    knobs = dict(epochs=args.epochs, dataset_size=args.dataset_size, batch_size=args.batch_size,
                 learning_rate=args.lr, lr_unit=args.lr_unit, loss=args.loss, scale_lr_factor=args.scale_lr_factor,
                 warmup=args.warmup, weight_scale_lr_factor=args.weight_scale_lr_factor,
                 weight_scales_as_gains={"auto": None, "yes": True, "no": False}[args.weight_scales_as_gains],
                 loss_layers=_loss_layers(args.loss_layer), freeze=tuple(args.freeze or ()), seed=args.seed,
                 reconstruction_steps=args.reconstruction_steps, reconstruction_lr=args.reconstruction_lr,
                 init=args.init, device=args.device)
    QftConfig(**knobs).validate()  # a bad rate or share fails now, not after the data is read
    # fail in seconds: the model is captured and checked against the profile on one sample, before the data
    sample = first_sample(args.data, *image_options)
    _check_input_size(tuple(sample.shape[1:]), args.input_size, exported_input_shape(model))
    check_profile_can_express(capture_checked(model, sample), load_profile(args.profile))
    data = load_calibration(args.data, *image_options, progress=not args.quiet)
    with _torchrun_group(args.device) as (rank, world, device):
        if rank == 0:
            print(f"calibration data: {tuple(data.shape)} from {args.data}")
            if world > 1:
                print(f"data-parallel over {world} processes (torchrun)")
        int_model, report = quantize(model, data, args.profile, method=args.method,
                                     **{**knobs, "device": device}, progress=not args.quiet and rank == 0)
    if rank != 0:  # every process holds the same model; the first one writes it
        return EXIT_OK
    int_model.save(args.output)
    checked = data[:256]
    if not args.quiet:
        print(f"simulating {len(checked)} calibration samples for the accumulator report ...", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = simulate(int_model, int_model.inputs[0].quant.quantize(checked.numpy()))
    report_dir = Path(args.report or Path(args.output).with_suffix("").as_posix() + "-report")
    rows = [("method", args.method), ("calibration loss", f"{report['final_loss']:.5g}"),
            *([("QFT outcome", report["outcome"])] if "outcome" in report else []),
            ("accumulator overflows (calibration data)", sim.overflows)]
    write_report(report_dir, int_model.profile, {args.method: report}, sim.report, rows,
                 data=f"the first {len(checked)} calibration samples")
    atomic_write_bytes(report_dir / "report.json", json.dumps(report, indent=1, default=float).encode())
    print(f"wrote {args.output} (profile {int_model.profile.name}, {len(int_model.nodes)} nodes); "
          f"calibration loss {report['final_loss']:.5g}; report: {report_dir}/summary.md")
    return EXIT_OK


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends with the option's default, where it has a real one (not None, not a flag's False)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.help is None:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An argument parser (and, by argparse's default, its subcommands') whose help shows every default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from qftsim import __version__

    parser = _Parser(prog="qftsim", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"qftsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    profiles = sub.add_parser("profiles", help="list, show and validate hardware profiles")
    psub = profiles.add_subparsers(dest="profiles_command", required=True)
    psub.add_parser("list", help="the shipped profiles").set_defaults(func=_profiles_list)
    show = psub.add_parser("show", help="a profile with every field resolved")
    show.add_argument("profile", help="a shipped profile name or a .yaml file")
    show.set_defaults(func=_profiles_show)
    validate = psub.add_parser("validate", help="check profile files; exit 1 if any is invalid")
    validate.add_argument("files", nargs="+", help="profile .yaml files")
    validate.set_defaults(func=_profiles_validate)

    simulate = sub.add_parser("simulate", help="run a .qft model bit-exactly on an input batch")
    simulate.add_argument("model", help="a .qft IntModel file")
    simulate.add_argument("--input", required=True, metavar="X.npy",
                          help=".npy batch: integers as quantized, floats are quantized")
    simulate.add_argument("--dump", metavar="DIR", help="write golden vectors of every layer to DIR")
    simulate.add_argument("--accumulators", action="store_true", help="with --dump, also dump accumulators")
    simulate.add_argument("--force", action="store_true",
                          help="with --dump, replace an existing golden vector folder (one with manifest.json)")
    simulate.add_argument("--report", action="store_true", help="print the per-layer accumulator/clamp report")
    simulate.add_argument("--output", metavar="OUT.npy", help="write the integer output")
    simulate.set_defaults(func=_simulate)

    demo = sub.add_parser("demo", help="the whole path on the bundled MNIST subset: train/load, rtn and QFT, "
                                        "simulate, export, verify in the engine, report")
    demo.add_argument("--profile", default="int8-default", metavar="NAME|FILE",
                      help="a shipped profile name or a .yaml file")
    demo.add_argument("--network", default="mobilenetv2", metavar="NAME",
                      help="the zoo reference network to train (once; cached) and quantize; a wrong name lists them")
    demo.add_argument("--out", default="qftsim-demo", metavar="DIR", help="artifact folder")
    demo.add_argument("--epochs", type=_count, default=4, metavar="N", help="QFT epochs")
    demo.add_argument("--format", default="tvm", choices=["tvm", "tflite", "onnx"],
                      help="end in a TVM library, or in a .tflite (litert profiles) or .onnx (onnxruntime-cpu) that "
                           "its own engine runs and the demo compares with the simulator")
    demo.add_argument("--target", default="host", choices=["host", "x86-64"],
                      help="compile for this CPU (host) or portable x86-64 (--format tvm)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)

    quant = sub.add_parser("quantize", help="quantize your own model for a profile and write a .qft file")
    quant.add_argument("--model", metavar="FILE.pt2", help="a torch.export program (.pt2)")
    quant.add_argument("--factory", metavar="PKG.MOD:FN", help="package.module:function returning an nn.Module")
    quant.add_argument("--weights", metavar="FILE",
                       help="state dict for the factory's model (torch.load weights_only=True)")
    quant.add_argument("--data", required=True, metavar="PATH", help=".npy, .npz or a folder of images")
    quant.add_argument("--npz-key", metavar="KEY", help="which array of an .npz")
    quant.add_argument("--resize", type=_count, metavar="PIXELS", help="images: shorter side to this many pixels")
    quant.add_argument("--crop", type=_count, metavar="PIXELS",
                       help="images: center crop to this square size, in pixels")
    quant.add_argument("--channels", type=int, default=3, choices=[1, 3], help="images: 1 (grey) or 3 (RGB)")
    quant.add_argument("--mean", default="0", metavar="M[,M,M]",
                       help="images: per-channel mean to subtract, e.g. 0.485,0.456,0.406")
    quant.add_argument("--std", default="1", metavar="S[,S,S]", help="images: per-channel std to divide by")
    quant.add_argument("--input-size", type=_input_size, metavar="C,H,W",
                       help="the sample shape the model expects; calibration data of another shape is refused "
                            "(the .qft takes exactly the data's shape)")
    quant.add_argument("--profile", default="int8-default", metavar="NAME|FILE",
                       help="a shipped profile name or a .yaml file")
    quant.add_argument("--method", default="qft", metavar="METHOD",
                       help="qft, or rtn/mse/cle/bias_correction joined by +")
    quant.add_argument("--init", default="best", metavar="METHOD",
                       help="QFT's start: best (try every closed-form method), or one, e.g. rtn+bias_correction")
    quant.add_argument("--epochs", type=_count, default=4, metavar="N", help="QFT passes over the calibration samples")
    quant.add_argument("--dataset-size", type=_count, default=1024, metavar="N", help="calibration samples QFT uses")
    quant.add_argument("--batch-size", type=_count, default=32, metavar="N", help="samples per QFT step")
    quant.add_argument("--lr", type=float, default=1e-2, metavar="RATE",
                       help="Adam's peak learning rate: in quantization steps (--lr-unit step), or absolute")
    quant.add_argument("--lr-unit", default="step", choices=["step", "absolute"],
                       help="step: a layer's weights and bias move in its own quantization steps (one rate suits "
                            "layers of very different sizes); absolute: by the rate itself")
    quant.add_argument("--warmup", type=float, default=0.1, metavar="SHARE",
                       help="the share of QFT's steps over which the rate rises linearly from 0")
    quant.add_argument("--scale-lr-factor", type=float, default=1.0, metavar="FACTOR",
                       help="the log-scales' and equalization factors' rate, as a multiple of --lr")
    quant.add_argument("--weight-scale-lr-factor", type=float, metavar="FACTOR",
                       help="the weight scales' own multiple of --lr (default: --scale-lr-factor)")
    quant.add_argument("--weight-scales-as-gains", default="auto", choices=["auto", "yes", "no"],
                       help="a weight scale trains as its channel's gain, carrying its integer weights (yes), or "
                            "re-rounds them at each step (no); auto: yes at 8-bit weights and wider")
    quant.add_argument("--loss", default="l2rel", choices=["l2rel", "l2", "kl", "ce"],
                       help="distillation loss between the quantized and float outputs")
    quant.add_argument("--loss-layer", action="append", metavar="NODE=FACTOR", help="extra distillation layer")
    quant.add_argument("--reconstruction-steps", type=int, default=0, metavar="N",
                       help="block-wise reconstruction steps per block before finetuning (0: none)")
    quant.add_argument("--reconstruction-lr", type=float, default=5e-2, metavar="RATE",
                       help="its rate, in quantization steps")
    quant.add_argument("--freeze", action="append", metavar="GROUP",
                       help="weights, biases, weight_scales, act_scales or equalization")
    quant.add_argument("--seed", type=int, default=0, metavar="N", help="seed of QFT's sample order")
    quant.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where QFT trains")
    quant.add_argument("--quiet", action="store_true", help="no progress bars")
    quant.add_argument("-o", "--output", required=True, metavar="OUT.qft", help="the IntModel to write")
    quant.add_argument("--report", metavar="DIR", help="report folder (default OUT-report)")
    quant.set_defaults(func=_quantize)

    export = sub.add_parser("export", help="compile a .qft model with TVM into a shared library + sidecar, or "
                                            "write it as a fully-int8 .tflite for LiteRT")
    export.add_argument("model", help="a .qft IntModel file")
    export.add_argument("--format", default="tvm", choices=["tvm", "tflite", "onnx"],
                        help="tvm: a compiled library; tflite: a .tflite for a model on a litert profile; onnx: an "
                             "int8 QOperator .onnx for a model on onnxruntime-cpu")
    export.add_argument("--target", default="host", choices=["host", "x86-64", "aarch64"],
                        help="this CPU (host, AVX-512 VNNI where it has it), portable x86-64, or aarch64 (cross)")
    export.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="the file to write: OUT.so (its sidecar inside it, a copy in OUT.so.json), OUT.tflite "
                             "or OUT.onnx")
    export.set_defaults(func=_export)

    imp = sub.add_parser("import", help="turn an int8 .tflite or .onnx model into a .qft IntModel for a profile")
    imp.add_argument("model", help="a .tflite file (int8 weights and activations, as ai-edge-quantizer writes) or "
                                   "an .onnx one (int8 QOperator or QDQ, as onnxruntime's quantize_static writes)")
    imp.add_argument("--profile", metavar="NAME|FILE",
                     help="whose arithmetic to simulate: for .tflite litert-xnnpack (LiteRT's default CPU "
                          "interpreter; the default), litert-optimized or litert-reference; for .onnx "
                          "onnxruntime-cpu (the default); or a .yaml of your own target")
    imp.add_argument("-o", "--output", required=True, metavar="OUT.qft", help="the IntModel to write")
    imp.set_defaults(func=_import)

    verify = sub.add_parser("verify", help="run a .qft model and its compiled library on the same inputs; "
                                           "exit 1 on any difference")
    verify.add_argument("model", help="a .qft IntModel file")
    verify.add_argument("library", help="its compiled library (OUT.so; its sidecar is inside it)")
    verify.add_argument("--samples", type=_count, default=16, metavar="N", help="random input samples to compare")
    verify.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random inputs")
    verify.set_defaults(func=_verify)
    return parser


def _exit_on_sigterm(signum, frame):
    """SIGTERM (kill, a CI timeout) as SystemExit: the writes under way remove their temporary files."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return args.func(args)
    except QftsimError as exc:
        print(f"qftsim: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
