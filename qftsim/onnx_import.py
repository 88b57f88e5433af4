"""Int8 ONNX models (QOperator, or QDQ as onnxruntime fuses it) turned into IntModels: `from_onnx`.

What onnxruntime executes is what is imported: the model is first optimized by onnxruntime itself
(ORT_ENABLE_EXTENDED, its QDQ fusions), so a QDQ group it runs as a QLinear* integer kernel arrives as
that kernel. A region it leaves as DequantizeLinear -> float ops -> QuantizeLinear is imported where it is a
function of one input code (elementwise float ops: Tanh, HardSwish), as the engine's table of it; any other
float region is refused in one line. ONNX is NCHW like an IntModel, so tensors keep their layout.
Multipliers are derived from the file's float32 scales as the profile's engine derives them; the tables
of unary QLinear ops (QLinearSigmoid, QLinearLeakyRelu) and of QLinearConcat's rescales are read from the
engine by running the op on every input code.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from qftsim import arith
from qftsim.errors import QftsimError
from qftsim.importers import engine_multipliers, unique_name
from qftsim.intmodel import IntModel, ModelInput, Node, TensorQuant
from qftsim.profile import HardwareProfile, load_profile

ONNX_OPS = ("QLinearConv", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
            "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "MaxPool", "Resize", "Reshape",
            "Flatten", "Split", "Slice", "Concat", "Clip", "Cast", "Add", "Gather", "Pad", "QuantizeLinear",
            "DequantizeLinear", "ElementwiseFloat")
# float ops onnxruntime runs between a DequantizeLinear and a QuantizeLinear that act on each element alone (with
# scalar constants): such a region is a function of one input code, a table read from the engine
ELEMENTWISE = ("Tanh", "Sigmoid", "HardSigmoid", "HardSwish", "Mul", "Add", "Sub", "Div", "Relu", "Clip", "LeakyRelu",
               "Erf", "Elu", "Softplus", "Exp", "Neg", "Abs", "Sqrt", "Pow")
# ops that keep their input's quantization (a tensor's quantization is read through them from a consumer's)
PASS_THROUGH = ("MaxPool", "Resize", "Reshape", "Flatten", "Split", "Slice", "Concat", "Clip")


def _modules():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise QftsimError("reading .onnx files needs the onnx and onnxruntime packages "
                          "(pip install onnx onnxruntime)") from None
    return onnx, onnxruntime


def from_onnx(source: str | Path | bytes, profile: str | HardwareProfile) -> IntModel:
    """The IntModel that computes what onnxruntime's CPU kernels compute for an int8 ONNX model."""
    if isinstance(source, bytes):
        data, name = source, "<bytes>"
    else:
        name = str(source)[:80]
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise QftsimError(f"{source}: cannot read ({exc.strerror})") from None
    return importer_of(data, load_profile(profile), name).run()


def importer_of(data: bytes, profile: HardwareProfile, name: str) -> "_OnnxImporter":
    """The importer of a model's bytes: the graph onnxruntime executes for them (its fusions applied), and
    the quantizations the file states for tensors no QLinear op reads (its quantization_annotation)."""
    onnx, _ = _modules()
    try:
        written = onnx.load_from_string(data)
    except Exception:  # protobuf's DecodeError and friends
        raise QftsimError(f"{name}: not an ONNX model (unreadable protobuf)") from None
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "executed.onnx")
        try:
            session(data, path, extended_only=True)
        except Exception as exc:
            raise QftsimError(f"{name}: onnxruntime cannot load it: {str(exc).splitlines()[0][:200]}") from None
        executed = onnx.load(path)
    return _OnnxImporter(executed, profile, name, annotations(written))


def annotations(model) -> dict[str, TensorQuant]:
    """The tensor quantizations a ModelProto states in its graph's quantization_annotation (ONNX's record of the
    scale and zero point of a tensor that no QLinear op reads, such as a table lookup's output)."""
    onnx, _ = _modules()
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for note in model.graph.quantization_annotation:
        names = {e.key: e.value for e in note.quant_parameter_tensor_names}
        scale, zero = consts.get(names.get("SCALE_TENSOR")), consts.get(names.get("ZERO_POINT_TENSOR"))
        if scale is not None and zero is not None and zero.dtype in (np.uint8, np.int8):
            out[note.tensor_name] = TensorQuant(8, zero.dtype == np.int8, int(zero.reshape(-1)[0]),
                                                float(np.float32(scale.reshape(-1)[0])))
    return out


