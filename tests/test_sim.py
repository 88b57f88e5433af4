"""The simulator equals the naive Python-int executor on generated IntModels."""

import io
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qftsim import QftsimError
from qftsim.sim import AccumulatorOverflowWarning, simulate
from qftsim.zoo import random_cnn
from tests import gen, naive


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.data())
def test_simulator_equals_naive_reference(data):
    model = data.draw(gen.int_models())
    x = data.draw(gen.model_inputs(model))
    try:
        expected = naive.run_model(model, x)
    except naive.NaiveOverflow:
        with pytest.raises(QftsimError, match="accumulator overflow"):
            simulate(model, x)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccumulatorOverflowWarning)
        result = simulate(model, x)
    for name in model.outputs:
        got = result.outputs[name]
        assert got.dtype == model.quant_of(name).dtype
        assert got.tolist() == expected[name], name


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.data())
def test_chunks_give_the_whole_batchs_result(data):
    """simulate in chunks of 1 or 2 samples (memory flat in the batch) gives the outputs, kept tensors,
    accumulators and per-layer report of the whole batch at once."""
    model = data.draw(gen.int_models())
    x = data.draw(gen.model_inputs(model))
    chunk = data.draw(st.sampled_from([1, 2]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccumulatorOverflowWarning)
        try:
            whole = simulate(model, x, keep_tensors=True, keep_accumulators=True, chunk=len(x) or 1)
        except QftsimError:  # overflow: error, in some chunk as in the whole batch
            with pytest.raises(QftsimError, match="accumulator overflow"):
                simulate(model, x, chunk=chunk)
            return
        parts = simulate(model, x, keep_tensors=True, keep_accumulators=True, chunk=chunk)
    assert parts.report == whole.report
    for key in ("outputs", "tensors", "accumulators"):
        a, b = getattr(whole, key), getattr(parts, key)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def _one_linear(overflow, saturate_at="final", weights=(127, 127, 127, -127), acc_bits=16):
    from qftsim.intmodel import IntModel, ModelInput, Node, TensorQuant
    from qftsim.profile import HardwareProfile, load_profile

    d = load_profile("int8-default").to_dict()
    d["accumulator"].update(bits=acc_bits, overflow=overflow, saturate_at=saturate_at)
    d["bias"]["bits"] = 16
    p = HardwareProfile.from_dict(d)
    q = TensorQuant(8, True, 0, 1.0)
    node = Node("fc", "linear", ["x"], q, {"clamp": [-128, 127]},
                {"weight": np.array([weights], np.int8), "bias": np.zeros(1, np.int32),
                 "multiplier": np.array([2**30], np.int32), "shift": np.array([38], np.int32)})
    return IntModel(p, [ModelInput("x", (len(weights),), q)], [node], ["fc"])


def test_saturation_order_matters_and_is_reported():
    """127*127*3 overflows a 16-bit accumulator midway; the final sum (32258) does not."""
    x = np.array([[127, 127, 127, 127]], np.int8)
    # exact 32258 -> 32258 * 2^30 / 2^38 = 126.01 -> 126
    wrap = simulate(_one_linear("wrap"), x)
    assert wrap.outputs["fc"].tolist() == [[126]] and wrap.overflows == 0
    final = simulate(_one_linear("saturate", "final"), x)
    assert final.outputs["fc"].tolist() == [[126]] and final.overflows == 0
    with pytest.warns(AccumulatorOverflowWarning, match="fc"):
        every = simulate(_one_linear("saturate", "every_mac"), x)
    # 16129 -> 32258 -> 32767 (saturated) -> 16638 -> 16638 / 256 = 64.99 -> 65
    assert every.outputs["fc"].tolist() == [[65]]
    assert every.report[0].overflows == 1


def test_accumulators_just_past_float32_are_exact():
    """Products far below 2^24 with a bias that takes the sum past it: the bias goes on in float64, not float32
    (which would round 2^24 + 1 to 2^24); the accumulators are the exact sums."""
    from qftsim.intmodel import IntModel, ModelInput, Node, TensorQuant
    from qftsim.profile import load_profile

    q = TensorQuant(8, True, 0, 1.0)
    node = Node("fc", "linear", ["x"], q, {"clamp": [-128, 127]},
                {"weight": np.array([[1, 1]], np.int8), "bias": np.array([2**24 - 2], np.int32),
                 "multiplier": np.array([2**30], np.int32), "shift": np.array([40], np.int32)})
    model = IntModel(load_profile("int8-default"), [ModelInput("x", (2,), q)], [node], ["fc"])
    x = np.array([[0, 0], [1, 0], [1, 2], [3, 0], [-1, -2]], np.int8)
    got = simulate(model, x, keep_accumulators=True).accumulators["fc"]
    assert got.ravel().tolist() == [2**24 - 2 + int(a) + int(b) for a, b in x]


def test_overflow_error_names_the_layer_and_wrap_warns():
    x = np.array([[127, 127, 127]], np.int8)
    with pytest.raises(QftsimError, match="layer 'fc'.*accumulator overflow"):
        simulate(_one_linear("error", weights=(127, 127, 127)), x)
    with pytest.warns(AccumulatorOverflowWarning, match="fc"):
        res = simulate(_one_linear("wrap", weights=(127, 127, 127)), x)
    rep = res.report[0]
    assert (rep.acc_max, rep.overflows) == (48387, 1) and rep.headroom_bits < 0
    # 48387 wraps to -17149 in 16 bits: -17149 / 256 = -66.99 -> -67
    assert res.outputs["fc"].tolist() == [[-67]] and rep.clamp_low == 0


def test_input_checks():
    model = _one_linear("wrap")
    with pytest.raises(QftsimError, match="integer data expected"):
        simulate(model, np.zeros((1, 4), np.float32))
    with pytest.raises(QftsimError, match="shape"):
        simulate(model, np.zeros((1, 5), np.int8))
    with pytest.raises(QftsimError, match="outside"):
        simulate(model, np.full((1, 4), 300, np.int16))


def _simulate_cli(tmp_path, model_path, *args):
    import contextlib
    import io

    from qftsim.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["simulate", str(model_path), *args])
    return code, err.getvalue()


