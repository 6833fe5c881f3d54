"""Module-aware param groups for SLBI: one Γ group per removable channel.

:func:`param_groups` turns a model into torch param groups for :class:`~slbi_triton.SLBI`.
Without example inputs it applies per-module rules (conv / linear weights by output
channel, everything else unpenalised). With example inputs it traces the model with
Torch-Pruning's ``DependencyGraph`` (the graph :func:`slbi_triton.slim` uses) and gives
every removable channel one *coupled group*: the rows of every layer that writes it
(all writers of a residual-stream channel, across option-A shortcuts), so that the
channel's Γ is zero exactly when :func:`slbi_triton.slim` can remove it.

Why BatchNorm's γ and β carry a channel's norm (``docs/design.md``, "Coupled groups"):
a conv followed by BatchNorm is scale-free, its output is ``γ·x̂ + β`` whatever the
scale of the conv's filter, so the filter's norm says nothing about the channel and
cannot switch it off. There γ and β are the group's *members* (their ‖Z‖ makes the
group norm) and the conv's filter only *follows* the group (its Γ is zero exactly when
the group's is, so W* removes it, but its ‖Z‖ does not count). A writer without a
BatchNorm after it is a member itself, bias included.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ChannelGroups", "ModuleGraphError", "channel_groups", "layer_weights", "param_groups"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class ModuleGraphError(ValueError):
    """The model cannot be traced into channel groups."""


@dataclass
class ChannelGroups:
    """Coupled channel groups of one model: per parameter, the group of each row.

    Attributes:
        ids: ``{parameter name: int64 tensor}``, one entry per row along dim 0, the
            coupled group it belongs to (``-1``: none).
        followers: names of the parameters whose rows follow their group without
            counting in its norm (filters of a conv followed by BatchNorm).
        num_groups: how many coupled groups there are.
        outputs: names of the parameters that produce the model's output (unpenalised).
        writers: per group, ``(module name, channel)`` of each conv / linear output it is.
        readers: per group, ``(module name, channel)`` of each conv / linear input it feeds.
    """

    ids: dict[str, Tensor] = field(default_factory=dict)
    followers: set[str] = field(default_factory=set)
    num_groups: int = 0
    outputs: set[str] = field(default_factory=set)
    writers: list[list[tuple[str, int]]] = field(default_factory=list)
    readers: list[list[tuple[str, int]]] = field(default_factory=list)


def layer_weights(model: nn.Module) -> list[tuple[str, nn.Module, nn.Parameter]]:
    """``(name, module, weight)`` of every conv (not transposed) and linear layer, in
    module order; the last one is taken for the classifier when nothing is traced."""
    return [
        (name, module, param)
        for name, module, attr, param in _named_owners(model)
        if attr == "weight" and isinstance(module, (nn.Linear, *_CONV))
    ]


def _rule(module: nn.Module, attr: str, param: Tensor) -> str:
    """The penalty of ``module.<attr>`` without a graph: conv (not transposed) and linear
    weights by output channel / neuron, everything else unpenalised."""
    if attr == "weight" and isinstance(module, (nn.Linear, *_CONV)) and param.dim() >= 2:
        return "group"
    return "none"


def _named_owners(model: nn.Module) -> Iterable[tuple[str, nn.Module, str, nn.Parameter]]:
    """``(name, module, attribute, parameter)`` of every parameter, each once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            yield (f"{module_name}.{attr}" if module_name else attr), module, attr, param


def channel_groups(model: nn.Module, example_inputs: Any) -> ChannelGroups:
    """The coupled channel groups of ``model``, traced on ``example_inputs``.

    Raises:
        ImportError: Torch-Pruning is not installed.
        ModuleGraphError: the model cannot be traced (the message names the fallback).
    """
    from .slimming import _graph
    from .slimming.check import as_inputs

    graph_module = _graph()
    try:
        graph = graph_module.ChannelGraph(model, as_inputs(example_inputs))
    except Exception as error:  # Torch-Pruning raises many kinds on untraceable models
        raise ModuleGraphError(
            f"param_groups cannot trace {type(model).__name__} with Torch-Pruning ({error}); use "
            "SLBI(model.named_parameters()) with penalty='auto', or param_groups(model) without "
            "example inputs"
        ) from error
    untraced = [
        name for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, *_CONV)) and module not in graph.graph.module2node
    ]
    if untraced:
        raise ModuleGraphError(
            f"param_groups cannot trace {type(model).__name__}: the layer(s) {untraced} do not appear in the "
            "autograd graph of model(*example_inputs) (unused, or run under no_grad/detach); use "
            "SLBI(model.named_parameters()) with penalty='auto', or param_groups(model) without example "
            "inputs"
        )
    groups = ChannelGroups()
    params = dict(model.named_parameters())
    for channel_set in graph.sets:
        if channel_set.blocked is not None:
            for member in channel_set.producers:
                groups.outputs.add(graph.param_name(member.module, "weight"))
            continue
        if not channel_set.producers:
            continue
        number = groups.num_groups
        groups.num_groups += 1
        groups.writers.append([(graph.name(m.module), m.index) for m in channel_set.producers])
        groups.readers.append([(graph.name(m.module), m.index) for m in channel_set.consumers])
        _add_members(groups, graph, channel_set, number, params)
    for name in groups.outputs:
        groups.ids.pop(name, None)
    return groups


