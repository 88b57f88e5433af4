"""Run an aarch64 build of a model under qemu-user: a small C++ runner on TVM's runtime libraries.

The aarch64 libtvm_runtime.so and libtvm_ffi.so come from the aarch64 wheels
of the pinned apache-tvm and apache-tvm-ffi (pip download, cached); the
runner is cross-compiled with the tvm-ffi headers of the installed wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from export import export_library

RUNNER = r"""
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

namespace ffi = tvm::ffi;

struct HostAlloc {
  void AllocData(DLTensor* t) { t->data = std::malloc(ffi::GetDataSize(*t)); }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// runner LIB.so IN.bin OUT.bin BITS SIGNED DIM0 DIM1 ...: one int input in, the raw output bytes out
int main(int argc, char** argv) {
  ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
  std::vector<int64_t> shape;
  for (int i = 6; i < argc; ++i) shape.push_back(std::atoll(argv[i]));
  DLDataType dtype{static_cast<uint8_t>(std::atoi(argv[5]) ? kDLInt : kDLUInt),
                   static_cast<uint8_t>(std::atoi(argv[4])), 1};
  ffi::Tensor x = ffi::Tensor::FromNDAlloc(HostAlloc(), ffi::ShapeView(shape.data(), shape.size()), dtype,
                                           DLDevice{kDLCPU, 0});
  FILE* in = std::fopen(argv[2], "rb");
  size_t want = ffi::GetDataSize(*x.GetDLTensorPtr());
  if (std::fread(x.data_ptr(), 1, want, in) != want) return 2;
  std::fclose(in);
  ffi::Tensor y = vm->GetFunction("main").value()(x).cast<ffi::Tensor>();
  FILE* out = std::fopen(argv[3], "wb");
  std::fwrite(y.data_ptr(), 1, ffi::GetDataSize(*y.GetDLTensorPtr()), out);
  std::fclose(out);
  return 0;
}
"""

SYSROOT = "/usr/aarch64-linux-gnu"


def runtime_dir() -> Path:
    """aarch64 libtvm_runtime.so and libtvm_ffi.so, from the pinned versions' aarch64 wheels (cached)."""
    import tvm
    import tvm_ffi

    cache = Path(os.environ.get("QFTSIM_CACHE", Path.home() / ".cache" / "qftsim")) / "aarch64-runtime"
    libs = cache / "lib"
    if (libs / "libtvm_runtime.so").is_file() and (libs / "libtvm_ffi.so").is_file():
        return libs
    wheels = cache / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", f"apache-tvm=={tvm.__version__}",
                    f"apache-tvm-ffi=={tvm_ffi.__version__}", "--platform", "manylinux_2_28_aarch64",
                    "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
                    "--only-binary=:all:", "--no-deps", "-d", str(wheels)], check=True)
    libs.mkdir(parents=True, exist_ok=True)
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.endswith(("/libtvm_runtime.so", "/libtvm_ffi.so")):
                    (libs / Path(name).name).write_bytes(zf.read(name))
    return libs


def build_runner(folder: Path, libs: Path) -> Path:
    import tvm_ffi

    source = folder / "runner.cc"
    source.write_text(RUNNER)
    include = Path(tvm_ffi.__file__).parent / "include"
    dlpack = Path(tvm_ffi.__file__).parent / "3rdparty" / "dlpack" / "include"
    runner = folder / "runner"
    subprocess.run(["aarch64-linux-gnu-g++", "-std=c++17", "-O1", f"-I{include}", f"-I{dlpack}", str(source),
                    f"-L{libs}", "-ltvm_ffi", "-ltvm_runtime", "-o", str(runner)], check=True)
    return runner


def run_under_qemu(model, x: np.ndarray, folder: Path) -> np.ndarray:
    """The aarch64 library's output for integer input x, run under qemu-aarch64."""
    libs = runtime_dir()
    runner = build_runner(folder, libs)
    export_library(model, folder / "model.so", "aarch64")
    (folder / "in.bin").write_bytes(np.ascontiguousarray(x).tobytes())
    q_in = model.inputs[0].quant
    subprocess.run(["qemu-aarch64", "-L", SYSROOT, "-E", f"LD_LIBRARY_PATH={libs}", str(runner),
                    str(folder / "model.so"), str(folder / "in.bin"), str(folder / "out.bin"), str(8 * x.itemsize),
                    str(int(q_in.signed)), *map(str, x.shape)], check=True, timeout=600)
    name = model.outputs[0]
    out_dtype = model.quant_of(name).dtype
    return np.frombuffer((folder / "out.bin").read_bytes(), dtype=out_dtype).reshape((x.shape[0],) + model.shapes[name])
