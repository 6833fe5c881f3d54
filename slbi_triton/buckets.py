"""Flat multi-tensor buffers: one contiguous buffer per quantity and (device, dtype).

A :class:`FlatBucket` owns the flat ``params``, ``grads``, ``z`` and ``momentum`` buffers
of every parameter of one (device, dtype); each parameter's ``.data`` and ``.grad`` are
views into them, so autograd accumulates straight into ``grads`` and one kernel launch
updates the whole bucket. A :class:`Slot` is one parameter's place in its bucket and
carries the name-indexed views the toolbox works on.

Layout: slots are sorted by (param group, penalty, group size) so that the torch backend
can update long *runs* of elements that share hyper-parameters with a few vectorised ops.
Slots with the same key are packed back to back (a group-penalty run must have no gap to
be viewed as ``(groups, group_size)``); each new key starts at a multiple of
``ALIGNMENT`` elements. Padding elements stay zero in every buffer and are left at zero
by the update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import functional
from .kernels import chunk_format as cf

ALIGNMENT = 16


@dataclass
class Slot:
    """One parameter's place in a :class:`FlatBucket`."""

    param: torch.nn.Parameter
    name: str | None
    index: int  # position in the optimizer's parameter order (state_dict index)
    group_index: int  # the param group (row of the hyper-parameter table)
    penalty: str  # "l1", "group" or "none"
    offset: int = 0  # first element in the flat buffers
    norm_offset: int = 0  # first group norm (group penalty)
    strides: tuple[int, ...] = ()
    param_view: Tensor | None = None
    grad_view: Tensor | None = None
    z_view: Tensor | None = None
    momentum_view: Tensor | None = None
    grad_seen: bool = False  # set by the post-accumulate-grad hook, cleared by zero_grad
    momentum_ready: bool = False  # the momentum buffer holds v_t
    hook_handle: object | None = field(default=None, repr=False)
    # The parameter's TensorImpl when it was bound: torch.utils.swap_tensors (used by
    # model.to() and load_state_dict(assign=True) under swap_module_params_on_conversion)
    # changes it, and with it drops the autograd hooks; ``.data =`` keeps it.
    impl: int = 0
    data_ptr: int = 0  # where ``param_view`` starts, for the per-step fast check

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
    return -(-n // ALIGNMENT) * ALIGNMENT


class FlatBucket:
    """Flat buffers and views for all parameters of one (device, dtype).

    Args:
        slots: the parameters of this bucket (their ``offset`` etc. are assigned here).
        momentum: whether to allocate the momentum buffer.
    """

    def __init__(self, slots: list[Slot], momentum: bool) -> None:
        first = slots[0].param
        self.device = first.device
        self.dtype = first.dtype
        self.slots = sorted(
            slots, key=lambda s: (s.group_index, cf.PENALTY_CODES[s.penalty], s.group_size, s.index)
        )
        offset = 0
        norm_offset = 0
        previous_key = None
        for slot in self.slots:
            key = (slot.group_index, slot.penalty, slot.group_size)
            if key != previous_key:
                offset = _align(offset)
                previous_key = key
            slot.offset = offset
            slot.norm_offset = norm_offset
            slot.strides = _dense_strides(slot.param)
            offset += slot.numel
            norm_offset += slot.num_groups
        offset = _align(offset)
        self.numel = offset
        kwargs = {"device": self.device, "dtype": self.dtype}
        self.params = torch.zeros(self.numel, **kwargs)
        self.grads = torch.zeros(self.numel, **kwargs)
        self.z = torch.zeros(self.numel, **kwargs)
        self.momentum: Tensor | None = torch.zeros(self.numel, **kwargs) if momentum else None
        self.group_norms = torch.zeros(norm_offset, device=self.device, dtype=torch.float32)
        for slot in self.slots:
            slot.param_view = self.view_of(self.params, slot)
            slot.grad_view = self.view_of(self.grads, slot)
            slot.z_view = self.view_of(self.z, slot) if slot.penalty != "none" else None
            slot.momentum_view = self.view_of(self.momentum, slot) if momentum else None
        self._chunks: dict[str, Tensor] = {}
        # Set by the optimizer: "torch" or "triton", and whether the CPU C kernel runs it.
        self.backend = "torch"
        self.cpu_kernel = False
        self._runs_cache: dict[tuple[bool, ...], list[Run]] = {}
        self._flags_cache: tuple[tuple[int, ...], Tensor] | None = None

    def view_of(self, flat: Tensor, slot: Slot) -> Tensor:
        """``slot``'s view into the flat buffer ``flat``, with the parameter's layout."""
        return flat.as_strided(slot.shape, slot.strides, flat.storage_offset() + slot.offset)

    def flat_range(self, flat: Tensor, slot: Slot) -> Tensor:
        """``slot``'s elements of ``flat`` as a 1-D contiguous slice (memory order)."""
        return flat[slot.offset : slot.offset + slot.numel]

    def ensure_momentum(self) -> None:
        """Allocate the momentum buffer (a group switched from ρ = 0 to ρ > 0)."""
        if self.momentum is None:
            self.momentum = torch.zeros_like(self.params)
            for slot in self.slots:
                slot.momentum_view = self.view_of(self.momentum, slot)

    def norms_of(self, slot: Slot) -> Tensor:
        """``slot``'s ‖Z_g‖ (float32, one per group) in :attr:`group_norms`."""
        return self.group_norms[slot.norm_offset : slot.norm_offset + slot.num_groups]

    def refresh_group_norms(self, slots: list[Slot] | None = None) -> None:
        """Recompute ‖Z_g‖ from Z (after editing Z outside the step).

        Args:
            slots: the group-penalised slots to refresh (default: all of them).
        """
        for slot in self.slots if slots is None else slots:
            if slot.penalty == "group":
                z_rows = self.flat_range(self.z, slot).view(slot.num_groups, -1)
                functional.refresh_group_norms_(z_rows, self.norms_of(slot))

    # -- per-step inputs ------------------------------------------------------------

    def slot_flags(self, active: list[bool]) -> Tensor:
        """int32 flag word per slot on the bucket's device (cached while unchanged)."""
        words = tuple(
            (cf.FLAG_ACTIVE if on else 0) | (cf.FLAG_MOMENTUM_READY if slot.momentum_ready else 0)
            for slot, on in zip(self.slots, active, strict=True)
        )
        if torch.compiler.is_compiling():  # a constant of the traced graph
            return torch.tensor(words, dtype=torch.int32, device=self.device)
        if self._flags_cache is None or self._flags_cache[0] != words:
            flags = torch.tensor(words, dtype=torch.int32).to(self.device, non_blocking=True)
            self._flags_cache = (words, flags)
        return self._flags_cache[1]

    def chunks(self, kernel: str) -> Tensor:
        """The chunk table of the fused ``kernel`` (``"triton"`` or ``"cpu"``), built once
        per layout. The Triton table is int32 (half the bytes) while every offset fits."""
        if kernel not in self._chunks:
            if kernel == "triton":
                table = self._build_chunks(cf.TILE_ROWS, cf.TILE_ROW_LEN)
                if self.numel < 2**31 and self.group_norms.numel() < 2**31:
                    table = table.int()
            else:
                table = self._build_chunks(cf.CPU_TILE_ROWS, cf.CPU_TILE_ROW_LEN)
            self._chunks[kernel] = table.to(self.device)
        return self._chunks[kernel]

    def _build_chunks(self, rows_per_chunk: int, cols: int) -> Tensor:
        """int64 table: ``rows_per_chunk`` rows per chunk, a row being one filter (group
        penalty) or ``cols`` consecutive elements."""
        table: list[list[int]] = []
        for slot_index, slot in enumerate(self.slots):
            code = cf.PENALTY_CODES[slot.penalty]
            end = slot.offset + slot.numel
            if slot.penalty == "group":
                row_len, total_rows = slot.group_size, slot.num_groups
            else:
                # Rows of ``cols`` elements; a tensor smaller than one chunk gets shorter
                # rows (whole TILE_COLS tiles), so its program does no masked-out iterations.
                per_row = -(-slot.numel // rows_per_chunk)
                row_len = min(cols, max(1, -(-per_row // cf.TILE_COLS)) * cf.TILE_COLS)
                total_rows = -(-slot.numel // row_len)  # 0 for an empty tensor: no chunk
            for first_row in range(0, total_rows, rows_per_chunk):
                table.append(
                    [
                        slot.offset + first_row * row_len,
                        min(rows_per_chunk, total_rows - first_row),
                        row_len,
                        end,
                        slot_index,
                        slot.group_index,
                        code,
                        slot.norm_offset + first_row if slot.penalty == "group" else 0,
                    ]
                )
        return torch.tensor(table, dtype=torch.int64).reshape(-1, cf.CHUNK_FIELDS)

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
                and current.group_index == slot.group_index
                and current.penalty == slot.penalty
                and current.group_size == slot.group_size
                and current.momentum_ready == slot.momentum_ready
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
