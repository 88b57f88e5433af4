"""Integer models made by other tools, turned into IntModels: fully-int8 TFLite (`from_tflite`).

The flatbuffer is read with the schema module that ships with ai-edge-litert.
TFLite lays tensors out NHWC; an IntModel is NCHW, so weights are transposed
and an imported model takes and gives (batch, C, H, W) integers. Each op's
multipliers are derived from the file's float32 scales the way the engine of
the chosen profile derives them (double for TFLite's fixed-point kernels,
float32 for XNNPACK), so the simulator computes that engine's integers.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from qftsim import arith
from qftsim.errors import QftsimError
from qftsim.intmodel import IntModel, ModelInput, Node, TensorQuant, stored_requant
from qftsim.profile import HardwareProfile, load_profile

TFLITE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "ADD", "MUL", "AVERAGE_POOL_2D",
              "MAX_POOL_2D", "MEAN", "CONCATENATION", "SPLIT", "STRIDED_SLICE", "RESHAPE", "PAD", "TRANSPOSE",
              "RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR", "LOGISTIC", "TANH", "HARD_SWISH", "QUANTIZE",
              "DEQUANTIZE")
INT8_CODES = np.arange(-128, 128)
TO_NHWC = (0, 2, 3, 1)


def _schema():
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:
        raise QftsimError("reading .tflite files needs the ai-edge-litert package (pip install ai-edge-litert)") \
            from None
    return schema_py_generated


def from_tflite(source: str | Path | bytes, profile: str | HardwareProfile) -> IntModel:
    """The IntModel that computes what `profile`'s engine computes for a fully-int8 .tflite model."""
    data = source if isinstance(source, bytes) else _read(Path(source))
    return _TfliteImporter(data, load_profile(profile), str(source)[:80] if not isinstance(source, bytes)
                           else "<bytes>").run()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise QftsimError(f"{path}: cannot read ({exc.strerror})") from None


def unique_name(raw: str, taken: set[str], fallback: str) -> str:
    """An IntModel tensor name from a file's tensor name (safe characters, at most 48, unique in `taken`,
    which it joins)."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", raw)[-48:].strip("._") or fallback
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def engine_multipliers(profile: HardwareProfile, op_kind: str, s_in: float, s_w: np.ndarray, s_out: float,
                       divisor: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The stored (m, t) arrays for s_in * s_w / (s_out * divisor), computed from float32 scales as the profile's
    engine computes them (the exporter solves the same function for the weight scales)."""
    arithmetic = profile.arithmetic(op_kind)
    rq = profile.requant
    real = arith.engine_real(s_in, s_w, s_out, arithmetic.scheme, divisor)
    m, t = arith.op_multipliers(np.asarray(real, dtype=np.float64), arithmetic.scheme, rq.multiplier_bits,
                                rq.shift_range)
    stored = stored_requant(m, t, arithmetic.scheme)
    return stored["multiplier"], stored["shift"]


def activation_bounds(q: TensorQuant, activation: str) -> list[int]:
    """The integer bounds of a fused activation (none, relu, relu6, relu_n1_to_1) on a tensor quantized as q,
    as TFLite's CalculateActivationRangeQuantized sets them: zero_point + TfLiteRound(f / scale) in float32."""
    def level(real: float) -> int:
        v = np.float32(real) / np.float32(q.scale)
        return q.zero_point + int(np.trunc(v + np.copysign(np.float32(0.5), v)))

    lo, hi = {"none": (q.qmin, q.qmax), "relu": (max(q.qmin, q.zero_point), q.qmax),
              "relu6": (max(q.qmin, q.zero_point), min(q.qmax, level(6.0))),
              "relu_n1_to_1": (max(q.qmin, level(-1.0)), min(q.qmax, level(1.0)))}[activation]
    return [lo, hi]


def float_table(q_in: TensorQuant, q_out: TensorQuant, function) -> np.ndarray:
    """TFLite's int8 table of a float function (LUTPopulate, in float32): round(f(s_in * (q - z_in)) / s_out),
    ties away from zero, plus z_out, for every input code."""
    real = np.float32(q_in.scale) * (INT8_CODES - q_in.zero_point).astype(np.float32)
    scaled = function(real).astype(np.float32) * (np.float32(1) / np.float32(q_out.scale))
    return np.trunc(scaled + np.copysign(np.float32(0.5), scaled)).astype(np.int64) + q_out.zero_point


# TFLite's table ops: their int8 tables from the input and output quantization (LOGISTIC and HARD_SWISH
# measured equal in all three LiteRT engines, TANH as well)
TABLE_OPS = {
    "LOGISTIC": lambda q_in, q_out: float_table(q_in, q_out, lambda v: np.float32(1) / (np.float32(1) + np.exp(-v))),
    "TANH": lambda q_in, q_out: float_table(q_in, q_out, np.tanh),
    "HARD_SWISH": lambda q_in, q_out: tflite_hard_swish_table(q_in, q_out),
}


