"""Stopping the regularisation path at a target size: a MAC model of coupled channel
groups, their norms on the path, and the cut to a MAC budget (:func:`prune_to`).

:class:`MacModel` counts the multiply-accumulates of every conv / linear layer of a model
once (forward hooks on example inputs) and then prices any set of removed coupled
channel groups exactly for those layers: a layer's MACs scale with its kept output
channels times its kept input channels.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .channel_ids import check_held_out, held_out_of
from .coupling import ChannelGroups

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

MIN_KEPT = 0.1
"""The share of a layer's input and output channels (at least one) that a removal keeps."""


class MacModel:
    """MACs of a model's conv / linear layers as channel groups are removed.

    Args:
        model: the model (its outputs are not changed; it runs once in eval mode).
        groups: its coupled channel groups (:func:`slbi_triton.coupling.channel_groups`).
        example_inputs: a tensor or tuple, ``model(*inputs)``; MACs are per call.
    """

    def __init__(self, model: nn.Module, groups: ChannelGroups, example_inputs: Any) -> None:
        from .slimming.check import as_inputs, kept_modes

        names = {module: name for name, module in model.named_modules()}
        macs: dict[str, float] = {}

        def count(module: nn.Module, _inputs: Any, output: Tensor) -> None:
            if isinstance(module, nn.Linear):
                per_out = module.in_features
            else:
                per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
            macs[names[module]] = macs.get(names[module], 0.0) + float(output.numel()) * per_out

        hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, _LAYERS)]
        try:
            with kept_modes(model), torch.no_grad():
                model.eval()
                model(*as_inputs(example_inputs))
        finally:
            for hook in hooks:
                hook.remove()
        self.layers = sorted(macs)
        index = {name: i for i, name in enumerate(self.layers)}
        modules = dict(model.named_modules())
        as_float = functools.partial(torch.tensor, dtype=torch.float64)
        self.layer_macs = as_float([macs[name] for name in self.layers])
        self.out_channels = as_float([_width(modules[name], out=True) for name in self.layers])
        self.in_channels = as_float([_width(modules[name], out=False) for name in self.layers])
        # Per group: how many output / input channels of each layer it takes away.
        self.out_cut = torch.zeros(groups.num_groups, len(self.layers), dtype=torch.float64)
        self.in_cut = torch.zeros_like(self.out_cut)
        for number, (writers, readers) in enumerate(zip(groups.writers, groups.readers, strict=True)):
            for name, _ in writers:
                if name in index:
                    self.out_cut[number, index[name]] += 1
            for name, _ in readers:
                if name in index:
                    self.in_cut[number, index[name]] += 1
        self.total = float(self.layer_macs.sum())

    def macs(self, removed: Tensor) -> float:
        """The MACs left when the groups flagged in ``removed`` (bool per group) go."""
        return float(self.macs_batch(removed[None])[0])

    def macs_batch(self, removed: Tensor) -> Tensor:
        """:meth:`macs` of each row of ``removed`` (bool, ``(n, num_groups)``)."""
        flags = removed.to(torch.float64)
        kept_out = (1 - flags @ self.out_cut / self.out_channels).clamp(min=0)
        kept_in = (1 - flags @ self.in_cut / self.in_channels).clamp(min=0)
        return (kept_out * kept_in * self.layer_macs).sum(dim=1)

    def removal_count(self, order: Sequence[int] | Tensor, target: float, floor: float = MIN_KEPT) -> int:
        """How many groups of ``order`` (first removed first) must go for the MACs to
        reach ``target`` (a fraction of :attr:`total`), but never so many that a layer
        keeps fewer than ``floor`` of its input or output channels (at least one)."""
        order = torch.as_tensor(order, dtype=torch.int64)
        goal = target * self.total
        if self.total <= goal:
            return 0
        # Groups removed one after the other: the channels each layer keeps after every
        # prefix of the order, the MACs that leaves, and the prefixes above the floor.
        out_left = self.out_channels - torch.cumsum(self.out_cut[order], dim=0)
        in_left = self.in_channels - torch.cumsum(self.in_cut[order], dim=0)
        kept = (out_left / self.out_channels).clamp(min=0) * (in_left / self.in_channels).clamp(min=0)
        left = kept @ self.layer_macs
        allowed = (out_left >= self._floor(self.out_channels, floor)).all(dim=1)
        allowed &= (in_left >= self._floor(self.in_channels, floor)).all(dim=1)
        limit = int(torch.cumprod(allowed.to(torch.int64), dim=0).sum())
        met = torch.nonzero(left <= goal).flatten()
        needed = int(met[0]) + 1 if len(met) else len(order)
        return min(needed, limit)

    def removal(self, order: Sequence[int] | Tensor, target: float, floor: float = MIN_KEPT) -> Tensor:
        """The groups to remove, taken in ``order`` until the MACs reach ``target``,
        skipping each group whose removal would take a layer below ``floor`` of its
        input or output channels (at least one): a bool per group."""
        removed = torch.zeros(self.out_cut.shape[0], dtype=torch.bool)
        kept_out, kept_in = self.out_channels.clone(), self.in_channels.clone()
        floor_out, floor_in = self._floor(self.out_channels, floor), self._floor(self.in_channels, floor)
        for number in torch.as_tensor(order, dtype=torch.int64).tolist():
            if self.macs(removed) <= target * self.total:
                break
            out_left, in_left = kept_out - self.out_cut[number], kept_in - self.in_cut[number]
            if bool((out_left >= floor_out).all() and (in_left >= floor_in).all()):
                removed[number] = True
                kept_out, kept_in = out_left, in_left
        return removed

    @staticmethod
    def _floor(channels: Tensor, floor: float) -> Tensor:
        return torch.clamp(torch.ceil(floor * channels), min=1)


