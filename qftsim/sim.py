"""Bit-exact execution of an IntModel, with a per-layer accumulator and clamp report.

Arithmetic follows the profile through `qftsim.arith`. Convolutions and
matrix products run as float32 or float64 torch ops when a static bound
proves every partial sum is an integer below 2^24 or 2^53 (then any
summation order is exact), and as int64 otherwise; a bias joins in float32
where the sums come out below 2^24 (see `_Simulator._exact_accumulate`).

MAC order (it matters only for `saturate_at: every_mac`): the accumulator
starts at the bias, then adds the products of one weight row in its
flattened order (input channel within the group, kernel row, kernel
column; for linear, the input index), saturating after every addition.
Outputs whose partial sums provably stay in range skip the sequential walk.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from qftsim import arith
from qftsim.errors import QftsimError
from qftsim.intmodel import IntModel, Node, TensorQuant, max_abs_centered, node_arithmetic


class AccumulatorOverflowWarning(RuntimeWarning):
    """Some accumulator left the profile's range (wrapped or saturated)."""


@dataclass
class LayerReport:
    """What one layer did to its integers on the simulated inputs."""

    name: str
    op: str
    outputs: int
    acc_bits: int | None = None
    acc_min: int | None = None
    acc_max: int | None = None
    overflows: int = 0
    clamp_low: int = 0
    clamp_high: int = 0

    @property
    def headroom_bits(self) -> float | None:
        """Unused accumulator bits: (bits - 1) - log2(max |acc|); negative means overflow."""
        if self.acc_bits is None:
            return None
        peak = max(abs(self.acc_min), abs(self.acc_max), 1)
        return (self.acc_bits - 1) - math.log2(peak)

    @property
    def clamp_rate(self) -> float:
        return (self.clamp_low + self.clamp_high) / max(self.outputs, 1)


@dataclass
class SimResult:
    outputs: dict[str, np.ndarray]
    report: list[LayerReport]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    accumulators: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def overflows(self) -> int:
        return sum(r.overflows for r in self.report)


def format_report(report: list[LayerReport]) -> str:
    """The per-layer report as a fixed-width table."""
    lines = [f"{'layer':20s} {'op':9s} {'acc min':>12s} {'acc max':>12s} {'headroom':>9s} "
             f"{'overflow':>9s} {'clamp lo':>9s} {'clamp hi':>9s} {'clamped':>8s}"]
    for r in report:
        if r.acc_bits is None:
            acc = f"{'':12s} {'':12s} {'':9s}"
        else:
            acc = f"{r.acc_min:12d} {r.acc_max:12d} {r.headroom_bits:8.1f}b"
        lines.append(f"{r.name[:20]:20s} {r.op:9s} {acc} {r.overflows:9d} {r.clamp_low:9d} {r.clamp_high:9d} "
                     f"{r.clamp_rate:7.2%}")
    return "\n".join(lines)


# a chunk of samples holds at most about this many bytes in its largest layer (float64 accumulators,
# their int64 copies, the float32 output): memory stays flat whatever the batch (20000 MNIST samples: 4.2 GiB
# whole, 0.53 GiB in chunks; benchmarks/sim_memory.py). Chunks of this size were the fastest on EfficientNet-Lite0
# at 224x224 (5 samples; 1 and 2 were 10-40% slower, from per-op overhead)
CHUNK_BYTES = 128 * 2**20


