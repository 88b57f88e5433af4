"""onnxruntime as the judge: int8 ONNX models imported by qftsim compute onnxruntime's integers, every tensor.

Generated float networks (tests/onnx_models.py) are quantized by onnxruntime.quantization.quantize_static
(QDQ and QOperator, uint8 activations, per-channel int8 weights), imported for the onnxruntime-cpu profile
and run by onnxruntime's CPU provider and by the simulator on random and edge inputs. Every integer tensor
of the graph onnxruntime executes is compared, and the deployed model's outputs (float in, float out, default
session options) as well. `python -m pytest tests/test_onnx.py -s` prints the elements compared per op.
"""

from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[dev]')")
pytest.importorskip("onnx")

from qftsim import QftsimError, arith  # noqa: E402
from qftsim.onnx_import import _OnnxImporter, from_onnx, importer_of, session  # noqa: E402
from qftsim.profile import load_profile  # noqa: E402
from qftsim.sim import AccumulatorOverflowWarning, simulate  # noqa: E402
from tests.onnx_models import FloatNet, quantize  # noqa: E402

PROFILE = "onnxruntime-cpu"


class Tally:
    """Elements compared and elements that differ, per op, over the whole run (the issue's table)."""

    def __init__(self):
        self.compared, self.differ = collections.Counter(), collections.Counter()

    def add(self, key: str, compared: int, differ: int) -> None:
        self.compared[key] += compared
        self.differ[key] += differ


TALLY, EXPORT_TALLY = Tally(), Tally()


