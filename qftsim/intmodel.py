"""IntModel: the integer network handed from training to the simulator and the exporters.

It holds only integers and their attributes plus the quantization of each
tensor (scale and zero point, so real values can go in and come out). It is
saved as a `.qft` zip: `manifest.json` (format version, profile, graph,
attributes) and one `.npy` per array (loaded with allow_pickle=False).
Loading validates everything against the embedded profile; saving is
atomic and byte-for-byte deterministic.
"""

from __future__ import annotations

import glob
import hashlib
import io
import math
import json
import os
import reprlib
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qftsim import arith
from qftsim.errors import QftsimError
from qftsim.profile import ARITHMETIC_OPS, HardwareProfile, OpArithmetic, int_range

FORMAT = "qftsim.intmodel"
# 2: the mean op and conv2d's depthwise attribute; 3: mul, resize, slice, zero_insert, mean's axes and keepdim,
# concat's axis
FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class TensorQuant:
    """How an integer tensor maps to real values: real = scale * (q - zero_point)."""

    bits: int
    signed: bool
    zero_point: int = 0
    scale: float = 1.0

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.signed)[1]

    @property
    def dtype(self) -> np.dtype:
        return storage_dtype(self.bits, self.signed)

    def quantize(self, real: np.ndarray) -> np.ndarray:
        """Real values to this tensor's integers (round half to even, clamped)."""
        q = np.rint(np.asarray(real, dtype=np.float64) / self.scale) + self.zero_point
        return np.clip(q, self.qmin, self.qmax).astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return (np.asarray(q, dtype=np.float64) - self.zero_point) * self.scale

    def to_dict(self) -> dict:
        return {"bits": self.bits, "signed": self.signed, "zero_point": self.zero_point, "scale": self.scale}


def storage_dtype(bits: int, signed: bool) -> np.dtype:
    """The smallest numpy integer type that holds a `bits`-wide value."""
    for width in (8, 16, 32, 64):
        if bits <= width:
            return np.dtype(f"{'' if signed else 'u'}int{width}")
    raise QftsimError(f"no storage type for {bits} bits")


@dataclass
class Node:
    """One integer op; its output tensor carries the node's name."""

    name: str
    op: str
    inputs: list[str]
    quant: TensorQuant
    attrs: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class ModelInput:
    name: str
    shape: tuple[int, ...]  # without the batch dimension
    quant: TensorQuant


