"""QGraph: the captured network with every quantization degree of freedom as a parameter.

Each tensor is carried as integers (in a float tensor) exactly as the
hardware will hold it. Training mode rounds with straight-through
estimators in float32 so that gradients reach the float weights, biases,
log weight scales, log activation scales and log cross-layer equalization
factors. Evaluation mode computes the same graph in float64 with the
integer weights, biases and hardware multipliers the IntModel will hold,
through `qftsim.arith`: its outputs equal the simulator's exactly.

What the profile fixes is not a parameter: bit widths, signedness, zero
points (set once from calibration), narrow range, power-of-two scales
(log2 rounded through an STE), the multiplier precision (the forward pass
uses the hardware multiplier m * 2^-t), per-tensor vs per-channel, and the
accumulator limit (A2Q: weights round toward zero under a per-channel L1
bound that the scale is raised to meet, so no MAC order can overflow).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qftsim import arith
from qftsim.capture import FGraph, FNode, lut_function
from qftsim.errors import QftsimError
from qftsim.intmodel import IntModel, ModelInput, Node, TensorQuant, stored_requant
from qftsim.profile import HardwareProfile, OpArithmetic, int_range, trainer_refusals

DOF_GROUPS = ("weights", "biases", "weight_scales", "act_scales", "equalization")
# the IntModel op each captured node kind becomes
INT_OPS = {"conv": "conv2d", "linear": "linear", "add": "add", "mul": "mul", "cat": "concat", "maxpool": "maxpool2d",
           "avgpool": "avgpool2d", "mean": "mean", "reshape": "reshape", "clamp": "clamp", "lut": "lut",
           "resize": "resize", "slice": "slice", "zero_insert": "zero_insert"}
_SHARES_INPUT_QUANT = ("maxpool", "avgpool", "reshape", "clamp", "resize", "slice", "zero_insert")
_BIAS_BUDGET = 0.25  # under A2Q, the bias may use this share of the accumulator range


class _StraightThrough(torch.autograd.Function):
    """fn(x) forward, identity backward: how rounding passes gradients in training."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _RequantizeSTE(torch.autograd.Function):
    """Training's requantization in one pass: clamp(round(sat(acc) * factor) + zp, lo, hi).

    round breaks ties by the profile's rounding rule, as the hardware does.

    sat is the accumulator's saturation (none for wrap, which has no useful
    gradient). Rounding passes gradients straight through and both clamps
    stop them, exactly as the composition of the separate ops would, with a
    fraction of their memory traffic (most of a training step's elementwise
    work)."""

    @staticmethod
    def forward(ctx, acc, factor, zero_point, bounds, acc_range, rounding):
        inside = None
        if acc_range is not None:
            inside = (acc >= acc_range[0]) & (acc <= acc_range[1])
            acc = acc.clamp(*acc_range)
        y = arith.round_real_(acc * factor, rounding).add_(zero_point)
        kept = (y >= bounds[0]) & (y <= bounds[1])
        ctx.save_for_backward(acc, factor, kept, inside)
        return y.clamp_(*bounds)

    @staticmethod
    def backward(ctx, grad):
        acc, factor, kept, inside = ctx.saved_tensors
        grad = grad.masked_fill(~kept, 0.0)
        grad_factor = None
        if ctx.needs_input_grad[1]:
            dims = [d for d in range(grad.dim()) if factor.dim() < grad.dim() or factor.shape[d] == 1]
            grad_factor = (grad * acc).sum(dims, keepdim=factor.dim() == grad.dim()).view(factor.shape)
        grad_acc = grad * factor
        grad_acc = grad_acc if inside is None else grad_acc.masked_fill_(~inside, 0.0)
        return grad_acc, grad_factor, None, None, None, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _StraightThrough.apply(x, torch.round)


