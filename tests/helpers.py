"""Shared test helpers: small networks, public-API snapshots, and flat buckets built on
plain tensors for the kernel tests (no optimizer involved)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import field, fields, make_dataclass
from typing import Any

import torch
from slbi_triton.kernels import abi, ops
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from slbi_triton import SLBI, functional
from slbi_triton.validation import resolve_penalty

HPARAMS = {"lr": 0.07, "kappa": 1.5, "mu": 3.0, "lam": 0.5, "momentum": 0.8, "dampening": 0.2,
           "weight_decay": 1e-2}


# -- networks ------------------------------------------------------------------------------


class SmallNet(nn.Module):
    """conv 1→3 (3×3, group penalty), fc 12→2 (l1), biases (none), on 1×4×4 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 2 * 2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))

    @staticmethod
    def inputs(batch: int = 4) -> Tensor:
        return torch.randn(batch, 1, 4, 4)


class OddNet(nn.Module):
    """Conv (7×3×5×5), BatchNorm, linear (17×175, 13×17), biases, a 1-element scale and a
    parameter that never gets a gradient, on 3×9×9 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 7, 5)
        self.bn = nn.BatchNorm2d(7)
        self.fc1 = nn.Linear(175, 17)
        self.fc2 = nn.Linear(17, 13)
        self.scale = nn.Parameter(torch.ones(1))
        self.unused = nn.Parameter(torch.randn(5))
        with torch.no_grad():
            # Spread the filter norms so that a middle λ selects some filters only.
            self.conv.weight.mul_(torch.linspace(0.0, 3.0, 7).view(7, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(torch.tanh(self.fc1(h))) * self.scale


# backend, fused -> the kernel that runs a float32 CPU bucket (Triton: interpreted)
KERNELS = {
    "triton": ("triton", None), "c": ("torch", None), "inductor": ("torch", True), "eager": ("torch", False)
}


def build(kernel: str = "c", **kwargs: Any) -> tuple[OddNet, SLBI]:
    """An ``OddNet`` (seeded with 0) and its SLBI with ``kernel`` (a key of ``KERNELS``):
    lr 0.05, μ 2, λ 0.05 and SLBI's other defaults, but what ``kwargs`` set."""
    torch.manual_seed(0)
    model = OddNet()
    backend, fused = KERNELS[kernel]
    options = {"lr": 0.05, "mu": 2.0, "lam": 0.05, **kwargs}
    return model, SLBI(model.named_parameters(), backend=backend, fused=fused, **options)


def loss_of(model: OddNet, step: int) -> Tensor:
    """``mean(model(x)²)`` on a batch of 4 ``OddNet`` inputs seeded with ``step``."""
    x = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(step))
    return model(x).square().mean()


def train(model: OddNet, opt: SLBI, steps: range) -> None:
    """One step on ``loss_of(model, step)`` for each ``step``."""
    for step in steps:
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()


def synthetic_digits(count: int, seed: int) -> TensorDataset:
    """A learnable stand-in for MNIST (28×28, 10 classes): a fixed random template per
    class plus noise seeded with ``seed``."""
    templates = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(1234))
    labels = torch.arange(count) % 10
    noise = 0.3 * torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    return TensorDataset((0.7 * templates[labels] + noise).clamp(0, 1), labels)


# -- the optimizer through its public API --------------------------------------------------


def all_params(opt: SLBI) -> list[Tensor]:
    """``opt``'s parameters, group after group."""
    return [p for group in opt.param_groups for p in group["params"]]


def penalty_of(opt: SLBI, param: Tensor) -> str:
    """The penalty ``param`` gets in ``opt`` (its group's, resolved)."""
    group = next(g for g in opt.param_groups if any(p is param for p in g["params"]))
    return resolve_penalty(group["penalty"], param)


