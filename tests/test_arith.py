"""Property tests: the vectorized arithmetic equals the naive Python-int reference."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qftsim import arith
from qftsim.profile import ROUNDING_MODES
from tests import naive

INT32 = st.integers(naive.INT32_MIN, naive.INT32_MAX)
Q31_MULT = st.integers(0, 2**31 - 1)
EXAMPLES = settings(max_examples=400, deadline=None)
SHIFT_MODES = [r for r in ROUNDING_MODES if r not in ("gemmlowp_double", "ruy")]  # two-step roundings


def _three_ways(fn, values, *args, float_dtype=torch.float64):
    """fn on numpy int64, torch int64 and torch float64 (integer-valued where exact; `float_dtype` the type
    the float result comes in)."""
    np_out = fn(np.array(values, dtype=np.int64), *args)
    t_out = fn(torch.tensor(values, dtype=torch.int64), *args)
    assert np.array_equal(np_out, t_out.numpy())
    if all(abs(int(v)) < 2**53 for v in list(values) + list(np_out)):
        f_out = fn(torch.tensor(values, dtype=torch.float64), *args)
        assert f_out.dtype == float_dtype
        assert np.array_equal(np_out, f_out.numpy().astype(np.int64))
    return [int(v) for v in np_out]


@EXAMPLES
@given(st.lists(INT32, min_size=1, max_size=16), Q31_MULT, st.integers(0, 62), st.sampled_from(ROUNDING_MODES))
def test_requantize_matches_reference(accs, m, t, rounding):
    got = _three_ways(arith.requantize, accs, m, t, rounding)
    assert got == [naive.requantize(a, m, t, rounding) for a in accs]


@EXAMPLES
@given(st.lists(st.integers(2**30 + 1, 2**31 - 1).filter(lambda m: m % 2), min_size=1, max_size=8),
       st.integers(22, 31), st.integers(-3, 3), st.sampled_from(SHIFT_MODES), st.booleans())
def test_requantize_near_rounding_boundaries_of_wide_products(ms, t, d, rounding, on_integer):
    """acc * m beyond 2^52 and exactly d * 2^-t away from a rounding boundary (an integer or a half).

    acc = (boundary + d) * m^-1 mod 2^t does it; float64 cannot resolve such products."""
    boundary = 0 if on_integer else 2 ** (t - 1)
    accs = [(boundary + d) * pow(m, -1, 2**t) % 2**t for m in ms]
    rows = [(a, m) for a, m in zip(accs, ms) if a * m >= 2**52]
    if rows:
        accs, ms = (np.array(c, dtype=np.int64) for c in zip(*rows))
        for sign in (1, -1):
            got = arith.requantize(torch.from_numpy(sign * accs).double(), torch.from_numpy(ms), t, rounding)
            assert [int(v) for v in got] == [naive.requantize(sign * int(a), int(m), t, rounding)
                                             for a, m in rows]


@EXAMPLES
@given(st.lists(st.tuples(INT32, Q31_MULT, st.integers(0, 62)), min_size=1, max_size=16),
       st.sampled_from(ROUNDING_MODES))
def test_requantize_per_channel_broadcast(rows, rounding):
    accs, ms, ts = (np.array(c, dtype=np.int64) for c in zip(*rows))
    got = arith.requantize(accs, ms, ts, rounding)
    assert list(got) == [naive.requantize(int(a), int(m), int(t), rounding) for a, m, t in rows]


@EXAMPLES
@given(st.lists(INT32, min_size=1, max_size=16), st.integers(-31, 31), st.sampled_from(SHIFT_MODES))
def test_shift_only_requantize(accs, t, rounding):
    got = _three_ways(arith.rounding_right_shift, accs, t, rounding)
    assert got == [naive.round_fraction(Fraction(a) / Fraction(2) ** t, rounding) for a in accs]


@EXAMPLES
@given(st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=16), st.integers(1, 2**20),
       st.sampled_from(ROUNDING_MODES))
def test_divide_rounded(xs, n, rounding):
    got = _three_ways(arith.divide_rounded, xs, n, rounding)
    assert got == [naive.divide(x, n, rounding) for x in xs]


@EXAMPLES
@given(st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=16), st.integers(2, 32))
def test_wrap_and_saturate(xs, bits):
    assert _three_ways(arith.wrap, xs, bits) == [naive.wrap(x, bits) for x in xs]
    assert _three_ways(arith.saturate, xs, bits) == [naive.saturate(x, bits) for x in xs]


@EXAMPLES
@given(st.lists(st.tuples(INT32, INT32), min_size=1, max_size=16))
def test_srdhm(pairs):
    a, b = (np.array(c, dtype=np.int64) for c in zip(*pairs))
    assert list(arith.srdhm(a, b)) == [naive.srdhm(int(x), int(y)) for x, y in pairs]


@EXAMPLES
@given(st.lists(INT32, min_size=1, max_size=16), st.integers(0, 31))
def test_rdbpot(xs, e):
    assert _three_ways(arith.rdbpot, xs, e) == [naive.rdbpot(x, e) for x in xs]


def _naive_quantize_multiplier(real: Fraction, bits: int):
    e = 0
    while real >= Fraction(2) ** e:
        e += 1
    while real < Fraction(2) ** (e - 1):
        e -= 1
    q = real / Fraction(2) ** e  # in [1/2, 1)
    if bits == 0:
        return (1, -e) if q >= Fraction(3, 4) else (1, -(e - 1))
    m = naive.round_fraction(q * 2**bits, "half_away")
    if m == 2**bits:
        m, e = m // 2, e + 1
    return m, bits - e


@EXAMPLES
@given(st.floats(min_value=2**-40, max_value=2**20, allow_nan=False), st.sampled_from([31, 15, 8, 1, 0]))
def test_quantize_multiplier(real, bits):
    m, t = arith.quantize_multiplier(real, bits)
    assert (m, t) == _naive_quantize_multiplier(Fraction(real), bits)
    if bits:
        assert 2 ** (bits - 1) <= m < 2**bits
        assert abs(Fraction(m) / Fraction(2) ** t - Fraction(real)) <= Fraction(real) * Fraction(1, 2**bits)


# ------------------------------------------------------------------ edges

def test_int32_min_squared_saturates():
    assert int(arith.srdhm(np.int64(naive.INT32_MIN), np.int64(naive.INT32_MIN))) == naive.INT32_MAX


@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize("t", [0, 1, 30, 31, 32, 62])
@pytest.mark.parametrize("m", [0, 1, 2**30, 2**31 - 1])
def test_edges(rounding, t, m):
    accs = [0, 1, -1, 2, -2, 3, -3, naive.INT32_MAX, naive.INT32_MIN, 2**30, -(2**30), 12345, -12345]
    got = _three_ways(arith.requantize, accs, m, t, rounding)
    assert got == [naive.requantize(a, m, t, rounding) for a in accs]


def test_exact_ties():
    # acc*m/2^t = k + 1/2 for these: each mode resolves the tie its own way.
    acc = np.array([1, 3, -1, -3], dtype=np.int64)
    expect = {
        "half_up": [1, 2, 0, -1],
        "half_away": [1, 2, -1, -2],
        "half_even": [0, 2, 0, -2],
        "floor": [0, 1, -1, -2],
        # SRDHM's nudge (1 - 2^30 below zero) sends negative ties toward zero.
        "gemmlowp_double": [1, 2, 0, -1],
    }
    for rounding, want in expect.items():
        assert list(arith.requantize(acc, 2**30, 31, rounding)) == want, rounding


def test_multiplier_that_rounds_up_to_2_pow_31():
    m, t = arith.quantize_multiplier(1 - 2**-40, 31)
    assert (m, t) == (2**30, 30)


def test_quantize_multiplier_shift_range():
    assert arith.quantize_multiplier(2**-40, 31, (0, 62)) == (2**22, 62)
    assert arith.quantize_multiplier(2**-70, 31, (0, 62)) == (0, 62)
    with pytest.raises(arith.QftsimError, match="minimum"):
        arith.quantize_multiplier(2.0**40, 31, (0, 62))


def test_double_and_single_rounding_differ():
    """A swap of gemmlowp double rounding and single rounding must not go unnoticed."""
    rng = np.random.default_rng(0)
    acc = rng.integers(-(2**20), 2**20, size=20000)
    m = rng.integers(2**30, 2**31, size=20000)
    t = rng.integers(32, 45, size=20000)
    double = arith.requantize(acc, m, t, "gemmlowp_double")
    single = arith.requantize(acc, m, t, "half_up")
    diff = double != single
    assert 0 < diff.mean() < 0.1
    assert np.all(np.abs(double - single) <= 1)
    assert int(arith.requantize(np.int64(-126), 2**30, 32, "gemmlowp_double")) == -32
    assert int(arith.requantize(np.int64(-126), 2**30, 32, "half_up")) == -31


def test_a2q_bound():
    assert arith.a2q_l1_bound(16, 4, False) == (2**15 - 1) // 16
    assert arith.a2q_l1_bound(16, 4, True) == (2**15 - 1) // 8
    assert arith.a2q_l1_bound(32, 8, True) == (2**31 - 1) // 128
    # A weight row at the bound cannot overflow with the worst inputs.
    bound = arith.a2q_l1_bound(16, 4, False)
    assert bound * 15 <= 2**15 - 1


@EXAMPLES
@given(st.lists(INT32, min_size=1, max_size=16), st.sampled_from(["float32", "float64"]),
       st.floats(2.0**-30, 4.0), st.sampled_from(SHIFT_MODES))
def test_float_requantization_matches_reference(accs, scheme, real, rounding):
    """float(acc) * float(scale), rounded to an integer: as IEEE floats do it, whatever the library."""
    (m,), (t,) = arith.float_multipliers(np.array([real]), scheme)
    got = _three_ways(arith.requantize, accs, m, t, rounding, None, scheme,
                      float_dtype=torch.float32 if scheme == "float32" else torch.float64)
    assert got == [naive.requantize(a, int(m), int(t), rounding, scheme) for a in accs]


def test_float32_requantization_is_xnnpacks():
    """XNNPACK's lrintf(float(acc) * scale): the accumulator itself rounds to float32 past 2^24."""
    acc = np.array([2**24 + 1, 2**24 + 3, -(2**25) - 3, 5, -5, 7], dtype=np.int64)
    scale = np.float32(0.5)
    (m,), (t,) = arith.float_multipliers(np.array([scale]), "float32")
    expected = np.rint(acc.astype(np.float32) * scale).astype(np.int64)
    assert arith.requantize(acc, m, t, "half_even", scheme="float32").tolist() == expected.tolist()


