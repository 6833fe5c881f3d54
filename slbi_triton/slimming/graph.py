"""Coupled channel sets read off Torch-Pruning's ``DependencyGraph``, and their removal.

Torch-Pruning traces the model once and, for a channel of one layer, returns the group of
every layer slice tied to it (residual adds, concatenations, flattening, routers). Here
each channel of each conv / linear output is turned into a :class:`ChannelSet` (its
group for that one channel), so that a channel is removed only when every layer that
writes it allows it; the removal itself is Torch-Pruning's per-layer pruning functions,
called once per layer side with the union of the indices of the removed sets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from .check import kept_modes
from .router import RouterPruner, couple_routers, is_router

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""Layers whose output channels are filters / neurons (producers) and whose input
channels are folded into (consumers)."""

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Torch-Pruning's stand-ins for traced functional ops that slim lets channels pass
# through: activations, pooling, adds (elementwise), slicing, flattening, cat and split.
# Whether a removed channel stays constant through them is measured, not assumed.
_PASS_THROUGH = {
    tp.ops.OPTYPE.ELEMENTWISE,
    tp.ops.OPTYPE.SLICE,
    tp.ops.OPTYPE.RESHAPE,
    tp.ops.OPTYPE.CONCAT,
    tp.ops.OPTYPE.SPLIT,
}

Removed = dict[str, list[tuple[int, list[int]]]]
"""``{parameter name: [(dim, removed indices), ...]}``, one pair per dim that shrank."""


@dataclass(frozen=True)
class Member:
    """One channel of one side of one node: Torch-Pruning's dependency (its target node
    and pruning function) and the channel's index there."""

    dep: Any
    index: int

    @property
    def module(self) -> Any:
        return self.dep.target.module


@dataclass
class ChannelSet:
    """A channel and every channel tied to it; removing it removes all of ``members``.

    ``producers`` are the conv / linear output channels that write it, ``consumers`` the
    conv / linear input channels that read it; ``blocked`` says why it can never be
    removed (it is a model output, or passes a module slim does not handle), else None.
    """

    members: list[Member]
    producers: list[Member]
    consumers: list[Member]
    blocked: str | None


def plain_layer(module: Any) -> bool:
    """A conv (not grouped, not transposed) or linear layer."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, LAYERS) and module.groups == 1 and not module.transposed


class ChannelGraph:
    """The channel sets of ``model``, traced on ``inputs`` (``model(*inputs)``).

    The model's train / eval flags are left as they were (tracing runs in eval mode).
    """

    def __init__(self, model: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self.model = model
        self.names = {module: name for name, module in model.named_modules()}
        pruner = RouterPruner()
        routers = {type(module): pruner for module in model.modules() if is_router(module)}
        # The graph is read off autograd.
        with kept_modes(model), torch.enable_grad():
            self.graph = tp.DependencyGraph().build_dependency(
                model,
                inputs,
                forward_fn=lambda module, args: module(*args),
                customized_pruners=routers,
                verbose=False,
            )
        couple_routers(self.graph, pruner)
        self.sets = self._channel_sets()

    def name(self, module: Any) -> str:
        return self.names.get(module, str(module))

    def param_name(self, module: Any, attr: str) -> str:
        """The model's name for ``module``'s parameter ``attr`` (e.g. ``"conv1.weight"``)."""
        prefix = self.name(module)
        return f"{prefix}.{attr}" if prefix else attr

    def _channel_sets(self) -> list[ChannelSet]:
        sets: list[ChannelSet] = []
        covered: set[tuple[Any, Any, int]] = set()
        for module in self.model.modules():
            if not plain_layer(module) or module not in self.graph.module2node:
                continue
            pruner = self.graph.get_pruner_of_module(module)
            node = self.graph.module2node[module]
            todo = [
                i
                for i in range(pruner.get_out_channels(module))
                if (node, pruner.prune_out_channels, i) not in covered
            ]
            if not todo:
                continue
            group = self.graph.get_pruning_group(module, pruner.prune_out_channels, todo)
            by_root: dict[int, list[Member]] = {}
            for item in group.items:
                for index, root in zip(item.idxs, item.root_idxs, strict=True):
                    covered.add((item.dep.target, item.dep.handler, index))
                    by_root.setdefault(root, []).append(Member(item.dep, index))
            sets.extend(self._classify(members) for members in by_root.values())
        return sets

    def _classify(self, members: list[Member]) -> ChannelSet:
        producers, consumers, blocked = [], [], None
        for member in members:
            module, node = member.module, member.dep.target
            # Torch-Pruning adds an output node only where the output is not a module's
            # own (LeNet's logits are fc2's): what a node nothing reads writes is an output.
            is_out = self.graph.is_out_channel_pruning_fn(member.dep.handler)
            if plain_layer(module):
                (producers if is_out else consumers).append(member)
            if node.type == tp.ops.OPTYPE.OUTPUT or (is_out and not node.outputs):
                blocked = "it is part of the model's output"
            elif not (
                plain_layer(module)
                or node.type in _PASS_THROUGH
                or isinstance(module, NORMS)
                or (isinstance(module, nn.Module) and is_router(module))
            ):
                blocked = f"it passes through {self.name(module)}, which slim does not handle"
        return ChannelSet(members, producers, consumers, blocked)

    def follower_norm(self, module: nn.Module) -> nn.Module | None:
        """The BatchNorm that is the only reader of ``module``'s output, if any."""
        outputs = self.graph.module2node[module].outputs
        if len(outputs) == 1 and isinstance(outputs[0].module, NORMS):
            return outputs[0].module
        return None

    def _cuts(self, sets: Iterable[ChannelSet]) -> list[tuple[Any, list[int]]]:
        """Per (node, pruning function): the dependency and the union of the indices."""
        cuts: dict[tuple[Any, Any], tuple[Any, set[int]]] = {}
        for channel_set in sets:
            for member in channel_set.members:
                key = (member.dep.target, member.dep.handler)
                cuts.setdefault(key, (member.dep, set()))[1].add(member.index)
        return [(dep, sorted(indices)) for dep, indices in cuts.values()]

    def record(self, sets: Iterable[ChannelSet]) -> Removed:
        """What removing ``sets`` would take out of each parameter (see :data:`Removed`)."""
        removed: Removed = {}
        for dep, indices in self._cuts(sets):
            module = dep.target.module
            for attr, dim in _shrinking_params(module, self.graph.is_out_channel_pruning_fn(dep.handler)):
                removed.setdefault(self.param_name(module, attr), []).append((dim, indices))
        return {name: sorted(pairs) for name, pairs in sorted(removed.items())}

    def remove(self, sets: Iterable[ChannelSet]) -> None:
        """Remove ``sets`` from the model: each layer side is pruned once, by index."""
        for dep, indices in self._cuts(sets):
            dep(indices)


def _shrinking_params(module: Any, out_side: bool) -> list[tuple[str, int]]:
    """(attribute, dim) of the parameters that lose entries when a channel of
    ``module``'s output (``out_side``) or input side is removed."""
    if plain_layer(module):
        if not out_side:
            return [("weight", 1)]
        return [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])
    if isinstance(module, NORMS) and module.affine:
        return [("weight", 0), ("bias", 0)]
    return []
