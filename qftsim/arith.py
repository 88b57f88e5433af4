"""The one place where integers are rounded, requantized, accumulated, wrapped and saturated.

Every function is vectorized and takes numpy integer arrays or torch tensors
(int64, or float tensors holding integers, as the trainer and simulator
use); the result has the input's type and dtype, except that float tensors
come back as float64, which holds every result exactly (a float32-scheme
requantization's as float32, the type it computes in: a conversion pass less
where the simulator holds float32). Internally everything runs in int64, which is
exact under the limits the profile validator enforces (|acc| < 2^31,
multiplier < 2^31, right shift <= 62, left shift bounded by 31 - bits).

Conventions: a requantization multiplier is a pair (m, t) meaning the real
factor m * 2^-t; t is the total right shift (negative t shifts left).
"""

from __future__ import annotations


import numpy as np
import torch

from qftsim.errors import QftsimError

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------- backends

# Symbolic int64 tensor types (the TVM exporter's) that implement Python's
# integer operators, comparisons, astype and clip: the int64 formulas below
# run on them unchanged, so the compiled model computes these very formulas.
_EXPR_TYPES: tuple[type, ...] = ()


def register_expression_type(cls: type) -> None:
    """Let the integer paths accept `cls` (symbolic int64 tensors); the float paths never see it."""
    global _EXPR_TYPES
    _EXPR_TYPES = (*_EXPR_TYPES, cls)


def _is_expr(x) -> bool:
    return isinstance(x, _EXPR_TYPES)


def _is_torch(x) -> bool:
    return isinstance(x, torch.Tensor)


def _to_int64(x, like=None):
    """x as an int64 array of the same library (numpy for Python scalars)."""
    if _is_expr(x):
        return x
    if _is_torch(x):
        return x.to(torch.int64)
    if like is not None and _is_torch(like):
        return torch.as_tensor(np.asarray(x, dtype=np.int64), device=like.device)
    return np.asarray(x, dtype=np.int64)


def _restore(result, original):
    """Cast a result to the caller's type: its integer dtype, or float64 for any float tensor (exact)."""
    if _is_expr(original):
        return result
    if _is_torch(original):
        return result.to(torch.float64 if original.is_floating_point() else original.dtype)
    if isinstance(original, np.ndarray):
        return result.astype(original.dtype, copy=False)
    return result


def _where(cond, a, b):
    if _is_expr(cond):
        return cond.where(a, b)
    return torch.where(cond, a, b) if _is_torch(cond) else np.where(cond, a, b)


def _floor(x):
    if _is_expr(x):
        return x.floor()
    return torch.floor(x) if _is_torch(x) else np.floor(x)


def _clip(x, lo, hi):
    if _is_expr(x):
        return x.clip(lo, hi)
    if _is_torch(x):
        lo_t = lo if _is_torch(lo) else torch.as_tensor(lo, dtype=torch.int64, device=x.device)
        hi_t = hi if _is_torch(hi) else torch.as_tensor(hi, dtype=torch.int64, device=x.device)
        return torch.minimum(torch.maximum(x, lo_t), hi_t)
    return np.clip(x, lo, hi)


def _maximum0(x):
    return torch.clamp(x, min=0) if _is_torch(x) else np.maximum(x, 0)


# ---------------------------------------------------------------- rounding

def _round_shift_int64(v, t, rounding: str):
    """v * 2^-t rounded by `rounding`, all int64; t may be negative (an exact left shift).

    Each mode is one add of a per-shift constant and one arithmetic shift,
    so the work per element stays small; the constants are computed on t's
    (usually per-channel) shape, not per element.
    """
    left = _maximum0(-t)
    if (left > 0).any():
        v = v << left
    right = _maximum0(t)
    if rounding == "floor":
        return v >> right
    rounds = (right > 0).to(torch.int64) if _is_torch(right) else (right > 0).astype(np.int64)
    half = (rounds << right) >> 1  # 2^(t-1), or 0 where nothing is shifted out
    if rounding == "half_up":
        return (v + half) >> right
    if rounding == "half_away":
        below = (v < 0).to(torch.int64) if _is_torch(v) else (v < 0).astype(np.int64)
        return (v + (half - below * rounds)) >> right
    if rounding == "half_even":
        # a tie goes up exactly when the truncated quotient is odd
        return (v + (half - rounds) + ((v >> right) & rounds)) >> right
    raise ValueError(f"rounding {rounding!r} is not a shift rounding mode")


def rounding_right_shift(x, shift, rounding: str):
    """x * 2^-shift rounded to an integer by `rounding` (shift may be negative: exact)."""
    v = _to_int64(x)
    return _restore(_round_shift_int64(v, _to_int64(shift, like=v), rounding), x)


def divide_rounded(x, divisor, rounding: str):
    """x / divisor (a positive integer) rounded by `rounding`; used for average pooling.

    gemmlowp_double means TFLite's pooling rule: round half away from zero.
    """
    v = _to_int64(x)
    n = _to_int64(divisor, like=v)
    q = v // n
    r2 = 2 * (v - q * n)
    if rounding == "floor":
        return _restore(q, x)
    tie_up = {"half_up": True, "ruy": True, "half_away": v >= 0, "gemmlowp_double": v >= 0,
              "half_even": (q & 1) == 1}[rounding]
    up = (r2 > n) | ((r2 == n) & tie_up)
    out = q + (up.to(torch.int64) if _is_torch(up) else up.astype(np.int64))
    return _restore(out, x)


