"""Benchmark parameter sets built from shapes alone.

Every set is a list of ``(name, shape)`` pairs, named and ordered as ``named_parameters()`` of
the corresponding model would give them, so benchmarks exercise the optimizer on realistic
tensor populations without torchvision, timm or a forward pass. ``make_params`` materialises
a set as ``nn.Parameter`` objects with random values and random gradients; a
:class:`SetSpec` is a set to benchmark (``"resnet50@bfloat16"``: :func:`named_set`), or a
point of a tensor count × size sweep (:func:`sweep_grid`).

Every set function takes ``scale``: an integer divisor of all hidden widths (channels,
embedding and MLP sizes), so CI can run the same topology at tiny sizes (see
``QUICK_SCALE``). Input channels, class counts, kernel sizes, depth and token counts are
kept. At ``scale=1`` the sets match the reference models exactly:

================  ============  =============================================
set               parameters    reference
================  ============  =============================================
``lenet5``            61,706    the FuSplit-LBI toolbox's ``lenet.Net``
``resnet20``         269,722    CIFAR ResNet-20 (He et al.), option-A shortcut
``resnet18``      11,689,512    ``torchvision.models.resnet18()``
``resnet50``      25,557,032    ``torchvision.models.resnet50()``
``vit_b16``       86,567,656    ``timm`` ``vit_base_patch16_224``
================  ============  =============================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

Shape = tuple[int, ...]
ParamShapes = list[tuple[str, Shape]]

QUICK_SCALE = 16
"""Width divisor for the "quick" variant of every set (CI-sized tensors)."""


def _check_scale(scale: int) -> None:
    """Raise ``ValueError`` unless ``scale`` is a positive integer."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")