def _width(module: nn.Module, out: bool) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features if out else module.in_features
    return module.out_channels if out else module.in_channels


def _coupled_group(optimizer: Any, group: int | None) -> int:
    """The index of the param group with ``"channel_ids"`` (the given one, checked)."""
    coupled = [i for i, g in enumerate(optimizer.param_groups) if g.get("channel_ids") is not None]
    if group is None:
        if not coupled:
            raise ValueError(
                "the optimizer has no coupled channel groups: build it with "
                "SLBI(param_groups(model, example_inputs), ...)"
            )
        return coupled[0]
    if group not in coupled:
        raise ValueError(f"param group {group!r} has no channel_ids (coupled groups: {coupled})")
    return group


@torch.no_grad()
def prune_to(
    model: nn.Module, optimizer: Any, example_inputs: Any, macs: float, group: int | None = None
) -> Any:
    """Stop the path at a MAC target: remove the held-out coupled channel groups
    (:func:`hold_out`, :class:`MacTarget`), then the others smallest ‖Z_G‖ first (those
    outside the support go first), until the conv / linear MACs of the model are
    at most ``macs`` of the dense model's, and return the physically smaller network.

    ``model`` and ``optimizer`` are not changed: the removal happens on copies, which are
    then slimmed (:func:`slbi_triton.slim` with ``remove="pruned"``). The slim network
    holds W of the kept channels (not W*).

    Args:
        model: the trained model.
        optimizer: its :class:`~slbi_triton.SLBI`, built from
            :func:`~slbi_triton.param_groups` with example inputs.
        example_inputs: a tensor or tuple, ``model(*inputs)`` (a few real samples: they
            also check the slim network).
        macs: the share of MACs to keep, in (0, 1].
        group: the coupled param group (default: the first with ``"channel_ids"``).

    Returns:
        The :class:`~slbi_triton.SlimResult` of the slim network.
    """
    from .coupling import channel_groups
    from .slimming import slim

    if not 0 < float(macs) <= 1:
        raise ValueError(f"macs must be in (0, 1], got {macs!r}")
    index = _coupled_group(optimizer, group)
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    groups = channel_groups(model_copy, example_inputs)
    norms = channel_norms(optimizer_copy, index).cpu()
    if groups.num_groups != norms.numel():
        raise ValueError(
            "the model's channel groups do not match the optimizer's: build the optimizer with "
            "param_groups(model, example_inputs) of this model"
        )
    mac_model = MacModel(model_copy, groups, _one_sample(example_inputs))
    held = held_channels(optimizer_copy, index, norms.numel())
    removed = mac_model.removal(removal_order(norms, held), float(macs)) | held
    zero_channels(optimizer_copy, torch.nonzero(removed).flatten(), index)
    return slim(model_copy, optimizer_copy, example_inputs, remove="pruned")


