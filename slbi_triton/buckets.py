"""Flat multi-tensor buffers: one contiguous buffer per quantity and (device, dtype).

A :class:`FlatBucket` owns the flat ``params``, ``grads``, ``z`` and ``momentum`` buffers
of every parameter of one (device, dtype), its group norms and its step counter; a
:class:`Slot` is one parameter's place in it. Each parameter's ``.data``, ``.grad`` and
state tensors are views into these buffers (docs/design.md, "The flat buffers").

Coupled channel groups (docs/design.md, "Coupled channel groups"): rows of group-penalised
slots that share a ``channel_ids`` value within their param group shrink together; the
bucket builds the ABI's coupled tables for them (:attr:`FlatBucket.coupling`) and keeps the
coupled norms after its rows' own norms in :attr:`FlatBucket.group_norms`.

Layout: slots are sorted by (param group, penalty, group size, parameter order), so that
the torch backend updates long *runs* sharing hyper-parameters with a few vectorised ops;
every slot starts at a multiple of ``abi.SLOT_ALIGNMENT`` elements. Padding stays zero in
every buffer and the update keeps it zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import functional, hugepages
from .kernels import abi


@dataclass
class Slot:
    """One parameter's place in a :class:`FlatBucket`."""

    param: torch.nn.Parameter
    name: str | None
    index: int  # position in the optimizer's parameter order (state_dict index)
    group_index: int  # the param group (row of the hyper-parameter table)
    penalty: str  # "l1", "group" or "none"
    # Per row (dim 0) the coupled-group id within the param group, -1 for none (CPU int64).
    channel_ids: Tensor | None = None
    follows: bool = False  # its rows follow their coupled group without counting in its norm
    offset: int = 0  # first element in the flat buffers
    norm_offset: int = 0  # first group norm (group penalty)
    strides: tuple[int, ...] = ()
    param_view: Tensor | None = None
    grad_view: Tensor | None = None
    z_view: Tensor | None = None
    momentum_view: Tensor | None = None
    grad_seen: bool = False  # a gradient arrived since the last zero_grad()
    # [version of the flat gradient buffer at the last write the optimizer knows of], one
    # cell shared by the slots of a bucket (storage: was ``.grad`` written in place?).
    grad_record: list[int] = field(default_factory=lambda: [0])
    momentum_ready: bool = False  # the momentum buffer holds v_t
    hook_handle: object | None = field(default=None, repr=False)
    impl: int = 0  # the parameter's TensorImpl when bound (torch_private.impl_id)
    data_ptr: int = 0  # where ``param_view`` starts, for the per-step binding check
    grad_ptr: int = 0  # where ``grad_view`` starts: a swapped ``.grad`` moves away from it

    @property
    def label(self) -> str:
        """How error messages name the parameter."""
        return f"parameter {self.name!r}" if self.name is not None else f"parameter {self.index}"

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    @property
    def num_groups(self) -> int:
        """Groups of the group penalty: slices along dim 0."""
        return self.param.shape[0] if self.penalty == "group" else 0

    @property
    def group_size(self) -> int:
        return math.prod(self.param.shape[1:]) if self.penalty == "group" else 0


@dataclass(frozen=True)
class Run:
    """A contiguous range of a bucket updated with one set of hyper-parameters."""

    start: int
    end: int
    group_index: int
    penalty: str
    group_size: int
    norm_start: int
    norm_end: int
    momentum_ready: bool


def _dense_strides(param: Tensor) -> tuple[int, ...]:
    """Strides for the flat view: keep channels_last layouts (dim 0 stays outermost)."""
    if param.dim() == 4 and param.is_contiguous(memory_format=torch.channels_last):
        return tuple(param.stride())
    if param.dim() == 5 and param.is_contiguous(memory_format=torch.channels_last_3d):
        return tuple(param.stride())
    return tuple(torch.empty(param.shape, device="meta").stride())


