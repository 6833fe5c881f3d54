"""The paper's toolbox (FuSplit LBI §2 and §4) on name-indexed views of the flat buffers.

Everything here works by parameter name (``"conv1.weight"``) on the optimizer's own
tensors: ``param`` (a view into the flat weight buffer) and ``state[param]["z"]`` /
``["momentum_buffer"]`` (views into the flat Z and momentum buffers). Slots are looked up
on every call because the optimizer re-creates its buffers after ``add_param_group``,
``load_state_dict`` or ``model.to()``.

Γ = κ·prox(Z) is computed on demand (never stored), with the functions the step uses
(:mod:`slbi_triton.functional`), in float32 (float64 for float64 parameters).
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from . import functional, recording
from .buckets import FlatBucket, Slot

__all__ = ["SENTINEL_EPOCH", "LayerSparsity", "ToolboxMixin", "UnknownLayerError", "order_shape"]

SENTINEL_EPOCH = 2**20
"""Entry epoch of weights and filters that never entered the support. A power of two, so
it survives a cast of the state to float32 or bfloat16 exactly, and far above any epoch."""


def order_shape(param: Tensor, penalty: str) -> tuple[int, ...]:
    """Shape of a penalised parameter's order state (``"entry_epoch"``,
    ``"order_magnitude"``): the parameter's shape for l1, one per output filter for group."""
    return (param.shape[0],) if penalty == "group" else tuple(param.shape)


class UnknownLayerError(KeyError, ValueError):
    """A layer name that is not one of the optimizer's parameter names."""

    def __str__(self) -> str:
        # KeyError would print the message quoted, as the repr of a key.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class LayerSparsity:
    """One row of :meth:`ToolboxMixin.sparsity`.

    Attributes:
        name: the parameter's name.
        kind: ``"l1"`` (counts weights) or ``"group"`` (counts output filters / rows).
        size: number of weights (l1) or filters (group).
        support: how many of them have Γ ≠ 0.
        fraction: ``support / size``.
    """

    name: str
    kind: str
    size: int
    support: int
    fraction: float


@dataclass
class _Saved:
    """One parameter's W, Z, momentum and group norms before a ``prune_layer``/``use_w_star``."""

    param: Tensor
    weight: Tensor
    z: Tensor | None
    momentum: Tensor | None
    # ‖Z_g‖ as the step computed them: a recomputation can differ in the last bit.
    group_norms: Tensor | None


@dataclass
class _Snapshot:
    saved: list[_Saved]
    frozen: dict[Tensor, Tensor]


@dataclass
class _LayerPath:
    """Per-epoch regularisation path of one layer, kept on the CPU."""

    epochs: list[int] = field(default_factory=list)
    norms: list[Tensor] = field(default_factory=list)
    selected: list[Tensor] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """``{"epochs", "norms" (E×G), "selected" (E×G)}``; the path must not be empty."""
        return {
            "epochs": list(self.epochs),
            "norms": torch.stack(self.norms),
            "selected": torch.stack(self.selected),
        }


