"""Hand schedules for CPU (TVM's CPU pipeline leaves every function as naive, serial loops).

- export.lower's VNNI convolution (`vnni_conv`): a register tile of output
  columns x 16 channels, one vpdpbusd per input pixel and 4 channels; the
  fused requantization epilogue runs per tile.
- Other convolutions: injective producers and epilogue blocks inlined (into
  the conv, or into the one final epilogue block), the output width moved
  innermost and vectorized, the reduction initialization split off, and the
  (batch, output channel) loops run in parallel; the epilogue is computed
  right after the conv produces a row (a grouped conv: a whole plane, from
  its own padded copy of the input plane). Only int32-accumulating
  convolutions are scheduled (a scheduled int64 window sum of average
  pooling gave wrong results in the parity tests).
- Other functions (requantization, packing, global pooling sums): every
  block inlined into the last, its outer loops parallel, the innermost
  vectorized where it is not a reduction.

Functions with a saturating reduction (saturate at every MAC) are never
touched: their reduction order is the arithmetic. A function the schedule
cannot handle is left as it was.
"""

from __future__ import annotations

import tvm


CONV_BLOCKS = ("conv2d_nchw", "group_conv2d_nchw")


@tvm.transform.module_pass(opt_level=0, name="qftsim.ScheduleConvolutions")
def schedule_convolutions(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    updates = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        names = _block_names(func)
        if any(n.startswith("saturating") for n in names):
            continue
        convs = [n for n in names if n in CONV_BLOCKS]
        if names[:1] == ["vnni_conv"]:
            scheduled = _schedule_vnni(func)
        elif len(convs) == 1:
            scheduled = _schedule(func, convs[0])
        else:
            scheduled = _schedule_elementwise(func)
        if scheduled is not None:
            updates[gvar] = scheduled
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


def _block_names(func) -> list[str]:
    try:
        sch = tvm.s_tir.Schedule(func)
        return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    except Exception:  # noqa: BLE001 - a schedule that does not apply leaves the function as it was
        return []


def _schedule(func, conv_name: str):
    sch = tvm.s_tir.Schedule(func)
    try:
        conv = sch.get_sblock(conv_name)
        if str(sch.get(conv).writes[0].source.dtype) != "int32":
            return None  # only the int8/int16 -> int32 kernels (average pooling's int64 sums stay plain)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        # a grouped conv pads its own input channels per (batch, channel) task, in cache; other
        # producers (and a dense conv's padding) are inlined
        plane_pad = conv_name == "group_conv2d_nchw" and sch.get(blocks[0]).name_hint == "pad_temp"
        for block in blocks[int(plane_pad):]:
            if sch.get(block).name_hint != conv_name and sch.get(block) is not sch.get(blocks[-1]):
                try:
                    sch.compute_inline(block)
                except Exception:  # noqa: BLE001 - a schedule that does not apply leaves the function as it was
                    pass
        epilogue = sch.get_child_blocks(sch.get_sblock("root"))[-1]
        n, oc, oh, ow, rc, ry, rx = sch.get_loops(conv)
        conv_extents = [str(sch.get(loop).extent) for loop in (n, oc, oh, ow)]
        epilogue_extents = [str(sch.get(loop).extent) for loop in sch.get_loops(epilogue)]
        # a grouped conv accumulates its whole output plane (few input channels per group), a dense
        # one row by row
        sch.reorder(n, oc, rc, ry, rx, oh, ow) if plane_pad else sch.reorder(n, oc, oh, rc, ry, rx, ow)
        # parallel and vectorize while the block is still a reduction: decompose_reduction copies both
        task = sch.fuse(n, oc)
        sch.parallel(task)
        _vectorize_constant(sch, ow)
        if plane_pad:
            sch.compute_at(blocks[0], task)
            _vectorize_constant(sch, sch.get_loops(blocks[0])[-1])
        sch.decompose_reduction(conv, rc)
        # per-row epilogue only when it covers exactly the conv's output (a fused pad of the
        # next op covers more: moved under the conv it would leave its border unwritten)
        if sch.get(epilogue).name_hint == conv_name:
            pass
        elif epilogue_extents == conv_extents:
            sch.reverse_compute_at(epilogue, task if plane_pad else oh)
            _vectorize_constant(sch, sch.get_loops(epilogue)[-1])
        else:
            _parallel_and_vectorize(sch, sch.get_loops(epilogue))
        return sch.mod["main"]
    except Exception:  # noqa: BLE001 - a schedule that does not apply leaves the function as it was
        return None


def _schedule_elementwise(func):
    """Producers inlined into the last block and its spatial loops parallel (the innermost vectorized
    where the last block is elementwise; it may also be a plain reduction such as a global sum)."""
    sch = tvm.s_tir.Schedule(func)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 - no root block: leave the function as it was
        return None
    spatial = [sum(iv.iter_type == tvm.tirx.IterVar.DataPar for iv in sch.get(b).iter_vars) for b in blocks]
    if any(n != len(sch.get(b).iter_vars) for b, n in zip(blocks[:-1], spatial)):
        return None  # a reduction before the last block
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
        except Exception:  # noqa: BLE001 - a block that cannot be inlined stays as it is
            pass
    loops = sch.get_loops(blocks[-1])
    if len(loops) != len(sch.get(blocks[-1]).iter_vars):
        return None
    if spatial[-1] < len(loops):  # a reduction: its spatial loops (first in TE's order) in parallel
        if spatial[-1]:
            sch.parallel(sch.fuse(*loops[:spatial[-1]]))
        return sch.mod["main"]
    _parallel_and_vectorize(sch, loops)
    return sch.mod["main"]


def _parallel_and_vectorize(sch, loops) -> None:
    """The outer loops fused and parallel, the next-to-innermost serial (no index division per
    element), the innermost vectorized where its extent is constant."""
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:max(1, len(loops) - 2)]))
    if loops:
        _vectorize_constant(sch, loops[-1])