def simulate(model: IntModel, inputs, *, keep_tensors: bool = False, keep_accumulators: bool = False,
             chunk: int | None = None) -> SimResult:
    """Run `model` on integer inputs (one array, or a dict by input name) exactly as its profile says.

    The batch runs in chunks of `chunk` samples (default: as many as CHUNK_BYTES allows), each tensor freed
    after its last use; the report covers the whole batch. Kept tensors and accumulators are whole."""
    checked = check_inputs(model, inputs)
    count = len(next(iter(checked.values())))
    size = chunk or chunk_samples(model)
    last_use = {s: i for i, node in enumerate(model.nodes) for s in node.inputs}
    constants: dict[str, _MatmulConstants] = {}  # shared by the chunks
    parts = [_simulate_chunk(model, {k: v[i:i + size] for k, v in checked.items()}, last_use, constants,
                             keep_tensors, keep_accumulators) for i in range(0, max(count, 1), size)]
    report = [_merged(rows) for rows in zip(*(p.report for p in parts))]
    overflowed = [r for r in report if r.overflows]
    if overflowed:
        where = ", ".join(f"{r.name} ({r.overflows} outputs)" for r in overflowed)
        warnings.warn(f"accumulator overflow ({model.profile.accumulator.overflow}) in {where}",
                      AccumulatorOverflowWarning, stacklevel=2)
    joined = lambda key: {k: np.concatenate([getattr(p, key)[k] for p in parts])  # noqa: E731
                          for k in getattr(parts[0], key)}
    return SimResult(outputs=joined("outputs"), report=report, tensors=joined("tensors"),
                     accumulators=joined("accumulators"))