def round_like_ste(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """x rounded by the tie rule of the profile's `rounding`, gradient straight through."""
    return _StraightThrough.apply(x, lambda v: arith.round_real_(v.clone(), rounding))


def trunc_ste(x: torch.Tensor) -> torch.Tensor:
    return _StraightThrough.apply(x, torch.trunc)


def _key(name: str) -> str:
    return name.replace(".", "_")


class QGraph(nn.Module):
    """Fake-quantized FGraph for one profile; `integerize()` returns the IntModel it computes in eval mode."""

    def __init__(self, fgraph: FGraph, profile: HardwareProfile):
        super().__init__()
        self.fg = fgraph
        self.profile = profile
        check_profile_can_express(fgraph, profile)
        self.weight = nn.ParameterDict()
        self.bias = nn.ParameterDict()
        self.log_weight_scale = nn.ParameterDict()
        self.log_act_scale = nn.ParameterDict()
        self.log_equalization = nn.ParameterDict()  # by producer: its output channel c divided by e[c]
        self.quant_source: dict[str, str] = {}  # tensor -> tensor that owns its scale and zero point
        self.signed: dict[str, bool] = {}
        self.zero_points: dict[str, int] = {}
        self.cle_pairs: dict[str, str] = {}  # consumer -> producer
        self.weight_scales_as_gains = False  # training only: see hold_integer_weights
        per_channel = profile.weights.per_channel
        for n in fgraph.nodes:
            k = _key(n.name)
            if n.kind in ("conv", "linear"):
                self.weight[k] = nn.Parameter(n.weight.float().clone())
                self.bias[k] = nn.Parameter(n.bias.float().clone())
                self.log_weight_scale[k] = nn.Parameter(torch.zeros(n.weight.shape[0] if per_channel else 1))
            if n.kind in _SHARES_INPUT_QUANT:
                self.quant_source[n.name] = self.quant_source[n.inputs[0]]
            else:
                self.quant_source[n.name] = n.name
                self.log_act_scale[k] = nn.Parameter(torch.zeros(()))
                self.signed[n.name] = _signedness(profile, n)
                self.zero_points[n.name] = 0
        if profile.activations.channelwise_via_requant and profile.requant.per_channel:
            for consumer, producer in equalization_pairs(fgraph).items():
                self.cle_pairs[consumer] = producer
                channels = fgraph.node(producer).weight.shape[0]
                self.log_equalization[_key(producer)] = nn.Parameter(torch.zeros(channels))

    # ------------------------------------------------------------ quantization of tensors

    def tensor_quant(self, name: str) -> TensorQuant:
        src = self.quant_source[name]
        bits = self.profile.activations.bits
        return TensorQuant(bits, self.signed[src], self.zero_points[src], float(self.act_scale(name).detach()))

    def qrange(self, name: str) -> tuple[int, int]:
        return int_range(self.profile.activations.bits, self.signed[self.quant_source[name]])

    def act_scale(self, name: str) -> torch.Tensor:
        return self._pow2(self.log_act_scale[_key(self.quant_source[name])].exp(), self.profile.activations.scale)

    def set_act_range(self, name: str, lo: float, hi: float) -> None:
        """Scale and zero point covering [lo, hi] (widened to include 0)."""
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        qmin, qmax = self.qrange(name)
        if self.profile.activations.symmetric or not self.signed[name] and lo >= 0 and qmin == 0:
            scale = max(abs(lo) / max(-qmin, 1) if lo < 0 else 0.0, hi / qmax, 1e-8)
            zp = 0
        else:
            scale = max((hi - lo) / (qmax - qmin), 1e-8)
            zp = int(min(max(round(qmin - lo / scale), qmin), qmax))
        with torch.no_grad():
            self.log_act_scale[_key(name)].fill_(math.log(scale))
        self.zero_points[name] = zp

    def weight_scale(self, n: FNode) -> torch.Tensor:
        """Per-output-channel step of the integer weights (A2Q: raised to meet the L1 bound)."""
        s = self.free_weight_scale(n)
        if self.profile.accumulator.guarantee == "a2q":
            limit = self.a2q_limit(n)
            l1 = self.effective_weight(n).abs().flatten(1).sum(1)
            needed = (l1 / limit).detach()
            if not self.profile.weights.per_channel:
                needed = needed.max().reshape(1)
            if self.profile.weights.scale == "power_of_two":
                needed = torch.exp2(torch.ceil(torch.log2(needed.clamp(min=1e-30))))
            s = torch.maximum(s, needed.to(s.dtype))
        return s

    def free_weight_scale(self, n: FNode) -> torch.Tensor:
        """The weight step its parameter sets (power of two where the profile says), before any A2Q bound."""
        return self._pow2(self.log_weight_scale[_key(n.name)].exp(), self.profile.weights.scale)

    def a2q_limit(self, n: FNode) -> float:
        """Largest integer L1 norm per weight row that keeps every partial sum (bias first) in range."""
        q = self.qrange(n.inputs[0])
        zp = self.zero_points[self.quant_source[n.inputs[0]]]
        peak = max(q[1] - zp, zp - q[0])
        acc_max = self.profile.accumulator.range[1]
        return math.floor(acc_max * (1 - _BIAS_BUDGET) / peak)

    def effective_weight(self, n: FNode) -> torch.Tensor:
        """The float weight with the CLE factors of its input channels folded in."""
        w = self.weight[_key(n.name)]
        producer = self.cle_pairs.get(n.name)
        if producer is None:
            return w
        e = self.log_equalization[_key(producer)].exp()
        if n.kind == "conv" and n.attrs["groups"] > 1:  # depthwise: input channel c is output channel c
            return w * e.view(-1, 1, 1, 1)
        return w * e.view(1, -1, *([1] * (w.dim() - 2)))

    def output_equalization(self, n: FNode) -> torch.Tensor | None:
        p = self.log_equalization[_key(n.name)] if _key(n.name) in self.log_equalization else None
        return None if p is None else p.exp()

    @staticmethod
    def _pow2(scale: torch.Tensor, kind: str) -> torch.Tensor:
        return torch.exp2(round_ste(torch.log2(scale))) if kind == "power_of_two" else scale

    def int_weight(self, n: FNode) -> torch.Tensor:
        """Integer weights: rounded to nearest; under A2Q, a row whose rounded L1 norm exceeds the bound is
        truncated toward zero instead, which the weight scale keeps within it (A2Q truncates every row,
        with four times the error variance of rounding)."""
        shape = (-1, *([1] * (n.weight.dim() - 1)))
        scale = self.weight_scale(n)
        if self.weight_scales_as_gains:  # its gradient is that of the channel's gain alone (hold_integer_weights)
            scale = scale.detach()
        w = self.effective_weight(n) / scale.view(shape)
        bounds = self.profile.weights.qmin, self.profile.weights.qmax
        nearest = torch.clamp(round_ste(w), *bounds)
        if self.profile.accumulator.guarantee != "a2q":
            return nearest
        fits = nearest.detach().abs().flatten(1).sum(1) <= self.a2q_limit(n)
        return torch.where(fits.view(shape), nearest, torch.clamp(trunc_ste(w), *bounds))

    @torch.no_grad()
    def weight_steps(self) -> dict[str, torch.Tensor]:
        """Every conv/linear node's free weight step(s), by node name (a copy)."""
        return {n.name: self.free_weight_scale(n).clone() for n in self.fg.nodes if n.kind in ("conv", "linear")}

    @torch.no_grad()
    def hold_integer_weights(self, before: dict[str, torch.Tensor]) -> None:
        """Scale each weight row by its step's change since `before` (weight_steps()): a weight scale that
        moves is then the channel's gain, and its integer weights stay as they were. (Under A2Q a bound
        step follows the weights already; only the free step is held, lest the two feed each other.)

        Used in training where `weight_scales_as_gains`, whose integers then move only by their own rate.
        Otherwise one small step of a log-scale re-rounds the whole row: at 8 bits a change of 0.5% moves
        the largest integers by 0.6 of a step, a random flip of many weights."""
        for n in self.fg.nodes:
            if n.name in before:
                ratio = self.free_weight_scale(n) / before[n.name]
                self.weight[_key(n.name)].mul_(ratio.view(-1, *([1] * (n.weight.dim() - 1))))

    def bias_range(self) -> tuple[int, int]:
        """The integer range a bias may take (under A2Q, its share of the accumulator)."""
        lo, hi = self.profile.bias.range
        if self.profile.accumulator.guarantee == "a2q":
            hi = min(hi, math.floor(self.profile.accumulator.range[1] * _BIAS_BUDGET))
            lo = -hi
        return lo, hi

    def int_bias(self, n: FNode) -> torch.Tensor:
        """The integer bias in float64 (float32 cannot hold 2^31 - 1, a 32-bit bias's bound)."""
        step = (self.act_scale(n.inputs[0]) * self.weight_scale(n)).double()
        return torch.clamp(round_ste(self.bias[_key(n.name)].double() / step), *self.bias_range())

    def arithmetic(self, n: FNode) -> OpArithmetic:
        """The profile's arithmetic for node n, as intmodel.node_arithmetic decides it for the node it becomes."""
        if n.kind == "conv":
            if n.attrs.get("transposed"):
                return self.profile.arithmetic("transpose_conv2d")
            depthwise = n.attrs["groups"] > 1 and n.weight.shape[1] == 1  # as intmodel's "auto" decides it
            return self.profile.arithmetic("depthwise_conv2d" if depthwise else "conv2d")
        return self.profile.arithmetic(INT_OPS[n.kind])

    def multipliers(self, real: torch.Tensor, scheme: str = "fixed_point"):
        """(factor used in training, m, t): the hardware's m * 2^-t, with the real factor's gradient."""
        rq = self.profile.requant
        b, lo = rq.multiplier_bits, rq.shift_range[0]
        if scheme in arith.FLOAT_SCHEMES:
            b, lo = arith.FLOAT_SCHEMES[scheme][2], 0
        elif scheme == "shift_only":
            b = 0
        largest = ((1 << b) - 1 if b else 1) * 2.0 ** (-lo)
        wanted = np.minimum(real.detach().double().cpu().numpy().reshape(-1), largest)
        m, t = arith.op_multipliers(wanted, scheme, b, rq.shift_range)
        hw = torch.as_tensor(m * np.ldexp(1.0, -t), dtype=real.dtype, device=real.device).view(real.shape)
        return real + (hw - real).detach(), m, t

    def clamp_bounds(self, name: str, act) -> tuple[int, int]:
        """Integer bounds of a real clamp (lo, hi) on tensor `name`."""
        qmin, qmax = self.qrange(name)
        if act is None:
            return qmin, qmax
        s = float(self.act_scale(name).detach())
        zp = self.zero_points[self.quant_source[name]]
        lo = qmin if act[0] == -math.inf else max(qmin, zp + round(act[0] / s))
        hi = qmax if act[1] == math.inf else min(qmax, zp + round(act[1] / s))
        return int(lo), int(max(lo, hi))

    def requant_factor(self, n: FNode) -> torch.Tensor:
        """Real multiplier from the accumulator to the output integers, per output channel, derived from the
        float32 scales as the engine derives it from a model file's (so a .tflite can state it exactly)."""
        e = self.output_equalization(n)
        s_w = self.weight_scale(n) if e is None else self.weight_scale(n) / e  # the weight scale a file stores
        return arith.engine_real(self.act_scale(n.inputs[0]), s_w, self.act_scale(n.name), self.arithmetic(n).scheme)

    # ------------------------------------------------------------ forward

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        name = self.fg.nodes[0].name
        qmin, qmax = self.qrange(name)
        x = x.double() if not self.training else x.float()
        y = round_ste(x / self.act_scale(name).to(x.dtype)) + self.zero_points[name]
        return torch.clamp(y, qmin, qmax)

    def run_integers(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor's integers (in float tensors) for a real input batch."""
        env = {self.fg.nodes[0].name: self.quantize_input(x)}
        for n in self.fg.nodes[1:]:
            env[n.name] = self.node_forward(n, [env[s] for s in n.inputs])
        return env

    def forward(self, x: torch.Tensor, keep: tuple[str, ...] | None = None):
        """Real-valued output for a real input batch; with `keep`, also those tensors (real) by name."""
        env = self.run_integers(x)
        out = self.dequantize(self.fg.output, env[self.fg.output])
        if keep is not None:
            return out, {k: self.dequantize(k, env[k]) for k in keep}
        return out

    def dequantize(self, name: str, q: torch.Tensor) -> torch.Tensor:
        zp = self.zero_points[self.quant_source[name]]
        return (q - zp) * self.act_scale(name).to(q.dtype)

    def node_forward(self, n: FNode, xs: list[torch.Tensor]) -> torch.Tensor:
        return getattr(self, f"_{n.kind}")(n, xs)

    def _round(self, v: torch.Tensor, real_factor, m, t, op: OpArithmetic):
        """v * factor rounded: in training by the op's tie rule (STE), in eval by its exact requantization."""
        if self.training:
            return round_like_ste(v * real_factor, op.rounding)
        shape = (1, -1) + (1,) * (v.dim() - 2) if m.size > 1 else (1,) * v.dim()
        return arith.requantize_channels(v, torch.from_numpy(m).view(shape), torch.from_numpy(t).view(shape), op,
                                         v.shape[1] if v.dim() > 1 else 1).to(torch.float64)

    def _matmul(self, n: FNode, xs):
        (x,) = xs
        w_int = self.int_weight(n).to(x.dtype)
        b_int = self.int_bias(n).to(x.dtype)
        zp = self.zero_points[self.quant_source[n.inputs[0]]]
        centered = x - zp if zp else x
        if n.kind == "conv":
            pt, pl, pb, pr = n.attrs["padding"]
            symmetric = pt == pb and pl == pr
            acc = F.conv2d(centered if symmetric else F.pad(centered, (pl, pr, pt, pb)), w_int, b_int,
                           n.attrs["stride"], (pt, pl) if symmetric else 0, n.attrs["dilation"], n.attrs["groups"])
        else:
            acc = F.linear(centered, w_int, b_int)
        op = self.arithmetic(n)
        factor, m, t = self.multipliers(self.requant_factor(n), op.scheme)
        shape = (1, -1) + (1,) * (acc.dim() - 2)
        factor = factor.to(acc.dtype).view(shape) if factor.numel() > 1 else factor.to(acc.dtype)
        bounds = self.clamp_bounds(n.name, n.act)
        if self.training:
            spec = self.profile.accumulator
            acc_range = spec.range if spec.overflow == "saturate" else None
            return _RequantizeSTE.apply(acc, factor, self.zero_points[n.name], bounds, acc_range, op.rounding)
        y = self._round(self._accumulator(acc), factor, m, t, op) + self.zero_points[n.name]
        return torch.clamp(y, *bounds)

    _conv = _matmul
    _linear = _matmul

    def _accumulator(self, acc: torch.Tensor) -> torch.Tensor:
        """The accumulator's overflow semantics in evaluation (training: see _RequantizeSTE)."""
        spec = self.profile.accumulator
        lo, hi = spec.range
        if spec.overflow == "wrap":
            return arith.wrap(acc, spec.bits)
        if spec.overflow == "saturate":
            return arith.saturate(acc, spec.bits)  # every_mac is reachable only under A2Q: no partial overflow
        if acc.numel() and (acc.min() < lo or acc.max() > hi):
            raise QftsimError("accumulator overflow in evaluation (profile says accumulator.overflow: error)")
        return acc

    def add_multipliers(self, n: FNode):
        """(factor, m, t) for each input's rescale and for the output, in the profile's add form.

        tflite: both inputs to twice the larger scale (after the left shift), then the sum to the output.
        single_multiplier (XNNPACK): each input by an integer of about 21 bits (shift 0), the sum by 2^-s."""
        s_a, s_b = (self.act_scale(i) for i in n.inputs)
        if self.arithmetic(n).form == "float32_fma":  # onnxruntime: float32 ratios of the float32 scales
            s_out = self.act_scale(n.name)
            ratios = [self.multipliers(arith.engine_real(s, torch.ones_like(s), s_out, "float32").reshape(1), "float32")
                      for s in (s_a, s_b)]
            return [*ratios, (torch.ones(1, dtype=s_a.dtype), np.ones(1, np.int64), np.zeros(1, np.int64))]
        if self.arithmetic(n).form == "single_multiplier":
            ratios = [s / self.act_scale(n.name) for s in (s_a, s_b)]
            shift = 20 - math.floor(math.log2(float(torch.maximum(*ratios).detach())))
            rescales = []
            for r in ratios:
                f = r.reshape(1) * 2.0**shift
                m = np.rint(f.detach().double().numpy()).astype(np.int64)
                rescales.append((f + (torch.as_tensor(m, dtype=f.dtype) - f).detach(), m, np.zeros(1, np.int64)))
            one = torch.ones(1, dtype=s_a.dtype) * 2.0**-shift
            return [*rescales, (one, np.ones(1, np.int64), np.full(1, shift, np.int64))]
        reals = arith.tflite_add_reals(s_a, s_b, self.act_scale(n.name), self.profile.ops.add_left_shift)
        return [self.multipliers(v.reshape(1)) for v in reals]

    def cat_multipliers(self, n: FNode):
        return [self.multipliers((self.act_scale(i) / self.act_scale(n.name)).reshape(1)) for i in n.inputs]

    def _add(self, n: FNode, xs):
        *rescales, (factor, m, t) = self.add_multipliers(n)
        op = self.arithmetic(n)
        terms = [(x - self.zero_points[self.quant_source[name]]) * 2.0**self.profile.ops.add_left_shift
                 for x, name in zip(xs, n.inputs)]
        if op.form == "float32_fma" and not self.training:  # the raw inputs, as onnxruntime's kernel takes them
            zero_a, zero_b = (int(self.zero_points[self.quant_source[name]]) for name in n.inputs)
            ratios = arith.float32_factors(*zip(*[(int(mi[0]), int(ti[0])) for _, mi, ti in rescales]))
            y = arith.add_float32_fma(xs[0].double(), xs[1].double(), *ratios, zero_a, zero_b,
                                      int(self.zero_points[n.name]))
            return torch.clamp(y.to(xs[0].dtype), *self.clamp_bounds(n.name, n.act))
        if op.form == "float32_fma":  # training: the centred sum, rounded once (ties aside, the kernel's value)
            total = sum(v * f.to(v.dtype) for v, (f, _, _) in zip(terms, rescales))
            y = self._round(total, factor.to(total.dtype), m, t, op)
        elif self.training:
            total = sum(self._round(v, f.to(v.dtype), mi, ti, op) for v, (f, mi, ti) in zip(terms, rescales))
            y = self._round(total, factor.to(total.dtype), m, t, op)
        else:
            y = arith.add_requantized(terms, [int(mi[0]) for _, mi, _ in rescales],
                                      [int(ti[0]) for _, _, ti in rescales], int(m[0]), int(t[0]), op, n.shape)
        y = y + self.zero_points[n.name]
        return torch.clamp(y, *self.clamp_bounds(n.name, n.act))

    def mul_multipliers(self, n: FNode):
        """(factor, m, t) of the product of the centred inputs to the output: s_a * s_b / s_out."""
        s_a, s_b = (self.act_scale(i) for i in n.inputs)
        scheme = self.arithmetic(n).scheme
        return self.multipliers(arith.engine_real(s_a, s_b, self.act_scale(n.name), scheme).reshape(1), scheme)

    def _mul(self, n: FNode, xs):
        a, b = (x - self.zero_points[self.quant_source[name]] for x, name in zip(xs, n.inputs))
        factor, m, t = self.mul_multipliers(n)
        op = self.arithmetic(n)
        if op.zero_point == "float32" and not self.training:  # onnxruntime's QLinearMul
            (f32,) = arith.float32_factors(m, t)
            y = arith.mul_float32_zero_point((a * b).double(), f32, int(self.zero_points[n.name])).to(a.dtype)
        else:
            y = self._round(a * b, factor.to(a.dtype), m, t, op) + self.zero_points[n.name]
        return torch.clamp(y, *self.clamp_bounds(n.name, n.act))

    def _cat(self, n: FNode, xs):
        qmin, qmax = self.qrange(n.name)
        parts = []
        op = self.arithmetic(n)
        for x, name, (factor, m, t) in zip(xs, n.inputs, self.cat_multipliers(n)):
            centered = x - self.zero_points[self.quant_source[name]]
            parts.append(torch.clamp(self._round(centered, factor.to(x.dtype), m, t, op) + self.zero_points[n.name],
                                     qmin, qmax))
        return torch.cat(parts, dim=n.attrs["axis"])

    def _zero_insert(self, n: FNode, xs):
        return arith.zero_insert(xs[0], n.attrs["stride"], float(self.zero_points[self.quant_source[n.name]]))

    def _slice(self, n: FNode, xs):
        return xs[0].narrow(n.attrs["axis"], n.attrs["start"], n.attrs["stop"] - n.attrs["start"])

    def _resize(self, n: FNode, xs):
        """The integer resize of arith (in training with the gradient of torch's float interpolation)."""
        (x,) = xs
        in_hw = tuple(x.shape[2:])
        form = self.profile.arithmetic("resize").form
        if not self.training or n.attrs["mode"] == "nearest":  # nearest: a gather, whose gradient is exact
            return arith.resize(x, in_hw, n.attrs["mode"], n.attrs["size"], arith.take_torch, form)
        exact = arith.resize(x.detach().double(), in_hw, "bilinear", n.attrs["size"], arith.take_torch, form)
        soft = F.interpolate(x, size=n.attrs["size"], mode="bilinear", align_corners=False)
        return soft + (exact.to(soft.dtype) - soft).detach()

    def _maxpool(self, n: FNode, xs):
        pt, pl, pb, pr = n.attrs["padding"]
        return F.max_pool2d(F.pad(xs[0], (pl, pr, pt, pb), value=-math.inf), n.attrs["kernel"], n.attrs["stride"])

    def _avgpool(self, n: FNode, xs):
        (x,) = xs
        a = n.attrs
        pt, pl, pb, pr = a["padding"]
        kh, kw = a["kernel"]
        zp = self.zero_points[self.quant_source[n.name]]
        op = self.arithmetic(n)
        if op.domain == "float32" and not self.training:  # onnxruntime's (the output shares the input's scale)
            s = float(self.act_scale(n.name).detach())
            return arith.average_float32(x, s, zp, s, zp, a["kernel"], a["stride"], a["padding"],
                                         a["count_include_pad"]).to(x.dtype)
        total = F.avg_pool2d(F.pad(x - zp, (pl, pr, pt, pb)), (kh, kw), a["stride"], divisor_override=1)
        if a["count_include_pad"]:
            count = torch.tensor(float(kh * kw), dtype=x.dtype)
        else:
            ones = F.pad(torch.ones_like(x[:1, :1]), (pl, pr, pt, pb))
            count = F.avg_pool2d(ones, (kh, kw), a["stride"], divisor_override=1)
        if self.training:  # the raw domain's mean is the centred one plus the zero point (float32: ties aside)
            if op.domain == "raw":
                return round_like_ste(total / count + zp, op.rounding)
            return round_like_ste(total / count, op.rounding) + zp
        return arith.average(total.round(), count, zp, op.rounding, op.domain)

    def mean_multipliers(self, n: FNode):
        """(factor, m, t) of the sum of the centred inputs to the output: s_in / (s_out * count)."""
        shape = self.fg.node(n.inputs[0]).shape
        count = math.prod(shape[a - 1] for a in n.attrs["axes"])
        scheme = self.arithmetic(n).scheme
        s_in, s_out, one = self.act_scale(n.inputs[0]), self.act_scale(n.name), torch.ones(())
        if scheme != "fixed_point":
            return self.multipliers(arith.engine_real(s_in, one, s_out, scheme, count).reshape(1), scheme)
        # TFLite's derivation: s_in / s_out's multiplier divided by the count in integers
        factor, m0, t0 = self.multipliers(arith.engine_real(s_in, one, s_out, scheme).reshape(1), scheme)
        m, t = arith.tflite_mean_multiplier(int(m0[0]), int(t0[0]), count, self.profile.requant.shift_range[1])
        hw = torch.full_like(factor, m * 2.0**-t)
        return factor / count + (hw - factor / count).detach(), np.array([m]), np.array([t])

    def _mean(self, n: FNode, xs):
        total = (xs[0] - self.zero_points[self.quant_source[n.inputs[0]]]).sum(n.attrs["axes"],
                                                                               keepdim=n.attrs["keepdim"])
        factor, m, t = self.mean_multipliers(n)
        y = self._round(total, factor.to(total.dtype), m, t, self.arithmetic(n)) + self.zero_points[n.name]
        return torch.clamp(y, *self.clamp_bounds(n.name, n.act))

    def _reshape(self, n: FNode, xs):
        return xs[0].reshape((xs[0].shape[0],) + n.shape)

    def _clamp(self, n: FNode, xs):
        return torch.clamp(xs[0], *self.clamp_bounds(n.name, n.act))

    def lut_table(self, n: FNode) -> torch.Tensor:
        """The 2^bits-entry table of a pointwise function, from the current scales (float64)."""
        qmin, qmax = self.qrange(n.inputs[0])
        codes = torch.arange(qmin, qmax + 1, dtype=torch.float64)
        return self._lut_values(n, codes, torch.float64)

    def _lut_values(self, n: FNode, q: torch.Tensor, dtype) -> torch.Tensor:
        zp_in = self.zero_points[self.quant_source[n.inputs[0]]]
        real = (q - zp_in) * self.act_scale(n.inputs[0]).to(dtype)
        y = round_ste(lut_function(n.attrs)(real) / self.act_scale(n.name).to(dtype))
        return torch.clamp(y + self.zero_points[n.name], *self.qrange(n.name))

    def _lut(self, n: FNode, xs):
        (x,) = xs
        if self.training:
            return self._lut_values(n, x, x.dtype)
        qmin = self.qrange(n.inputs[0])[0]
        return self.lut_table(n)[(x - qmin).long()]

    # ------------------------------------------------------------ IntModel

    @torch.no_grad()
    def integerize(self) -> IntModel:
        """The IntModel that this graph computes in evaluation mode."""
        p = self.profile
        first = self.fg.nodes[0]
        inputs = [ModelInput(first.name, tuple(first.shape), self.tensor_quant(first.name))]
        nodes = []
        w_dtype = np.int8 if p.weights.bits <= 8 else np.int16
        for n in self.fg.nodes[1:]:
            quant = self.tensor_quant(n.name)
            if n.kind in ("conv", "linear"):
                scheme = self.arithmetic(n).scheme
                _, m, t = self.multipliers(self.requant_factor(n), scheme)
                arrays = {"weight": self.int_weight(n).double().numpy().astype(w_dtype),
                          "bias": self.int_bias(n).double().numpy().astype(np.int32),
                          **stored_requant(m, t, scheme)}
                attrs = {"clamp": list(self.clamp_bounds(n.name, n.act))}
                if n.kind == "conv":
                    attrs.update(stride=list(n.attrs["stride"]), padding=list(n.attrs["padding"]),
                                 dilation=list(n.attrs["dilation"]), groups=n.attrs["groups"],
                                 transposed=bool(n.attrs.get("transposed")))
                nodes.append(Node(n.name, INT_OPS[n.kind], list(n.inputs), quant,
                                  attrs, arrays))
            elif n.kind == "add":
                (_, ma, ta), (_, mb, tb), (_, mo, to) = self.add_multipliers(n)
                nodes.append(Node(n.name, "add", list(n.inputs), quant, {
                    "input_multipliers": [int(ma[0]), int(mb[0])], "input_shifts": [int(ta[0]), int(tb[0])],
                    "multiplier": int(mo[0]), "shift": int(to[0]), "left_shift": p.ops.add_left_shift,
                    "clamp": list(self.clamp_bounds(n.name, n.act))}))
            elif n.kind in ("mul", "mean"):
                _, m, t = getattr(self, f"{n.kind}_multipliers")(n)
                attrs = {"axes": list(n.attrs["axes"]), "keepdim": n.attrs["keepdim"]} if n.kind == "mean" else {}
                nodes.append(Node(n.name, n.kind, list(n.inputs), quant,
                                  {**attrs, "clamp": list(self.clamp_bounds(n.name, n.act))},
                                  stored_requant(m, t, self.arithmetic(n).scheme)))
            elif n.kind == "cat":
                pairs = [(int(m[0]), int(t[0])) for _, m, t in self.cat_multipliers(n)]
                nodes.append(Node(n.name, "concat", list(n.inputs), quant, {
                    "input_multipliers": [m for m, _ in pairs], "input_shifts": [t for _, t in pairs],
                    "axis": n.attrs["axis"]}))
            elif n.kind in ("resize", "slice", "zero_insert"):
                nodes.append(Node(n.name, n.kind, list(n.inputs), quant, dict(n.attrs)))
            elif n.kind in ("maxpool", "avgpool"):
                attrs = {k: (list(v) if isinstance(v, list) else v) for k, v in n.attrs.items()}
                nodes.append(Node(n.name, INT_OPS[n.kind], list(n.inputs), quant, attrs))
            elif n.kind == "reshape":
                nodes.append(Node(n.name, "reshape", list(n.inputs), quant, {"shape": [-1]}))
            elif n.kind == "clamp":
                nodes.append(Node(n.name, "clamp", list(n.inputs), quant,
                                  {"clamp": list(self.clamp_bounds(n.name, n.act))}))
            elif n.kind == "lut":
                table = self.lut_table(n).numpy().astype(quant.dtype)
                nodes.append(Node(n.name, "lut", list(n.inputs), quant, {}, {"table": table}))
        return IntModel(p, inputs, nodes, [self.fg.output])


def _signedness(profile: HardwareProfile, n: FNode) -> bool:
    signed = profile.activations.signed
    if signed == "auto":
        return not n.nonnegative
    return bool(signed)


def equalization_pairs(fg: FGraph) -> dict[str, str]:
    """consumer -> producer where a per-channel factor can move between them (DFQ's condition).

    The producer is a conv whose only consumer is a conv, with no clamp or a
    ReLU (positive-homogeneous) between them; ReLU6 and other bounded clamps
    do not commute with scaling and are left alone.
    """
    pairs = {}
    for n in fg.nodes:
        if n.kind != "conv":
            continue
        producer = fg.node(n.inputs[0])
        relu_or_none = producer.act is None or producer.act == (0.0, math.inf)
        plain_or_depthwise = n.attrs["groups"] == 1 or (
            n.weight.shape[1] == 1 and n.weight.shape[0] == n.attrs["groups"])
        if (producer.kind == "conv" and relu_or_none and plain_or_depthwise and len(fg.consumers(producer.name)) == 1
                and fg.output != producer.name):
            pairs[n.name] = producer.name
    return pairs


def check_profile_can_express(fg: FGraph, profile: HardwareProfile) -> None:
    """Report, before any training, what this profile cannot express for this network."""
    for n in fg.nodes[1:]:
        if INT_OPS[n.kind] not in profile.ops.supported:
            raise QftsimError(f"node {n.name!r}: profile {profile.name} does not support {INT_OPS[n.kind]}")
        if n.kind == "cat" and not profile.ops.concat_rescale:
            raise QftsimError(f"node {n.name!r}: profile {profile.name} needs concat inputs to share one scale "
                              "(ops.concat_rescale: false), which the trainer does not support yet")
    refusals = trainer_refusals(profile)
    if refusals:
        raise QftsimError(f"profile {profile.name}: {refusals[0]}")
    if fg.nodes[0].kind != "input" or len(fg.nodes[0].shape) not in (1, 3):
        raise QftsimError("the model must take one input of shape (batch, C, H, W) or (batch, features)")
