"""Profiles: every shipped one loads; each kind of invalid one fails with the named key."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
import yaml

from qftsim import QftsimError, list_profiles, load_profile
from qftsim.cli import main
from qftsim.profile import HardwareProfile

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["int8-default", "tflite-int8", "cmsis-nn", "npu-a8w4", "fpga-w4a4-pow2-acc16", "int8-default-w4"]


def test_shipped_profiles_load():
    assert set(SHIPPED) <= set(list_profiles())
    for name in list_profiles():
        p = load_profile(name)
        assert p.name == name
        assert HardwareProfile.from_dict(p.to_dict()) == p
        assert len(p.description) > 80


def test_shipped_profile_arithmetic():
    tfl, cmsis = load_profile("tflite-int8"), load_profile("cmsis-nn")
    assert (tfl.weights.qmin, tfl.weights.qmax) == (-127, 127)
    assert tfl.requant.rounding == "gemmlowp_double" and cmsis.requant.rounding == "half_up"
    assert tfl.hash != cmsis.hash
    npu = load_profile("npu-a8w4")
    assert (npu.weights.bits, npu.activations.signed, npu.accumulator.bits) == (4, False, 24)
    assert npu.accumulator.overflow == "saturate" and npu.requant.multiplier_bits == 15
    fpga = load_profile("fpga-w4a4-pow2-acc16")
    assert fpga.requant.scheme == "shift_only" and fpga.accumulator.guarantee == "a2q"
    assert fpga.accumulator.bits == 16 and fpga.weights.scale == "power_of_two"
    w4, int8 = load_profile("int8-default-w4").to_dict(), load_profile("int8-default").to_dict()
    assert (w4["weights"]["bits"], w4["weights"]["narrow"]) == (4, True)
    assert {k for k in w4 if w4[k] != int8[k]} == {"name", "description", "weights"}
    assert {k for k in w4["weights"] if w4["weights"][k] != int8["weights"][k]} == {"bits"}


def _base():
    return load_profile("int8-default").to_dict()


def _edit(path, value):
    d = _base()
    *parents, leaf = path.split(".")
    node = d
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[leaf]
    else:
        node[leaf] = value
    return d


INVALID = [
    ("accumulator.bits", _edit("accumulator.bits", 0)),
    ("accumulator.bits", _edit("accumulator.bits", 33)),
    ("weights.bits", _edit("weights.bits", -3)),
    ("weights.bits", _edit("weights.bits", "8")),
    ("accumulator.overflow", _edit("accumulator.overflow", "clip")),
    ("requant.rounding", _edit("requant.rounding", "stochastic")),
    ("requant.multiplier_bits", _edit("requant.multiplier_bits", 32)),
    ("requant.shift_range", _edit("requant.shift_range", [40, 10])),
    ("requant.shift_range", _edit("requant.shift_range", [0, 63])),
    ("requant.per_channel", _edit("requant.per_channel", False)),
    ("requant.rounding", {**_edit("requant.multiplier_bits", 15), "requant": {
        **_base()["requant"], "multiplier_bits": 15, "rounding": "gemmlowp_double"}}),
    ("weights.colour", _edit("weights.colour", "blue")),
    ("accumulator.bits", _edit("accumulator.bits", KeyError)),
    ("activations.signed", _edit("activations.signed", "maybe")),
    ("bias.bits", _edit("bias.bits", 40)),
    ("ops.supported", _edit("ops.supported", ["conv2d", "softmax"])),
    ("accumulator.saturate_at", _edit("accumulator.saturate_at", "every_mac")),
    ("schema_version", _edit("schema_version", 99)),
]


@pytest.mark.parametrize("key,data", INVALID, ids=[k + str(i) for i, (k, _) in enumerate(INVALID)])
def test_invalid_profiles_name_the_key(key, data, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(QftsimError) as info:
        load_profile(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_shift_only_needs_power_of_two_scales():
    d = load_profile("fpga-w4a4-pow2-acc16").to_dict()
    bad = copy.deepcopy(d)
    bad["weights"]["scale"] = "float"
    with pytest.raises(QftsimError, match="weights.scale"):
        HardwareProfile.from_dict(bad)


def test_unknown_top_level_key_and_bad_yaml(tmp_path):
    d = _base()
    d["colour"] = 1
    with pytest.raises(QftsimError, match="colour"):
        HardwareProfile.from_dict(d)
    path = tmp_path / "broken.yaml"
    path.write_text("weights: [unclosed")
    with pytest.raises(QftsimError, match="not valid YAML"):
        load_profile(path)
    with pytest.raises(QftsimError, match="unknown profile"):
        load_profile("no-such-profile")


def test_cli_validate(tmp_path, capsys):
    shipped = sorted(str(p) for p in (ROOT / "hwprofiles").glob("*.yaml"))
    assert main(["profiles", "validate", *shipped]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_edit("accumulator.bits", 0)))
    assert main(["profiles", "validate", str(bad)]) == 1
    assert "accumulator.bits" in capsys.readouterr().err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump(_edit("accumulator.colour", 1)))
    assert main(["profiles", "validate", str(unknown)]) == 1
    assert "accumulator.colour" in capsys.readouterr().err


def test_cli_list_and_show_as_a_process():
    out = subprocess.run([sys.executable, "-m", "qftsim.cli", "profiles", "list"], capture_output=True,
                         text=True, check=True).stdout
    assert all(name in out for name in SHIPPED)
    out = subprocess.run([sys.executable, "-m", "qftsim.cli", "profiles", "show", "tflite-int8"],
                         capture_output=True, text=True, check=True).stdout
    assert "gemmlowp_double" in out
    res = subprocess.run([sys.executable, "-m", "qftsim.cli", "profiles", "show", "nope"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "unknown profile" in res.stderr


def test_yaml_problems_are_one_line_with_line_and_column(tmp_path):
    cases = {
        "bomb.yaml": 'a: &a ["x", "x"]\nb: [*a, *a]\n',
        "syntax.yaml": "name: x\nschema_version: 1\ndescription: [unclosed\n",
        "deep.yaml": "a: " + "[" * 5000 + "]" * 5000 + "\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(QftsimError) as info:
            load_profile(tmp_path / name)
        assert "\n" not in str(info.value) and str(tmp_path / name) in str(info.value)
    with pytest.raises(QftsimError, match="aliases"):
        load_profile(tmp_path / "bomb.yaml")
    with pytest.raises(QftsimError, match=r"line 4, column 1"):
        load_profile(tmp_path / "syntax.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(QftsimError, match="not a UTF-8 text file"):
        load_profile(tmp_path / "binary.yaml")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_as_a_profile_load_or_fail_in_one_line(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("p") / "any.yaml"
    path.write_bytes(blob)
    try:
        load_profile(path)
    except QftsimError as exc:
        assert "\n" not in str(exc)


JUNK = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6) | st.integers(),
                                                                               inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list_profiles()), st.lists(st.tuples(st.sampled_from(
    ["weights", "activations", "bias", "accumulator", "requant", "ops", "arithmetic", "name", 7]),
    st.text(max_size=12) | st.integers(), JUNK), max_size=3))
def test_a_damaged_profile_is_refused_in_one_line_or_loads(name, edits):
    """Any value at any key of a shipped profile: a QftsimError naming where, or a valid profile; nothing else."""
    data = copy.deepcopy(load_profile(name).to_dict())
    for section, key, value in edits:
        if isinstance(data.get(section), dict):
            data[section][key] = value
        else:
            data[section] = value
    try:
        HardwareProfile.from_dict(data)
    except QftsimError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(bits=st.integers(2, 16), symmetric=st.booleans(), shift=st.integers(0, 30))
def test_an_add_shift_that_overflows_int32_is_refused_by_the_profile(bits, symmetric, shift):
    """The profile refuses what the IntModel check would refuse for every add: a centred input shifted out of
    int32; one that loads gives adds whose shifted inputs fit."""
    d = _base()
    d["activations"].update(bits=bits, symmetric=symmetric)
    d["ops"]["add_left_shift"] = shift
    centred = 2 ** (bits - 1) if symmetric else 2**bits - 1
    if centred << shift < 2**31:
        assert HardwareProfile.from_dict(d).ops.add_left_shift == shift
    else:
        with pytest.raises(QftsimError, match="ops.add_left_shift: .* overflows int32"):
            HardwareProfile.from_dict(d)


def test_validate_refuses_what_quantize_refuses(tmp_path, capsys):
    """Saturation at every MAC without A2Q and asymmetric weights simulate, but the trainer refuses them:
    validate says so, with the trainer's message, and exits 1; the profile still loads."""
    from qftsim.profile import trainer_refusals

    every_mac = _edit("accumulator.overflow", "saturate")
    every_mac["accumulator"]["saturate_at"] = "every_mac"
    asymmetric = _edit("weights.symmetric", False)
    asymmetric["weights"]["narrow"] = False
    for name, data, message in (("every_mac", every_mac, "saturation at every MAC is trained only with"),
                                ("asymmetric", asymmetric, "asymmetric weights")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        assert main(["profiles", "validate", str(path)]) == 1
        assert "quantize refuses it" in (err := capsys.readouterr().err) and message in err
        assert trainer_refusals(load_profile(path))[0].startswith(message)