@st.composite
def networks(draw):
    """(float ONNX bytes, input shape, seed): a conv stem, then up to four blocks of the ops quantize_static
    makes integer kernels of (and Tanh, HardSwish, which onnxruntime runs in float: tables), then a pooled or
    flattened Gemm head."""
    seed = draw(st.integers(0, 2**16))
    channels, size = draw(st.sampled_from([1, 3, 4])), draw(st.sampled_from([5, 8, 9]))
    net = FloatNet(channels, size, seed)
    activations = st.sampled_from([None, "relu", "relu6"])
    x = net.conv("input", draw(st.sampled_from([2, 4, 8])), draw(st.sampled_from([1, 3])),
                 draw(st.sampled_from([1, 2])), activation=draw(activations))
    for _ in range(draw(st.integers(1, 4))):
        _, c, h, _ = net.shape[x]
        kind = draw(st.sampled_from(["conv", "depthwise", "residual", "gate", "pool", "avgpool", "concat", "split",
                                     "slice", "upsample", "unary", "pad"]))
        if kind == "conv":
            x = net.conv(x, draw(st.sampled_from([1, 3, 8])), draw(st.sampled_from([1, 3, 5])),
                         draw(st.sampled_from([1, 2])) if h > 2 else 1, activation=draw(activations))
        elif kind == "depthwise":
            x = net.conv(x, c, draw(st.sampled_from([3, 5])), draw(st.sampled_from([1, 2])) if h > 2 else 1,
                         depthwise=True, activation=draw(activations))
        elif kind == "residual":
            x = net.add(x, net.conv(x, c, 3, activation=draw(activations)))
        elif kind == "gate":  # squeeze-excite: x * sigmoid(conv(global pool(x))), or an elementwise gate
            source = net.global_pool(x) if draw(st.booleans()) else x
            x = net.mul(x, net.activation(net.conv(source, c, 1), "sigmoid"))
        elif kind == "pool" and h >= 3:
            x = net.maxpool(x, draw(st.sampled_from([2, 3])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([0, 1])))
        elif kind == "avgpool" and h >= 3:  # a window over the whole input too (onnxruntime: a global pool)
            kernel = draw(st.sampled_from([2, 3, h])) if h == net.shape[x][3] else draw(st.sampled_from([2, 3]))
            pad = 0 if kernel == h else draw(st.sampled_from([0, 1]))
            x = net.avgpool(x, kernel, draw(st.sampled_from([1, 2])), pad, draw(st.booleans()))
        elif kind == "concat":
            x = net.concat([net.conv(x, draw(st.sampled_from([1, 2, 3])), 1) for _ in range(2)] + [x])
        elif kind == "split" and c % 2 == 0:
            first, second = net.split(x, 2)
            x = net.add(net.conv(first, c // 2, 1), second)
        elif kind == "slice" and c > 1:
            start = draw(st.integers(0, c - 1))
            x = net.slice_channels(x, start, draw(st.integers(start + 1, c)))
        elif kind == "upsample" and h <= 9:
            x = net.upsample(x)
        elif kind == "pad":  # TF-style asymmetric padding before a VALID (depthwise) conv, as EfficientNet-Lite's
            top, left, bottom, right = (draw(st.integers(0, 2)) for _ in range(4))
            if min(h + top + bottom, net.shape[x][3] + left + right) >= 3:
                x = net.conv(net.pad(x, top, left, bottom, right), c, 3, draw(st.sampled_from([1, 2])),
                             depthwise=draw(st.booleans()), activation=draw(activations), same=False)
        elif kind == "unary":
            x = net.activation(x, draw(st.sampled_from(["sigmoid", "leaky_relu", "tanh", "hardswish"])))
    if draw(st.booleans()):
        x = net.global_pool(x)
    return net.to_bytes(net.head(x, draw(st.integers(1, 10)))), net.shape["input"], seed


def edge_inputs(shape, rng: np.random.Generator, zero_point: int, random: int = 3) -> np.ndarray:
    """Random uint8 batches and the edges: all 0, all 255, the zero point, a 0/255 checkerboard."""
    checker = np.where(np.indices(shape[1:]).sum(0) % 2 == 0, 0, 255)
    batch = [rng.integers(0, 256, shape[1:]) for _ in range(random)]
    batch += [np.zeros(shape[1:]), np.full(shape[1:], 255), np.full(shape[1:], zero_point), checker]
    return np.stack(batch).astype(np.uint8)


def integer_graph(importer: _OnnxImporter):
    """The executed graph with its float edges cut: it takes the integer input and gives every integer tensor
    the importer mapped (onnxruntime then computes exactly those, each as an output), but an op's value
    before a Clip the importer folded into that op's clamp."""
    import onnx

    graph = importer.model.graph  # the graph onnxruntime executes
    model = onnx.ModelProto()
    model.CopyFrom(importer.model)
    g = model.graph
    float_input, outputs = g.input[0].name, {o.name for o in g.output}
    edges = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == float_input
             or n.op_type == "DequantizeLinear" and n.output[0] in outputs]
    (q_in,) = [n for n in edges if n.op_type == "QuantizeLinear"]
    element = onnx.TensorProto.INT8 if importer.quant[q_in.output[0]].signed else onnx.TensorProto.UINT8
    produced = {o for n in graph.node for o in n.output}
    clipped = {n.input[0] for n in graph.node  # an op's value before a Clip folded into its clamp: not a tensor
               if n.op_type == "Clip" and importer.tensor_of.get(n.output[0]) == importer.tensor_of.get(n.input[0])}
    names = [t for t in importer.tensor_of if t in produced and t != q_in.output[0] and t not in clipped]
    for n in edges:
        g.node.remove(n)
    del g.input[:], g.output[:]
    g.input.append(onnx.helper.make_tensor_value_info(q_in.output[0], element, importer.shape[q_in.output[0]]))
    g.output.extend(onnx.helper.make_tensor_value_info(t, element, None) for t in names)
    return model, q_in.output[0], names


def compare_with_onnxruntime(model_bytes: bytes, x: np.ndarray, tally: Tally = TALLY) -> int:
    """Import `model_bytes`, simulate it and count the elements that differ from onnxruntime: every integer
    tensor of the executed graph, and the deployed (float in, float out) model's outputs."""
    importer = importer_of(model_bytes, load_profile(PROFILE), "<test>")
    int_model = importer.run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccumulatorOverflowWarning)
        ours = simulate(int_model, x, keep_tensors=True).tensors
    ops = {n.name: "depthwise_conv2d" if n.attrs.get("depthwise") else n.op for n in int_model.nodes}
    exposed, input_name, names = integer_graph(importer)
    engine = session(exposed.SerializeToString())
    differ = 0
    for sample in range(len(x)):
        theirs = dict(zip(names, engine.run(names, {input_name: x[sample:sample + 1]})))
        for name in names:
            mine = ours[importer.tensor_of[name]][sample:sample + 1].reshape(theirs[name].shape)
            bad = int((mine != theirs[name]).sum())
            tally.add(ops[importer.tensor_of[name]], mine.size, bad)
            differ += bad
    deployed = session(model_bytes)  # as a user runs it: default options, float in and out
    q_in, out = int_model.inputs[0].quant, int_model.nodes[-1].quant
    final = ours[int_model.outputs[0]]
    for sample in range(len(x)):
        real = (x[sample:sample + 1].astype(np.float32) - q_in.zero_point) * np.float32(q_in.scale)
        (theirs,) = deployed.run(None, {deployed.get_inputs()[0].name: real})
        mine = (final[sample:sample + 1].astype(np.float32) - out.zero_point) * np.float32(out.scale)
        bad = int((mine.reshape(theirs.shape) != theirs).sum())
        tally.add("deployed output", theirs.size, bad)
        differ += bad
    return differ


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(networks(), st.sampled_from(["QDQ", "QOperator"]))
def test_generated_networks_equal_onnxruntime_on_every_tensor(network, quant_format):
    float_model, shape, seed = network
    rng = np.random.default_rng(seed)
    model = quantize(float_model, rng.standard_normal((8, *shape[1:])).astype(np.float32), quant_format)
    try:
        int_model = from_onnx(model, PROFILE)
    except QftsimError as exc:  # quantize_static's QOperator form leaves Slice (and what follows it) in float
        assume("in float on dequantized values" not in str(exc))
        raise
    # a layer whose calibration outputs were all zero gets a scale near 1e-12: no engine rule to test there
    assume(min([i.quant.scale for i in int_model.inputs] + [n.quant.scale for n in int_model.nodes]) > 1e-6)
    x = edge_inputs(shape, rng, int_model.inputs[0].quant.zero_point)
    assert compare_with_onnxruntime(model, x) == 0


