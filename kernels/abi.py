"""The kernel ABI: the tables every fused SLBI kernel reads, and the one place they are built.

``docs/design.md`` ("The kernel ABI") states the contract in words; this module is its
executable form. The Triton kernel, the C kernel (which gets the column numbers as ``-D``
defines) and the torch reference all read tables built here:

- the **chunk table** (int32, int64 once an offset reaches 2**31): one row per chunk of
  work, a chunk being up to ``rows_per_chunk`` rows of one parameter; a row is one filter
  ``Z_g`` for the group penalty (so a chunk owns whole groups and reduces ``‖Z_g‖``
  without atomics) and ``row_len`` consecutive elements otherwise (an l1/"none" chunk
  starts ``SLOT_ALIGNMENT``-aligned; rows × row_len fits the table's integer type);
- the **flag word** per parameter (int32): whether it takes part in this step and whether
  its momentum buffer holds ``v_t``;
- the **hyper-parameter table** (float64, one row per param group);
- the **coupled tables** (:class:`CoupledTables`): which group-penalty rows shrink by a
  coupled group's norm, and the members of each group.

:class:`BucketArgs` is the one list of the op's arguments (its schema, the C kernel's
``ctypes`` types and, checked by a test, its prototype follow it).
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

# Columns of the chunk table.
CHUNK_START = 0  # flat offset of the chunk's first element
CHUNK_ROWS = 1  # number of rows in the chunk (<= rows_per_chunk)
CHUNK_ROW_LEN = 2  # elements per row: the group size, or the geometry's row length
CHUNK_END = 3  # flat offset one past the parameter's last element
CHUNK_SLOT = 4  # index of the parameter in its bucket (its flag word)
CHUNK_HPARAM_ROW = 5  # row of the hyper-parameter table (the param group)
CHUNK_PENALTY = 6  # one of PENALTY_CODES
CHUNK_NORM_OFFSET = 7  # index of the chunk's first group norm (group penalty), else 0
CHUNK_FIELDS = 8

# Columns of the float64 hyper-parameter table, one row per param group.
HP_LR = 0
HP_KAPPA = 1
HP_MU = 2
HP_LAM = 3
HP_MOMENTUM = 4
HP_DAMPENING = 5
HP_WEIGHT_DECAY = 6
# 1.0 when the group keeps a momentum buffer (momentum != 0 as a Python number).
HP_USE_MOMENTUM = 7
HPARAM_FIELDS = 8

HPARAM_KEYS = {
    HP_LR: "lr",
    HP_KAPPA: "kappa",
    HP_MU: "mu",
    HP_LAM: "lam",
    HP_MOMENTUM: "momentum",
    HP_DAMPENING: "dampening",
    HP_WEIGHT_DECAY: "weight_decay",
}
"""Hyper-parameter table column -> param group key."""

# Bits of the per-parameter int32 flag word.
FLAG_ACTIVE = 1  # the parameter takes part in this step (it has a gradient)
FLAG_MOMENTUM_READY = 2  # its momentum buffer holds v_t (else v_{t+1} = u)

PENALTY_CODES = {"none": 0, "l1": 1, "group": 2}

# The step counter and seed of stochastic rounding: an int64 tensor [seed, step].
RNG_SEED = 0
RNG_STEP = 1
RNG_FIELDS = 2

SLOT_ALIGNMENT = 16
"""Every parameter starts at a multiple of this many elements of its flat buffers (64
bytes in float32): the kernels may then use aligned vector accesses. The elements between
two parameters are padding, zero in every buffer, and the update keeps them zero."""


class BucketArgs(NamedTuple):
    """The arguments of ``slbi_triton::bucket_step`` (``docs/design.md``, "The kernel
    ABI"), in order: the one list the op's schema (:func:`op_schema`), the C kernel's
    prototype and its ``ctypes`` argument types are derived from (or, for the C source,
    checked against: ``tests/test_c_kernel.py``). Every implementation (C, Triton, the
    torch reference) takes them so.

    Attributes:
        params, grads: the flat buffers of the bucket's dtype.
        z, momentum: the flat buffers of the state dtype (``momentum``: ``None`` when no
            group keeps a buffer).
        group_norms: the arithmetic dtype (:func:`norm_dtype`): ``‖Z_r‖`` of every
            group-penalty row (``R`` of them), then the ``C`` coupled norms ``‖Z_G‖``.
        chunks: the chunk table (:func:`chunk_table`).
        slot_flags: the flag word of each parameter (:func:`flag_words`).
        hparams: the hyper-parameter table (float64).
        rng: int64 ``[seed, step]``; the step is counted unless ``found_inf`` is set.
        inv_scale, found_inf: ``torch.amp.GradScaler``'s float32 1-element tensors, or ``None``.
        norm_index, coupled_offsets, coupled_rows, coupled_scale: the coupled-group
            tables (:class:`CoupledTables`), all four or none (no coupled group).
        stochastic_rounding: Z and v are bfloat16, written with stochastic rounding.
    """

    params: Tensor
    grads: Tensor
    z: Tensor
    momentum: Tensor | None
    group_norms: Tensor
    chunks: Tensor
    slot_flags: Tensor
    hparams: Tensor
    rng: Tensor
    inv_scale: Tensor | None = None
    found_inf: Tensor | None = None
    norm_index: Tensor | None = None
    coupled_offsets: Tensor | None = None
    coupled_rows: Tensor | None = None
    coupled_scale: Tensor | None = None
    stochastic_rounding: bool = False


WRITTEN_ARGS = frozenset(("params", "z", "momentum", "group_norms", "rng"))
"""The arguments the op writes (the others it only reads)."""


class ArgSpec(NamedTuple):
    """One argument of the op, as its schema and the C prototype spell it."""

    name: str
    kind: str  # "Tensor" or "bool"
    optional: bool  # may be None
    written: bool  # the op mutates it


def arg_specs() -> tuple[ArgSpec, ...]:
    """The op's arguments, read off :class:`BucketArgs`' field names and types."""
    kinds = {Tensor: ("Tensor", False), Tensor | None: ("Tensor", True), bool: ("bool", False)}
    hints = typing.get_type_hints(BucketArgs)
    return tuple(ArgSpec(name, *kinds[hints[name]], name in WRITTEN_ARGS) for name in BucketArgs._fields)


def op_schema(name: str) -> str:
    """The ``torch.library`` schema of an op taking :class:`BucketArgs`, returning nothing."""
    aliases = iter("abcdefghijklmnopqrstuvwxyz")
    parts = []
    for spec in arg_specs():
        kind = f"Tensor({next(aliases)}!)" if spec.written else spec.kind
        parts.append(f"{kind}{'?' if spec.optional else ''} {spec.name}")
    return f"{name}({', '.join(parts)}) -> ()"


class CoupledTables(NamedTuple):
    """The coupled-group tables of a bucket (``docs/design.md``, "The kernel ABI"), for
    ``R`` group-penalty rows and ``C`` coupled groups.

    Attributes:
        norm_index: per row, the entry of ``group_norms`` its prox reads: ``r`` for a row
            in no coupled group, ``R + c`` for a member of group ``c`` (the table's
            integer dtype, as ``chunks``).
        coupled_offsets: ``C + 1`` offsets into ``coupled_rows`` (same dtype).
        coupled_rows: the member rows of group ``c``:
            ``coupled_rows[coupled_offsets[c]:coupled_offsets[c + 1]]``, in row order.
        coupled_scale: ``s_G = 1/sqrt(|G|)`` per group (computed in float64, stored in
            the arithmetic dtype).
    """

    norm_index: Tensor
    coupled_offsets: Tensor
    coupled_rows: Tensor
    coupled_scale: Tensor


def group_keys(keys: Tensor, follows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The distinct ``keys`` (ids ``>= 0``, one per row), each row's index into them, each
    key's number of members (rows that do not follow) and whether it forms a coupled
    group: two rows or more, one of them a member."""
    values, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    members = torch.zeros_like(counts).index_add_(0, inverse, (~follows).to(torch.int64))
    return values, inverse, members, (counts >= 2) & (members >= 1)


def coupled_tables(
    row_keys: Tensor, dtype: torch.dtype, numel: int, follows: Tensor | None = None
) -> CoupledTables | None:
    """The coupled-group tables of a bucket (on the CPU), or ``None`` when no key is
    shared by two rows.

    Args:
        row_keys: int64 per group-penalty row: ``-1`` for a row in no coupled group;
            rows sharing a key ``>= 0`` form one coupled group (a key of one row is just
            an uncoupled row). Groups are numbered in key order, members in row order.
        dtype: the bucket's dtype (``coupled_scale`` is in :func:`norm_dtype` of it).
        numel: the bucket's flat length: the index tables take the chunk table's dtype,
            :func:`index_dtype` of it and of the ``R + C`` norms.
        follows: bool per row (default: none): a follower row reads its group's norm
            but is not one of its members (not summed, not counted in ``coupled_scale``);
            a key needs a member to form a group.
    """
    num_rows = row_keys.numel()
    follows = torch.zeros(num_rows, dtype=torch.bool) if follows is None else follows
    rows = torch.nonzero(row_keys >= 0).flatten()
    _, inverse, members, shared = group_keys(row_keys[rows], follows[rows])
    if not bool(shared.any()):
        return None
    number = torch.cumsum(shared.to(torch.int64), 0) - 1  # per key: its group, if shared
    in_group = shared[inverse]
    rows, groups = rows[in_group], number[inverse[in_group]]
    norm_index = torch.arange(num_rows, dtype=torch.int64)
    norm_index[rows] = num_rows + groups
    is_member = ~follows[rows]
    rows, groups = rows[is_member], groups[is_member]
    order = torch.sort(groups, stable=True).indices  # rows ascend within a group
    sizes = members[shared]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)])
    scale = (1.0 / torch.sqrt(sizes.to(torch.float64))).to(norm_dtype(dtype))
    table_dtype = index_dtype(numel, num_rows + scale.numel())
    return CoupledTables(
        norm_index.to(table_dtype), offsets.to(table_dtype), rows[order].to(table_dtype), scale
    )