# ---------------------------------------------------------------- gemmlowp

def wrap(x, bits: int):
    """Two's-complement wrap of x to `bits` (arithmetic mod 2^bits)."""
    v = _to_int64(x)
    half = 1 << (bits - 1)
    return _restore(((v + half) & ((1 << bits) - 1)) - half, x)


def saturate(x, bits: int):
    """Clamp x to the signed `bits`-wide range."""
    v = _to_int64(x)
    return _restore(_clip(v, -(1 << (bits - 1)), (1 << (bits - 1)) - 1), x)


def srdhm(a, b):
    """gemmlowp SaturatingRoundingDoublingHighMul of int32 values a and b.

    Its nudge (2^30, or 1 - 2^30 below zero) followed by truncation equals
    rounding a*b / 2^31 half up, except INT32_MIN * INT32_MIN, which saturates.
    """
    a64 = _to_int64(a)
    b64 = _to_int64(b, like=a64)
    out = _round_shift_int64(a64 * b64, np.int64(31), "half_up")
    if (b64 == INT32_MIN).any() and (a64 == INT32_MIN).any():
        out = _where((a64 == INT32_MIN) & (b64 == INT32_MIN), out * 0 + INT32_MAX, out)
    return _restore(out, a)


def rdbpot(x, exponent):
    """gemmlowp RoundingDivideByPOT: x / 2^exponent, ties away from zero."""
    v = _to_int64(x)
    return _restore(_round_shift_int64(v, _to_int64(exponent, like=v), "half_away"), x)


# ---------------------------------------------------------------- requantization

FLOAT_SCHEMES = {"float32": (np.float32, torch.float32, 24), "float64": (np.float64, torch.float64, 53)}


def requantize(acc, multiplier, shift, rounding: str, acc_peak: float | torch.Tensor | None = None,
               scheme: str = "fixed_point"):
    """acc * multiplier * 2^-shift rounded to an integer exactly as the profile's rounding says.

    `multiplier` and `shift` broadcast against `acc` (per-channel requant).
    gemmlowp_double is TFLite's MultiplyByQuantizedMultiplier with a Q31
    multiplier: left shift (wrapping to int32, as int32 hardware does), SRDHM,
    then RDBPOT. ruy is the same with a half-up final shift (ruy's kernels).
    Every other mode rounds the exact product once.

    `scheme` float32 / float64 is a float multiply instead: the factor
    m * 2^-t is then a float of that width (m below 2^24 / 2^53, so it is
    exact), the accumulator is converted to that float (rounding to
    nearest even, as a CPU does), multiplied once (rounded to that float)
    and the product rounded to an integer by `rounding`: XNNPACK's
    `lrintf(float(acc) * scale)` is float32 with half_even.

    Where |acc| * multiplier < 2^52 every intermediate is exact in float64,
    so that (fast) path computes the same integers; for wider products the
    multiplier is split in two 16-bit-apart halves, each product exact in
    float64 (`_requantize_split_float64`); int64 serves the rest.
    `acc_peak` bounds |acc| where the caller already knows it (saves a pass): one number, or per channel
    (broadcasting against `multiplier`), which lets the channels of small products take the float64 path.
    """
    m = _to_int64(multiplier, like=acc)
    t = _to_int64(shift, like=acc)
    if scheme in FLOAT_SCHEMES:
        y = _requantize_float(acc, m, t, scheme, rounding)
        return y if _is_torch(acc) and acc.is_floating_point() else _restore(y, acc)
    if not _is_expr(acc):
        bound = _peak(acc) if acc_peak is None else acc_peak
        wide = _float64_wide(bound, m, t, rounding)
        if wide is not True and not bool(wide.any()):
            return _restore(_requantize_float64(acc, m, t, rounding), acc)
        if _split_float64_is_exact(_peak(bound), m, t, rounding):
            apart = None if wide is True else _requantize_channels_apart(acc, m, t, rounding, wide)
            return _restore(_requantize_split_float64(acc, m, t, rounding) if apart is None else apart, acc)
    return _restore(_requantize_int64(_to_int64(acc), m, t, rounding), acc)


def requantize_channels(acc, multiplier, shift, op, channels: int, acc_peak: float | torch.Tensor | None = None):
    """`requantize` by an op's arithmetic (a profile.OpArithmetic) for an accumulator of `channels` output
    channels on axis 1 (`multiplier` and `shift` already shaped to broadcast): its scheme and rounding,
    and where it rounds the channels past its last whole block of op.channel_block apart, their rounding."""
    y = requantize(acc, multiplier, shift, op.rounding, acc_peak, op.scheme)
    start = channels // op.channel_block * op.channel_block if op.channel_block else channels
    if start == channels:
        return y
    tail = requantize(acc, multiplier, shift, op.tail_rounding, acc_peak, op.scheme)
    in_tail = (np.arange(channels) >= start).reshape((1, channels) + (1,) * (np.ndim(multiplier) - 2))
    return _select(in_tail, tail, y)


def _select(mask: np.ndarray, a, b):
    """a where the constant boolean `mask` holds, else b (numpy, torch or a symbolic tensor)."""
    if _is_expr(b):
        return b.select(mask, a, b)
    return _where(torch.from_numpy(mask) if _is_torch(b) else mask, a, b)