@dataclass
class IntModel:
    """A validated integer graph in topological order, made for one hardware profile."""

    profile: HardwareProfile
    inputs: list[ModelInput]
    nodes: list[Node]
    outputs: list[str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.shapes = validate(self)

    def quant_of(self, tensor: str) -> TensorQuant:
        for i in self.inputs:
            if i.name == tensor:
                return i.quant
        return self.node(tensor).quant

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def to_bytes(self) -> bytes:
        """The `.qft` file's bytes: deterministic for the same model."""
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "profile": self.profile.to_dict(),
            "profile_hash": self.profile.hash,
            "inputs": [{"name": i.name, "shape": list(i.shape), "quant": i.quant.to_dict()} for i in self.inputs],
            "outputs": list(self.outputs),
            "nodes": [
                {
                    "name": n.name,
                    "op": n.op,
                    "inputs": list(n.inputs),
                    "quant": n.quant.to_dict(),
                    "attrs": n.attrs,
                    "arrays": sorted(n.arrays),
                }
                for n in self.nodes
            ],
        }
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            _write_member(zf, "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
            for n in self.nodes:
                for key in sorted(n.arrays):
                    npy = io.BytesIO()
                    np.lib.format.write_array(npy, np.ascontiguousarray(n.arrays[key]), allow_pickle=False)
                    _write_member(zf, f"arrays/{n.name}/{key}.npy", npy.getvalue())
        return buf.getvalue()

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write atomically: a temporary file in the same folder, then a rename."""
        atomic_write_bytes(Path(path), self.to_bytes())


def _write_member(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


STALE_SECONDS = 3600  # a temporary older than this belongs to a write that was killed (SIGKILL, power loss)


def remove_stale_temporaries(path: Path) -> None:
    """Remove what killed writes of `path` left beside it (`.NAME.XXXX` files and folders) an hour or more ago;
    younger ones may belong to a write still running."""
    import shutil
    import time

    for stale in path.parent.glob(f".{glob.escape(path.name)}.*"):
        try:
            if time.time() - stale.lstat().st_mtime >= STALE_SECONDS:
                shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
        except OSError:
            pass  # another process removed it, or it is not ours to remove


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one; the file gets `mode`
    less the umask, as any file the user creates (the temporary file's private 0600 is not kept). A file
    system error (read-only folder, a file where a folder should be, a folder in the way, a full disk) is a
    QftsimError naming the file; the old file is kept."""
    if path.is_dir():
        raise QftsimError(f"{path}: is a folder; give a file name")
    blocking = next((p for p in path.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise QftsimError(f"{path}: {blocking} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise QftsimError(f"{path}: cannot write there ({exc.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, mode & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise QftsimError(f"{path}: cannot write ({exc.strerror}); the old file, if any, is kept") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: Path, what: str = "the file") -> None:
    """Refuse, in one line and before any long work (a compile, a training), an output that could not be
    written: a folder, a path under a file, a read-only folder."""
    path = Path(path)
    if path.is_dir():
        raise QftsimError(f"{path}: is a folder; give a file name for {what}")
    try:
        probe = path.with_name(f".{path.name}.probe")
        atomic_write_bytes(probe, b"")
        probe.unlink()
    except QftsimError as exc:
        raise QftsimError(f"{path}: cannot write {what} there ({str(exc).split(': ', 1)[-1]})") from None


MANIFEST_BYTES = 16 * 2**20  # a manifest holds names, shapes and attributes: far below this
# what a file may expand to: its own size this many times over, plus an allowance (int8 weights compress
# about 1.1x; a zip of zeros expands 1000x, and a 3 MB file declaring 3 GiB took 1.5 GB to be refused)
EXPANSION_FACTOR, EXPANSION_ALLOWANCE = 64, 64 * 2**20


def _check_declared_sizes(zf: zipfile.ZipFile, file_size: int) -> None:
    """Before anything is decompressed: the manifest is small, each array member holds exactly what its .npy
    header declares, and all of them together expand to at most EXPANSION_FACTOR x the file."""
    infos = {i.filename: i for i in zf.infolist()}
    if infos["manifest.json"].file_size > MANIFEST_BYTES:
        raise QftsimError(f"manifest.json declares {infos['manifest.json'].file_size} bytes (at most "
                          f"{MANIFEST_BYTES})")
    total = sum(i.file_size for i in infos.values())
    if total > EXPANSION_FACTOR * file_size + EXPANSION_ALLOWANCE:
        raise QftsimError(f"its members declare {total} bytes from a {file_size}-byte file (a decompression bomb?)")
    for name, info in infos.items():
        if not name.startswith("arrays/"):
            continue
        with zf.open(info) as member:  # only the .npy header is read here
            try:
                version = np.lib.format.read_magic(member)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f".npy format version {version}, not 1.0 or 2.0")
                shape, _, dtype = read_header(member)
            except (ValueError, EOFError, SyntaxError):
                continue  # unreadable: refused, naming its node, when the arrays are loaded
            if dtype.hasobject:
                continue  # a pickle: refused then too (allow_pickle=False)
            declared = member.tell() + math.prod(shape) * dtype.itemsize
        if declared != info.file_size:
            node, _, key = name.removeprefix("arrays/").removesuffix(".npy").rpartition("/")
            raise QftsimError(f"node {node!r}: array {key!r} declares {declared} bytes in its header, "
                              f"{info.file_size} in the file")


def load(path: str | Path) -> IntModel:
    """Read and validate a `.qft` file; any defect raises QftsimError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise QftsimError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "manifest.json" not in names:
                raise QftsimError(f"{path}: not a qftsim model (no manifest.json)")
            _check_declared_sizes(zf, path.stat().st_size)
            manifest = json.loads(zf.read("manifest.json"))
            members = {name: zf.read(name) for name in names if name.startswith("arrays/")}
    except RecursionError:  # (a RuntimeError, as are an encrypted member's errors: caught first)
        raise QftsimError(f"{path}: manifest.json is nested too deeply") from None
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError, RuntimeError) as exc:
        raise QftsimError(f"{path}: not a readable qftsim model file ({exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QftsimError(f"{path}: manifest.json is not valid JSON ({exc})") from None
    try:
        return _from_manifest(manifest, members)
    except QftsimError as exc:
        raise QftsimError(f"{path}: {exc}") from None


def _from_manifest(manifest: dict, members: dict[str, bytes]) -> IntModel:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise QftsimError(f"not a qftsim model (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise QftsimError(f"format_version {version!r}; this qftsim reads versions "
                          f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}")
    try:
        profile = HardwareProfile.from_dict(manifest["profile"], source="manifest.json profile")
        if manifest["profile_hash"] != profile.hash:
            raise QftsimError("profile_hash does not match the embedded profile")
        inputs = [ModelInput(_check_name(i["name"], "input"), tuple(_field(i, "shape", list)),
                             _quant(i["quant"], f"input {i['name']}"))
                  for i in _items(manifest, "inputs", dict)]
        nodes = []
        for n in _items(manifest, "nodes", dict):
            _check_name(n["name"], "node")
            arrays = {}
            for key in _items(n, "arrays", str):
                member = f"arrays/{n['name']}/{key}.npy"
                if member not in members:
                    raise QftsimError(f"node {n['name']!r}: array {key!r} is missing from the file")
                try:
                    arrays[key] = np.load(io.BytesIO(members[member]), allow_pickle=False)
                except (ValueError, EOFError) as exc:
                    raise QftsimError(f"node {n['name']!r}: array {key!r} is unreadable ({exc or 'empty'})") from None
            nodes.append(Node(n["name"], n["op"], _items(n, "inputs", str), _quant(n["quant"], f"node {n['name']}"),
                              dict(_field(n, "attrs", dict)), arrays))
        return IntModel(profile, inputs, nodes, _items(manifest, "outputs", str))
    except (KeyError, TypeError) as exc:
        raise QftsimError(f"manifest.json: missing or malformed field {exc}") from None


def _field(container: dict, key: str, kind: type):
    """container[key], which must be a `kind` (a list, a dict)."""
    value = container[key]
    if not isinstance(value, kind):
        raise QftsimError(f"manifest.json: field {key!r} must be a {'list' if kind is list else 'mapping'}, "
                          f"got {reprlib.repr(value)}")
    return value


def _items(container: dict, key: str, kind: type) -> list:
    """container[key], a list whose items are each a `kind` (str, dict)."""
    items = _field(container, key, list)
    if not all(isinstance(item, kind) for item in items):
        raise QftsimError(f"manifest.json: every item of {key!r} must be a {'string' if kind is str else 'mapping'}")
    return list(items)


def _quant(d: dict, where: str) -> TensorQuant:
    """A tensor's quantization from the manifest, types checked exactly (8.9 is not 8, "false" is not False)."""
    if not isinstance(d, dict) or set(d) != {"bits", "signed", "zero_point", "scale"}:
        raise QftsimError(f"{where}: quant needs exactly bits, signed, zero_point, scale")
    for key, kind in (("bits", int), ("signed", bool), ("zero_point", int)):
        if type(d[key]) is not kind:
            raise QftsimError(f"{where}: quant {key} must be {'an integer' if kind is int else 'true or false'}, "
                              f"got {d[key]!r}")
    if type(d["scale"]) not in (int, float) or not np.isfinite(d["scale"]):
        raise QftsimError(f"{where}: quant scale must be a finite number, got {d['scale']!r}")
    if not 1 <= d["bits"] <= 32:
        raise QftsimError(f"{where}: quant bits must be in [1, 32], got {d['bits']}")
    return TensorQuant(d["bits"], d["signed"], d["zero_point"], float(d["scale"]))


def _check_name(name, where: str) -> str:
    """Tensor names become file names of golden vectors: printable, no path separators, not empty."""
    if not (isinstance(name, str) and 0 < len(name) <= 200 and name.isprintable() and "/" not in name
            and "\\" not in name and name not in (".", "..")):
        raise QftsimError(f"{where}: name {name!r} must be 1-200 printable characters without / or \\")
    return name


# ---------------------------------------------------------------- validation

OP_ATTRS: dict[str, dict] = {
    # op: {attr: default (None = required)}
    # depthwise: a depthwise kernel (TFLite's DEPTHWISE_CONV_2D), which engines run with their own arithmetic;
    # by default, a conv with groups > 1 and one input channel per group. (With one input channel both
    # kernels compute the same sums, so only the source can tell.) transposed: the stride-1 conv after a
    # zero_insert that computes a transposed convolution (TFLite's TRANSPOSE_CONV), which engines may also
    # requantize their own way.
    "conv2d": {"stride": [1, 1], "padding": [0, 0, 0, 0], "dilation": [1, 1], "groups": 1, "clamp": None,
               "depthwise": "auto", "transposed": False},
    "linear": {"clamp": None},
    "add": {"input_multipliers": None, "input_shifts": None, "multiplier": None, "shift": None,
            "left_shift": None, "clamp": None},
    "concat": {"input_multipliers": None, "input_shifts": None, "axis": 1},
    "maxpool2d": {"kernel": None, "stride": None, "padding": [0, 0, 0, 0]},
    "avgpool2d": {"kernel": None, "stride": None, "padding": [0, 0, 0, 0], "count_include_pad": True},
    "mul": {"clamp": None},  # elementwise, the inputs broadcasting (squeeze-excite's x * gate)
    # the centred values summed over `axes` (counted in the batched tensor), requantized to its own scale
    "mean": {"axes": [2, 3], "keepdim": False, "clamp": None},
    "clamp": {"clamp": None},
    "reshape": {"shape": None},
    "lut": {},
    # nearest: input index floor(out * in / out_size); bilinear: TFLite's integer half-pixel rule (arith)
    "resize": {"mode": None, "size": None},
    "slice": {"axis": None, "start": None, "stop": None},  # [start, stop) of one axis (1: after the batch)
    # stride - 1 zero points between neighbours on H and W: a transposed conv is this, then a conv2d
    "zero_insert": {"stride": None},
}
OP_ARRAYS = {
    "conv2d": ("weight", "bias", "multiplier", "shift"),
    "linear": ("weight", "bias", "multiplier", "shift"),
    "lut": ("table",),
    "mean": ("multiplier", "shift"),
    "mul": ("multiplier", "shift"),
}
OP_ARITY = {"add": 2, "mul": 2}


def node_arithmetic(node: Node, profile: HardwareProfile) -> OpArithmetic:
    """The profile's arithmetic for this node (a conv2d marked depthwise or transposed uses depthwise_conv2d's
    or transpose_conv2d's)."""
    op = node.op
    if op == "conv2d" and node.attrs["depthwise"]:
        op = "depthwise_conv2d"
    elif op == "conv2d" and node.attrs["transposed"]:
        op = "transpose_conv2d"
    if op not in ARITHMETIC_OPS:
        raise KeyError(f"{node.op} has no arithmetic of its own")
    return profile.arithmetic(op)


def stored_requant(m, t, scheme: str) -> dict[str, np.ndarray]:
    """A node's `multiplier` and `shift` arrays as stored: float64's 53-bit multipliers need int64."""
    return {"multiplier": np.asarray(m).astype(np.int64 if scheme == "float64" else np.int32),
            "shift": np.asarray(t).astype(np.int32)}


# Stored multipliers: widths by requantization scheme (fixed point: the profile's multiplier_bits).
FLOAT_SHIFT_RANGE = (0, 200)  # float factors m * 2^-t below 2^53: finite products


def _err(node: Node, message: str) -> QftsimError:
    return QftsimError(f"node {node.name!r} ({node.op}): {message}")


def _check_range(node: Node, what: str, values, lo: int, hi: int) -> None:
    values = np.asarray(values)
    if values.size and (values.min() < lo or values.max() > hi):
        bad = values.min() if values.min() < lo else values.max()
        raise _err(node, f"{what} holds {int(bad)}, outside the profile's range [{lo}, {hi}]")


def _ints(node: Node, key: str, n: int) -> list[int]:
    value = node.attrs[key]
    if not (isinstance(value, list) and len(value) == n and all(type(v) is int for v in value)):
        raise _err(node, f"attribute {key!r} must be a list of {n} integers, got {value!r}")
    return value


def _window_out(node: Node, size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    out = (size + pad - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise _err(node, f"window {kernel} (dilation {dilation}) does not fit input size {size} with padding {pad}")
    return out


def _check_requant(node: Node, profile: HardwareProfile, m, t, what: str, scheme: str | None = None) -> None:
    scheme = scheme or profile.requant.scheme
    if scheme == "shift_only":  # a power of two: the multiplier is 1
        _check_range(node, f"{what} multiplier", m, 1, 1)
        _check_range(node, f"{what} shift", t, *profile.requant.shift_range)
        return
    if scheme in arith.FLOAT_SCHEMES:
        _check_range(node, f"{what} multiplier", m, 0, (1 << arith.FLOAT_SCHEMES[scheme][2]) - 1)
        _check_range(node, f"{what} shift", t, *FLOAT_SHIFT_RANGE)
        return
    b = profile.requant.multiplier_bits
    _check_range(node, f"{what} multiplier", m, 0 if b else 1, (1 << b) - 1 if b else 1)
    _check_range(node, f"{what} shift", t, *profile.requant.shift_range)


def _check_activation_quant(node_or_input, quant: TensorQuant, profile: HardwareProfile, where: str) -> None:
    a = profile.activations
    if quant.bits != a.bits:
        raise QftsimError(f"{where}: {quant.bits}-bit activations, the profile has {a.bits}")
    if a.signed != "auto" and quant.signed != a.signed:
        raise QftsimError(f"{where}: signed={quant.signed}, the profile requires signed={a.signed}")
    if not quant.qmin <= quant.zero_point <= quant.qmax:
        raise QftsimError(f"{where}: zero point {quant.zero_point} outside [{quant.qmin}, {quant.qmax}]")
    if a.symmetric and quant.zero_point != 0:
        raise QftsimError(f"{where}: zero point {quant.zero_point}, the profile's activations are symmetric")
    if not (quant.scale > 0 and np.isfinite(quant.scale)):
        raise QftsimError(f"{where}: scale must be a positive finite number, got {quant.scale}")


def validate(model: IntModel) -> dict[str, tuple[int, ...]]:
    """Check the graph, attributes, shapes and every integer against the profile; return shapes."""
    profile = model.profile
    shapes: dict[str, tuple[int, ...]] = {}
    for i in model.inputs:
        _check_activation_quant(i, i.quant, profile, f"input {i.name!r}")
        if not all(type(s) is int and s > 0 for s in i.shape):
            raise QftsimError(f"input {i.name!r}: shape must be positive integers, got {i.shape}")
        shapes[i.name] = tuple(i.shape)
    for node in model.nodes:
        if node.name in shapes:
            raise _err(node, "name is used twice")
        if node.op not in OP_ATTRS:
            raise _err(node, f"unknown op; accepted: {', '.join(OP_ATTRS)}")
        if node.op not in profile.ops.supported:
            raise _err(node, f"op not supported by profile {profile.name}")
        for src in node.inputs:
            if src not in shapes:
                raise _err(node, f"input {src!r} is not produced before this node")
        arity = OP_ARITY.get(node.op, None if node.op == "concat" else 1)
        if (arity is not None and len(node.inputs) != arity) or not node.inputs:
            raise _err(node, f"takes {arity or 'one or more'} inputs, got {len(node.inputs)}")
        known = OP_ATTRS[node.op]
        unknown = sorted(set(node.attrs) - set(known))
        if unknown:
            raise _err(node, f"unknown attribute {unknown[0]!r}; accepted: {', '.join(known) or 'none'}")
        for key, default in known.items():
            if key not in node.attrs:
                if default is None and key not in ("input_multipliers", "input_shifts"):
                    raise _err(node, f"attribute {key!r} is missing")
                node.attrs[key] = default
        expected = OP_ARRAYS.get(node.op, ())
        if set(node.arrays) != set(expected):
            missing = sorted(set(expected) - set(node.arrays)) or sorted(set(node.arrays) - set(expected))
            raise _err(node, f"array {missing[0]!r} is missing or not expected; needs {', '.join(expected) or 'none'}")
        for key, arr in node.arrays.items():
            if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu":
                raise _err(node, f"array {key!r} must be an integer array, got {getattr(arr, 'dtype', type(arr))}")
        _check_activation_quant(node, node.quant, profile, f"node {node.name!r} output")
        in_shapes = [shapes[s] for s in node.inputs]
        in_quants = [model.quant_of(s) for s in node.inputs]
        shapes[node.name] = _CHECKS[node.op](node, profile, in_shapes, in_quants)
        if "clamp" in known:
            lo, hi = _ints(node, "clamp", 2)
            if not node.quant.qmin <= lo <= hi <= node.quant.qmax:
                raise _err(node, f"clamp [{lo}, {hi}] must lie within the output range "
                                 f"[{node.quant.qmin}, {node.quant.qmax}]")
    for out in model.outputs:
        if out not in shapes:
            raise QftsimError(f"output {out!r} is not a tensor of the graph")
    if not model.outputs:
        raise QftsimError("the model has no outputs")
    return shapes


def _check_same_quant(node: Node, in_quants) -> None:
    if in_quants[0] != node.quant:
        raise _err(node, "output quantization must equal the input's (this op does not rescale)")


def _check_matmul_params(node: Node, profile: HardwareProfile, out_channels: int) -> None:
    w, b, m, t = (node.arrays[k] for k in ("weight", "bias", "multiplier", "shift"))
    _check_range(node, "weight", w, profile.weights.qmin, profile.weights.qmax)
    if b.shape != (out_channels,):
        raise _err(node, f"bias shape {b.shape}, expected ({out_channels},)")
    _check_range(node, "bias", b, *profile.bias.range)
    allowed = {(out_channels,), (1,)} if profile.requant.per_channel else {(1,)}
    for key, arr in (("multiplier", m), ("shift", t)):
        if arr.shape not in allowed:
            raise _err(node, f"{key} shape {arr.shape}, expected one of {sorted(allowed)}")
    _check_requant(node, profile, m, t, "output", node_arithmetic(node, profile).scheme)


def _check_conv2d(node, profile, in_shapes, in_quants):
    (shape,) = in_shapes
    if len(shape) != 3:
        raise _err(node, f"input must be (C, H, W), got {shape}")
    w = node.arrays["weight"]
    groups = node.attrs["groups"]
    if w.ndim != 4 or type(groups) is not int or groups < 1:
        raise _err(node, f"weight must be (O, C/groups, kh, kw) with groups >= 1, got {w.shape}, groups {groups}")
    o, cg, kh, kw = w.shape
    if cg * groups != shape[0] or o % groups or o == 0:
        raise _err(node, f"weight shape {w.shape} with groups {groups} does not fit {shape[0]} input channels")
    sh, sw = _ints(node, "stride", 2)
    dh, dw = _ints(node, "dilation", 2)
    pt, pl, pb, pr = _ints(node, "padding", 4)
    if min(sh, sw, dh, dw) < 1 or min(pt, pl, pb, pr) < 0:
        raise _err(node, "stride and dilation must be >= 1, padding >= 0")
    if node.attrs["depthwise"] == "auto":
        node.attrs["depthwise"] = groups > 1 and cg == 1 and node.attrs["transposed"] is False
    if type(node.attrs["depthwise"]) is not bool or (node.attrs["depthwise"] and (cg != 1 or groups != shape[0])):
        raise _err(node, f"attribute 'depthwise' must be true (one input channel per group, as many groups as "
                         f"input channels) or false, got {node.attrs['depthwise']!r}")
    if type(node.attrs["transposed"]) is not bool or (node.attrs["transposed"] and node.attrs["depthwise"]):
        raise _err(node, f"attribute 'transposed' must be true or false (and not with depthwise), got "
                         f"{node.attrs['transposed']!r}")
    _check_matmul_params(node, profile, o)
    return (o, _window_out(node, shape[1], kh, sh, pt + pb, dh), _window_out(node, shape[2], kw, sw, pl + pr, dw))


def _check_linear(node, profile, in_shapes, in_quants):
    (shape,) = in_shapes
    w = node.arrays["weight"]
    if len(shape) != 1 or w.ndim != 2 or w.shape[1] != shape[0] or w.shape[0] == 0:
        raise _err(node, f"weight {w.shape} does not fit input {shape} (needs a flat input of {w.shape[-1]})")
    _check_matmul_params(node, profile, w.shape[0])
    return (w.shape[0],)


def _check_rescales(node, profile, count: int, scheme: str | None = None) -> bool:
    """Validate per-input rescale multipliers (of `scheme`, the profile's by default); False where the op has
    none (shared scale)."""
    ms, ts = node.attrs["input_multipliers"], node.attrs["input_shifts"]
    if ms is None and ts is None:
        return False
    if not (isinstance(ms, list) and isinstance(ts, list) and len(ms) == len(ts) == count
            and all(type(v) is int for v in ms + ts)):
        raise _err(node, f"input_multipliers and input_shifts must be lists of {count} integers")
    _check_requant(node, profile, ms, ts, "input", scheme)
    return True


def _check_add(node, profile, in_shapes, in_quants):
    if in_shapes[0] != in_shapes[1]:
        raise _err(node, f"input shapes differ: {in_shapes[0]} and {in_shapes[1]}")
    float_ratios = node_arithmetic(node, profile).form == "float32_fma"  # onnxruntime: float32 scale ratios
    if not _check_rescales(node, profile, 2, "float32" if float_ratios else None):
        raise _err(node, "input_multipliers and input_shifts are required")
    for key in ("multiplier", "shift", "left_shift"):
        if type(node.attrs[key]) is not int:
            raise _err(node, f"attribute {key!r} must be an integer")
    _check_requant(node, profile, node.attrs["multiplier"], node.attrs["shift"], "output")
    if float_ratios:  # nothing is summed in int32
        return in_shapes[0]
    if node.attrs["left_shift"] != profile.ops.add_left_shift:
        raise _err(node, f"left_shift {node.attrs['left_shift']}, the profile's add_left_shift is "
                         f"{profile.ops.add_left_shift}")
    # Hardware adds the rescaled inputs in int32: prove the sum cannot leave it.
    peak_sum = 0
    for q, m, t in zip(in_quants, node.attrs["input_multipliers"], node.attrs["input_shifts"]):
        peak = max(q.qmax - q.zero_point, q.zero_point - q.qmin) << node.attrs["left_shift"]
        ends = arith.requantize(np.array([-peak, peak], dtype=np.int64), m, t,
                                node_arithmetic(node, profile).rounding)
        peak_sum += int(np.abs(ends).max()) if peak < 2**31 else 2**62
    if peak_sum > arith.INT32_MAX:
        raise _err(node, "input multipliers and shifts let the rescaled sum exceed int32; "
                         "use larger input shifts")
    return in_shapes[0]


def _check_axis(node, shape: tuple[int, ...]) -> int:
    axis = node.attrs["axis"]
    if type(axis) is not int or not 1 <= axis <= len(shape):
        raise _err(node, f"axis must be an integer in [1, {len(shape)}] (1 is the axis after the batch), got {axis!r}")
    return axis


def _check_concat(node, profile, in_shapes, in_quants):
    axis = _check_axis(node, in_shapes[0])
    rest = {s[:axis - 1] + s[axis:] for s in in_shapes}
    if len(rest) != 1 or len({len(s) for s in in_shapes}) != 1:
        raise _err(node, f"inputs must agree in all but axis {axis}, got {in_shapes}")
    if _check_rescales(node, profile, len(in_shapes)):
        if not profile.ops.concat_rescale:
            raise _err(node, f"profile {profile.name} does not rescale concat inputs (ops.concat_rescale)")
    elif any(q != node.quant for q in in_quants):
        raise _err(node, "inputs must share the output's quantization when no rescale is given")
    first = in_shapes[0]
    return first[:axis - 1] + (sum(s[axis - 1] for s in in_shapes),) + first[axis:]


def _check_pool(node, profile, in_shapes, in_quants):
    (shape,) = in_shapes
    if len(shape) != 3:
        raise _err(node, f"input must be (C, H, W), got {shape}")
    kh, kw = _ints(node, "kernel", 2)
    sh, sw = _ints(node, "stride", 2)
    pt, pl, pb, pr = _ints(node, "padding", 4)
    if min(kh, kw, sh, sw) < 1 or min(pt, pl, pb, pr) < 0 or max(pt, pb) >= kh or max(pl, pr) >= kw:
        raise _err(node, "kernel and stride must be >= 1 and padding smaller than the kernel")
    if node.op == "avgpool2d" and node_arithmetic(node, profile).domain == "float32":
        if (in_quants[0].bits, in_quants[0].signed) != (node.quant.bits, node.quant.signed):
            raise _err(node, "output must have the input's integer type (its scale and zero point may differ)")
    else:
        _check_same_quant(node, in_quants)
    return (shape[0], _window_out(node, shape[1], kh, sh, pt + pb), _window_out(node, shape[2], kw, sw, pl + pr))


def _check_tensor_requant(node, profile) -> None:
    """One multiplier and shift for the whole output (mean, mul), in the range of the op's scheme."""
    m, t = node.arrays["multiplier"], node.arrays["shift"]
    if m.shape != (1,) or t.shape != (1,):
        raise _err(node, f"multiplier and shift must have shape (1,), got {m.shape} and {t.shape}")
    _check_requant(node, profile, m, t, "output", node_arithmetic(node, profile).scheme)


def broadcast_shape(node: Node, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of an elementwise op's output: inputs of one rank, each axis equal or 1 in one of them."""
    if len(a) != len(b) or any(x != y and 1 not in (x, y) for x, y in zip(a, b)):
        raise _err(node, f"input shapes {a} and {b} do not broadcast (same rank, each axis equal or 1)")
    return tuple(max(x, y) for x, y in zip(a, b))


def _check_mul(node, profile, in_shapes, in_quants):
    shape = broadcast_shape(node, *in_shapes)
    _check_tensor_requant(node, profile)
    if max_abs_centered(in_quants[0]) * max_abs_centered(in_quants[1]) > arith.INT32_MAX:
        raise _err(node, "the product of the centred inputs could leave int32")
    return shape


def mean_axes(node: Node, shape: tuple[int, ...]) -> list[int]:
    """The axes a mean sums over, counted in the batched tensor (1 is the first axis after the batch)."""
    axes = node.attrs["axes"]
    if not (isinstance(axes, list) and axes and all(type(a) is int and 1 <= a <= len(shape) for a in axes)
            and len(set(axes)) == len(axes)):
        raise _err(node, f"axes must be distinct integers in [1, {len(shape)}] (1 is the axis after the batch), "
                         f"got {axes!r}")
    return sorted(axes)


def _check_mean(node, profile, in_shapes, in_quants):
    (shape,) = in_shapes
    axes = mean_axes(node, shape)
    if type(node.attrs["keepdim"]) is not bool:
        raise _err(node, f"attribute 'keepdim' must be true or false, got {node.attrs['keepdim']!r}")
    _check_tensor_requant(node, profile)
    count = math.prod(shape[a - 1] for a in axes)
    if count * max_abs_centered(in_quants[0]) > arith.INT32_MAX:
        raise _err(node, f"a sum over {count} values could leave int32")
    if node.attrs["keepdim"]:
        return tuple(1 if i + 1 in axes else s for i, s in enumerate(shape))
    if len(axes) == len(shape):
        raise _err(node, "a mean over every axis but the batch needs keepdim: true")
    return tuple(s for i, s in enumerate(shape) if i + 1 not in axes)


def max_abs_centered(q: TensorQuant) -> int:
    """The largest |value - zero point| of the tensor's integer range."""
    return max(q.qmax - q.zero_point, q.zero_point - q.qmin)


def _check_clamp(node, profile, in_shapes, in_quants):
    _check_same_quant(node, in_quants)
    return in_shapes[0]


def _check_reshape(node, profile, in_shapes, in_quants):
    (shape,) = in_shapes
    target = node.attrs["shape"]
    if not (isinstance(target, list) and all(type(v) is int and (v > 0 or v == -1) for v in target)
            and target.count(-1) <= 1):
        raise _err(node, f"shape must be positive integers with at most one -1, got {target!r}")
    size = math.prod(shape)  # Python integers: a product that overflows int64 is still refused
    known = math.prod(v for v in target if v != -1)
    if -1 in target:
        if size % known:
            raise _err(node, f"cannot reshape {shape} to {target}")
        target = [size // known if v == -1 else v for v in target]
    if math.prod(target) != size:
        raise _err(node, f"cannot reshape {shape} to {target}")
    _check_same_quant(node, in_quants)
    return tuple(target)


def _check_lut(node, profile, in_shapes, in_quants):
    table = node.arrays["table"]
    if table.shape != (2 ** in_quants[0].bits,):
        raise _err(node, f"table shape {table.shape}, expected ({2 ** in_quants[0].bits},) for "
                         f"{in_quants[0].bits}-bit inputs")
    _check_range(node, "table", table, node.quant.qmin, node.quant.qmax)
    return in_shapes[0]


def _check_resize(node, profile, in_shapes, in_quants):
    (shape,) = in_shapes
    if len(shape) != 3:
        raise _err(node, f"input must be (C, H, W), got {shape}")
    if node.attrs["mode"] not in ("nearest", "bilinear"):
        raise _err(node, f"mode must be 'nearest' or 'bilinear', got {node.attrs['mode']!r}")
    size = _ints(node, "size", 2)
    if min(size) < 1:
        raise _err(node, f"size must be positive, got {size}")
    _check_same_quant(node, in_quants)
    return (shape[0], *size)


def _check_zero_insert(node, profile, in_shapes, in_quants):
    (shape,) = in_shapes
    if len(shape) != 3:
        raise _err(node, f"input must be (C, H, W), got {shape}")
    sh, sw = _ints(node, "stride", 2)
    if min(sh, sw) < 1:
        raise _err(node, f"stride must be >= 1, got {[sh, sw]}")
    _check_same_quant(node, in_quants)
    return (shape[0], (shape[1] - 1) * sh + 1, (shape[2] - 1) * sw + 1)


def _check_slice(node, profile, in_shapes, in_quants):
    (shape,) = in_shapes
    axis = _check_axis(node, shape)
    start, stop = node.attrs["start"], node.attrs["stop"]
    if not (type(start) is int and type(stop) is int and 0 <= start < stop <= shape[axis - 1]):
        raise _err(node, f"start and stop must be integers with 0 <= start < stop <= {shape[axis - 1]}, "
                         f"got {start!r} and {stop!r}")
    _check_same_quant(node, in_quants)
    return shape[:axis - 1] + (stop - start,) + shape[axis:]


_CHECKS = {
    "resize": _check_resize,
    "slice": _check_slice,
    "zero_insert": _check_zero_insert,
    "conv2d": _check_conv2d,
    "linear": _check_linear,
    "add": _check_add,
    "mul": _check_mul,
    "concat": _check_concat,
    "maxpool2d": _check_pool,
    "avgpool2d": _check_pool,
    "mean": _check_mean,
    "clamp": _check_clamp,
    "reshape": _check_reshape,
    "lut": _check_lut,
}
