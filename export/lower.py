"""IntModel -> Relax IRModule, computing exactly what the simulator computes.

Requantization, rounding, wrap and saturation are not re-written here: the
int64 formulas of `qftsim.arith` run on `IntExpr`, a Relax tensor with
Python's integer operators, so the compiled code is those formulas.
Convolutions and matrix products accumulate in int32 where a static bound
proves no partial sum can overflow it, and in int64 otherwise (TVM marks
int32 arithmetic `nsw`: overflow would be undefined, never a wrap).
Saturation after every MAC is a TE reduction with a saturating reducer,
preloaded with the bias, over (input channel, kernel row, kernel column)
in that order; it is only emitted where a bound says saturation can happen.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx

from qftsim import arith
from qftsim.errors import QftsimError
from qftsim.intmodel import IntModel, Node, TensorQuant, node_arithmetic

INT32_SAFE = 2**31 - 1


class IntExpr:
    """An int64 or bool Relax tensor whose Python operators emit Relax ops into a BlockBuilder."""

    __hash__ = None  # == builds an expression
    __array_ufunc__ = None  # numpy defers to our reflected operators

    def __init__(self, bb: relax.BlockBuilder, expr: relax.Expr, dtype: str = "int64"):
        self.bb, self.expr, self.dtype = bb, expr, dtype

    def _lift(self, other):
        if isinstance(other, IntExpr):
            return other.expr
        value = np.asarray(other)
        if self.dtype.startswith("float"):  # a float expression takes float constants of its own width
            return relax.const(value.astype(self.dtype), dtype=self.dtype)
        dtype = "bool" if value.dtype == np.bool_ else "int64"
        return relax.const(value.astype(dtype), dtype=dtype)

    def _emit(self, op, other=None, dtype=None, swap=False):
        args = (self.expr,) if other is None else (self.expr, self._lift(other))
        if swap:
            args = args[::-1]
        return IntExpr(self.bb, self.bb.emit(op(*args)), dtype or self.dtype)

    def __add__(self, o): return self._emit(relax.op.add, o)
    def __radd__(self, o): return self._emit(relax.op.add, o)
    def __sub__(self, o): return self._emit(relax.op.subtract, o)
    def __rsub__(self, o): return self._emit(relax.op.subtract, o, swap=True)
    def __mul__(self, o): return self._emit(relax.op.multiply, o)
    def __rmul__(self, o): return self._emit(relax.op.multiply, o)
    def __floordiv__(self, o): return self._emit(relax.op.floor_divide, o)
    def __lshift__(self, o): return self._emit(relax.op.left_shift, o)
    def __rshift__(self, o): return self._emit(relax.op.right_shift, o)
    def __lt__(self, o): return self._emit(relax.op.less, o, "bool")
    def __le__(self, o): return self._emit(relax.op.less_equal, o, "bool")
    def __gt__(self, o): return self._emit(relax.op.greater, o, "bool")
    def __ge__(self, o): return self._emit(relax.op.greater_equal, o, "bool")
    def __eq__(self, o): return self._emit(relax.op.equal, o, "bool")

    def __and__(self, o):
        return self._emit(relax.op.logical_and if self.dtype == "bool" else relax.op.bitwise_and, o)

    __rand__ = __and__

    def __or__(self, o):
        return self._emit(relax.op.logical_or if self.dtype == "bool" else relax.op.bitwise_or, o)

    def floor(self):
        return IntExpr(self.bb, self.bb.emit(relax.op.floor(self.expr)), self.dtype)

    def select(self, mask: np.ndarray, a: "IntExpr", b: "IntExpr") -> "IntExpr":
        """a where the constant boolean `mask` holds, else b."""
        cond = relax.const(mask, dtype="bool")
        return IntExpr(self.bb, self.bb.emit(relax.op.where(cond, a.expr, b.expr)), a.dtype)

    def where(self, a, b):
        """Elementwise a where this boolean tensor holds, else b (in the dtype of whichever is a tensor)."""
        ref = a if isinstance(a, IntExpr) else b
        return IntExpr(self.bb, self.bb.emit(relax.op.where(self.expr, ref._lift(a), ref._lift(b))), ref.dtype)

    def astype(self, dtype):
        return IntExpr(self.bb, self.bb.emit(relax.op.astype(self.expr, np.dtype(dtype).name)), np.dtype(dtype).name)

    def clip(self, lo, hi):
        return IntExpr(self.bb, self.bb.emit(relax.op.clip(self.expr, int(lo), int(hi))), self.dtype)


arith.register_expression_type(IntExpr)


class StoredTensor(IntExpr):
    """A tensor in its storage dtype (`storage`); its int64 cast is emitted on first use of `expr`,
    so a lowering that reads the stored bytes itself adds no int64 tensor."""

    def __init__(self, bb: relax.BlockBuilder, storage: relax.Expr):
        self.bb, self.storage, self.dtype, self._expr = bb, storage, "int64", None

    @property
    def expr(self) -> relax.Expr:
        if self._expr is None:
            self._expr = self.bb.emit(relax.op.astype(self.storage, "int64"))
        return self._expr


def lower(model: IntModel, vnni: bool = False) -> tvm.IRModule:
    """A Relax module whose `main` maps the model's integer inputs (storage dtypes) to its outputs.

    `vnni`: lower eligible convolutions to the packed u8 x s8 layout of
    `_vnni_conv` (for a target with AVX-512 VNNI; see export.schedule).
    """
    bb = relax.BlockBuilder()
    lower_into(bb, model, "main", vnni)
    return bb.get()


def unlowered_arithmetic(profile) -> dict[str, str]:
    """The ops whose arithmetic in this profile has no TVM lowering yet (onnxruntime's float32 add, mul and
    average pool), each with what of it is missing."""
    missing = {"add": profile.arithmetic("add").form == "float32_fma" and "add form float32_fma (QLinearAdd)",
               "mul": profile.arithmetic("mul").zero_point == "float32" and "mul zero_point float32 (QLinearMul)",
               "avgpool2d": profile.arithmetic("avgpool2d").domain == "float32"
               and "avgpool2d domain float32 (QLinearAveragePool)"}
    return {op: what for op, what in missing.items() if what}


def lower_into(bb: relax.BlockBuilder, model: IntModel, func_name: str, vnni: bool = False) -> None:
    """Add `model` to `bb` as the function `func_name` (one module may hold many models)."""
    missing = unlowered_arithmetic(model.profile)
    used = [missing[op] for op in dict.fromkeys(n.op for n in model.nodes) if op in missing]
    if used:
        raise QftsimError(f"profile {model.profile.name}: {', '.join(used)} has no TVM lowering yet; simulate the "
                          "model, or run it in its own engine (onnxruntime)")
    batch = tirx.Var("batch", "int64")  # symbolic: one library serves every batch size
    params = [relax.Var(i.name, relax.TensorType((batch,) + tuple(i.shape), i.quant.dtype.name))
              for i in model.inputs]
    with bb.function(func_name, params):
        with bb.dataflow():
            # tensors between nodes keep their storage dtype (int8 mostly): int64 only inside a node
            env = {i.name: p for i, p in zip(model.inputs, params)}
            for node in model.nodes:
                lower_node = _lower_vnni_conv2d if vnni and _vnni_eligible(node, model) else _LOWER[node.op]
                xs = [StoredTensor(bb, env[s]) for s in node.inputs]
                y = lower_node(bb, node, xs, [model.quant_of(s) for s in node.inputs], model)
                env[node.name] = bb.emit(relax.op.astype(y.expr, node.quant.dtype.name))
            outs = [env[name] for name in model.outputs]
            result = bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
        bb.emit_func_output(result)


def _const(values, dtype="int64") -> relax.Expr:
    return relax.const(np.asarray(values).astype(dtype), dtype=dtype)


def _centered_peak(q: TensorQuant) -> int:
    return max(q.qmax - q.zero_point, q.zero_point - q.qmin)


def _emit_int(bb, call, dtype="int64") -> IntExpr:
    return IntExpr(bb, bb.emit(call), dtype)


def _matmul_epilogue(node: Node, exact: IntExpr, model: IntModel, channel_shape) -> IntExpr:
    """Requantization, zero point and clamp of the accumulator."""
    m = node.arrays["multiplier"].astype(np.int64).reshape(channel_shape)
    t = node.arrays["shift"].astype(np.int64).reshape(channel_shape)
    y = arith.requantize_channels(exact, m, t, node_arithmetic(node, model.profile), len(node.arrays["weight"]))
    y = y + node.quant.zero_point
    return y.clip(*node.attrs["clamp"])


def _row_l1(w: np.ndarray) -> np.ndarray:
    """sum |w| per output channel: the bound on |sum of products| per unit of input magnitude."""
    return np.abs(w).reshape(w.shape[0], -1).sum(axis=1)


def _accumulator_mode(node: Node, model: IntModel, q_in: TensorQuant):
    """What the accumulator needs: 'exact' (no overflow possible), 'final' or 'every_mac'; and the sum dtype."""
    w = node.arrays["weight"].astype(np.int64)
    bias = np.abs(node.arrays["bias"].astype(np.int64))
    worst = int((_row_l1(w) * _centered_peak(q_in) + bias).max())
    if worst <= model.profile.accumulator.range[1]:
        mode = "exact"
    elif model.profile.accumulator.saturate_at == "every_mac":
        mode = "every_mac"
    else:
        mode = "final"
    return mode, ("int32" if worst <= INT32_SAFE else "int64")


def _operand_dtype(q_in: TensorQuant, weight: np.ndarray, sum_dtype: str) -> str:
    """int16 operands (faster kernels) where centered inputs and weights fit, else the sum's type."""
    fits = _centered_peak(q_in) < 2**15 and np.abs(weight).max(initial=0) < 2**15
    return "int16" if sum_dtype == "int32" and fits else sum_dtype