def add_requantized(terms, multipliers, shifts, out_multiplier: int, out_shift: int, op, element_shape,
                    peaks=None):
    """An add's output integers before its zero point: each of `terms` (the centred, left-shifted inputs)
    rescaled by its (multiplier, shift) rounded by op.input_rounding (if set), the sum requantized by
    (out_multiplier, out_shift) rounded by op.rounding; where op.element_block is set, the elements past the last whole block of that many (in
    TFLite's NHWC order of one sample of `element_shape`, (C, H, W) or (F,)) by op.tail_rounding, as a
    vector kernel with a scalar remainder loop does. `peaks`: bounds on each term's |value| where the caller
    knows them (each requantization then skips its pass for the peak)."""
    def rounded(input_rounding, rounding):
        total, bound = None, None if peaks is None else 0.0
        for i, (v, m, t) in enumerate(zip(terms, multipliers, shifts)):
            term = requantize(v, m, t, input_rounding, None if peaks is None else peaks[i])
            total = term if total is None else total + term
            if peaks is not None:  # a rounding moves a value by at most 1
                bound += peaks[i] * m * 2.0**-t + 1
        return requantize(total, out_multiplier, out_shift, rounding, bound)

    y = rounded(op.input_rounding or op.rounding, op.rounding)
    size = int(np.prod(element_shape))
    start = size // op.element_block * op.element_block if op.element_block else size
    if start == size:
        return y
    nhwc = np.arange(size).reshape(element_shape[1:] + element_shape[:1] if len(element_shape) == 3
                                   else element_shape)
    in_tail = (nhwc >= start).transpose(2, 0, 1) if len(element_shape) == 3 else nhwc >= start
    return _select(in_tail[None], rounded(op.tail_rounding, op.tail_rounding), y)


def _requantize_int64(v, m, t, rounding: str):
    if rounding in ("gemmlowp_double", "ruy"):
        exponent = 31 - t
        left = _maximum0(exponent)
        scaled = wrap(v << left if (left > 0).any() else v, 32)
        if rounding == "ruy":  # m > 0, so the high product cannot saturate
            return _round_shift_int64(_round_shift_int64(scaled * m, np.int64(31), "half_up"),
                                      _maximum0(-exponent), "half_up")
        return rdbpot(srdhm(scaled, m), _maximum0(-exponent))
    return _round_shift_int64(v * m, t, rounding)


def _requantize_float(acc, m, t, scheme: str, rounding: str):
    """round(float(acc) * float(m * 2^-t)) in the scheme's float width (see `requantize`)."""
    np_dtype, torch_dtype, _ = FLOAT_SCHEMES[scheme]
    if _is_expr(acc):
        factor = (np.asarray(m, dtype=np.float64) * np.ldexp(1.0, -np.asarray(t))).astype(np_dtype)
        return round_real_exact(acc.astype(np_dtype) * factor, rounding).astype(np.int64)
    factor = _to_float64(m) * _exp2_neg(t)
    if _is_torch(acc):
        w = acc.to(torch_dtype) * factor.to(torch_dtype)
        return round_real_exact(w, rounding)
    w = np.asarray(acc).astype(np_dtype) * np.asarray(factor).astype(np_dtype)
    return round_real_exact(w, rounding).astype(np.float64)


def round_real_exact(w, rounding: str):
    """Float values rounded to integers by `rounding`, exactly for any float (the value w - floor(w) is
    exact, so no tie is made or lost by an addition): the last step of a float requantization."""
    if rounding == "half_even" and not _is_expr(w):
        return torch.round(w) if _is_torch(w) else np.rint(w)  # IEEE round-to-nearest-even: exact
    f = _floor(w)
    frac = w - f
    if rounding == "floor":
        return f
    if rounding in ("half_up", "ruy"):
        tie_up = True
    elif rounding in ("half_away", "gemmlowp_double"):
        tie_up = w >= 0
    elif rounding == "half_even":
        tie_up = (f - 2 * _floor(f * 0.5)) == 1
    else:
        raise ValueError(f"unknown rounding {rounding!r}")
    up = (frac > 0.5) | ((frac == 0.5) & tie_up) if tie_up is not True else frac >= 0.5
    return _where(up, f + 1, f)


def _to_float64(x):
    return x.to(torch.float64) if _is_torch(x) else np.asarray(x, dtype=np.float64)


def _peak(x) -> float:
    """max |x| (0 for an empty array)."""
    if isinstance(x, (int, float)):
        return abs(float(x))
    if _is_torch(x):
        if x.numel() == 0:
            return 0.0
        lo, hi = torch.aminmax(x)
        return float(max(-lo, hi))
    x = np.asarray(x)
    return float(np.abs(x).max()) if x.size else 0.0


def _float64_wide(bound, m, t, rounding: str):
    """Where `_requantize_float64` is not exact: a boolean per multiplier (|acc| * m >= 2^52; `bound` bounds
    |acc|, as one number or per multiplier), or True where it is exact for none (ruy's two half-up roundings;
    gemmlowp's int32 left shift for t < 31 and its wrap take the int64 path)."""
    if rounding == "ruy" or rounding == "gemmlowp_double" and not (bool((t >= 31).all()) and _peak(bound) <= INT32_MAX):
        return True
    return _to_float64(m) * bound >= 2.0**52