VNNI_TILE = 16  # output columns kept in registers (16 x 16 int32 sums)


def _schedule_vnni(func):
    """export.lower's NCHW4c x OIHW16o4i conv: one vpdpbusd per (input pixel, 4 channels, 16 outputs).

    A register tile of up to VNNI_TILE output columns x 16 output channels
    accumulates over (input channel blocks, kernel rows, kernel columns);
    (batch, output channel block, output row) run in parallel. The unpacking
    to NCHW and the fused epilogue are inlined into one block computed per
    tile, where it covers exactly the conv's output.
    """
    sch = tvm.s_tir.Schedule(func)
    conv = sch.get_sblock("vnni_conv")
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for block in blocks[1:-1]:
        sch.compute_inline(block)
    epilogue = blocks[-1]
    epilogue_loops = sch.get_loops(epilogue)
    b, o, y, x, i, rc, ry, rx, rk = sch.get_loops(conv)
    per_tile = [str(sch.get(loop).extent) for loop in epilogue_loops[2:]] == [str(sch.get(y).extent),
                                                                              str(sch.get(x).extent)]
    width = int(sch.get(x).extent)
    tile = max(d for d in range(1, min(width, VNNI_TILE) + 1) if width % d == 0)
    xo, xi = sch.split(x, [None, tile])
    sch.reorder(b, o, y, xo, rc, ry, rx, xi, i, rk)
    sch.parallel(sch.fuse(b, o, y))
    if per_tile:
        sch.reverse_compute_at(epilogue, xo)
        _vectorize_constant(sch, sch.get_loops(epilogue)[-1])
    else:
        _parallel_and_vectorize(sch, epilogue_loops)
    init = sch.decompose_reduction(conv, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(i, _vnni_intrinsic())
    sch.unroll(xi)
    return sch.mod["main"]


def _vnni_intrinsic() -> str:
    """C[16] += sum_k A[k] * B[:, k] (u8 x s8 -> s32, k < 4) as one vpdpbusd, registered once.

    TVM's own `dot_16x4_vnni` (same description) passes <16 x i32> operands,
    which LLVM 21 and later reject (the intrinsic now takes <64 x i8>): this
    implementation follows the LLVM that TVM was built with.
    """
    from tvm.s_tir.tensor_intrin.x86 import dot_product_16x4_u8i8i32_desc as description
    from tvm.script import tirx as T

    name = "qftsim_vnni_dot_16x4"
    if tvm.s_tir.TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    operand = "int8x64" if tvm.target.codegen.llvm_version_major() >= 21 else "int32x16"
    a_type = T.Buffer((4,), "uint8", offset_factor=1)
    b_type = T.Buffer((16, 4), "int8", offset_factor=1)
    c_type = T.Buffer((16,), "int32", offset_factor=1)

    @T.prim_func(s_tir=True)
    def implementation(A: a_type, B: b_type, C: c_type) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype=operand),
                T.reinterpret(B.vload([0, 0], dtype="int8x64"), dtype=operand), dtype="int32x16")

    tvm.s_tir.TensorIntrin.register(name, description, implementation)
    return name


def _vectorize_constant(sch, loop) -> None:
    """Vectorize a loop of constant extent (a symbolic one, e.g. the batch, fails in code generation)."""
    if isinstance(sch.get(loop).extent, tvm.tirx.IntImm):
        sch.vectorize(loop)


def pipeline(target):
    """TVM's CPU pipeline with the convolution schedules inserted after operator fusion."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="qftsim.Pipeline")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(
                cpu.library_dispatch_passes(target) + cpu.legalize_passes(target) + [schedule_convolutions]
                + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(mod)

    return _pipeline



