"""The networks trained in the demo: LeNet-5 and a CIFAR-style ResNet-20.

Both take ``N x 1 x 28 x 28`` images (MNIST / Fashion-MNIST) and return
``N x num_classes`` logits. No torchvision dependency.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn

MODEL_NAMES = ("lenet", "resnet20")
"""Names accepted by :func:`build_model`."""


class LeNet(nn.Module):
    """LeNet-5 with three convolutions and two fully connected layers.

    ``conv1`` 1->6 (5x5, padding 2) -> ReLU -> max-pool 2; ``conv2`` 6->16 (5x5)
    -> ReLU -> max-pool 2; ``conv3`` 16->120 (5x5) -> ReLU; ``fc1`` 120->84 ->
    ReLU; ``fc2`` 84->num_classes. On 28x28 input the feature maps are
    28 -> 14 -> 10 -> 5 -> 1.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.conv3 = nn.Conv2d(16, 120, kernel_size=5)
        self.fc1 = nn.Linear(120, 84)
        self.fc2 = nn.Linear(84, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map ``N x 1 x 28 x 28`` images to ``N x num_classes`` logits."""
        features = F.max_pool2d(F.relu(self.conv1(images)), 2)
        features = F.max_pool2d(F.relu(self.conv2(features)), 2)
        features = F.relu(self.conv3(features)).flatten(1)
        return self.fc2(F.relu(self.fc1(features)))


class ShortcutA(nn.Module):
    """The option-A shortcut of He et al.'s CIFAR ResNets as a module: subsample by
    ``stride``, then copy input channel ``source[j]`` to output channel ``j`` (``-1``: a
    zero channel).

    Built with ``out_channels > in_channels`` it zero-pads ``(out - in) // 2`` channels
    before the input's and the rest after, like ``F.pad``. It holds no parameters and no
    persistent buffers, so checkpoints do not change; as a module with a channel map it
    is a node that :mod:`slbi_triton.slimming` can follow and prune (a channel router: an
    ``in_channels`` attribute and a ``source`` buffer), where a traced ``F.pad`` would be
    read as an elementwise op.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ShortcutA cannot drop channels: {in_channels} -> {out_channels}")
        self.in_channels = in_channels
        self.stride = stride
        before = (out_channels - in_channels) // 2
        after = out_channels - in_channels - before
        source = torch.cat([torch.full((before,), -1), torch.arange(in_channels), torch.full((after,), -1)])
        self.register_buffer("source", source, persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Map ``N x in_channels x H x W`` to ``N x len(source) x ceil(H/stride) x ceil(W/stride)``."""
        if self.stride != 1:
            inputs = inputs[:, :, :: self.stride, :: self.stride]
        # One zero channel after the inputs, read by every output channel whose source is -1.
        padded = F.pad(inputs, (0, 0, 0, 0, 0, 1))
        return padded.index_select(1, torch.where(self.source < 0, self.in_channels, self.source))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {len(self.source)}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity (option A) shortcut.

    When the block halves the resolution and widens the channels, the shortcut
    (:class:`ShortcutA`) subsamples by 2 and zero-pads the new channels, as in He et al.'s
    CIFAR ResNets, so it adds no parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        identity = stride == 1 and out_channels == in_channels
        self.shortcut: nn.Module = nn.Identity() if identity else ShortcutA(in_channels, out_channels, stride)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Residual update ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        residual = F.relu(self.bn1(self.conv1(inputs)))
        residual = self.bn2(self.conv2(residual))
        return F.relu(residual + self.shortcut(inputs))


class ResNet20(nn.Module):
    """ResNet-20 of He et al. (2016, CIFAR variant) for 1-channel 28x28 input.

    A 3x3 conv stem (16 channels), three stages of three :class:`BasicBlock`
    each with 16, 32 and 64 channels (the second and third stages start with
    stride 2: 28 -> 14 -> 7), global average pooling and a linear classifier:
    19 conv layers + 1 fully connected layer.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, 3, stride=1)
        self.layer2 = self._stage(16, 32, 3, stride=2)
        self.layer3 = self._stage(32, 64, 3, stride=2)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map ``N x 1 x 28 x 28`` images to ``N x num_classes`` logits."""
        features = F.relu(self.bn1(self.conv1(images)))
        features = self.layer3(self.layer2(self.layer1(features)))
        return self.fc(F.adaptive_avg_pool2d(features, 1).flatten(1))


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build a freshly initialised model by name.

    Args:
        name: ``"lenet"`` or ``"resnet20"`` (case-insensitive; ``resnet-20`` also works).
        num_classes: Number of output logits.

    Returns:
        The model, in training mode.

    Raises:
        ValueError: Unknown model name.
    """
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key == "lenet":
        return LeNet(num_classes)
    if key == "resnet20":
        return ResNet20(num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