def _requantize_channels_apart(acc, m, t, rounding: str, wide):
    """The float64 path, with the channels where it is not exact (`wide`, one axis of acc's shape) redone by
    the split path: a layer with a few channels of wide products (a dead channel's large bias) keeps the
    fast path for the rest. None where `wide` is not along one axis."""
    long_axes = [i for i, n in enumerate(wide.shape) if n > 1]
    if not _is_torch(acc) or wide.dim() != acc.dim() or len(long_axes) != 1:
        return None
    axis = long_axes[0]
    index = torch.nonzero(wide.flatten()).flatten()

    def pick(v):  # the wide channels of acc, m or t (a multiplier shared by all channels as it is)
        return v.index_select(axis, index) if _is_torch(v) and v.dim() == acc.dim() and v.shape[axis] > 1 else v

    y = _requantize_float64(acc, m, t, rounding)
    return y.index_copy_(axis, index, _requantize_split_float64(pick(acc), pick(m), pick(t), rounding))


def _requantize_float64(a, m, t, rounding: str):
    """The same integers as _requantize_int64, for |a| * m < 2^52 (all steps exact); float64 result.

    `a` may be any integer-valued array: it is promoted to float64 by the
    first multiply, never copied on its own.
    """
    xp = torch if _is_torch(a) else np
    if rounding == "gemmlowp_double":
        # SRDHM rounds u = a*m/2^31 half up to hi; RDBPOT(hi, r) = floor((hi + 2^(r-1) - [hi < 0]) / 2^r)
        # for r = t - 31 >= 1 (hi itself for r = 0). floor((floor(z) + k) / n) = floor((z + k) / n) for
        # integers k, n, so both steps are one floor of (u + 1/2 + 2^(r-1) - [hi < 0]) / 2^r. Where a < 0
        # but hi = 0 (u in [-1/2, 0)) the floor is the same with the correction, so [hi < 0] becomes
        # [a < 0] = (1 - s) / 2 with s = copysign(1, a) (a zero a of either sign floors the same). One
        # copysign, no per-element branch.
        r = t - 31
        scale = _exp2_neg(r)
        shifts = r > 0
        half_correction = _where(shifts, 0.5 * scale, 0.0 * scale)
        offset = (0.5 + _where(shifts, _exp2_neg(1 - r), 0.0 * scale)) * scale - half_correction
        w = _float64_product(a, _to_float64(m) * 2.0**-31 * scale, plus=offset)
        w += xp.copysign(half_correction, a)
        return xp.floor(w, out=w)
    # m * 2^-t is exact in float64, and so is its product with a (< 2^52 significant bits)
    factor = _to_float64(m) * _exp2_neg(t)
    if rounding == "half_up":  # the half joins the product's pass
        w = _float64_product(a, factor, plus=0.5)
        return xp.floor(w, out=w)
    return _round_float64(_float64_product(a, factor), rounding)


SPLIT_BITS = 16


SPLIT_ROUNDINGS = ("floor", "half_up", "half_away", "ruy", "gemmlowp_double")


def _split_float64_is_exact(peak: float, m, t, rounding: str) -> bool:
    """Whether `_requantize_split_float64` is exact: every intermediate an integer below 2^53 (and, for the
    two-step roundings, no left shift or int32 wrap before the high multiply)."""
    if rounding not in SPLIT_ROUNDINGS or np.size(t) == 0:
        return False
    t_min, t_max = int(t.min()), int(t.max())
    if rounding in ("ruy", "gemmlowp_double") and (t_min < 31 or peak > INT32_MAX):
        return False
    m_hi = _peak(m) // 2**SPLIT_BITS
    return t_min > SPLIT_BITS and peak < 2.0 ** (52 - SPLIT_BITS) \
        and peak * (m_hi + 2) + 2.0 ** (t_max - 1 - SPLIT_BITS) < 2.0**52


def _rounding_constant(a, t, rounding: str):
    """(c_pow2, c_small) with floor((a*m + c_pow2 + c_small) / 2^t) the rounded a * m * 2^-t: c_pow2 per
    channel, 2^(t-1) or 0; c_small per element, below 2^32 in magnitude (None for 0).

    ruy's two half-up steps are one: floor((floor((a*m + 2^30) / 2^31) + 2^(r-1)) / 2^r) for r = t - 31 > 0,
    and floor((floor(z) + k) / n) = floor((z + k) / n). gemmlowp's RDBPOT is half away from zero, so it takes
    2^31 less where the high product is negative; where a < 0 but it is 0 the floor is the same (see
    `_requantize_float64`)."""
    half = _exp2_neg(1 - t)  # 2^(t-1)
    if rounding == "floor":
        return None, None
    if rounding == "half_up":
        return half, None
    if rounding == "half_away":
        return half, -_to_float64(a < 0)
    two_steps = _to_float64(t > 31)
    if rounding == "ruy":
        return half * two_steps, half * 0 + 2.0**30
    return half * two_steps, 2.0**30 - 2.0**31 * _to_float64(a < 0) * two_steps