def coupling_of(args: BucketArgs) -> CoupledTables | None:
    """The coupled tables among ``args`` (checked for their dtypes and sizes; their values
    are the C kernel's to check), or ``None``.

    Raises:
        ValueError: if only some are given, or one does not fit the others.
    """
    tables = (args.norm_index, args.coupled_offsets, args.coupled_rows, args.coupled_scale)
    if tables[0] is None and tables[1] is None and tables[2] is None and tables[3] is None:
        return None  # the common case, every step: no loop
    given = [t is not None for t in tables]
    if not all(given):
        names = ", ".join(name for name, on in zip(CoupledTables._fields, given, strict=True) if not on)
        raise ValueError(f"the coupled tables come all four or none; missing: {names}")
    coupling = CoupledTables(*tables)
    num_coupled = coupling.coupled_scale.numel()
    expected = {
        "norm_index": (args.chunks.dtype, args.group_norms.numel() - num_coupled),
        "coupled_offsets": (args.chunks.dtype, num_coupled + 1),
        "coupled_rows": (args.chunks.dtype, None),
        "coupled_scale": (norm_dtype(args.params.dtype), num_coupled),
    }
    for name, (dtype, numel) in expected.items():
        table = getattr(coupling, name)
        if table.dtype != dtype or table.dim() != 1 or not table.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D tensor of {dtype}, got {table.dtype} "
                             f"of shape {tuple(table.shape)}")
        if table.device != args.params.device:
            raise ValueError(f"{name} is on {table.device}, the buffers on {args.params.device}")
        if numel is not None and table.numel() != numel:
            raise ValueError(f"{name} must have {numel} elements, got {table.numel()}")
    return coupling