def _apply_overflow(exact: IntExpr, model: IntModel) -> IntExpr:
    acc = model.profile.accumulator
    if acc.overflow == "wrap":
        return arith.wrap(exact, acc.bits)
    if acc.overflow == "saturate":
        return arith.saturate(exact, acc.bits)
    # 'error': the compiled model cannot raise; it computes the in-range case, and
    # `qftsim verify` / the simulator report overflow on the same inputs.
    return exact


def _lower_conv2d(bb, node, xs, qs, model):
    (x,), (q,) = xs, qs
    a = node.attrs
    w = node.arrays["weight"].astype(np.int64)
    pt, pl, pb, pr = a["padding"]
    mode, sum_dtype = _accumulator_mode(node, model, q)
    centered = x - q.zero_point
    bias = node.arrays["bias"].astype(np.int64)
    if mode == "every_mac":
        padded = bb.emit(relax.op.nn.pad(centered.expr, [0, 0, 0, 0, pt, pb, pl, pr], pad_value=0.0))
        exact = IntExpr(bb, bb.emit_te(
            _saturating_conv, padded, _const(w), _const(bias), a["stride"], a["dilation"], a["groups"],
            model.profile.accumulator.range))
    else:
        # the conv pads itself (zeros of the centered input), inside its own function: the producer's
        # epilogue then covers exactly its conv's output and is computed row by row (export.schedule)
        operand = _operand_dtype(q, w, sum_dtype)
        inp = bb.emit(relax.op.astype(centered.expr, operand))
        conv = bb.emit(relax.op.nn.conv2d(inp, _const(w, operand), strides=a["stride"], padding=(pt, pl, pb, pr),
                                          dilation=a["dilation"], groups=a["groups"], out_dtype=sum_dtype))
        exact = _emit_int(bb, relax.op.astype(conv, "int64")) + bias.reshape(1, -1, 1, 1)
        if mode == "final":
            exact = _apply_overflow(exact, model)
    return _matmul_epilogue(node, exact, model, (1, -1, 1, 1))


