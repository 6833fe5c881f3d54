"""The constants removed channels leave behind: measured, then folded into kept layers.

A channel whose producers are all zero filters is not zero downstream: a BatchNorm shift
or a bias, through ReLU and pooling, makes it a constant. Rather than derive it op by op,
the constant is read at each consumer's input on the masked model (forward pre-hooks);
it must be the same at every position and image, or slimming stops with an error, so
an op that is not channel-wise is caught instead of guessed.

Folding, per consumer (a conv or linear layer reading removed channels):

- a linear layer, or a conv without zero padding: ``Σ_l c_l · Σ_taps W[:, l]`` is the
  same at every output position and goes into the bias (a layer without bias: into the
  running mean of the BatchNorm that alone reads it);
- a zero-padded conv: near the border part of a kernel reads padding, so a bias would be
  wrong there. One constant channel ``r`` of that consumer is kept as a *carrier* and
  absorbs the others, ``W[:, r] += Σ_l (c_l / c_r) · W[:, l]``: every constant channel
  is ``c`` inside the image and 0 in the padding, so this is exact at every position and
  input size. A carrier is a removable channel that stays; one is chosen (greedily) for
  as many zero-padded consumers as it can serve.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .check import SlimError, eval_outputs
from .graph import ChannelGraph, ChannelSet, Member

CONSTANT_SPREAD = 1e-6
"""Largest spread (max − min) of a channel taken as constant, relative to the largest
magnitude at the consumer's input."""


@dataclass
class Constant:
    """A removable channel set and its value at each consumer input channel:
    ``values[(consumer module, input index)]``."""

    channels: ChannelSet
    values: dict[tuple[nn.Module, int], float] = field(default_factory=dict)

    def nonzero_at(self) -> set[nn.Module]:
        """The zero-padded consumers at which this channel is not zero."""
        return {module for (module, _), value in self.values.items() if value != 0 and _zero_padded(module)}