def snapshot(model: nn.Module, opt: SLBI) -> dict[str, Tensor]:
    """Every weight and state tensor by ``name`` and ``name/key``, copied."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.detach().clone()
        for key, value in opt.state[p].items():
            out[f"{name}/{key}"] = value.clone()
    return out


def assert_equal_snapshots(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def flat_storages(tensors: Sequence[Tensor]) -> set[int]:
    """The distinct storages (by address) the tensors are views into."""
    return {t.untyped_storage().data_ptr() for t in tensors}


# -- flat buckets on plain tensors, for the kernel tests -----------------------------------


def layout(shapes: Sequence[tuple[int, ...]], penalties: Sequence[str]) -> tuple[list[abi.Span], int, int]:
    """Spans laid out as the optimizer lays them out (every one 16-element aligned); the
    bucket's length and number of group norms."""
    spans, offset, norms = [], 0, 0
    for shape, penalty in zip(shapes, penalties, strict=True):
        numel = math.prod(shape)
        groups = shape[0] if penalty == "group" else 0
        spans.append(abi.Span(offset, numel, penalty, groups, numel // shape[0] if groups else 0, 0, norms))
        offset = -(-(offset + numel) // abi.SLOT_ALIGNMENT) * abi.SLOT_ALIGNMENT
        norms += groups
    return spans, offset, norms


class _BucketMethods:
    def _map(self, change: Callable[[Tensor], Tensor]) -> Bucket:
        values = (getattr(self, f.name) for f in fields(self))
        return Bucket(*(change(v) if isinstance(v, Tensor) else v for v in values))

    def clone(self) -> Bucket:
        return self._map(Tensor.clone)

    def to(self, device: torch.device | str) -> Bucket:
        """The same bucket with its tensors on ``device``."""
        return self._map(lambda t: t.to(device))

    def args(self) -> abi.BucketArgs:
        """The op's arguments, in order."""
        return abi.BucketArgs(*(getattr(self, name) for name in abi.BucketArgs._fields))

    def outputs(self) -> list[Tensor]:
        """What a step writes: W, Z, v, the group norms and the step counter."""
        return [t for t in (getattr(self, name) for name in _OUTPUTS) if t is not None]

    def run(self, kernel: str) -> None:
        """One step with ``kernel``: ``"c"``, ``"triton"`` (interpreted on CPU buffers),
        ``"cuda"`` (the op on CUDA buffers) or ``"reference"``."""
        if kernel == "reference":
            functional.bucket_step_reference(self.args())
        elif kernel == "triton":
            ops.bucket_step_interpreted(*self.args())
        else:
            ops.bucket_step(*self.args())


_OUTPUTS = ("params", "z", "momentum", "group_norms", "rng")

SPECIAL_VALUES = (float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e38, 3.3e38)
"""NaN, ±inf, ±0, a subnormal and floats near the largest: planted by plant_special_values."""


def plant_special_values(
    bucket: Bucket, specials: Sequence[float] = SPECIAL_VALUES, count: int = 200, seed: int = 5
) -> None:
    """Put ``count`` of ``specials`` at random places of each tensor's elements (not the
    padding) in each of W, g, Z and v (where there is a v), each buffer at places of its own;
    then, at 4 · len(specials)² more places, every pair of them in (W, Z) and in (g, v)
    (a -0 in Z shows only where W is ±0 too)."""
    generator = torch.Generator().manual_seed(seed)
    inside = torch.cat([torch.arange(span.offset, span.offset + span.numel) for span in bucket.spans])
    table = torch.tensor(specials)
    values = table[torch.arange(count) % len(specials)]
    buffers = (bucket.params, bucket.grads, bucket.z, bucket.momentum)
    for buffer in buffers:
        if buffer is not None:  # no momentum buffer without momentum
            places = torch.randperm(inside.numel(), generator=generator)[:count]
            buffer[inside[places]] = values.to(buffer.dtype)
    first, second = torch.meshgrid(torch.arange(len(specials)), torch.arange(len(specials)), indexing="ij")
    pairs = torch.randperm(inside.numel(), generator=generator)[: 4 * first.numel()].view(4, -1)
    for places in pairs:
        for buffer, which in zip(buffers, (first, second, first, second), strict=True):
            if buffer is not None:
                buffer[inside[places]] = table[which.flatten()].to(buffer.dtype)


_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}


def assert_same_bits(got: Tensor, want: Tensor) -> None:
    """The same bits (so +0 is not -0), NaN where ``want`` is NaN whatever its sign and payload."""
    assert got.dtype == want.dtype and got.shape == want.shape
    same = got.view(_SAME_WIDTH_INT[got.dtype]) == want.view(_SAME_WIDTH_INT[want.dtype])
    both_nan = got.isnan() & want.isnan()
    differ = ~(same | both_nan)
    assert not differ.any(), f"{int(differ.sum())} elements differ, first at {differ.nonzero()[0].tolist()}"


def assert_equal_with_nans(bucket: Bucket, expected: Bucket) -> None:
    """W, Z and v the same bits, NaN where ``expected`` has NaN (the reference's NaN bits are
    torch's float -> bfloat16 copy's, 0xFFFF); every NaN a kernel stores in bfloat16 is 0x7FC0."""
    for got, want in ((bucket.params, expected.params), (bucket.z, expected.z),
                      (bucket.momentum, expected.momentum)):
        if got is None and want is None:  # no momentum buffer
            continue
        assert_same_bits(got, want)
        if got.dtype == torch.bfloat16:
            assert (got[got.isnan()].view(torch.int16) == 0x7FC0).all()


def assert_same_outputs(a: Bucket, b: Bucket, skip: Sequence[str] = (), inputs: bool = False) -> None:
    """``a`` and ``b`` hold equal outputs (``Bucket.outputs``; with ``inputs``, every tensor
    argument of the op), but the fields named in ``skip``."""
    for name in abi.BucketArgs._fields if inputs else _OUTPUTS:
        x, y = getattr(a, name), getattr(b, name)
        if name not in skip and (isinstance(x, Tensor) or isinstance(y, Tensor)):
            assert isinstance(x, Tensor) and isinstance(y, Tensor) and torch.equal(x, y), name


_OPTIONAL = abi.BucketArgs._field_defaults
Bucket = make_dataclass(
    "Bucket",
    [(name, Any, _OPTIONAL[name]) if name in _OPTIONAL else (name, Any) for name in abi.BucketArgs._fields]
    + [("spans", list, field(default_factory=list))],
    bases=(_BucketMethods,),
)
"""The op's arguments for one bucket (the fields of ``abi.BucketArgs``, settable), and
its parameters' places (``spans``)."""


def random_bucket(
    shapes: Sequence[tuple[int, ...]],
    penalties: Sequence[str],
    dtype: torch.dtype = torch.float32,
    state_dtype: torch.dtype | None = None,
    geometry: abi.Geometry = abi.CPU_GEOMETRY,
    hparams: dict[str, float] | None = None,
    momentum_ready: bool = True,
    seed: int = 0,
    momentum: bool = True,
    stochastic_rounding: bool | None = None,
) -> Bucket:
    """A bucket of random W, g, Z, v (zero padding), group norms of Z spread over [0, 2λ]
    (the first filter's Z is 0) so that some filters are in the support and some not,
    every parameter active. Without ``momentum`` the group has ρ = 0 and no buffer;
    ``stochastic_rounding`` defaults to bfloat16 state of a wider parameter dtype."""
    spans, numel, num_norms = layout(shapes, penalties)
    generator = torch.Generator().manual_seed(seed)
    state_dtype = state_dtype or dtype
    buffers = [torch.zeros(numel, dtype=torch.float64) for _ in range(4)]
    lam = (hparams or HPARAMS)["lam"]
    for span in spans:
        for buffer in buffers:
            buffer[span.offset : span.offset + span.numel] = torch.randn(span.numel, generator=generator)
        if span.penalty == "group" and span.num_groups:  # ‖Z_g‖ spread over [0, 2λ]
            rows = buffers[2][span.offset : span.offset + span.numel].view(span.num_groups, -1)
            rows.mul_(torch.linspace(0, 2 * lam, span.num_groups)[:, None] / rows.norm(dim=1, keepdim=True))
    params, grads = (b.to(dtype) for b in buffers[:2])
    z, v = (b.to(state_dtype) for b in buffers[2:])
    norms = torch.zeros(num_norms, dtype=abi.norm_dtype(dtype))
    for span in spans:
        if span.penalty == "group" and span.num_groups:
            rows = z[span.offset : span.offset + span.numel].view(span.num_groups, -1)
            norm_rows = norms[span.norm_offset : span.norm_offset + span.num_groups]
            functional.refresh_group_norms_(rows, norm_rows)
    flags = abi.flag_words([True] * len(spans), [momentum_ready] * len(spans))
    table = {**HPARAMS, **(hparams or {}), **({} if momentum else {"momentum": 0.0})}
    if stochastic_rounding is None:
        stochastic_rounding = state_dtype == torch.bfloat16 and dtype != torch.bfloat16
    return Bucket(
        params, grads, z, v if momentum else None, norms,
        abi.chunk_table(spans, geometry, numel, num_norms),
        torch.tensor(flags, dtype=torch.int32),
        abi.hparam_table_traced([table], torch.device("cpu")),
        torch.tensor([12345, 0], dtype=torch.int64),
        stochastic_rounding=stochastic_rounding,
        spans=spans,
    )


def couple(bucket: Bucket, row_keys: Sequence[int]) -> Bucket:
    """``bucket`` with coupled groups: ``row_keys`` gives each group-penalty row (in norm
    order) a key, ``-1`` for none (``abi.coupled_tables``); the coupled norms are appended
    to the group norms, computed from the own ones."""
    keys = torch.tensor(row_keys, dtype=torch.int64)
    assert keys.numel() == bucket.group_norms.numel()
    tables = abi.coupled_tables(keys, bucket.params.dtype, bucket.params.numel())
    assert tables is not None
    norms = torch.cat([bucket.group_norms, torch.zeros_like(tables.coupled_scale)])
    functional.coupled_norms_(norms, functional.member_table(tables.coupled_offsets, tables.coupled_rows),
                              tables.coupled_scale)
    values = {name: getattr(bucket, name) for name in abi.BucketArgs._fields}
    return Bucket(**{**values, **tables._asdict(), "group_norms": norms}, spans=bucket.spans)


def set_z(opt: SLBI, values: dict[Tensor, Tensor]) -> None:
    """Give parameters a new Z through the public state dict (so that their group norms
    are recomputed on load, as for any edited checkpoint)."""
    state_dict = opt.state_dict()
    params = all_params(opt)
    for param, z in values.items():
        entry = state_dict["state"].setdefault(next(i for i, p in enumerate(params) if p is param), {})
        entry["z"] = z.clone()
        entry.pop("group_norms", None)
    opt.load_state_dict(state_dict)


def assert_norms_fresh(opt: SLBI) -> None:
    """The group norms the next step uses are those of the current Z."""
    for group in opt.param_groups:
        for param in group["params"]:
            state = opt.state[param]
            if "group_norms" in state:
                rows = state["z"].reshape(param.shape[0], -1).to(state["group_norms"].dtype)
                assert torch.allclose(state["group_norms"], torch.linalg.vector_norm(rows, dim=1), rtol=1e-6)
