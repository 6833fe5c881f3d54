"""Inputs, outputs and the checks: the masked model still reads its input, and the slim
model computes what the masked one does."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

TOLERANCE = 1e-5
"""Largest difference allowed between slim and masked outputs, relative to the largest
magnitude of the masked model's outputs (the logit scale)."""


class SlimError(RuntimeError):
    """Slimming cannot keep the model's function: a removed channel does not leave a
    constant behind, or the slim model's outputs differ from the masked model's."""


def as_inputs(example_inputs: Any) -> tuple[Tensor, ...]:
    """``example_inputs`` (a tensor, or a list / tuple of tensors) as the positional
    arguments of ``model(*inputs)``."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if (
        isinstance(example_inputs, Sequence)
        and example_inputs
        and all(isinstance(item, Tensor) for item in example_inputs)
    ):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor or a non-empty list / tuple of tensors (the arguments "
        f"of model(*inputs)), got {type(example_inputs).__name__}"
    )


def _tensors(outputs: Any) -> list[Tensor]:
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, (list, tuple)) and all(isinstance(item, Tensor) for item in outputs):
        return list(outputs)
    raise TypeError(f"slim compares tensor outputs (or tuples of them), the model returned {type(outputs)}")


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's train / eval flag on exit."""
    modes = {module: module.training for module in model.modules()}
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


@torch.no_grad()
def eval_outputs(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    """The model's outputs in eval mode (its train / eval flags are restored after)."""
    with kept_modes(model):
        model.eval()
        return _tensors(model(*inputs))


def compare(slim: nn.Module, reference: list[Tensor], inputs: tuple[Tensor, ...]) -> float:
    """The largest difference between the slim model's eval outputs and ``reference``
    (the masked model's) relative to the reference's scale; raises :class:`SlimError`
    above :data:`TOLERANCE`."""
    try:
        outputs = eval_outputs(slim, inputs)
    except RuntimeError as exc:  # e.g. a shape mismatch after removing a channel
        raise SlimError(
            f"the slim model fails on the example inputs ({exc}); the dependency graph missed a "
            "coupling (an op Torch-Pruning does not understand?)"
        ) from exc
    worst = 0.0
    for index, (out, ref) in enumerate(zip(outputs, reference, strict=True)):
        if out.shape != ref.shape:
            raise SlimError(f"slim output {index} has shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        diff = float((out - ref).abs().max()) if ref.numel() else 0.0
        relative = diff / scale if scale > 0 else diff
        worst = max(worst, relative)
        if not relative <= TOLERANCE:  # also catches NaN
            raise SlimError(
                f"slim output {index} differs from the masked model's by {diff:.3g} "
                f"({relative:.3g} of the output scale {scale:.3g}; allowed {TOLERANCE:g})"
            )
    return worst


def empty_layers(model: nn.Module) -> list[str]:
    """Names of the weights (2-D or more: conv, linear, embedding) that are zero in every
    entry, so every output channel of their layer is constant."""
    return [
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), nn.Parameter)
        and module.weight.dim() >= 2
        and not bool(module.weight.any())
    ]


def _reads_input(model: nn.Module, inputs: tuple[Tensor, ...]) -> bool | None:
    """Whether the eval outputs depend on the floating-point inputs: the gradient of a
    random mix of the outputs is not zero (a layer whose weight is zero passes exactly
    zero back). ``None`` where that cannot be told (no floating-point input, or outputs
    without a gradient)."""
    leaves = [x.detach().clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    if not wanted:
        return None
    with kept_modes(model), torch.enable_grad():
        model.eval()
        # clone(): an in-place op on an input must not hit the leaf.
        outputs = _tensors(model(*(x.clone() if x.requires_grad else x for x in leaves)))
        generator = torch.Generator().manual_seed(0)
        mix = sum(
            (out * torch.randn(out.shape, generator=generator).to(out)).sum()
            for out in outputs
            if out.requires_grad and out.is_floating_point()
        )
        if not isinstance(mix, Tensor):
            return None
        grads = torch.autograd.grad(mix, wanted, allow_unused=True)
    return any(grad is not None and bool(grad.any()) for grad in grads)


def check_not_cut(masked: nn.Module, inputs: tuple[Tensor, ...], remove: str) -> None:
    """Refuse a masked model in which layers with every output channel zero cut the
    output off from the input (its output is a constant: e.g. ``W*`` of a network whose
    support is still empty); warn where that cannot be checked."""
    empty = empty_layers(masked)
    if not empty:
        return
    if remove == "w_star":
        zero = f"W* is zero in every output channel of {empty} (the support is empty there)"
        fix = "train on, or use a smaller lam, until those layers have a support"
    else:
        zero = f"every output channel of {empty} is zero (pruned)"
        fix = "prune less than all of a layer"
    reads = _reads_input(masked, inputs)
    if reads is None:
        warnings.warn(
            f"slim(remove={remove!r}): {zero}; if they are on every path from the input, the slim "
            "network's output is a constant (not checked: the inputs or outputs have no gradient)",
            UserWarning,
            stacklevel=3,
        )
    elif not reads:
        raise SlimError(
            f"slim(remove={remove!r}): {zero}, so the model's output does not depend on its input and "
            f"slimming would leave a network with a constant output; {fix}"
        )
