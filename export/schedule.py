"""Hand schedules for the integer convolutions on CPU (TVM's CPU pipeline leaves them as naive loops).

Each fused conv function gets: its injective producers and epilogue blocks
inlined (into the conv, or into the one final epilogue block), the conv's
output width moved innermost and vectorized, the reduction initialization
split off, and the (batch, output channel) loops run in parallel; the
epilogue is computed per output row right after the conv produces it.
Functions with a saturating reduction (saturate at every MAC) are never
touched: their reduction order is the arithmetic. A function the schedule
cannot handle is left as it was, and only int32-accumulating convolutions
are scheduled (a scheduled int64 window sum of average pooling gave wrong
results in the parity tests).
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
        convs = [n for n in names if n in CONV_BLOCKS]
        if len(convs) == 1 and not any(n.startswith("saturating") for n in names):
            scheduled = _schedule(func, convs[0])
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
        for block in blocks:
            if sch.get(block).name_hint != conv_name and sch.get(block) is not sch.get(blocks[-1]):
                try:
                    sch.compute_inline(block)
                except Exception:  # noqa: BLE001 - a schedule that does not apply leaves the function as it was
                    pass
        epilogue = sch.get_child_blocks(sch.get_sblock("root"))[-1]
        n, oc, oh, ow, rc, ry, rx = sch.get_loops(conv)
        conv_extents = [str(sch.get(loop).extent) for loop in (n, oc, oh, ow)]
        epilogue_extents = [str(sch.get(loop).extent) for loop in sch.get_loops(epilogue)]
        sch.reorder(n, oc, oh, rc, ry, rx, ow)
        # parallel and vectorize while the block is still a reduction: decompose_reduction copies both
        sch.parallel(sch.fuse(n, oc))
        _vectorize_constant(sch, ow)
        sch.decompose_reduction(conv, rc)
        # per-row epilogue only when it covers exactly the conv's output (a fused pad of the
        # next op covers more: moved under the conv it would leave its border unwritten)
        if sch.get(epilogue).name_hint != conv_name and epilogue_extents == conv_extents:
            sch.reverse_compute_at(epilogue, oh)
            _vectorize_constant(sch, sch.get_loops(epilogue)[-1])
        return sch.mod["main"]
    except Exception:  # noqa: BLE001 - a schedule that does not apply leaves the function as it was
        return None


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



