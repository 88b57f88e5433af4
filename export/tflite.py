"""An IntModel on a litert profile as a fully-int8 .tflite that LiteRT runs to the simulator's integers.

TFLite stores float32 scales and each engine derives its multipliers from
them, so the writer chooses per-channel weight scales whose derived
multipliers are the model's own (qftsim.importers.engine_multipliers, the
importer's function, solved for the weight scale). Every other multiplier
(ADD, MUL, MEAN) follows from the tensor scales alone. Before returning, the
file is imported again with the same profile and every node's integers,
multipliers and bounds are compared with the model's: a model LiteRT would
compute differently is refused in one line, never written.
"""

from __future__ import annotations

import flatbuffers
import numpy as np

from qftsim.errors import QftsimError
from export.engines import engine_weight_scales, node_differences, shipped_profile_of
from qftsim.importers import TABLE_OPS, _schema, _TfliteImporter, activation_bounds
from qftsim.intmodel import IntModel, Node, TensorQuant

ACTIVATIONS = ("none", "relu", "relu6", "relu_n1_to_1")
# the LiteRT interpreter's op resolver (ai_edge_litert.interpreter.OpResolverType) of each litert profile
RESOLVERS = {"litert-reference": "BUILTIN_REF", "litert-optimized": "BUILTIN_WITHOUT_DEFAULT_DELEGATES",
             "litert-xnnpack": "AUTO"}


def litert_profile_of(profile) -> str:
    """The shipped litert profile whose arithmetic `profile` is, or a one-line refusal naming the first field
    that keeps LiteRT's kernels from running it (measured against the closest litert profile)."""
    return shipped_profile_of(profile, "litert-", "LiteRT")


def to_tflite(model: IntModel) -> bytes:
    """The .tflite bytes that LiteRT (with the model's litert profile's kernels) runs to the model's integers."""
    litert_profile_of(model.profile)
    writer = _Writer(model)
    data = writer.build()
    writer.check_round_trip(data)
    return data