@EXAMPLES
@given(st.lists(st.integers(-(2**20), 2**20), min_size=1, max_size=16), Q31_MULT, st.integers(0, 62),
       st.sampled_from([*SHIFT_MODES, "gemmlowp_double"]))
def test_requantize_float64_path_matches_reference(accs, m, t, rounding):
    """Small accumulators take the float64 fast path; it must give the same integers."""
    acc = np.array(accs, dtype=np.int64)
    if rounding == "gemmlowp_double":
        t = max(t, 31)
    assert not arith._float64_wide(np.abs(acc), np.int64(m), np.int64(t), rounding).any()
    slow = arith._requantize_int64(acc, np.int64(m), np.int64(t), rounding)
    assert slow.tolist() == [naive.requantize(a, m, t, rounding) for a in accs]
    for held in (acc.astype(np.float64), torch.tensor(accs, dtype=torch.float64),
                 torch.tensor(accs, dtype=torch.float32)):
        fast = arith._requantize_float64(held, torch.tensor(m) if torch.is_tensor(held) else np.int64(m),
                                         torch.tensor(t) if torch.is_tensor(held) else np.int64(t), rounding)
        assert np.asarray(fast).astype(np.int64).tolist() == slow.tolist()


@EXAMPLES
@given(st.lists(st.tuples(INT32, Q31_MULT, st.integers(arith.SPLIT_BITS + 1, 62)), min_size=1, max_size=16),
       st.sampled_from(arith.SPLIT_ROUNDINGS), st.booleans())