def _one_node(op: str, tensors: dict[str, np.ndarray], inputs: list[str], constants: dict, **attrs) -> np.ndarray:
    """onnxruntime's com.microsoft `op` on integer tensors, its other inputs the named scalar constants."""
    from onnx import TensorProto, helper, numpy_helper

    element = {np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8}
    node = helper.make_node(op, inputs, ["y"], domain="com.microsoft", **attrs)
    y_type = element[next(iter(tensors.values())).dtype]
    graph = helper.make_graph([node], "op", [helper.make_tensor_value_info(k, element[v.dtype], v.shape)
                                             for k, v in tensors.items()],
                              [helper.make_tensor_value_info("y", y_type, None)],
                              [numpy_helper.from_array(np.array(v), n) for n, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return session(model.SerializeToString()).run(None, tensors)[0].astype(np.int64)


def _qlinear(op: str, a: np.ndarray, b: np.ndarray, scales, zeros) -> np.ndarray:
    """onnxruntime's QLinearAdd or QLinearMul on two integer tensors (a one-node QOperator model)."""
    names = ["sa", "za", "sb", "zb", "sc", "zc"]
    values = [np.float32(scales[0]), a.dtype.type(zeros[0]), np.float32(scales[1]), a.dtype.type(zeros[1]),
              np.float32(scales[2]), a.dtype.type(zeros[2])]
    return _one_node(op, {"a": a, "b": b}, ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], dict(zip(names, values)))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.integers(0, 2**31), st.booleans(), st.lists(st.floats(-16, 4), min_size=3, max_size=3))
def test_add_and_mul_arithmetic_equal_onnxruntime(seed, signed, log_scales):
    """arith's statement of QLinearAdd (its float32 constant, two fused multiply-adds) and QLinearMul (the zero
    point added in float32) against the engine, over scales from 2^-16 to 2^4 and drawn zero points, on every
    pair of input codes (the rare near-ties where a rounding of the constant shows)."""
    rng = np.random.default_rng(seed)
    dtype, (lo, hi) = (np.int8, (-128, 127)) if signed else (np.uint8, (0, 255))
    scales = [np.float32(2.0 ** v) for v in log_scales]
    zeros = [int(z) for z in rng.integers(lo, hi + 1, 3)]
    a, b = (codes.reshape(1, 256, 256).astype(dtype) for codes in np.meshgrid(np.arange(lo, hi + 1),
                                                                              np.arange(lo, hi + 1)))
    ratios = [np.float32(s) / scales[2] for s in scales[:2]]
    added = np.clip(arith.add_float32_fma(a.astype(np.int64), b.astype(np.int64), *ratios, *zeros), lo, hi)
    product = (a.astype(np.int64) - zeros[0]) * (b.astype(np.int64) - zeros[1])
    factor = arith.engine_real(scales[0], scales[1], scales[2], "float32")
    multiplied = np.clip(arith.mul_float32_zero_point(product, factor, zeros[2]), lo, hi)
    differ = {"add arithmetic": int((added != _qlinear("QLinearAdd", a, b, scales, zeros)).sum()),
              "mul arithmetic": int((multiplied != _qlinear("QLinearMul", a, b, scales, zeros)).sum())}
    for key, bad in differ.items():
        TALLY.add(key, a.size, bad)
    assert differ == {"add arithmetic": 0, "mul arithmetic": 0}