def _width(channels: int, scale: int) -> int:
    """A hidden width divided by ``scale``, at least 1."""
    return max(1, channels // scale)


def _conv(name: str, c_out: int, c_in: int, k: int, bias: bool = False) -> ParamShapes:
    """Parameters of ``nn.Conv2d(c_in, c_out, k, bias=bias)`` registered as ``name``."""
    shapes: ParamShapes = [(f"{name}.weight", (c_out, c_in, k, k))]
    if bias:
        shapes.append((f"{name}.bias", (c_out,)))
    return shapes


def _affine(name: str, features: int) -> ParamShapes:
    """Parameters of a ``BatchNorm``/``LayerNorm`` with ``features`` channels."""
    return [(f"{name}.weight", (features,)), (f"{name}.bias", (features,))]


def _linear(name: str, out_features: int, in_features: int) -> ParamShapes:
    """Parameters of ``nn.Linear(in_features, out_features)`` registered as ``name``."""
    return [(f"{name}.weight", (out_features, in_features)), (f"{name}.bias", (out_features,))]


def lenet5(scale: int = 1) -> ParamShapes:
    """LeNet-5 as in the FuSplit-LBI toolbox (``lenet.Net``; MNIST, 1 input channel).

    conv 1→6 5×5, conv 6→16 5×5, conv 16→120 5×5, fc 120→84, fc 84→10, all with biases.
    """
    _check_scale(scale)
    c1, c2, c3, f1 = (_width(c, scale) for c in (6, 16, 120, 84))
    return [
        *_conv("conv1", c1, 1, 5, bias=True),
        *_conv("conv2", c2, c1, 5, bias=True),
        *_conv("conv3", c3, c2, 5, bias=True),
        *_linear("fc1", f1, c3),
        *_linear("fc2", 10, f1),
    ]


def resnet20(scale: int = 1) -> ParamShapes:
    """CIFAR-10 ResNet-20: 16/32/64 channels, 3 basic blocks per stage, ``fc`` 64→10.

    Convolutions have no bias; every convolution is followed by a BatchNorm (weight and
    bias). Shortcuts are parameter-free (the paper's option A, zero-padded identity).
    """
    _check_scale(scale)
    shapes = [*_conv("conv1", _width(16, scale), 3, 3), *_affine("bn1", _width(16, scale))]
    in_planes = _width(16, scale)
    for stage, planes in enumerate((16, 32, 64), start=1):
        width = _width(planes, scale)
        for block in range(3):
            prefix = f"layer{stage}.{block}"
            shapes += _conv(f"{prefix}.conv1", width, in_planes, 3)
            shapes += _affine(f"{prefix}.bn1", width)
            shapes += _conv(f"{prefix}.conv2", width, width, 3)
            shapes += _affine(f"{prefix}.bn2", width)
            in_planes = width
    return shapes + _linear("fc", 10, in_planes)


def _resnet_imagenet(bottleneck: bool, blocks: Sequence[int], scale: int) -> ParamShapes:
    """torchvision's ImageNet ResNet (v1.5 layout) parameter shapes, 1000 classes."""
    _check_scale(scale)
    expansion = 4 if bottleneck else 1
    in_planes = _width(64, scale)
    shapes = [*_conv("conv1", in_planes, 3, 7), *_affine("bn1", in_planes)]
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
        width = _width(planes, scale)
        out_planes = width * expansion
        for block in range(count):
            prefix = f"layer{stage}.{block}"
            if bottleneck:
                shapes += _conv(f"{prefix}.conv1", width, in_planes, 1)
                shapes += _affine(f"{prefix}.bn1", width)
                shapes += _conv(f"{prefix}.conv2", width, width, 3)
                shapes += _affine(f"{prefix}.bn2", width)
                shapes += _conv(f"{prefix}.conv3", out_planes, width, 1)
                shapes += _affine(f"{prefix}.bn3", out_planes)
            else:
                shapes += _conv(f"{prefix}.conv1", width, in_planes, 3)
                shapes += _affine(f"{prefix}.bn1", width)
                shapes += _conv(f"{prefix}.conv2", width, width, 3)
                shapes += _affine(f"{prefix}.bn2", width)
            strided = block == 0 and stage > 1
            if strided or in_planes != out_planes:
                shapes += _conv(f"{prefix}.downsample.0", out_planes, in_planes, 1)
                shapes += _affine(f"{prefix}.downsample.1", out_planes)
            in_planes = out_planes
    return shapes + _linear("fc", 1000, in_planes)


def resnet18(scale: int = 1) -> ParamShapes:
    """``torchvision.models.resnet18()``: basic blocks [2, 2, 2, 2], 11,689,512 parameters."""
    return _resnet_imagenet(bottleneck=False, blocks=(2, 2, 2, 2), scale=scale)


def resnet50(scale: int = 1) -> ParamShapes:
    """``torchvision.models.resnet50()``: bottlenecks [3, 4, 6, 3], 25,557,032 parameters."""
    return _resnet_imagenet(bottleneck=True, blocks=(3, 4, 6, 3), scale=scale)


def vit_b16(scale: int = 1) -> ParamShapes:
    """ViT-B/16 at 224×224 with timm's names (``vit_base_patch16_224``), 86,567,656 params.

    Patch embedding conv 768×3×16×16 (+bias), class token 1×1×768, position embedding
    1×197×768, 12 pre-norm blocks (LayerNorm, qkv 2304×768, proj 768×768, MLP 768→3072→768,
    all with biases), final LayerNorm and a 1000-way head.
    """
    _check_scale(scale)
    dim = _width(768, scale)
    hidden = 4 * dim
    tokens = (224 // 16) ** 2 + 1
    shapes: ParamShapes = [
        ("cls_token", (1, 1, dim)),
        ("pos_embed", (1, tokens, dim)),
        *_conv("patch_embed.proj", dim, 3, 16, bias=True),
    ]
    for block in range(12):
        prefix = f"blocks.{block}"
        shapes += _affine(f"{prefix}.norm1", dim)
        shapes += _linear(f"{prefix}.attn.qkv", 3 * dim, dim)
        shapes += _linear(f"{prefix}.attn.proj", dim, dim)
        shapes += _affine(f"{prefix}.norm2", dim)
        shapes += _linear(f"{prefix}.mlp.fc1", hidden, dim)
        shapes += _linear(f"{prefix}.mlp.fc2", dim, hidden)
    return shapes + _affine("norm", dim) + _linear("head", 1000, dim)


PARAM_SETS: dict[str, Callable[..., ParamShapes]] = {
    "lenet5": lenet5,
    "resnet20": resnet20,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vit_b16": vit_b16,
}
"""Set name → function ``(scale: int = 1) -> ParamShapes``."""


def _best_factorisation(numel: int, inner: int) -> tuple[int, int]:
    """Near-square ``(rows, cols)`` with ``rows * cols * inner`` as close to ``numel`` as possible.

    Rows range over a window of aspect ratios up to 16:1 around the square root; ties in
    the error go to the squarer shape.
    """
    target = numel / inner
    root = math.sqrt(target)
    best: tuple[int, int] | None = None
    best_key: tuple[float, float] = (math.inf, math.inf)
    for rows in range(max(1, math.floor(root / 4)), math.ceil(root * 4) + 1):
        cols = max(1, round(target / rows))
        key = (abs(rows * cols * inner - numel), abs(math.log(rows / cols)))
        if key < best_key:
            best, best_key = (rows, cols), key
    assert best is not None
    return best


def sweep_set(count: int, numel: int) -> ParamShapes:
    """``count`` weight tensors of about ``numel`` elements each, for size sweeps.

    Even indices are conv-like 4-D shapes ``(c_out, c_in, k, k)`` (group penalty under
    ``"auto"``), odd indices 2-D shapes ``(out, in)`` (l1 penalty); both near square. The
    kernel is 3×3 when that gets within 0.1% of ``numel``, otherwise 1×1, which has the
    same element count as the 2-D shape: exact whenever ``numel`` has a divisor within 16:1
    of square, and always within 1% for ``numel`` ≥ 100 (1.5% below that).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel must be a positive int, got {numel!r}")
    rows, cols = _best_factorisation(numel, 1)
    c_out, c_in = _best_factorisation(numel, 9)
    if abs(c_out * c_in * 9 - numel) <= 1e-3 * numel:
        conv_shape: Shape = (c_out, c_in, 3, 3)
    else:
        conv_shape = (rows, cols, 1, 1)
    return [(f"sweep.{i}.weight", conv_shape if i % 2 == 0 else (rows, cols)) for i in range(count)]


def penalty_of(shape: Sequence[int]) -> str:
    """The penalty ``penalty="auto"`` gives a tensor of ``shape`` (docs/design.md): group
    for ≥ 3-D, l1 for 2-D, none otherwise."""
    if len(shape) >= 3:
        return "group"
    return "l1" if len(shape) == 2 else "none"


def numel_of(shapes: ParamShapes) -> int:
    """Total number of elements in a parameter set."""
    return sum(math.prod(shape) for _, shape in shapes)


def make_params(
    shapes: ParamShapes,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[tuple[str, torch.nn.Parameter]]:
    """Materialise a parameter set: standard-normal values and a standard-normal ``.grad``.

    Values are drawn from a generator on ``device`` seeded with ``seed``, so a given
    ``(shapes, device, dtype, seed)`` always gives the same tensors.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    params = []
    for name, shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=generator, device=device, dtype=dtype))
        param.grad = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        params.append((name, param))
    return params