def test_requantize_split_float64_path_matches_reference(rows, rounding, as_torch):
    """Products past 2^52 (int32 accumulators, 31-bit multipliers, per-element shifts) take the split-multiplier
    float64 path; it must give the naive reference's integers, for every rounding it takes."""
    accs, ms, ts = (np.array(c, dtype=np.int64) for c in zip(*rows))
    if rounding in ("ruy", "gemmlowp_double"):
        ts = np.maximum(ts, 31)  # (left shifts and int32 wraps stay on the int64 path)
        accs = np.maximum(accs, -naive.INT32_MAX)
        rows = list(zip(accs, ms, ts))
    assert arith._split_float64_is_exact(float(np.abs(accs).max()), ms, ts, rounding)
    wrap = torch.from_numpy if as_torch else np.asarray
    fast = arith._requantize_split_float64(wrap(accs.astype(np.float64)), wrap(ms), wrap(ts), rounding)
    expected = [naive.requantize(int(a), int(m), int(t), rounding) for a, m, t in rows]
    assert np.asarray(fast).astype(np.int64).tolist() == expected


CHANNEL_ACCS = st.one_of(st.lists(st.integers(-(2**20), 2**20), min_size=4, max_size=4),
                         st.lists(INT32.filter(lambda a: a != naive.INT32_MIN), min_size=4, max_size=4))


