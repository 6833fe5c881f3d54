"""The paper's toolbox (FuSplit LBI §2 and §4) by layer name: read-outs, the regularisation
path, the prune order and recording.

:class:`Toolbox` works on the optimizer's own tensors through an explicit interface: the
optimizer's public ``state`` and ``param_groups`` (``param`` is a view into the flat weight
buffer, ``state[param]["z"]`` / ``["momentum_buffer"]`` views into the flat Z and
momentum buffers) and the :class:`~slbi_triton.storage.FlatStorage` that maps names to
slots. Γ = κ·prox(Z) is computed on demand (never stored) with the step's own functions
(:mod:`slbi_triton.functional`). Pruning lives in :mod:`slbi_triton.pruning`.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from . import functional, recording
from .buckets import Slot
from .names import module_path, unwrapped
from .storage import FlatStorage

__all__ = ["SENTINEL_EPOCH", "LayerSparsity", "Toolbox", "UnknownLayerError", "order_shape"]

SENTINEL_EPOCH = 2**20
"""Entry epoch of weights and filters that never entered the support. A power of two, so
it survives a cast of the state to float32 or bfloat16 exactly, and far above any epoch."""

ORDER_STATE_KEYS = ("entry_epoch", "order_magnitude")
"""Per-parameter state the toolbox keeps in ``optimizer.state[param]``."""


class OptimizerView(Protocol):
    """What the toolbox reads of its optimizer: torch.optim's public attributes."""

    state: dict[Tensor, dict[str, Any]]
    param_groups: list[dict[str, Any]]
    current_epoch: int | None


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
    """One row of ``SLBI.sparsity()``.

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


class Toolbox:
    """Name-indexed read-outs, the regularisation path and recording for one optimizer.

    Args:
        optimizer: the optimizer (read through :class:`OptimizerView` only).
        storage: its flat storage (slots by name, buckets).
    """

    def __init__(self, optimizer: OptimizerView, storage: FlatStorage) -> None:
        self.optimizer = optimizer
        self.storage = storage
        self.order_path: dict[str, _LayerPath] = {}
        # Other names of tied weights (named_parameters(remove_duplicate=False)): the
        # parameter's index (stable across assign_name and re-bound parameters).
        self.aliases: dict[str, int] = {}

    # -- names ----------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The parameter names, in the optimizer's parameter order."""
        self.check_named()
        return [slot.name for slot in self.storage.slots]

    def check_named(self) -> None:
        """Every parameter has a name, and no two share one (name lookups are unambiguous)."""
        how = "build the optimizer from model.named_parameters() or call opt.assign_name(...)"
        missing = [slot.index for slot in self.storage.slots if slot.name is None]
        if missing:
            first = missing[0]
            raise ValueError(f"{len(missing)} parameter(s) have no name (first: parameter {first}); {how}")
        counts = Counter(slot.name for slot in self.storage.slots)
        duplicates = sorted(name for name, count in counts.items() if count > 1)
        if duplicates:
            raise ValueError(f"several parameters share the name(s) {duplicates}; {how}")

    def slot(self, name: Any) -> Slot:
        """The slot of the parameter called ``name``: its name in the optimizer, that name
        with or without wrapper prefixes (DDP ``module.``, ``torch.compile``'s
        ``_orig_mod.``, FSDP's ``_fsdp_wrapped_module.``), or another name of a tied weight
        the optimizer was given (:attr:`aliases`). An unknown name lists close ones."""
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {type(name).__name__}: {name!r}")
        names = self.names
        slots = self.storage.slots
        for slot in slots:
            if slot.name == name:
                return slot
        if name in self.aliases:
            return slots[self.aliases[name]]
        key = unwrapped(name)
        found = {id(s): s for s in slots if unwrapped(s.name) == key}
        found.update((id(slots[i]), slots[i]) for alias, i in self.aliases.items() if unwrapped(alias) == key)
        if len(found) == 1:
            return next(iter(found.values()))
        if found:
            matches = sorted(s.name for s in found.values())
            raise UnknownLayerError(f"layer {name!r} is ambiguous: without wrapper prefixes, {matches}")
        raise UnknownLayerError(_unknown_message(name, names))

    def penalised_slot(self, name: Any) -> Slot:
        return self.require_penalised(self.slot(name))

    def require_penalised(self, slot: Slot) -> Slot:
        if slot.penalty == "none":
            penalised = [s.name for s in self.storage.slots if s.penalty != "none"]
            raise ValueError(
                f"layer {slot.name!r} has penalty 'none', so it has no Γ, support or order; "
                f"penalised layers: {penalised}"
            )
        return slot

    def resolve_layers(self, layer_name: Any, argument: str) -> list[Slot]:
        """Slots for a name or an iterable of names (duplicates dropped, order kept)."""
        if isinstance(layer_name, str):
            layer_name = [layer_name]
        elif not isinstance(layer_name, Iterable):
            raise TypeError(f"{argument} must be a name or a list of names, got {type(layer_name).__name__}")
        slots: list[Slot] = []
        for name in layer_name:
            slot = self.slot(name)
            if all(slot is not s for s in slots):
                slots.append(slot)
        if not slots:
            raise ValueError(f"{argument} is empty; pass at least one layer name")
        return slots

    def penalised_slots(self) -> list[Slot]:
        self.check_named()
        return [slot for slot in self.storage.slots if slot.penalty != "none"]

    # -- read-outs ------------------------------------------------------------------

    def hparam(self, slot: Slot, key: str) -> float:
        return float(self.optimizer.param_groups[slot.group_index][key])

    def gamma_of(self, slot: Slot) -> Tensor:
        """Γ of a penalised slot, computed like the step does (float32; float64 params:
        float64): a row in a coupled channel group shrinks by its group's norm."""
        z = self.optimizer.state[slot.param]["z"].to(functional.compute_dtype(slot.param.dtype))
        kappa, lam = self.hparam(slot, "kappa"), self.hparam(slot, "lam")
        norms = None
        if slot.penalty == "group" and slot.channel_ids is not None:
            norms = self.storage.bucket_of(slot).prox_norms_of(slot, functional.group_norms_of(z))
        return functional.gamma_of(z, kappa, lam, slot.penalty, norms)

    @staticmethod
    def selected(slot: Slot, gamma: Tensor) -> Tensor:
        """The support: bool of the parameter's shape (l1) or per filter (group)."""
        nonzero = gamma != 0
        return nonzero.reshape(slot.shape[0], -1).any(dim=1) if slot.penalty == "group" else nonzero

    @staticmethod
    def magnitude(slot: Slot) -> Tensor:
        """|W| (l1) or ‖W_g‖₂ per filter (group), float32 (float64 for float64 params)."""
        weight = slot.param.detach()
        if slot.penalty == "group":
            return functional.group_norms_of(weight)
        return weight.abs().to(functional.compute_dtype(weight.dtype))

    @torch.no_grad()
    def gamma(self, name: str) -> Tensor:
        """Γ = κ·prox(Z) of a penalised layer: a new tensor of the parameter's shape and dtype.

        Args:
            name: the parameter's name.
        """
        slot = self.penalised_slot(name)
        return self.gamma_of(slot).to(slot.param.dtype)

    @torch.no_grad()
    def w_star(self, name: str) -> Tensor:
        """W* = W ⊙ 1[Γ ≠ 0], the sparse model read off the path (a new tensor); for a
        layer with penalty ``"none"``, a copy of W.

        Args:
            name: the parameter's name.
        """
        slot = self.slot(name)
        weight = slot.param.detach()
        if slot.penalty == "none":
            return weight.clone()
        return torch.where(self.gamma_of(slot) != 0, weight, torch.zeros_like(weight))

    @torch.no_grad()
    def residue(self, name: str | None = None) -> float:
        """‖W − Γ‖²/(2μ) of one penalised layer, or the sum over all penalised layers.

        Args:
            name: the parameter's name; ``None`` (default) for the total.
        """
        slots = [self.penalised_slot(name)] if name is not None else self.penalised_slots()
        return math.fsum(float(self.residue_of(slot)) for slot in slots)

    def residue_of(self, slot: Slot, gamma: Tensor | None = None) -> Tensor:
        """‖W − Γ‖²/(2μ) as a float64 0-d tensor on the parameter's device."""
        if gamma is None:
            gamma = self.gamma_of(slot)
        diff = slot.param.detach().double() - gamma.double()
        return diff.square().sum() / (2.0 * self.hparam(slot, "mu"))

    @torch.no_grad()
    def sparsity(self) -> list[LayerSparsity]:
        """The support of every penalised layer: one :class:`LayerSparsity` per layer, in
        parameter order (weights for l1 layers, output filters for group layers)."""
        rows = []
        for slot in self.penalised_slots():
            chosen = self.selected(slot, self.gamma_of(slot))
            size, support = chosen.numel(), int(chosen.sum())
            fraction = support / size if size else 0.0
            rows.append(LayerSparsity(slot.name, slot.penalty, size, support, fraction))
        return rows

    @torch.no_grad()
    def masks(self) -> dict[str, Tensor]:
        """``{name: 1[Γ ≠ 0]}`` for every penalised layer: bool tensors of the parameter's
        shape, elementwise (a group layer's filter in the support is all True unless its
        Z has exact zeros)."""
        return {slot.name: self.gamma_of(slot) != 0 for slot in self.penalised_slots()}

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
        for slot in self.penalised_slots():
            state = self.optimizer.state[slot.param]
            chosen = self.selected(slot, self.gamma_of(slot))
            magnitude = self.magnitude(slot)
            previous = state.get("entry_epoch")
            if previous is None:
                previous = torch.full_like(chosen, SENTINEL_EPOCH, dtype=torch.int64)
            else:
                previous = as_epochs(previous).to(chosen.device)
            state["entry_epoch"] = torch.where(chosen, previous.clamp(max=epoch), previous)
            state["order_magnitude"] = magnitude
            if keep_path:
                path = self.order_path.setdefault(slot.name, _LayerPath())
                path.epochs.append(epoch)
                path.norms.append(magnitude.reshape(-1).float().cpu())
                path.selected.append(chosen.reshape(-1).cpu())

    @torch.no_grad()
    def order_score(self, name: str) -> Tensor:
        """The paper's order score ``magnitude − entry epoch`` at the last
        :meth:`update_order`, float64: the parameter's shape (l1) or one per filter (group).

        Args:
            name: the parameter's name.
        """
        state = self.require_order(self.penalised_slot(name))
        return state["order_magnitude"].double() - as_epochs(state["entry_epoch"]).double()

    def require_order(self, slot: Slot, before: str = "") -> dict[str, Any]:
        """The state of a penalised slot that has a prune order (raises if it has none yet;
        ``before`` ends the message, e.g. ``" before prune_layer"``)."""
        state = self.optimizer.state[slot.param]
        if "entry_epoch" not in state or "order_magnitude" not in state:
            raise ValueError(
                f"layer {slot.name!r} has no prune order yet; call update_order(epoch) at the end of "
                f"each epoch{before}"
            )
        return state

    def path_history(self, name: str) -> dict[str, Any]:
        """The per-epoch regularisation path of a penalised layer, for plotting.

        Returns:
            ``{"epochs": [int, ...], "norms": Tensor, "selected": Tensor}``: one row per
            :meth:`update_order` call (with ``keep_path=True``); ``norms`` (float32) holds
            |w| per weight (l1) or ‖W_g‖₂ per filter (group), ``selected`` (bool) whether
            it had Γ ≠ 0; both CPU tensors of shape (epochs, weights or filters).
        """
        slot = self.penalised_slot(name)
        path = self.order_path.get(slot.name, _LayerPath())
        width = slot.num_groups if slot.penalty == "group" else slot.numel
        if not path.epochs:
            empty = torch.empty(0, width)
            return {"epochs": [], "norms": empty, "selected": empty.bool()}
        return path.as_dict()

    def forget_order(self, params: list[Tensor]) -> None:
        """Drop the order state and path of ``params`` (their penalty changed)."""
        for slot in self.storage.slots:
            if any(slot.param is param for param in params):
                for key in ORDER_STATE_KEYS:
                    self.optimizer.state[slot.param].pop(key, None)
                self.order_path.pop(slot.name, None)

    # -- checkpoints ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The path history by layer name (plain lists and tensors, for ``weights_only``)."""
        return {"order_path": {name: path.as_dict() for name, path in self.order_path.items() if path.epochs}}

    @staticmethod
    def check_state(extras: Mapping[str, Any]) -> None:
        """Validate the path history of ``state_dict()["slbi"]``."""
        for name, path in extras.get("order_path", {}).items():
            norms, chosen = path["norms"], path["selected"]
            if norms.dim() != 2 or chosen.shape != norms.shape or norms.shape[0] != len(path["epochs"]):
                raise ValueError(
                    f"path history of {name!r}: {len(path['epochs'])} epochs, norms {tuple(norms.shape)}, "
                    f"selected {tuple(chosen.shape)}; expected (epochs, entries) for both"
                )

    def load_state(self, extras: Mapping[str, Any]) -> None:
        """Replace the path history by that of ``state_dict()["slbi"]`` (checked before)."""
        self.order_path = {
            name: _LayerPath(
                list(path["epochs"]),
                list(path["norms"].float().cpu().unbind(0)),
                list(path["selected"].bool().cpu().unbind(0)),
            )
            for name, path in extras.get("order_path", {}).items()
        }

    # -- recording ------------------------------------------------------------------

    def record_slots(self, path: str | os.PathLike | None, layers: Iterable[str] | None) -> list[Slot]:
        """Validate ``path`` and ``layers`` of ``step(record=True, ...)``; the slots to record."""
        if path is None:
            raise ValueError("step(record=True) needs path=, the folder of the record file")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}: {path!r}")
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"path {os.fspath(path)!r} is a file; pass the folder for the record file")
        if layers is None:
            self.check_named()
            return list(self.storage.slots)
        # Parameter order, whatever order the names come in: every step's rows line up.
        return sorted(self.resolve_layers(layers, "layers"), key=lambda slot: slot.index)

    @torch.no_grad()
    def record(self, path: str | os.PathLike, slots: list[Slot]) -> None:
        """Append one record per slot; every statistic is gathered into one tensor first,
        so the host waits for the device once."""
        pieces: list[Tensor] = []
        layouts = []
        for slot in slots:
            grad = slot.param.grad
            parts = ["weight"]
            pieces.append(recording.summary_stats(slot.param))
            if grad is not None and slot.grad_seen:
                parts.append("grad")
                pieces.append(recording.summary_stats(grad))
            if slot.penalty != "none":
                gamma = self.gamma_of(slot)
                if slot.penalty == "group":
                    parts.append("filter_norm")
                    pieces.append(recording.summary_stats(self.magnitude(slot)))
                support = self.selected(slot, gamma)
                pieces.append(torch.stack([support.sum().double(), self.residue_of(slot, gamma)]))
            layouts.append((slot, parts))
        values = torch.cat([piece.to(pieces[0].device) for piece in pieces]).tolist()
        step, epoch = self.storage.steps_done(), self.optimizer.current_epoch
        rows, position, width = [], 0, len(recording.STATS)
        for slot, parts in layouts:
            row: dict[str, Any] = {
                "step": step,
                "epoch": epoch,
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
        recording.append_records(path, rows)


def _unknown_message(name: str, names: list[str]) -> str:
    """Close matches, and what a tied weight looks like: a known leaf (``weight``) of a
    module that owns none of the known names (``head`` in ``head.weight``)."""
    close = difflib.get_close_matches(name, names, n=3)
    message = f"unknown layer {name!r}; " + (
        f"did you mean {', '.join(map(repr, close))}?" if close else f"known layers: {names}"
    )
    leaf = name.rpartition(".")[2]
    modules = {module_path(known) for known in names}
    if any(known.rpartition(".")[2] == leaf for known in names) and module_path(name) not in modules:
        message += (
            f" If {name!r} is tied to one of them (the same tensor under two names), "
            "named_parameters() lists it under its first name only: build the optimizer from "
            "named_parameters(remove_duplicate=False) to use both names."
        )
    return message


def as_epochs(entry: Tensor) -> Tensor:
    """Entry epochs as int64; ``load_state_dict`` casts state to the parameter's dtype,
    where float16 turns the sentinel into inf."""
    if entry.dtype == torch.int64:
        return entry
    return torch.nan_to_num(entry.double(), posinf=SENTINEL_EPOCH).clamp(max=SENTINEL_EPOCH).round().long()
