"""Float TFLite models built op by op with LiteRT's schema module, quantized by ai-edge-quantizer.

The conformance tests need int8 .tflite files that an outside converter
made, not qftsim: this module writes a float model (NHWC, as TFLite lays
it out) and hands it to ai-edge-quantizer's static W8A8 min-max route, the
route its users take. Random weights; the calibration batch fixes the ranges.
"""

from __future__ import annotations

import numpy as np

from ai_edge_litert import schema_py_generated as fb

import flatbuffers

OPS = fb.BuiltinOperator
ACTIVATIONS = {None: fb.ActivationFunctionType.NONE, "relu": fb.ActivationFunctionType.RELU,
               "relu6": fb.ActivationFunctionType.RELU6, "relu_n1_to_1": fb.ActivationFunctionType.RELU_N1_TO_1}


def _same_pads(size: int, kernel: int, stride: int) -> int:
    return max((-(-size // stride) - 1) * stride + kernel - size, 0)


def _out_size(size: int, kernel: int, stride: int, padding: str) -> int:
    return -(-size // stride) if padding == "same" else (size - kernel) // stride + 1


class FloatModel:
    """A float TFLite graph under construction; each method adds one op and returns its output tensor."""

    def __init__(self, input_shape: tuple[int, ...], seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.tensors: list = []
        self.shapes: list[tuple[int, ...]] = []
        self.buffers = [fb.BufferT()]
        self.ops: list = []
        self.codes: list[int] = []
        self.input = self._tensor(tuple(input_shape), name="input")

    def _tensor(self, shape, data: np.ndarray | None = None, name: str | None = None,
                dtype=fb.TensorType.FLOAT32) -> int:
        t = fb.TensorT()
        t.shape = list(shape)
        t.type = dtype
        t.name = name or f"t{len(self.tensors)}"
        t.buffer = 0
        if data is not None:
            buf = fb.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        self.tensors.append(t)
        self.shapes.append(tuple(shape))
        return len(self.tensors) - 1

    def _op(self, code: int, inputs: list[int], out_shape, options_type=0, options=None) -> int:
        return self._multi_op(code, inputs, [out_shape], options_type, options)[0]

    def _multi_op(self, code: int, inputs: list[int], out_shapes, options_type=0, options=None) -> list[int]:
        if code not in self.codes:
            self.codes.append(code)
        outs = [self._tensor(shape) for shape in out_shapes]
        op = fb.OperatorT()
        op.opcodeIndex = self.codes.index(code)
        op.inputs, op.outputs = list(inputs), outs
        op.builtinOptionsType, op.builtinOptions = options_type, options
        self.ops.append(op)
        return outs

    def _int32(self, values) -> int:
        values = np.asarray(values, dtype=np.int32)
        return self._tensor(values.shape, values, dtype=fb.TensorType.INT32)

    def _weights(self, shape, fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * (1.5 / np.sqrt(fan_in))).astype(np.float32)

    def conv(self, x: int, out_channels: int, kernel: int, stride: int = 1, padding: str = "same",
             activation: str | None = None) -> int:
        n, h, w, c = self.shapes[x]
        weight = self._tensor((out_channels, kernel, kernel, c), self._weights((out_channels, kernel, kernel, c),
                                                                                kernel * kernel * c))
        bias = self._tensor((out_channels,), (self.rng.standard_normal(out_channels) * 0.3).astype(np.float32))
        opt = fb.Conv2DOptionsT()
        opt.padding = fb.Padding.SAME if padding == "same" else fb.Padding.VALID
        opt.strideH = opt.strideW = stride
        opt.dilationHFactor = opt.dilationWFactor = 1
        opt.fusedActivationFunction = ACTIVATIONS[activation]
        shape = (n, _out_size(h, kernel, stride, padding), _out_size(w, kernel, stride, padding), out_channels)
        return self._op(fb.BuiltinOperator.CONV_2D, [x, weight, bias], shape, fb.BuiltinOptions.Conv2DOptions, opt)

    def depthwise(self, x: int, kernel: int, stride: int = 1, padding: str = "same",
                  activation: str | None = None) -> int:
        n, h, w, c = self.shapes[x]
        weight = self._tensor((1, kernel, kernel, c), self._weights((1, kernel, kernel, c), kernel * kernel))
        bias = self._tensor((c,), (self.rng.standard_normal(c) * 0.3).astype(np.float32))
        opt = fb.DepthwiseConv2DOptionsT()
        opt.padding = fb.Padding.SAME if padding == "same" else fb.Padding.VALID
        opt.strideH = opt.strideW = stride
        opt.depthMultiplier = 1
        opt.dilationHFactor = opt.dilationWFactor = 1
        opt.fusedActivationFunction = ACTIVATIONS[activation]
        shape = (n, _out_size(h, kernel, stride, padding), _out_size(w, kernel, stride, padding), c)
        return self._op(fb.BuiltinOperator.DEPTHWISE_CONV_2D, [x, weight, bias], shape,
                        fb.BuiltinOptions.DepthwiseConv2DOptions, opt)

    def fully_connected(self, x: int, out_features: int, activation: str | None = None) -> int:
        n, features = self.shapes[x]
        weight = self._tensor((out_features, features), self._weights((out_features, features), features))
        bias = self._tensor((out_features,), (self.rng.standard_normal(out_features) * 0.3).astype(np.float32))
        opt = fb.FullyConnectedOptionsT()
        opt.fusedActivationFunction = ACTIVATIONS[activation]
        return self._op(fb.BuiltinOperator.FULLY_CONNECTED, [x, weight, bias], (n, out_features),
                        fb.BuiltinOptions.FullyConnectedOptions, opt)

    def add(self, a: int, b: int, activation: str | None = None) -> int:
        opt = fb.AddOptionsT()
        opt.fusedActivationFunction = ACTIVATIONS[activation]
        return self._op(fb.BuiltinOperator.ADD, [a, b], self.shapes[a], fb.BuiltinOptions.AddOptions, opt)

    def pool(self, x: int, kind: str, kernel: int, stride: int, padding: str = "valid") -> int:
        n, h, w, c = self.shapes[x]
        opt = fb.Pool2DOptionsT()
        opt.padding = fb.Padding.SAME if padding == "same" else fb.Padding.VALID
        opt.strideH = opt.strideW = stride
        opt.filterHeight = opt.filterWidth = kernel
        code = fb.BuiltinOperator.AVERAGE_POOL_2D if kind == "avg" else fb.BuiltinOperator.MAX_POOL_2D
        shape = (n, _out_size(h, kernel, stride, padding), _out_size(w, kernel, stride, padding), c)
        return self._op(code, [x], shape, fb.BuiltinOptions.Pool2DOptions, opt)

    def mean(self, x: int) -> int:
        """Mean over height and width, keeping neither (global average pooling)."""
        n, h, w, c = self.shapes[x]
        axes = self._tensor((2,), np.array([1, 2], dtype=np.int32), dtype=fb.TensorType.INT32)
        opt = fb.ReducerOptionsT()
        opt.keepDims = False
        return self._op(fb.BuiltinOperator.MEAN, [x, axes], (n, c), fb.BuiltinOptions.ReducerOptions, opt)

    def concat(self, xs: list[int]) -> int:
        opt = fb.ConcatenationOptionsT()
        opt.axis = 3
        shape = self.shapes[xs[0]][:3] + (sum(self.shapes[x][3] for x in xs),)
        return self._op(fb.BuiltinOperator.CONCATENATION, xs, shape, fb.BuiltinOptions.ConcatenationOptions, opt)

    def pad(self, x: int, pads: list[int]) -> int:
        """Zero padding of height and width: pads = [top, bottom, left, right]."""
        n, h, w, c = self.shapes[x]
        top, bottom, left, right = pads
        spec = self._tensor((4, 2), np.array([[0, 0], [top, bottom], [left, right], [0, 0]], dtype=np.int32),
                            dtype=fb.TensorType.INT32)
        return self._op(fb.BuiltinOperator.PAD, [x, spec], (n, h + top + bottom, w + left + right, c),
                        fb.BuiltinOptions.PadOptions, fb.PadOptionsT())

    def unary(self, x: int, code: int) -> int:
        """An op of one input and no options that keeps the shape (LOGISTIC, HARD_SWISH, SOFTMAX, ...)."""
        options = (fb.BuiltinOptions.SoftmaxOptions, fb.SoftmaxOptionsT()) if code == OPS.SOFTMAX else (0, None)
        if code == OPS.SOFTMAX:
            options[1].beta = 1.0
        return self._op(code, [x], self.shapes[x], *options)

    def mul(self, a: int, b: int, activation: str | None = None) -> int:
        """a * b, b broadcast to a's shape (a (1, 1, 1, C) gate, say)."""
        opt = fb.MulOptionsT()
        opt.fusedActivationFunction = ACTIVATIONS[activation]
        shape = tuple(np.broadcast_shapes(self.shapes[a], self.shapes[b]))
        return self._op(fb.BuiltinOperator.MUL, [a, b], shape, fb.BuiltinOptions.MulOptions, opt)

    def split(self, x: int, axis: int, parts: int) -> list[int]:
        opt = fb.SplitOptionsT()
        opt.numSplits = parts
        shape = list(self.shapes[x])
        shape[axis] //= parts
        return self._multi_op(fb.BuiltinOperator.SPLIT, [self._int32(axis), x], [tuple(shape)] * parts,
                              fb.BuiltinOptions.SplitOptions, opt)

    def strided_slice(self, x: int, begin: list[int], end: list[int]) -> int:
        """x[begin:end] at stride 1 on every axis (negative ends count from the back)."""
        shape = tuple(len(range(*slice(b, e).indices(n))) for b, e, n in zip(begin, end, self.shapes[x]))
        return self._op(fb.BuiltinOperator.STRIDED_SLICE, [x, self._int32(begin), self._int32(end),
                                                           self._int32([1] * len(begin))], shape,
                        fb.BuiltinOptions.StridedSliceOptions, fb.StridedSliceOptionsT())

    def resize(self, x: int, mode: str, size: tuple[int, int], half_pixel: bool = True,
               align_corners: bool = False) -> int:
        n, _, _, c = self.shapes[x]
        if mode == "nearest":
            code, opt = fb.BuiltinOperator.RESIZE_NEAREST_NEIGHBOR, fb.ResizeNearestNeighborOptionsT()
            options = fb.BuiltinOptions.ResizeNearestNeighborOptions
        else:
            code, opt = fb.BuiltinOperator.RESIZE_BILINEAR, fb.ResizeBilinearOptionsT()
            options = fb.BuiltinOptions.ResizeBilinearOptions
        opt.halfPixelCenters, opt.alignCorners = half_pixel, align_corners
        return self._op(code, [x, self._int32(size)], (n, *size, c), options, opt)

    def transpose_conv(self, x: int, out_channels: int, kernel: int, stride: int, padding: str = "same",
                       activation: str | None = None) -> int:
        """TRANSPOSE_CONV (output size in * stride for SAME, (in - 1) * stride + kernel for VALID)."""
        n, h, w, c = self.shapes[x]
        size = [v * stride if padding == "same" else (v - 1) * stride + kernel for v in (h, w)]
        weight = self._tensor((out_channels, kernel, kernel, c),
                              self._weights((out_channels, kernel, kernel, c), kernel * kernel * c / stride**2))
        bias = self._tensor((out_channels,), (self.rng.standard_normal(out_channels) * 0.3).astype(np.float32))
        opt = fb.TransposeConvOptionsT()
        opt.padding = fb.Padding.SAME if padding == "same" else fb.Padding.VALID
        opt.strideH = opt.strideW = stride
        opt.fusedActivationFunction = ACTIVATIONS[activation]
        return self._op(fb.BuiltinOperator.TRANSPOSE_CONV, [self._int32([n, *size, out_channels]), weight, x, bias],
                        (n, *size, out_channels), fb.BuiltinOptions.TransposeConvOptions, opt)

    def flatten(self, x: int) -> int:
        shape = self.shapes[x]
        target = self._tensor((2,), np.array([shape[0], int(np.prod(shape[1:]))], dtype=np.int32),
                              dtype=fb.TensorType.INT32)
        opt = fb.ReshapeOptionsT()
        opt.newShape = [shape[0], int(np.prod(shape[1:]))]
        return self._op(fb.BuiltinOperator.RESHAPE, [x, target], (shape[0], int(np.prod(shape[1:]))),
                        fb.BuiltinOptions.ReshapeOptions, opt)

    def to_bytes(self, output: int) -> bytes:
        """The float model with one signature ("serving_default": input -> output), as the quantizer needs."""
        sub = fb.SubGraphT()
        sub.tensors, sub.operators = self.tensors, self.ops
        sub.inputs, sub.outputs = [self.input], [output]
        sub.name = "main"
        self.tensors[output].name = "output"
        model = fb.ModelT()
        model.version = 3
        model.subgraphs = [sub]
        model.buffers = self.buffers
        model.operatorCodes = []
        for code in self.codes:
            oc = fb.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.version = 1
            model.operatorCodes.append(oc)
        sig = fb.SignatureDefT()
        sig.signatureKey = "serving_default"
        sig.inputs = [_tensor_map("input", self.input)]
        sig.outputs = [_tensor_map("output", output)]
        model.signatureDefs = [sig]
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _tensor_map(name: str, index: int):
    m = fb.TensorMapT()
    m.name, m.tensorIndex = name, index
    return m


def quantize_int8(float_model: bytes, calibration: np.ndarray) -> bytes:
    """ai-edge-quantizer's static W8A8 min-max quantization of a float model (int8 at the edges too)."""
    from ai_edge_quantizer import quantizer, recipe

    q = quantizer.Quantizer(bytearray(float_model), recipe.static_wi8_ai8())
    samples = [{"input": calibration[i:i + 1].astype(np.float32)} for i in range(len(calibration))]
    result = q.calibrate({"serving_default": samples}, num_threads=1)
    return bytes(q.quantize(result, enable_progress_report=False).quantized_model)


def _fixture_mixed(seed: int) -> tuple[FloatModel, int]:
    """conv, depthwise stride 2, 1x1 conv, residual add, HARD_SWISH, LOGISTIC, SAME average pool, max pool,
    mean, fc."""
    m = FloatModel((1, 12, 12, 5), seed)
    x = m.unary(m.conv(m.input, 16, 3, 1, "same"), OPS.HARD_SWISH)
    y = m.depthwise(x, 3, 2, "same", "relu6")
    s = m.unary(m.add(y, m.conv(y, 16, 1, 1, "same"), "relu"), OPS.LOGISTIC)
    p = m.pool(m.pool(s, "avg", 3, 1, "same"), "max", 2, 2, "valid")
    return m, m.fully_connected(m.mean(p), 10)


def _fixture_padded(seed: int) -> tuple[FloatModel, int]:
    """PAD folded into a VALID conv, RELU_N1_TO_1, channel concat, a flatten of (H, W, C) into an fc."""
    m = FloatModel((1, 9, 7, 3), seed)
    x = m.conv(m.pad(m.input, [1, 2, 0, 1]), 6, 3, 1, "valid", "relu_n1_to_1")
    c = m.concat([m.conv(x, 2, 1, 1, "same", "relu"), m.depthwise(x, 5, 1, "same")])
    d = m.conv(c, 4, 5, 2, "same", "relu6")
    return m, m.fully_connected(m.flatten(d), 7, "relu")


def _fixture_single_channel(seed: int) -> tuple[FloatModel, int]:
    """One input channel (a depthwise conv on it: the same sums as a dense one, rounded by the depthwise kernel),
    odd sizes, kernel 5 at stride 2, VALID pools, ReLU6 with a clamp that bites."""
    m = FloatModel((1, 11, 13, 1), seed)
    x = m.conv(m.depthwise(m.input, 5, 1, "same"), 3, 5, 2, "valid", "relu6")
    x = m.pool(m.depthwise(x, 3, 1, "valid", "relu6"), "avg", 2, 1, "valid")
    return m, m.add(x, m.conv(x, 3, 1, 1, "same"))


def _fixture_wide(seed: int) -> tuple[FloatModel, int]:
    """Many outputs per op, so that ties (where rounding rules differ) are common: a wide mean, a wide fc."""
    m = FloatModel((1, 12, 12, 8), seed)
    x = m.conv(m.input, 32, 3, 1, "same")
    s = m.add(x, m.conv(x, 32, 1, 1, "same"))
    d = m.pool(m.depthwise(s, 3, 1, "same"), "avg", 2, 2, "valid")
    wide = m.conv(m.pool(d, "avg", 2, 1, "valid"), 96, 1, 1, "same")  # a mean over 5 x 5
    return m, m.fully_connected(m.mean(wide), 300)


def _fixture_decoder(seed: int) -> tuple[FloatModel, int]:
    """The ops of squeeze-excite nets, detectors and decoders: a MUL by a broadcast LOGISTIC gate, TANH, SPLIT,
    STRIDED_SLICE, nearest and bilinear RESIZE, TRANSPOSE_CONV with 12 output channels (TFLite's optimized
    kernel rounds a block of 8 one way and the other 4 another)."""
    m = FloatModel((1, 8, 8, 6), seed)
    x = m.conv(m.input, 12, 3, 2, "same", "relu")  # 4 x 4 x 12
    gate = m.unary(m.conv(m.pool(x, "avg", 4, 4), 12, 1), OPS.LOGISTIC)  # 1 x 1 x 12
    a, b = m.split(m.unary(m.mul(x, gate), OPS.TANH), 3, 2)
    up = m.resize(m.strided_slice(a, [0, 1, 0, 0], [1, 4, 4, 5]), "nearest", (6, 8), half_pixel=False)
    t = m.strided_slice(m.transpose_conv(b, 12, 3, 2, "same"), [0, 1, 0, 0], [1, 7, 8, 12])  # 6 x 8
    y = m.add(m.conv(up, 12, 3), m.conv(t, 12, 1))
    z = m.add(y, m.conv(m.resize(b, "bilinear", (6, 8)), 12, 1))
    return m, m.fully_connected(m.mean(z), 10)


FIXTURES = {"wide": _fixture_wide, "mixed": _fixture_mixed, "padded": _fixture_padded,
            "single_channel": _fixture_single_channel, "decoder": _fixture_decoder}


def write_fixtures(folder) -> None:
    """Regenerate tests/fixtures/litert/*.tflite (python -m tests.tflite_models)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (name, build) in enumerate(FIXTURES.items()):
        m, out = build(seed)
        calibration = np.random.default_rng(seed).standard_normal((16, *m.shapes[m.input][1:])).astype(np.float32)
        (folder / f"{name}.tflite").write_bytes(quantize_int8(m.to_bytes(out), calibration))


if __name__ == "__main__":
    from pathlib import Path

    write_fixtures(Path(__file__).parent / "fixtures" / "litert")
