"""Inputs, outputs and the check that the slim model computes what the masked one does."""

from __future__ import annotations

import contextlib
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
