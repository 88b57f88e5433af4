"""What the writers for outside engines (export.tflite, export.onnx) share: which shipped engine profile a
model's profile is, the float32 weight scales from which an engine derives a node's multipliers, and the
comparison of a node with what importing the written file gives back."""

from __future__ import annotations

import dataclasses

import numpy as np

from qftsim.errors import QftsimError
from qftsim.importers import engine_multipliers
from qftsim.intmodel import Node
from qftsim.profile import ARITHMETIC_OPS, list_profiles, load_profile

WEIGHT_SCALE_SEARCH = 64  # float32 steps tried on each side of the weight scale a multiplier implies


def _leaves(d: dict, prefix: str = "") -> dict:
    """A profile's plain-data form flattened to {"section.key": value} (name and description left out)."""
    out = {}
    for key, value in d.items():
        if key in ("name", "description"):
            continue
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resolved_leaves(profile) -> dict:
    """Every field of a profile, each op's arithmetic resolved (what it states or the global default)."""
    data = {k: v for k, v in profile.to_dict().items() if k != "arithmetic"}
    data["arithmetic"] = {op: dataclasses.asdict(profile.arithmetic(op)) for op in ARITHMETIC_OPS}
    return _leaves(data)


def shipped_profile_of(profile, prefix: str, engine: str) -> str:
    """The shipped profile named `prefix`... whose arithmetic `profile` is, or a one-line refusal naming the
    first field that keeps the engine's kernels from running it (against the closest such profile)."""
    mine = _resolved_leaves(profile)
    differences = []
    for name in (p for p in list_profiles() if p.startswith(prefix)):
        theirs = _resolved_leaves(load_profile(name))
        fields = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        if not fields:
            return name
        differences.append((len(fields), name, fields[0], theirs.get(fields[0])))
    _, name, field, theirs = min(differences)
    raise QftsimError(f"profile {profile.name}: {engine} cannot run it: {field} is {mine.get(field)!r}, {engine}'s "
                      f"kernels ({name}, the closest profile) have {theirs!r}")


def engine_weight_scales(profile, node: Node, kind: str, s_in: float) -> np.ndarray:
    """Per-channel float32 weight scales from which the profile's engine derives the node's own multipliers
    (qftsim.importers.engine_multipliers, solved for the weight scale by a search around its estimate)."""
    m, t = node.arrays["multiplier"], node.arrays["shift"]
    channels = node.arrays["weight"].shape[0]
    m, t = np.broadcast_to(m, (channels,)), np.broadcast_to(t, (channels,))
    real = m.astype(np.float64) * np.ldexp(1.0, -t.astype(np.int64))
    estimate = (real * np.float64(np.float32(node.quant.scale)) / np.float64(np.float32(s_in))).astype(np.float32)
    found = np.zeros(channels, dtype=np.float32)
    missing = np.ones(channels, dtype=bool)
    for step in sorted(range(-WEIGHT_SCALE_SEARCH, WEIGHT_SCALE_SEARCH + 1), key=abs):
        candidate = (estimate.view(np.int32) + np.int32(step)).view(np.float32)
        got_m, got_t = engine_multipliers(profile, kind, s_in, candidate, node.quant.scale)
        hit = missing & (got_m == m) & (got_t == t)
        found[hit], missing[hit] = candidate[hit], False
        if not missing.any():
            return found
    raise QftsimError(f"node {node.name!r} ({node.op}): no float32 weight scale gives its multiplier "
                      f"{int(m[missing][0])} * 2^-{int(t[missing][0])} under the engine's derivation (channel "
                      f"{int(np.argmax(missing))})")


def node_differences(node: Node, shape: tuple, theirs: Node, their_shape: tuple, ignore: tuple = ()) -> list[str]:
    """What differs between a node and the one importing its written form gave back (empty: the same
    integers): op, quantization, shape, attributes (but `ignore`d ones) and arrays."""
    changed = [k for k, v in node.attrs.items() if theirs.attrs.get(k) != v and k not in ("shape", *ignore) and not (
        k == "count_include_pad" and node.attrs["padding"] == [0, 0, 0, 0])]
    if shape != their_shape:
        changed.append("shape")
    changed += [k for k, v in node.arrays.items() if not np.array_equal(theirs.arrays.get(k), v)]
    if theirs.op != node.op:
        changed.append("op")
    if theirs.quant != node.quant:
        changed.append("quantization")
    return changed