@dataclass(frozen=True)
class Geometry:
    """How a kernel cuts a bucket into chunks.

    Attributes:
        rows_per_chunk: rows per chunk (one Triton program, or one unit of OpenMP work).
        row_len: elements per row of an l1/"none" parameter (a multiple of ``col_multiple``).
        col_multiple: a short l1/"none" parameter gets rows of a multiple of this length
            (a multiple of ``SLOT_ALIGNMENT``, so every l1/"none" chunk starts aligned).
        long_group: groups of more than this many elements get one chunk per group (a
            GPU program then walks one long row instead of a few rows at a time); ``None``:
            every group chunk has ``rows_per_chunk`` rows.
    """

    rows_per_chunk: int
    row_len: int
    col_multiple: int
    long_group: int | None = None

    def __post_init__(self) -> None:
        if self.col_multiple % SLOT_ALIGNMENT or self.row_len % self.col_multiple:
            raise ValueError(f"{self}: col_multiple must be a multiple of {SLOT_ALIGNMENT} "
                             "and row_len a multiple of col_multiple")


TRITON_GEOMETRY = Geometry(rows_per_chunk=8, row_len=1024, col_multiple=256, long_group=1024)
"""One program covers 8 filters of up to 1024 elements, one longer filter, or 8K elements
of an l1/"none" parameter: short programs, so that the last ones to start (the table puts
the longest first) end soon after the rest."""
CPU_GEOMETRY = Geometry(rows_per_chunk=32, row_len=2048, col_multiple=256)
"""One unit of OpenMP work: 32 filters, or 64K elements of an l1/"none" parameter."""


class SlotSpan(Protocol):
    """Where one parameter lies in its bucket (``buckets.Slot`` is one)."""

    offset: int
    norm_offset: int
    group_index: int
    penalty: str

    @property
    def numel(self) -> int: ...

    @property
    def num_groups(self) -> int: ...

    @property
    def group_size(self) -> int: ...


