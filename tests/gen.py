"""Hypothesis strategies for random valid IntModels and their inputs, over every op and mode.

The graph's structure, the profile variant and every attribute are drawn by
hypothesis; array contents come from a numpy generator seeded by a drawn
seed (fast, reproducible, and hypothesis still shrinks the structure).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import assume, strategies as st

from qftsim import QftsimError, arith, intmodel, list_profiles, load_profile
from qftsim.intmodel import IntModel, ModelInput, Node, TensorQuant, stored_requant
from qftsim.profile import HardwareProfile, ROUNDING_MODES

SPATIAL_OPS = ("conv2d", "conv2d", "conv2d", "maxpool2d", "avgpool2d", "mean", "add", "mul", "concat", "clamp",
               "lut", "resize", "slice", "zero_insert")
FLAT_OPS = ("linear", "linear", "clamp", "lut", "add", "mul", "mean", "slice", "concat")


@st.composite
def profiles(draw, compiled: bool = False) -> HardwareProfile:
    """A shipped profile, or one with its rounding, overflow mode or widths varied (compiled: only those whose
    arithmetic TVM lowers)."""
    names = list_profiles()
    if compiled:
        from export.lower import unlowered_arithmetic

        names = [n for n in names if not unlowered_arithmetic(load_profile(n))]
    d = load_profile(draw(st.sampled_from(names))).to_dict()
    if draw(st.booleans()):
        rq = d["requant"]
        choices = ROUNDING_MODES if rq["multiplier_bits"] == 31 else [r for r in ROUNDING_MODES
                                                                     if r not in ("gemmlowp_double", "ruy")]
        rq["rounding"] = draw(st.sampled_from(choices))
        acc = d["accumulator"]
        acc["overflow"] = draw(st.sampled_from(["wrap", "saturate", "error"]))
        acc["saturate_at"] = draw(st.sampled_from(["final", "every_mac"])) if acc["overflow"] == "saturate" else "final"
        acc["bits"] = draw(st.sampled_from([acc["bits"], 12, 16, 20]))
        d["bias"]["bits"] = min(d["bias"]["bits"], acc["bits"])
        d["activations"]["signed"] = draw(st.sampled_from([True, False, "auto"]))
        d["weights"]["granularity"] = draw(st.sampled_from(["per_channel", "per_tensor"]))
        d["requant"]["per_channel"] = d["weights"]["granularity"] == "per_channel" or draw(st.booleans())
        d["activations"]["channelwise_via_requant"] &= d["requant"]["per_channel"]
    if draw(st.booleans()):  # per-op arithmetic (schema 2) on top of whatever the profile states
        d["schema_version"] = 2
        arithmetic = d.setdefault("arithmetic", {})
        for op in draw(st.lists(st.sampled_from(["conv2d", "depthwise_conv2d", "transpose_conv2d", "linear", "mean",
                                                 "mul"]), max_size=3)):
            scheme = draw(st.sampled_from(["fixed_point", "float32", "float64", "shift_only"]))
            rounding = draw(st.sampled_from([r for r in ROUNDING_MODES if scheme == "fixed_point"
                                             or r not in ("gemmlowp_double", "ruy")]))
            arithmetic[op] = {"scheme": scheme, "rounding": rounding}
        if draw(st.booleans()):
            arithmetic["depthwise_conv2d"] = {"scheme": "fixed_point", "rounding": "ruy", "channel_block": 2,
                                              "tail_rounding": draw(st.sampled_from(ROUNDING_MODES))}
        if draw(st.booleans()):
            arithmetic["add"] = {"rounding": draw(st.sampled_from(ROUNDING_MODES)), "element_block": 4,
                                 "tail_rounding": draw(st.sampled_from(ROUNDING_MODES)),
                                 "input_rounding": draw(st.sampled_from(ROUNDING_MODES))}
        if draw(st.booleans()):
            arithmetic["resize"] = {"form": draw(st.sampled_from(["tflite", "q11"]))}
        if draw(st.booleans()):
            domain = draw(st.sampled_from(["raw", "centred"] + ([] if compiled else ["float32"])))
            arithmetic["avgpool2d"] = {"domain": domain, "rounding": "half_even" if domain == "float32"
                                       else draw(st.sampled_from(ROUNDING_MODES))}
    try:
        return HardwareProfile.from_dict(d)
    except QftsimError:
        assume(False)


class _Builder:
    def __init__(self, draw, profile: HardwareProfile, rng: np.random.Generator):
        self.draw, self.p, self.rng = draw, profile, rng
        self.nodes: list[Node] = []
        self.shapes: dict[str, tuple] = {}
        self.quants: dict[str, TensorQuant] = {}

    def quant(self) -> TensorQuant:
        a = self.p.activations
        signed = self.draw(st.booleans()) if a.signed == "auto" else a.signed
        q = TensorQuant(a.bits, signed, 0, 1.0)
        zp = 0 if a.symmetric else self.draw(st.integers(q.qmin, q.qmax))
        return TensorQuant(a.bits, signed, zp, float(self.draw(st.sampled_from([0.5, 0.02, 1.0 / 3]))))

    def requant_pair(self, size: int, acc_scale: float, scheme: str = "fixed_point"):
        """Multipliers and shifts: mostly ones that map acc_scale onto the output range, some anywhere."""
        b = self.p.requant.multiplier_bits
        lo, hi = self.p.requant.shift_range
        if scheme in arith.FLOAT_SCHEMES:  # an exact float: its significand and exponent
            b, (lo, hi) = arith.FLOAT_SCHEMES[scheme][2], intmodel.FLOAT_SHIFT_RANGE
        elif scheme == "shift_only":
            b = 0
        if b == 0:
            m = np.ones(size, dtype=np.int64)
        else:
            m = self.rng.integers(1 << (b - 1), 1 << b, size=size)
            if self.draw(st.booleans()):
                m[0] = (1 << b) - 1
        if self.draw(st.integers(0, 3)) == 0:
            t = self.rng.integers(lo, hi + 1, size=size)
        else:
            useful = b + int(np.ceil(np.log2(max(acc_scale, 1.0)))) - self.p.activations.bits + 1
            t = np.clip(useful + self.rng.integers(-2, 3, size=size), lo, hi)
        return m.astype(np.int64), t.astype(np.int64)

    def clamp_for(self, q: TensorQuant):
        lo = self.draw(st.sampled_from([q.qmin, q.zero_point, q.qmin + 1]))
        hi = self.draw(st.sampled_from([q.qmax, q.qmax - 1, max(lo, min(q.qmax, q.zero_point + 5))]))
        return [int(lo), int(max(lo, hi))]

    def add(self, name, op, inputs, quant, attrs=None, arrays=None, shape=None):
        self.nodes.append(Node(name, op, inputs, quant, attrs or {}, arrays or {}))
        self.shapes[name] = shape
        self.quants[name] = quant
        return name

    def matmul_params(self, out_channels: int, weight_shape, per_row: int, q_in: TensorQuant, op: str):
        w_spec = self.p.weights
        weight = self.rng.integers(w_spec.qmin, w_spec.qmax + 1, size=weight_shape)
        blo, bhi = self.p.bias.range
        bias = self.rng.integers(max(blo, -(1 << 14)), min(bhi, 1 << 14) + 1, size=out_channels)
        count = out_channels if self.p.requant.per_channel and self.draw(st.booleans()) else 1
        spread = max(q_in.qmax - q_in.zero_point, q_in.zero_point - q_in.qmin, 1) * max(abs(w_spec.qmin), 1)
        scheme = self.p.arithmetic(op).scheme
        m, t = self.requant_pair(count, spread * np.sqrt(per_row), scheme)
        dtype = np.int8 if w_spec.bits <= 8 else np.int16
        return {"weight": weight.astype(dtype), "bias": bias.astype(np.int32), **stored_requant(m, t, scheme)}


@st.composite
def int_models(draw, max_ops: int = 5, profile: HardwareProfile | None = None, compiled: bool = False) -> IntModel:
    """A random valid IntModel of up to `max_ops` ops on a small (C, H, W) input (compiled: on a profile TVM
    lowers)."""
    p = profile or draw(profiles(compiled))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b = _Builder(draw, p, rng)
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    q_in = b.quant()
    inputs = [ModelInput("x", shape, q_in)]
    b.shapes["x"], b.quants["x"] = shape, q_in
    current = "x"
    for i in range(draw(st.integers(1, max_ops))):
        shape, q = b.shapes[current], b.quants[current]
        name = f"n{i}"
        flat = len(shape) == 1
        op = draw(st.sampled_from(FLAT_OPS if flat else SPATIAL_OPS + ("reshape",)))
        if op == "conv2d":
            c, h, w = shape
            groups = draw(st.sampled_from([g for g in (1, c) if c % g == 0]))
            out_c = groups * draw(st.integers(1, 3 if groups == 1 else 2))
            kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
            pad = [draw(st.integers(0, 1)) for _ in range(4)]
            stride = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
            dilation = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
            ho = (h + pad[0] + pad[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
            wo = (w + pad[1] + pad[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
            if ho < 1 or wo < 1:
                continue
            out_q = b.quant()
            # one input channel: a dense or a depthwise kernel (the same sums; engines round them differently)
            depthwise = groups > 1 or (c == 1 and draw(st.booleans()))
            transposed = not depthwise and draw(st.booleans())  # the arithmetic of a transposed conv's kernel
            kind = "depthwise_conv2d" if depthwise else "transpose_conv2d" if transposed else "conv2d"
            arrays = b.matmul_params(out_c, (out_c, c // groups, kh, kw), c // groups * kh * kw, q, kind)
            current = b.add(name, "conv2d", [current], out_q,
                            {"stride": stride, "padding": pad, "dilation": dilation, "groups": groups,
                             "clamp": b.clamp_for(out_q), "depthwise": depthwise, "transposed": transposed},
                            arrays, (out_c, ho, wo))
        elif op == "linear":
            out_f = draw(st.integers(1, 5))
            out_q = b.quant()
            arrays = b.matmul_params(out_f, (out_f, shape[0]), shape[0], q, "linear")
            current = b.add(name, "linear", [current], out_q, {"clamp": b.clamp_for(out_q)}, arrays, (out_f,))
        elif op in ("maxpool2d", "avgpool2d"):
            c, h, w = shape
            kh, kw = draw(st.integers(1, min(h, 3))), draw(st.integers(1, min(w, 3)))
            pad = [draw(st.integers(0, k - 1)) for k in (kh, kw, kh, kw)]
            stride = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
            ho = (h + pad[0] + pad[2] - kh) // stride[0] + 1
            wo = (w + pad[1] + pad[3] - kw) // stride[1] + 1
            attrs = {"kernel": [kh, kw], "stride": stride, "padding": pad}
            out_q = q
            if op == "avgpool2d":
                attrs["count_include_pad"] = draw(st.booleans())
                if p.arithmetic("avgpool2d").domain == "float32" and draw(st.booleans()):  # a scale of its own
                    out_q = dataclasses.replace(b.quant(), signed=q.signed)
                    out_q = dataclasses.replace(out_q, zero_point=min(max(out_q.zero_point, q.qmin), q.qmax))
            current = b.add(name, op, [current], out_q, attrs, None, (c, ho, wo))
        elif op == "add":
            partners = [t for t, s in b.shapes.items() if s == shape]
            other = draw(st.sampled_from(partners))
            out_q = b.quant()
            if p.arithmetic("add").form == "float32_fma":  # onnxruntime: float32 scale ratios, nothing more
                m, t = arith.float_multipliers(np.exp2(rng.uniform(-4, 2, 2)), "float32")
                attrs = {"input_multipliers": [int(v) for v in m], "input_shifts": [int(v) for v in t],
                         "multiplier": 1, "shift": 0, "left_shift": p.ops.add_left_shift, "clamp": b.clamp_for(out_q)}
                current = b.add(name, "add", [current, other], out_q, attrs, None, shape)
                continue
            m, t = b.requant_pair(2, 2.0 ** p.ops.add_left_shift * 2 ** p.activations.bits)
            # keep each rescaled input below 2^30 so their int32 sum is valid
            peak = 2 ** (p.activations.bits + p.ops.add_left_shift)
            t = np.maximum(t, [int(np.ceil(np.log2(peak * int(mi)))) - 29 for mi in m])
            if (t > p.requant.shift_range[1]).any():
                continue
            mo, to = b.requant_pair(1, 2.0 ** p.activations.bits)
            attrs = {"input_multipliers": [int(v) for v in m], "input_shifts": [int(v) for v in t],
                     "multiplier": int(mo[0]), "shift": int(to[0]), "left_shift": p.ops.add_left_shift,
                     "clamp": b.clamp_for(out_q)}
            current = b.add(name, "add", [current, other], out_q, attrs, None, shape)
        elif op == "concat":
            axis = draw(st.integers(1, len(shape)))
            partners = [t for t, s in b.shapes.items() if len(s) == len(shape) and s[:axis - 1] == shape[:axis - 1]
                        and s[axis:] == shape[axis:]]
            others = draw(st.lists(st.sampled_from(partners), min_size=1, max_size=2))
            members = [current] + others
            rescale = p.ops.concat_rescale and draw(st.booleans())
            if rescale:
                out_q = b.quant()
                m, t = b.requant_pair(len(members), 2.0 ** p.activations.bits)
                attrs = {"input_multipliers": [int(v) for v in m], "input_shifts": [int(v) for v in t]}
            else:
                out_q = q
                members = [mbr for mbr in members if b.quants[mbr] == q]
                attrs = {}
            attrs["axis"] = axis
            size = sum(b.shapes[mbr][axis - 1] for mbr in members)
            current = b.add(name, "concat", members, out_q, attrs, None, shape[:axis - 1] + (size,) + shape[axis:])
        elif op == "resize":
            size = [draw(st.integers(1, 8)), draw(st.integers(1, 8))]
            current = b.add(name, "resize", [current], q, {"mode": draw(st.sampled_from(["nearest", "bilinear"])),
                                                           "size": size}, None, (shape[0], *size))
        elif op == "zero_insert":
            stride = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
            c, h, w = shape
            current = b.add(name, "zero_insert", [current], q, {"stride": stride}, None,
                            (c, (h - 1) * stride[0] + 1, (w - 1) * stride[1] + 1))
        elif op == "slice":
            axis = draw(st.integers(1, len(shape)))
            start = draw(st.integers(0, shape[axis - 1] - 1))
            stop = draw(st.integers(start + 1, shape[axis - 1]))
            current = b.add(name, "slice", [current], q, {"axis": axis, "start": start, "stop": stop}, None,
                            shape[:axis - 1] + (stop - start,) + shape[axis:])
        elif op == "mean":
            rank = len(shape)
            axes = draw(st.lists(st.integers(1, rank), min_size=1, max_size=rank, unique=True))
            # other ops take (C, H, W) or (features,): a mean keeps the rank, or goes from (C, H, W) to (C,)
            keepdim = sorted(axes) != [2, 3] or draw(st.booleans())
            out_q = b.quant()
            count = int(np.prod([shape[d - 1] for d in axes]))
            spread = max(q.qmax - q.zero_point, q.zero_point - q.qmin, 1) * count
            m, t = b.requant_pair(1, spread, p.arithmetic("mean").scheme)
            out_shape = tuple(1 if d + 1 in axes else s for d, s in enumerate(shape) if keepdim or d + 1 not in axes)
            current = b.add(name, "mean", [current], out_q, {"axes": axes, "keepdim": keepdim,
                                                             "clamp": b.clamp_for(out_q)},
                            stored_requant(m, t, p.arithmetic("mean").scheme), out_shape)
        elif op == "mul":  # with any tensor it broadcasts against (a squeeze-excite gate: C x 1 x 1)
            partners = [t for t, s in b.shapes.items()
                        if len(s) == len(shape) and all(u == v or 1 in (u, v) for u, v in zip(s, shape))]
            broadcasting = [t for t in partners if b.shapes[t] != shape]
            other = draw(st.sampled_from(broadcasting if broadcasting and draw(st.booleans()) else partners))
            out_q, q_other = b.quant(), b.quants[other]
            spread = max(q.qmax - q.zero_point, q.zero_point - q.qmin, 1) * max(
                q_other.qmax - q_other.zero_point, q_other.zero_point - q_other.qmin, 1)
            m, t = b.requant_pair(1, spread, p.arithmetic("mul").scheme)
            out_shape = tuple(max(u, v) for u, v in zip(shape, b.shapes[other]))
            current = b.add(name, "mul", [current, other], out_q, {"clamp": b.clamp_for(out_q)},
                            stored_requant(m, t, p.arithmetic("mul").scheme), out_shape)
        elif op == "clamp":
            current = b.add(name, "clamp", [current], q, {"clamp": b.clamp_for(q)}, None, shape)
        elif op == "lut":
            out_q = b.quant()
            table = rng.integers(out_q.qmin, out_q.qmax + 1, size=2**q.bits)
            current = b.add(name, "lut", [current], out_q, {}, {"table": table.astype(out_q.dtype)}, shape)
        elif op == "reshape":
            current = b.add(name, "reshape", [current], q, {"shape": [-1]}, None, (int(np.prod(shape)),))
    assume(b.nodes)
    outputs = [current]
    if len(b.nodes) > 1 and draw(st.booleans()):
        outputs.append(b.nodes[0].name)
    return IntModel(p, inputs, b.nodes, outputs)


@st.composite
def model_inputs(draw, model: IntModel, max_batch: int = 3) -> np.ndarray:
    """An integer batch for the model's single input, reaching the range ends."""
    spec = model.inputs[0]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = draw(st.integers(1, max_batch))
    x = rng.integers(spec.quant.qmin, spec.quant.qmax + 1, size=(batch, *spec.shape))
    if draw(st.booleans()):
        x.flat[0] = spec.quant.qmin
        x.flat[-1] = spec.quant.qmax
    return x.astype(spec.quant.dtype)