def _one_sample(example_inputs: Any) -> tuple[Tensor, ...]:
    from .slimming.check import as_inputs

    return tuple(t[:1] for t in as_inputs(example_inputs))


def _coupled_slots(optimizer: Any, group: int) -> list[tuple[Any, Tensor]]:
    """``(slot, channel ids)`` of the coupled parameters of param group ``group``."""
    entries = optimizer.param_groups[group]
    storage = optimizer._storage
    return [
        (storage.slot_of(param), ids)
        for param, ids in zip(entries["params"], entries["channel_ids"], strict=True)
        if ids is not None
    ]


@torch.no_grad()
def channel_norms(optimizer: Any, group: int | None = None) -> Tensor:
    """‖Z_G‖ of every coupled channel group of a param group (``docs/design.md``,
    "Coupled groups"), as the last step left them: float32 (float64 for float64
    parameters) on the CPU, one entry per channel id; 0 for an id no row carries. A
    held-out group (:func:`hold_out`) reports the norm it would have if it were not held
    out (its ``Γ`` is zero all the same)."""
    index = _coupled_group(optimizer, group)
    slots = _coupled_slots(optimizer, index)
    count = 1 + max((int(ids.max()) for _, ids in slots if ids.numel()), default=-1)
    norms = torch.zeros(count, dtype=torch.float64)
    unheld: dict[int, Tensor] = {}  # per bucket, its norms as if nothing were held out
    for slot, ids in slots:
        bucket = optimizer._storage.bucket_of(slot)
        if id(bucket) not in unheld:
            unheld[id(bucket)] = bucket.unheld_group_norms()
        rows = ids >= 0
        norms[ids[rows]] = bucket.prox_norms_of(slot, norms=unheld[id(bucket)]).cpu().double()[rows]
    return norms


@torch.no_grad()
def zero_channels(optimizer: Any, channels: Tensor, group: int | None = None) -> None:
    """Zero W, Z and the momentum of every row of the coupled ``channels`` (ids) of a
    param group, and refresh the group norms."""
    index = _coupled_group(optimizer, group)
    channels = torch.as_tensor(channels, dtype=torch.int64)
    for slot, ids in _coupled_slots(optimizer, index):
        rows = torch.isin(ids, channels).to(slot.param.device)
        if not bool(rows.any()):
            continue
        state = optimizer.state[slot.param]
        for tensor in (slot.param.data, state.get("z"), state.get("momentum_buffer")):
            if tensor is not None:
                tensor[rows] = 0
        optimizer._storage.bucket_of(slot).refresh_group_norms([slot])


def held_channels(optimizer: Any, group: int, count: int) -> Tensor:
    """Which of ``count`` channel ids the param group ``group`` holds out (bool per id)."""
    held = torch.zeros(count, dtype=torch.bool)
    ids = held_out_of(optimizer.param_groups[group])
    if ids is not None:
        held[ids[ids < count]] = True
    return held


def removal_order(norms: Tensor, held: Tensor) -> Tensor:
    """Channel ids in the order they leave: the held-out ones, then smallest ‖Z_G‖ first."""
    return torch.argsort(torch.where(held, -1.0, norms.double()), stable=True)


def hold_out(optimizer: Any, channels: Any, group: int | None = None) -> None:
    """Hold coupled channel groups out of the support (``docs/design.md``, "Held-out
    groups"): from the next step on, Γ of their rows is zero whatever ‖Z_G‖, so the
    coupling pulls their W towards zero by ``α·κ/μ`` of it a step while Z goes on.

    Replaces the set held before (``channels=[]`` releases every group). The set is the
    param group's ``"held_out"`` key, so ``state_dict()`` keeps it.

    Args:
        optimizer: an :class:`~slbi_triton.SLBI` built from
            :func:`~slbi_triton.param_groups` with example inputs.
        channels: channel ids (of coupled groups of that param group).
        group: the coupled param group (default: the first with ``"channel_ids"``).
    """
    index = _coupled_group(optimizer, group)
    held = torch.unique(torch.as_tensor(channels, dtype=torch.int64).flatten())
    entries = optimizer.param_groups[index]
    check_held_out({**entries, "held_out": held}, f"param group {index}")
    entries["held_out"] = held
    optimizer._storage.sync_held_out(optimizer.param_groups)


