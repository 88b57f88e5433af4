"""Compile an IntModel with TVM, export a shared library with a JSON sidecar, load and run it.

The sidecar records the format version, the IntModel's hash, the profile,
the input/output quantization, the target and the library's SHA-256, so that
`load` refuses a library that is not the one the sidecar describes and inputs
of the wrong shape. It travels inside the library file, appended after the
ELF image (the dynamic loader maps only the ELF's segments), so that one
rename replaces library and sidecar together: a reader sees the old pair or
the new one, never a mix. `OUT.so.json` beside it is a copy for tools that
read JSON; `load` reads the embedded one.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qftsim.errors import QftsimError
from qftsim.intmodel import IntModel, TensorQuant, atomic_write_bytes, check_writable

SIDECAR_FORMAT = "qftsim.tvm"
SIDECAR_VERSION = 2
# after the ELF image: the sidecar's JSON, its length (8 bytes, little-endian), then this magic
SIDECAR_MAGIC = b"QFTSIDE2"
MAX_SIDECAR_BYTES = 16 * 2**20
TARGETS = ("host", "x86-64", "aarch64")
AARCH64_GCC = "aarch64-linux-gnu-gcc"


def resolve_target(name: str):
    """A tvm.target.Target for 'host' (this CPU), 'x86-64' (generic) or 'aarch64' (cross)."""
    import tvm

    if name == "host":
        return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    if name == "x86-64":
        return tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
    if name == "aarch64":
        return tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
    raise QftsimError(f"unknown target {name!r}; accepted: {', '.join(TARGETS)}")


def has_vnni(target: str) -> bool:
    """Whether `target` ('host', 'x86-64', 'aarch64') has AVX-512 VNNI (u8 x s8 dot products)."""
    import tvm

    resolved = resolve_target(target)
    return "x86_64" in str(resolved.attrs.get("mtriple", "x86_64")) and \
        bool(tvm.target.codegen.target_has_features("avx512vnni", resolved))


def compile_module(mod, target: str):
    """tvm.compile with the convolution schedules (export.schedule) in TVM's CPU pipeline."""
    import tvm

    from export.schedule import pipeline

    resolved = resolve_target(target)
    return tvm.compile(mod, target=resolved, relax_pipeline=pipeline(resolved))


def _build(model: IntModel, target: str):
    from export.lower import lower

    return compile_module(lower(model, vnni=has_vnni(target)), target)


def compile_model(model: IntModel, target: str = "host") -> "CompiledModel":
    """Compile in memory for this machine ('host' or 'x86-64') and return a runnable model."""
    if target == "aarch64":
        raise QftsimError("an aarch64 build cannot run here: use export_library and run it on the target")
    return CompiledModel(_vm(_build(model, target)), _sidecar(model, target, library_sha256=None))


def export_library(model: IntModel, path: str | Path, target: str = "host") -> dict:
    """Compile and write `path` (a shared library, its sidecar embedded) in one atomic step, then `path`.json
    (a copy of the sidecar for other tools)."""
    import tvm

    path = Path(path)
    fcompile = None
    if target == "aarch64":
        if shutil.which(AARCH64_GCC) is None:
            raise QftsimError(f"cross toolchain {AARCH64_GCC} not found: install Debian's gcc-aarch64-linux-gnu "
                              "(apt-get install gcc-aarch64-linux-gnu)")
        fcompile = tvm.support.cc.cross_compiler(AARCH64_GCC)
    check_writable(path, "the library")  # before the compile, which takes minutes
    executable = _build(model, target)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        lib = Path(tmp) / path.name
        if fcompile is None:
            executable.export_library(str(lib))
        else:
            executable.export_library(str(lib), fcompile=fcompile)
        data = lib.read_bytes()
    sidecar = _sidecar(model, target, hashlib.sha256(data).hexdigest())
    text = json.dumps(sidecar, indent=1).encode()
    atomic_write_bytes(path, data + text + len(text).to_bytes(8, "little") + SIDECAR_MAGIC,
                       mode=0o777)  # as a linker leaves a shared library
    atomic_write_bytes(_sidecar_path(path), text)
    return sidecar


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _sidecar(model: IntModel, target: str, library_sha256: str | None) -> dict:
    def spec(name, shape):
        return {"name": name, "shape": list(shape), "quant": model.quant_of(name).to_dict()}

    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "model_hash": model.hash,
        "profile": model.profile.name,
        "profile_hash": model.profile.hash,
        "target": target,
        "target_string": str(resolve_target(target)),
        "library_sha256": library_sha256,
        "inputs": [spec(i.name, i.shape) for i in model.inputs],
        "outputs": [spec(name, model.shapes[name]) for name in model.outputs],
    }


def _vm(module):
    """A Relax VM on the CPU whose parallel loops use every core this process may run on.

    TVM sizes its thread pool by the cores it counts as "big"; on this
    project's 2-core VM that is one, so compiled models ran single-threaded
    next to a two-threaded torch. TVM_NUM_THREADS, read when the pool is
    first used, still wins where the user set it.
    """
    import os

    import tvm
    from tvm.runtime import vm

    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    return vm.VirtualMachine(module, tvm.cpu())


