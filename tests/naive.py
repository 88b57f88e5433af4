"""Deliberately naive references: Python ints and Fractions, written for clarity, not speed.

The package's vectorized arithmetic and simulator are checked against these.
"""

from __future__ import annotations

import math
from fractions import Fraction

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def round_fraction(v: Fraction, rounding: str) -> int:
    """Round a rational number to an integer by the named rule."""
    fl = math.floor(v)
    frac = v - fl
    if rounding == "floor" or frac < Fraction(1, 2):
        return fl
    if frac > Fraction(1, 2):
        return fl + 1
    # exact tie
    if rounding in ("half_up", "ruy"):
        return fl + 1
    if rounding in ("half_away", "gemmlowp_double"):
        return fl + 1 if v > 0 else fl
    if rounding == "half_even":
        return fl if fl % 2 == 0 else fl + 1
    raise ValueError(rounding)


def wrap(x: int, bits: int) -> int:
    x %= 2**bits
    return x - 2**bits if x >= 2 ** (bits - 1) else x


def saturate(x: int, bits: int) -> int:
    return max(-(2 ** (bits - 1)), min(2 ** (bits - 1) - 1, x))


def srdhm(a: int, b: int) -> int:
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = 2**30 if ab >= 0 else 1 - 2**30
    n = ab + nudge
    q = abs(n) // 2**31
    return q if n >= 0 else -q


def rdbpot(x: int, e: int) -> int:
    """x / 2^e, ties away from zero, written as a rational."""
    return round_fraction(Fraction(x, 2**e), "half_away")


def requantize(acc: int, m: int, t: int, rounding: str, scheme: str = "fixed_point") -> int:
    if scheme in ("float32", "float64"):
        bits = 24 if scheme == "float32" else 53
        factor = to_float(Fraction(m) / Fraction(2) ** t, bits)
        return round_fraction(to_float(to_float(Fraction(acc), bits) * factor, bits), rounding)
    if rounding in ("gemmlowp_double", "ruy"):
        e = 31 - t
        a = wrap(acc * 2 ** max(e, 0), 32)
        if rounding == "ruy":  # both steps round half up
            high = round_fraction(Fraction(a * m, 2**31), "half_up")
            return round_fraction(Fraction(high, 2 ** max(-e, 0)), "half_up")
        return rdbpot(srdhm(a, m), max(-e, 0))
    return round_fraction(Fraction(acc * m) / Fraction(2) ** t, rounding)


def to_float(v: Fraction, bits: int) -> Fraction:
    """v rounded to the nearest binary float with `bits` significant bits, ties to even (IEEE; no
    exponent limits, which int8 requantization never reaches)."""
    if v == 0:
        return Fraction(0)
    exponent = math.floor(math.log2(abs(v)))
    while Fraction(2) ** exponent > abs(v):
        exponent -= 1
    while Fraction(2) ** (exponent + 1) <= abs(v):
        exponent += 1
    step = Fraction(2) ** (exponent - bits + 1)
    return round_fraction(v / step, "half_even") * step


def cpu_float_to_int(v: Fraction) -> int:
    """x86's float-to-int32 conversion: to nearest even, and -2^31 outside int32."""
    r = round_fraction(v, "half_even")
    return r if -(2**31) <= r < 2**31 else -(2**31)


def ort_add(a: int, b: int, m, t, zero_a: int, zero_b: int, zero_out: int) -> int:
    """onnxruntime's QLinearAdd from its definition: r = s_in / s_out (float32), the constant
    z_out - fma(r_a, z_a, r_b z_b) in float32, then two fused multiply-adds, each rounded once."""
    r_a, r_b = (Fraction(mi) / Fraction(2) ** ti for mi, ti in zip(m, t))
    f32 = lambda v: to_float(v, 24)  # noqa: E731
    constant = f32(zero_out - f32(r_a * zero_a + f32(r_b * zero_b)))  # the compiler's contraction: one FMA
    return cpu_float_to_int(f32(a * r_a + f32(b * r_b + constant)))


def ort_mul(product: int, m: int, t: int, zero_out: int) -> int:
    """onnxruntime's QLinearMul: float32(product * r), plus the zero point in float32, converted."""
    f32 = lambda v: to_float(v, 24)  # noqa: E731
    return cpu_float_to_int(f32(f32(product * (Fraction(m) / Fraction(2) ** t)) + zero_out))


def ort_average(window: list[int], count: int, s_in: float, zero_in: int, s_out: float, zero_out: int) -> int:
    """onnxruntime's QLinearAveragePool of one window from its definition: each code dequantized in float32,
    the values summed in float32 in order, divided by the count and then by s_out, z_out added, each step
    rounded to float32, then converted."""
    f32 = lambda v: to_float(v, 24)  # noqa: E731
    s_in, s_out, total = f32(Fraction(s_in)), f32(Fraction(s_out)), Fraction(0)  # the scales a file stores
    for code in window:
        total = f32(total + f32(s_in * (code - zero_in)))
    return cpu_float_to_int(f32(f32(f32(total / count) / s_out) + zero_out))