@EXAMPLES
@given(st.lists(st.tuples(CHANNEL_ACCS, Q31_MULT, st.integers(arith.SPLIT_BITS + 1, 62)), min_size=1, max_size=8),
       st.sampled_from(arith.SPLIT_ROUNDINGS))
def test_requantize_with_per_channel_bounds(channels, rounding):
    """Per-channel bounds on |acc| send the channels of small products down the float64 path and the others
    down the split path, in one tensor: every channel gets the naive reference's integers."""
    accs, ms, ts = zip(*channels)
    if rounding in ("ruy", "gemmlowp_double"):
        ts = [max(t, 31) for t in ts]
    acc = torch.tensor(accs, dtype=torch.float64).T.reshape(2, 2, len(ms))  # (batch, height, channel)
    bound = acc.abs().amax(dim=(0, 1), keepdim=True)
    got = arith.requantize(acc, torch.tensor(ms).view(1, 1, -1), torch.tensor(ts).view(1, 1, -1), rounding,
                           acc_peak=bound)
    expected = [[[naive.requantize(int(a), m, t, rounding) for a, m, t in zip(row, ms, ts)] for row in plane]
                for plane in acc.tolist()]
    assert got.to(torch.int64).tolist() == expected


@EXAMPLES
@given(st.lists(st.tuples(st.integers(-(2**20), 2**20), Q31_MULT, st.integers(31, 40)), min_size=1, max_size=16))
def test_gemmlowp_float64_path_per_channel(rows):
    """Double rounding in one floor, with per-element shifts including r = t - 31 = 0."""
    accs, ms, ts = (np.array(c, dtype=np.int64) for c in zip(*rows))
    fast = arith._requantize_float64(torch.tensor(accs, dtype=torch.float32), torch.tensor(ms), torch.tensor(ts),
                                     "gemmlowp_double")
    assert fast.numpy().astype(np.int64).tolist() == [naive.requantize(int(a), int(m), int(t), "gemmlowp_double")
                                                      for a, m, t in rows]
