"""Pruning by the paper's order, W*, and bit-exact recovery (FuSplit LBI §4).

:class:`Pruner` zeroes entries of W, Z and momentum in place (views into the flat
buffers) and keeps the masks of frozen entries, which the flat storage holds at zero
after every step (``FlatBucket.apply_frozen``).

``recover()`` undoes every ``prune_layer`` and ``use_w_star`` since the last
``recover()``: each layer is saved once, before the first call that changes it, as the
paper's toolbox saves each parameter. A step trains on from the changed weights, so it
*commits* the changes: the saved copy is dropped with a warning, and ``recover()`` then
says why there is nothing to recover (rather than throw the step away).
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from .buckets import Slot
from .storage import FlatStorage
from .toolbox import OptimizerView, Toolbox


@dataclass
class _Saved:
    """One parameter's W, Z, momentum and group norms before a ``prune_layer``/``use_w_star``."""

    param: Tensor
    weight: Tensor
    z: Tensor | None
    momentum: Tensor | None
    # ‖Z_g‖ as the step computed them: a recomputation can differ in the last bit.
    group_norms: Tensor | None

    def as_dict(self) -> dict[str, Tensor]:
        """The tensors it has, by :data:`SAVED_KEYS` (a checkpoint's form)."""
        tensors = (self.weight, self.z, self.momentum, self.group_norms)
        return {key: t for key, t in zip(SAVED_KEYS, tensors, strict=True) if t is not None}


@dataclass
class _Snapshot:
    """What :meth:`Pruner.recover` restores: each changed parameter as it was before the
    first call that changed it, and the frozen masks before the first call."""

    saved: list[_Saved]
    frozen: dict[Tensor, Tensor]
    # steps_done() when it was taken: a later step commits the changes.
    steps: int
    # The calls it undoes, for messages ("prune_layer(50, ['0.weight'])").
    calls: list[str]

    def holds(self, param: Tensor) -> bool:
        return any(saved.param is param for saved in self.saved)