def ort_global_average(window: list[int], s_in: float, zero_in: int, s_out: float, zero_out: int) -> int:
    """onnxruntime's QLinearGlobalAveragePool: the integer sum of the centred codes times
    float32(s_in / float32(s_out * count)), rounded to even, plus z_out."""
    f32 = lambda v: to_float(v, 24)  # noqa: E731
    factor = f32(f32(Fraction(s_in)) / f32(f32(Fraction(s_out)) * len(window)))
    return round_fraction(f32(sum(v - zero_in for v in window) * factor), "half_even") + zero_out


def divide(x: int, n: int, rounding: str) -> int:
    return round_fraction(Fraction(x, n), rounding)


# ------------------------------------------------------------------ naive IntModel executor

class NaiveOverflow(Exception):
    """The naive executor saw an accumulator overflow under `overflow: error`."""


def _accumulate(products, bias: int, acc) -> tuple[int, bool]:
    """Sum products into an accumulator preloaded with bias, as the profile says; (value, overflowed)."""
    lo, hi = -(2 ** (acc.bits - 1)), 2 ** (acc.bits - 1) - 1
    total, overflowed = bias, False
    for p in products:
        total += p
        if acc.overflow == "saturate" and acc.saturate_at == "every_mac":
            if total < lo or total > hi:
                overflowed = True
                total = max(lo, min(hi, total))
    if acc.overflow == "saturate" and acc.saturate_at == "every_mac":
        return total, overflowed
    if lo <= total <= hi:
        return total, False
    if acc.overflow == "error":
        raise NaiveOverflow
    if acc.overflow == "wrap":
        return wrap(total, acc.bits), True
    return max(lo, min(hi, total)), True


def _per_channel(arr, o):
    return int(arr[o]) if len(arr) > 1 else int(arr[0])


