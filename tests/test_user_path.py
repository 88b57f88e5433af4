"""The user's path: qftsim quantize on .pt2 / factory models with .npy / image-folder data, and qftsim demo."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from qftsim import intmodel
from qftsim.zoo import MNIST_MEAN, MNIST_STD, load_mnist, reference_network


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qftsim.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    x = load_mnist()[0][:48]
    np.save(folder / "calib.npy", x.numpy())
    net = reference_network("resnet")
    torch.export.save(torch.export.export(net, (x[:2],)), str(folder / "resnet.pt2"))
    torch.save(reference_network("mobilenetv2").state_dict(), folder / "mobilenet.pt")
    from PIL import Image

    images = folder / "images"
    images.mkdir()
    pixels = np.clip(np.rint((x.numpy()[:, 0] * MNIST_STD + MNIST_MEAN) * 255), 0, 255).astype(np.uint8)
    for i, digit in enumerate(pixels):
        Image.fromarray(digit).save(images / f"{i:03d}.png")
    return folder


KNOBS = ["--epochs", "1", "--dataset-size", "32", "--batch-size", "16", "--quiet"]


def test_quantize_pt2_with_npy(inputs):
    out = inputs / "pt2.qft"
    res = _cli("quantize", "--model", str(inputs / "resnet.pt2"), "--data", str(inputs / "calib.npy"),
               "--profile", "npu-a8w4", "--loss", "kl", "--freeze", "equalization", *KNOBS, "-o", str(out))
    assert res.returncode == 0, res.stderr
    model = intmodel.load(out)
    assert model.profile.name == "npu-a8w4" and any(n.op == "add" for n in model.nodes)
    assert (inputs / "pt2-report" / "summary.md").is_file() and (inputs / "pt2-report" / "sqnr_per_layer.png").is_file()


def test_quantize_factory_with_image_folder(inputs):
    out = inputs / "factory.qft"
    res = _cli("quantize", "--factory", "qftsim.zoo:SmallMobileNetV2", "--weights", str(inputs / "mobilenet.pt"),
               "--data", str(inputs / "images"), "--channels", "1", "--mean", str(MNIST_MEAN), "--std",
               str(MNIST_STD), "--method", "cle+bias_correction", *KNOBS, "-o", str(out), "--report",
               str(inputs / "rep"))
    assert res.returncode == 0, res.stderr
    assert "calibration data: (48, 1, 28, 28)" in res.stdout
    assert intmodel.load(out).inputs[0].shape == (1, 28, 28)
    assert json.loads((inputs / "rep" / "report.json").read_text())["method"] == "cle+bias_correction"


def test_quantize_errors_are_one_line(inputs):
    res = _cli("quantize", "--factory", "qftsim.zoo:SmallMobileNetV2", "--data", str(inputs / "nope.npy"),
               "-o", str(inputs / "x.qft"))
    assert res.returncode == 2 and "no such calibration data" in res.stderr and "Traceback" not in res.stderr
    res = _cli("quantize", "--model", str(inputs / "calib.npy"), "--data", str(inputs / "calib.npy"),
               "-o", str(inputs / "x.qft"))
    assert res.returncode == 2 and "not a torch.export program" in res.stderr
    res = _cli("quantize", "--factory", "qftsim.zoo:SmallMobileNetV2", "--data", str(inputs / "calib.npy"),
               "--profile", "no-such", "-o", str(inputs / "x.qft"))
    assert res.returncode == 2 and "unknown profile" in res.stderr
    np.save(inputs / "wrong.npy", np.zeros((4, 3, 28, 28), np.float32))
    res = _cli("quantize", "--factory", "qftsim.zoo:SmallMobileNetV2", "--data", str(inputs / "wrong.npy"),
               "-o", str(inputs / "x.qft"))
    assert res.returncode == 2 and "rejects calibration data of shape (3, 28, 28)" in res.stderr
    assert not (inputs / "x.qft").exists()


def test_quantize_shows_progress_of_every_stage(inputs):
    res = _cli("quantize", "--factory", "qftsim.zoo:SmallMobileNetV2", "--data", str(inputs / "images"),
               "--channels", "1", "--epochs", "1", "--dataset-size", "32", "-o", str(inputs / "progress.qft"))
    assert res.returncode == 0, res.stderr
    for stage in ("reading", "float model's outputs", "qft: set-up", "rtn ranges", "QFT", "per-layer report"):
        assert stage in res.stderr, stage
    assert "QFT started from " in res.stdout and "simulating 48 calibration samples" in res.stdout


def test_a_batch_baked_into_a_pt2_is_one_line(inputs):
    """torch.export at batch 1 with view(1, -1): runs one sample, not two; the error says how to export it."""
    class Baked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(1, 2, 3), torch.nn.Linear(2 * 26 * 26, 10)

        def forward(self, x):
            return self.fc(self.conv(x).view(1, -1))

    torch.export.save(torch.export.export(Baked().eval(), (torch.zeros(1, 1, 28, 28),)), str(inputs / "baked.pt2"))
    res = _cli("quantize", "--model", str(inputs / "baked.pt2"), "--data", str(inputs / "calib.npy"), "--quiet",
               "-o", str(inputs / "baked.qft"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "runs one sample but not a batch of two" in res.stderr and "dynamic_shapes" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_input_size_is_checked(inputs):
    np.save(inputs / "calib32.npy", np.zeros((4, 1, 32, 32), np.float32))
    res = _cli("quantize", "--model", str(inputs / "resnet.pt2"), "--data", str(inputs / "calib32.npy"),
               "--method", "rtn", "--quiet", "-o", str(inputs / "size.qft"))
    assert res.returncode == 0 and "exported at input (1, 28, 28), the calibration samples are (1, 32, 32)" \
        in res.stderr, res.stderr
    res = _cli("quantize", "--model", str(inputs / "resnet.pt2"), "--data", str(inputs / "calib32.npy"),
               "--input-size", "1,28,28", "--quiet", "-o", str(inputs / "size2.qft"))
    assert res.returncode == 2 and "not --input-size (1, 28, 28)" in res.stderr
    assert not (inputs / "size2.qft").exists()


def test_pickled_weights_and_an_unwritable_output_are_one_line(inputs):
    import argparse

    torch.save({"state": argparse.Namespace(code="anything")}, inputs / "pickled.pt")
    res = _cli("quantize", "--factory", "qftsim.zoo:SmallMobileNetV2", "--weights", str(inputs / "pickled.pt"),
               "--data", str(inputs / "calib.npy"), "-o", str(inputs / "p.qft"))
    assert res.returncode == 2 and "pickled objects are refused" in res.stderr and "Traceback" not in res.stderr
    for output in (inputs, inputs / "calib.npy" / "x.qft"):  # a folder; a path under a file
        res = _cli("quantize", "--factory", "qftsim.zoo:SmallMobileNetV2", "--data", str(inputs / "calib.npy"),
                   "-o", str(output))
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert "is a folder" in res.stderr or "cannot write the model there" in res.stderr


def test_a_decompression_bomb_image_is_refused(tmp_path, monkeypatch):
    from PIL import Image

    from qftsim.errors import QftsimError
    from qftsim.loaders import load_calibration

    Image.new("L", (40, 40)).save(tmp_path / "big.png")
    for limit in (1000, 500):  # past the limit PIL warns, past twice the limit it raises: both refused
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(QftsimError, match="larger than Pillow's limit"):
            load_calibration(tmp_path, channels=1)


def _readme_block(heading: str) -> list[str]:
    """The command lines of the first ```sh block under `heading` in the README."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index(heading):]
    block = section[section.index("```sh\n") + 6:]
    return [line for line in block[:block.index("```")].splitlines() if line.strip()]


