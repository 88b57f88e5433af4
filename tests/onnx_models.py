"""Float ONNX networks for the onnxruntime conformance tests, written with onnx.helper, and their int8 versions
made by onnxruntime.quantization.quantize_static (what an onnxruntime user runs)."""

from __future__ import annotations

import numpy as np


class FloatNet:
    """A small NCHW float graph under construction (one input, one output), weights from a seeded generator."""

    def __init__(self, channels: int, size: int, seed: int):
        from onnx import TensorProto, helper

        self.helper, self.tp = helper, TensorProto
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], [], 0
        self.shape = {"input": (1, channels, size, size)}
        self.input = helper.make_tensor_value_info("input", TensorProto.FLOAT, self.shape["input"])

    def _name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def const(self, value: np.ndarray, dtype=np.float32) -> str:
        from onnx import numpy_helper

        name = self._name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, kind: str, inputs: list[str], shape: tuple[int, ...], outputs: int = 1, **attrs) -> list[str]:
        names = [self._name(kind.lower()) for _ in range(outputs)]
        self.nodes.append(self.helper.make_node(kind, inputs, names, **attrs))
        for n in names:
            self.shape[n] = shape
        return names

    def pad(self, x: str, top: int, left: int, bottom: int, right: int) -> str:
        """A zero Pad of height and width (as torch exports ZeroPad2d)."""
        n, c, h, w = self.shape[x]
        pads = self.const([0, 0, top, left, 0, 0, bottom, right], np.int64)
        return self.op("Pad", [x, pads, self.const(0.0)], (n, c, h + top + bottom, w + left + right), mode="constant")[0]

    def conv(self, x: str, out_channels: int, kernel: int, stride: int = 1, depthwise: bool = False,
             activation: str | None = None, same: bool = True) -> str:
        n, c, h, w = self.shape[x]
        groups = c if depthwise else 1
        out_channels = c if depthwise else out_channels
        weight = self.rng.standard_normal((out_channels, c // groups, kernel, kernel)) / np.sqrt(c // groups * kernel ** 2)
        pad = kernel // 2 if same else 0
        ho, wo = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
        (y,) = self.op("Conv", [x, self.const(weight), self.const(self.rng.standard_normal(out_channels) * 0.1)],
                       (n, out_channels, ho, wo), kernel_shape=[kernel, kernel], strides=[stride, stride],
                       pads=[pad] * 4, group=groups)
        return self.activation(y, activation)

    def activation(self, x: str, kind: str | None) -> str:
        if kind == "relu":
            return self.op("Relu", [x], self.shape[x])[0]
        if kind == "relu6":
            return self.op("Clip", [x, self.const(0.0), self.const(6.0)], self.shape[x])[0]
        if kind == "sigmoid":
            return self.op("Sigmoid", [x], self.shape[x])[0]
        if kind in ("tanh", "hardswish"):  # onnxruntime runs these in float between DequantizeLinear and QuantizeLinear
            return self.op({"tanh": "Tanh", "hardswish": "HardSwish"}[kind], [x], self.shape[x])[0]
        if kind == "leaky_relu":
            return self.op("LeakyRelu", [x], self.shape[x], alpha=0.1)[0]
        return x

    def add(self, a: str, b: str) -> str:
        return self.op("Add", [a, b], self.shape[a])[0]

    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", [a, b], tuple(np.broadcast_shapes(self.shape[a], self.shape[b])))[0]

    def global_pool(self, x: str) -> str:
        n, c = self.shape[x][:2]
        return self.op("GlobalAveragePool", [x], (n, c, 1, 1))[0]

    def maxpool(self, x: str, kernel: int, stride: int, pad: int) -> str:
        n, c, h, w = self.shape[x]
        return self.op("MaxPool", [x], (n, c, (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1),
                       kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4)[0]

    def avgpool(self, x: str, kernel: int, stride: int, pad: int, count_include_pad: bool) -> str:
        n, c, h, w = self.shape[x]
        return self.op("AveragePool", [x], (n, c, (h + 2 * pad - kernel) // stride + 1,
                                            (w + 2 * pad - kernel) // stride + 1),
                       kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4,
                       count_include_pad=int(count_include_pad))[0]

    def concat(self, parts: list[str]) -> str:
        n, _, h, w = self.shape[parts[0]]
        return self.op("Concat", parts, (n, sum(self.shape[p][1] for p in parts), h, w), axis=1)[0]

    def split(self, x: str, parts: int) -> list[str]:
        n, c, h, w = self.shape[x]
        return self.op("Split", [x, self.const([c // parts] * parts, np.int64)], (n, c // parts, h, w), parts, axis=1)

    def slice_channels(self, x: str, start: int, stop: int) -> str:
        n, _, h, w = self.shape[x]
        return self.op("Slice", [x, self.const([start], np.int64), self.const([stop], np.int64),
                                 self.const([1], np.int64)], (n, stop - start, h, w))[0]

    def upsample(self, x: str) -> str:
        n, c, h, w = self.shape[x]
        return self.op("Resize", [x, "", self.const([1, 1, 2, 2])], (n, c, 2 * h, 2 * w), mode="nearest",
                       coordinate_transformation_mode="asymmetric", nearest_mode="floor")[0]

    def head(self, x: str, classes: int) -> str:
        flat = self.op("Flatten", [x], (1, int(np.prod(self.shape[x][1:]))), axis=1)[0]
        features = self.shape[flat][1]
        weight = self.rng.standard_normal((classes, features)) / np.sqrt(features)
        return self.op("Gemm", [flat, self.const(weight), self.const(self.rng.standard_normal(classes) * 0.1)],
                       (1, classes), transB=1)[0]

    def to_bytes(self, output: str) -> bytes:
        helper = self.helper
        graph = helper.make_graph(self.nodes, "net", [self.input],
                                  [helper.make_tensor_value_info(output, self.tp.FLOAT, self.shape[output])],
                                  self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model.SerializeToString()


def quantize(float_model: bytes, calibration: np.ndarray, quant_format: str = "QDQ",
             activations: str = "QUInt8") -> bytes:
    """quantize_static with per-channel int8 weights (onnxruntime's CPU recipe), min-max calibrated."""
    import os
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": sample[None]} for sample in calibration])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        source, target = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
        with open(source, "wb") as f:
            f.write(float_model)
        quantize_static(source, target, Reader(), quant_format=getattr(QuantFormat, quant_format),
                        activation_type=getattr(QuantType, activations), weight_type=QuantType.QInt8,
                        per_channel=True)
        with open(target, "rb") as f:
            return f.read()