def _zero_padded(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or module.padding_mode != "zeros":
        return False
    if isinstance(module.padding, str):
        return module.padding == "same" and any(k > 1 for k in module.kernel_size)
    return any(p > 0 for p in module.padding)


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def _capture(
    model: nn.Module, modules: dict[str, nn.Module], inputs: tuple[Tensor, ...]
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """The inputs of ``modules`` in an eval-mode forward of ``model`` (the calls of a
    module used twice are stacked along the batch), and the model's outputs. Copies: a
    later in-place op (ReLU with ``inplace=True``, ``+=``) must not change them."""
    seen: dict[str, list[Tensor]] = {name: [] for name in modules}

    def keep(name: str) -> Any:
        return lambda _, args: seen[name].append(args[0].detach().clone())

    hooks = [module.register_forward_pre_hook(keep(name)) for name, module in modules.items()]
    try:
        outputs = eval_outputs(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(values) for name, values in seen.items() if values}, outputs


def measure(
    candidates: list[ChannelSet], graph: ChannelGraph, masked: nn.Module, inputs: tuple[Tensor, ...]
) -> tuple[list[Constant], list[Tensor]]:
    """The value of each candidate channel at each of its consumers, read on ``masked``
    (whose modules have the names of ``graph``'s model) in one forward, and that forward's
    eval outputs (the reference the slim model is checked against); raises
    :class:`SlimError` when a value is not constant."""
    by_name = dict(masked.named_modules())
    consumers = {graph.name(m.module) for c in candidates for m in c.consumers}
    captured, outputs = _capture(masked, {name: by_name[name] for name in consumers}, inputs)
    constants = []
    for channels in candidates:
        constant = Constant(channels)
        for member in channels.consumers:
            constant.values[(member.module, member.index)] = _read(captured, member, channels, graph)
        constants.append(constant)
    return constants, outputs


def _read(captured: dict[str, Tensor], member: Member, channels: ChannelSet, graph: ChannelGraph) -> float:
    name = graph.name(member.module)
    if name not in captured:
        raise SlimError(f"{name} did not run on the example inputs, so its input cannot be measured")
    inputs = captured[name]
    channel = inputs.select(_channel_dim(member.module), member.index).double()
    spread = float(channel.max() - channel.min()) if channel.numel() else 0.0
    if spread > CONSTANT_SPREAD * float(inputs.abs().max()):
        producers = ", ".join(graph.name(p.module) for p in channels.producers)
        raise SlimError(
            f"input channel {member.index} of {name} is not constant (spread {spread:.3g}) although its "
            f"producers ({producers}) are zero there: an op on the way is not channel-wise, so "
            "slim cannot fold what it leaves"
        )
    return float(channel.mean()) if channel.numel() else 0.0


def plan(constants: list[Constant]) -> tuple[list[Constant], list[Constant]]:
    """Split removable channels into (removed, kept): keep one channel of any layer side
    that would lose all of them, and the carriers the zero-padded consumers need."""
    removed, kept = list(constants), []

    def move(constant: Constant) -> None:
        removed.remove(constant)
        kept.append(constant)

    while (full := _emptied_side(removed)) is not None:
        move(max((c for c in removed if full in _sides(c)), key=lambda c: len(c.nonzero_at())))
    while True:
        served = set().union(*(c.nonzero_at() for c in kept))
        unserved = set().union(*(c.nonzero_at() for c in removed)) - served
        if not unserved:
            return removed, kept
        move(max(removed, key=lambda c: len(c.nonzero_at() & unserved)))


def _sides(constant: Constant) -> Counter:
    """How many channels of each (layer, weight dim) the set removes."""
    channels = constant.channels
    return Counter([(m.module, 0) for m in channels.producers] + [(m.module, 1) for m in channels.consumers])


def _emptied_side(removed: list[Constant]) -> tuple[nn.Module, int] | None:
    counts = sum((_sides(c) for c in removed), Counter())
    return next(((m, dim) for (m, dim), n in counts.items() if n >= m.weight.shape[dim]), None)


@torch.no_grad()
def fold(removed: list[Constant], kept: list[Constant], graph: ChannelGraph) -> None:
    """Fold the removed channels' constants into their consumers in ``graph``'s model."""
    carriers: dict[nn.Module, list[tuple[int, float]]] = {}
    for constant in kept:
        for (module, index), value in constant.values.items():
            carriers.setdefault(module, []).append((index, value))
    folds: dict[nn.Module, list[tuple[int, float]]] = {}
    for constant in removed:
        for (module, index), value in constant.values.items():
            if value != 0:
                folds.setdefault(module, []).append((index, value))
    for module, entries in folds.items():
        if _zero_padded(module):
            _into_carrier(module, entries, carriers.get(module, []))
        else:
            _into_bias(module, entries, graph)


def _into_bias(module: nn.Module, entries: list[tuple[int, float]], graph: ChannelGraph) -> None:
    index = torch.tensor([i for i, _ in entries], device=module.weight.device)
    values = torch.tensor([v for _, v in entries], dtype=torch.float64, device=module.weight.device)
    columns = module.weight.detach().double().index_select(1, index)
    delta = columns.flatten(2).sum(dim=2) @ values if columns.dim() > 2 else columns @ values
    if module.bias is not None:
        module.bias.copy_((module.bias.double() + delta).to(module.bias.dtype))
        return
    norm = graph.follower_norm(module)
    if norm is None:
        raise SlimError(
            f"cannot fold the constant of removed input channels of {graph.name(module)}: it has no "
            "bias and no BatchNorm reads it alone"
        )
    if norm.running_mean is not None:  # without running stats, batch statistics absorb it
        norm.running_mean.copy_((norm.running_mean.double() - delta).to(norm.running_mean.dtype))


def _into_carrier(
    module: nn.Module, entries: list[tuple[int, float]], carriers: list[tuple[int, float]]
) -> None:
    carrier, scale = max(((i, v) for i, v in carriers if v != 0), key=lambda entry: abs(entry[1]))
    index = torch.tensor([i for i, _ in entries], device=module.weight.device)
    ratios = torch.tensor([v / scale for _, v in entries], dtype=torch.float64, device=module.weight.device)
    weight = module.weight.detach().double()
    absorbed = (weight.index_select(1, index) * ratios.view(1, -1, *([1] * (weight.dim() - 2)))).sum(dim=1)
    module.weight[:, carrier] = (weight[:, carrier] + absorbed).to(module.weight.dtype)
