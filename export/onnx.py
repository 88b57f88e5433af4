"""An IntModel on onnxruntime-cpu as an int8 QOperator ONNX model that onnxruntime runs to the simulator's integers.

QOperator, not QDQ: a QOperator graph is the integer program itself (QLinearConv, QGemm, QLinearAdd, ...), which
onnxruntime's CPU provider executes as written; a QDQ graph is float ops between Quantize/DequantizeLinear that
its optimizer fuses into those kernels only where its rules allow (it leaves int8-activation adds, ReduceMean
and others in float on dequantized values), so what runs would depend on the optimizer, not on the file.
The model takes and gives float tensors (QuantizeLinear in, DequantizeLinear out) as quantize_static's models
do. Weight scales are solved so that onnxruntime's float32 derivation gives the model's multipliers; tables
(lut nodes, and concat rescales) are written as Cast + Gather over the 256 codes, which the engine runs in
integers. Before returning, the model is imported again and every node is compared with the model's: a model
onnxruntime would compute differently is refused in one line, never written.
"""

from __future__ import annotations

import numpy as np

from export.engines import engine_weight_scales, node_differences, shipped_profile_of
from qftsim import arith
from qftsim.errors import QftsimError
from qftsim.intmodel import IntModel, Node, TensorQuant, node_arithmetic
from qftsim.onnx_import import _modules, importer_of

OPSET = 17


def onnxruntime_profile_of(profile) -> str:
    """The shipped onnxruntime profile whose arithmetic `profile` is, or a one-line refusal naming the field."""
    return shipped_profile_of(profile, "onnxruntime-", "onnxruntime")


def to_onnx(model: IntModel) -> bytes:
    """The .onnx bytes that onnxruntime's CPU provider runs to the model's integers."""
    onnxruntime_profile_of(model.profile)
    writer = _Writer(model)
    data = writer.build()
    writer.check_round_trip(data)
    return data


def concat_rescale_table(q_in: TensorQuant, q_out: TensorQuant, m: int, t: int, rounding: str) -> np.ndarray:
    """A concat input's rescale to the output quantization as a table over the input codes (the simulator's
    requantization of the centred code, plus the output zero point, clamped)."""
    codes = np.arange(q_in.qmin, q_in.qmax + 1, dtype=np.int64)
    return np.clip(arith.requantize(codes - q_in.zero_point, m, t, rounding) + q_out.zero_point,
                   q_out.qmin, q_out.qmax).astype(np.int64)


def run_onnx(data: bytes, model: IntModel, x: np.ndarray) -> np.ndarray:
    """The first output's integers of a written .onnx, run by onnxruntime on the IntModel's input integers:
    fed as the real values they stand for (the file quantizes them back exactly), the real outputs turned back
    into the integers they are (exact: (q - z) * s in float32 is within a few ulps of an integer times s)."""
    from qftsim.onnx_import import session

    q_in, q_out = model.inputs[0].quant, model.quant_of(model.outputs[0])
    real = (x.astype(np.float32) - q_in.zero_point) * np.float32(q_in.scale)
    (y,) = session(data).run(None, {"input": real})
    return (np.rint(y / np.float32(q_out.scale)) + q_out.zero_point).astype(q_out.dtype)


