"""Small integer CNNs with random weights, for speed benchmarks and format tests.

`random_cnn` returns an IntModel and the float torch network of the same
shape, so the two can be timed side by side.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qftsim import arith
from qftsim.intmodel import IntModel, ModelInput, Node, TensorQuant
from qftsim.profile import HardwareProfile, load_profile


def random_cnn(profile: HardwareProfile | str = "int8-default", channels: int = 32, size: int = 32,
               in_channels: int = 3, classes: int = 10, depthwise: bool = False, seed: int = 0):
    """Three 3x3 convs (+ReLU), global average pool, linear: (IntModel, float nn.Module)."""
    p = load_profile(profile)
    rng = np.random.default_rng(seed)
    a = p.activations
    relu_signed = a.signed is True
    signed = a.signed is not False
    mid = 0 if signed or a.symmetric else 2 ** (a.bits - 1)
    q_in = TensorQuant(a.bits, signed, mid, 1.0 / 2 ** (a.bits - 2))
    nodes, layers = [], []
    prev, prev_q, c_in = "x", q_in, in_channels
    specs = [(channels, 1), (channels, channels if depthwise else 1), (channels, 1)]
    for i, (c_out, groups) in enumerate(specs):
        q_out = TensorQuant(a.bits, relu_signed, 0, 0.05)
        w = rng.integers(p.weights.qmin, p.weights.qmax + 1, size=(c_out, c_in // groups, 3, 3)).astype(np.int8)
        m, t = _multipliers(p, c_out, prev_q, w)
        nodes.append(Node(f"conv{i}", "conv2d", [prev], q_out,
                          {"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": groups,
                           "clamp": [q_out.zero_point, q_out.qmax]},
                          {"weight": w, "bias": rng.integers(-100, 100, size=c_out).astype(np.int32),
                           "multiplier": m, "shift": t}))
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups), nn.ReLU()]
        prev, prev_q, c_in = f"conv{i}", q_out, c_out
    nodes.append(Node("pool", "avgpool2d", [prev], prev_q, {"kernel": [size, size], "stride": [1, 1]}))
    nodes.append(Node("flat", "reshape", ["pool"], prev_q, {"shape": [-1]}))
    q_logits = TensorQuant(a.bits, signed, mid, 0.1)
    w = rng.integers(p.weights.qmin, p.weights.qmax + 1, size=(classes, c_in)).astype(np.int8)
    m, t = _multipliers(p, classes, prev_q, w)
    nodes.append(Node("fc", "linear", ["flat"], q_logits, {"clamp": [q_logits.qmin, q_logits.qmax]},
                      {"weight": w, "bias": np.zeros(classes, dtype=np.int32), "multiplier": m, "shift": t}))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    model = IntModel(p, [ModelInput("x", (in_channels, size, size), q_in)], nodes, ["fc"])
    return model, nn.Sequential(*layers).eval()


def _multipliers(p: HardwareProfile, out_channels: int, q_in: TensorQuant, w: np.ndarray):
    """Per-channel multipliers that map a typical accumulator onto the output range."""
    per_row = w[0].size
    spread = max(q_in.qmax - q_in.zero_point, q_in.zero_point - q_in.qmin) * max(abs(p.weights.qmin), 1)
    real = (2 ** (p.activations.bits - 1)) / (spread * np.sqrt(per_row))
    count = out_channels if p.requant.per_channel else 1
    pairs = [arith.quantize_multiplier(real, p.requant.multiplier_bits, p.requant.shift_range)] * count
    return (np.array([m for m, _ in pairs], dtype=np.int32), np.array([t for _, t in pairs], dtype=np.int32))