def test_walkthrough_runs_as_written(tmp_path):
    """Every line of the README's walkthrough, run as a user would in an empty folder, with `qftsim` on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    lines = _readme_block("## Five-minute walkthrough")
    assert any(line.startswith("qftsim demo") for line in lines) and len(lines) >= 5
    for line in lines:
        res = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"{line}\n{res.stdout}{res.stderr}"
        if line.startswith("qftsim demo"):
            assert "simulator accuracy" in res.stdout
        if line.startswith("qftsim verify"):
            assert "equal (640 values, 64 samples)" in res.stdout
    demo = tmp_path / "demo"
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["simulator_accuracy"] == summary["engine_accuracy"] == summary["qft_accuracy"]
    assert summary["engine_equals_simulator"] and 0.9 < summary["qft_accuracy"] <= 1
    for key in ("profile", "network", "float_accuracy", "rtn_accuracy", "accumulator_overflows", "seconds"):
        assert key in summary
    for name in ("model.qft", "model.so", "model.so.json", "inputs.npy", "report/summary.md",
                 "report/accumulator_headroom.png", "report/qft_loss.png", "report/scales.png",
                 "golden/manifest.json", "host.so", "host.so.json"):
        assert (demo / name).is_file(), name


def test_readme_command_reference_is_the_parsers():
    """The README's command reference is what qftsim.clidoc generates from the parser (regenerate it with
    `python -m qftsim.clidoc README.md`)."""
    from qftsim.cli import build_parser
    from qftsim.clidoc import command_reference, with_reference

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert with_reference(readme, command_reference(build_parser())) == readme


def test_pt2_with_default_argument_forms_is_captured(tmp_path):
    """torch.export writes `aten.conv2d(x, w)` for a bias-free conv at default stride and padding (the usual
    1x1 before BatchNorm), `max_pool2d(x, k)` without a stride: every default form is read from the op schema."""
    from torch import nn

    from qftsim.capture import capture
    from qftsim.loaders import load_exported_program

    net = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 7 * 7, 10, bias=False)).eval()
    x = load_mnist()[0][:8]
    torch.export.save(torch.export.export(net, (x[:2],)), str(tmp_path / "net.pt2"))
    program = load_exported_program(tmp_path / "net.pt2")
    graph = capture(program, x[:2])
    assert [n.kind for n in graph.nodes if n.kind != "input"].count("conv") == 2
    with torch.no_grad():
        assert torch.allclose(graph.run(x)[graph.output], net(x), atol=1e-4)


@pytest.mark.parametrize("network", ["resnet", "mobilenetv2"])
def test_pt2_layers_are_named_by_module_path(tmp_path, network):
    """A .pt2 of each reference network captures to the traced module's graph, with its conv and linear nodes
    named as torch.fx names them (module paths, not conv2d_default_5), and computes the same outputs."""
    from qftsim.capture import capture
    from qftsim.loaders import load_exported_program

    net, x = reference_network(network), load_mnist()[0][:8]
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(net, (x[:2],), dynamic_shapes=({0: batch},)), str(tmp_path / "n.pt2"))
    traced, exported = capture(net, x[:2]), capture(load_exported_program(tmp_path / "n.pt2"), x[:2])
    layers = lambda g: [n.name for n in g.nodes if n.kind in ("conv", "linear")]  # noqa: E731
    assert layers(exported) == layers(traced) and len(layers(traced)) > 5
    assert len({n.name for n in exported.nodes}) == len(exported.nodes)
    with torch.no_grad():
        assert torch.allclose(exported.run(x)[exported.output], traced.run(x)[traced.output], atol=1e-5)


@pytest.mark.parametrize("network", ["mobilenetv3", "efficientnet", "yolo", "unet", "resnet-maxpool"])
def test_pt2_of_the_op_coverage_networks_captures_as_traced(tmp_path, network):
    """torch.export's ATen forms of mul, mean, split/chunk, upsampling, transposed conv and max pooling capture to
    the graph torch.fx gives (the same node kinds, in order) and compute the same outputs."""
    from qftsim.capture import capture
    from qftsim.loaders import load_exported_program
    from qftsim.zoo import REFERENCE_NETWORKS

    torch.manual_seed(0)
    net, x = REFERENCE_NETWORKS[network]().eval(), load_mnist()[0][:8]
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(net, (x[:2],), dynamic_shapes=({0: batch},)), str(tmp_path / "n.pt2"))
    traced, exported = capture(net, x[:2]), capture(load_exported_program(tmp_path / "n.pt2"), x[:2])
    assert [n.kind for n in exported.nodes] == [n.kind for n in traced.nodes]
    with torch.no_grad():
        assert torch.allclose(exported.run(x)[exported.output], traced.run(x)[traced.output], atol=1e-5)


class SoftplusNet(torch.nn.Module):
    """Two Softpluses and an elementwise division: three ops capture does not take."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.act1, self.act2 = torch.nn.Softplus(), torch.nn.Softplus()

    def forward(self, x):
        y = self.act1(self.conv(x))
        return self.act2(y) / y