class _Writer:
    def __init__(self, model: IntModel):
        self.onnx, _ = _modules()
        self.model, self.profile = model, model.profile
        self.nodes, self.inits, self.tables = [], [], []  # tables: Gather outputs, their quantization annotated
        # what importing the file must give back: the model's nodes, with the writer's rewrites spelled out
        self.expected: list[tuple[Node, tuple, tuple]] = []  # (node, its shape, ignored attributes)

    def _fail(self, node: Node, message: str) -> QftsimError:
        return QftsimError(f"{node.name} ({node.op}): {message}; qftsim cannot write it as ONNX for onnxruntime")

    def _const(self, value, dtype, name: str) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def _quant(self, tensor: str, q: TensorQuant) -> list[str]:
        """The (scale, zero point) initializers of a tensor, made once."""
        scale, zero = f"{tensor}_scale", f"{tensor}_zero_point"
        if not any(i.name == scale for i in self.inits):
            self._const(np.float32(q.scale), np.float32, scale)
            self._const(q.zero_point, q.dtype, zero)
        return [scale, zero]

    def _op(self, op_type: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [output], domain=domain or None,
                                                     name=output, **attrs))
        return output

    def _input_quant(self, name: str) -> list[str]:
        return [name, *self._quant(name, self.model.quant_of(name))]

    def _clamped(self, node: Node, raw: str) -> None:
        """A narrower clamp than the output's range as Clip (onnxruntime clips uint8 and int8 in integers)."""
        lo, hi = node.attrs["clamp"]
        if [lo, hi] == [node.quant.qmin, node.quant.qmax]:
            return
        dtype = node.quant.dtype
        self._op("Clip", [raw, self._const(lo, dtype, f"{node.name}_min"), self._const(hi, dtype, f"{node.name}_max")],
                 node.name)

    def _out(self, node: Node) -> str:
        """The tensor an op with a clamp writes (the node's own name, or its unclamped value before a Clip)."""
        clamp = node.attrs.get("clamp")
        if clamp is not None and list(clamp) != [node.quant.qmin, node.quant.qmax]:
            return f"{node.name}_unclamped"
        return node.name

    def build(self) -> bytes:
        onnx, helper, model = self.onnx, self.onnx.helper, self.model
        (inp,) = model.inputs
        for q, where in [(inp.quant, f"input {inp.name!r}")] + [(n.quant, f"node {n.name!r}") for n in model.nodes]:
            if q.bits != 8:
                raise QftsimError(f"{where}: {q.bits}-bit tensors; onnxruntime's QLinear kernels take 8-bit ones")
        self._op("QuantizeLinear", ["input", *self._quant(inp.name, inp.quant)], inp.name)
        for node in model.nodes:
            getattr(self, f"_write_{node.op}")(node)
        outputs = []
        for name in model.outputs:
            outputs.append(self._op("DequantizeLinear", self._input_quant(name), f"{name}_real"))
        batch = ["batch"]
        graph = helper.make_graph(
            self.nodes, f"qftsim_{model.hash[:12]}",
            [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, batch + list(inp.shape))],
            [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, batch + list(model.shapes[n]))
             for o, n in zip(outputs, model.outputs)], self.inits)
        out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                      helper.make_opsetid("com.microsoft", 1)],
                                producer_name="qftsim", doc_string=f"qftsim {model.hash} ({model.profile.name})")
        for name, scale, zero in self.tables:  # ONNX's record of the quantization of a tensor no QLinear op states
            note = out.graph.quantization_annotation.add()
            note.tensor_name = name
            note.quant_parameter_tensor_names.extend([
                onnx.StringStringEntryProto(key="SCALE_TENSOR", value=scale),
                onnx.StringStringEntryProto(key="ZERO_POINT_TENSOR", value=zero)])
        out.ir_version = 8
        return out.SerializeToString()

    def check_round_trip(self, data: bytes) -> None:
        """Import the file with the model's profile: every node must come back with the model's integers."""
        importer = importer_of(data, self.profile, "<export>")
        try:
            back = importer.run()
        except QftsimError as exc:
            raise QftsimError(f"the written ONNX model does not import back: {exc}") from None
        imported = {n.name: n for n in back.nodes}
        for node, shape, ignore in self.expected:
            theirs = imported.get(importer.tensor_of.get(node.name, ""))
            if theirs is None:
                raise self._fail(node, "it does not come back from the written file")
            changed = node_differences(node, shape, theirs, back.shapes[theirs.name], ignore)
            if node.op == "conv2d" and node_arithmetic(node, self.profile) != node_arithmetic(theirs, self.profile):
                changed.append("arithmetic")  # a depthwise conv read back as a grouped one, or the reverse
            if changed:
                raise self._fail(node, f"onnxruntime would derive other {', '.join(changed)} from the scales ONNX "
                                 "stores (the model was not made for this engine's arithmetic)")

    def _expect(self, node: Node, ignore: tuple = ()) -> None:
        self.expected.append((node, self.model.shapes[node.name], ignore))

    # ------------------------------------------------------------ ops

    def _write_conv2d(self, node: Node) -> None:
        a, (src,) = node.attrs, node.inputs
        if a["transposed"]:
            raise self._fail(node, "a transposed conv (onnxruntime's CPU provider has no int8 ConvTranspose)")
        q_in, w = self.model.quant_of(src), node.arrays["weight"]
        channels = w.shape[0]
        depthwise = a["groups"] > 1 and a["groups"] == self.model.shapes[src][0] and w.shape[1] == 1
        scales = engine_weight_scales(self.profile, node, "depthwise_conv2d" if depthwise else "conv2d", q_in.scale)
        inputs = self._input_quant(src) + [
            self._const(w.astype(np.int8), np.int8, f"{node.name}_weight"),
            self._const(scales, np.float32, f"{node.name}_weight_scale"),
            self._const(np.zeros(channels), np.int8, f"{node.name}_weight_zero_point"),
            *self._quant(node.name, node.quant), self._const(node.arrays["bias"], np.int32, f"{node.name}_bias")]
        self._op("QLinearConv", inputs, self._out(node), kernel_shape=list(w.shape[2:]), strides=a["stride"],
                 pads=a["padding"], dilations=a["dilation"], group=a["groups"])
        self._clamped(node, self._out(node))
        self._expect(node, ("depthwise",))

    def _write_linear(self, node: Node) -> None:
        (src,) = node.inputs
        w = node.arrays["weight"]
        scales = engine_weight_scales(self.profile, node, "linear", self.model.quant_of(src).scale)
        inputs = self._input_quant(src) + [
            self._const(w.astype(np.int8), np.int8, f"{node.name}_weight"),
            self._const(scales, np.float32, f"{node.name}_weight_scale"),
            self._const(np.zeros(w.shape[0]), np.int8, f"{node.name}_weight_zero_point"),
            self._const(node.arrays["bias"], np.int32, f"{node.name}_bias"), *self._quant(node.name, node.quant)]
        self._op("QGemm", inputs, self._out(node), domain="com.microsoft", transB=1)
        self._clamped(node, self._out(node))
        self._expect(node)

    def _binary(self, node: Node, op_type: str) -> None:
        a, b = node.inputs
        self._op(op_type, self._input_quant(a) + self._input_quant(b) + self._quant(node.name, node.quant),
                 self._out(node), domain="com.microsoft")
        self._clamped(node, self._out(node))
        self._expect(node)

    def _write_add(self, node: Node) -> None:
        self._binary(node, "QLinearAdd")

    def _write_mul(self, node: Node) -> None:
        self._binary(node, "QLinearMul")

    def _write_mean(self, node: Node) -> None:
        (src,) = node.inputs
        if len(self.model.shapes[src]) != 3 or node.attrs["axes"] != [2, 3]:
            raise self._fail(node, "a mean is written over height and width (QLinearGlobalAveragePool)")
        kept = node.name if node.attrs["keepdim"] else f"{node.name}_kept"
        out = self._out(node) if node.attrs["keepdim"] else kept
        self._op("QLinearGlobalAveragePool", self._input_quant(src) + self._quant(node.name, node.quant), out,
                 domain="com.microsoft", channels_last=0)
        if node.attrs["keepdim"]:
            self._clamped(node, out)
        else:
            if list(node.attrs["clamp"]) != [node.quant.qmin, node.quant.qmax]:
                raise self._fail(node, "a mean without keepdim is written without a clamp")
            self._op("Reshape", [kept, self._const([0, -1], np.int64, f"{node.name}_shape")], node.name)
            c = self.model.shapes[src][0]
            pooled = Node(kept, "mean", [src], node.quant, {**node.attrs, "keepdim": True}, node.arrays)
            self.expected += [(pooled, (c, 1, 1), ()),
                              (Node(node.name, "reshape", [kept], node.quant, {"shape": [c]}), (c,), ())]
            return
        self._expect(node)

    def _write_maxpool2d(self, node: Node) -> None:
        a, (src,) = node.attrs, node.inputs
        self._op("MaxPool", [src], node.name, kernel_shape=a["kernel"], strides=a["stride"], pads=a["padding"])
        self._expect(node)

    def _write_avgpool2d(self, node: Node) -> None:
        a, (src,) = node.attrs, node.inputs
        self._op("QLinearAveragePool", self._input_quant(src) + self._quant(node.name, node.quant), node.name,
                 domain="com.microsoft", kernel_shape=a["kernel"], strides=a["stride"], pads=a["padding"],
                 count_include_pad=int(a["count_include_pad"]), channels_last=0)
        self._expect(node)

    def _write_clamp(self, node: Node) -> None:
        (src,) = node.inputs
        lo, hi = node.attrs["clamp"]
        dtype = node.quant.dtype
        self._op("Clip", [src, self._const(lo, dtype, f"{node.name}_min"), self._const(hi, dtype, f"{node.name}_max")],
                 node.name)
        self._expect(node)

    def _table(self, src: str, table: np.ndarray, q_in: TensorQuant, out: str, q_out: TensorQuant) -> None:
        """out = table[code - qmin] by Cast (to int32), the offset added in int32, and Gather (its output's
        quantization annotated)."""
        index = self._op("Cast", [src], f"{out}_index", to=self.onnx.TensorProto.INT32)
        if q_in.qmin:
            index = self._op("Add", [index, self._const(-q_in.qmin, np.int32, f"{out}_offset")], f"{out}_shifted")
        self._op("Gather", [self._const(table, table.dtype, f"{out}_table"), index], out, axis=0)
        self.tables.append((out, *self._quant(out, q_out)))

    def _write_lut(self, node: Node) -> None:
        (src,) = node.inputs
        self._table(src, node.arrays["table"].astype(node.quant.dtype), self.model.quant_of(src), node.name,
                    node.quant)
        self._expect(node)

    def _write_concat(self, node: Node) -> None:
        a = node.attrs
        parts = list(node.inputs)
        if a["input_multipliers"] is not None:
            rounding = node_arithmetic(node, self.profile).rounding
            for k, (src, m, t) in enumerate(zip(node.inputs, a["input_multipliers"], a["input_shifts"])):
                q_in = self.model.quant_of(src)
                table = concat_rescale_table(q_in, node.quant, m, t, rounding).astype(node.quant.dtype)
                parts[k] = f"{node.name}_in{k}"
                self._table(src, table, q_in, parts[k], node.quant)
                self.expected.append((Node(parts[k], "lut", [src], node.quant, {}, {"table": table}),
                                      self.model.shapes[src], ()))
        self._op("Concat", parts, node.name, axis=a["axis"])
        self.expected.append((Node(node.name, "concat", parts, node.quant, {**a, "input_multipliers": None,
                                                                             "input_shifts": None}),
                              self.model.shapes[node.name], ()))

    def _write_reshape(self, node: Node) -> None:
        (src,) = node.inputs
        self._op("Reshape", [src, self._const([0] + list(node.attrs["shape"]), np.int64, f"{node.name}_shape")],
                 node.name)
        self._expect(node)

    def _write_resize(self, node: Node) -> None:
        (src,) = node.inputs
        (_, h, w), (ho, wo) = self.model.shapes[src], node.attrs["size"]
        if node.attrs["mode"] != "nearest" or ho % h or wo % w:
            raise self._fail(node, "a bilinear or fractional resize (onnxruntime's int8 Resize is written for "
                             "nearest upsampling by whole ratios)")
        scales = self._const([1, 1, ho // h, wo // w], np.float32, f"{node.name}_scales")
        self._op("Resize", [src, "", scales], node.name, mode="nearest", coordinate_transformation_mode="asymmetric",
                 nearest_mode="floor")
        self._expect(node)

    def _write_slice(self, node: Node) -> None:
        (src,) = node.inputs
        a = node.attrs
        self._op("Slice", [src, self._const([a["start"]], np.int64, f"{node.name}_starts"),
                           self._const([a["stop"]], np.int64, f"{node.name}_ends"),
                           self._const([a["axis"]], np.int64, f"{node.name}_axes")], node.name)
        self._expect(node)

    def _write_zero_insert(self, node: Node) -> None:
        raise self._fail(node, "a zero_insert (the input of a transposed conv)")
