"""Tests for slbi_triton.train.models: output shapes, parameter layout, build_model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slbi_triton.train.models import MODEL_NAMES, LeNet, ResNet20, ShortcutA, build_model


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_logits_shape_and_gradients(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    images = torch.rand(3, 1, 28, 28)
    logits = model(images)
    assert logits.shape == (3, 10)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_eval_mode_single_image(name: str) -> None:
    model = build_model(name).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_lenet_parameter_shapes() -> None:
    shapes = {name: tuple(p.shape) for name, p in LeNet().named_parameters()}
    assert shapes == {
        "conv1.weight": (6, 1, 5, 5),
        "conv1.bias": (6,),
        "conv2.weight": (16, 6, 5, 5),
        "conv2.bias": (16,),
        "conv3.weight": (120, 16, 5, 5),
        "conv3.bias": (120,),
        "fc1.weight": (84, 120),
        "fc1.bias": (84,),
        "fc2.weight": (10, 84),
        "fc2.bias": (10,),
    }


def test_resnet20_layout() -> None:
    model = ResNet20()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 20
    assert len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]) == 19
    assert shapes["conv1.weight"] == (16, 1, 3, 3)
    assert shapes["layer1.2.conv2.weight"] == (16, 16, 3, 3)
    assert shapes["layer2.0.conv1.weight"] == (32, 16, 3, 3)
    assert shapes["layer3.2.conv2.weight"] == (64, 64, 3, 3)
    assert shapes["fc.weight"] == (10, 64)
    # Option-A shortcuts add no parameters: the CIFAR count minus 2 input channels' stem.
    assert sum(p.numel() for p in model.parameters()) == 269_722 - 16 * 2 * 9


def test_resnet20_downsampling_shortcut_pads_channels() -> None:
    block = ResNet20().layer2[0]
    inputs = torch.rand(2, 16, 28, 28)
    shortcut = block.shortcut(inputs)
    assert shortcut.shape == (2, 32, 14, 14)
    torch.testing.assert_close(shortcut[:, 8:24], inputs[:, :, ::2, ::2])
    assert shortcut[:, :8].abs().sum() == 0 and shortcut[:, 24:].abs().sum() == 0


def test_build_model_names_and_classes() -> None:
    assert isinstance(build_model("LeNet"), LeNet)
    assert isinstance(build_model("resnet-20"), ResNet20)
    assert build_model("lenet", num_classes=3)(torch.rand(2, 1, 28, 28)).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown model 'vgg16'"):
        build_model("vgg16")


def _option_a_with_pad(inputs: torch.Tensor, stride: int, extra: int) -> torch.Tensor:
    """The option-A shortcut as BasicBlock wrote it with F.pad before ShortcutA."""
    if stride != 1:
        inputs = inputs[:, :, ::stride, ::stride]
    half = extra // 2
    return nn.functional.pad(inputs, (0, 0, 0, 0, half, extra - half))


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "stride"), [(16, 32, 2), (32, 64, 2), (5, 8, 3), (4, 4, 2)]
)
def test_shortcut_a_is_the_padded_shortcut(in_channels: int, out_channels: int, stride: int) -> None:
    inputs = torch.randn(2, in_channels, 7, 9)
    shortcut = ShortcutA(in_channels, out_channels, stride)
    expected = _option_a_with_pad(inputs, stride, out_channels - in_channels)
    assert torch.equal(shortcut(inputs), expected)
    assert list(shortcut.parameters()) == [] and shortcut.state_dict() == {}


def test_resnet20_checkpoints_are_unchanged_by_shortcut_modules() -> None:
    model = ResNet20()
    keys = list(model.state_dict())
    assert not any("shortcut" in key for key in keys)
    assert len(keys) == 19 + 19 * 5 + 2  # conv weights, BatchNorm (4 tensors + count), fc
    assert isinstance(model.layer2[0].shortcut, ShortcutA) and isinstance(
        model.layer1[0].shortcut, nn.Identity
    )
    model.to(torch.float64)
    assert model.layer3[0].shortcut.source.dtype == torch.int64  # channel map, not a weight
    assert model(torch.rand(2, 1, 28, 28, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="cannot drop channels"):
        ShortcutA(8, 4, 2)
