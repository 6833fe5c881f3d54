"""Tests for slbi_triton.train.models: output shapes, parameter layout, build_model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slbi_triton.train.models import MODEL_NAMES, LeNet, ResNet20, build_model


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
    shortcut = block._shortcut(inputs)
    assert shortcut.shape == (2, 32, 14, 14)
    torch.testing.assert_close(shortcut[:, 8:24], inputs[:, :, ::2, ::2])
    assert shortcut[:, :8].abs().sum() == 0 and shortcut[:, 24:].abs().sum() == 0


def test_build_model_names_and_classes() -> None:
    assert isinstance(build_model("LeNet"), LeNet)
    assert isinstance(build_model("resnet-20"), ResNet20)
    assert build_model("lenet", num_classes=3)(torch.rand(2, 1, 28, 28)).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown model 'vgg16'"):
        build_model("vgg16")
