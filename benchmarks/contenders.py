"""The optimizers the benchmarks compare, and which of them run on a device.

SLBI contenders: ``SLBI(backend="torch")`` (the C kernel on the CPU), ``backend="triton"``,
``backend="auto"``, and ``state_dtype=torch.bfloat16`` (Z and the momentum buffer in
bfloat16 with stochastic rounding: the bytes of SGD's momentum). SGD contenders:
``torch.optim.SGD`` with momentum as a for-loop, ``foreach`` and ``fused``. The paper
baseline: :class:`benchmarks.paper_slbi.PaperSLBI`. Which kernel an SLBI runs is read
through the public ``SLBI.kernels()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim import Optimizer

from benchmarks.paper_slbi import PaperSLBI
from slbi_triton.dispatch import check_backend

NamedParams = list[tuple[str, nn.Parameter]]

SLBI_HPARAMS: dict[str, float] = {
    "lr": 0.01,
    "kappa": 1.0,
    "mu": 100.0,
    "lam": 1.0,
    "momentum": 0.9,
    "dampening": 0.0,
    "weight_decay": 0.0,
}
"""Hyper-parameters of every SLBI contender (the paper baseline gets the same)."""

SGD_HPARAMS: dict[str, float] = {"lr": 0.01, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0}
"""Hyper-parameters of every ``torch.optim.SGD`` contender."""

FAMILY_SLBI = "slbi"
FAMILY_SGD = "sgd"
FAMILY_PAPER = "paper"


@dataclass(frozen=True)
class Contender:
    """One optimizer configuration in the benchmark.

    Attributes:
        state_dtype: the dtype of SLBI's Z and momentum buffer (``None``: the parameters').
    """

    name: str
    family: str  # FAMILY_SLBI, FAMILY_SGD or FAMILY_PAPER
    build: Callable[[NamedParams], Optimizer] = field(repr=False, compare=False)
    description: str = ""
    state_dtype: torch.dtype | None = None


def _slbi(backend: str, state_dtype: torch.dtype | None = None) -> Callable[[NamedParams], Optimizer]:
    def build(named: NamedParams) -> Optimizer:
        from slbi_triton import SLBI

        return SLBI(named, backend=backend, state_dtype=state_dtype, **SLBI_HPARAMS)

    return build


def _sgd(mode: str) -> Callable[[NamedParams], Optimizer]:
    flags = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[mode]

    def build(named: NamedParams) -> Optimizer:
        return torch.optim.SGD([p for _, p in named], **SGD_HPARAMS, **flags)

    return build


def _paper(named: NamedParams) -> Optimizer:
    return PaperSLBI([p for _, p in named], **SLBI_HPARAMS)


ALL_CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("slbi-torch", FAMILY_SLBI, _slbi("torch"), 'SLBI(backend="torch")'),
        Contender("slbi-triton", FAMILY_SLBI, _slbi("triton"), 'SLBI(backend="triton")'),
        Contender("slbi-auto", FAMILY_SLBI, _slbi("auto"), 'SLBI(backend="auto")'),
        Contender("slbi-bf16", FAMILY_SLBI, _slbi("auto", torch.bfloat16), "SLBI(state_dtype=torch.bfloat16)",
                  torch.bfloat16),
        Contender("sgd-loop", FAMILY_SGD, _sgd("loop"), "SGD(momentum=0.9, foreach=False)"),
        Contender("sgd-foreach", FAMILY_SGD, _sgd("foreach"), "SGD(momentum=0.9, foreach=True)"),
        Contender("sgd-fused", FAMILY_SGD, _sgd("fused"), "SGD(momentum=0.9, fused=True)"),
        Contender("paper", FAMILY_PAPER, _paper, "PaperSLBI: per-parameter loop, the paper's toolbox"),
    )
}
"""Every contender the benchmarks know, by name."""


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernel can run for ``device``'s tensors (on the CPU: only under
    ``TRITON_INTERPRET=1``, far too slow to time; for tests): what ``SLBI(backend="triton")``
    checks."""
    try:
        check_backend("triton", device)
    except ValueError:
        return False
    return True


_FUSED_SGD: dict[str, bool] = {}


def fused_sgd_supported(device: torch.device) -> bool:
    """Whether ``torch.optim.SGD(fused=True)`` steps on ``device`` for float32 parameters."""
    key = device.type
    if key not in _FUSED_SGD:
        try:
            param = nn.Parameter(torch.ones(4, device=device))
            param.grad = torch.ones(4, device=device)
            torch.optim.SGD([param], lr=0.1, momentum=0.9, fused=True).step()
            _FUSED_SGD[key] = True
        except (RuntimeError, ValueError, TypeError):
            _FUSED_SGD[key] = False
    return _FUSED_SGD[key]


def kernels_of(opt: Optimizer) -> str | None:
    """The kernels an SLBI runs (``SLBI.kernels()``: ``"c"``, ``"triton"``, ``"inductor"``,
    ``"eager"``), joined by ``+``; ``None`` for other optimizers."""
    kernels = getattr(opt, "kernels", None)
    if not callable(kernels):
        return None
    return "+".join(sorted({info.kernel for info in kernels()})) or None


def default_contender_name(device: torch.device) -> str:
    """The contender that stands for ``SLBI()`` with default arguments on ``device``:
    ``slbi-triton`` where the default runs the Triton kernel, else ``slbi-torch``."""
    from slbi_triton import SLBI

    param = nn.Parameter(torch.zeros(2, 2, device=device))
    param.grad = torch.zeros_like(param)
    return "slbi-triton" if kernels_of(SLBI([param])) == "triton" else "slbi-torch"


def contenders_for(device: torch.device, names: Sequence[str] | None = None) -> list[Contender]:
    """The contenders to run on ``device``.

    By default: ``slbi-torch``, ``slbi-triton`` on CUDA, ``slbi-bf16``, the three SGD
    variants (``sgd-fused`` where the device supports it), ``paper``. Named contenders
    are checked: an unknown or unsupported name raises ``ValueError`` (``slbi-triton`` is
    allowed on the CPU under ``TRITON_INTERPRET=1``, for tests).
    """
    if names is None:
        names = ["slbi-torch"] + (["slbi-triton"] if device.type == "cuda" and triton_usable(device) else [])
        names += ["slbi-bf16", "sgd-loop", "sgd-foreach"]
        names += ["sgd-fused"] if fused_sgd_supported(device) else []
        names.append("paper")
    chosen = []
    for name in names:
        if name not in ALL_CONTENDERS:
            raise ValueError(f"unknown contender {name!r}; known: {sorted(ALL_CONTENDERS)}")
        if name == "slbi-triton" and not triton_usable(device):
            raise ValueError("contender 'slbi-triton' needs CUDA and Triton (or TRITON_INTERPRET=1)")
        if name == "sgd-fused" and not fused_sgd_supported(device):
            raise ValueError(f"contender 'sgd-fused': SGD(fused=True) is not supported on {device.type}")
        chosen.append(ALL_CONTENDERS[name])
    return chosen
