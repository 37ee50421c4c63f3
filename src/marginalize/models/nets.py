"""Plain ``torch.nn`` networks for examples, tests and the scale benchmark.

These are ordinary modules (no priors): wrap one with :func:`marginalize.models.bayesian` to
make it a Pyro BNN, as you would your own network.

:func:`resnet` is the CIFAR ResNet of He et al. 2016 ("Deep Residual Learning for Image
Recognition", Sec. 4.2): a 3x3 convolution with ``width`` channels, three stages of ``n``
basic blocks (two 3x3 convolutions, each followed by BatchNorm, ReLU after the sum) with
``width``, ``2 width`` and ``4 width`` channels and stride 2 at the start of the second and
third stage, global average pooling and a linear classifier; depth ``6 n + 2``. Shortcuts that
change the shape subsample by 2 and pad the new channels with zeros (the paper's option A, no
parameters), so ResNet-20 has 269,722 parameters with 10 classes, as in the paper's Table 6
(0.27M).

Examples
--------
>>> import torch
>>> net = resnet(20)
>>> sum(p.numel() for p in net.parameters())
269722
>>> net(torch.randn(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from marginalize._validation import plain_number
from marginalize.errors import ModelError

__all__ = ["BasicBlock", "resnet"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or zero-padded) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride = stride
        self.pad = c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.stride != 1:
            short = short[:, :, :: self.stride, :: self.stride]
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + short)


class _ResNet(nn.Module):
    def __init__(self, n: int, num_classes: int, width: int, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, c = [], width
        for stage in range(3):
            c_out = width * 2**stage
            for k in range(n):
                blocks.append(BasicBlock(c, c_out, 2 if stage and k == 0 else 1))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.blocks(h)
        return self.fc(h.mean((2, 3)))


def resnet(
    depth: int = 20, num_classes: int = 10, *, width: int = 16, in_channels: int = 3
) -> nn.Module:
    """The CIFAR ResNet of He et al. 2016 with ``depth = 6 n + 2`` layers (see the module).

    Parameters
    ----------
    depth : int
        20, 32, 44, 56, 110, ... (``6 n + 2``); 8 gives one block per stage (tests).
    num_classes : int
        Outputs (logits).
    width : int
        Channels of the first stage (16 in the paper).
    in_channels : int
        Image channels (3 for RGB).

    Returns
    -------
    torch.nn.Module
        Maps images ``(N, in_channels, H, W)`` to logits ``(N, num_classes)``.

    Raises
    ------
    ModelError
        A depth that is not ``6 n + 2`` with ``n >= 1``.
    """
    depth, num_classes, width, in_channels = map(
        plain_number, (depth, num_classes, width, in_channels)
    )  # NumPy integers (and 0-d arrays/tensors) as Python ints
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ModelError(f"depth: expected 6 n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth!r}")
    return _ResNet((depth - 2) // 6, num_classes, width, in_channels)