def test_unsupported_model_fails_before_reading_the_data(inputs, monkeypatch, capsys):
    """Capture runs on one sample first, and names every unsupported op with its module path and count."""
    import qftsim.loaders
    from qftsim.cli import main

    def no_full_read(*args, **kwargs):
        raise AssertionError("the whole calibration set was read before the model was checked")

    monkeypatch.setattr(qftsim.loaders, "load_calibration", no_full_read)
    code = main(["quantize", "--factory", "tests.test_user_path:SoftplusNet", "--data", str(inputs / "images"),
                 "--channels", "1", "-o", str(inputs / "never.qft")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "3 unsupported ops: Softplus x2 (at act1, act2); truediv x1" in err and "Supported:" in err


def test_demo_unknown_network_is_one_line_listing_the_networks(tmp_path, capsys):
    """`qftsim demo --network` takes any zoo reference network; a wrong name lists them and writes nothing."""
    from qftsim.cli import main
    from qftsim.zoo import REFERENCE_NETWORKS

    code = main(["demo", "--network", "vgg", "--out", str(tmp_path / "demo"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert all(name in err for name in REFERENCE_NETWORKS) and not (tmp_path / "demo").exists()


class _DataReached(Exception):
    """Raised where quantize first touches the data: every option was accepted."""


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(["--lr", "--warmup", "--scale-lr-factor", "--weight-scale-lr-factor",
                               "--reconstruction-lr", "--reconstruction-steps", "--seed", "--epochs"]),
       value=st.one_of(st.floats(), st.integers(-(2**70), 2**70), st.sampled_from(["nan", "-inf", "1e999", "x"])))
def test_any_option_value_is_taken_or_refused_before_the_data_is_read(inputs, monkeypatch, capsys, option, value):
    """Every numeric QFT option, any value (NaN, infinities, negatives, huge, not a number): refused in one
    line (exit 2) before the calibration data is read, or it is a value QFT can train with."""
    import qftsim.loaders
    from qftsim.cli import main

    def reached(*args, **kwargs):
        raise _DataReached

    monkeypatch.setattr(qftsim.loaders, "first_sample", reached)
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    integral = option in ("--reconstruction-steps", "--seed", "--epochs")
    valid = math.isfinite(number) and (
        {"--warmup": 0 <= number < 1, "--epochs": number >= 1, "--seed": -(2**63) <= number < 2**64}.get(
            option, number >= 0)
        and (not integral or text.lstrip("-").isdigit()))
    try:
        code = main(["quantize", "--factory", "qftsim.zoo:SmallMobileNetV2", "--data", str(inputs / "images"),
                     "--channels", "1", f"{option}={text}", "-o", str(inputs / "never.qft")])
    except _DataReached:
        assert valid, f"{option} {text} was taken"
        return
    except SystemExit as exc:  # argparse: a value its type converter refuses
        code = exc.code
    err = capsys.readouterr().err
    assert not valid and code == 2 and err.strip().splitlines()[-1].count("error") == 1, (option, text, err)


def test_every_option_says_what_it_does_and_its_default(capsys):
    import argparse

    from qftsim.cli import build_parser, main

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, f"{path} {name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                yield path, action

    for path, action in walk(build_parser(), "qftsim"):
        assert action.help, f"{path} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("qftsim ")
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "(default: 1024)" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--resize", "0"], ["--crop", "-3"], ["--epochs", "0"], ["--device", "bogus"],
                                 ["--channels", "2"]])
def test_impossible_option_values_are_refused_by_the_parser(inputs, bad):
    from qftsim.cli import main

    with pytest.raises(SystemExit) as info:
        main(["quantize", "--factory", "qftsim.zoo:SmallMobileNetV2", "--data", str(inputs / "images"), *bad,
              "-o", str(inputs / "never.qft")])
    assert info.value.code == 2


@pytest.mark.parametrize("bad,message", [(["--mean", "0.1,0.2"], "--mean has 2 values"),
                                         (["--std", "0"], "--std must be positive"),
                                         (["--loss-layer", "conv=abc"], "expected NODE=FACTOR")])
def test_inconsistent_options_are_one_line_errors(inputs, capsys, bad, message):
    from qftsim.cli import main

    code = main(["quantize", "--factory", "qftsim.zoo:SmallMobileNetV2", "--data", str(inputs / "images"),
                 "--channels", "1", *bad, "-o", str(inputs / "never.qft")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