def chunk_samples(model: IntModel) -> int:
    """Samples per chunk: CHUNK_BYTES over the largest layer's bytes per sample (20 per value: the float64
    accumulator, its int64 copy, the float32 output)."""
    largest = max([int(np.prod(s)) for s in model.shapes.values()] + [1])
    return max(1, CHUNK_BYTES // (20 * largest))


def _merged(rows: tuple[LayerReport, ...]) -> LayerReport:
    """One layer's report over several chunks: counts add up, accumulator ranges widen."""
    first = rows[0]
    ranged = [r for r in rows if r.outputs] or [first]
    return LayerReport(first.name, first.op, sum(r.outputs for r in rows), first.acc_bits,
                       None if first.acc_min is None else min(r.acc_min for r in ranged),
                       None if first.acc_max is None else max(r.acc_max for r in ranged),
                       sum(r.overflows for r in rows), sum(r.clamp_low for r in rows),
                       sum(r.clamp_high for r in rows))


def _simulate_chunk(model: IntModel, inputs: dict[str, np.ndarray], last_use: dict[str, int],
                    constants: dict[str, _MatmulConstants], keep_tensors: bool, keep_accumulators: bool) -> SimResult:
    """One chunk of the batch; `last_use`: the index of the last node that reads each tensor."""
    env = {name: torch.from_numpy(arr.astype(np.float32)) for name, arr in inputs.items()}
    sim = _Simulator(model, keep_accumulators, constants)
    for i, node in enumerate(model.nodes):
        env[node.name] = sim.run(node, [env[s] for s in node.inputs]).to(torch.float32)
        if not keep_tensors:  # free what no later node reads
            for name in node.inputs:
                if last_use[name] == i and name not in model.outputs:
                    env.pop(name, None)  # (an input read twice by this node goes at the first)
    as_numpy = lambda name: env[name].numpy().astype(model.quant_of(name).dtype)  # noqa: E731
    return SimResult(
        outputs={name: as_numpy(name) for name in model.outputs},
        report=sim.report,
        tensors={name: as_numpy(name) for name in env} if keep_tensors else {},
        accumulators=sim.accumulators,
    )


def check_inputs(model: IntModel, inputs) -> dict[str, np.ndarray]:
    """Inputs by name, checked for shape, integer dtype and the input's integer range."""
    if not isinstance(inputs, dict):
        if len(model.inputs) != 1:
            raise QftsimError(f"the model has {len(model.inputs)} inputs: pass a dict by name")
        inputs = {model.inputs[0].name: inputs}
    checked = {}
    for spec in model.inputs:
        if spec.name not in inputs:
            raise QftsimError(f"input {spec.name!r} is missing")
        arr = np.asarray(inputs[spec.name])
        if arr.dtype.kind not in "iu":
            raise QftsimError(f"input {spec.name!r}: integer data expected, got {arr.dtype} "
                              "(quantize real values with the model's input quantization first)")
        if arr.shape[1:] != spec.shape or arr.ndim != len(spec.shape) + 1:
            expected = ", ".join(map(str, spec.shape))
            raise QftsimError(f"input {spec.name!r}: shape {arr.shape}, expected (batch, {expected})")
        if arr.size and (arr.min() < spec.quant.qmin or arr.max() > spec.quant.qmax):
            raise QftsimError(f"input {spec.name!r}: values outside [{spec.quant.qmin}, {spec.quant.qmax}]")
        checked[spec.name] = arr
    return checked


def _min_max(t: torch.Tensor) -> tuple[int, int]:
    """min and max of an integer-valued tensor (0, 0 for an empty one)."""
    return tuple(int(v) for v in torch.aminmax(t)) if t.numel() else (0, 0)


def _float_dtype_for(bound: int) -> torch.dtype | None:
    """A float type whose integer sums up to `bound` are exact in any order, or None."""
    if bound < 2**24:
        return torch.float32
    if bound < 2**53:
        return torch.float64
    return None


@dataclass
class _MatmulConstants:
    """A conv's or linear's arrays as int64 tensors, with the sums over each weight row, prepared once per run."""
    weight: torch.Tensor
    bias: torch.Tensor
    multiplier: torch.Tensor
    shift: torch.Tensor
    row_sums: torch.Tensor
    abs_row_sums: torch.Tensor
    casts: dict = field(default_factory=dict)

    @classmethod
    def of(cls, node: Node) -> _MatmulConstants:
        weight, bias, m, t = (torch.from_numpy(node.arrays[k].astype(np.int64))
                              for k in ("weight", "bias", "multiplier", "shift"))
        rows = weight.reshape(len(weight), -1)
        return cls(weight, bias, m, t, rows.sum(dim=1), rows.abs().sum(dim=1))

    def weight_as(self, dtype: torch.dtype, absolute: bool = False) -> torch.Tensor:
        """The weight (or |weight|) as `dtype`, converted once per run rather than once per chunk."""
        if (dtype, absolute) not in self.casts:
            self.casts[dtype, absolute] = (self.weight.abs() if absolute else self.weight).to(dtype)
        return self.casts[dtype, absolute]

    def acc_bounds(self, in_peak: int, bias: torch.Tensor) -> torch.Tensor:
        """Per output channel, a bound on every partial sum's |value| in any order: the row's |w| sum times
        the input's peak, plus |bias|."""
        return self.abs_row_sums * in_peak + bias.abs()

    @property
    def l1(self) -> int:
        """The largest row sum of |w|: every partial sum, in any order, is at most this times max |input|."""
        return int(self.abs_row_sums.max()) if self.abs_row_sums.numel() else 0


class _Simulator:
    """Executes nodes on float tensors that hold integers, exactly.

    Activations (at most 16 bits) live in float32; accumulators and
    requantization use float64 (or int64) as the bounds require.
    """

    def __init__(self, model: IntModel, keep_accumulators: bool, constants: dict[str, _MatmulConstants]):
        self.model = model
        self.constants = constants
        self.profile = model.profile
        self.report: list[LayerReport] = []
        self.keep_accumulators = keep_accumulators
        self.accumulators: dict[str, np.ndarray] = {}

    def run(self, node: Node, xs: list[torch.Tensor]) -> torch.Tensor:
        in_quants = [self.model.quant_of(s) for s in node.inputs]
        return getattr(self, f"_{node.op}")(node, xs, in_quants)

    # ------------------------------------------------------------ matmul ops

    def _conv2d(self, node, xs, in_quants):
        (x,), (q,) = xs, in_quants
        a = node.attrs
        c = self._constants(node)
        pt, pl, pb, pr = a["padding"]
        offset = self._input_offset(q, c.l1, any(a["padding"]))
        shifted = x - offset if offset else x
        pad_value = q.zero_point - offset  # the padding's value, a centred 0, after the shift
        if not any(a["padding"]) or pad_value == 0 and pt == pb and pl == pr:
            conv_padding = (pt, pl)  # let the conv pad: no padded copy on the fast path
        else:
            shifted, conv_padding = F.pad(shifted, (pl, pr, pt, pb), value=pad_value), (0, 0)

        def padded(inp):
            return F.pad(inp, (conv_padding[1],) * 2 + (conv_padding[0],) * 2) if any(conv_padding) else inp

        def matmul(inp, weight):
            return F.conv2d(inp.to(weight.dtype), weight, stride=a["stride"], padding=conv_padding,
                            dilation=a["dilation"], groups=a["groups"])

        def int64_matmul(inp, weight):
            return _conv2d_int64(padded(inp), weight, a["stride"], a["dilation"], a["groups"])

        def terms(flat_index, shape):
            return _conv_terms(padded(shifted), c.weight.numpy(), a, flat_index, shape)

        return self._matmul_layer(node, shifted, offset, c, q, matmul, int64_matmul, terms)

    def _linear(self, node, xs, in_quants):
        (x,), (q,) = xs, in_quants
        c = self._constants(node)
        offset = self._input_offset(q, c.l1, False)
        shifted = x - offset if offset else x

        def matmul(inp, weight):
            return inp.to(weight.dtype) @ weight.T

        def int64_matmul(inp, weight):
            return inp @ weight.T

        def terms(flat_index, shape):
            n, o = np.unravel_index(flat_index, shape)
            return shifted[n].to(torch.int64) * c.weight[o]

        return self._matmul_layer(node, shifted, offset, c, q, matmul, int64_matmul, terms)

    def _constants(self, node) -> _MatmulConstants:
        if node.name not in self.constants:
            self.constants[node.name] = _MatmulConstants.of(node)
        return self.constants[node.name]

    def _input_offset(self, q: TensorQuant, l1: int, padded: bool) -> int:
        """The integer a matmul subtracts from its input before the products, its difference to the zero point
        going into the bias. The zero point itself where the products fit float32 so (a padded conv then pads
        by itself) or where every MAC saturates (the partial sums are the arithmetic there); else the middle of
        the input's range, which halves the products' bound where the zero point sits at one end (a ReLU's
        output)."""
        if self.profile.accumulator.saturate_at == "every_mac" or l1 * max_abs_centered(q) < 2**24 and padded:
            return q.zero_point
        return (q.qmin + q.qmax + 1) // 2

    def _exact_accumulate(self, matmul, int64_matmul, inp, weight_as, l1: int, bias, in_peak: int):
        """(bias + inp (x) weight, its min, its max) exactly: in float32 or float64 where the bound allows,
        else int64.

        Where the products' partial sums fit float32, so does the sum with the bias wherever it comes out below
        2^24 (float32 rounding is monotone): only where it does not is the bias added in float64 instead.
        Where float32 is too narrow for the products but float64 is not, the input is split into high and low
        halves (inp = high * 2^s + low): two float32 products, each exact, summed in float64. float32
        convolutions are several times faster than float64 ones on CPU. `l1`: the largest row sum of
        |weight|; `in_peak`: max |inp|; `weight_as(dtype)`: the weight as that type."""
        channel_shape = (1, -1) + (1,) * (inp.dim() - 2)
        products = l1 * in_peak  # bounds every partial sum, in any order
        bias = bias.view(channel_shape)
        bias_peak = int(bias.abs().max()) if bias.numel() else 0
        dtype = _float_dtype_for(products + bias_peak)
        if dtype is None:
            acc = int64_matmul(inp.to(torch.int64), weight_as(torch.int64)).add_(bias)
        elif products < 2**24:
            acc = matmul(inp, weight_as(torch.float32))
            if bias_peak < 2**24:
                exact = acc.add(bias.to(torch.float32))
                lo, hi = _min_max(exact)
                if max(-lo, hi) < 2**24:
                    return exact, lo, hi
            acc = acc.to(torch.float64).add_(bias.to(torch.float64))
        elif l1 * max(2 ** (s := (in_peak.bit_length() + 1) // 2) - 1, (in_peak >> s) + 1) < 2**24:
            low = torch.remainder(inp, 2**s)
            high = (inp - low).mul_(2.0**-s)
            acc = matmul(high, weight_as(torch.float32)).to(torch.float64).mul_(2**s)
            acc.add_(matmul(low, weight_as(torch.float32))).add_(bias.to(torch.float64))
        else:
            acc = matmul(inp, weight_as(dtype)).add_(bias.to(dtype))
        return (acc, *_min_max(acc))

    def _matmul_layer(self, node, shifted, offset, c: _MatmulConstants, q_in, matmul, int64_matmul, terms):
        """Exact sum of products, bias, accumulator semantics, requantization, clamp.

        `shifted` is the input less `offset`; (offset - zero point) * the weight's row sums joins the bias."""
        acc_spec = self.profile.accumulator
        lo, hi = acc_spec.range
        channel_shape = (1, -1) + (1,) * (shifted.dim() - 2)
        in_peak = max(q_in.qmax - offset, offset - q_in.qmin)
        bias = c.bias + (offset - q_in.zero_point) * c.row_sums
        exact, acc_min, acc_max = self._exact_accumulate(matmul, int64_matmul, shifted, c.weight_as, c.l1, bias,
                                                         in_peak)
        rep = LayerReport(node.name, node.op, exact.numel(), acc_spec.bits, acc_min, acc_max)
        in_range = lo <= acc_min and acc_max <= hi
        outside = None if in_range else (exact < lo) | (exact > hi)
        if acc_spec.saturate_at == "every_mac":
            acc, outside = self._saturate_every_mac(shifted, c, exact, matmul, int64_matmul, terms, in_peak)
        elif in_range:
            acc = exact
        elif acc_spec.overflow == "error":
            raise QftsimError(f"layer {node.name!r}: accumulator overflow in {int(outside.sum())} outputs "
                              f"(range [{lo}, {hi}], seen [{acc_min}, {acc_max}]); "
                              "the profile says accumulator.overflow: error")
        elif acc_spec.overflow == "wrap":
            acc = arith.wrap(exact, acc_spec.bits)
        else:
            acc = arith.saturate(exact, acc_spec.bits)
        rep.overflows = 0 if outside is None else int(outside.sum())
        if self.keep_accumulators:
            self.accumulators[node.name] = acc.numpy().astype(np.int32 if acc_spec.bits <= 32 else np.int64)
        m, t = c.multiplier.view(channel_shape), c.shift.view(channel_shape)
        # |acc| per channel: its static bound, capped by the layer's peak
        peak = None if outside is not None else \
            c.acc_bounds(in_peak, bias).clamp_(max=max(-acc_min, acc_max)).view(channel_shape).double()
        # float32 from here on (half the bytes): conversion and the zero point's addition are exact
        # below 2^24 and monotone above, so the clamp to <= 16-bit bounds and its counts are unchanged
        op = node_arithmetic(node, self.profile)
        y = arith.requantize_channels(acc, m, t, op, len(c.weight), acc_peak=peak)
        y = y.to(torch.float32).add_(node.quant.zero_point)
        return self._apply_clamp(node, y, rep)

    def _saturate_every_mac(self, centered, c: _MatmulConstants, exact, matmul, int64_matmul, terms, in_peak):
        """Saturate after every MAC: sequential only where |bias| + sum |products| can leave the range
        (`centered`: the input less its zero point, at most `in_peak` in magnitude)."""
        lo, hi = self.profile.accumulator.range
        bias = c.bias
        if int(c.acc_bounds(in_peak, bias).max()) <= hi:
            return exact, None  # no partial sum can leave the range (e.g. an A2Q-bounded layer)
        abs_weight_as = lambda dtype: c.weight_as(dtype, absolute=True)  # noqa: E731
        risky = self._exact_accumulate(matmul, int64_matmul, centered.abs(), abs_weight_as, c.l1, bias.abs(),
                                       in_peak)[0] > hi
        acc = exact.to(torch.int64, memory_format=torch.contiguous_format)  # (written through a flat view)
        outside = torch.zeros_like(acc, dtype=torch.bool)
        if risky.any():
            flat = torch.nonzero(risky.flatten()).flatten().numpy()
            prods = terms(flat, tuple(exact.shape))
            channels = np.unravel_index(flat, tuple(exact.shape))[1]
            running = bias[channels].clone()
            hit = torch.zeros(len(flat), dtype=torch.bool)
            for k in range(prods.shape[1]):
                running = running + prods[:, k]
                hit |= (running < lo) | (running > hi)
                running = running.clamp(lo, hi)
            acc.view(-1)[flat] = running
            outside.view(-1)[flat] = hit
        return acc, outside

    # ------------------------------------------------------------ other ops

    def _apply_clamp(self, node, y, rep):
        """The fused output clamp (in place on `y`, which the caller owns), counting values it cut."""
        lo, hi = node.attrs["clamp"]
        values = y.numpy()  # numpy's comparisons and counts are several times faster than torch's here
        rep.clamp_low, rep.clamp_high = np.count_nonzero(values < lo), np.count_nonzero(values > hi)
        self.report.append(rep)
        return y.clamp_(lo, hi)

    def _add(self, node, xs, in_quants):
        a = node.attrs
        op = node_arithmetic(node, self.profile)
        if op.form == "float32_fma":
            (qa, qb), ratios = in_quants, arith.float32_factors(a["input_multipliers"], a["input_shifts"])
            y = arith.add_float32_fma(xs[0], xs[1], *ratios, qa.zero_point, qb.zero_point, node.quant.zero_point)
            return self._apply_clamp(node, y, LayerReport(node.name, node.op, y.numel()))
        scale = 2.0 ** a["left_shift"]  # (x - zero point) * 2^left_shift is exact in float32: at most 2^31
        terms = [(x - q.zero_point).mul_(scale) for x, q in zip(xs, in_quants)]
        y = arith.add_requantized(terms, a["input_multipliers"], a["input_shifts"], a["multiplier"], a["shift"],
                                  op, self.model.shapes[node.name],
                                  peaks=[max_abs_centered(q) * scale for q in in_quants])
        y = y + node.quant.zero_point
        return self._apply_clamp(node, y, LayerReport(node.name, node.op, y.numel()))

    def _mul(self, node, xs, in_quants):
        """The product of the centred inputs (broadcasting), requantized to the output's scale."""
        (a, b), (qa, qb) = xs, in_quants
        product = (a.to(torch.float64) - qa.zero_point) * (b.to(torch.float64) - qb.zero_point)  # exact: < 2^31
        op = node_arithmetic(node, self.profile)
        m, t = (int(node.arrays[k][0]) for k in ("multiplier", "shift"))
        if op.zero_point == "float32":
            y = arith.mul_float32_zero_point(product, arith.float32_factors([m], [t])[0], node.quant.zero_point)
        else:
            y = arith.requantize(product, m, t, op.rounding, scheme=op.scheme) + node.quant.zero_point
        return self._apply_clamp(node, y, LayerReport(node.name, node.op, y.numel()))

    def _concat(self, node, xs, in_quants):
        a = node.attrs
        if a["input_multipliers"] is not None:
            out_q = node.quant
            rounding = node_arithmetic(node, self.profile).rounding
            xs = [(arith.requantize(x.to(torch.float64) - q.zero_point, m, t, rounding) + out_q.zero_point)
                  .clamp(out_q.qmin, out_q.qmax)
                  for x, q, m, t in zip(xs, in_quants, a["input_multipliers"], a["input_shifts"])]
        y = torch.cat(xs, dim=a["axis"])
        self.report.append(LayerReport(node.name, node.op, y.numel()))
        return y

    def _resize(self, node, xs, in_quants):
        (x,) = xs
        y = arith.resize(x.to(torch.float64), tuple(x.shape[2:]), node.attrs["mode"], node.attrs["size"],
                         arith.take_torch, node_arithmetic(node, self.profile).form)
        self.report.append(LayerReport(node.name, node.op, y.numel()))
        return y

    def _zero_insert(self, node, xs, in_quants):
        y = arith.zero_insert(xs[0], node.attrs["stride"], float(in_quants[0].zero_point))
        self.report.append(LayerReport(node.name, node.op, y.numel()))
        return y

    def _slice(self, node, xs, in_quants):
        a = node.attrs
        y = xs[0].narrow(a["axis"], a["start"], a["stop"] - a["start"])
        self.report.append(LayerReport(node.name, node.op, y.numel()))
        return y

    def _maxpool2d(self, node, xs, in_quants):
        (x,) = xs
        a = node.attrs
        pt, pl, pb, pr = a["padding"]
        padded = F.pad(x, (pl, pr, pt, pb), value=-math.inf)
        y = F.max_pool2d(padded, a["kernel"], a["stride"])
        self.report.append(LayerReport(node.name, node.op, y.numel()))
        return y

    def _avgpool2d(self, node, xs, in_quants):
        (x,), (q,) = xs, in_quants
        a = node.attrs
        op = node_arithmetic(node, self.profile)
        if op.domain == "float32":  # onnxruntime's QLinearAveragePool: its output has a quantization of its own
            y = arith.average_float32(x, q.scale, q.zero_point, node.quant.scale, node.quant.zero_point, a["kernel"],
                                      a["stride"], a["padding"], a["count_include_pad"])
            self.report.append(LayerReport(node.name, node.op, y.numel()))
            return y.clamp(node.quant.qmin, node.quant.qmax)
        kh, kw = a["kernel"]
        pt, pl, pb, pr = a["padding"]
        dtype = _float_dtype_for(kh * kw * max_abs_centered(q)) or torch.float64

        def window_sum(t):
            padded = F.pad(t.to(dtype), (pl, pr, pt, pb))
            return F.avg_pool2d(padded, (kh, kw), a["stride"], divisor_override=1).to(torch.float64)

        total = window_sum(x - q.zero_point)
        if a["count_include_pad"]:
            count = kh * kw
        else:
            count = window_sum(torch.ones_like(x[:1, :1]))
        y = arith.average(total, count, q.zero_point, op.rounding, op.domain)
        self.report.append(LayerReport(node.name, node.op, y.numel()))
        return y

    def _mean(self, node, xs, in_quants):
        """The sum over `axes` of the centred values, requantized to the output's scale."""
        (x,), (q,) = xs, in_quants
        total = (x.to(torch.float64) - q.zero_point).sum(dim=node.attrs["axes"], keepdim=node.attrs["keepdim"])
        op = node_arithmetic(node, self.profile)
        m, t = (int(node.arrays[k][0]) for k in ("multiplier", "shift"))
        y = arith.requantize(total, m, t, op.rounding, scheme=op.scheme) + node.quant.zero_point
        return self._apply_clamp(node, y, LayerReport(node.name, node.op, y.numel()))

    def _clamp(self, node, xs, in_quants):
        return self._apply_clamp(node, xs[0].clone(), LayerReport(node.name, node.op, xs[0].numel()))

    def _reshape(self, node, xs, in_quants):
        (x,) = xs
        self.report.append(LayerReport(node.name, node.op, x.numel()))
        return x.reshape((x.shape[0],) + self.model.shapes[node.name])

    def _lut(self, node, xs, in_quants):
        (x,), (q,) = xs, in_quants
        table = torch.from_numpy(node.arrays["table"].astype(np.float64))
        y = table[(x - q.qmin).to(torch.int64)]
        self.report.append(LayerReport(node.name, node.op, y.numel()))
        return y


def _conv2d_int64(padded, weight, stride, dilation, groups):
    """Exact integer convolution by unfold + int64 matmul (for sums past 2^53)."""
    n, c, h, w = padded.shape
    o, cg, kh, kw = weight.shape
    cols = F.unfold(padded.to(torch.float64), (kh, kw), dilation=dilation, stride=stride).to(torch.int64)
    ho = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = cols.view(n, groups, cg * kh * kw, ho * wo)
    wg = weight.reshape(groups, o // groups, cg * kh * kw)
    out = torch.einsum("gok,ngkl->ngol", wg, cols)
    return out.reshape(n, o, ho, wo)


def _conv_terms(padded, weight, attrs, flat_index, shape):
    """The int64 products of the flagged conv outputs, one row per output, in MAC order."""
    n_idx, o_idx, y_idx, x_idx = np.unravel_index(flat_index, shape)
    o, cg, kh, kw = weight.shape
    group = o_idx // (o // attrs["groups"])
    sh, sw = attrs["stride"]
    dh, dw = attrs["dilation"]
    ci = group[:, None] * cg + np.arange(cg)[None, :]                      # (F, cg)
    ky = y_idx[:, None] * sh + np.arange(kh)[None, :] * dh                 # (F, kh)
    kx = x_idx[:, None] * sw + np.arange(kw)[None, :] * dw                 # (F, kw)
    patch = padded[n_idx[:, None, None, None], ci[:, :, None, None], ky[:, None, :, None], kx[:, None, None, :]]
    weights = torch.from_numpy(weight[o_idx].reshape(len(flat_index), -1))
    return patch.reshape(len(flat_index), -1).to(torch.int64) * weights