class _TfliteImporter:
    def __init__(self, data: bytes, profile: HardwareProfile, source: str):
        fb = _schema()
        self.fb, self.profile, self.source, self.data = fb, profile, source, data
        if len(data) < 8 or data[4:8] != b"TFL3":
            raise QftsimError(f"{source}: not a TFLite flatbuffer (no TFL3 identifier)")
        try:
            self.model = fb.ModelT.InitFromPackedBuf(data, 0)
        except Exception as exc:  # a damaged flatbuffer fails anywhere in the generated reader
            raise QftsimError(f"{source}: unreadable TFLite flatbuffer ({type(exc).__name__})") from None
        if not self.model.subgraphs or len(self.model.subgraphs) != 1:
            raise QftsimError(f"{source}: expected one subgraph, found {len(self.model.subgraphs or [])}")
        self.graph = self.model.subgraphs[0]
        self.op_names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
        self.nodes: list[Node] = []
        self.tensor_of: dict[int, str] = {}  # tflite tensor index -> IntModel tensor name
        self.pending_pad: dict[int, list[int]] = {}  # PAD output -> [top, left, bottom, right]
        self.hwc_flat: dict[int, tuple[int, int, int]] = {}  # flattened NHWC tensor -> its (H, W, C)
        self.nchw: set[int] = set()  # 4-D tensors laid out NCHW: a channels-first input before its TRANSPOSE
        self.names: set[str] = set()

    # ------------------------------------------------------------ tensors

    def _tensor(self, index: int):
        return self.graph.tensors[index]

    def _tname(self, index: int) -> str:
        name = self._tensor(index).name
        return name.decode() if isinstance(name, bytes) else (name or f"t{index}")

    def _quant(self, index: int) -> TensorQuant:
        t = self._tensor(index)
        q = t.quantization
        if t.type != self.fb.TensorType.INT8 or q is None or q.scale is None or len(q.scale) != 1:
            raise self._fail_tensor(index, "is not a per-tensor int8 tensor (the model must be fully int8)")
        return TensorQuant(8, True, int(q.zeroPoint[0]), float(np.float32(q.scale[0])))

    def _scales(self, index: int) -> np.ndarray:
        return np.asarray(self._tensor(index).quantization.scale, dtype=np.float32)

    def _const(self, index: int) -> np.ndarray:
        t = self._tensor(index)
        buffer = self.model.buffers[t.buffer]
        data = buffer.data
        if data is None and buffer.offset > 1:  # large models keep buffers after the flatbuffer itself
            data = np.frombuffer(self.data, dtype=np.uint8)[buffer.offset:buffer.offset + buffer.size]
        if data is None or len(data) == 0:
            raise self._fail_tensor(index, "should be a constant but holds no data")
        dtype = {self.fb.TensorType.INT8: np.int8, self.fb.TensorType.INT32: np.int32,
                 self.fb.TensorType.INT64: np.int64}.get(t.type)
        if dtype is None:
            raise self._fail_tensor(index, "is a constant of an unsupported type")
        return np.frombuffer(bytes(np.asarray(data, dtype=np.uint8)), dtype=dtype).reshape(list(t.shape))

    def _shape(self, index: int) -> tuple[int, ...]:
        return tuple(int(v) for v in self._tensor(index).shape)

    def _hwc(self, index: int) -> tuple[int, int, int]:
        """Height, width and channels of a 4-D tensor, whichever its layout."""
        n, a, b, c = self._shape(index)
        return (b, c, a) if index in self.nchw else (a, b, c)

    def _consumers(self, index: int) -> list:
        return [o for o in self.graph.operators if index in list(o.inputs)]

    def _channels_first_input(self, index: int) -> bool:
        """Whether the input is NCHW: a TRANSPOSE to NHWC takes it, directly or after a PAD (litert-torch's edge)."""
        for op in self._consumers(index):
            if self._code(op) == "PAD" and op.inputs[0] == index:
                return self._channels_first_input(op.outputs[0])
            if self._code(op) == "TRANSPOSE" and tuple(self._const(op.inputs[1]).reshape(-1)) == TO_NHWC:
                return True
        return False

    def _fail_tensor(self, index: int, message: str) -> QftsimError:
        return QftsimError(f"{self.source}: tensor {index} ({self._tname(index)!r}) {message}")

    def _new_name(self, index: int) -> str:
        return unique_name(self._tname(index), self.names, f"t{index}")

    # ------------------------------------------------------------ graph

    def run(self) -> IntModel:
        g = self.graph
        if len(g.inputs) != 1:
            raise QftsimError(f"{self.source}: the model has {len(g.inputs)} inputs; qftsim imports one")
        inputs = []
        (first,) = g.inputs
        ops = list(enumerate(g.operators or []))
        # a float input quantized by the first op: the model's input is that op's int8 output
        if ops and self._code(ops[0][1]) == "QUANTIZE" and ops[0][1].inputs[0] == first:
            first = ops[0][1].outputs[0]
            ops = ops[1:]
        shape = self._shape(first)
        if len(shape) == 4 and self._channels_first_input(first):
            self.nchw.add(first)
            shape = shape[1:]
        elif len(shape) == 4:
            shape = (shape[3], shape[1], shape[2])
        elif len(shape) == 2:
            shape = (shape[1],)
        else:
            raise self._fail_tensor(first, f"is the model input with shape {shape}; expected NHWC or (N, features)")
        name = self._new_name(first)
        inputs.append(ModelInput(name, shape, self._quant(first)))
        self.tensor_of[first] = name
        outputs = list(g.outputs)
        edge = [i for i, op in ops if self._code(op) == "DEQUANTIZE" and op.outputs[0] in outputs]
        unknown = [f"op {i} ({self._code(op)}) producing tensor {op.outputs[0]} ({self._tname(op.outputs[0])!r})"
                   for i, op in ops if i not in edge and (self._code(op) in ("QUANTIZE", "DEQUANTIZE")
                                                          or not hasattr(self, f"_op_{self._code(op).lower()}"))]
        if unknown:  # every one at once, before any work
            raise QftsimError(f"{self.source}: {'; '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                              f"supported; supported: {', '.join(TFLITE_OPS)} (QUANTIZE/DEQUANTIZE only at the edges)")
        for i, op in ops:
            code = self._code(op)
            if i in edge:
                outputs[outputs.index(op.outputs[0])] = op.inputs[0]
                continue
            handler = getattr(self, f"_op_{code.lower()}")
            for src in op.inputs:
                if src >= 0 and self._tensor(src).buffer == 0 and src not in self.tensor_of \
                        and src not in self.pending_pad:
                    raise self._fail_tensor(src, f"feeds op {i} ({code}) but is not produced before it")
            handler(i, op)
        missing = [o for o in outputs if o not in self.tensor_of]
        if missing:
            raise self._fail_tensor(missing[0], "is a model output that no supported op produces")
        try:
            return IntModel(self.profile, inputs, self.nodes, [self.tensor_of[o] for o in outputs])
        except QftsimError as exc:
            raise QftsimError(f"{self.source}: does not fit profile {self.profile.name}: {exc}") from None

    def _code(self, op) -> str:
        oc = self.model.operatorCodes[op.opcodeIndex]
        code = max(oc.builtinCode, oc.deprecatedBuiltinCode)
        return self.op_names.get(code, f"builtin {code}")

    def _emit(self, out_index: int, op: str, inputs: list[str], attrs: dict, arrays: dict | None = None,
              quant: TensorQuant | None = None) -> str:
        name = self._new_name(out_index)
        self.nodes.append(Node(name, op, inputs, quant or self._quant(out_index), attrs, arrays or {}))
        self.tensor_of[out_index] = name
        return name

    def _clamp(self, activation: int, out_index: int) -> list[int]:
        """The integer bounds of a fused activation."""
        names = {v: k.lower() for k, v in vars(self.fb.ActivationFunctionType).items() if not k.startswith("_")}
        if names.get(activation) not in ("none", "relu", "relu6", "relu_n1_to_1"):
            raise self._fail_tensor(out_index, f"has fused activation {activation}, which qftsim does not import")
        return activation_bounds(self._quant(out_index), names[activation])

    # ------------------------------------------------------------ requantization

    def _multipliers(self, op_kind: str, s_in: float, s_w: np.ndarray, s_out: float, divisor: int = 1):
        return engine_multipliers(self.profile, op_kind, s_in, s_w, s_out, divisor)

    # ------------------------------------------------------------ ops

    def _padding(self, opt, in_hw, kernel, stride, dilation=(1, 1)) -> list[int]:
        if opt.padding == self.fb.Padding.VALID:
            return [0, 0, 0, 0]
        pads = []
        for size, k, s, d in zip(in_hw, kernel, stride, dilation):
            out = -(-size // s)
            pads.append(max((out - 1) * s + (k - 1) * d + 1 - size, 0))
        return [pads[0] // 2, pads[1] // 2, pads[0] - pads[0] // 2, pads[1] - pads[1] // 2]

    def _conv_input(self, index: int) -> tuple[str, list[int]]:
        """The conv's input tensor and any PAD folded into it (top, left, bottom, right)."""
        if index in self.pending_pad:
            src, pads = self.pending_pad[index]
            return self.tensor_of[src], pads
        return self.tensor_of[index], [0, 0, 0, 0]

    def _op_pad(self, i, op):
        x, out, paddings = op.inputs[0], op.outputs[0], self._const(op.inputs[1]).astype(np.int64)
        h_axis, w_axis = (2, 3) if x in self.nchw else (1, 2)
        spatial = {h_axis, w_axis}
        if len(self._shape(x)) != 4 or any(paddings[a].any() for a in range(4) if a not in spatial):
            raise self._fail_tensor(out, f"is a PAD (op {i}) of batch or channels; only H and W fold")
        if self._quant(x) != self._quant(out) or x in self.pending_pad:
            raise self._fail_tensor(out, f"is a PAD (op {i}) that changes quantization or follows another PAD")
        consumers = self._consumers(out)
        if not consumers or any(self._code(c) not in ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE")
                                or c.inputs[0] != out for c in consumers):
            raise self._fail_tensor(out, f"is a PAD (op {i}) that does not feed only convolutions; "
                                    "qftsim folds PAD into the next conv")
        if x in self.nchw:
            self.nchw.add(out)
        self.pending_pad[out] = (x, [int(paddings[h_axis][0]), int(paddings[w_axis][0]), int(paddings[h_axis][1]),
                                     int(paddings[w_axis][1])])

    def _op_transpose(self, i, op):
        """The channels-first input's TRANSPOSE to NHWC: qftsim's tensors are channels-first already."""
        x, out = op.inputs[0], op.outputs[0]
        perm = tuple(int(v) for v in self._const(op.inputs[1]).reshape(-1))
        if x not in self.nchw or perm != TO_NHWC:
            raise self._fail_tensor(out, f"is a TRANSPOSE (op {i}) with perm {list(perm)}; qftsim imports only the "
                                    "one that turns a channels-first input into NHWC")
        if self._quant(x) != self._quant(out):
            raise self._fail_tensor(out, f"is a TRANSPOSE (op {i}) that changes quantization")
        if x in self.pending_pad:
            self.pending_pad[out] = self.pending_pad[x]
        else:
            self.tensor_of[out] = self.tensor_of[x]

    def _conv_common(self, i, op, weight_oihw: np.ndarray, groups: int, kind: str):
        """A CONV_2D or DEPTHWISE_CONV_2D (kind) as a conv2d node that keeps which kernel it was."""
        opt = op.builtinOptions
        src, pads = self._conv_input(op.inputs[0])
        x = self.pending_pad[op.inputs[0]][0] if op.inputs[0] in self.pending_pad else op.inputs[0]
        h, w, _ = self._hwc(x)
        h, w = h + pads[0] + pads[2], w + pads[1] + pads[3]
        kernel, stride = weight_oihw.shape[2:], (opt.strideH, opt.strideW)
        dilation = (opt.dilationHFactor or 1, opt.dilationWFactor or 1)
        same = self._padding(opt, (h, w), kernel, stride, dilation)
        padding = [a + b for a, b in zip(pads, same)]
        q_in, out = self._quant(x), op.outputs[0]
        bias = self._bias(op, weight_oihw.shape[0])
        m, t = self._multipliers(kind, q_in.scale, self._per_channel(op.inputs[1], weight_oihw.shape[0]),
                                 self._quant(out).scale)
        self._emit(out, "conv2d", [src], {"stride": list(stride), "padding": padding, "dilation": list(dilation),
                                          "groups": groups, "clamp": self._clamp(opt.fusedActivationFunction, out),
                                          "depthwise": kind == "depthwise_conv2d"},
                   {"weight": weight_oihw.astype(np.int8), "bias": bias, "multiplier": m, "shift": t})

    def _per_channel(self, weight_index: int, channels: int) -> np.ndarray:
        s = self._scales(weight_index)
        zp = np.asarray(self._tensor(weight_index).quantization.zeroPoint)
        if zp.size and zp.any():
            raise self._fail_tensor(weight_index, "has nonzero weight zero points; TFLite's int8 weights are symmetric")
        return np.broadcast_to(s, (channels,)).copy() if s.size == 1 else s

    def _bias(self, op, channels: int, position: int = 2) -> np.ndarray:
        if len(op.inputs) <= position or op.inputs[position] < 0:
            return np.zeros(channels, dtype=np.int32)
        return self._const(op.inputs[position]).astype(np.int32).reshape(channels)

    def _op_conv_2d(self, i, op):
        w = self._const(op.inputs[1])  # OHWI
        self._conv_common(i, op, w.transpose(0, 3, 1, 2), 1, "conv2d")

    def _op_depthwise_conv_2d(self, i, op):
        w = self._const(op.inputs[1])  # 1, H, W, C * multiplier
        x = self.pending_pad[op.inputs[0]][0] if op.inputs[0] in self.pending_pad else op.inputs[0]
        channels = self._hwc(x)[2]
        self._conv_common(i, op, w.transpose(3, 0, 1, 2), channels, "depthwise_conv2d")

    def _op_fully_connected(self, i, op):
        x, out = op.inputs[0], op.outputs[0]
        w = self._const(op.inputs[1]).astype(np.int8)
        if x in self.hwc_flat:  # the flatten was NHWC order: reorder the columns to qftsim's CHW order
            h, wd, c = self.hwc_flat[x]
            w = w.reshape(w.shape[0], h, wd, c).transpose(0, 3, 1, 2).reshape(w.shape[0], -1)
        if len(self._shape(x)) != 2:
            raise self._fail_tensor(x, "feeds a FULLY_CONNECTED with rank != 2; reshape it first")
        m, t = self._multipliers("linear", self._quant(x).scale, self._per_channel(op.inputs[1], w.shape[0]),
                                 self._quant(out).scale)
        opt = op.builtinOptions
        self._emit(out, "linear", [self.tensor_of[x]], {"clamp": self._clamp(opt.fusedActivationFunction, out)},
                   {"weight": w, "bias": self._bias(op, w.shape[0]), "multiplier": m, "shift": t})

    def _op_add(self, i, op):
        a, b = op.inputs
        out = op.outputs[0]
        if self._shape(a) != self._shape(b):
            raise self._fail_tensor(out, f"is an ADD (op {i}) with broadcasting, which qftsim does not import")
        qa, qb, qo = self._quant(a), self._quant(b), self._quant(out)
        arithmetic, rq = self.profile.arithmetic("add"), self.profile.requant
        if arithmetic.form == "single_multiplier":
            # XNNPACK: scale ratios in float32, shift from the larger one's exponent, ~21-bit multipliers
            ratios = [np.float32(q.scale) / np.float32(qo.scale) for q in (qa, qb)]
            shift = 20 - (int(np.frexp(max(ratios))[1]) - 1)
            multipliers = [int(np.rint(np.ldexp(r, shift))) for r in ratios]
            attrs = {"input_multipliers": multipliers, "input_shifts": [0, 0], "multiplier": 1, "shift": shift,
                     "left_shift": 0}
        else:  # TFLite: both inputs to twice the larger scale after a left shift, then the sum (in double)
            left = self.profile.ops.add_left_shift
            reals = arith.tflite_add_reals(qa.scale, qb.scale, qo.scale, left)
            pairs = [arith.quantize_multiplier(float(r), rq.multiplier_bits, rq.shift_range) for r in reals]
            attrs = {"input_multipliers": [pairs[0][0], pairs[1][0]], "input_shifts": [pairs[0][1], pairs[1][1]],
                     "multiplier": pairs[2][0], "shift": pairs[2][1], "left_shift": left}
        attrs["clamp"] = self._clamp(op.builtinOptions.fusedActivationFunction, out)
        self._emit(out, "add", [self.tensor_of[a], self.tensor_of[b]], attrs)

    def _pool(self, i, op, kind: str):
        x, out = op.inputs[0], op.outputs[0]
        opt = op.builtinOptions
        if self._quant(x) != self._quant(out):
            raise self._fail_tensor(out, f"is a pool (op {i}) whose output quantization differs from its input's")
        _, h, w, _ = self._shape(x)
        kernel, stride = [opt.filterHeight, opt.filterWidth], [opt.strideH, opt.strideW]
        attrs = {"kernel": kernel, "stride": stride, "padding": self._padding(opt, (h, w), kernel, stride)}
        if kind == "avgpool2d":
            attrs["count_include_pad"] = False
        clamp = self._clamp(opt.fusedActivationFunction, out)
        q = self._quant(out)
        if clamp == [q.qmin, q.qmax]:
            self._emit(out, kind, [self.tensor_of[x]], attrs)
            return
        pooled = self._emit(out, kind, [self.tensor_of[x]], attrs)
        self.nodes.append(Node(f"{pooled}_act", "clamp", [pooled], q, {"clamp": clamp}))
        self.names.add(f"{pooled}_act")
        self.tensor_of[out] = f"{pooled}_act"

    def _op_average_pool_2d(self, i, op):
        self._pool(i, op, "avgpool2d")

    def _op_max_pool_2d(self, i, op):
        self._pool(i, op, "maxpool2d")

    def _op_mean(self, i, op):
        """MEAN over height and width: the sum of the centred values times about s_in / (s_out * H * W)."""
        x, out = op.inputs[0], op.outputs[0]
        axes = sorted(int(a) % 4 for a in self._const(op.inputs[1]).reshape(-1))
        if len(self._shape(x)) != 4 or axes != [1, 2]:
            raise self._fail_tensor(out, f"is a MEAN (op {i}) over axes {axes}; qftsim imports the mean over H and W")
        _, h, w, c = self._shape(x)
        count = h * w
        if self.profile.arithmetic("mean").scheme == "fixed_point":
            m0, t0 = self._multipliers("mean", self._quant(x).scale, np.ones(1, dtype=np.float32),
                                       self._quant(out).scale)
            m_int, t_int = arith.tflite_mean_multiplier(int(m0[0]), int(t0[0]), count,
                                                        self.profile.requant.shift_range[1])
            m, t = np.array([m_int], dtype=np.int32), np.array([t_int], dtype=t0.dtype)
        else:  # XNNPACK: s_in / (s_out * count) in float32
            m, t = self._multipliers("mean", self._quant(x).scale, np.ones(1, dtype=np.float32),
                                     self._quant(out).scale, divisor=count)
        q = self._quant(out)
        name = self._emit(out, "mean", [self.tensor_of[x]], {"clamp": [q.qmin, q.qmax]},
                          {"multiplier": m, "shift": t})
        if self._shape(out) == (self._shape(x)[0], 1, 1, c):  # keep_dims
            self.nodes.append(Node(f"{name}_hw", "reshape", [name], q, {"shape": [c, 1, 1]}))
            self.names.add(f"{name}_hw")
            self.tensor_of[out] = f"{name}_hw"

    def _table(self, i, op) -> None:
        """A TFLite table op as the 256-entry table of its int8 outputs, indexed by the input code + 128."""
        table = TABLE_OPS[self._code(op)](self._quant(op.inputs[0]), self._quant(op.outputs[0]))
        self._emit(op.outputs[0], "lut", [self.tensor_of[op.inputs[0]]], {},
                   {"table": np.clip(table, -128, 127).astype(np.int8)})

    _op_logistic = _op_tanh = _op_hard_swish = _table

    def _op_concatenation(self, i, op):
        out = op.outputs[0]
        rank = len(self._shape(out))
        axis = op.builtinOptions.axis % rank
        if axis != rank - 1:
            raise self._fail_tensor(out, f"is a CONCATENATION (op {i}) on axis {axis}; qftsim concatenates channels")
        q = self._quant(out)
        if any(self._quant(x) != q for x in op.inputs):
            raise self._fail_tensor(out, f"is a CONCATENATION (op {i}) of differently quantized inputs, which "
                                    "qftsim does not import yet")
        self._emit(out, "concat", [self.tensor_of[x] for x in op.inputs], {})

    def _op_mul(self, i, op):
        """The product of the centred inputs (one may broadcast: a (1, 1, 1, C) gate) times about
        s_a * s_b / s_out."""
        a, b = op.inputs
        out = op.outputs[0]
        for x in (a, b):
            if x not in self.tensor_of:
                raise self._fail_tensor(x, f"is a constant operand of MUL (op {i}); qftsim multiplies two tensors")
        m, t = self._multipliers("mul", self._quant(a).scale, self._scales(b)[:1], self._quant(out).scale)
        self._emit(out, "mul", [self.tensor_of[a], self.tensor_of[b]],
                   {"clamp": self._clamp(op.builtinOptions.fusedActivationFunction, out)},
                   {"multiplier": m, "shift": t})

    def _axis(self, index: int, axis: int) -> int:
        """The IntModel (channels-first) axis of a TFLite tensor's axis."""
        rank = len(self._shape(index))
        axis %= rank
        return {1: 2, 2: 3, 3: 1}.get(axis, 0) if rank == 4 and index not in self.nchw else axis

    def _slice(self, i, x: int, out: int, bounds: dict[int, tuple[int, int]]) -> None:
        """out = x restricted to [start, stop) on each TFLite axis of `bounds`: one slice node per cut axis."""
        if self._quant(x) != self._quant(out):
            raise self._fail_tensor(out, f"is a slice (op {i}) that changes quantization")
        shape = self._shape(x)
        cuts = {a: r for a, r in bounds.items() if r != (0, shape[a])}
        if 0 in cuts:
            raise self._fail_tensor(out, f"slices the batch (op {i}); qftsim slices the other axes")
        name = self.tensor_of[x]
        self.tensor_of[out] = name
        for axis, (start, stop) in sorted(cuts.items()):  # the last one names the tensor
            name = self._emit(out, "slice", [name], {"axis": self._axis(x, axis), "start": start, "stop": stop})

    def _op_split(self, i, op):
        axis_index, x = op.inputs
        axis = int(self._const(axis_index).reshape(-1)[0]) % len(self._shape(x))
        parts, size = len(op.outputs), self._shape(x)[axis]
        shape = self._shape(x)
        for k, out in enumerate(op.outputs):
            bounds = {a: (0, n) for a, n in enumerate(shape)}
            bounds[axis] = (k * size // parts, (k + 1) * size // parts)
            self._slice(i, x, out, bounds)

    def _op_strided_slice(self, i, op):
        x, out = op.inputs[0], op.outputs[0]
        opt = op.builtinOptions
        begin, end, strides = (self._const(v).reshape(-1).astype(np.int64) for v in op.inputs[1:4])
        if strides.any() and (strides != 1).any() or opt.ellipsisMask or opt.newAxisMask or opt.shrinkAxisMask:
            raise self._fail_tensor(out, f"is a STRIDED_SLICE (op {i}) with strides, ellipsis, new or shrunk axes; "
                                    "qftsim imports contiguous slices")
        shape = self._shape(x)
        bounds = {}
        for a, n in enumerate(shape):
            start = 0 if opt.beginMask >> a & 1 else int(begin[a])
            stop = n if opt.endMask >> a & 1 else int(end[a]) + (start if opt.offset else 0)
            bounds[a] = slice(start, stop).indices(n)[:2]
        self._slice(i, x, out, bounds)

    def _resize(self, i, op, mode: str):
        x, out = op.inputs[0], op.outputs[0]
        opt = op.builtinOptions
        (_, h, w, _), (_, ho, wo, _) = self._shape(x), self._shape(out)
        if self._quant(x) != self._quant(out):
            raise self._fail_tensor(out, f"is a resize (op {i}) that changes quantization")
        if opt.alignCorners:
            raise self._fail_tensor(out, f"is a resize (op {i}) with align_corners, which qftsim does not import")
        if mode == "bilinear" and not opt.halfPixelCenters:
            raise self._fail_tensor(out, f"is a RESIZE_BILINEAR (op {i}) without half-pixel centres; qftsim imports "
                                    "torch's align_corners=False (half_pixel_centers: true)")
        if mode == "nearest":  # TFLite's float32 indices, taken only where they are qftsim's exact ones
            for size, new in ((h, ho), (w, wo)):
                position = (np.arange(new, dtype=np.float32) + np.float32(0.5 * opt.halfPixelCenters)) \
                    * np.float32(size / new)
                if not np.array_equal(np.minimum(np.floor(position).astype(np.int64), size - 1),
                                      arith.nearest_indices(size, new)):
                    raise self._fail_tensor(out, f"is a RESIZE_NEAREST_NEIGHBOR (op {i}) from {size} to {new} "
                                            "whose source indices are not floor(out * in / out_size)")
        self._emit(out, "resize", [self.tensor_of[x]], {"mode": mode, "size": [ho, wo]})

    def _op_resize_nearest_neighbor(self, i, op):
        self._resize(i, op, "nearest")

    def _op_resize_bilinear(self, i, op):
        self._resize(i, op, "bilinear")

    def _op_transpose_conv(self, i, op):
        """TRANSPOSE_CONV as zero insertion then a stride-1 conv with the flipped kernel: the same integer sums
        (an inserted zero point centres to zero) requantized by the conv's arithmetic."""
        _, weight_index, x = op.inputs[:3]
        out = op.outputs[0]
        opt = op.builtinOptions
        w = self._const(weight_index)  # O, H, W, I
        (_, h, wd, _), (_, ho, wo, _) = self._shape(x), self._shape(out)
        kernel, stride = w.shape[1:3], (opt.strideH, opt.strideW)
        padding = []
        for size, new, k, s in zip((h, wd), (ho, wo), kernel, stride):
            total = max((-(-new // s) - 1) * s + k - new, 0) if opt.padding == self.fb.Padding.SAME else 0
            before = k - 1 - total // 2
            padding.append((before, new - (size - 1) * s - 1 - before + k - 1))
        if min(min(p) for p in padding) < 0:
            raise self._fail_tensor(out, f"is a TRANSPOSE_CONV (op {i}) that crops more than its kernel; "
                                    "qftsim does not import it")
        q_in = self._quant(x)
        spread = self._new_name(out) + "_zeros"
        self.names.add(spread)
        self.nodes.append(Node(spread, "zero_insert", [self.tensor_of[x]], q_in, {"stride": list(stride)}))
        weight = w[:, ::-1, ::-1, :].transpose(0, 3, 1, 2)
        m, t = self._multipliers("transpose_conv2d", q_in.scale, self._per_channel(weight_index, w.shape[0]),
                                 self._quant(out).scale)
        bias = self._bias(op, w.shape[0], position=3)
        activation = opt.fusedActivationFunction
        (pt, pb), (pl, pr) = padding
        self._emit(out, "conv2d", [spread], {"stride": [1, 1], "padding": [pt, pl, pb, pr], "dilation": [1, 1],
                                             "groups": 1, "clamp": self._clamp(activation, out), "depthwise": False,
                                             "transposed": True},
                   {"weight": np.ascontiguousarray(weight).astype(np.int8), "bias": bias, "multiplier": m, "shift": t})

    def _op_reshape(self, i, op):
        x, out = op.inputs[0], op.outputs[0]
        src, dst = self._shape(x), self._shape(out)
        if self._quant(x) != self._quant(out):
            raise self._fail_tensor(out, f"is a RESHAPE (op {i}) that changes quantization")
        if len(dst) != 2 or dst[0] != src[0]:
            raise self._fail_tensor(out, f"is a RESHAPE (op {i}) to {dst}; qftsim imports flattening to (N, features)")
        if len(src) == 4 and src[1] * src[2] > 1:  # NHWC order: only an fc can take it (its columns reorder)
            consumers = [self._code(o) for o in self.graph.operators if out in list(o.inputs)]
            if out in list(self.graph.outputs) or set(consumers) != {"FULLY_CONNECTED"}:
                raise self._fail_tensor(out, f"is a RESHAPE (op {i}) of an (H, W, C) tensor that feeds "
                                        f"{', '.join(consumers) or 'the model output'}; qftsim imports such a "
                                        "flatten only into FULLY_CONNECTED")
            self.hwc_flat[out] = src[1:]
        self._emit(out, "reshape", [self.tensor_of[x]], {"shape": [dst[1]]})


# ---------------------------------------------------------------- TFLite's int8 HARD_SWISH, in integers

_I16 = (-(2**15), 2**15 - 1)


def _srdhm16(a: int, b: int) -> int:
    """gemmlowp's SaturatingRoundingDoublingHighMul on int16 values."""
    if a == b == _I16[0]:
        return _I16[1]
    ab = a * b
    n = ab + ((1 << 14) if ab >= 0 else 1 - (1 << 14))
    return abs(n) // (1 << 15) * (1 if n >= 0 else -1)


def _sdhm16(a: int, b: int) -> int:
    """TFLite's SaturatingDoublingHighMul on int16 values (truncating, no rounding)."""
    if a == b == _I16[0]:
        return _I16[1]
    return abs(a * b) // (1 << 15) * (1 if a * b >= 0 else -1)


def _saturating_left_shift16(v: int, amount: int) -> int:
    return max(_I16[0], min(_I16[1], v * (1 << amount)))


def _int16_multiplier(real: np.float32) -> tuple[int, int]:
    """QuantizeMultiplier, then DownScaleInt32ToInt16Multiplier: (int16 multiplier, exponent)."""
    m, t = arith.quantize_multiplier(float(real), 31)
    exponent = 31 - t
    m16 = _I16[1] if m >= 2**31 - 1 - (1 << 15) else (m + (1 << 15)) >> 16
    return m16, exponent


def tflite_hard_swish_table(q_in: TensorQuant, q_out: TensorQuant) -> np.ndarray:
    """The int8 outputs of TFLite's HARD_SWISH for every input code (reference_ops::HardSwish: int16 fixed
    point, the input on a 2^-7 finer scale, a 'reluish' ramp in Q15, their product shifted to the output);
    measured equal in all three LiteRT engines."""
    hires = np.float32(np.float32(1.0 / 128.0) * np.float32(q_in.scale))
    out_m, out_e = _int16_multiplier(np.float32(hires / np.float32(q_out.scale)))
    relu_m, relu_e = _int16_multiplier(np.float32(hires / np.float32(3.0 / 32768.0)))
    table = []
    for code in INT8_CODES:
        x = int(code - q_in.zero_point) * (1 << 7)
        on_output_scale = _srdhm16(x, out_m)
        reluish = _saturating_left_shift16(x, relu_e - 1) if relu_e > 0 else x
        reluish = _srdhm16(reluish, relu_m)
        if relu_e > 0:
            reluish = _saturating_left_shift16(reluish, 1)
        elif relu_e < 0:
            reluish = int(arith.rdbpot(np.int64(reluish), -relu_e))
        reluish = (reluish + (1 << 15)) >> 1
        table.append(int(arith.rdbpot(np.int64(_sdhm16(reluish, on_output_scale)), -out_e)) + q_out.zero_point)
    return np.array(table, dtype=np.int64)