def _add_members(groups: ChannelGroups, graph: Any, channel_set: Any, number: int, params: dict) -> None:
    """Give group ``number`` the rows of ``channel_set``: BatchNorm γ and β and the
    writers' filters (followers where a BatchNorm follows them), or the writers' filters
    and biases (members)."""
    from .slimming.graph import plain_layer

    for member in channel_set.members:
        module = member.module
        if not isinstance(module, nn.Module):
            continue
        out_side = graph.graph.is_out_channel_pruning_fn(member.dep.handler)
        if isinstance(module, _NORMS) and module.affine:
            attrs = ["weight", "bias"]
        elif plain_layer(module) and out_side:
            attrs = ["weight"] + (["bias"] if module.bias is not None else [])
            if graph.follower_norm(module) is not None:
                groups.followers.add(graph.param_name(module, "weight"))
                attrs = ["weight"]  # the bias is cancelled by the BatchNorm: no member
        else:
            continue
        for attr in attrs:
            name = graph.param_name(module, attr)
            ids = groups.ids.get(name)
            if ids is None:
                ids = groups.ids[name] = torch.full((params[name].shape[0],), -1, dtype=torch.int64)
            ids[member.index] = number


def param_groups(
    model: nn.Module, example_inputs: Any = None, **overrides: Any
) -> list[dict[str, Any]]:
    """Torch param groups for :class:`~slbi_triton.SLBI` with module-aware penalties.

    Used as ``SLBI(param_groups(model, x), lr=0.1)``; the groups are plain torch param
    groups (dicts), so they mix with a user's own. Parameters are given as ``(name,
    parameter)`` pairs, so the toolbox knows their names.

    Without ``example_inputs``: conv weights get the group penalty by output filter and
    linear weights by output neuron, except the last conv / linear layer of the model
    (the classifier, taken to produce the output); transposed convs, embeddings, norms,
    biases and free parameters get none.

    With ``example_inputs`` (a tensor or tuple, ``model(*inputs)``): the model is traced
    with Torch-Pruning and each removable channel becomes one coupled group (see the
    module docstring); the layers that produce the model's output get no penalty. The
    first group then holds the coupled parameters with their ``"channel_ids"`` (and
    ``"channel_followers"``), the second everything else.

    Args:
        model: the model to train.
        example_inputs: inputs to trace the model with, or ``None``.
        **overrides: hyper-parameters set in every returned group (e.g. ``lam=0.5``).

    Raises:
        ModuleGraphError: the model cannot be traced with these inputs.
    """
    owners = list(_named_owners(model))
    if example_inputs is None:
        layers = layer_weights(model)
        classifier = layers[-1][1] if layers else None
        by_penalty: dict[str, list[tuple[str, Tensor]]] = {"group": [], "none": []}
        for name, module, attr, param in owners:
            penalty = "none" if module is classifier else _rule(module, attr, param)
            by_penalty[penalty].append((name, param))
        return [
            {"params": pairs, "penalty": penalty, **overrides}
            for penalty, pairs in by_penalty.items()
            if pairs
        ]
    groups = channel_groups(model, example_inputs)
    coupled = [(name, param) for name, _, _, param in owners if name in groups.ids]
    free = [(name, param) for name, _, _, param in owners if name not in groups.ids]
    result = []
    if coupled:
        result.append({
            "params": coupled,
            "penalty": "group",
            "channel_ids": [groups.ids[name] for name, _ in coupled],
            "channel_followers": [name in groups.followers for name, _ in coupled],
            **overrides,
        })
    if free:
        result.append({"params": free, "penalty": "none", **overrides})
    return result