class Pruner:
    """``prune_layer``, ``use_w_star``, ``recover`` and ``unfreeze`` for one optimizer.

    Args:
        toolbox: the optimizer's toolbox (names, Γ, order scores).
        optimizer: the optimizer (read through its public ``state``).
        storage: its flat storage (frozen masks, group norms).
    """

    def __init__(self, toolbox: Toolbox, optimizer: OptimizerView, storage: FlatStorage) -> None:
        self.toolbox = toolbox
        self.optimizer = optimizer
        self.storage = storage
        self.frozen: dict[Tensor, Tensor] = {}
        self.snapshot: _Snapshot | None = None
        # The calls a step committed last (recover() says so), until the next save.
        self.committed: list[str] = []

    @torch.no_grad()
    def prune_layer(
        self, percent: float, layer_name: str | Iterable[str], prune_bias: bool = False, freeze: bool = False
    ) -> None:
        """Zero the ``percent``% of weights (l1) or filters (group) with the lowest order
        score (:meth:`order_score`), in each layer named.

        A layer with ``n`` weights or filters loses ``floor(percent·n/100)`` of them
        (computed exactly, so 100 removes all and 37 of 100 removes 37); equal scores go
        in index order. The pruned entries' W, Z and momentum are zeroed so that the next
        steps stay consistent. :meth:`recover` undoes it, with every other ``prune_layer``
        and :meth:`use_w_star` since the last ``recover()``, until a step commits them.

        Args:
            percent: share to prune, in ``[0, 100]``.
            layer_name: a parameter name or a list of names (penalised layers).
            prune_bias: also zero the bias entries (W and momentum) of the outputs pruned
                entirely: a pruned filter, or a row of an l1 layer whose weights were all
                pruned. The bias is the parameter of the same module (``conv1.weight`` →
                ``conv1.bias``); layers without one are pruned without (default: ``False``).
            freeze: keep the pruned entries (and bias entries) at zero in every later step,
                the paper authors' ``step_with_freeze``, until :meth:`unfreeze` or
                :meth:`recover` (default: ``False``).
        """
        percent = _check_percent(percent)
        plans = []
        for slot in self.toolbox.resolve_layers(layer_name, "layer_name"):
            self.toolbox.require_order(self.toolbox.require_penalised(slot), " before prune_layer")
            plans.append((slot, self._bias_of(slot) if prune_bias else None))
        call = f"prune_layer({percent:g}, {[slot.name for slot, _ in plans]})"
        self._save([p for slot, bias in plans for p in (slot, bias) if p is not None], call)
        frozen = dict(self.frozen)
        for slot, bias in plans:
            pruned = self._lowest(slot, percent)
            # A group layer's mask stays (filters, 1, ...): masked_fill_ broadcasts it.
            mask = pruned.view(-1, *([1] * (slot.param.dim() - 1))) if slot.penalty == "group" else pruned
            self._zero_entries(slot.param, mask)
            masked = {slot.param: mask}
            if bias is not None:
                # Outputs pruned entirely: the filter, or every weight of an l1 row.
                bias_mask = pruned.reshape(slot.shape[0], -1).all(dim=1)
                self._zero_entries(bias.param, bias_mask)
                masked[bias.param] = bias_mask
            if freeze:
                for param, new in masked.items():
                    old = frozen.get(param)
                    frozen[param] = new if old is None else old | new.to(old.device)
        self.set_frozen(frozen)
        self._refresh_norms([slot for slot, _ in plans])

    def _bias_of(self, slot: Slot) -> Slot | None:
        module, _, leaf = slot.name.rpartition(".")
        if leaf != "weight":
            return None
        bias_name = f"{module}.bias" if module else "bias"
        bias = next((s for s in self.storage.slots if s.name == bias_name), None)
        if bias is not None and tuple(bias.shape) != (slot.shape[0],):
            raise ValueError(
                f"prune_bias: {bias_name!r} has shape {tuple(bias.shape)}, but {slot.name!r} has "
                f"{slot.shape[0]} outputs"
            )
        return bias

    def _lowest(self, slot: Slot, percent: float) -> Tensor:
        """Bool mask (the parameter's shape for l1, per filter for group) of the
        ``floor(percent·n/100)`` lowest order scores; ties in index order."""
        score = self.toolbox.order_score(slot.name)
        flat = score.reshape(-1)
        count = math.floor(Fraction(percent) * flat.numel() / 100)
        chosen = torch.sort(flat, stable=True).indices[:count]
        pruned = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        pruned[chosen] = True
        return pruned.view(score.shape)

    @torch.no_grad()
    def use_w_star(self) -> None:
        """Replace every penalised weight by W* = W ⊙ 1[Γ ≠ 0] (see :meth:`w_star`), e.g.
        to evaluate the sparse model; :meth:`recover` gives the weights back (a step in
        between commits W*)."""
        slots = self.toolbox.penalised_slots()
        supports = [self.toolbox.gamma_of(slot) != 0 for slot in slots]
        self._save(slots, "use_w_star()")
        for slot, support in zip(slots, supports, strict=True):
            slot.param.masked_fill_(~support, 0)

    @torch.no_grad()
    def recover(self) -> None:
        """Restore, bit for bit, W, Z and momentum (and pruned biases, and frozen masks)
        as they were before the first :meth:`prune_layer` or :meth:`use_w_star` since the
        last ``recover()``, then forget the saved copies.

        Raises:
            ValueError: nothing to recover: no such call, or a step after it committed
                the changes (the step's work is never thrown away).
        """
        self.commit_if_stepped()
        if self.snapshot is None:
            if self.committed:
                raise ValueError(
                    f"nothing to recover: a step after {' and '.join(self.committed)} trained on from the "
                    "changed weights and so kept the changes; call recover() before step() to undo them"
                )
            raise ValueError("nothing to recover: call prune_layer(...) or use_w_star() first")
        snapshot, self.snapshot = self.snapshot, None
        stale_norms = []
        for saved in snapshot.saved:
            state = self.optimizer.state[saved.param]
            slot = self.storage.slot_of(saved.param)
            saved.param.copy_(saved.weight)
            if saved.z is not None and "z" in state:
                state["z"].copy_(saved.z)
            if "group_norms" in state:
                if saved.group_norms is not None:
                    state["group_norms"].copy_(saved.group_norms)
                else:  # the layer had another penalty when it was saved
                    stale_norms.append(slot)
            self._restore_momentum(slot, saved.momentum)
        self.set_frozen(snapshot.frozen)
        self._refresh_norms(stale_norms)
        for bucket in self.storage.buckets:  # the own norms were restored: the coupled follow
            bucket.refresh_coupled_norms()

    def commit_if_stepped(self) -> None:
        """Drop the saved copies, with a warning, if a step ran since they were taken: the
        step trained on from the pruned weights or W*, which recover() must not undo.
        The eager step calls it; a compiled step is seen by the next toolbox call."""
        snapshot = self.snapshot
        if snapshot is None or self.storage.steps_done() == snapshot.steps:
            return
        self.snapshot, self.committed = None, snapshot.calls
        layers = [self.storage.slot_of(saved.param).name for saved in snapshot.saved]
        warnings.warn(
            f"SLBI.step() after {' and '.join(snapshot.calls)} keeps the changes: the step trained on from "
            f"them, so recover() can no longer undo them, and the saved copies of {layers} are dropped "
            "(call recover() before step() to undo the changes)",
            UserWarning,
            stacklevel=_caller_level(),
        )

    def _restore_momentum(self, slot: Slot, momentum: Tensor | None) -> None:
        state = self.optimizer.state[slot.param]
        current = state.get("momentum_buffer")
        if momentum is None:
            # No momentum before (no step yet): the next step starts it afresh, as it would have.
            if current is not None:
                del state["momentum_buffer"]
                slot.momentum_ready = False
        elif current is not None:
            current.copy_(momentum)
        else:
            # The buffer went away in between (load_state_dict): bind it again, as the step does.
            self.storage.bucket_of(slot).ensure_momentum()
            slot.momentum_view.copy_(momentum)
            state["momentum_buffer"] = slot.momentum_view
            slot.momentum_ready = True

    def unfreeze(self) -> None:
        """Let every entry frozen by ``prune_layer(..., freeze=True)`` train again."""
        self.set_frozen({})

    def set_frozen(self, frozen: dict[Tensor, Tensor]) -> None:
        self.frozen = frozen
        self.storage.set_frozen(frozen)

    def _save(self, slots: list[Slot], call: str) -> None:
        """Keep W, Z and momentum of those ``slots`` not saved yet (and the frozen masks,
        on the first call) for :meth:`recover`; ``call`` names the change."""
        self.commit_if_stepped()
        if self.snapshot is None:
            self.snapshot = _Snapshot([], dict(self.frozen), self.storage.steps_done(), [])
            self.committed = []
        for slot in slots:
            if self.snapshot.holds(slot.param):
                continue
            state = self.optimizer.state[slot.param]
            z, momentum, norms = state.get("z"), state.get("momentum_buffer"), state.get("group_norms")
            copies = [None if t is None else t.clone() for t in (z, momentum, norms)]
            self.snapshot.saved.append(_Saved(slot.param, slot.param.detach().clone(), *copies))
        self.snapshot.calls.append(call)

    def _zero_entries(self, param: Tensor, mask: Tensor) -> None:
        """Zero W, Z and momentum of ``param`` where ``mask`` (broadcastable) is True."""
        mask = mask.to(param.device)
        param.masked_fill_(mask, 0)
        state = self.optimizer.state[param]
        for key in ("z", "momentum_buffer"):
            if key in state:
                state[key].masked_fill_(mask, 0)

    def _refresh_norms(self, slots: list[Slot]) -> None:
        """‖Z_g‖ of group-penalised ``slots`` whose Z was edited outside the step."""
        for slot in slots:
            if slot is not None and slot.penalty == "group":
                self.storage.bucket_of(slot).refresh_group_norms([slot])

    def rekey(self, old: Tensor, new: Tensor) -> None:
        """``new`` takes ``old``'s place (a module was given a new Parameter): move the
        frozen masks and the saved copy for :meth:`recover` over to it."""
        self.set_frozen({new if p is old else p: mask for p, mask in self.frozen.items()})
        if self.snapshot is not None:
            for saved in self.snapshot.saved:
                if saved.param is old:
                    saved.param = new
            frozen = self.snapshot.frozen
            self.snapshot.frozen = {new if p is old else p: mask for p, mask in frozen.items()}

    # -- checkpoints ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The frozen masks by parameter index, and the saved copies for :meth:`recover`
        while there are any (``"snapshot"``)."""
        slots = self.storage.slots
        index = {slot.param: slot.index for slot in slots}
        out: dict[str, Any] = {"frozen": _by_index(self.frozen, slots)}
        snapshot = self.snapshot
        if snapshot is not None:
            out["snapshot"] = {
                "steps": snapshot.steps,
                "calls": list(snapshot.calls),
                "frozen": _by_index(snapshot.frozen, slots),
                "saved": {index[entry.param]: entry.as_dict() for entry in snapshot.saved},
            }
        return out

    @staticmethod
    def check_state(extras: Mapping[str, Any], params: Mapping[Any, Tensor]) -> None:
        """Validate the frozen masks and the snapshot of ``state_dict()["slbi"]`` against
        the parameters (by saved index)."""
        _check_masks(extras.get("frozen", {}), params, "state_dict['slbi']['frozen']")
        if "snapshot" not in extras:
            return
        where = "state_dict['slbi']['snapshot']"
        snapshot = extras["snapshot"]
        if not isinstance(snapshot, Mapping) or not {"steps", "calls", "frozen", "saved"} <= snapshot.keys():
            raise TypeError(f"{where} must be a dict with 'steps', 'calls', 'frozen' and 'saved'")
        steps, calls = snapshot["steps"], snapshot["calls"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise TypeError(f"{where}['steps'] must be an int >= 0, got {steps!r}")
        if not isinstance(calls, list) or not all(isinstance(call, str) for call in calls):
            raise TypeError(f"{where}['calls'] must be a list of strings")
        _check_masks(snapshot["frozen"], params, f"{where}['frozen']")
        for key, entry in snapshot["saved"].items():
            _check_saved(entry, params.get(key), f"{where}['saved'][{key!r}]")

    def load_state(self, extras: Mapping[str, Any], params: Mapping[Any, Tensor]) -> None:
        """Replace the frozen masks by those of ``state_dict()["slbi"]`` (checked before),
        and the saved copies by its snapshot if it has one (else they stay, and a load is
        not a step: they count from the loaded step count)."""
        self.set_frozen(_masks_on(extras.get("frozen", {}), params))
        snapshot = extras.get("snapshot")
        if snapshot is None:
            if self.snapshot is not None:
                self.snapshot.steps = self.storage.steps_done()
            return
        saved = []
        for key, entry in snapshot["saved"].items():
            param = params[key]
            tensors = [entry.get(name) for name in SAVED_KEYS]
            saved.append(_Saved(param, *(None if t is None else t.to(param.device) for t in tensors)))
        frozen = _masks_on(snapshot["frozen"], params)
        self.snapshot = _Snapshot(saved, frozen, int(snapshot["steps"]), list(snapshot["calls"]))
        self.committed = []


SAVED_KEYS = ("weight", "z", "momentum_buffer", "group_norms")
"""Per parameter in a checkpoint's snapshot: W, and Z, momentum and group norms if it had them."""