def load(path: str | Path) -> "CompiledModel":
    """Load an exported library with its embedded sidecar, refusing a pair that does not match."""
    import tvm

    path = Path(path)
    if not path.is_file():
        raise QftsimError(f"{path}: no such library")
    library, text = _split_sidecar(path)
    try:
        sidecar = json.loads(text.decode("utf-8"))
        ok = isinstance(sidecar, dict) and sidecar.get("format") == SIDECAR_FORMAT
    except (ValueError, RecursionError):  # JSON and UTF-8 errors are ValueErrors
        ok = False
    if not ok:
        raise QftsimError(f"{path}: its embedded sidecar is not a qftsim TVM sidecar")
    missing = [k for k, kind in (("target", str), ("library_sha256", str), ("inputs", list), ("outputs", list))
               if not isinstance(sidecar.get(k), kind)]
    if missing:
        raise QftsimError(f"{path}: incomplete sidecar (no valid {', '.join(missing)}): re-export the library")
    if sidecar.get("format_version") != SIDECAR_VERSION:
        raise QftsimError(f"{path}: sidecar format_version {sidecar.get('format_version')!r}, this qftsim reads "
                          f"{SIDECAR_VERSION}")
    if hashlib.sha256(library).hexdigest() != sidecar.get("library_sha256"):
        raise QftsimError(f"{path}: the library does not match its sidecar (SHA-256 differs): re-export it")
    if sidecar["target"] == "aarch64":
        raise QftsimError(f"{path}: built for aarch64; it runs on the target, not on this machine")
    _check_elf_whole(path, library)
    return CompiledModel(_vm(tvm.runtime.load_module(str(path))), sidecar)


def _split_sidecar(path: Path) -> tuple[bytes, bytes]:
    """(the ELF image, the sidecar's JSON bytes) of an exported library."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise QftsimError(f"{path}: cannot read it ({exc.strerror})") from None
    tail = len(SIDECAR_MAGIC) + 8
    if len(data) < tail or not data.endswith(SIDECAR_MAGIC):
        raise QftsimError(f"{path}: no embedded sidecar (not exported by this qftsim, or cut short): re-export it")
    size = int.from_bytes(data[-tail:-len(SIDECAR_MAGIC)], "little")
    if size > min(len(data) - tail, MAX_SIDECAR_BYTES):
        raise QftsimError(f"{path}: its embedded sidecar claims {size} bytes, more than the file holds")
    return data[:-tail - size], data[-tail - size:-tail]


def _check_elf_whole(path: Path, image: bytes) -> None:
    """Refuse a shared library whose segments or section table reach past the end of its ELF `image`: the
    dynamic loader would map them and the process die of SIGBUS when it touches a missing page, or read the
    sidecar as code (a truncated image whose sidecar was edited to match)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    size = len(image)
    try:
        elf = ELFFile(io.BytesIO(image))
        ends = [seg["p_offset"] + seg["p_filesz"] for seg in elf.iter_segments()]
        ends.append(elf["e_shoff"] + elf["e_shnum"] * elf["e_shentsize"])
    except (ELFError, ValueError, OSError) as exc:
        raise QftsimError(f"{path}: not a readable shared library ({exc})") from None
    if max(ends) > size:
        raise QftsimError(f"{path}: truncated ({size} bytes; its ELF headers need {max(ends)}): re-export it")


def _quant(d: dict) -> TensorQuant:
    return TensorQuant(d["bits"], d["signed"], d["zero_point"], d["scale"])


@dataclass
class CompiledModel:
    """A compiled integer model: integer (or real, quantized here) inputs in, integer outputs out."""

    vm: object
    sidecar: dict

    @property
    def model_hash(self) -> str:
        return self.sidecar["model_hash"]

    def run(self, inputs) -> dict[str, np.ndarray]:
        """Outputs by name for one input array (or a dict by name); float inputs are quantized first."""
        import tvm

        specs = self.sidecar["inputs"]
        if not isinstance(inputs, dict):
            if len(specs) != 1:
                raise QftsimError(f"the model has {len(specs)} inputs: pass a dict by name")
            inputs = {specs[0]["name"]: inputs}
        args = []
        for spec in specs:
            if spec["name"] not in inputs:
                raise QftsimError(f"input {spec['name']!r} is missing")
            q = _quant(spec["quant"])
            arr = np.asarray(inputs[spec["name"]])
            if arr.ndim != len(spec["shape"]) + 1 or list(arr.shape[1:]) != spec["shape"]:
                raise QftsimError(f"input {spec['name']!r}: shape {arr.shape}, expected "
                                  f"(batch, {', '.join(map(str, spec['shape']))})")
            if arr.dtype.kind == "f":
                arr = q.quantize(arr)
            elif arr.dtype.kind in "iu":
                if arr.size and (arr.min() < q.qmin or arr.max() > q.qmax):
                    raise QftsimError(f"input {spec['name']!r}: values outside [{q.qmin}, {q.qmax}]")
                arr = arr.astype(q.dtype)
            else:
                raise QftsimError(f"input {spec['name']!r}: dtype {arr.dtype}; expected integers or floats")
            args.append(tvm.runtime.tensor(np.ascontiguousarray(arr)))
        result = self.vm["main"](*args)
        outs = [result] if len(self.sidecar["outputs"]) == 1 else list(result)
        return {spec["name"]: out.numpy() for spec, out in zip(self.sidecar["outputs"], outs)}