@st.composite
def pools(draw):
    """(height, width, kernel, stride, padding, count_include_pad): windows of every placement, and a window
    over the whole input (which onnxruntime computes as a global pool)."""
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    if draw(st.integers(0, 4)) == 0:
        return h, w, [h, w], [1, 1], [0, 0, 0, 0], draw(st.booleans())
    kernel = [draw(st.integers(1, min(h, 4))), draw(st.integers(1, min(w, 4)))]
    padding = [draw(st.integers(0, k - 1)) for k in kernel * 2]
    return h, w, kernel, [draw(st.integers(1, 3)), draw(st.integers(1, 3))], padding, draw(st.booleans())


@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.integers(0, 2**31), st.booleans(), st.lists(st.floats(-12, 4), min_size=2, max_size=2), pools())
def test_average_pool_arithmetic_equals_onnxruntime(seed, signed, log_scales, pool):
    """arith.average_float32 (QLinearAveragePool: float32 dequantized values, summed and divided in float32)
    against the engine, over scales from 2^-12 to 2^4, drawn zero points and every window placement."""
    h, w, kernel, stride, padding, count_include_pad = pool
    rng = np.random.default_rng(seed)
    dtype, (lo, hi) = (np.int8, (-128, 127)) if signed else (np.uint8, (0, 255))
    scales = [np.float32(2.0 ** v) for v in log_scales]
    zeros = [dtype(z) for z in rng.integers(lo, hi + 1, 2)]
    x = np.concatenate([rng.integers(lo, hi + 1, (6, 4, h, w)), np.full((1, 4, h, w), hi),
                        np.full((1, 4, h, w), lo)]).astype(dtype)
    ours = np.clip(arith.average_float32(x, scales[0], int(zeros[0]), scales[1], int(zeros[1]), kernel, stride,
                                         padding, count_include_pad), lo, hi)
    theirs = _one_node("QLinearAveragePool", {"x": x}, ["x", "sx", "zx", "sy", "zy"],
                       {"sx": scales[0], "zx": zeros[0], "sy": scales[1], "zy": zeros[1]}, kernel_shape=kernel,
                       strides=stride, pads=padding, count_include_pad=int(count_include_pad))
    bad = int((ours != theirs).sum())
    TALLY.add("avgpool2d arithmetic", ours.size, bad)
    assert bad == 0


def test_fma_float32_rounds_the_exact_value_once():
    """A float32 tie rounds to even; where the float64 sum is not exact (terms 54 bits apart) and lands on a
    float32 midpoint, the exact value (above it here) decides."""
    assert arith.fma_float32(1, np.float32(2.0**-24), np.float32(1.0)) == np.float32(1.0)
    # 2 + 2^-23 + 2^-52: float64 rounds it to the midpoint 2 + 2^-23, the exact value is above it
    assert arith.fma_float32(2**29 + 1, np.float32(2.0**-52), np.float32(2.0)) == np.nextafter(np.float32(2), np.float32(3))
    assert arith.fma_float32(-(2**29 + 1), np.float32(2.0**-52), np.float32(-2.0)) == -np.nextafter(np.float32(2), np.float32(3))


def test_int8_activation_qdq_that_onnxruntime_runs_in_float_is_one_line():
    """onnxruntime turns int8 QDQ convolutions into uint8 ones (exactly), but runs a residual add of them in float."""
    net = FloatNet(3, 8, 0)
    x = net.conv("input", 4, 3, activation="relu")
    model = quantize(net.to_bytes(net.head(net.add(x, net.conv(x, 4, 3)), 3)),
                     np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32), "QDQ", "QInt8")
    with pytest.raises(QftsimError, match=r"runs Add.* in float .*QuantType.QUInt8") as info:
        from_onnx(model, PROFILE)
    assert "\n" not in str(info.value)


