"""The one place where integers are rounded, requantized, accumulated, wrapped and saturated.

Every function is vectorized and takes numpy integer arrays or torch tensors
(int64, or float64 holding integers, as the trainer uses); the result has
the input's type and dtype. Internally everything runs in int64, which is
exact under the limits the profile validator enforces (|acc| < 2^31,
multiplier < 2^31, right shift <= 62, left shift bounded by 31 - bits).

Conventions: a requantization multiplier is a pair (m, t) meaning the real
factor m * 2^-t; t is the total right shift (negative t shifts left).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qftsim.errors import QftsimError

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------- backends

def _is_torch(x) -> bool:
    return isinstance(x, torch.Tensor)


def _to_int64(x, like=None):
    """x as an int64 array of the same library (numpy for Python scalars)."""
    if _is_torch(x):
        return x.to(torch.int64)
    if like is not None and _is_torch(like):
        return torch.as_tensor(np.asarray(x, dtype=np.int64), device=like.device)
    return np.asarray(x, dtype=np.int64)


def _restore(result, original):
    """Cast an int64 result back to the type and dtype of the caller's input."""
    if _is_torch(original):
        return result.to(original.dtype)
    if isinstance(original, np.ndarray):
        return result.astype(original.dtype, copy=False)
    return result


def _where(cond, a, b):
    return torch.where(cond, a, b) if _is_torch(cond) else np.where(cond, a, b)


def _clip(x, lo, hi):
    if _is_torch(x):
        lo_t = lo if _is_torch(lo) else torch.as_tensor(lo, dtype=torch.int64, device=x.device)
        hi_t = hi if _is_torch(hi) else torch.as_tensor(hi, dtype=torch.int64, device=x.device)
        return torch.minimum(torch.maximum(x, lo_t), hi_t)
    return np.clip(x, lo, hi)


def _maximum0(x):
    return torch.clamp(x, min=0) if _is_torch(x) else np.maximum(x, 0)


# ---------------------------------------------------------------- rounding

def _round_shift_int64(v, t, rounding: str):
    """v * 2^-t rounded by `rounding`, all int64; t may be negative (an exact left shift)."""
    right = _maximum0(t)
    v = v << _maximum0(-t)
    q = v >> right
    r = v - (q << right)
    half = (q * 0 + 1 << right) >> 1
    if rounding == "floor":
        return q
    if rounding == "half_up":
        tie_up = True
    elif rounding == "half_away":
        tie_up = v >= 0
    elif rounding == "half_even":
        tie_up = (q & 1) == 1
    else:
        raise ValueError(f"rounding {rounding!r} is not a shift rounding mode")
    up = (r > half) | ((r == half) & tie_up & (right > 0))
    return q + up.to(torch.int64) if _is_torch(up) else q + up.astype(np.int64)


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
    q = torch.div(v, n, rounding_mode="floor") if _is_torch(v) else np.floor_divide(v, n)
    r2 = 2 * (v - q * n)
    if rounding == "floor":
        return _restore(q, x)
    tie_up = {"half_up": True, "half_away": v >= 0, "gemmlowp_double": v >= 0,
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
    """gemmlowp SaturatingRoundingDoublingHighMul of int32 values a and b."""
    a64 = _to_int64(a)
    b64 = _to_int64(b, like=a64)
    ab = a64 * b64
    nudge = _where(ab >= 0, ab * 0 + (1 << 30), ab * 0 + (1 - (1 << 30)))
    n = ab + nudge
    trunc = _where(n >= 0, n >> 31, -((-n) >> 31))
    overflow = (a64 == INT32_MIN) & (b64 == INT32_MIN)
    return _restore(_where(overflow, trunc * 0 + INT32_MAX, trunc), a)


def rdbpot(x, exponent):
    """gemmlowp RoundingDivideByPOT: x / 2^exponent, ties away from zero."""
    v = _to_int64(x)
    e = _to_int64(exponent, like=v)
    mask = (v * 0 + 1 << e) - 1
    rem = v & mask
    thr = (mask >> 1) + (v < 0).to(torch.int64) if _is_torch(v) else (mask >> 1) + (v < 0)
    up = rem > thr
    return _restore((v >> e) + (up.to(torch.int64) if _is_torch(up) else up.astype(np.int64)), x)


# ---------------------------------------------------------------- requantization

def requantize(acc, multiplier, shift, rounding: str):
    """acc * multiplier * 2^-shift rounded to an integer exactly as the profile's rounding says.

    `multiplier` and `shift` broadcast against `acc` (per-channel requant).
    gemmlowp_double is TFLite's MultiplyByQuantizedMultiplier with a Q31
    multiplier: left shift (wrapping to int32, as int32 hardware does), SRDHM,
    then RDBPOT. Every other mode rounds the exact product once.
    """
    v = _to_int64(acc)
    m = _to_int64(multiplier, like=v)
    t = _to_int64(shift, like=v)
    if rounding == "gemmlowp_double":
        exponent = 31 - t
        left = _maximum0(exponent)
        scaled = wrap(v << left, 32)
        out = rdbpot(srdhm(scaled, m), _maximum0(-exponent))
    else:
        out = _round_shift_int64(v * m, t, rounding)
    return _restore(out, acc)


def quantize_multiplier(real: float, multiplier_bits: int, shift_range: tuple[int, int] | None = None):
    """Integer (m, t) with real ~= m * 2^-t and m a `multiplier_bits`-bit fraction (QuantizeMultiplier).

    multiplier_bits 31 is TFLite's Q31, 15 a Q15 int16 register, 0 a power
    of two (m = 1). With `shift_range`, a shift beyond the maximum drops
    low multiplier bits (rounded); one below the minimum cannot be
    represented and raises QftsimError.
    """
    if not (real >= 0.0 and math.isfinite(real)):
        raise QftsimError(f"requantization multiplier must be finite and >= 0, got {real!r}")
    if real == 0.0:
        return 0, (shift_range[1] if shift_range else 0)
    q, e = math.frexp(real)
    if multiplier_bits == 0:
        m, t = 1, -(e if q >= 0.75 else e - 1)
    else:
        m = _round_half_away_float(q * (1 << multiplier_bits))
        if m == 1 << multiplier_bits:
            m //= 2
            e += 1
        t = multiplier_bits - e
    if shift_range is not None:
        lo, hi = shift_range
        if t < lo:
            raise QftsimError(f"requantization multiplier {real!r} needs right shift {t}, "
                              f"below the profile's minimum {lo}")
        if t > hi:
            m = int(_round_shift_int64(np.int64(m), np.int64(t - hi), "half_up"))
            t = hi
    return int(m), int(t)


def _round_half_away_float(x: float) -> int:
    return int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


def multiplier_value(m: int, t: int) -> float:
    """The real factor m * 2^-t that an integer multiplier applies."""
    return math.ldexp(m, -t)


# ---------------------------------------------------------------- accumulator

def a2q_l1_bound(acc_bits: int, input_bits: int, input_signed: bool) -> int:
    """Largest integer L1 norm of a weight row that can never overflow a `acc_bits` accumulator.

    Colbert et al.: ||q_w||_1 <= (2^(P-1) - 1) * 2^(signed - N) for N-bit
    inputs, in any MAC order (the norm is an integer, so the bound is floored).
    """
    numerator = (1 << (acc_bits - 1)) - 1
    exponent = int(input_signed) - input_bits
    return numerator << exponent if exponent >= 0 else numerator >> -exponent