def run_tflite(data: bytes, profile: str, x: np.ndarray, channels_first: bool = False) -> np.ndarray:
    """The first output's integers of a .tflite, run by LiteRT with the profile's kernels on an IntModel's
    (batch, C, H, W) input integers (one sample at a time, as the file's batch is one), transposed to NHWC
    unless the file takes them channels first (litert-torch's models); a 4-D output comes back channels first."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_content=data, num_threads=2,
                              experimental_op_resolver_type=getattr(OpResolverType, RESOLVERS[profile]))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    results = []
    for sample in x:
        nhwc = sample.ndim == 3 and not channels_first
        interpreter.set_tensor(inp["index"], (sample.transpose(1, 2, 0) if nhwc else sample)[None])
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])[0]
        results.append(y.transpose(2, 0, 1) if y.ndim == 3 else y)
    return np.stack(results)


class _Writer:
    def __init__(self, model: IntModel):
        self.fb = _schema()
        self.model, self.profile = model, model.profile
        self.tensors, self.buffers, self.operators, self.codes = [], [self.fb.BufferT()], [], []
        self.index: dict[str, int] = {}  # IntModel tensor -> TFLite tensor
        self.consumers = {n.name: [c for c in model.nodes if n.name in c.inputs] for n in model.nodes}
        self.nodes = {n.name: n for n in model.nodes}
        self.hwc_flat: set[str] = set()  # reshapes whose consumers take TFLite's (H, W, C) flattening order

    # ------------------------------------------------------------ flatbuffer pieces

    def _fail(self, node: Node, message: str) -> QftsimError:
        return QftsimError(f"{node.name} ({node.op}): {message}; qftsim cannot write it as TFLite")

    def _shape(self, name: str) -> list[int]:
        """TFLite's NHWC shape of an IntModel tensor (batch 1)."""
        shape = self.model.shapes[name]
        return [1, shape[1], shape[2], shape[0]] if len(shape) == 3 else [1, *shape]

    def _tensor(self, shape, dtype, name: str, data: np.ndarray | None = None, scales=None, zero_points=None,
                axis: int = 0) -> int:
        t = self.fb.TensorT()
        t.shape, t.type, t.name, t.buffer = list(shape), dtype, name, 0
        if data is not None:
            buffer = self.fb.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            self.buffers.append(buffer)
            t.buffer = len(self.buffers) - 1
        if scales is not None:
            q = self.fb.QuantizationParametersT()
            q.scale = [float(v) for v in np.asarray(scales, dtype=np.float32).reshape(-1)]
            q.zeroPoint = [int(v) for v in np.broadcast_to(zero_points, (len(q.scale),))]
            q.quantizedDimension = axis
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def _activation(self, name: str, quant: TensorQuant) -> int:
        t = self._tensor(self._shape(name), self.fb.TensorType.INT8, name, scales=[quant.scale],
                         zero_points=[quant.zero_point])
        self.index[name] = t
        return t

    def _int32(self, values, name: str) -> int:
        values = np.asarray(values, dtype=np.int32)
        return self._tensor(values.shape, self.fb.TensorType.INT32, name, values)

    def _op(self, code_name: str, inputs: list[int], outputs: list[int], options_name: str | None = None,
            **options) -> None:
        code = getattr(self.fb.BuiltinOperator, code_name)
        if code not in self.codes:
            self.codes.append(code)
        op = self.fb.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = self.codes.index(code), inputs, outputs
        if options_name:
            opt = getattr(self.fb, f"{options_name}T")()
            for key, value in options.items():
                setattr(opt, key, value)
            op.builtinOptionsType, op.builtinOptions = getattr(self.fb.BuiltinOptions, options_name), opt
        self.operators.append(op)

    def _fused(self, node: Node, quant: TensorQuant | None = None) -> int:
        """The fused activation whose bounds are the node's clamp, or a refusal."""
        clamp = node.attrs.get("clamp") or [node.quant.qmin, node.quant.qmax]
        for activation in ACTIVATIONS:
            if activation_bounds(quant or node.quant, activation) == list(clamp):
                return getattr(self.fb.ActivationFunctionType, activation.upper())
        raise self._fail(node, f"its clamp {list(clamp)} is none of TFLite's fused activations (ReLU, ReLU6, "
                         "ReLU_N1_TO_1) on its output scale")

    # ------------------------------------------------------------ graph

    def build(self) -> bytes:
        fb, model = self.fb, self.model
        (inp,) = model.inputs
        if inp.quant.bits != 8 or not inp.quant.signed:
            raise QftsimError(f"{inp.name}: the input is not int8; qftsim writes fully-int8 TFLite")
        self._activation(inp.name, inp.quant)
        for node in model.nodes:
            if node.quant.bits != 8 or not node.quant.signed:
                raise self._fail(node, "its output is not int8")
            getattr(self, f"_write_{node.op}")(node)
        sub = fb.SubGraphT()
        sub.tensors, sub.operators, sub.name = self.tensors, self.operators, "main"
        sub.inputs, sub.outputs = [self.index[inp.name]], [self.index[o] for o in model.outputs]
        tflite = fb.ModelT()
        tflite.version, tflite.subgraphs, tflite.buffers = 3, [sub], self.buffers
        tflite.description = f"qftsim {model.hash} ({model.profile.name})"
        tflite.operatorCodes = []
        for code in self.codes:
            oc = fb.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1
            tflite.operatorCodes.append(oc)
        builder = flatbuffers.Builder(1024)
        builder.Finish(tflite.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    def check_round_trip(self, data: bytes) -> None:
        """Import the file with the model's profile: every node must come back with the model's integers."""
        importer = _TfliteImporter(data, self.profile, "<export>")
        try:
            back = importer.run()
            imported = {n.name: n for n in back.nodes}
        except QftsimError as exc:
            raise QftsimError(f"the written TFLite does not import back: {exc}") from None
        for node in self.model.nodes:
            if node.name not in self.index:  # fused into the next TFLite op (a zero_insert, a pool's clamp)
                continue
            theirs = imported[importer.tensor_of[self.index[node.name]]]
            if theirs.op == "reshape" and node.op == "mean":  # TFLite's keep_dims MEAN comes back with a reshape
                theirs = imported[theirs.inputs[0]]
            changed = node_differences(node, self.model.shapes[node.name], theirs, back.shapes[theirs.name])
            if changed:
                raise self._fail(node, f"LiteRT would derive other {', '.join(changed)} from "
                                 "the scales TFLite stores (the model was not made for this engine's arithmetic)")

    # ------------------------------------------------------------ ops

    def _conv_padding(self, node, in_hw, kernel, stride, dilation) -> str | None:
        """SAME or VALID where TFLite's own padding is the node's, else None."""
        if node.attrs["padding"] == [0, 0, 0, 0]:
            return "VALID"
        pads = []
        for size, k, s, d in zip(in_hw, kernel, stride, dilation):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        return "SAME" if node.attrs["padding"] == [pads[0][0], pads[1][0], pads[0][1], pads[1][1]] else None

    def _weights_and_bias(self, node, kind: str, weight_tflite: np.ndarray, axis: int, s_in: float):
        scales = engine_weight_scales(self.profile, node, kind, s_in)
        w = self._tensor(weight_tflite.shape, self.fb.TensorType.INT8, f"{node.name}/weight",
                         weight_tflite.astype(np.int8), scales, 0, axis)
        b = self._tensor(node.arrays["bias"].shape, self.fb.TensorType.INT32, f"{node.name}/bias",
                         node.arrays["bias"].astype(np.int32), np.float32(s_in) * scales, 0)
        return w, b

    def _write_conv2d(self, node: Node) -> None:
        a, (src,) = node.attrs, node.inputs
        q_in = self.model.quant_of(src)
        w = node.arrays["weight"]  # O, I/groups, kh, kw
        if a["transposed"]:
            self._write_transpose_conv(node)
            return
        c_in, h, wd = self.model.shapes[src]
        kernel = w.shape[2:]
        padding = self._conv_padding(node, (h, wd), kernel, a["stride"], a["dilation"])
        x = self.index[src]
        if padding is None:  # an explicit PAD of zero points before a VALID conv
            pt, pl, pb, pr = a["padding"]
            padded = self._tensor([1, h + pt + pb, wd + pl + pr, c_in], self.fb.TensorType.INT8, f"{node.name}/pad",
                                  scales=[q_in.scale], zero_points=[q_in.zero_point])
            spec = self._int32([[0, 0], [pt, pb], [pl, pr], [0, 0]], f"{node.name}/paddings")
            self._op("PAD", [x, spec], [padded], "PadOptions")
            x, padding = padded, "VALID"
        options = dict(padding=getattr(self.fb.Padding, padding), strideH=a["stride"][0], strideW=a["stride"][1],
                       dilationHFactor=a["dilation"][0], dilationWFactor=a["dilation"][1],
                       fusedActivationFunction=self._fused(node))
        if a["depthwise"]:
            weight, bias = self._weights_and_bias(node, "depthwise_conv2d", w.transpose(1, 2, 3, 0), 3, q_in.scale)
            out = self._activation(node.name, node.quant)
            self._op("DEPTHWISE_CONV_2D", [x, weight, bias], [out], "DepthwiseConv2DOptions",
                     depthMultiplier=w.shape[0] // c_in, **options)
        elif a["groups"] == 1:
            weight, bias = self._weights_and_bias(node, "conv2d", w.transpose(0, 2, 3, 1), 0, q_in.scale)
            out = self._activation(node.name, node.quant)
            self._op("CONV_2D", [x, weight, bias], [out], "Conv2DOptions", **options)
        else:
            raise self._fail(node, f"a grouped conv ({a['groups']} groups, not depthwise) has no TFLite op")

    def _write_transpose_conv(self, node: Node) -> None:
        spread = self.nodes.get(node.inputs[0])
        if spread is None or spread.op != "zero_insert" or node.attrs["stride"] != [1, 1] \
                or node.attrs["dilation"] != [1, 1] or node.attrs["groups"] != 1:
            raise self._fail(node, "a transposed conv is written from a zero_insert and a stride-1, undilated, "
                             "ungrouped conv")
        src = spread.inputs[0]
        (_, h, wd), (_, ho, wo) = self.model.shapes[src], self.model.shapes[node.name]
        w = node.arrays["weight"]
        kernel, stride = w.shape[2:], spread.attrs["stride"]
        chosen = None
        for padding in ("SAME", "VALID"):  # the importer's reading of each, compared with the node's padding
            pads, consistent = [], True
            for size, new, k, s in zip((h, wd), (ho, wo), kernel, stride):
                total = max((-(-new // s) - 1) * s + k - new, 0) if padding == "SAME" else 0
                before = k - 1 - total // 2
                pads.append((before, new - (size - 1) * s - 1 - before + k - 1))
                # LiteRT checks that the output size gives back the input's under this padding
                consistent &= size == (-(-new // s) if padding == "SAME" else (new - k) // s + 1)
            if consistent and [pads[0][0], pads[1][0], pads[0][1], pads[1][1]] == node.attrs["padding"]:
                chosen = padding
        if chosen is None:
            raise self._fail(node, f"its padding {node.attrs['padding']} is neither SAME nor VALID of TRANSPOSE_CONV")
        q_in = self.model.quant_of(src)
        weight, bias = self._weights_and_bias(node, "transpose_conv2d",
                                              w.transpose(0, 2, 3, 1)[:, ::-1, ::-1, :], 0, q_in.scale)
        out = self._activation(node.name, node.quant)
        shape = self._int32(self._shape(node.name), f"{node.name}/output_shape")
        self._op("TRANSPOSE_CONV", [shape, weight, self.index[src], bias], [out], "TransposeConvOptions",
                 padding=getattr(self.fb.Padding, chosen), strideH=stride[0], strideW=stride[1],
                 fusedActivationFunction=self._fused(node))

    def _write_zero_insert(self, node: Node) -> None:
        if any(not (c.op == "conv2d" and c.attrs["transposed"]) for c in self.consumers[node.name]):
            raise self._fail(node, "a zero_insert is written only as part of the transposed conv it feeds")

    def _write_linear(self, node: Node) -> None:
        (src,) = node.inputs
        w = node.arrays["weight"]
        if src in self.hwc_flat:  # the flatten is TFLite's (H, W, C) order: reorder the columns to it
            c, h, wd = self.model.shapes[self.nodes[src].inputs[0]]
            w = w.reshape(w.shape[0], c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
        weight, bias = self._weights_and_bias(node, "linear", w, 0, self.model.quant_of(src).scale)
        out = self._activation(node.name, node.quant)
        self._op("FULLY_CONNECTED", [self.index[src], weight, bias], [out], "FullyConnectedOptions",
                 fusedActivationFunction=self._fused(node))

    def _write_add(self, node: Node) -> None:
        a, b = node.inputs
        if self.model.shapes[a] != self.model.shapes[b]:
            raise self._fail(node, "a broadcasting add")
        out = self._activation(node.name, node.quant)
        self._op("ADD", [self.index[a], self.index[b]], [out], "AddOptions", fusedActivationFunction=self._fused(node))

    def _write_mul(self, node: Node) -> None:
        a, b = node.inputs
        out = self._activation(node.name, node.quant)
        self._op("MUL", [self.index[a], self.index[b]], [out], "MulOptions", fusedActivationFunction=self._fused(node))

    def _pool(self, node: Node, code: str) -> None:
        a, (src,) = node.attrs, node.inputs
        _, h, wd = self.model.shapes[src]
        padding = self._conv_padding(node, (h, wd), a["kernel"], a["stride"], (1, 1))
        if padding is None or node.quant != self.model.quant_of(src) or (
                code == "AVERAGE_POOL_2D" and padding == "SAME" and a["count_include_pad"]):
            raise self._fail(node, "a pool is written with SAME or VALID padding (not counted), keeping its "
                             "input's quantization")
        (clamp,) = self.consumers[node.name] if len(self.consumers[node.name]) == 1 else (None,)
        fused = clamp is not None and clamp.op == "clamp" and node.name not in self.model.outputs
        out = self._activation(clamp.name if fused else node.name, node.quant)
        self._op(code, [self.index[src]], [out], "Pool2DOptions", padding=getattr(self.fb.Padding, padding),
                 strideH=a["stride"][0], strideW=a["stride"][1], filterHeight=a["kernel"][0],
                 filterWidth=a["kernel"][1], fusedActivationFunction=self._fused(clamp if fused else node))

    def _write_maxpool2d(self, node: Node) -> None:
        self._pool(node, "MAX_POOL_2D")

    def _write_avgpool2d(self, node: Node) -> None:
        self._pool(node, "AVERAGE_POOL_2D")

    def _write_clamp(self, node: Node) -> None:
        producer = self.nodes.get(node.inputs[0])
        if producer is None or producer.op not in ("maxpool2d", "avgpool2d") or node.name not in self.index:
            raise self._fail(node, "a clamp is written only as a pool's fused activation")

    def _write_mean(self, node: Node) -> None:
        (src,) = node.inputs
        if len(self.model.shapes[src]) != 3 or node.attrs["axes"] != [2, 3]:
            raise self._fail(node, "TFLite's MEAN is written over height and width")
        out = self._activation(node.name, node.quant)
        self._op("MEAN", [self.index[src], self._int32([1, 2], f"{node.name}/axes")], [out], "ReducerOptions",
                 keepDims=node.attrs["keepdim"])

    def _write_concat(self, node: Node) -> None:
        axis = node.attrs["axis"]
        if node.attrs["input_multipliers"] is not None or axis != 1:
            raise self._fail(node, "TFLite's CONCATENATION is written on channels, of equally quantized inputs")
        out = self._activation(node.name, node.quant)
        self._op("CONCATENATION", [self.index[x] for x in node.inputs], [out], "ConcatenationOptions",
                 axis=len(self._shape(node.name)) - 1)

    def _write_reshape(self, node: Node) -> None:
        (src,) = node.inputs
        shape = self.model.shapes[src]
        if len(self.model.shapes[node.name]) != 1:
            raise self._fail(node, "a reshape is written as a flatten to (N, features)")
        if len(shape) == 3 and shape[1] * shape[2] > 1:
            if node.name in self.model.outputs or any(c.op != "linear" for c in self.consumers[node.name]):
                raise self._fail(node, "a flatten of (C, H, W) is written only into fully connected layers (which "
                                 "take TFLite's (H, W, C) order)")
            self.hwc_flat.add(node.name)
        out = self._activation(node.name, node.quant)
        new_shape = self._shape(node.name)
        self._op("RESHAPE", [self.index[src], self._int32(new_shape, f"{node.name}/shape")], [out],
                 "ReshapeOptions", newShape=new_shape)

    def _write_lut(self, node: Node) -> None:
        (src,) = node.inputs
        q_in = self.model.quant_of(src)
        table = node.arrays["table"].astype(np.int64)
        for code, make in TABLE_OPS.items():
            if q_in.bits == 8 and np.array_equal(np.clip(make(q_in, node.quant), -128, 127), table):
                self._op(code, [self.index[src]], [self._activation(node.name, node.quant)])
                return
        raise self._fail(node, "its table is none of TFLite's LOGISTIC, TANH or HARD_SWISH for its scales")

    def _write_resize(self, node: Node) -> None:
        (src,) = node.inputs
        size = self._int32(node.attrs["size"], f"{node.name}/size")
        out = self._activation(node.name, node.quant)
        if node.attrs["mode"] == "nearest":
            self._op("RESIZE_NEAREST_NEIGHBOR", [self.index[src], size], [out], "ResizeNearestNeighborOptions",
                     alignCorners=False, halfPixelCenters=False)
        else:
            self._op("RESIZE_BILINEAR", [self.index[src], size], [out], "ResizeBilinearOptions",
                     alignCorners=False, halfPixelCenters=True)

    def _write_slice(self, node: Node) -> None:
        (src,) = node.inputs
        shape = self._shape(src)
        axis = {1: 3, 2: 1, 3: 2}[node.attrs["axis"]] if len(shape) == 4 else node.attrs["axis"]
        begin, end = [0] * len(shape), list(shape)
        begin[axis], end[axis] = node.attrs["start"], node.attrs["stop"]
        out = self._activation(node.name, node.quant)
        self._op("STRIDED_SLICE", [self.index[src], self._int32(begin, f"{node.name}/begin"),
                                   self._int32(end, f"{node.name}/end"),
                                   self._int32([1] * len(shape), f"{node.name}/strides")], [out],
                 "StridedSliceOptions")