def test_linear_resize_of_codes_is_refused_as_onnxruntime_computes_it_two_ways():
    """onnxruntime's linear Resize of uint8 codes: one result in NCHW (float32 weights), another where its default
    optimizer moves it to NHWC behind a QLinearConv (integer weights): no one arithmetic to import."""
    import onnxruntime as ort

    net = FloatNet(3, 6, 0)
    x = net.conv("input", 8, 3, activation="relu")
    n, c, h, w = net.shape[x]
    (y,) = net.op("Resize", [x, "", net.const([1, 1, 3, 3])], (n, c, 3 * h, 3 * w), mode="linear")
    model = quantize(net.to_bytes(y), np.random.default_rng(0).standard_normal((8, 3, 6, 6)).astype(np.float32),
                     "QOperator")
    images = np.random.default_rng(1).standard_normal((16, 3, 6, 6)).astype(np.float32)
    results = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level, options.intra_op_num_threads = level, 1
        engine = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        results.append(np.concatenate([engine.run(None, {"input": image[None]})[0] for image in images]))
    assert not np.array_equal(*results)
    with pytest.raises(QftsimError, match=r"linear resize .*NHWC") as info:
        from_onnx(model, PROFILE)
    assert "\n" not in str(info.value)


def test_unsupported_ops_and_files_are_one_line(tmp_path):
    net = FloatNet(3, 8, 0)
    x = net.op("Softmax", [net.conv("input", 4, 3)], (1, 4, 8, 8), axis=1)[0]
    model = quantize(net.to_bytes(net.head(x, 3)), np.random.default_rng(0).standard_normal((4, 3, 8, 8))
                     .astype(np.float32), "QOperator")
    with pytest.raises(QftsimError, match=r"(Softmax|in float).*") as info:
        from_onnx(model, PROFILE)
    assert "\n" not in str(info.value)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07not a model")
    with pytest.raises(QftsimError, match="not an ONNX model|cannot load"):
        from_onnx(junk, PROFILE)


def test_cli_imports_an_onnx_model_with_its_default_profile(tmp_path, capsys):
    from qftsim import intmodel
    from qftsim.cli import main

    net = FloatNet(3, 8, 1)
    model = quantize(net.to_bytes(net.head(net.conv("input", 4, 3, activation="relu"), 5)),
                     np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32))
    (tmp_path / "net.onnx").write_bytes(model)
    assert main(["import", str(tmp_path / "net.onnx"), "-o", str(tmp_path / "net.qft")]) == 0
    assert "for onnxruntime-cpu" in capsys.readouterr().out
    assert intmodel.load(tmp_path / "net.qft").profile.name == PROFILE


# ---------------------------------------------------------------- export: qftsim writes, onnxruntime runs

@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(networks())
def test_exported_onnx_runs_in_onnxruntime_to_the_simulators_integers(network):
    """An IntModel (imported from a generated network) written by export.onnx runs in onnxruntime to what the
    simulator computes, every tensor; the writer checked that the file imports back to the model's nodes."""
    from export.onnx import to_onnx

    float_model, shape, seed = network
    rng = np.random.default_rng(seed)
    int_model = from_onnx(quantize(float_model, rng.standard_normal((8, *shape[1:])).astype(np.float32)), PROFILE)
    assume(min([i.quant.scale for i in int_model.inputs] + [n.quant.scale for n in int_model.nodes]) > 1e-6)
    x = edge_inputs(shape, rng, int_model.inputs[0].quant.zero_point)
    assert compare_with_onnxruntime(to_onnx(int_model), x, EXPORT_TALLY) == 0


@pytest.mark.parametrize("network", ["resnet", "mobilenetv2"])
def test_qft_model_exported_gives_onnxruntime_the_simulators_logits(tmp_path, capsys, network):
    """A QFT-trained network on onnxruntime-cpu, written by `qftsim export --format onnx`: onnxruntime, fed the
    float images, gives the simulator's logits (dequantized: equal floats are equal integers)."""
    import torch

    from qftsim.cli import main
    from qftsim.qft import quantize_graph
    from qftsim.zoo import REFERENCE_NETWORKS, load_mnist

    torch.manual_seed(0)
    x_train, _, x_test, _ = load_mnist()
    qgraph, _ = quantize_graph(REFERENCE_NETWORKS[network]().eval(), x_train[:128], PROFILE, epochs=1,
                               dataset_size=128, progress=False)
    int_model = qgraph.integerize()
    int_model.save(tmp_path / "m.qft")
    assert main(["export", str(tmp_path / "m.qft"), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]) == 0
    assert PROFILE in capsys.readouterr().out
    q_in, q_out = int_model.inputs[0].quant, int_model.quant_of(int_model.outputs[0])
    codes = q_in.quantize(x_test[:32].numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccumulatorOverflowWarning)
        ours = simulate(int_model, codes).outputs[int_model.outputs[0]]
    engine = session((tmp_path / "m.onnx").read_bytes())
    real = (codes.astype(np.float32) - q_in.zero_point) * np.float32(q_in.scale)
    (theirs,) = engine.run(None, {"input": real})  # the exported model takes a batch
    mine = (ours.astype(np.float32) - q_out.zero_point) * np.float32(q_out.scale)
    assert np.array_equal(mine.reshape(theirs.shape), theirs)
    EXPORT_TALLY.add(f"qft {network} logits", theirs.size, int((mine.reshape(theirs.shape) != theirs).sum()))


