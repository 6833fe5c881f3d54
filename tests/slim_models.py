"""Models for the slim tests: ResNet-18 in torchvision's layout, and helpers that give a
model an SLBI support without training.

torchvision's wheel for this torch is CUDA-only, so ``ResNet18`` re-writes
``torchvision.models.resnet18``: the same module names, shapes and forward (in-place
ReLU, ``out += identity``, option-B downsampling by a 1x1 conv and BatchNorm).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slbi_triton import SLBI

from .helpers import all_params


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision's ``resnet18(num_classes=...)``: 7x7 stem, max-pool, four stages of two
    blocks (64, 128, 256, 512 channels), average pool, linear classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample), BasicBlock(planes, planes)]
        self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@torch.no_grad()
def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm trained-looking affine parameters and running statistics, and
    every bias a value, so that removed channels leave non-zero constants behind."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.weight.copy_(0.5 + torch.rand(size, generator=generator))
            module.bias.copy_(0.5 * torch.randn(size, generator=generator))
            module.running_mean.copy_(0.5 * torch.randn(size, generator=generator))
            module.running_var.copy_(0.5 + 1.5 * torch.rand(size, generator=generator))
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))


def set_support(opt: SLBI, outside: dict[str, list[int]], scale: float = 3.0) -> None:
    """Make ``opt``'s Z select every filter / neuron of its penalised layers except the
    ``outside`` ones (by layer name), through the public state dict: Z = ``scale`` · W_g /
    ‖W_g‖ for group layers, ``scale`` · sign(W) for l1 layers (in the support for
    λ < ``scale``), a tenth of that outside."""
    state = opt.state_dict()
    params = all_params(opt)
    kinds = {row.name: row.kind for row in opt.sparsity()}
    for index, (name, param) in enumerate(zip(opt.names, params, strict=True)):
        weight = param.detach()
        if kinds.get(name) == "group":
            norms = weight.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (weight.dim() - 1)))
            z = scale * weight / norms
        elif kinds.get(name) == "l1":
            z = scale * weight.sign()
        else:
            continue
        z[outside.get(name, [])] *= 0.1
        state["state"][index]["z"] = z
        state["state"][index].pop("group_norms", None)  # recomputed from Z by load_state_dict
    opt.load_state_dict(state)


def random_outside(
    opt: SLBI, share: float, seed: int = 0, keep: tuple[str, ...] = ()
) -> dict[str, list[int]]:
    """A random ``share`` of the filters / neurons of every penalised layer (but ``keep``)."""
    generator = torch.Generator().manual_seed(seed)
    params = all_params(opt)
    kinds = {row.name: row.kind for row in opt.sparsity()}
    outside = {}
    for name, param in zip(opt.names, params, strict=True):
        if name in kinds and name not in keep:
            chosen = torch.rand(param.shape[0], generator=generator) < share
            outside[name] = chosen.nonzero().flatten().tolist()
    return outside