def _align(n: int) -> int:
    return -(-n // abi.SLOT_ALIGNMENT) * abi.SLOT_ALIGNMENT


class FlatBucket:
    """Flat buffers and views for all parameters of one (device, dtype).

    Args:
        slots: the parameters of this bucket (their ``offset`` etc. are assigned here).
        momentum: whether to allocate the momentum buffer.
        state_dtype: the dtype of ``z`` and ``momentum`` when stored with stochastic
            rounding (``torch.bfloat16``); ``None``: the parameters' dtype, rounded to nearest.
        rng: ``[seed, step]`` of this bucket (docs/design.md, "Stochastic rounding").
    """

    def __init__(
        self, slots: list[Slot], momentum: bool, state_dtype: torch.dtype | None, rng: tuple[int, int]
    ) -> None:
        first = slots[0].param
        self.device = first.device
        self.dtype = first.dtype
        self.state_dtype = state_dtype or self.dtype
        self.stochastic_rounding = state_dtype is not None
        self.slots = sorted(
            slots, key=lambda s: (s.group_index, abi.PENALTY_CODES[s.penalty], s.group_size, s.index)
        )
        self.group_indices = sorted({slot.group_index for slot in self.slots})
        offset = norm_offset = 0
        for slot in self.slots:
            slot.offset = offset
            slot.norm_offset = norm_offset
            slot.strides = _dense_strides(slot.param)
            offset = _align(offset + slot.numel)
            norm_offset += slot.num_groups
        self.numel = offset
        self.num_rows = norm_offset
        """Group-penalty rows: their own norms are ``group_norms[:num_rows]``."""
        self.coupling, self.coupled_channels = self._coupled_tables()
        """The ABI's coupled tables on the bucket's device (``None``: no coupled group), and
        per coupled group its (param group, channel id) (an int64 CPU tensor ``(C, 2)``)."""
        self.unheld_scale = None if self.coupling is None else self.coupling.coupled_scale.clone()
        """``s_G`` of every coupled group as if none were held out (``coupled_scale`` holds 0
        for a held-out group: docs/design.md, "Held-out groups")."""
        self.coupled_members = (
            None if self.coupling is None
            else functional.member_table(self.coupling.coupled_offsets, self.coupling.coupled_rows)
        )
        """:func:`functional.member_table` of :attr:`coupling`, for the torch paths."""
        num_coupled = 0 if self.coupling is None else self.coupling.coupled_scale.numel()
        # Every step streams these four side by side: huge pages on the CPU, one lane each.
        self.params = hugepages.zeros(self.numel, self.dtype, self.device, lane=0)
        self.grads = hugepages.zeros(self.numel, self.dtype, self.device, lane=1)
        self.z = hugepages.zeros(self.numel, self.state_dtype, self.device, lane=2)
        self.momentum: Tensor | None = (
            hugepages.zeros(self.numel, self.state_dtype, self.device, lane=3) if momentum else None
        )
        self.group_norms = torch.zeros(
            norm_offset + num_coupled, device=self.device, dtype=abi.norm_dtype(self.dtype)
        )
        self.rng = torch.tensor(rng, dtype=torch.int64, device=self.device)
        for slot in self.slots:
            slot.param_view = self.view_of(self.params, slot)
            slot.grad_view = self.view_of(self.grads, slot)
            slot.z_view = self.view_of(self.z, slot) if slot.penalty != "none" else None
            slot.momentum_view = self.view_of(self.momentum, slot) if momentum else None
        self._runs_cache: dict[tuple[bool, ...], list[Run]] = {}
        self._flags_cache: tuple[tuple[int, ...], Tensor] | None = None
        self.frozen: tuple[Tensor, Tensor] | None = None  # flat masks of W and the norms
        self._frozen_partial: list[Slot] = []

    def _coupled_tables(self) -> tuple[abi.CoupledTables | None, Tensor | None]:
        """The coupled tables from the slots' ``channel_ids``: rows of one param group
        sharing an id form a coupled group (numbered by (param group, id)); and the
        (param group, id) of each group."""
        parts = [
            (slot.norm_offset, torch.full_like(slot.channel_ids, slot.group_index), slot.channel_ids,
             torch.full_like(slot.channel_ids, slot.follows, dtype=torch.bool))
            for slot in self.slots if slot.channel_ids is not None and slot.penalty == "group"
        ]
        if not parts:
            return None, None
        row_keys = torch.full((self.num_rows,), -1, dtype=torch.int64)
        follows = torch.zeros(self.num_rows, dtype=torch.bool)
        groups, ids, following = (torch.cat([part[at] for part in parts]) for at in (1, 2, 3))
        pairs = torch.stack([groups, ids])
        _, keys = torch.unique(pairs, dim=1, return_inverse=True)
        keys = torch.where(pairs[1] >= 0, keys, -1)
        rows = torch.cat([torch.arange(first, first + ids.numel()) for first, _, ids, _ in parts])
        row_keys[rows] = keys
        follows[rows] = following
        tables = abi.coupled_tables(row_keys, self.dtype, self.numel, follows)
        if tables is None:
            return None, None
        first_rows = tables.coupled_rows[tables.coupled_offsets[:-1].long()].long()
        row_pairs = torch.full((self.num_rows, 2), -1, dtype=torch.int64)
        row_pairs[rows] = pairs.T
        return abi.CoupledTables(*(t.to(self.device) for t in tables)), row_pairs[first_rows]

    def view_of(self, flat: Tensor, slot: Slot) -> Tensor:
        """``slot``'s view into the flat buffer ``flat``, with the parameter's layout."""
        return flat.as_strided(slot.shape, slot.strides, flat.storage_offset() + slot.offset)

    def flat_range(self, flat: Tensor, slot: Slot) -> Tensor:
        """``slot``'s elements of ``flat`` as a 1-D contiguous slice (memory order)."""
        return flat[slot.offset : slot.offset + slot.numel]

    def ensure_momentum(self) -> None:
        """Allocate the momentum buffer (a group switched from ρ = 0 to ρ > 0)."""
        if self.momentum is None:
            self.momentum = hugepages.zeros(self.numel, self.state_dtype, self.device, lane=3)
            for slot in self.slots:
                slot.momentum_view = self.view_of(self.momentum, slot)

    def norms_of(self, slot: Slot, per_norm: Tensor | None = None) -> Tensor:
        """``slot``'s own ‖Z_r‖ (one per row) in :attr:`group_norms`, or its entries of
        another tensor laid out like it (``per_norm``)."""
        flat = self.group_norms if per_norm is None else per_norm
        return flat[slot.norm_offset : slot.norm_offset + slot.num_groups]

    def prox_norms_of(self, slot: Slot, own: Tensor | None = None, norms: Tensor | None = None) -> Tensor:
        """The norm each row of ``slot``'s prox uses: its coupled group's ‖Z_G‖ where it
        has one, else its own ‖Z_r‖ (the stored one, or ``own``'s entry if given); read
        from ``norms`` (laid out as :attr:`group_norms`, e.g. :meth:`unheld_group_norms`)
        if given."""
        if self.coupling is None:
            return self.norms_of(slot, norms) if own is None else own
        at = self.norms_of(slot, self.coupling.norm_index)
        prox = (self.group_norms if norms is None else norms)[at]
        if own is not None:
            prox = torch.where(at >= self.num_rows, prox, own.to(prox.dtype))
        return prox

    def coupled_rows_of(self, slot: Slot) -> Tensor | None:
        """Which rows of ``slot`` are in a coupled group (bool per row), ``None`` if none."""
        if self.coupling is None or slot.penalty != "group":
            return None
        coupled = self.norms_of(slot, self.coupling.norm_index) >= self.num_rows
        return coupled if bool(coupled.any()) else None

    def refresh_group_norms(self, slots: list[Slot] | None = None) -> None:
        """Recompute ‖Z_r‖ from Z (after Z was edited outside the step), then every
        coupled norm.

        Args:
            slots: the group-penalised slots to refresh (default: all of them).
        """
        for slot in self.slots if slots is None else slots:
            if slot.penalty == "group":
                z_rows = self.flat_range(self.z, slot).view(slot.num_groups, -1)
                functional.refresh_group_norms_(z_rows, self.norms_of(slot))
        self.refresh_coupled_norms()

    def unheld_group_norms(self) -> Tensor:
        """:attr:`group_norms` with every coupled norm as if no group were held out."""
        if self.coupling is None or torch.equal(self.coupling.coupled_scale, self.unheld_scale):
            return self.group_norms
        norms = self.group_norms.clone()
        functional.coupled_norms_(norms, self.coupled_members, self.unheld_scale)
        return norms

    def hold_out(self, held: Mapping[int, Tensor]) -> None:
        """Hold the coupled groups named in ``held`` (param group → channel ids) out of
        the support and give every other group its ``s_G`` back; then the coupled norms."""
        if self.coupling is None:
            return
        out = torch.zeros(len(self.coupled_channels), dtype=torch.bool)
        for index, ids in held.items():
            out |= (self.coupled_channels[:, 0] == index) & torch.isin(self.coupled_channels[:, 1], ids)
        scale = torch.where(out.to(self.device), torch.zeros_like(self.unheld_scale), self.unheld_scale)
        self.coupling.coupled_scale.copy_(scale)
        self.refresh_coupled_norms()

    def refresh_coupled_norms(self, found_inf: Tensor | None = None) -> None:
        """Recompute the coupled norms from the own ones (as the step's second pass does,
        to the bit); with ``found_inf`` (0-d) non-zero, keep them."""
        if self.coupling is not None:
            functional.coupled_norms_(self.group_norms, self.coupled_members, self.coupling.coupled_scale,
                                      found_inf)

    # -- frozen entries ---------------------------------------------------------------

    def set_frozen(self, masks: Mapping[Tensor, Tensor]) -> None:
        """Entries held at zero after every step (``prune_layer(..., freeze=True)``):
        ``masks`` maps parameters (of any bucket) to bool masks broadcastable to them."""
        mine = [(slot, masks[slot.param]) for slot in self.slots if slot.param in masks]
        if not mine:
            self.frozen, self._frozen_partial = None, []
            return
        flat = torch.zeros(self.numel, dtype=torch.bool, device=self.device)
        norms = torch.zeros(self.group_norms.numel(), dtype=torch.bool, device=self.device)
        self._frozen_partial = []
        for slot, mask in mine:
            full = mask.to(self.device).expand(slot.shape)
            self.view_of(flat, slot).copy_(full)
            if slot.penalty == "group":
                rows = full.reshape(slot.num_groups, -1)
                self.norms_of(slot, norms).copy_(rows.all(dim=1))
                if bool((rows.any(dim=1) & ~rows.all(dim=1)).any()):
                    self._frozen_partial.append(slot)  # part of a filter: norms recomputed
        self.frozen = (flat, norms)

    def apply_frozen(self) -> None:
        """Zero the frozen entries of W, Z and v, and the norms of frozen filters."""
        if self.frozen is None:
            return
        flat, norms = self.frozen
        for buffer in (self.params, self.z, self.momentum):
            if buffer is not None:
                buffer.masked_fill_(flat, 0)
        self.group_norms.masked_fill_(norms, 0)
        # The partial filters' own norms, and the coupled ones (a frozen member changed).
        if self._frozen_partial or self.coupling is not None:
            self.refresh_group_norms(self._frozen_partial)

    # -- per-step inputs --------------------------------------------------------------

    def slot_flags(self, active: list[bool]) -> Tensor:
        """int32 flag word per slot on the bucket's device (cached while unchanged)."""
        words = abi.flag_words(active, (slot.momentum_ready for slot in self.slots))
        if torch.compiler.is_compiling():  # a constant of the traced graph
            return torch.tensor(words, dtype=torch.int32, device=self.device)
        if self._flags_cache is None or self._flags_cache[0] != words:
            flags = torch.tensor(words, dtype=torch.int32).to(self.device, non_blocking=True)
            self._flags_cache = (words, flags)
        return self._flags_cache[1]

    def chunk_table(self, geometry: abi.Geometry) -> Tensor:
        """The ABI's chunk table of this bucket for ``geometry``, on the bucket's device."""
        table = abi.chunk_table(self.slots, geometry, self.numel, self.group_norms.numel())
        return table.to(self.device)

    def runs(self, active: list[bool]) -> list[Run]:
        """Maximal runs of active slots sharing group, penalty, group size and momentum
        state; a group-penalty run has no padding inside, so it reshapes to (groups, size).
        """
        key = tuple(active) + tuple(slot.momentum_ready for slot in self.slots)
        cached = None if torch.compiler.is_compiling() else self._runs_cache.get(key)
        if cached is not None:
            return cached
        runs: list[Run] = []
        current: Run | None = None
        for slot, on in zip(self.slots, active, strict=True):
            if not on:
                if current is not None:
                    runs.append(current)
                current = None
                continue
            end = slot.offset + slot.numel
            norm_end = slot.norm_offset + slot.num_groups
            if (
                current is not None
                and (current.group_index, current.penalty) == (slot.group_index, slot.penalty)
                and (current.group_size, current.momentum_ready) == (slot.group_size, slot.momentum_ready)
                and (slot.penalty != "group" or current.end == slot.offset)
            ):
                current = Run(
                    current.start, end, current.group_index, current.penalty,
                    current.group_size, current.norm_start, norm_end, current.momentum_ready,
                )
            else:
                if current is not None:
                    runs.append(current)
                current = Run(
                    slot.offset, end, slot.group_index, slot.penalty, slot.group_size,
                    slot.norm_offset, norm_end, slot.momentum_ready,
                )
        if current is not None:
            runs.append(current)
        if not torch.compiler.is_compiling():  # a traced cache write would be a guarded side effect
            self._runs_cache[key] = runs
        return runs