def _check_masks(masks: Any, params: Mapping[Any, Tensor], where: str) -> None:
    for key, mask in masks.items():
        param = params.get(key)
        if param is None:
            raise ValueError(f"{where} names parameter {key!r}, which is not loaded")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"frozen mask of parameter {key!r} must be a bool tensor")
        if not _broadcasts_to(mask.shape, param.shape):
            raise ValueError(
                f"frozen mask of parameter {key!r} has shape {tuple(mask.shape)}, which does not "
                f"broadcast to the parameter's {tuple(param.shape)}"
            )


def _check_saved(entry: Any, param: Tensor | None, where: str) -> None:
    """One parameter's saved copies in a checkpoint's snapshot."""
    if param is None:
        raise ValueError(f"{where}: no such parameter is loaded")
    if not isinstance(entry, Mapping) or "weight" not in entry or not set(entry) <= set(SAVED_KEYS):
        raise TypeError(f"{where} must be a dict with 'weight' and any of {SAVED_KEYS}")
    for name, tensor in entry.items():
        shape = (param.shape[0],) if name == "group_norms" else tuple(param.shape)
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point() or tuple(tensor.shape) != shape:
            raise ValueError(f"{where}[{name!r}] must be a floating-point tensor of shape {shape}")


def _by_index(masks: Mapping[Tensor, Tensor], slots: list[Slot]) -> dict[int, Tensor]:
    return {slot.index: masks[slot.param] for slot in slots if slot.param in masks}


def _masks_on(masks: Mapping[Any, Tensor], params: Mapping[Any, Tensor]) -> dict[Tensor, Tensor]:
    return {params[key]: mask.to(params[key].device) for key, mask in masks.items()}


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _check_percent(percent: Any) -> float:
    if isinstance(percent, bool) or not isinstance(percent, numbers.Real):
        raise TypeError(f"percent must be a number in [0, 100], got {type(percent).__name__}: {percent!r}")
    value = float(percent)
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise ValueError(f"percent must be in [0, 100], got {percent!r}")
    return value


def _caller_level() -> int:
    """``stacklevel`` for a warning raised here that points at the user's line: the first
    frame (from the caller of ``warnings.warn``) outside slbi_triton and torch."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _LIBRARIES:
        frame, level = frame.f_back, level + 1
    return level


_LIBRARIES = ("slbi_triton", "torch")
