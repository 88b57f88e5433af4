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
    if rounding == "half_up":
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


def requantize(acc: int, m: int, t: int, rounding: str) -> int:
    if rounding == "gemmlowp_double":
        e = 31 - t
        a = wrap(acc * 2 ** max(e, 0), 32)
        return rdbpot(srdhm(a, m), max(-e, 0))
    return round_fraction(Fraction(acc * m) / Fraction(2) ** t, rounding)


def divide(x: int, n: int, rounding: str) -> int:
    return round_fraction(Fraction(x, n), rounding)