# -- benchmark specifications ------------------------------------------------------------


@dataclass(frozen=True)
class SetSpec:
    """A parameter set to benchmark: its name, shapes and dtype."""

    name: str
    shapes: ParamShapes = field(repr=False)
    dtype: torch.dtype = torch.float32

    @property
    def label(self) -> str:
        """``name``, with ``@dtype`` appended when it is not float32."""
        if self.dtype == torch.float32:
            return self.name
        return f"{self.name}@{str(self.dtype).removeprefix('torch.')}"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    """``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def size_label(numel: int) -> str:
    """``1024`` → ``"1K"``, ``4194304`` → ``"4M"`` (binary prefixes)."""
    for unit, shift in (("M", 20), ("K", 10)):
        if numel >= 1 << shift and numel % (1 << shift) == 0:
            return f"{numel >> shift}{unit}"
    return str(numel)


def named_set(spec: str, scale: int = 1) -> SetSpec:
    """A named set, ``"resnet50"`` or ``"resnet50@bfloat16"``, at width divisor ``scale``."""
    name, _, dtype = spec.partition("@")
    if name not in PARAM_SETS:
        raise ValueError(f"unknown parameter set {name!r}; known: {sorted(PARAM_SETS)}")
    return SetSpec(name, PARAM_SETS[name](scale=scale), parse_dtype(dtype) if dtype else torch.float32)


def sweep_grid(counts: Iterable[int], sizes: Iterable[int], max_total: int) -> list[SetSpec]:
    """Sweep sets ``count × size`` with at most ``max_total`` elements in all."""
    specs = []
    for count in counts:
        for size in sizes:
            if count * size <= max_total:
                specs.append(SetSpec(f"sweep/{count}x{size_label(size)}", sweep_set(count, size)))
    return specs


CPU_SWEEP = {"counts": (10, 100, 1000), "sizes": (1 << 10, 1 << 15, 1 << 22), "max_total": 48 << 20}
"""The CPU sweep: 7 points up to 48M elements (2 cores, 24 GiB shared)."""
GPU_SWEEP = {"counts": (10, 100, 1000), "sizes": (1 << 10, 1 << 14, 1 << 18, 1 << 22), "max_total": 512 << 20}
"""The GPU sweep: 11 points up to 512M elements."""
QUICK_SWEEP = {"counts": (10, 100), "sizes": (1 << 6, 1 << 10), "max_total": 1 << 20}
"""The CI sweep: tiny tensors, same code path."""