class ToolboxMixin:
    """Name-indexed read-outs, recording, ordering and pruning for :class:`SLBI`.

    Read-outs: :attr:`names`, :meth:`gamma`, :meth:`w_star`, :meth:`residue`,
    :meth:`sparsity`, :meth:`masks`. Regularisation path: :meth:`update_order`,
    :meth:`order_score`, :meth:`path_history`. Pruning: :meth:`prune_layer`,
    :meth:`use_w_star`, :meth:`recover`, :meth:`unfreeze`. Recording:
    ``step(record=True, path=DIR, layers=None)`` (see :mod:`slbi_triton.recording`).

    Per-parameter order state lives in ``state[param]`` (so ``state_dict()`` carries it):
    ``"entry_epoch"`` (int64; the parameter's shape for l1, ``(num_filters,)`` for group)
    and ``"order_magnitude"`` (|W| or ‖W_g‖₂ at the last :meth:`update_order`).
    """

    # Provided by SLBI / torch.optim.Optimizer.
    _slots: list[Slot]
    _buckets: list[FlatBucket]
    param_groups: list[dict[str, Any]]
    state: dict[Tensor, dict[str, Any]]

    def _init_toolbox(self) -> None:
        """Set up toolbox state after the flat buffers exist."""
        # The epoch written to the record file; the training loop sets it.
        self.current_epoch: int | None = None
        self._frozen: dict[Tensor, Tensor] = {}
        self._snapshot: _Snapshot | None = None
        self._order_path: dict[str, _LayerPath] = {}

    # -- names ----------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The parameter names, in the optimizer's parameter order."""
        self._check_named()
        return [slot.name for slot in self._slots]

    def _check_named(self) -> None:
        """Every parameter has a name, and no two share one (name lookups are unambiguous)."""
        how = "build the optimizer from model.named_parameters() or call opt.assign_name(...)"
        missing = [slot.index for slot in self._slots if slot.name is None]
        if missing:
            raise ValueError(
                f"{len(missing)} parameter(s) have no name (first: parameter {missing[0]}); {how}"
            )
        counts = Counter(slot.name for slot in self._slots)
        duplicates = sorted(name for name, count in counts.items() if count > 1)
        if duplicates:
            raise ValueError(f"several parameters share the name(s) {duplicates}; {how}")

    def _slot(self, name: Any) -> Slot:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {type(name).__name__}: {name!r}")
        names = self.names
        for slot in self._slots:
            if slot.name == name:
                return slot
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"known layers: {names}"
        raise UnknownLayerError(f"unknown layer {name!r}; {hint}")

    def _penalised_slot(self, name: Any) -> Slot:
        return self._require_penalised(self._slot(name))

    def _require_penalised(self, slot: Slot) -> Slot:
        if slot.penalty == "none":
            penalised = [s.name for s in self._slots if s.penalty != "none"]
            raise ValueError(
                f"layer {slot.name!r} has penalty 'none', so it has no Γ, support or order; "
                f"penalised layers: {penalised}"
            )
        return slot

    def _resolve_layers(self, layer_name: Any, argument: str) -> list[Slot]:
        """Slots for a name or an iterable of names (duplicates dropped, order kept)."""
        if isinstance(layer_name, str):
            layer_name = [layer_name]
        elif not isinstance(layer_name, Iterable):
            raise TypeError(f"{argument} must be a name or a list of names, got {type(layer_name).__name__}")
        slots: list[Slot] = []
        for name in layer_name:
            slot = self._slot(name)
            if all(slot is not s for s in slots):
                slots.append(slot)
        if not slots:
            raise ValueError(f"{argument} is empty; pass at least one layer name")
        return slots

    # -- read-outs ------------------------------------------------------------------

    def _hparam(self, slot: Slot, key: str) -> float:
        return float(self.param_groups[slot.group_index][key])

    def _gamma(self, slot: Slot) -> Tensor:
        """Γ of a penalised slot, computed like the step does (float32; float64 params:
        float64)."""
        z = self.state[slot.param]["z"]
        kappa, lam = self._hparam(slot, "kappa"), self._hparam(slot, "lam")
        return functional.gamma_of(z.to(_work_dtype(z)), kappa, lam, slot.penalty)

    @staticmethod
    def _selected(slot: Slot, gamma: Tensor) -> Tensor:
        """The support: bool of the parameter's shape (l1) or per filter (group)."""
        nonzero = gamma != 0
        return nonzero.reshape(slot.shape[0], -1).any(dim=1) if slot.penalty == "group" else nonzero

    @staticmethod
    def _magnitude(slot: Slot) -> Tensor:
        """|W| (l1; float64 for float64 params, else float32) or ‖W_g‖₂ per filter
        (group; float32)."""
        weight = slot.param.detach()
        if slot.penalty == "group":
            return functional.group_norms_of(weight)
        return weight.abs().to(_work_dtype(weight))

    @torch.no_grad()
    def gamma(self, name: str) -> Tensor:
        """Γ = κ·prox(Z) of a penalised layer: a new tensor of the parameter's shape and dtype.

        Args:
            name: the parameter's name.
        """
        slot = self._penalised_slot(name)
        return self._gamma(slot).to(slot.param.dtype)

    @torch.no_grad()
    def w_star(self, name: str) -> Tensor:
        """W* = W ⊙ 1[Γ ≠ 0], the sparse model read off the path (a new tensor); for a
        layer with penalty ``"none"``, a copy of W.

        Args:
            name: the parameter's name.
        """
        slot = self._slot(name)
        weight = slot.param.detach()
        if slot.penalty == "none":
            return weight.clone()
        return torch.where(self._gamma(slot) != 0, weight, torch.zeros_like(weight))

    @torch.no_grad()
    def residue(self, name: str | None = None) -> float:
        """‖W − Γ‖²/(2μ) of one penalised layer, or the sum over all penalised layers.

        Args:
            name: the parameter's name; ``None`` (default) for the total.
        """
        slots = [self._penalised_slot(name)] if name is not None else self._penalised_slots()
        return math.fsum(float(self._residue(slot)) for slot in slots)

    def _residue(self, slot: Slot, gamma: Tensor | None = None) -> Tensor:
        """‖W − Γ‖²/(2μ) as a float64 0-d tensor on the parameter's device."""
        if gamma is None:
            gamma = self._gamma(slot)
        diff = slot.param.detach().double() - gamma.double()
        return diff.square().sum() / (2.0 * self._hparam(slot, "mu"))

    def _penalised_slots(self) -> list[Slot]:
        self._check_named()
        return [slot for slot in self._slots if slot.penalty != "none"]

    @torch.no_grad()
    def sparsity(self) -> list[LayerSparsity]:
        """The support of every penalised layer: one :class:`LayerSparsity` per layer, in
        parameter order (weights for l1 layers, output filters for group layers)."""
        rows = []
        for slot in self._penalised_slots():
            selected = self._selected(slot, self._gamma(slot))
            size, support = selected.numel(), int(selected.sum())
            fraction = support / size if size else 0.0
            rows.append(LayerSparsity(slot.name, slot.penalty, size, support, fraction))
        return rows

    @torch.no_grad()
    def masks(self) -> dict[str, Tensor]:
        """``{name: 1[Γ ≠ 0]}`` for every penalised layer: bool tensors of the parameter's
        shape, elementwise (a group layer's filter in the support is all True unless its
        Z has exact zeros)."""
        return {slot.name: self._gamma(slot) != 0 for slot in self._penalised_slots()}

    # -- regularisation path --------------------------------------------------------

    @torch.no_grad()
    def update_order(self, epoch: int, keep_path: bool = True) -> None:
        """Record which weights (l1) and filters (group) are in the support at ``epoch``.

        Call it once per epoch, after the epoch's steps. Per entry it keeps the *entry
        epoch* (the smallest epoch at which it was seen with Γ ≠ 0; ``SENTINEL_EPOCH`` =
        2**20 while never seen) and the magnitude of W now (|w|, or ‖W_g‖₂ for a filter).
        The paper's order score is ``magnitude − entry epoch`` (:meth:`order_score`);
        :meth:`prune_layer` removes the lowest scores: never-selected entries first, then
        the ones that entered late, small before large.

        Args:
            epoch: the epoch that just ended, an int in ``[0, SENTINEL_EPOCH)``.
            keep_path: also append this epoch's magnitudes and support to the plotted path
                (:meth:`path_history`); costs ``4 + 1`` bytes per weight (l1) or filter
                (group) per call, on the CPU (default: ``True``).
        """
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
            raise TypeError(f"epoch must be an int, got {type(epoch).__name__}: {epoch!r}")
        if not 0 <= epoch < SENTINEL_EPOCH:
            raise ValueError(f"epoch must be in [0, {SENTINEL_EPOCH}), got {epoch}")
        epoch = int(epoch)
        for slot in self._penalised_slots():
            state = self.state[slot.param]
            selected = self._selected(slot, self._gamma(slot))
            magnitude = self._magnitude(slot)
            previous = state.get("entry_epoch")
            if previous is None:
                previous = torch.full_like(selected, SENTINEL_EPOCH, dtype=torch.int64)
            else:
                previous = _as_epochs(previous).to(selected.device)
            state["entry_epoch"] = torch.where(selected, previous.clamp(max=epoch), previous)
            state["order_magnitude"] = magnitude
            if keep_path:
                path = self._order_path.setdefault(slot.name, _LayerPath())
                path.epochs.append(epoch)
                path.norms.append(magnitude.reshape(-1).float().cpu())
                path.selected.append(selected.reshape(-1).cpu())

    @torch.no_grad()
    def order_score(self, name: str) -> Tensor:
        """The paper's order score ``magnitude − entry epoch`` at the last
        :meth:`update_order`, float64: the parameter's shape (l1) or one per filter (group).

        Args:
            name: the parameter's name.
        """
        slot = self._penalised_slot(name)
        state = self.state[slot.param]
        if "entry_epoch" not in state or "order_magnitude" not in state:
            raise ValueError(
                f"layer {name!r} has no prune order yet; call update_order(epoch) at the end of each epoch"
            )
        return state["order_magnitude"].double() - _as_epochs(state["entry_epoch"]).double()

    def path_history(self, name: str) -> dict[str, Any]:
        """The per-epoch regularisation path of a penalised layer, for plotting.

        Returns:
            ``{"epochs": [int, ...], "norms": Tensor, "selected": Tensor}``: one row per
            :meth:`update_order` call (with ``keep_path=True``); ``norms`` (float32) holds
            |w| per weight (l1) or ‖W_g‖₂ per filter (group), ``selected`` (bool) whether
            it had Γ ≠ 0; both CPU tensors of shape (epochs, weights or filters).
        """
        slot = self._penalised_slot(name)
        path = self._order_path.get(name, _LayerPath())
        width = slot.num_groups if slot.penalty == "group" else slot.numel
        if not path.epochs:
            empty = torch.empty(0, width)
            return {"epochs": [], "norms": empty, "selected": empty.bool()}
        return path.as_dict()

    # -- pruning --------------------------------------------------------------------

    @torch.no_grad()
    def prune_layer(
        self,
        percent: float,
        layer_name: str | Iterable[str],
        prune_bias: bool = False,
        freeze: bool = False,
    ) -> None:
        """Zero the ``percent``% of weights (l1) or filters (group) with the lowest order
        score (:meth:`order_score`), in each layer named.

        A layer with ``n`` weights or filters loses ``floor(percent·n/100)`` of them
        (computed exactly, so 100 removes all and 37 of 100 removes 37); equal scores go
        in index order. The pruned entries' W, Z and momentum are zeroed so that the next
        steps stay consistent. :meth:`recover` undoes the last call.

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
        for slot in self._resolve_layers(layer_name, "layer_name"):
            state = self.state[self._require_penalised(slot).param]
            if "entry_epoch" not in state or "order_magnitude" not in state:
                raise ValueError(
                    f"layer {slot.name!r} has no prune order yet; call update_order(epoch) at the end of "
                    "each epoch before prune_layer"
                )
            plans.append((slot, self._bias_of(slot) if prune_bias else None))
        self._save([p for slot, bias in plans for p in (slot, bias) if p is not None])
        frozen = dict(self._frozen)
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
        self._frozen = frozen
        self._refresh_group_norms({slot.param for slot, _ in plans})

    def _bias_of(self, slot: Slot) -> Slot | None:
        module, _, leaf = slot.name.rpartition(".")
        if leaf != "weight":
            return None
        bias_name = f"{module}.bias" if module else "bias"
        bias = next((s for s in self._slots if s.name == bias_name), None)
        if bias is not None and tuple(bias.shape) != (slot.shape[0],):
            raise ValueError(
                f"prune_bias: {bias_name!r} has shape {tuple(bias.shape)}, but {slot.name!r} has "
                f"{slot.shape[0]} outputs"
            )
        return bias

    def _lowest(self, slot: Slot, percent: float) -> Tensor:
        """Bool mask (the parameter's shape for l1, per filter for group) of the
        ``floor(percent·n/100)`` lowest order scores; ties in index order."""
        score = self.order_score(slot.name)
        flat = score.reshape(-1)
        count = math.floor(Fraction(percent) * flat.numel() / 100)
        chosen = torch.sort(flat, stable=True).indices[:count]
        pruned = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        pruned[chosen] = True
        return pruned.view(score.shape)

    @torch.no_grad()
    def use_w_star(self) -> None:
        """Replace every penalised weight by W* = W ⊙ 1[Γ ≠ 0] (see :meth:`w_star`), e.g.
        to evaluate the sparse model; :meth:`recover` gives the weights back."""
        slots = self._penalised_slots()
        supports = [self._gamma(slot) != 0 for slot in slots]
        self._save(slots)
        for slot, support in zip(slots, supports, strict=True):
            slot.param.masked_fill_(~support, 0)

    @torch.no_grad()
    def recover(self) -> None:
        """Restore, bit for bit, W, Z and momentum (and pruned biases, and frozen masks)
        as they were before the last :meth:`prune_layer` or :meth:`use_w_star`, then
        forget the saved copy."""
        if self._snapshot is None:
            raise ValueError("nothing to recover: call prune_layer(...) or use_w_star() first")
        snapshot, self._snapshot = self._snapshot, None
        slots = {slot.param: slot for slot in self._slots}
        stale_norms = set()
        for saved in snapshot.saved:
            state = self.state[saved.param]
            saved.param.copy_(saved.weight)
            if saved.z is not None and "z" in state:
                state["z"].copy_(saved.z)
            if "group_norms" in state:
                if saved.group_norms is not None:
                    state["group_norms"].copy_(saved.group_norms)
                else:  # the layer had another penalty when it was saved
                    stale_norms.add(saved.param)
            self._restore_momentum(slots[saved.param], saved.momentum)
        self._frozen = snapshot.frozen
        self._refresh_group_norms(stale_norms)

    def _restore_momentum(self, slot: Slot, momentum: Tensor | None) -> None:
        state = self.state[slot.param]
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
            bucket = self._bucket_of(slot)
            bucket.ensure_momentum()
            slot.momentum_view.copy_(momentum)
            state["momentum_buffer"] = slot.momentum_view
            slot.momentum_ready = True

    def unfreeze(self) -> None:
        """Let every entry frozen by ``prune_layer(..., freeze=True)`` train again."""
        self._frozen = {}

    def _save(self, slots: list[Slot]) -> None:
        """Keep W, Z and momentum of ``slots`` (and the frozen masks) for :meth:`recover`,
        replacing any earlier copy."""
        saved = []
        for slot in slots:
            state = self.state[slot.param]
            z, momentum, norms = state.get("z"), state.get("momentum_buffer"), state.get("group_norms")
            saved.append(
                _Saved(
                    slot.param,
                    slot.param.detach().clone(),
                    None if z is None else z.clone(),
                    None if momentum is None else momentum.clone(),
                    None if norms is None else norms.clone(),
                )
            )
        self._snapshot = _Snapshot(saved, dict(self._frozen))

    def _zero_entries(self, param: Tensor, mask: Tensor) -> None:
        """Zero W, Z and momentum of ``param`` where ``mask`` (broadcastable) is True."""
        mask = mask.to(param.device)
        param.masked_fill_(mask, 0)
        state = self.state[param]
        for key in ("z", "momentum_buffer"):
            if key in state:
                state[key].masked_fill_(mask, 0)

    def _rekey_param(self, old: Tensor, new: Tensor) -> None:
        """``new`` takes ``old``'s place (a module was given a new Parameter): move the
        frozen masks and the saved copy for :meth:`recover` over to it."""
        self._frozen = {new if p is old else p: mask for p, mask in self._frozen.items()}
        if self._snapshot is not None:
            for saved in self._snapshot.saved:
                if saved.param is old:
                    saved.param = new
            frozen = self._snapshot.frozen
            self._snapshot.frozen = {new if p is old else p: mask for p, mask in frozen.items()}

    # -- checkpoints ----------------------------------------------------------------

    def _toolbox_state_dict(self) -> dict[str, Any]:
        """What ``state_dict()["slbi"]`` holds beyond ``state[param]``: the path history
        by layer name, the frozen masks by parameter index, the step count and epoch.
        Plain ints, lists and tensors: ``torch.load(weights_only=True)`` reads them."""
        return {
            "steps": self._step_calls.steps_done,
            "current_epoch": self.current_epoch,
            "order_path": {name: path.as_dict() for name, path in self._order_path.items() if path.epochs},
            "frozen": {
                slot.index: self._frozen[slot.param] for slot in self._slots if slot.param in self._frozen
            },
        }

    @staticmethod
    def _check_toolbox_state(extras: Any, params: Mapping[Any, Tensor]) -> None:
        """Validate ``state_dict()["slbi"]`` against the parameters (by saved index)."""
        if extras is None:
            return
        if not isinstance(extras, Mapping):
            raise TypeError(f"state_dict['slbi'] must be a dict, got {type(extras).__name__}")
        for key, mask in extras.get("frozen", {}).items():
            param = params.get(key)
            if param is None:
                raise ValueError(f"state_dict['slbi']['frozen'] names parameter {key!r}, which is not loaded")
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"frozen mask of parameter {key!r} must be a bool tensor")
            if not _broadcasts_to(mask.shape, param.shape):
                raise ValueError(
                    f"frozen mask of parameter {key!r} has shape {tuple(mask.shape)}, which does not "
                    f"broadcast to the parameter's {tuple(param.shape)}"
                )
        for name, path in extras.get("order_path", {}).items():
            norms, selected = path["norms"], path["selected"]
            if norms.dim() != 2 or selected.shape != norms.shape or norms.shape[0] != len(path["epochs"]):
                raise ValueError(
                    f"path history of {name!r}: {len(path['epochs'])} epochs, norms {tuple(norms.shape)}, "
                    f"selected {tuple(selected.shape)}; expected (epochs, entries) for both"
                )

    def _load_toolbox_state(self, extras: Mapping[str, Any] | None, params: Mapping[Any, Tensor]) -> None:
        """Replace the toolbox state by ``state_dict()["slbi"]`` (checked before); a
        state dict without it (e.g. from ``torch.optim.SGD``) starts the toolbox afresh."""
        extras = extras or {}
        self._step_calls.steps_done = int(extras.get("steps", 0))
        self.current_epoch = extras.get("current_epoch")
        self._order_path = {
            name: _LayerPath(
                list(path["epochs"]),
                list(path["norms"].float().cpu().unbind(0)),
                list(path["selected"].bool().cpu().unbind(0)),
            )
            for name, path in extras.get("order_path", {}).items()
        }
        self._frozen = {
            params[key]: mask.to(params[key].device) for key, mask in extras.get("frozen", {}).items()
        }

    def _bucket_of(self, slot: Slot) -> FlatBucket:
        return next(bucket for bucket in self._buckets if any(s is slot for s in bucket.slots))

    def _refresh_group_norms(self, params: set[Tensor] | dict[Tensor, Any]) -> None:
        """Recompute ‖Z_g‖ of the buckets holding group-penalised ``params`` (their Z was
        edited outside the step)."""
        for bucket in self._buckets:
            if any(slot.penalty == "group" and slot.param in params for slot in bucket.slots):
                bucket.refresh_group_norms()

    # -- after every step -----------------------------------------------------------

    def _check_record_args(self, path: str | os.PathLike | None, layers: Iterable[str] | None) -> list[Slot]:
        """Validate ``path`` and ``layers`` of ``step(record=True, ...)``; the slots to record."""
        if path is None:
            raise ValueError("step(record=True) needs path=, the folder of the record file")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}: {path!r}")
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"path {os.fspath(path)!r} is a file; pass the folder for the record file")
        if layers is None:
            self._check_named()
            return list(self._slots)
        # Parameter order, whatever order the names come in: every step's rows line up.
        return sorted(self._resolve_layers(layers, "layers"), key=lambda slot: slot.index)

    @torch.no_grad()
    def _after_step(self, record: bool, path: str | os.PathLike | None, layers: Iterable[str] | None) -> None:
        """Work done after every step: hold frozen entries at zero, then record."""
        self._step_calls.steps_done += 1
        if self._frozen:
            for param, mask in self._frozen.items():
                self._zero_entries(param, mask)
            self._refresh_group_norms(self._frozen)
        if record:
            recording.append_records(path, self._record_rows(self._check_record_args(path, layers)))

    def _record_rows(self, slots: list[Slot]) -> list[dict[str, Any]]:
        """One record per slot; every statistic is gathered into one tensor first so the
        host waits for the device once."""
        pieces: list[Tensor] = []
        layouts = []
        for slot in slots:
            grad = slot.param.grad
            has_grad = grad is not None and slot.grad_seen
            parts = ["weight"]
            pieces.append(recording.summary_stats(slot.param))
            if has_grad:
                parts.append("grad")
                pieces.append(recording.summary_stats(grad))
            if slot.penalty != "none":
                gamma = self._gamma(slot)
                if slot.penalty == "group":
                    parts.append("filter_norm")
                    pieces.append(recording.summary_stats(functional.group_norms_of(slot.param.detach())))
                support = self._selected(slot, gamma)
                pieces.append(torch.stack([support.sum().double(), self._residue(slot, gamma)]))
            layouts.append((slot, parts))
        # One device-to-host copy (parameters on several devices: gathered on the first).
        values = torch.cat([piece.to(pieces[0].device) for piece in pieces]).tolist()
        rows, position, width = [], 0, len(recording.STATS)
        for slot, parts in layouts:
            row: dict[str, Any] = {
                "step": self._step_calls.steps_done,
                "epoch": self.current_epoch,
                "layer": slot.name,
                "penalty": slot.penalty,
                "numel": slot.numel,
            }
            for part in parts:
                stats = zip(recording.STATS, values[position : position + width], strict=True)
                row.update((f"{part}_{stat}", value) for stat, value in stats)
                position += width
            if slot.penalty != "none":
                row["support"] = round(values[position])
                row["size"] = slot.num_groups if slot.penalty == "group" else slot.numel
                row["residue"] = values[position + 1]
                position += 2
            rows.append(row)
        return rows


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _work_dtype(tensor: Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _as_epochs(entry: Tensor) -> Tensor:
    """Entry epochs as int64; ``load_state_dict`` casts state to the parameter's dtype,
    where float16 turns the sentinel into inf."""
    if entry.dtype == torch.int64:
        return entry
    return torch.nan_to_num(entry.double(), posinf=SENTINEL_EPOCH).clamp(max=SENTINEL_EPOCH).round().long()


def _check_percent(percent: Any) -> float:
    if isinstance(percent, bool) or not isinstance(percent, numbers.Real):
        raise TypeError(f"percent must be a number in [0, 100], got {type(percent).__name__}: {percent!r}")
    value = float(percent)
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise ValueError(f"percent must be in [0, 100], got {percent!r}")
    return value