def session(model: bytes, optimized_path: str | None = None, extended_only: bool = False):
    """An onnxruntime CPU session on one thread (optionally writing the graph it runs)."""
    _, ort = _modules()
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if extended_only:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class _OnnxImporter:
    def __init__(self, model, profile: HardwareProfile, source: str, stated: dict[str, TensorQuant] | None = None):
        onnx, _ = _modules()
        self.onnx, self.model, self.profile, self.source = onnx, model, profile, source
        self.stated = stated or {}  # quantization annotations of the file as written
        self.graph = model.graph
        self.consts = {t.name: onnx.numpy_helper.to_array(t) for t in self.graph.initializer}
        for node in self.graph.node:  # Constant nodes are initializers too
            if node.op_type == "Constant":
                self.consts[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
        self.consumers: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.index_of: dict[str, tuple[str, int]] = {}  # an int32 Cast of a tensor (plus an offset): a table index
        self.pending_pad: dict[str, tuple[str, list[int]]] = {}  # Pad output -> (its input, [top, left, bottom, right])
        self.regions: dict[str, list] = {}  # an ElementwiseFloat output -> its DequantizeLinear, float ops, Quantize
        self.tensor_of: dict[str, str] = {}  # onnx tensor -> IntModel tensor
        self.quant: dict[str, TensorQuant] = {}
        self.shape: dict[str, tuple[int, ...]] = {}  # with the batch
        self.nodes: list[Node] = []
        self.names: set[str] = set()

    # ------------------------------------------------------------ helpers

    def _fail(self, node, message: str) -> QftsimError:
        return QftsimError(f"{self.source}: {node.op_type} node {node.name or node.output[0]!r} {message}")

    def _attrs(self, node) -> dict:
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}

    def _const(self, node, name: str) -> np.ndarray:
        if name not in self.consts:
            raise self._fail(node, f"takes {name!r} as a constant, but it is computed")
        return self.consts[name]

    def _tensor_quant(self, node, scale_name: str, zero_name: str) -> TensorQuant:
        scale, zero = self._const(node, scale_name), self._const(node, zero_name)
        if scale.size != 1 or zero.size != 1 or zero.dtype not in (np.uint8, np.int8):
            raise self._fail(node, "has a tensor quantization that is not one 8-bit zero point and one scale")
        return TensorQuant(8, zero.dtype == np.int8, int(zero.reshape(-1)[0]),
                           float(np.float32(scale.reshape(-1)[0])))

    def _input(self, node, index: int) -> str:
        name = node.input[index]
        if name in self.pending_pad:
            raise self._fail(node, f"reads the Pad output {name!r}; qftsim imports a Pad only into a QLinearConv")
        if name not in self.tensor_of:
            raise self._fail(node, f"reads {name!r}, which no imported op produces")
        return name

    def _new_name(self, onnx_name: str) -> str:
        return unique_name(onnx_name, self.names, "t")

    def _emit(self, out: str, op: str, inputs: list[str], quant: TensorQuant, shape: tuple[int, ...],
              attrs: dict | None = None, arrays: dict | None = None) -> str:
        name = self._new_name(out)
        self.nodes.append(Node(name, op, [self.tensor_of[i] if i in self.tensor_of else i for i in inputs], quant,
                               attrs or {}, arrays or {}))
        self.tensor_of[out], self.quant[out], self.shape[out] = name, quant, tuple(shape)
        return name

    def _consumer_quant(self, name: str) -> TensorQuant | None:
        """A tensor's quantization as the QLinear ops (or the DequantizeLinear) that read it state it, looking
        through ops that keep quantization; None where nothing states it."""
        for c in self.consumers.get(name, []):
            for i, x in enumerate(c.input):
                if x != name:
                    continue
                if c.op_type == "DequantizeLinear" and i == 0 or c.op_type.startswith("QLinear") and \
                        len(c.input) > i + 2 and c.input[i + 1] in self.consts or c.op_type == "QGemm" and i in (0, 3):
                    return self._tensor_quant(c, c.input[i + 1], c.input[i + 2])
                if c.op_type in PASS_THROUGH and (i == 0 or c.op_type == "Concat"):
                    found = next((q for q in map(self._consumer_quant, c.output) if q is not None), None)
                    if found is not None:
                        return found
        return None

    def _alias(self, node, x: str, shape: tuple[int, ...] | None = None) -> None:
        out = node.output[0]
        self.tensor_of[out], self.quant[out] = self.tensor_of[x], self.quant[x]
        self.shape[out] = self.shape[x] if shape is None else shape

    # ------------------------------------------------------------ graph

    def run(self) -> IntModel:
        g = self.graph
        float_inputs = [i.name for i in g.input if i.name not in self.consts]
        if len(float_inputs) != 1:
            raise QftsimError(f"{self.source}: the model has {len(float_inputs)} inputs; qftsim imports one")
        nodes = self._float_tables(self._integer_pads([n for n in g.node if n.op_type != "Constant"]))
        outputs = {o.name for o in g.output}
        edge_in = [n for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] in float_inputs]
        edge_out = [n for n in nodes if n.op_type == "DequantizeLinear" and n.output[0] in outputs]
        if len(edge_in) != 1:
            raise QftsimError(f"{self.source}: the float input must feed one QuantizeLinear (found {len(edge_in)})")
        inner = [n for n in nodes if n not in edge_in and n not in edge_out]
        floats = [n for n in inner if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        if floats:
            around = sorted({c.op_type for d in floats if d.op_type == "DequantizeLinear" for c in nodes
                             if set(d.output) & set(c.input) and c.op_type != "QuantizeLinear"})
            signed = any(self.consts.get(d.input[2], np.zeros(1, np.uint8)).dtype == np.int8 for d in floats
                         if len(d.input) > 2)
            raise QftsimError(f"{self.source}: onnxruntime runs {', '.join(around) or 'part of it'} in float on "
                              "dequantized values (DequantizeLinear -> op -> QuantizeLinear left unfused); qftsim "
                              "imports what it runs in integers" + (" (its CPU kernels fuse QDQ convolutions with "
                              "uint8 activations: quantize with activation_type=QuantType.QUInt8)" if signed else ""))
        unknown = sorted({n.op_type for n in inner if n.op_type not in ONNX_OPS})
        if unknown:
            raise QftsimError(f"{self.source}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                              f"supported; supported: {', '.join(ONNX_OPS)} (Quantize/DequantizeLinear only at the "
                              "edges)")
        (q_in,) = edge_in
        dims = next(i for i in g.input if i.name == q_in.input[0]).type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.dim_value > 0 else 1 for d in dims)
        if len(shape) not in (2, 4):
            raise self._fail(q_in, f"quantizes an input of shape {shape}; expected (N, C, H, W) or (N, features)")
        quant = self._tensor_quant(q_in, q_in.input[1], q_in.input[2])
        name = self._new_name(q_in.output[0])
        model_inputs = [ModelInput(name, shape[1:], quant)]
        self.tensor_of[q_in.output[0]], self.quant[q_in.output[0]], self.shape[q_in.output[0]] = name, quant, shape
        for node in inner:
            getattr(self, f"_op_{node.op_type}")(node)
        results = []
        for out in g.output:
            dq = next((n for n in edge_out if n.output[0] == out.name), None)
            source = dq.input[0] if dq else out.name
            if source not in self.tensor_of:
                raise QftsimError(f"{self.source}: output {out.name!r} is not produced by an imported op")
            results.append(self.tensor_of[source])
        try:
            return IntModel(self.profile, model_inputs, self.nodes, results)
        except QftsimError as exc:
            raise QftsimError(f"{self.source}: does not fit profile {self.profile.name}: {exc}") from None

    def _float_tables(self, nodes: list) -> list:
        """Each DequantizeLinear -> elementwise float ops (scalar constants) -> QuantizeLinear region onnxruntime
        leaves unfused (Tanh, HardSwish, x * sigmoid(x), ...) as one ElementwiseFloat node: a function of one
        input code, whose table the engine computes (`_op_ElementwiseFloat`)."""
        producer = {o: n for n in nodes for o in n.output}
        out = list(nodes)
        for dq in [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] not in self.consts]:
            region, frontier, ends = [], [dq.output[0]], []
            inside = {dq.output[0]}
            while frontier:
                for c in self.consumers.get(frontier.pop(), []):
                    if c in region or c in ends:
                        continue
                    if c.op_type == "QuantizeLinear":
                        ends.append(c)
                    elif (c.op_type in ELEMENTWISE or c.op_type == "Flatten") and all(
                            i in inside or i == "" or i in self.consts and self.consts[i].size == 1
                            or i in producer and producer[i].op_type in ELEMENTWISE for i in c.input):
                        region.append(c)
                        inside.update(c.output)
                        frontier.extend(c.output)
                    else:
                        region = None
                        break
                if region is None:
                    break
            if not region or len(ends) != 1 or any(i not in inside and i not in self.consts and i != ""
                                                   for c in region for i in c.input):
                continue
            (q,) = ends
            marker = self.onnx.helper.make_node("ElementwiseFloat", [dq.input[0]], [q.output[0]], name=q.output[0])
            self.regions[q.output[0]] = [dq, *region, q]
            drop = {id(n) for n in self.regions[q.output[0]]}
            out = [marker if n is q else n for n in out if id(n) not in drop or n is q]
        return out

    def _op_ElementwiseFloat(self, node):
        """A float region's table: the region itself (the file's nodes and scalar constants) run by the engine on
        every code of its input."""
        dq, *region, q = self.regions[node.output[0]]
        x = self._input(node, 0)
        q_in, q_out = self.quant[x], self._tensor_quant(q, q.input[1], q.input[2])
        renamed = self.onnx.NodeProto()
        renamed.CopyFrom(dq)
        renamed.input[0] = "codes"
        table = self._run_on_codes([renamed, *region, q], q.output[0], q_in, q_out, list(self.model.opset_import))
        flatten = [n for n in region if n.op_type == "Flatten"]
        if not flatten:
            self._table_node(node, node.output[0], x, table, q_out)
            return
        if len(flatten) > 1 or int(self._attrs(flatten[0]).get("axis", 1)) != 1:
            raise self._fail(flatten[0], "flattens inside a float region other than once, from axis 1")
        self._table_node(node, f"{node.output[0]}_table", x, table, q_out)  # the table, then the flatten
        self._reshape(node, f"{node.output[0]}_table", (self.shape[x][0], int(np.prod(self.shape[x][1:]))))

    def _integer_pads(self, nodes: list) -> list:
        """DequantizeLinear -> Pad -> QuantizeLinear of one quantization (what onnxruntime leaves of a QDQ Pad)
        as the integer Pad it equals: QuantizeLinear(DequantizeLinear(q)) = q for 8-bit codes of one scale
        (float32's relative errors, 2^-24 twice, move (q - z) by less than 255 * 2^-23), and the padding value
        (a dequantized constant) pads with the code QuantizeLinear makes of it."""
        producer = {o: n for n in nodes for o in n.output}
        out = list(nodes)
        for pad in [n for n in nodes if n.op_type == "Pad"]:
            data, value = producer.get(pad.input[0]), producer.get(pad.input[2]) if len(pad.input) > 2 else None
            readers = self.consumers.get(pad.output[0], [])
            if not (data is not None and data.op_type == "DequantizeLinear" and len(readers) == 1
                    and readers[0].op_type == "QuantizeLinear" and value is not None
                    and value.op_type == "DequantizeLinear" and value.input[0] in self.consts):
                continue
            (q,) = readers
            q_data, q_value, q_out = (self._tensor_quant(n, n.input[1], n.input[2]) for n in (data, value, q))
            if q_data != q_out or len(self.consumers.get(data.output[0], [])) != 1:
                continue
            real = (np.float32(self.consts[value.input[0]].reshape(-1)[0]) - np.float32(q_value.zero_point)) \
                * np.float32(q_value.scale)
            code = int(np.clip(np.rint(np.float32(real / np.float32(q_out.scale))) + q_out.zero_point, q_out.qmin,
                               q_out.qmax))  # the padding value as QuantizeLinear makes it a code
            self.consts[f"{pad.output[0]}_code"] = np.array(code, dtype=q_out.dtype)
            integer = self.onnx.NodeProto()
            integer.CopyFrom(pad)  # the file's graph stays as it is
            integer.input[0], integer.input[2], integer.output[0] = data.input[0], f"{pad.output[0]}_code", q.output[0]
            out = [integer if n is pad else n for n in out if n is not data and n is not value and n is not q]
        return out

    # ------------------------------------------------------------ ops

    def _weights(self, node, index: int, zero_index: int) -> np.ndarray:
        w = self._const(node, node.input[index])
        if w.dtype != np.int8:
            raise self._fail(node, f"has {w.dtype} weights; qftsim imports int8 weights")
        zero = self._const(node, node.input[zero_index])
        if zero.any():
            raise self._fail(node, "has nonzero weight zero points; the profile's weights are symmetric")
        return w

    def _scales(self, node, index: int, channels: int) -> np.ndarray:
        s = self._const(node, node.input[index]).astype(np.float32).reshape(-1)
        return np.broadcast_to(s, (channels,)).copy() if s.size == 1 else s

    def _bias(self, node, index: int, channels: int) -> np.ndarray:
        if len(node.input) <= index or not node.input[index]:
            return np.zeros(channels, dtype=np.int32)
        return self._const(node, node.input[index]).astype(np.int32).reshape(channels)

    def _op_QLinearConv(self, node):
        a = self._attrs(node)
        x, extra = self.pending_pad.get(node.input[0], (None, [0, 0, 0, 0]))
        x = x or self._input(node, 0)
        q_in, q_out = self.quant[x], self._tensor_quant(node, node.input[6], node.input[7])
        w = self._weights(node, 3, 5)
        channels, groups = w.shape[0], int(a.get("group", 1))
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID") or a.get("channels_last"):
            raise self._fail(node, "uses auto_pad SAME or channels_last; qftsim imports explicit pads")
        if len(w.shape) != 4:
            raise self._fail(node, f"has {len(w.shape) - 2}-D kernels; qftsim imports 2-D convolutions")
        n, c, h, wd = self.shape[x]
        kernel = w.shape[2:]
        stride, dilation = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
        padding = [p + e for p, e in zip(a.get("pads", [0, 0, 0, 0]), extra)]
        depthwise = groups == c and w.shape[1] == 1 and groups > 1
        kind = "depthwise_conv2d" if depthwise else "conv2d"
        m, t = engine_multipliers(self.profile, kind, q_in.scale, self._scales(node, 4, channels), q_out.scale)
        ho = (h + padding[0] + padding[2] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
        wo = (wd + padding[1] + padding[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        self._emit(node.output[0], "conv2d", [x], q_out, (n, channels, ho, wo),
                   {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups,
                    "clamp": [q_out.qmin, q_out.qmax], "depthwise": depthwise},
                   {"weight": w, "bias": self._bias(node, 8, channels), "multiplier": m, "shift": t})

    def _op_QGemm(self, node):
        a = self._attrs(node)
        x = self._input(node, 0)
        if len(node.input) < 9 or not node.input[7]:
            raise self._fail(node, "gives float outputs (no y_scale); qftsim imports requantized ones")
        if float(a.get("alpha", 1.0)) != 1.0 or a.get("transA", 0) or len(self.shape[x]) != 2:
            raise self._fail(node, "has alpha != 1, a transposed or non-2-D input; qftsim imports x @ W^T + b")
        w = self._weights(node, 3, 5)
        w = w if a.get("transB", 0) else w.T
        q_in, q_out = self.quant[x], self._tensor_quant(node, node.input[7], node.input[8])
        m, t = engine_multipliers(self.profile, "linear", q_in.scale, self._scales(node, 4, w.shape[0]), q_out.scale)
        self._emit(node.output[0], "linear", [x], q_out, (self.shape[x][0], w.shape[0]),
                   {"clamp": [q_out.qmin, q_out.qmax]},
                   {"weight": np.ascontiguousarray(w), "bias": self._bias(node, 6, w.shape[0]), "multiplier": m,
                    "shift": t})

    def _binary(self, node):
        xa, xb = self._input(node, 0), self._input(node, 3)
        q_out = self._tensor_quant(node, node.input[6], node.input[7])
        return xa, xb, self.quant[xa], self.quant[xb], q_out

    def _op_QLinearAdd(self, node):
        xa, xb, qa, qb, q_out = self._binary(node)
        if self.shape[xa] != self.shape[xb]:
            raise self._fail(node, f"broadcasts {self.shape[xa]} with {self.shape[xb]}; qftsim adds equal shapes")
        if self.profile.arithmetic("add").form != "float32_fma":
            raise self._fail(node, f"is onnxruntime's float32 add; profile {self.profile.name} adds otherwise "
                             "(use onnxruntime-cpu)")
        ratios = [np.float32(q.scale) / np.float32(q_out.scale) for q in (qa, qb)]
        m, t = arith.float_multipliers(np.array(ratios, dtype=np.float64), "float32")
        self._emit(node.output[0], "add", [xa, xb], q_out, self.shape[xa],
                   {"input_multipliers": [int(v) for v in m], "input_shifts": [int(v) for v in t],
                    "multiplier": 1, "shift": 0, "left_shift": self.profile.ops.add_left_shift,
                    "clamp": [q_out.qmin, q_out.qmax]})

    def _op_QLinearMul(self, node):
        xa, xb, qa, qb, q_out = self._binary(node)
        m, t = engine_multipliers(self.profile, "mul", qa.scale, np.array([qb.scale], dtype=np.float32),
                                  q_out.scale)
        shape = tuple(np.broadcast_shapes(self.shape[xa], self.shape[xb]))
        self._emit(node.output[0], "mul", [xa, xb], q_out, shape, {"clamp": [q_out.qmin, q_out.qmax]},
                   {"multiplier": m, "shift": t})

    def _run_on_codes(self, nodes: list, out: str, q_in: TensorQuant, q_out: TensorQuant, opsets=None) -> np.ndarray:
        """What the engine gives at `out` when `nodes` (whose only tensor input is "codes"; every other input one
        of the file's constants) take every code of q_in: a table."""
        helper, tp = self.onnx.helper, self.onnx.TensorProto
        codes = np.arange(q_in.qmin, q_in.qmax + 1).astype(q_in.dtype).reshape(1, -1)
        consts = sorted({i for n in nodes for i in n.input if i in self.consts})
        graph = helper.make_graph(
            nodes, "table", [helper.make_tensor_value_info("codes", tp.INT8 if q_in.signed else tp.UINT8, codes.shape)],
            [helper.make_tensor_value_info(out, tp.INT8 if q_out.signed else tp.UINT8, None)],
            [self.onnx.numpy_helper.from_array(self.consts[n], n) for n in consts])
        opsets = opsets or [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets)
        return session(model.SerializeToString()).run(None, {"codes": codes})[0].reshape(-1).astype(np.int64)

    def _engine_table(self, op_type: str, names: list[str], attrs: dict, q_in: TensorQuant,
                      q_out: TensorQuant) -> np.ndarray:
        """The engine's table of one com.microsoft op whose only tensor input is "codes" in `names`."""
        node = self.onnx.helper.make_node(op_type, names, ["out"], domain="com.microsoft", **attrs)
        return self._run_on_codes([node], "out", q_in, q_out)

    def _table_node(self, node, out: str, x: str, table: np.ndarray, q_out: TensorQuant) -> None:
        self._emit(out, "lut", [x], q_out, self.shape[x], {}, {"table": table.astype(q_out.dtype)})

    def _unary_table(self, node):
        x = self._input(node, 0)
        q_out = self._tensor_quant(node, node.input[3], node.input[4])
        table = self._engine_table(node.op_type, ["codes"] + list(node.input[1:]), self._attrs(node), self.quant[x],
                                   q_out)
        self._table_node(node, node.output[0], x, table, q_out)

    _op_QLinearSigmoid = _op_QLinearLeakyRelu = _unary_table

    def _op_QLinearGlobalAveragePool(self, node):
        x = self._input(node, 0)
        if self._attrs(node).get("channels_last"):
            raise self._fail(node, "is channels_last; qftsim imports NCHW")
        n, c, h, w = self.shape[x]
        q_out = self._tensor_quant(node, node.input[3], node.input[4])
        m, t = engine_multipliers(self.profile, "mean", self.quant[x].scale, np.ones(1, dtype=np.float32),
                                  q_out.scale, divisor=h * w)
        self._emit(node.output[0], "mean", [x], q_out, (n, c, 1, 1),
                   {"axes": [2, 3], "keepdim": True, "clamp": [q_out.qmin, q_out.qmax]},
                   {"multiplier": m, "shift": t})

    def _op_QLinearConcat(self, node):
        axis = int(self._attrs(node)["axis"])
        q_out = self._tensor_quant(node, node.input[0], node.input[1])
        parts = []
        for k in range(2, len(node.input), 3):
            x = self._input(node, k)
            q = self._tensor_quant(node, node.input[k + 1], node.input[k + 2])
            if q != q_out:  # rescaled by the engine's QuantizeLinear(DequantizeLinear(x)): a table
                names = [node.input[0], node.input[1], "codes", node.input[k + 1], node.input[k + 2]]
                table = self._engine_table("QLinearConcat", names, {"axis": 1}, q, q_out)
                self._table_node(node, f"{node.output[0]}_in{k // 3}", x, table, q_out)
                x = f"{node.output[0]}_in{k // 3}"
            parts.append(x)
        rank = len(self.shape[parts[0]])
        axis %= rank
        shape = list(self.shape[parts[0]])
        shape[axis] = sum(self.shape[p][axis] for p in parts)
        self._emit(node.output[0], "concat", parts, q_out, tuple(shape), {"axis": axis})

    def _window(self, node, x: str) -> tuple[dict, tuple]:
        """A 2-D pool's kernel, stride and padding ([top, left, bottom, right], ONNX's order too) and its output
        shape; ceil_mode, dilation, indices, auto_pad and channels_last are refused."""
        a = self._attrs(node)
        if a.get("ceil_mode") or any(d != 1 for d in a.get("dilations", [1, 1])) or len(node.output) > 1 \
                or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or a.get("channels_last") \
                or len(a["kernel_shape"]) != 2:
            raise self._fail(node, "has ceil_mode, dilation, indices, auto_pad, channels_last or is not 2-D; qftsim "
                             "imports plain 2-D pooling")
        kernel = list(a["kernel_shape"])
        stride, padding = list(a.get("strides", [1, 1])), list(a.get("pads", [0, 0, 0, 0]))
        n, c, h, w = self.shape[x]
        ho = (h + padding[0] + padding[2] - kernel[0]) // stride[0] + 1
        wo = (w + padding[1] + padding[3] - kernel[1]) // stride[1] + 1
        return {"kernel": kernel, "stride": stride, "padding": padding}, (n, c, ho, wo)

    def _op_MaxPool(self, node):
        x = self._input(node, 0)
        attrs, shape = self._window(node, x)
        self._emit(node.output[0], "maxpool2d", [x], self.quant[x], shape, attrs)

    def _op_QLinearAveragePool(self, node):
        """onnxruntime's float32 average pool (the profile's avgpool2d domain float32), its own output scale."""
        x = self._input(node, 0)
        attrs, shape = self._window(node, x)
        attrs["count_include_pad"] = bool(self._attrs(node).get("count_include_pad", 0))
        self._emit(node.output[0], "avgpool2d", [x], self._tensor_quant(node, node.input[3], node.input[4]), shape,
                   attrs)

    def _op_Resize(self, node):
        a = self._attrs(node)
        x = self._input(node, 0)
        n, c, h, w = self.shape[x]
        sizes = node.input[3] if len(node.input) > 3 and node.input[3] else None
        if sizes:
            ho, wo = (int(v) for v in self._const(node, sizes)[2:])
        else:
            scales = self._const(node, node.input[2]).astype(np.float32)
            ho, wo = (int(np.floor(np.float32(size) * s)) for size, s in zip((h, w), scales[2:]))
        mode = a.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        transform = a.get("coordinate_transformation_mode", b"half_pixel")
        transform = transform.decode() if isinstance(transform, bytes) else transform
        rounding = a.get("nearest_mode", b"round_prefer_floor")
        rounding = rounding.decode() if isinstance(rounding, bytes) else rounding
        if mode == "linear":
            raise self._fail(node, "is a linear resize of 8-bit codes, which onnxruntime computes with float32 "
                             "weights in NCHW but with 1/1024 integer weights where its default optimizer moves it "
                             "to NHWC (measured: the two differ), so one arithmetic cannot state it; qftsim "
                             "imports nearest resizing")
        if mode != "nearest" or transform != "asymmetric" or rounding != "floor" \
                or ho % h or wo % w:
            raise self._fail(node, f"is a {mode} resize ({transform}, {rounding}) from {h}x{w} to {ho}x{wo}; qftsim "
                             "imports nearest, asymmetric, floor, by whole ratios (torch's nearest upsampling)")
        self._emit(node.output[0], "resize", [x], self.quant[x], (n, c, ho, wo), {"mode": "nearest", "size": [ho, wo]})

    def _op_Reshape(self, node):
        x = self._input(node, 0)
        target = [int(v) for v in self._const(node, node.input[1])]
        shape = np.empty(self.shape[x], dtype=np.int8).reshape(
            [self.shape[x][i] if v == 0 else v for i, v in enumerate(target)]).shape
        self._reshape(node, x, shape)

    def _op_Flatten(self, node):
        x = self._input(node, 0)
        axis = int(self._attrs(node).get("axis", 1))
        dims = self.shape[x]
        self._reshape(node, x, (int(np.prod(dims[:axis])), int(np.prod(dims[axis:]))))

    def _reshape(self, node, x: str, shape: tuple[int, ...]) -> None:
        if shape[0] != self.shape[x][0]:
            raise self._fail(node, f"reshapes {self.shape[x]} to {shape}, across the batch")
        self._emit(node.output[0], "reshape", [x], self.quant[x], shape, {"shape": list(shape[1:])})

    def _slice(self, node, out: str, x: str, axis: int, start: int, stop: int) -> None:
        shape = list(self.shape[x])
        if axis == 0:
            raise self._fail(node, "slices the batch; qftsim slices the other axes")
        if (start, stop) == (0, shape[axis]):
            self.tensor_of[out], self.quant[out], self.shape[out] = self.tensor_of[x], self.quant[x], self.shape[x]
            return
        shape[axis] = stop - start
        self._emit(out, "slice", [x], self.quant[x], tuple(shape), {"axis": axis, "start": start, "stop": stop})

    def _op_Split(self, node):
        x = self._input(node, 0)
        rank = len(self.shape[x])
        axis = int(self._attrs(node).get("axis", 0)) % rank
        size = self.shape[x][axis]
        if len(node.input) > 1 and node.input[1]:
            parts = [int(v) for v in self._const(node, node.input[1])]
        else:
            count = len(node.output)
            parts = [size // count + (k < size % count) for k in range(count)] if size % count == 0 \
                else [-(-size // count)] * (count - 1) + [size - -(-size // count) * (count - 1)]
        start = 0
        for out, length in zip(node.output, parts):
            self._slice(node, out, x, axis, start, start + length)
            start += length

    def _op_Slice(self, node):
        x = self._input(node, 0)
        starts, ends = (self._const(node, node.input[k]).astype(np.int64) for k in (1, 2))
        rank = len(self.shape[x])
        axes = self._const(node, node.input[3]).astype(np.int64) if len(node.input) > 3 and node.input[3] \
            else np.arange(len(starts))
        steps = self._const(node, node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(len(starts))
        cuts = [(int(a) % rank, *slice(int(s), int(e)).indices(self.shape[x][int(a) % rank])[:2])
                for a, s, e in zip(axes, starts, ends)]
        cuts = [c for c in cuts if (c[1], c[2]) != (0, self.shape[x][c[0]])]
        if (np.asarray(steps) != 1).any() or len(cuts) > 1:
            raise self._fail(node, "has steps or cuts several axes; qftsim imports a contiguous slice of one axis")
        if not cuts:
            self._alias(node, x)
            return
        self._slice(node, node.output[0], x, *cuts[0])

    def _op_Concat(self, node):
        parts = [self._input(node, k) for k in range(len(node.input))]
        if any(self.quant[p] != self.quant[parts[0]] for p in parts):
            raise self._fail(node, "concatenates differently quantized tensors without QLinearConcat")
        axis = int(self._attrs(node)["axis"]) % len(self.shape[parts[0]])
        shape = list(self.shape[parts[0]])
        shape[axis] = sum(self.shape[p][axis] for p in parts)
        self._emit(node.output[0], "concat", parts, self.quant[parts[0]], tuple(shape), {"axis": axis})

    def _op_Clip(self, node):
        """Clip of integers: narrows the clamp of the op that produced its input (its only reader), or a clamp."""
        x = self._input(node, 0)
        q = self.quant[x]
        bounds = [int(self._const(node, node.input[k]).reshape(-1)[0]) if len(node.input) > k and node.input[k]
                  else default for k, default in ((1, q.qmin), (2, q.qmax))]
        lo, hi = max(bounds[0], q.qmin), min(bounds[1], q.qmax)
        producer = next((n for n in self.nodes if n.name == self.tensor_of[x]), None)
        if producer is not None and producer.attrs.get("clamp") and len(self.consumers.get(x, [])) == 1:
            before = producer.attrs["clamp"]
            producer.attrs["clamp"] = [max(before[0], lo), min(before[1], hi)]
            self._alias(node, x)
            return
        self._emit(node.output[0], "clamp", [x], q, self.shape[x], {"clamp": [lo, hi]})

    def _op_Cast(self, node):
        x = self._input(node, 0)
        if self._attrs(node).get("to") not in (self.onnx.TensorProto.INT32, self.onnx.TensorProto.INT64):
            raise self._fail(node, "casts to a type other than int32/int64 (qftsim reads Cast only as a table index)")
        self.index_of[node.output[0]] = (x, 0)

    def _op_Add(self, node):
        index, other = (node.input if node.input[0] in self.index_of else node.input[::-1])
        if index not in self.index_of or other not in self.consts:
            raise self._fail(node, "is a plain Add; qftsim reads it only as an offset of a table index")
        x, offset = self.index_of[index]
        self.index_of[node.output[0]] = (x, offset + int(self.consts[other].reshape(-1)[0]))

    def _op_Gather(self, node):
        """Gather of a constant table by the codes of a tensor (Cast, plus -qmin): a lut."""
        table = self.consts.get(node.input[0])
        if table is None or node.input[1] not in self.index_of or int(self._attrs(node).get("axis", 0)) != 0:
            raise self._fail(node, "is not a lookup of a constant table by a tensor's codes")
        x, offset = self.index_of[node.input[1]]
        q_in = self.quant[x]
        q_out = self.stated.get(node.output[0]) or self._consumer_quant(node.output[0])
        if table.shape != (q_in.qmax - q_in.qmin + 1,) or offset != -q_in.qmin or q_out is None \
                or table.dtype != q_out.dtype:
            raise self._fail(node, f"is a lookup whose table ({table.shape}, {table.dtype}) or index offset ({offset}) "
                             "does not map every input code, or whose output quantization no reader states")
        self._table_node(node, node.output[0], x, table.astype(np.int64), q_out)

    def _op_Pad(self, node):
        """A constant Pad of H and W by the zero point (a padded convolution's input): folded into the conv."""
        x = self._input(node, 0)
        a = self._attrs(node)
        mode = a.get("mode", b"constant")
        pads = [int(v) for v in self._const(node, node.input[1])]
        value = int(self._const(node, node.input[2]).reshape(-1)[0]) if len(node.input) > 2 and node.input[2] else 0
        rank = len(self.shape[x])
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant" or rank != 4 or len(node.input) > 3 \
                or any(pads[i] for i in (0, 1, 4, 5)) or value != self.quant[x].zero_point or min(pads) < 0:
            raise self._fail(node, "is not a constant Pad of height and width by the zero point; qftsim imports "
                             "that one (into the convolution after it)")
        top, left, bottom, right = pads[2], pads[3], pads[6], pads[7]
        n, c, h, w = self.shape[x]
        self.pending_pad[node.output[0]] = (x, [top, left, bottom, right])
        self.shape[node.output[0]] = (n, c, h + top + bottom, w + left + right)