def test_export_refuses_what_onnxruntime_would_compute_otherwise():
    """One line each: a profile onnxruntime does not run (the field named), an op it has no integer kernel for."""
    from export.onnx import to_onnx
    from qftsim.intmodel import IntModel, Node

    net = FloatNet(3, 8, 2)
    int_model = from_onnx(quantize(net.to_bytes(net.head(net.conv("input", 4, 3), 3)),
                                   np.random.default_rng(2).standard_normal((4, 3, 8, 8)).astype(np.float32)), PROFILE)
    from qftsim.profile import HardwareProfile

    other = load_profile(PROFILE).to_dict()
    other["name"], other["arithmetic"]["conv2d"]["rounding"] = "mine", "half_away"
    with pytest.raises(QftsimError, match=r"profile mine: onnxruntime cannot run it: arithmetic\.conv2d\.rounding "
                                          r"is 'half_away'"):
        to_onnx(IntModel(HardwareProfile.from_dict(other), int_model.inputs, int_model.nodes, int_model.outputs))
    first = int_model.nodes[0]
    spread = Node("spread", "zero_insert", [first.name], first.quant, {"stride": [2, 2]})
    with pytest.raises(QftsimError, match="zero_insert") as info:
        to_onnx(IntModel(int_model.profile, int_model.inputs, [first, spread], ["spread"]))
    assert "\n" not in str(info.value)
    net = FloatNet(3, 8, 3)
    x = net.conv("input", 4, 3)
    residual = from_onnx(quantize(net.to_bytes(net.head(net.add(x, net.conv(x, 4, 3)), 3)),
                                  np.random.default_rng(3).standard_normal((4, 3, 8, 8)).astype(np.float32)), PROFILE)
    nodes = list(residual.nodes)
    k = next(i for i, n in enumerate(nodes) if n.op == "add")
    ratios = list(nodes[k].attrs["input_multipliers"])
    ratios[0] += 1  # a ratio onnxruntime does not derive from the tensors' float32 scales
    nodes[k] = Node(nodes[k].name, "add", nodes[k].inputs, nodes[k].quant,
                    {**nodes[k].attrs, "input_multipliers": ratios})
    with pytest.raises(QftsimError, match=r"onnxruntime would derive other input_multipliers") as info:
        to_onnx(IntModel(residual.profile, residual.inputs, nodes, residual.outputs))
    assert "\n" not in str(info.value)


def _report(tally: Tally, direction: str, capsys) -> None:
    with capsys.disabled():
        for key in sorted(tally.compared):
            print(f"\n{direction} onnxruntime-cpu {key:22s} compared {tally.compared[key]:9d} differ "
                  f"{tally.differ[key]}", end="")
    assert sum(tally.differ.values()) == 0


def test_report_per_op(capsys):
    """Prints what the run compared (the issue's table): elements compared and differing, per op and direction."""
    _report(TALLY, "import", capsys)
    _report(EXPORT_TALLY, "export", capsys)


def test_demo_ends_in_an_onnx_model_that_onnxruntime_verifies(tmp_path, capsys):
    """`qftsim demo --format onnx`: the QFT model written as .onnx, run by onnxruntime, equals the simulator."""
    import json
    import re

    from qftsim.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--profile", PROFILE, "--network", "resnet", "--epochs", "1", "--format", "onnx",
                 "--out", str(out), "--quiet"]) == 0
    assert re.search(r"onnxruntime == simulator +yes, every output", capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine_equals_simulator"] and (out / "model.onnx").is_file()
    assert main(["demo", "--profile", PROFILE, "--network", "resnet", "--format", "tvm", "--out",
                 str(tmp_path / "tvm"), "--quiet"]) != 0  # refused before training, in one line
    err = capsys.readouterr().err
    assert "no TVM lowering yet" in err and "--format onnx" in err and len(err.strip().splitlines()) == 1
