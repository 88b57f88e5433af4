"""Hardware profiles: the target's integer arithmetic, loaded from YAML and validated.

A profile is the single source of every bit width, rounding rule and
accumulator size; no other module hard-codes one. Validation is strict:
unknown keys, wrong types and impossible combinations raise QftsimError
naming the file, the key path and what is accepted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from qftsim.errors import QftsimError

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 has no `arithmetic` section: every op follows `requant`

# ruy: ruy's fixed-point multiply (TFLite's optimized kernels): the high half of x * m rounded half up,
# then a right shift that also rounds half up (gemmlowp_double breaks that second tie away from zero).
ROUNDING_MODES = ("gemmlowp_double", "ruy", "half_up", "half_away", "half_even", "floor")
OP_KINDS = ("conv2d", "linear", "add", "mul", "concat", "maxpool2d", "avgpool2d", "mean", "clamp", "reshape", "lut",
            "resize", "slice", "zero_insert")
# Requantization schemes: an integer multiplier and shift, a shift alone, or a float multiply as
# XNNPACK (float32, round half to even) and TFLite's reference per-channel FC (float64, half away) do.
REQUANT_SCHEMES = ("fixed_point", "shift_only", "float32", "float64")
# Ops whose arithmetic a v2 profile may set on its own (`arithmetic:`); depthwise_conv2d and transpose_conv2d
# are conv2d nodes marked depthwise or transposed (TFLite's DEPTHWISE_CONV_2D and TRANSPOSE_CONV).
ARITHMETIC_OPS = ("conv2d", "depthwise_conv2d", "transpose_conv2d", "linear", "mean", "add", "mul", "concat",
                  "avgpool2d", "resize")

_REQUIRED = object()


@dataclass(frozen=True)
class _Field:
    """One key of the schema: its Python type, allowed values or range, and default."""

    kind: type
    choices: tuple = ()
    lo: int | None = None
    hi: int | None = None
    default: Any = _REQUIRED

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is int and self.lo is not None:
            return f"an integer in [{self.lo}, {self.hi}]"
        return {bool: "true or false", int: "an integer", str: "a string", list: "a list"}[self.kind]


_SIGNED_CHOICES = (True, False, "auto")

SCHEMA: dict[str, dict[str, _Field]] = {
    "weights": {
        "bits": _Field(int, lo=2, hi=16),
        "signed": _Field(bool, default=True),
        "symmetric": _Field(bool, default=True),
        "narrow": _Field(bool, default=False),
        "granularity": _Field(str, choices=("per_tensor", "per_channel")),
        "scale": _Field(str, choices=("float", "power_of_two"), default="float"),
    },
    "activations": {
        "bits": _Field(int, lo=2, hi=16),
        "signed": _Field(object, choices=_SIGNED_CHOICES),
        "symmetric": _Field(bool, default=False),
        "scale": _Field(str, choices=("float", "power_of_two"), default="float"),
        "channelwise_via_requant": _Field(bool, default=False),
    },
    "bias": {
        "bits": _Field(int, lo=2, hi=32),
    },
    "accumulator": {
        "bits": _Field(int, lo=2, hi=32),
        "overflow": _Field(str, choices=("wrap", "saturate", "error")),
        "saturate_at": _Field(str, choices=("final", "every_mac"), default="final"),
        "guarantee": _Field(str, choices=("none", "observed", "a2q"), default="none"),
    },
    "requant": {
        "scheme": _Field(str, choices=REQUANT_SCHEMES),
        "multiplier_bits": _Field(int, lo=0, hi=31),
        "shift_range": _Field(list),
        "per_channel": _Field(bool),
        "rounding": _Field(str, choices=ROUNDING_MODES),
    },
    "ops": {
        "supported": _Field(list, default=list(OP_KINDS)),
        "add_left_shift": _Field(int, lo=0, hi=30, default=20),
        "concat_rescale": _Field(bool, default=True),
    },
}
_TOP_LEVEL = {"name": str, "schema_version": int, "description": str}
_OPTIONAL_SECTIONS = ("ops",)

# One op's arithmetic (schema 2); a key left out takes the profile's global value.
_OP_ARITHMETIC_FIELDS = {
    "scheme": _Field(str, choices=REQUANT_SCHEMES),
    "rounding": _Field(str, choices=ROUNDING_MODES),
    # add: `tflite` rescales both inputs after a left shift (ops.add_left_shift), then the sum;
    # `single_multiplier` (XNNPACK) multiplies each centred input by an integer and rounds the sum once;
    # `float32_fma` (onnxruntime's QLinearAdd) takes the raw inputs times float32 scale ratios in two fused
    # multiply-adds onto a float32 constant that holds the zero points, and rounds that once, ties to even.
    # resize (bilinear): `tflite`, TFLite's integer weights in 1/1024 and the sum rounded half away from zero;
    # `q11` (XNNPACK), float32 positions, weights rounded to 1/2048, the sum rounded half up.
    "form": _Field(str, choices=("tflite", "single_multiplier", "float32_fma", "q11")),
    # avgpool2d: round the window's mean of the centred values, or of the raw ones (zero point included,
    # as TFLite's AVERAGE_POOL_2D does), which breaks ties differently; or `float32`, onnxruntime's
    # QLinearAveragePool: the dequantized values summed and divided in float32, the output of its own scale
    # (arith.average_float32).
    "domain": _Field(str, choices=("centred", "raw", "float32")),
    # Vector kernels that requantize whole blocks of output channels one way and the last channels (past
    # the last whole block) another: TFLite's optimized depthwise conv, 8 channels upward, the rest gemmlowp.
    "channel_block": _Field(int, lo=1, hi=64),
    # The same over the elements of an add, counted in TFLite's NHWC order (its optimized ADD: 8 at a time).
    "element_block": _Field(int, lo=1, hi=64),
    "tail_rounding": _Field(str, choices=ROUNDING_MODES),
    # add: the rounding of the two input rescales where it differs from the output's (`rounding`); TFLite's
    # optimized ADD rounds them once, half up, and its output step twice, as ruy.
    "input_rounding": _Field(str, choices=ROUNDING_MODES),
    # mul (scheme float32): `float32` adds the output zero point to the float32 product before rounding
    # (onnxruntime's QLinearMul), `integer` after it.
    "zero_point": _Field(str, choices=("integer", "float32")),
}
_OP_ARITHMETIC_KEYS = {
    "conv2d": ("scheme", "rounding"), "depthwise_conv2d": ("scheme", "rounding", "channel_block", "tail_rounding"),
    "transpose_conv2d": ("scheme", "rounding", "channel_block", "tail_rounding"),
    "linear": ("scheme", "rounding"), "mean": ("scheme", "rounding"), "mul": ("scheme", "rounding", "zero_point"),
    "concat": ("rounding",), "add": ("rounding", "input_rounding", "form", "element_block", "tail_rounding"),
    "avgpool2d": ("rounding", "domain"), "resize": ("form",),
}
_OP_FORMS = {"add": ("tflite", "single_multiplier", "float32_fma"), "resize": ("tflite", "q11")}


@dataclass(frozen=True)
class WeightSpec:
    bits: int
    signed: bool
    symmetric: bool
    narrow: bool
    granularity: str
    scale: str

    @property
    def per_channel(self) -> bool:
        return self.granularity == "per_channel"

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.signed, self.narrow)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.signed, self.narrow)[1]


@dataclass(frozen=True)
class ActivationSpec:
    bits: int
    signed: Any  # True, False or "auto" (unsigned after ReLU-like ops)
    symmetric: bool
    scale: str
    channelwise_via_requant: bool

    def range(self, signed: bool) -> tuple[int, int]:
        """Integer range of an activation tensor with the given signedness."""
        return int_range(self.bits, signed, False)


@dataclass(frozen=True)
class BiasSpec:
    bits: int

    @property
    def range(self) -> tuple[int, int]:
        return int_range(self.bits, True, False)


@dataclass(frozen=True)
class AccumulatorSpec:
    bits: int
    overflow: str
    saturate_at: str
    guarantee: str

    @property
    def range(self) -> tuple[int, int]:
        return int_range(self.bits, True, False)


@dataclass(frozen=True)
class RequantSpec:
    scheme: str
    multiplier_bits: int
    shift_range: tuple[int, int]
    per_channel: bool
    rounding: str


@dataclass(frozen=True)
class OpsSpec:
    supported: tuple[str, ...]
    add_left_shift: int
    concat_rescale: bool


@dataclass(frozen=True)
class OpArithmetic:
    """How one op kind rounds and rescales (from `arithmetic:`, or the global fields by default)."""

    scheme: str
    rounding: str
    form: str = "tflite"
    domain: str = "centred"
    channel_block: int = 0  # 0: every channel rounds by `rounding`
    element_block: int = 0  # 0: every element rounds by `rounding`
    tail_rounding: str | None = None
    input_rounding: str | None = None  # add's input rescales; None: `rounding`
    zero_point: str = "integer"  # mul: the output zero point added after rounding, or in float32 before it


@dataclass(frozen=True)
class HardwareProfile:
    """A target's integer arithmetic (see DESIGN.md "Hardware profile")."""

    name: str
    schema_version: int
    description: str
    weights: WeightSpec
    activations: ActivationSpec
    bias: BiasSpec
    accumulator: AccumulatorSpec
    requant: RequantSpec
    ops: OpsSpec
    # the per-op settings the file states (op -> key -> value); empty for schema 1
    arithmetic_overrides: dict = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_resolved", {op: self._resolve(op) for op in ARITHMETIC_OPS})

    def _resolve(self, op: str) -> OpArithmetic:
        stated = self.arithmetic_overrides.get(op, {})
        return OpArithmetic(scheme=stated.get("scheme", self.requant.scheme),
                            rounding=stated.get("rounding", self.requant.rounding),
                            form=stated.get("form", "tflite"), domain=stated.get("domain", "centred"),
                            channel_block=stated.get("channel_block", 0), element_block=stated.get("element_block", 0),
                            tail_rounding=stated.get("tail_rounding"), input_rounding=stated.get("input_rounding"),
                            zero_point=stated.get("zero_point", "integer"))

    def arithmetic(self, op: str) -> OpArithmetic:
        """The resolved arithmetic of one op kind (see ARITHMETIC_OPS)."""
        return self._resolved[op]

    def __eq__(self, other):
        return isinstance(other, HardwareProfile) and self.to_dict() == other.to_dict()

    __hash__ = None

    def to_dict(self) -> dict:
        """Plain-data form; loading it back gives an equal profile."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "arithmetic_overrides"}
        d = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in d.items()}
        d["requant"]["shift_range"] = list(self.requant.shift_range)
        d["ops"]["supported"] = list(self.ops.supported)
        if self.arithmetic_overrides:
            d["arithmetic"] = {op: dict(v) for op, v in self.arithmetic_overrides.items()}
        return d

    @property
    def hash(self) -> str:
        """Content hash of the arithmetic (name and description excluded)."""
        d = self.to_dict()
        del d["name"], d["description"]
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "HardwareProfile":
        return _parse(data, source)


def int_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer range of a `bits`-wide value; `narrow` drops the most negative code."""
    if signed:
        return (-(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1)
    return (0, 2**bits - 1)


def _fail(source: str, path: str, message: str) -> QftsimError:
    return QftsimError(one_line(f"{source}: {path}: {message}"))


def one_line(text: str, limit: int = 400) -> str:
    """A message as one printable line: control characters escaped, cut to `limit` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit - 15] + f"... ({len(text)} chars)"


def _check_value(source: str, path: str, field: _Field, value: Any) -> Any:
    if field.kind is object:
        ok = any(value is c or (type(value) is type(c) and value == c) for c in field.choices)
    elif field.kind is int:
        ok = type(value) is int and (field.lo is None or field.lo <= value <= field.hi)
    else:
        ok = type(value) is field.kind and (not field.choices or value in field.choices)
    if not ok:
        raise _fail(source, path, f"got {value!r}, expected {field.describe()}")
    return value


def _parse_section(source: str, section: str, data: Any) -> dict:
    schema = SCHEMA[section]
    if data is None and section in _OPTIONAL_SECTIONS:
        data = {}
    if not isinstance(data, dict):
        raise _fail(source, section, f"expected a mapping with keys {', '.join(schema)}")
    unknown = sorted(set(data) - set(schema), key=str)
    if unknown:
        raise _fail(source, f"{section}.{unknown[0]}", f"unknown key; accepted keys: {', '.join(schema)}")
    out = {}
    for key, field in schema.items():
        path = f"{section}.{key}"
        if key not in data:
            if field.default is _REQUIRED:
                raise _fail(source, path, f"missing; expected {field.describe()}")
            out[key] = field.default
        else:
            out[key] = _check_value(source, path, field, data[key])
    return out


def _parse(data: Any, source: str) -> HardwareProfile:
    if not isinstance(data, dict):
        raise _fail(source, "<top>", "expected a YAML mapping")
    accepted = list(_TOP_LEVEL) + list(SCHEMA) + ["arithmetic"]
    unknown = sorted(set(data) - set(accepted), key=str)
    if unknown:
        raise _fail(source, unknown[0], f"unknown key; accepted keys: {', '.join(accepted)}")
    for key, kind in _TOP_LEVEL.items():
        if key not in data:
            raise _fail(source, key, "missing")
        if type(data[key]) is not kind:
            raise _fail(source, key, f"got {data[key]!r}, expected {kind.__name__}")
    if data["schema_version"] not in READABLE_VERSIONS:
        raise _fail(source, "schema_version", f"got {data['schema_version']}, this qftsim reads "
                    f"{', '.join(map(str, READABLE_VERSIONS))}")
    if "arithmetic" in data and data["schema_version"] < 2:
        raise _fail(source, "arithmetic", "per-op arithmetic needs schema_version: 2")
    sec = {name: _parse_section(source, name, data.get(name)) for name in SCHEMA}
    _check_consistency(source, sec)
    overrides = _parse_arithmetic(source, data.get("arithmetic"))
    bits, global_scheme = sec["requant"]["multiplier_bits"], sec["requant"]["scheme"]
    for op, fields in overrides.items():
        scheme = fields.get("scheme", global_scheme)
        if scheme == "fixed_point" and bits == 0:
            raise _fail(source, f"arithmetic.{op}.scheme", "fixed_point needs requant.multiplier_bits >= 1 "
                        "(this profile stores shift-only multipliers)")
        double = {fields.get(k) for k in ("rounding", "tail_rounding")} & {"gemmlowp_double", "ruy"}
        if (double or (global_scheme == "fixed_point" and sec["requant"]["rounding"] in ("gemmlowp_double", "ruy")
                       and "rounding" not in fields and scheme == "fixed_point")) and bits != 31:
            raise _fail(source, f"arithmetic.{op}.rounding", f"gemmlowp_double and ruy are defined for a 31-bit "
                        f"multiplier, got requant.multiplier_bits {bits}")
    rq = sec["requant"]
    rq["shift_range"] = tuple(rq["shift_range"])
    sec["ops"]["supported"] = tuple(sec["ops"]["supported"])
    return HardwareProfile(
        name=data["name"],
        schema_version=data["schema_version"],
        description=data["description"],
        weights=WeightSpec(**sec["weights"]),
        activations=ActivationSpec(**sec["activations"]),
        bias=BiasSpec(**sec["bias"]),
        accumulator=AccumulatorSpec(**sec["accumulator"]),
        requant=RequantSpec(**rq),
        ops=OpsSpec(**sec["ops"]),
        arithmetic_overrides=overrides,
    )


def _parse_arithmetic(source: str, data: Any) -> dict:
    """The `arithmetic:` section: op -> {key: value}, each checked against what that op accepts."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _fail(source, "arithmetic", f"expected a mapping with keys among {', '.join(ARITHMETIC_OPS)}")
    out = {}
    for op, fields in data.items():
        if op not in ARITHMETIC_OPS:
            raise _fail(source, f"arithmetic.{op}", f"unknown op; accepted: {', '.join(ARITHMETIC_OPS)}")
        keys = _OP_ARITHMETIC_KEYS[op]
        if not isinstance(fields, dict):
            raise _fail(source, f"arithmetic.{op}", f"expected a mapping with keys among {', '.join(keys)}")
        for key, value in fields.items():
            if key not in keys:
                raise _fail(source, f"arithmetic.{op}.{key}", f"unknown key; accepted keys: {', '.join(keys)}")
            _check_value(source, f"arithmetic.{op}.{key}", _OP_ARITHMETIC_FIELDS[key], value)
        scheme, rounding = fields.get("scheme"), fields.get("rounding")
        if scheme in ("float32", "float64") and rounding is None:
            raise _fail(source, f"arithmetic.{op}.rounding", f"a {scheme} requantization states its rounding "
                        "(XNNPACK's float32: half_even; TFLite's float64: half_away)")
        if rounding in ("gemmlowp_double", "ruy") and scheme not in (None, "fixed_point"):
            raise _fail(source, f"arithmetic.{op}", f"rounding {rounding} needs a fixed_point multiplier, "
                        f"not scheme {scheme}")
        block = "channel_block" in fields or "element_block" in fields
        if block != ("tail_rounding" in fields) or (block and scheme not in (None, "fixed_point")):
            raise _fail(source, f"arithmetic.{op}", "channel_block (or element_block) and tail_rounding go "
                        "together, with a fixed_point scheme")
        if "form" in fields and fields["form"] not in _OP_FORMS[op]:
            raise _fail(source, f"arithmetic.{op}.form", f"{op} takes form {' or '.join(_OP_FORMS[op])}")
        if fields.get("form") == "single_multiplier" and rounding in ("gemmlowp_double", "ruy"):
            raise _fail(source, f"arithmetic.{op}.rounding", "the single_multiplier add rounds its sum by one "
                        "shift: use half_up (XNNPACK), half_away, half_even or floor")
        if fields.get("zero_point") == "float32" and scheme != "float32":
            raise _fail(source, f"arithmetic.{op}.zero_point", "a zero point added in float32 needs scheme float32")
        if fields.get("form") == "float32_fma" and rounding not in (None, "half_even"):
            raise _fail(source, f"arithmetic.{op}.rounding", "the float32_fma add rounds as a CPU converts "
                        "float32 to integers: half_even")
        if fields.get("domain") == "float32" and rounding not in (None, "half_even"):
            raise _fail(source, f"arithmetic.{op}.rounding", "the float32 average pool rounds as a CPU converts "
                        "float32 to integers: half_even")
        out[op] = dict(fields)
    return out


def _check_consistency(source: str, sec: dict) -> None:
    """Reject combinations no hardware can execute or this arithmetic cannot represent."""
    w, a, acc, rq, ops = sec["weights"], sec["activations"], sec["accumulator"], sec["requant"], sec["ops"]
    b = rq["multiplier_bits"]
    sr = rq["shift_range"]
    if not (len(sr) == 2 and all(type(v) is int for v in sr)):
        raise _fail(source, "requant.shift_range", f"got {sr!r}, expected [min, max] (two integers)")
    lo_allowed = b - 31
    if not (lo_allowed <= sr[0] <= sr[1] <= 62):
        raise _fail(
            source,
            "requant.shift_range",
            f"got {sr!r}, expected [min, max] with {lo_allowed} <= min <= max <= 62 "
            f"(right shifts; the lower bound keeps acc*multiplier*2^-shift within 64 bits)",
        )
    if rq["scheme"] == "shift_only":
        if b != 0:
            raise _fail(source, "requant.multiplier_bits", f"got {b}, shift_only requant has no multiplier: use 0")
        if rq["rounding"] in ("gemmlowp_double", "ruy"):
            raise _fail(source, "requant.rounding", f"{rq['rounding']} needs a fixed_point multiplier; "
                        "shift_only accepts half_up, half_away, half_even, floor")
        for section in ("weights", "activations"):
            if sec[section]["scale"] != "power_of_two":
                raise _fail(source, f"{section}.scale", "shift_only requant can only rescale by powers of two: "
                            "use power_of_two")
    elif b == 0:
        raise _fail(source, "requant.multiplier_bits", "fixed_point needs 1..31 multiplier bits (0 means shift_only)")
    if rq["scheme"] in ("float32", "float64"):
        raise _fail(source, "requant.scheme", f"{rq['scheme']} is a per-op scheme (arithmetic.OP.scheme); "
                    "the global requant, used by add and concat rescales, is fixed_point or shift_only")
    if rq["rounding"] in ("gemmlowp_double", "ruy") and b != 31:
        raise _fail(source, "requant.rounding", f"{rq['rounding']} is defined for a 31-bit multiplier, "
                    f"got multiplier_bits {b}")
    if w["granularity"] == "per_channel" and not rq["per_channel"]:
        raise _fail(source, "requant.per_channel", "per_channel weights need per-channel requantization: "
                    "set requant.per_channel: true or weights.granularity: per_tensor")
    if a["channelwise_via_requant"] and not rq["per_channel"]:
        raise _fail(source, "activations.channelwise_via_requant", "needs requant.per_channel: true")
    if w["symmetric"] and not w["signed"]:
        raise _fail(source, "weights.signed", "symmetric weights (zero point 0) must be signed")
    if w["narrow"] and not (w["signed"] and w["symmetric"]):
        raise _fail(source, "weights.narrow", "narrow range applies to signed symmetric weights only")
    if sec["bias"]["bits"] > acc["bits"]:
        raise _fail(source, "bias.bits", f"got {sec['bias']['bits']}, must not exceed accumulator.bits {acc['bits']}")
    if acc["saturate_at"] == "every_mac" and acc["overflow"] != "saturate":
        raise _fail(source, "accumulator.saturate_at", "every_mac applies to overflow: saturate only")
    bad = [op for op in ops["supported"] if op not in OP_KINDS]
    if bad:
        raise _fail(source, "ops.supported", f"unknown op {bad[0]!r}; accepted: {', '.join(OP_KINDS)}")
    # an add's centred inputs are left-shifted in int32 (the IntModel check refuses any model past it)
    centred = 2 ** (a["bits"] - 1) if a["symmetric"] else 2 ** a["bits"] - 1
    if "add" in ops["supported"] and centred << ops["add_left_shift"] > 2**31 - 1:
        most = max(s for s in range(31) if centred << s <= 2**31 - 1)
        needs = (centred << ops["add_left_shift"]).bit_length() + 1
        raise _fail(source, "ops.add_left_shift", f"{ops['add_left_shift']} overflows int32: the add's centred "
                    f"{a['bits']}-bit inputs (up to {centred}) shifted left need {needs} bits; at most {most} "
                    "with these activations")


def trainer_refusals(p: HardwareProfile) -> list[str]:
    """What quantize (the trainer) cannot train for this profile, though the simulator runs it (models from
    `qftsim import`, or written by other tools): one message per problem, none when it can."""
    found = []
    if not p.weights.symmetric:
        found.append("asymmetric weights (weights.symmetric: false) are not supported by the trainer")
    if p.accumulator.saturate_at == "every_mac" and p.accumulator.guarantee != "a2q":
        found.append("saturation at every MAC is trained only with accumulator.guarantee: a2q (which makes it "
                     "unreachable)")
    return found


def _bundled_dir():
    return resources.files("hwprofiles")


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.name[:-5] for p in _bundled_dir().iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str | Path | HardwareProfile) -> HardwareProfile:
    """Load a shipped profile by name, or a YAML file by path."""
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    text_path = str(name_or_path)
    path = Path(text_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise QftsimError(f"{text_path}: no such profile file")
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as exc:
            raise QftsimError(f"{path}: not a UTF-8 text file (byte {exc.start})") from None
        except OSError as exc:
            raise QftsimError(f"{path}: cannot read ({exc.strerror})") from None
    elif text_path in list_profiles():
        text, source = (_bundled_dir() / f"{text_path}.yaml").read_text(), f"hwprofiles/{text_path}.yaml"
    else:
        raise QftsimError(f"unknown profile {text_path!r}; shipped profiles: {', '.join(list_profiles())} "
                          "(or give a path to a .yaml file)")
    try:
        data = yaml.load(text, Loader=_ProfileLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise QftsimError(f"{source}: not valid YAML: {where}{problem}") from None
    except RecursionError:
        raise QftsimError(f"{source}: nested too deeply") from None
    return _parse(data, source)


class _ProfileLoader(yaml.SafeLoader):
    """Safe YAML without aliases: a profile has no use for them, and a few bytes of nested aliases (a
    "billion laughs") would expand to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a profile",
                                              event.start_mark)
        return super().compose_node(parent, index)