def _bilinear_taps(index: int, in_size: int, out_size: int, form: str) -> list[tuple[int, int]]:
    """(input index, weight in 1/2^bits) of the two taps of one output index: TFLite's integer rule (1/1024) or
    XNNPACK's q11 (float32 position, fraction rounded to even in 1/2048)."""
    import numpy as np

    if form == "q11":
        scale = np.float32(in_size) / np.float32(out_size)
        position = np.float32(index) * scale + (np.float32(0.5) * scale - np.float32(0.5))
        position = min(max(position, np.float32(0)), np.float32(in_size - 1))
        lower = int(position)
        upper_weight = int(np.rint((position - np.float32(lower)) * np.float32(2048)))
        return [(lower, 2048 - upper_weight), (min(lower + 1, in_size - 1), upper_weight)]
    scale = (1024 * in_size + out_size // 2) // out_size
    position = index * scale + scale // 2 - 512
    lower = max(int(position / 1024), 0)  # C truncates toward zero
    upper = min((position + 1023) // 1024, in_size - 1)
    return [(lower, 1024 - (position - 1024 * lower)), (upper, position - 1024 * lower)]


def run_model(model, x):
    """Execute an IntModel with loops over Python ints. Returns {output name: nested list}."""
    import numpy as np

    from qftsim.intmodel import node_arithmetic

    p = model.profile
    env = {model.inputs[0].name: np.array(x.tolist(), dtype=object)}
    for node in model.nodes:
        ins = [env[s] for s in node.inputs]
        qin = [model.quant_of(s) for s in node.inputs]
        a, arr, qo = node.attrs, node.arrays, node.quant
        if node.op in ("conv2d", "linear", "mean", "add", "mul", "concat", "avgpool2d"):
            op_arith = node_arithmetic(node, p)
            rounding, scheme = op_arith.rounding, op_arith.scheme
            out_channels = len(arr["weight"]) if node.op in ("conv2d", "linear") else 0
            tail_start = (out_channels // op_arith.channel_block * op_arith.channel_block
                          if op_arith.channel_block else out_channels)

            def channel_rounding(o):
                """The rounding of output channel o: a channel past the last whole block rounds its own way."""
                return op_arith.tail_rounding if o >= tail_start else rounding
        if node.op == "conv2d":
            (xv,), (q,) = ins, qin
            w = arr["weight"]
            n_, c_, h_, w_ = xv.shape
            o_, cg, kh, kw = w.shape
            og = o_ // a["groups"]
            shape = model.shapes[node.name]
            out = np.empty((n_,) + shape, dtype=object)
            for n in range(n_):
                for o in range(o_):
                    g = o // og
                    for y in range(shape[1]):
                        for xx in range(shape[2]):
                            prods = []
                            for ci in range(cg):
                                for ky in range(kh):
                                    for kx in range(kw):
                                        iy = y * a["stride"][0] - a["padding"][0] + ky * a["dilation"][0]
                                        ix = xx * a["stride"][1] - a["padding"][1] + kx * a["dilation"][1]
                                        inside = 0 <= iy < h_ and 0 <= ix < w_
                                        v = int(xv[n, g * cg + ci, iy, ix]) - q.zero_point if inside else 0
                                        prods.append(v * int(w[o, ci, ky, kx]))
                            acc, _ = _accumulate(prods, int(arr["bias"][o]), p.accumulator)
                            r = requantize(acc, _per_channel(arr["multiplier"], o), _per_channel(arr["shift"], o),
                                           channel_rounding(o), scheme) + qo.zero_point
                            out[n, o, y, xx] = max(a["clamp"][0], min(a["clamp"][1], r))
        elif node.op == "linear":
            (xv,), (q,) = ins, qin
            w = arr["weight"]
            out = np.empty((xv.shape[0], w.shape[0]), dtype=object)
            for n in range(xv.shape[0]):
                for o in range(w.shape[0]):
                    prods = [(int(xv[n, i]) - q.zero_point) * int(w[o, i]) for i in range(w.shape[1])]
                    acc, _ = _accumulate(prods, int(arr["bias"][o]), p.accumulator)
                    r = requantize(acc, _per_channel(arr["multiplier"], o), _per_channel(arr["shift"], o),
                                   channel_rounding(o), scheme) + qo.zero_point
                    out[n, o] = max(a["clamp"][0], min(a["clamp"][1], r))
        elif node.op == "add":
            out = np.empty(ins[0].shape, dtype=object)
            shape = ins[0].shape[1:]
            size = int(np.prod(shape))
            blocks_end = size // op_arith.element_block * op_arith.element_block if op_arith.element_block else size
            for idx in np.ndindex(*ins[0].shape):
                # the element's place in one sample laid out NHWC (TFLite's order): past the blocks, the tail
                nhwc = (idx[2] * shape[2] + idx[3]) * shape[0] + idx[1] if len(shape) == 3 else idx[1]
                r_mode = op_arith.tail_rounding if nhwc >= blocks_end else rounding
                in_mode = r_mode if nhwc >= blocks_end else op_arith.input_rounding or rounding
                if op_arith.form == "float32_fma":
                    r = ort_add(int(ins[0][idx]), int(ins[1][idx]), a["input_multipliers"], a["input_shifts"],
                                qin[0].zero_point, qin[1].zero_point, qo.zero_point)
                    out[idx] = max(a["clamp"][0], min(a["clamp"][1], r))
                    continue
                total = 0
                for xv, q, m, t in zip(ins, qin, a["input_multipliers"], a["input_shifts"]):
                    total += requantize((int(xv[idx]) - q.zero_point) * 2 ** a["left_shift"], m, t, in_mode)
                r = requantize(total, a["multiplier"], a["shift"], r_mode) + qo.zero_point
                out[idx] = max(a["clamp"][0], min(a["clamp"][1], r))
        elif node.op == "mul":
            (av, bv), (qa, qb) = ins, qin
            shape = (av.shape[0],) + model.shapes[node.name]
            out = np.empty(shape, dtype=object)
            for idx in np.ndindex(*shape):  # an axis of size 1 repeats its one value
                va = int(av[tuple(i if s > 1 else 0 for i, s in zip(idx, av.shape))]) - qa.zero_point
                vb = int(bv[tuple(i if s > 1 else 0 for i, s in zip(idx, bv.shape))]) - qb.zero_point
                if op_arith.zero_point == "float32":
                    r = ort_mul(va * vb, int(arr["multiplier"][0]), int(arr["shift"][0]), qo.zero_point)
                else:
                    r = requantize(va * vb, int(arr["multiplier"][0]), int(arr["shift"][0]), rounding, scheme) \
                        + qo.zero_point
                out[idx] = max(a["clamp"][0], min(a["clamp"][1], r))
        elif node.op == "concat":
            parts = []
            for xv, q, i in zip(ins, qin, range(len(ins))):
                part = np.empty(xv.shape, dtype=object)
                for idx in np.ndindex(*xv.shape):
                    v = int(xv[idx])
                    if a["input_multipliers"] is not None:
                        v = requantize(v - q.zero_point, a["input_multipliers"][i], a["input_shifts"][i],
                                       rounding) + qo.zero_point
                        v = max(qo.qmin, min(qo.qmax, v))
                    part[idx] = v
                parts.append(part)
            out = np.concatenate(parts, axis=a["axis"])
        elif node.op in ("maxpool2d", "avgpool2d"):
            (xv,), (q,) = ins, qin
            n_, c_, h_, w_ = xv.shape
            kh, kw = a["kernel"]
            shape = model.shapes[node.name]
            out = np.empty((n_,) + shape, dtype=object)
            for n, c, y, xx in np.ndindex(n_, *shape):
                vals = []
                for ky in range(kh):
                    for kx in range(kw):
                        iy, ix = y * a["stride"][0] - a["padding"][0] + ky, xx * a["stride"][1] - a["padding"][1] + kx
                        if 0 <= iy < h_ and 0 <= ix < w_:
                            vals.append(int(xv[n, c, iy, ix]))
                if node.op == "maxpool2d":
                    out[n, c, y, xx] = max(vals)
                else:
                    count = kh * kw if a["count_include_pad"] else len(vals)
                    if op_arith.domain == "float32" and [kh, kw] == [h_, w_] and not any(a["padding"]):
                        r = ort_global_average(vals, q.scale, q.zero_point, qo.scale, qo.zero_point)
                        out[n, c, y, xx] = max(qo.qmin, min(qo.qmax, r))
                    elif op_arith.domain == "float32":
                        r = ort_average(vals, count, q.scale, q.zero_point, qo.scale, qo.zero_point)
                        out[n, c, y, xx] = max(qo.qmin, min(qo.qmax, r))
                    elif op_arith.domain == "raw":  # padding counted holds the zero point
                        out[n, c, y, xx] = divide(sum(vals) + (count - len(vals)) * q.zero_point, count, rounding)
                    else:
                        out[n, c, y, xx] = divide(sum(v - q.zero_point for v in vals), count, rounding) + q.zero_point
        elif node.op == "mean":
            (xv,), (q,) = ins, qin
            axes = sorted(a["axes"])
            kept = [d for d in range(xv.ndim) if d not in axes]
            out = np.empty([xv.shape[d] for d in kept], dtype=object)
            for idx in np.ndindex(*out.shape):
                where = [slice(None)] * xv.ndim
                for d, i in zip(kept, idx):
                    where[d] = i
                total = sum(int(v) - q.zero_point for v in xv[tuple(where)].flat)
                r = requantize(total, int(arr["multiplier"][0]), int(arr["shift"][0]), rounding, scheme) + qo.zero_point
                out[idx] = max(a["clamp"][0], min(a["clamp"][1], r))
            if a["keepdim"]:
                out = out.reshape([1 if d in axes else xv.shape[d] for d in range(xv.ndim)])
        elif node.op == "resize":
            (xv,) = ins
            n_, c_, h_, w_ = xv.shape
            ho, wo = a["size"]
            out = np.empty((n_, c_, ho, wo), dtype=object)
            for n, c, y, xx in np.ndindex(*out.shape):
                if a["mode"] == "nearest":
                    out[n, c, y, xx] = int(xv[n, c, y * h_ // ho, xx * w_ // wo])
                else:  # TFLite's ResizeBilinearInteger or XNNPACK's q11 kernel, half-pixel centres, written out
                    form = node_arithmetic(node, p).form
                    total = 0
                    for (i, wi) in _bilinear_taps(y, h_, ho, form):
                        for (j, wj) in _bilinear_taps(xx, w_, wo, form):
                            total += int(xv[n, c, i, j]) * wi * wj
                    bits, rounding = (11, "half_up") if form == "q11" else (10, "half_away")
                    out[n, c, y, xx] = round_fraction(Fraction(total, 1 << 2 * bits), rounding)
        elif node.op == "zero_insert":
            (xv,), (q,) = ins, qin
            sh, sw = a["stride"]
            n_, c_, h_, w_ = xv.shape
            out = np.full((n_, c_, (h_ - 1) * sh + 1, (w_ - 1) * sw + 1), q.zero_point, dtype=object)
            for n, c, y, xx in np.ndindex(*xv.shape):
                out[n, c, y * sh, xx * sw] = xv[n, c, y, xx]
        elif node.op == "slice":
            out = np.take(ins[0], range(a["start"], a["stop"]), axis=a["axis"])
        elif node.op == "clamp":
            out = np.vectorize(lambda v: max(a["clamp"][0], min(a["clamp"][1], int(v))), otypes=[object])(ins[0])
        elif node.op == "reshape":
            out = ins[0].reshape((ins[0].shape[0],) + model.shapes[node.name])
        elif node.op == "lut":
            table, qmin = arr["table"], qin[0].qmin
            out = np.vectorize(lambda v: int(table[int(v) - qmin]), otypes=[object])(ins[0])
        else:
            raise NotImplementedError(node.op)
        env[node.name] = out
    return {name: env[name].tolist() for name in model.outputs}