@pytest.fixture
def saved_model(tmp_path):
    model, _ = random_cnn(channels=4, size=6)
    model.save(tmp_path / "m.qft")
    good = np.zeros((2, *model.inputs[0].shape), np.int8)
    np.save(tmp_path / "good.npy", good)
    return tmp_path / "m.qft", good


@pytest.mark.parametrize("case", ["empty file", "npz", "no samples", "truncated", "header claims 2^40 samples"])
def test_bad_simulate_inputs_are_one_line_errors(tmp_path, saved_model, case):
    model_path, good = saved_model
    raw = (tmp_path / "good.npy").read_bytes()
    path = tmp_path / "x.npy"
    if case == "empty file":
        path.write_bytes(b"")
    elif case == "npz":
        np.savez(path.with_suffix(".npz"), x=good)
        path = path.with_suffix(".npz")
    elif case == "no samples":
        np.save(path, good[:0])
    elif case == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    else:
        path.write_bytes(raw.replace(b"(2, ", b"(1099511627776, "))
    code, err = _simulate_cli(tmp_path, model_path, "--input", str(path))
    assert code == 2 and err.startswith("qftsim: error:") and err.count("\n") == 1, err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 200), at=st.integers(0, 200), byte=st.integers(0, 255),
       dtype=st.sampled_from(["int8", "uint8", "int16", "int64", "float32", "bool", "object", "<U2"]),
       shape=st.lists(st.integers(0, 7), max_size=5))
def test_any_damaged_or_mismatched_npy_input_simulates_or_is_one_line(tmp_path, saved_model, cut, at, byte, dtype,
                                                                      shape):
    """An input .npy cut short, with a byte changed, or of any dtype and shape: simulate runs (exit 0) or
    refuses it in one line (exit 2), never a traceback."""
    model_path, good = saved_model
    raw = (tmp_path / "good.npy").read_bytes()
    changed = bytearray(raw)
    changed[at % len(raw)] = byte
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype=dtype), allow_pickle=dtype == "object")
    for i, blob in enumerate((raw[:len(raw) - cut - 1], bytes(changed), buf.getvalue())):
        path = tmp_path / f"x{i}.npy"
        path.write_bytes(blob)
        code, err = _simulate_cli(tmp_path, model_path, "--input", str(path), "--output", str(tmp_path / "y.npy"))
        assert code == 0 or code == 2 and err.startswith("qftsim: error:") and err.count("\n") == 1, err


@pytest.mark.parametrize("where", ["onto a folder", "under a file", "dump onto a file"])
def test_bad_simulate_outputs_are_one_line_errors(tmp_path, saved_model, where):
    model_path, _ = saved_model
    target = {"onto a folder": ["--output", str(tmp_path)],
              "under a file": ["--output", str(tmp_path / "good.npy" / "y.npy")],
              "dump onto a file": ["--dump", str(tmp_path / "good.npy")]}[where]
    code, err = _simulate_cli(tmp_path, model_path, "--input", str(tmp_path / "good.npy"), *target)
    assert code == 2 and err.count("\n") == 1, err
    assert np.load(tmp_path / "good.npy").shape[0] == 2  # nothing was overwritten
