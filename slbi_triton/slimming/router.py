"""Channel routers: parameter-free modules that copy input channels to output channels.

A router has an ``in_channels`` attribute and a 1-D int64 buffer ``source`` with one
entry per output channel: the input channel copied there, or ``-1`` for a zero channel
(the option-A ResNet shortcut, :class:`slbi_triton.train.models.ShortcutA`, is one).
Torch-Pruning reads any unknown op as elementwise, which ties input channel ``i`` to
output channel ``i``; a router instead gets a pruner of its own and two dependencies
whose index mappings follow ``source``, so a channel is tied to the one it is copied to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn


def is_router(module: nn.Module) -> bool:
    """Whether ``module`` follows the router protocol (``in_channels`` and ``source``)."""
    source = getattr(module, "source", None)
    return (
        isinstance(getattr(module, "in_channels", None), int)
        and isinstance(source, torch.Tensor)
        and source.dim() == 1
        and source.dtype == torch.int64
    )


class RouterPruner(tp.pruner.BasePruningFunc):
    """Prunes a router's output channels (entries of ``source``) and input channels
    (renumbering ``source``). The two are separate functions, so Torch-Pruning adds no
    identity coupling between them; :func:`couple_routers` adds the real one."""

    TARGET_MODULES = None

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = torch.ones(len(layer.source), dtype=torch.bool)
        keep[list(idxs)] = False
        layer.source = layer.source[keep.to(layer.source.device)]
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        source = layer.source
        removed = torch.tensor(sorted(idxs), dtype=torch.int64, device=source.device)
        below = (removed.view(-1, 1) < source.view(1, -1)).sum(dim=0)
        # An output that copied a removed input is removed too (the same channel set);
        # until then it reads zero.
        gone = torch.isin(source, removed) | (source < 0)
        layer.source = torch.where(gone, -1, source - below)
        layer.in_channels -= len(removed)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return len(layer.source)

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels


class _InToOut:
    """Index mapping input channel → the output channels that copy it."""

    def __init__(self, router: nn.Module) -> None:
        self.router = router

    def __call__(self, idxs: list) -> list:
        source = self.router.source.tolist()
        return [
            i._replace(idx=out)  # keeps the root index
            for i in idxs
            for out, src in enumerate(source)
            if src == i.idx
        ]


class _OutToIn:
    """Index mapping output channel → the input channel it copies (zero channels: none)."""

    def __init__(self, router: nn.Module) -> None:
        self.router = router

    def __call__(self, idxs: list) -> list:
        source = self.router.source.tolist()
        return [i._replace(idx=source[i.idx]) for i in idxs if source[i.idx] >= 0]


def couple_routers(graph: tp.DependencyGraph, pruner: RouterPruner) -> None:
    """Tie every router's input channel to the output channels that copy it, in
    ``graph`` (built with ``pruner`` registered for the routers' classes)."""
    for module, node in graph.module2node.items():
        if not (isinstance(module, nn.Module) and is_router(module)):
            continue
        pairs = (
            (pruner.prune_in_channels, pruner.prune_out_channels, _InToOut(module)),
            (pruner.prune_out_channels, pruner.prune_in_channels, _OutToIn(module)),
        )
        for trigger, handler, mapping in pairs:
            dep = tp.Dependency(trigger=trigger, handler=handler, source=node, target=node)
            dep.index_mapping = [mapping, None]
            node.dependencies.append(dep)