@dataclass
class Span:
    """A plain :class:`SlotSpan`: a parameter's place in a bucket built without an
    optimizer (the autotune's scratch bucket, the kernel tests)."""

    offset: int
    numel: int
    penalty: str
    num_groups: int
    group_size: int
    group_index: int = 0
    norm_offset: int = 0


def index_dtype(numel: int, num_norms: int) -> torch.dtype:
    """The chunk table's dtype: int32 while every offset fits, else int64."""
    return torch.int32 if max(numel, num_norms) < 2**31 else torch.int64


def chunk_table(spans: Sequence[SlotSpan], geometry: Geometry, numel: int, num_norms: int) -> Tensor:
    """The chunk table of a bucket (on the CPU; the caller moves it once to the device),
    longest chunks first (the rest in layout order), so that kernels that hand out chunks
    in table order finish the long ones while short ones fill the remaining workers.

    Args:
        spans: the bucket's parameters, in bucket order (a chunk's ``CHUNK_SLOT`` is the
            position here).
        geometry: how the kernel that reads the table cuts its work.
        numel, num_norms: the bucket's flat length and number of group norms.
    """
    rows: list[list[int]] = []
    for slot_index, span in enumerate(spans):
        end = span.offset + span.numel
        rows_per_chunk = geometry.rows_per_chunk
        if span.penalty == "group":
            row_len, total_rows = span.group_size, span.num_groups
            if geometry.long_group is not None and row_len > geometry.long_group:
                rows_per_chunk = 1
        else:
            # Rows of ``row_len`` elements; a parameter smaller than one chunk gets shorter
            # rows (whole ``col_multiple`` tiles), so its chunk has no masked-out iterations.
            per_row = -(-span.numel // geometry.rows_per_chunk)
            tiles = max(1, -(-per_row // geometry.col_multiple))
            row_len = min(geometry.row_len, tiles * geometry.col_multiple)
            total_rows = -(-span.numel // row_len)  # 0 for an empty parameter: no chunk
        for first_row in range(0, total_rows, rows_per_chunk):
            rows.append(
                [
                    span.offset + first_row * row_len,
                    min(rows_per_chunk, total_rows - first_row),
                    row_len,
                    end,
                    slot_index,
                    span.group_index,
                    PENALTY_CODES[span.penalty],
                    span.norm_offset + first_row if span.penalty == "group" else 0,
                ]
            )
    rows.sort(key=lambda r: -min(r[CHUNK_ROWS] * r[CHUNK_ROW_LEN], r[CHUNK_END] - r[CHUNK_START]))
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, CHUNK_FIELDS)
    return table.to(index_dtype(numel, num_norms))


def flag_words(active: Iterable[bool], momentum_ready: Iterable[bool]) -> tuple[int, ...]:
    """The flag word of each parameter."""
    return tuple(
        (FLAG_ACTIVE if on else 0) | (FLAG_MOMENTUM_READY if ready else 0)
        for on, ready in zip(active, momentum_ready, strict=True)
    )


def hparam_values(groups: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """The table's rows as floats, for groups of plain numbers (a group holding a tensor
    value is built with device ops: :func:`hparam_table_traced`)."""
    rows = []
    for group in groups:
        row = [0.0] * HPARAM_FIELDS
        for column, key in HPARAM_KEYS.items():
            row[column] = float(group[key])
        row[HP_USE_MOMENTUM] = float(row[HP_MOMENTUM] != 0.0)
        rows.append(row)
    return rows


def hparam_table_traced(groups: Sequence[Mapping[str, Any]], device: torch.device) -> Tensor:
    """The hyper-parameter table built with device ops: no ``.item()`` and no host sync,
    so tensor values (which LR schedulers update in place) are read on the device, and in
    a traced step a float stays an input of the graph instead of a baked-in constant."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    rows = []
    for group in groups:
        row = [zero] * HPARAM_FIELDS
        for column, key in HPARAM_KEYS.items():
            value = group[key]
            if isinstance(value, Tensor):
                row[column] = value.to(device=device, dtype=torch.float64).reshape(())
            else:
                row[column] = zero + value  # torch.as_tensor(value) would bake it in
        row[HP_USE_MOMENTUM] = zero + float(group["momentum"] != 0)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def count_step_(rng: Tensor, found_inf: Tensor | None = None) -> None:
    """``rng[RNG_STEP] += 1``, unless ``found_inf`` (one element) is non-zero: how the
    Triton launcher and the torch paths count a step (the C kernel does the same in C);
    device ops only, no host sync."""
    step = rng[RNG_STEP:]
    step.add_(1 if found_inf is None else (found_inf == 0).to(torch.int64))


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a bucket's group norms, and of its arithmetic: float64 for float64
    parameters, float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