def _requantize_split_float64(a, m, t, rounding: str):
    """The integers of _requantize_int64 in float64 for products past 2^52: floor((a*m + c) / 2^t), c the
    rounding's constant (`_rounding_constant`).

    With m = m_hi * 2^k + m_lo (k = SPLIT_BITS), c = c_hi * 2^k + c_lo and floor((n + f) / D) = floor(n / D)
    for an integer n, 0 <= f < 1 and an integer D >= 1, it is
    floor((a*m_hi + c_hi + floor((a*m_lo + c_lo) / 2^k)) / 2^(t-k)): each product, sum and power-of-two
    scaling exact below 2^53 (`_split_float64_is_exact`). It is several times faster than int64 with
    per-channel shifts. All of c joins the low sum (one pass less) where that stays below 2^53 (t <= 52)."""
    xp = torch if _is_torch(a) else np
    a = _to_float64(a)
    m_hi, m_lo = (_to_float64(v) for v in (m >> SPLIT_BITS, m & (2**SPLIT_BITS - 1)))
    c_pow2, c_lo = _rounding_constant(a, t, rounding)
    if c_pow2 is not None and int(t.max()) <= 52:
        c_lo = c_pow2 if c_lo is None else c_lo + c_pow2
        c_pow2 = None
    low = _multiply_add(a, m_lo, c_lo)
    low *= 2.0**-SPLIT_BITS
    low = xp.floor(low, out=low)
    if c_pow2 is not None:
        low += c_pow2 * 2.0**-SPLIT_BITS  # an integer: t - 1 >= k
    low = _multiply_add(a, m_hi, low, in_place=True)
    low *= _exp2_neg(t - SPLIT_BITS)
    return xp.floor(low, out=low)


def _multiply_add(a, b, c=None, in_place=False):
    """a * b + c (c broadcast to a's shape; in place on c where it has that shape), one pass in torch."""
    if _is_torch(a):
        if c is None:
            return a * b
        return c.addcmul_(a, b) if in_place else torch.addcmul(c, a, b)
    return a * b if c is None else a * b + c


def _float64_product(a, factor, plus=None):
    """a * factor (+ plus) as a fresh float64 array of a's and factor's broadcast shape: one pass where a is
    float64 (torch's mixed-type kernels are several times slower than a conversion and in-place ops)."""
    if _is_torch(a):
        if a.dtype == torch.float64 and torch.broadcast_shapes(a.shape, factor.shape) == a.shape:
            return a * factor if plus is None else \
                torch.addcmul(torch.as_tensor(plus, dtype=torch.float64, device=a.device), a, factor)
        w = a.to(torch.float64, copy=True).mul_(factor)
        return w if plus is None else w.add_(plus)
    w = np.array(np.asarray(a) * factor, dtype=np.float64)
    if plus is not None:
        w += plus
    return w


def _exp2_neg(t):
    """2^-t as float64, exactly (t is an integer array)."""
    return torch.ldexp(torch.ones_like(t, dtype=torch.float64), -t) if _is_torch(t) else np.ldexp(1.0, -t)


def _round_float64(w, rounding: str):
    """Round exact float64 values (at most 52 significant bits) to integers by `rounding`, in place."""
    xp = torch if _is_torch(w) else np
    if rounding == "half_up":
        xp.add(w, 0.5, out=w)
    elif rounding == "half_away":
        half = w.new_tensor(0.5) if xp is torch else 0.5
        xp.add(w, xp.copysign(half, w), out=w)
    if rounding in ("floor", "half_up"):
        return xp.floor(w, out=w)
    if rounding == "half_away":
        return xp.trunc(w, out=w)
    if rounding == "half_even":
        return xp.round(w, out=w)
    raise ValueError(f"rounding {rounding!r} is not a shift rounding mode")


def round_real_(x, rounding: str):
    """Real values (float32 or float64) rounded in place by the tie rule of `rounding`: training's view of
    a requantization, which must break ties as the hardware does (with power-of-two scales most
    products are ties). gemmlowp_double rounds its final shift half away from zero."""
    return _round_float64(x, {"gemmlowp_double": "half_away", "ruy": "half_up"}.get(rounding, rounding))


def quantize_multiplier(real: float, multiplier_bits: int, shift_range: tuple[int, int] | None = None):
    """Integer (m, t) with real ~= m * 2^-t and m a `multiplier_bits`-bit fraction (QuantizeMultiplier).

    multiplier_bits 31 is TFLite's Q31, 15 a Q15 int16 register, 0 a power
    of two (m = 1). With `shift_range`, a shift beyond the maximum drops
    low multiplier bits (rounded); one below the minimum cannot be
    represented and raises QftsimError.
    """
    m, t = quantize_multipliers(np.array([real], dtype=np.float64), multiplier_bits, shift_range)
    return int(m[0]), int(t[0])