VNNI_LANES, VNNI_DEPTH = 16, 4  # vpdpbusd: 16 int32 sums, each of 4 u8 x s8 products
OUT_ELEMWISE_FUSABLE = 4  # relax's OpPatternKind kOutEWiseFusable


def _vnni_eligible(node: Node, model: IntModel) -> bool:
    """A dense (groups 1) conv with at most 8-bit inputs, int8 weights and an int32-safe u8 x s8 sum."""
    if node.op != "conv2d" or node.attrs["groups"] != 1:
        return False
    q = model.quant_of(node.inputs[0])
    w = node.arrays["weight"].astype(np.int64)
    mode, _ = _accumulator_mode(node, model, q)
    return (mode != "every_mac" and q.qmax - q.qmin <= 255 and w.min(initial=0) >= -128
            and w.max(initial=0) <= 127 and int(_row_l1(w).max(initial=0)) * 255 <= INT32_SAFE)


def _lower_vnni_conv2d(bb, node, xs, qs, model):
    """The conv as sum((x - qmin) * w) - (zero_point - qmin) * sum(w), in NCHW4c / OIHW16o4i layouts.

    Inputs become unsigned bytes (x - qmin); padding (spatial, and input
    channels up to a multiple of 4) holds the zero point's byte, so every
    padded position adds (zero_point - qmin) * w like a real one, and the
    per-channel correction removes it exactly (padded channels have w = 0).
    Output channels are padded to a multiple of 16 and sliced off again.
    """
    (x,), (q,) = xs, qs
    a = node.attrs
    w = node.arrays["weight"].astype(np.int64)
    out_channels, in_channels, kh, kw = w.shape
    pt, pl, pb, pr = a["padding"]
    in_pad = -in_channels % VNNI_DEPTH
    out_pad = -out_channels % VNNI_LANES
    zero_byte = q.zero_point - q.qmin
    packed = bb.emit_te(_vnni_pack, x.storage, q.qmin, zero_byte, (pt, pl, pb, pr))
    wp = np.pad(w, ((0, out_pad), (0, in_pad), (0, 0), (0, 0)))
    wp = wp.reshape(-1, VNNI_LANES, wp.shape[1] // VNNI_DEPTH, VNNI_DEPTH, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    nchw = bb.emit_te(_vnni_conv, packed, _const(wp, "int8"), a["stride"], a["dilation"], out_channels)
    # like a legalized conv2d, the requantization epilogue may fuse into it (export.schedule computes
    # it per register tile); a two-block function would otherwise be opaque to operator fusion
    gvar = bb.lookup_binding(nchw).args[0]
    bb.update_func(gvar, bb.get()[gvar].with_attr("op_pattern", OUT_ELEMWISE_FUSABLE))
    bias = node.arrays["bias"].astype(np.int64) - zero_byte * w.reshape(out_channels, -1).sum(axis=1)
    exact = IntExpr(bb, nchw) + bias.reshape(1, -1, 1, 1)
    if _accumulator_mode(node, model, q)[0] == "final":
        exact = _apply_overflow(exact, model)
    return _matmul_epilogue(node, exact, model, (1, -1, 1, 1))


def _vnni_pack(x, qmin: int, zero_byte: int, padding):
    """NCHW storage-dtype `x` as NCHW4c bytes x - qmin; padding and channels beyond x's hold `zero_byte`."""
    n, c, h, w = x.shape
    pt, pl, pb, pr = padding

    def byte(b, cb, y, x_, k):
        ch, yy, xx = cb * VNNI_DEPTH + k, y - pt, x_ - pl
        inside = tirx.all(ch < c, yy >= 0, yy < h, xx >= 0, xx < w)
        value = x[b, tirx.min(ch, c - 1), tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0)]
        return tirx.if_then_else(inside, value.astype("int32") - qmin, zero_byte).astype("uint8")

    return te.compute((n, (c + VNNI_DEPTH - 1) // VNNI_DEPTH, h + pt + pb, w + pl + pr, VNNI_DEPTH), byte,
                      name="vnni_pack")


def _vnni_conv(data, weight, stride, dilation, out_channels):
    """Conv of NCHW4c uint8 `data` with OIHW16o4i int8 `weight`: int32 sums in NCHW16c (block
    `vnni_conv`), returned as int64 NCHW with the first `out_channels` channels (block `vnni_unpack`)."""
    n, _, h, w, _ = data.shape
    ob, ib, kh, kw, lanes, depth = weight.shape
    ho = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    rc, ry, rx, rk = (te.reduce_axis((0, int(e)), name=nm) for e, nm in ((ib, "rc"), (kh, "ry"), (kw, "rx"),
                                                                           (depth, "rk")))
    packed = te.compute(
        (n, ob, ho, wo, lanes),
        lambda b, o, y, x, i: te.sum(
            data[b, rc, y * stride[0] + ry * dilation[0], x * stride[1] + rx * dilation[1], rk].astype("int32")
            * weight[o, rc, ry, rx, i, rk].astype("int32"), axis=[rc, ry, rx, rk]),
        name="vnni_conv")
    return te.compute((n, out_channels, ho, wo),
                      lambda b, c, y, x: packed[b, c // lanes, y, x, c % lanes].astype("int64"), name="vnni_unpack")


def _lower_linear(bb, node, xs, qs, model):
    (x,), (q,) = xs, qs
    w = node.arrays["weight"].astype(np.int64)
    bias = node.arrays["bias"].astype(np.int64)
    mode, sum_dtype = _accumulator_mode(node, model, q)
    centered = x - q.zero_point
    if mode == "every_mac":
        exact = IntExpr(bb, bb.emit_te(_saturating_dense, centered.expr, _const(w), _const(bias),
                                       model.profile.accumulator.range))
    else:
        operand = _operand_dtype(q, w, sum_dtype)
        inp = bb.emit(relax.op.astype(centered.expr, operand))
        prod = bb.emit(relax.op.matmul(inp, _const(w.T, operand), out_dtype=sum_dtype))
        exact = _emit_int(bb, relax.op.astype(prod, "int64")) + bias.reshape(1, -1)
        if mode == "final":
            exact = _apply_overflow(exact, model)
    return _matmul_epilogue(node, exact, model, (1, -1))


def _saturating_sum(term, count: int, bias, acc_range, name: str):
    """bias, then term(0), ..., term(count - 1), saturating after every addition, in that order.

    The bias is the reduction's first element (TE's `init` is not honoured
    by this TVM's lowering). Never schedule this reduction: it is not associative.
    """
    lo, hi = acc_range
    reducer = te.comm_reducer(
        lambda acc, value: tirx.max(tirx.min(acc + value, tirx.const(hi, "int64")), tirx.const(lo, "int64")),
        lambda dtype: tirx.const(0, dtype), name=name)
    r = te.reduce_axis((0, count + 1), name="r")
    return reducer(tirx.if_then_else(r == 0, bias, term(tirx.max(r - 1, 0))), axis=[r])


def _saturating_conv(padded, weight, bias, stride, dilation, groups, acc_range):
    """Conv that saturates after every MAC: bias, then (channel, row, column) in row-major order."""
    n, c, h, w = padded.shape
    o, cg, kh, kw = weight.shape
    og = o // groups
    ho = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1

    def output(b, oc, y, x):
        def term(k):
            rc, ry, rx = k // (kh * kw), (k // kw) % kh, k % kw
            return (padded[b, (oc // og) * cg + rc, y * stride[0] + ry * dilation[0], x * stride[1] + rx * dilation[1]]
                    * weight[oc, rc, ry, rx])
        return _saturating_sum(term, int(cg * kh * kw), bias[oc], acc_range, "saturating_conv_sum")

    return te.compute((n, o, ho, wo), output, name="saturating_conv")


def _saturating_dense(x, weight, bias, acc_range):
    """Dense product that saturates after every MAC: bias, then inputs in order."""
    n, k = x.shape
    o = weight.shape[0]
    return te.compute((n, o), lambda b, oc: _saturating_sum(lambda i: x[b, i] * weight[oc, i], int(k), bias[oc],
                                                           acc_range, "saturating_dense_sum"),
                      name="saturating_dense")


def _lower_add(bb, node, xs, qs, model):
    a = node.attrs
    terms = [(x - q.zero_point) << a["left_shift"] for x, q in zip(xs, qs)]
    y = arith.add_requantized(terms, a["input_multipliers"], a["input_shifts"], a["multiplier"], a["shift"],
                              node_arithmetic(node, model.profile), model.shapes[node.name])
    return (y + node.quant.zero_point).clip(*a["clamp"])


def _lower_mul(bb, node, xs, qs, model):
    (a, b), (qa, qb) = xs, qs
    op = node_arithmetic(node, model.profile)
    m, t = (int(node.arrays[k][0]) for k in ("multiplier", "shift"))
    y = arith.requantize((a - qa.zero_point) * (b - qb.zero_point), m, t, op.rounding, scheme=op.scheme)
    return (y + node.quant.zero_point).clip(*node.attrs["clamp"])


def _lower_concat(bb, node, xs, qs, model):
    a = node.attrs
    if a["input_multipliers"] is not None:
        out = node.quant
        rounding = node_arithmetic(node, model.profile).rounding
        xs = [(arith.requantize(x - q.zero_point, m, t, rounding) + out.zero_point)
              .clip(out.qmin, out.qmax)
              for x, q, m, t in zip(xs, qs, a["input_multipliers"], a["input_shifts"])]
    return _emit_int(bb, relax.op.concat([x.expr for x in xs], axis=a["axis"]))


def _lower_resize(bb, node, xs, qs, model):
    (x,) = xs
    in_hw = model.shapes[node.inputs[0]][1:]

    def take(t: IntExpr, indices: np.ndarray, axis: int) -> IntExpr:  # in bounds: clip only quiets TVM's warning
        return _emit_int(bb, relax.op.take(t.expr, _const(indices, "int32"), axis=axis, mode="clip"))

    return arith.resize(x, in_hw, node.attrs["mode"], node.attrs["size"], take,
                        node_arithmetic(node, model.profile).form)


def _lower_zero_insert(bb, node, xs, qs, model):
    """Each value followed by stride - 1 zero points (a pad of two new unit axes, merged), the last ones cut."""
    (x,), (q,) = xs, qs
    c, h, w = model.shapes[node.inputs[0]]
    sh, sw = node.attrs["stride"]
    batch = x.expr.ty.shape[0]
    spread = bb.emit(relax.op.reshape(x.expr, [batch, c, h, 1, w, 1]))
    padded = bb.emit(relax.op.nn.pad(spread, [0, 0, 0, 0, 0, 0, 0, sh - 1, 0, 0, 0, sw - 1],
                                     pad_value=float(q.zero_point)))
    merged = bb.emit(relax.op.reshape(padded, [batch, c, h * sh, w * sw]))
    _, ho, wo = model.shapes[node.name]
    return _emit_int(bb, relax.op.strided_slice(merged, [2, 3], [0, 0], [ho, wo]))


def _lower_slice(bb, node, xs, qs, model):
    a = node.attrs
    return _emit_int(bb, relax.op.strided_slice(xs[0].expr, [a["axis"]], [a["start"]], [a["stop"]]))


def _lower_maxpool2d(bb, node, xs, qs, model):
    (x,) = xs
    a = node.attrs
    pt, pl, pb, pr = a["padding"]
    lowest = float(qs[0].qmin - 1)  # below every value: padding never wins
    padded = bb.emit(relax.op.nn.pad(x.expr, [0, 0, 0, 0, pt, pb, pl, pr], pad_value=lowest))
    return _emit_int(bb, relax.op.nn.max_pool2d(padded, a["kernel"], a["stride"], padding=0))


def _lower_avgpool2d(bb, node, xs, qs, model):
    (x,), (q,) = xs, qs
    a = node.attrs
    kh, kw = a["kernel"]
    pt, pl, pb, pr = a["padding"]
    channels, h, w = model.shapes[node.inputs[0]]
    ones = np.ones((channels, 1, kh, kw), np.int64)

    def window_sum(t):
        if (kh, kw) == (h + pt + pb, w + pl + pr):  # global pooling: a plain sum (padding adds zeros)
            return bb.emit(relax.op.sum(t, axis=[2, 3], keepdims=True))
        padded = bb.emit(relax.op.nn.pad(t, [0, 0, 0, 0, pt, pb, pl, pr], pad_value=0.0))
        return bb.emit(relax.op.nn.conv2d(padded, _const(ones), strides=a["stride"], groups=channels,
                                          out_dtype="int64"))

    total = IntExpr(bb, window_sum((x - q.zero_point).expr))
    if a["count_include_pad"]:
        count = np.int64(kh * kw)
    else:  # per-position count of real (unpadded) inputs, computed once here
        inside = np.pad(np.ones((h, w), np.int64), ((pt, pb), (pl, pr)))
        sh, sw = a["stride"]
        ho, wo = model.shapes[node.name][1:]
        count = np.array([[inside[i * sh:i * sh + kh, j * sw:j * sw + kw].sum() for j in range(wo)]
                          for i in range(ho)], np.int64).reshape(1, 1, ho, wo)
    op = node_arithmetic(node, model.profile)
    return arith.average(total, count, q.zero_point, op.rounding, op.domain)


def _lower_clamp(bb, node, xs, qs, model):
    return xs[0].clip(*node.attrs["clamp"])


def _lower_mean(bb, node, xs, qs, model):
    (x,), (q,) = xs, qs
    total = _emit_int(bb, relax.op.sum((x - q.zero_point).expr, axis=node.attrs["axes"],
                                       keepdims=node.attrs["keepdim"]))
    op = node_arithmetic(node, model.profile)
    m, t = (int(node.arrays[k][0]) for k in ("multiplier", "shift"))
    y = arith.requantize(total, m, t, op.rounding, scheme=op.scheme) + node.quant.zero_point
    return y.clip(*node.attrs["clamp"])


def _lower_reshape(bb, node, xs, qs, model):
    (x,) = xs
    shape = [x.expr.ty.shape[0]] + list(model.shapes[node.name])
    return _emit_int(bb, relax.op.reshape(x.expr, shape))


def _lower_lut(bb, node, xs, qs, model):
    (x,), (q,) = xs, qs
    index = bb.emit(relax.op.astype((x - q.qmin).expr, "int32"))
    return _emit_int(bb, relax.op.take(_const(node.arrays["table"]), index, axis=0, mode="clip"))


_LOWER = {
    "conv2d": _lower_conv2d,
    "linear": _lower_linear,
    "add": _lower_add,
    "mul": _lower_mul,
    "concat": _lower_concat,
    "maxpool2d": _lower_maxpool2d,
    "avgpool2d": _lower_avgpool2d,
    "mean": _lower_mean,
    "clamp": _lower_clamp,
    "reshape": _lower_reshape,
    "lut": _lower_lut,
    "resize": _lower_resize,
    "slice": _lower_slice,
    "zero_insert": _lower_zero_insert,
}