class MacTarget:
    """Steer the regularisation path to a MAC budget while training.

    Between steps ``start`` and ``end`` the budget falls from 1 to ``macs`` on a cubic
    ramp; every ``every`` steps, the coupled channel groups with the smallest ‖Z_G‖ are
    held out of the support (:func:`hold_out`) until the kept channels meet the budget
    (a held group stays held). Their W then decays by the coupling, so that
    :func:`prune_to` with the same ``macs`` at the end removes channels that are close
    to zero already: the slim network keeps the dense one's accuracy.

    Call :meth:`step` after every ``optimizer.step()``; :meth:`state_dict` /
    :meth:`load_state_dict` keep its step count (the held set is in the optimizer's).

    Args:
        model: the model being trained.
        optimizer: its :class:`~slbi_triton.SLBI`, from :func:`~slbi_triton.param_groups`
            with example inputs.
        example_inputs: a tensor or tuple, ``model(*inputs)``.
        macs: the share of the dense model's conv / linear MACs to keep, in (0, 1].
        start, end: the steps (counted by :meth:`step`) where the ramp starts and ends.
        every: steps between two updates of the held set (default: 10).
        group: the coupled param group (default: the first with ``"channel_ids"``).
    """

    def __init__(
        self, model: nn.Module, optimizer: Any, example_inputs: Any, macs: float, start: int, end: int,
        every: int = 10, group: int | None = None,
    ) -> None:
        from .coupling import channel_groups

        if not 0 < float(macs) <= 1:
            raise ValueError(f"macs must be in (0, 1], got {macs!r}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise ValueError(f"start and end must be ints with 0 <= start <= end, got {start!r}, {end!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.group = _coupled_group(optimizer, group)
        groups = channel_groups(model, example_inputs)
        if groups.num_groups != channel_norms(optimizer, self.group).numel():
            raise ValueError(
                "the model's channel groups do not match the optimizer's: build the optimizer with "
                "param_groups(model, example_inputs) of this model"
            )
        self.optimizer = optimizer
        self.macs, self.start, self.end, self.every = float(macs), start, end, every
        self.mac_model = MacModel(model, groups, _one_sample(example_inputs))
        self.steps = 0

    def budget(self) -> float:
        """The share of MACs the ramp allows at the current step."""
        progress = min(1.0, max(0.0, (self.steps - self.start) / max(1, self.end - self.start)))
        return 1.0 - (1.0 - self.macs) * (1.0 - (1.0 - progress) ** 3)

    def held(self) -> Tensor:
        """Which coupled channel groups are held out (bool per channel id)."""
        return held_channels(self.optimizer, self.group, self.mac_model.out_cut.shape[0])

    def kept_macs(self) -> float:
        """The share of MACs the channels not held out have."""
        return self.mac_model.macs(self.held()) / self.mac_model.total

    def step(self) -> None:
        """Count a step; on an update step, hold out groups until the budget is met."""
        self.steps += 1
        on_ramp = self.start <= self.steps <= self.end + self.every
        if not on_ramp or ((self.steps - self.start) % self.every and self.steps != self.end):
            return
        held = self.held()
        norms = channel_norms(self.optimizer, self.group)
        removed = self.mac_model.removal(removal_order(norms, held), self.budget()) | held
        if not torch.equal(removed, held):
            hold_out(self.optimizer, torch.nonzero(removed).flatten(), self.group)

    def state_dict(self) -> dict[str, Any]:
        """The step count and the ramp (the held set is in the optimizer's state dict)."""
        return dict(steps=self.steps, macs=self.macs, start=self.start, end=self.end, every=self.every)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`."""
        self.steps, self.start = int(state_dict["steps"]), int(state_dict["start"])
        self.end, self.every = int(state_dict["end"]), int(state_dict["every"])
        self.macs = float(state_dict["macs"])