def quantize_multipliers(real: np.ndarray, multiplier_bits: int, shift_range: tuple[int, int] | None = None):
    """quantize_multiplier for an array of real factors: (m, t) int64 arrays of its shape."""
    real = np.asarray(real, dtype=np.float64)
    if not (np.isfinite(real).all() and (real >= 0).all()):
        raise QftsimError(f"requantization multipliers must be finite and >= 0, got {real[~(real >= 0)][:3]}")
    q, e = np.frexp(real)  # real = q * 2^e, q in [0.5, 1)
    e = e.astype(np.int64)
    if multiplier_bits == 0:
        m = np.ones_like(e)
        t = -np.where(q >= 0.75, e, e - 1)
    else:
        m = np.floor(q * 2.0**multiplier_bits + 0.5).astype(np.int64)  # q >= 0: half away from zero
        carry = m == 1 << multiplier_bits
        m = np.where(carry, m // 2, m)
        t = multiplier_bits - (e + carry)
    zero = real == 0
    if shift_range is not None:
        lo, hi = shift_range
        if (t[~zero] < lo).any():
            bad = real[~zero][t[~zero] < lo][0]
            raise QftsimError(f"requantization multiplier {bad!r} needs right shift {int(t[~zero].min())}, "
                              f"below the profile's minimum {lo}")
        drop = np.maximum(t - hi, 0)
        m = np.where(drop > 0, _round_shift_int64(m, drop, "half_up"), m)
        t = np.minimum(t, hi)
    return np.where(zero, 0, m), np.where(zero, shift_range[1] if shift_range else 0, t)


def float_multipliers(real: np.ndarray, scheme: str):
    """(m, t) int64 arrays with m * 2^-t exactly the float of `scheme` nearest to each real factor: the
    float32 scale XNNPACK multiplies by, kept as integers (m below 2^24) like every other multiplier."""
    np_dtype, _, bits = FLOAT_SCHEMES[scheme]
    exact = np.asarray(real, dtype=np.float64).astype(np_dtype).astype(np.float64)
    if not (np.isfinite(exact).all() and (exact >= 0).all()):
        raise QftsimError(f"requantization factors must be finite and >= 0, got {exact[~(exact >= 0)][:3]}")
    q, e = np.frexp(exact)
    m = np.ldexp(q, bits).astype(np.int64)
    return m, np.where(m == 0, 0, bits - e.astype(np.int64))


def fma_float32(x, y, z) -> np.ndarray:
    """x * y + z rounded once to float32 (ties to even), as a fused multiply-add computes it: x integers of at
    most 2^29, y and z float32 values (numpy, broadcasting). The float64 sum is exact unless the two terms are
    more than 53 bits apart; TwoSum gives its exact error, which only matters where the float64 sum lies on a
    float32 midpoint, where it says which way the exact value rounds."""
    product = np.asarray(x, dtype=np.float64) * np.asarray(y, dtype=np.float32).astype(np.float64)  # exact
    z = np.asarray(z, dtype=np.float32).astype(np.float64)
    total = product + z
    back = total - z
    error = (product - back) + (z - (total - back))
    rounded = total.astype(np.float32)
    lower = np.where(rounded.astype(np.float64) > total, np.nextafter(rounded, np.float32(-np.inf)), rounded)
    upper = np.nextafter(lower, np.float32(np.inf))
    midpoint = (lower.astype(np.float64) + upper.astype(np.float64)) / 2 == total
    return np.where(midpoint & (error > 0), upper, np.where(midpoint & (error < 0), lower, rounded))


def float32_factors(multipliers, shifts) -> list[np.float32]:
    """The float32 values m * 2^-t of stored (m, t) pairs (float_multipliers' inverse, exact)."""
    return [np.float32(np.ldexp(float(m), -int(t))) for m, t in zip(multipliers, shifts)]


def ort_add_constant(ratio_a: np.float32, ratio_b: np.float32, zero_a: int, zero_b: int, zero_out: int):
    """onnxruntime's QLinearAdd constant z_out - (r_a z_a + r_b z_b) in float32 as its compiler builds it: the
    sum contracted to fma(r_a, z_a, r_b z_b) (measured: the uncontracted sum, or the other contraction, miss
    the engine's integers on 29 and 21 of 40 scale draws, each over all 65,536 input pairs; this misses none)."""
    f32 = np.float32
    return f32(f32(zero_out) - fma_float32(zero_a, ratio_a, f32(ratio_b * f32(zero_b))))


def add_float32_fma(a, b, ratio_a, ratio_b, zero_a: int, zero_b: int, zero_out: int):
    """onnxruntime's QLinearAdd before its saturation: the raw integer inputs a and b (numpy or torch),
    rne(fma(a, r_a, fma(b, r_b, constant))) in float32, r = s_in / s_out in float32 (MLAS's AVX2 kernel)."""
    ratio_a, ratio_b = np.float32(ratio_a), np.float32(ratio_b)
    constant = ort_add_constant(ratio_a, ratio_b, zero_a, zero_b, zero_out)
    values = [v.detach().cpu().numpy() if _is_torch(v) else np.asarray(v) for v in (a, b)]
    y = float32_to_int32(fma_float32(values[0], ratio_a, fma_float32(values[1], ratio_b, constant)))
    return torch.from_numpy(y) if _is_torch(a) else y


def mul_float32_zero_point(product, factor: np.float32, zero_out: int):
    """onnxruntime's QLinearMul before its saturation: rne(float32(product) * r + float32(z_out)), each step in
    float32 (r = s_a s_b / s_c in float32), the centred product exact in float32 (below 2^24); a value past
    int32 converts as x86 converts it (`float32_to_int32`)."""
    p = product.detach().cpu().numpy() if _is_torch(product) else np.asarray(product)
    y = float32_to_int32(p.astype(np.float32) * np.float32(factor) + np.float32(zero_out))  # float32 steps
    return torch.from_numpy(y) if _is_torch(product) else y


def float32_to_int32(w: np.ndarray) -> np.ndarray:
    """x86's cvtps2dq under the default rounding mode: to nearest even, and -2^31 ("integer indefinite") for
    anything outside int32, which the saturating packs after it then clamp to the low end (as float64)."""
    inside = (w >= -(2.0**31)) & (w < 2.0**31)
    return np.where(inside, np.rint(w), -(2.0**31)).astype(np.float64)


def _float32(v):
    """v rounded to float32, a stored scale (numpy, or torch keeping the gradient)."""
    return v.float() if _is_torch(v) else np.asarray(v, dtype=np.float32)


def _float64(v):
    return v.double() if _is_torch(v) else np.asarray(v, dtype=np.float64)


def engine_real(s_in, s_w, s_out, scheme: str, divisor: int = 1):
    """s_in * s_w / (s_out * divisor) as engines derive a multiplier from the float32 scales a model file stores:
    XNNPACK (scheme float32) in float32, in this order; TFLite (any other scheme) in float64 of the float32
    scales. numpy or torch (whose gradient passes); the importer, QFT and the .tflite writer all use it."""
    s_in, s_w, s_out = _float32(s_in), _float32(s_w), _float32(s_out)
    if scheme == "float32":
        return (s_in * s_w) / (s_out * (float(divisor) if _is_torch(s_out) else np.float32(divisor)))
    return _float64(s_in) * _float64(s_w) / (_float64(s_out) * divisor)


def tflite_add_reals(s_a, s_b, s_out, left_shift: int):
    """TFLite's ADD rescales (in float64 of the float32 scales): each input to twice the larger input scale,
    then that sum, after the inputs' left shift, to the output scale. numpy or torch."""
    s_a, s_b, s_out = (_float64(_float32(v)) for v in (s_a, s_b, s_out))
    twice_max = 2 * (torch.maximum(s_a, s_b) if _is_torch(s_a) else np.maximum(s_a, s_b))
    return s_a / twice_max, s_b / twice_max, twice_max / (2.0**left_shift * s_out)


def tflite_mean_multiplier(m0: int, t0: int, count: int, shift_max: int) -> tuple[int, int]:
    """TFLite's MEAN multiplier: QuantizeMultiplier(s_in / s_out) = (m0, t0), then m0 * 2^k / count in integers
    (k = floor(log2(count)), at most 32, the shift t0 + k at most shift_max: TFLite's 62) and the shift k more."""
    k = max(min(count.bit_length() - 1, 32, shift_max - t0), 0)
    return (m0 << k) // count, t0 + k


def op_multipliers(real: np.ndarray, scheme: str, multiplier_bits: int, shift_range: tuple[int, int] | None):
    """The (m, t) arrays an op of this requantization scheme stores for the real factors `real`."""
    if scheme in FLOAT_SCHEMES:
        return float_multipliers(real, scheme)
    return quantize_multipliers(real, 0 if scheme == "shift_only" else multiplier_bits, shift_range)


def average(total, count, zero_point: int, rounding: str, domain: str):
    """An average pool's output integers from its window sums of centred values.

    domain centred: round(total / count) + zero point. domain raw: the mean of
    the raw integers (zero point included, padding counted as the zero
    point), round(total / count + zero point), as TFLite's AVERAGE_POOL_2D
    rounds: the two differ where the mean is a tie.
    """
    if domain == "raw":
        return divide_rounded(total + count * zero_point, count, rounding)
    return divide_rounded(total, count, rounding) + zero_point


def average_float32(x, s_in: float, zero_in: int, s_out: float, zero_out: int, kernel, stride, padding,
                    count_include_pad: bool):
    """onnxruntime's QLinearAveragePool on (N, C, H, W) codes (numpy, or torch: float64 back), unclamped.

    Each code is dequantized in float32, s_in * (q - z_in); a window's values are summed in float32 in row
    order, padding skipped; the sum is divided by the window's count, then by s_out, in float32; z_out is
    added in float32 and the result rounded to even (x86's conversion: -2^31 outside int32). A window over the
    whole input without padding the engine computes as QLinearGlobalAveragePool: the integer sum of the
    centred codes times float32(s_in / (s_out * count)), rounded to even, plus z_out.
    """
    codes = x.detach().numpy() if _is_torch(x) else np.asarray(x)
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = kernel, stride, padding
    h, w = codes.shape[2:]
    if [kh, kw] == [h, w] and not any(padding):
        m, t = float_multipliers(engine_real(s_in, 1.0, s_out, "float32", divisor=h * w), "float32")
        total = (codes.astype(np.float64) - zero_in).sum(axis=(2, 3), keepdims=True)
        y = requantize(total, int(m), int(t), "half_even", scheme="float32") + zero_out
    else:
        values = (codes.astype(np.int64) - zero_in).astype(np.float32) * np.float32(s_in)
        values = np.pad(values, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        inside = np.pad(np.ones((h, w), dtype=np.int64), ((pt, pb), (pl, pr)))
        ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
        total = np.zeros(codes.shape[:2] + (ho, wo), dtype=np.float32)
        count = np.zeros((ho, wo), dtype=np.int64)
        for i in range(kh):  # one float32 add per window position, in the kernel's order (a pad's 0 adds nothing)
            for j in range(kw):
                window = (slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))
                total = total + values[(Ellipsis,) + window]
                count += inside[window]
        if count_include_pad:
            count[:] = kh * kw
        y = float32_to_int32(total / count.astype(np.float32) / np.float32(s_out) + np.float32(zero_out))
    return torch.from_numpy(np.asarray(y, dtype=np.float64)) if _is_torch(x) else y


# ---------------------------------------------------------------- resizing

# The bilinear weights' fraction bits and the rounding of the weighted sum, per form (a profile's
# arithmetic.resize.form): TFLite's ResizeBilinearInteger (integer positions and weights in 1/1024, the sum
# rounded half away from zero) and XNNPACK's q11 kernel (float32 positions, weights rounded to 1/2048, the sum
# rounded half up).
BILINEAR_FORMS = {"tflite": (10, "half_away"), "q11": (11, "half_up")}


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """The input index of each output index under nearest resizing: floor(out * in / out_size), exact
    (torch's `nearest` and TFLite's RESIZE_NEAREST_NEIGHBOR without half-pixel centres, for whole ratios)."""
    return np.arange(out_size, dtype=np.int64) * in_size // out_size


def bilinear_taps(in_size: int, out_size: int, form: str = "tflite"):
    """(lower index, upper index, lower weight, upper weight) per output index with half-pixel centres (torch's
    align_corners=False), the weights summing to 2^bits of the form."""
    bits = BILINEAR_FORMS[form][0]
    one = 1 << bits
    if form == "q11":  # XNNPACK: the clamped float32 position, its fraction rounded to even in 1/2048
        scale = np.float32(in_size) / np.float32(out_size)
        position = np.arange(out_size, dtype=np.float32) * scale + (np.float32(0.5) * scale - np.float32(0.5))
        position = np.clip(position, np.float32(0), np.float32(in_size - 1))
        lower = position.astype(np.int64)
        upper_weight = np.rint((position - lower.astype(np.float32)) * np.float32(one)).astype(np.int64)
        return lower, np.minimum(lower + 1, in_size - 1), one - upper_weight, upper_weight
    scale = (one * in_size + out_size // 2) // out_size
    position = np.arange(out_size, dtype=np.int64) * scale + scale // 2 - one // 2
    # (C's division truncates toward zero; a negative position, at least -512, gives 0 either way)
    lower = np.maximum(position // one, 0)
    upper = np.minimum((position + one - 1) // one, in_size - 1)
    upper_weight = position - one * lower
    return lower, upper, one - upper_weight, upper_weight


def zero_insert(x: torch.Tensor, stride, fill) -> torch.Tensor:
    """x with stride - 1 copies of `fill` between neighbours on H and W: a transposed convolution's input to the
    ordinary convolution that computes it (the zeros of integers centred on their zero point are `fill`)."""
    n, c, h, w = x.shape
    sh, sw = stride
    y = x.new_full((n, c, (h - 1) * sh + 1, (w - 1) * sw + 1), fill)
    y[:, :, ::sh, ::sw] = x
    return y


def take_torch(x: torch.Tensor, indices: np.ndarray, axis: int) -> torch.Tensor:
    """`resize`'s gather for torch tensors."""
    return x.index_select(axis, torch.from_numpy(indices))


def resize(x, in_hw: tuple[int, int], mode: str, out_hw: tuple[int, int], take, form: str = "tflite"):
    """Nearest or bilinear resizing of (N, C, H, W) integers from `in_hw` to `out_hw`; `take(x, indices, axis)`
    gathers (torch's index_select, Relax's take); `form` is the bilinear arithmetic (BILINEAR_FORMS)."""
    if mode == "nearest":
        rows = take(x, nearest_indices(in_hw[0], out_hw[0]), 2)
        return take(rows, nearest_indices(in_hw[1], out_hw[1]), 3)
    return resize_bilinear(x, in_hw, out_hw, take, form)


def resize_bilinear(x, in_hw: tuple[int, int], out_hw: tuple[int, int], take, form: str = "tflite"):
    """Bilinear resizing of raw integers (N, C, H, W) to `out_hw` as the engine of `form` computes it: the four
    taps' weighted sum in 1/2^(2 bits), then divided by that rounding as the form says (in the raw domain, zero
    point included; the output keeps the input's quantization). `take(x, indices, axis)` gathers."""
    def weighted(t, taps, axis):
        shape = [1, 1, 1, 1]
        shape[axis] = -1
        lower, upper = (w.reshape(shape) for w in taps[2:])
        if _is_torch(t):
            lower, upper = (torch.from_numpy(w).to(t.dtype) for w in (lower, upper))
        return take(t, taps[0], axis) * lower + take(t, taps[1], axis) * upper

    bits, rounding = BILINEAR_FORMS[form]
    rows = weighted(x, bilinear_taps(in_hw[0], out_hw[0], form), 2)
    total = weighted(rows, bilinear_taps(in_hw[1], out_hw[1], form), 3)
    return divide_rounded(total, 1 << (2 * bits), rounding)


# ---------------------------------------------------------------- accumulator

def a2q_l1_bound(acc_bits: int, input_bits: int, input_signed: bool) -> int:
    """Largest integer L1 norm of a weight row that can never overflow a `acc_bits` accumulator.

    Colbert et al.: ||q_w||_1 <= (2^(P-1) - 1) * 2^(signed - N) for N-bit
    inputs, in any MAC order (the norm is an integer, so the bound is floored).
    """
    numerator = (1 << (acc_bits - 1)) - 1
    exponent = int(input_signed) - input_bits
    return numerator << exponent if exponent >= 0 else numerator >> -exponent
