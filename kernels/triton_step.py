"""The CUDA implementation of ``slbi_triton::bucket_step``: one Triton launch per bucket.

The kernel reads the tables of the kernel ABI (:mod:`.abi`) and implements the update of
``docs/design.md`` per element, in float32 (float64 for float64 buckets, hyper-parameters
included). ``‖Z_g‖`` of ``Z_t`` comes from the group-norm table written by the previous
step; this step writes ``‖Z_{t+1,g}‖`` for the next one. Each program owns whole groups,
so the norms are plain per-program reductions: deterministic, no atomics. Each of W, Z,
g, v is read once and W, Z, v written once.

It is built for memory bandwidth (``docs/design.md``, "The kernel ABI"): every parameter
starts 16-element aligned in the flat buffers and its padding is zero, so a program (one
chunk) takes one of three paths, chosen per chunk at run time:

- **stream**: l1 and "none" chunks, and a group chunk of one row whose length is a
  multiple of ``ALIGN``: a 1-D loop over the chunk, its end rounded up into the zero
  padding, so every ``ALIGN`` elements are wholly in or out and W, g, Z, v move as
  128-bit vectors (64-bit for the bfloat16 Z and v of a float32 bucket);
- **aligned rows**: group chunks whose group size is a multiple of ``ALIGN`` (every row
  then starts aligned): a ``[ROWS, COLS]`` tile per iteration, one group a row, also with
  128-bit vectors;
- **scalar rows**: the other group chunks (group sizes such as 25 or 147): a narrower
  tile without alignment, element by element.

Alignment is proven to the compiler arithmetically (``(x // ALIGN) * ALIGN`` of a value
that is a multiple of ``ALIGN`` in that branch), never by a hint on a shared value, which
would also mark the scalar path aligned. ``python -m benchmarks.gpu_static`` compiles
every variant for sm_80 and sm_90 and checks registers, spills and the 128-bit accesses.

The arithmetic is that of ``functional.bucket_step_reference``, operation by operation,
with no contraction into FMAs (``enable_fp_fusion=False``): under the interpreter W, Z and
v are bit-identical to it (stochastic rounding included; bfloat16 parameters aside, which
the interpreter rounds by truncation), and the group norms agree to a few ulps (sums in
another order). On a GPU, ``/`` and ``sqrt`` are Triton's fast float32 versions (within 2
ulp): IEEE ones call a slow-path subroutine that costs registers and spills; float64
buckets multiply by 1/μ instead of dividing by μ (within 1 ulp).

Coupled groups (``docs/design.md``, "Coupled channel groups"; ``HAS_COUPLING``): a group
row's shrink reads ``group_norms[norm_index[r]]`` (its own norm, or its coupled group's);
the step still writes every row's own norm, and a second, small launch
(``_coupled_norms_kernel``, one lane per coupled group) then writes the coupled norms,
summing the members' squares in member order with an IEEE square root, so that they are
the same bits as the C kernel's and the torch reference's from the same own norms.

Mixed precision (``torch.amp.GradScaler``): the gradients are multiplied by ``1/scale`` as
they are loaded, and when ``found_inf`` is non-zero every program stores nothing, so a
step with inf/NaN gradients leaves W, Z, v and the norms as they were, with no host sync.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import abi

# Triton reads module globals only when they are constexpr.
_CHUNK_END = tl.constexpr(abi.CHUNK_END)
_CHUNK_HPARAM_ROW = tl.constexpr(abi.CHUNK_HPARAM_ROW)
_CHUNK_NORM_OFFSET = tl.constexpr(abi.CHUNK_NORM_OFFSET)
_CHUNK_PENALTY = tl.constexpr(abi.CHUNK_PENALTY)
_CHUNK_ROW_LEN = tl.constexpr(abi.CHUNK_ROW_LEN)
_CHUNK_ROWS = tl.constexpr(abi.CHUNK_ROWS)
_CHUNK_SLOT = tl.constexpr(abi.CHUNK_SLOT)
_CHUNK_START = tl.constexpr(abi.CHUNK_START)
_FLAG_ACTIVE = tl.constexpr(abi.FLAG_ACTIVE)
_FLAG_MOMENTUM_READY = tl.constexpr(abi.FLAG_MOMENTUM_READY)
_HP_DAMPENING = tl.constexpr(abi.HP_DAMPENING)
_HP_KAPPA = tl.constexpr(abi.HP_KAPPA)
_HP_LAM = tl.constexpr(abi.HP_LAM)
_HP_LR = tl.constexpr(abi.HP_LR)
_HP_MOMENTUM = tl.constexpr(abi.HP_MOMENTUM)
_HP_MU = tl.constexpr(abi.HP_MU)
_HP_USE_MOMENTUM = tl.constexpr(abi.HP_USE_MOMENTUM)
_HP_WEIGHT_DECAY = tl.constexpr(abi.HP_WEIGHT_DECAY)
_PENALTY_GROUP = tl.constexpr(abi.PENALTY_CODES["group"])
_RNG_SEED = tl.constexpr(abi.RNG_SEED)
_RNG_STEP = tl.constexpr(abi.RNG_STEP)
_SLOT_ALIGNMENT = tl.constexpr(abi.SLOT_ALIGNMENT)

NUM_WARPS = 4
"""Warps per program: 128 threads, few live values each."""
VECTOR_BYTES = 16
"""The widest global access (``ld.global.v4.b32``)."""


@triton.jit
def _sr_hash(seed, step, index):
    """The counter-based hash of docs/design.md ("Stochastic rounding"): 32 random bits
    per (seed, step, flat index), identical to the C kernel's and the torch reference's."""
    h = index.to(tl.uint32) * 0x9E3779B1
    h ^= (index >> 32).to(tl.uint32) * 0x85EBCA77
    h ^= seed
    h += step * 0xC2B2AE3D
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _flat_index(start, offs):
    """The flat element index ``start + offs`` as int64; with int32 tables it is below
    2**31, so it is widened with a zero high word, which the compiler then folds away."""
    index = start + offs
    if index.dtype == tl.int32:
        index = index.to(tl.uint32)
    return index.to(tl.int64)


@triton.jit
def _round_bf16_stochastic(value, random16):
    """float32 -> bfloat16, rounded up in magnitude with probability (dropped bits)/2**16."""
    bits = value.to(tl.uint32, bitcast=True)
    # inf + random16 stays inf; NaN becomes the quiet NaN 0x7FC0 (its payload is not kept).
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = tl.where(is_nan, 0x7FC0, (bits + random16) >> 16)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _update_tile(
    w_ptr, g_ptr, z_ptr, v_ptr, offs, index, mask, z_mask, v_load_mask, v_store_mask, penalised,
    momentum_history, group_scale, inv_scale, weight_decay, rho, one_minus_dampening, kappa, lam, inv_mu,
    lr_kappa, lr_over_mu, seed, step,
    GROUP: tl.constexpr, COMPUTE: tl.constexpr, HAS_INV_SCALE: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr,
):
    """One tile of the update (docs/design.md, "The update"): loads W, g at ``offs`` where
    ``mask``, Z where ``z_mask``, v where ``v_load_mask``; stores W, Z, v (v where
    ``v_store_mask``) and returns the stored Z (as ``COMPUTE``, 0 outside ``z_mask``) for
    the group norms. ``GROUP``: the group penalty (Z shrunk by ``group_scale``), else l1
    where ``penalised`` and "none" elsewhere. The operations are those of
    ``functional.slbi_update_``, in its order. (The callers build masks by comparing with
    bounds: ``mask & flag`` with a scalar ``flag`` is an int32 mask in the interpreter.)"""
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    z = tl.load(z_ptr + offs, mask=z_mask, other=0.0).to(COMPUTE)
    v = tl.load(v_ptr + offs, mask=v_load_mask, other=0.0).to(COMPUTE)
    if HAS_INV_SCALE:
        g = g * inv_scale
    u = g + weight_decay * w
    v_new = tl.where(momentum_history, rho * v + one_minus_dampening * u, u)
    if GROUP:
        residual = w - kappa * z * group_scale
        w_new = w - lr_kappa * (v_new + residual * inv_mu)
    else:
        # propagate_nan: a NaN Z gives a NaN Gamma, as the torch reference's clamp does
        excess = tl.maximum(tl.abs(z) - lam, 0.0, propagate_nan=tl.PropagateNan.ALL)
        residual = w - kappa * (tl.where(z >= 0.0, 1.0, -1.0) * excess)
        w_pen = w - lr_kappa * (v_new + residual * inv_mu)
        w_new = tl.where(penalised, w_pen, w - lr_kappa * v_new)
    z_next = z + lr_over_mu * residual
    if STOCHASTIC_ROUNDING:
        bits = _sr_hash(seed, step, index)
        z_new = _round_bf16_stochastic(z_next, bits & 0xFFFF)
        v_stored = _round_bf16_stochastic(v_new, bits >> 16)
    else:
        z_new = z_next.to(z_ptr.dtype.element_ty)
        v_stored = v_new.to(v_ptr.dtype.element_ty)
    tl.store(w_ptr + offs, w_new.to(w_ptr.dtype.element_ty), mask=mask)
    tl.store(z_ptr + offs, z_new, mask=z_mask)
    tl.store(v_ptr + offs, v_stored, mask=v_store_mask)
    return tl.where(z_mask, z_new.to(COMPUTE), 0.0)


@triton.jit
def _group_scale(norm, lam):
    """max(0, 1 − λ/‖Z_g‖) of ``Z_t``, 0 where ‖Z_g‖ = 0."""
    safe_norm = tl.where(norm > 0.0, norm, 1.0)
    return tl.where(norm > 0.0, tl.maximum(1.0 - lam / safe_norm, 0.0), 0.0)


@triton.jit
def _stream(
    w_ptr, g_ptr, z_ptr, v_ptr, group_norms_ptr, norm_index_ptr, start, length, norm_offset, live, penalised,
    momentum_history, use_momentum, inv_scale, weight_decay, rho, one_minus_dampening, kappa, lam, inv_mu,
    lr_kappa, lr_over_mu, seed, step,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr, COMPUTE: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr, HAS_COUPLING: tl.constexpr,
):
    """The 1-D path over ``length`` elements from ``start`` (both multiples of ``ALIGN``):
    an l1/"none" chunk, or (``GROUP``) a one-row group chunk, whose norm it writes."""
    start = (start // ALIGN) * ALIGN
    # Scalar conditions become bounds (an inactive chunk runs no iteration).
    length = tl.where(live, (length // ALIGN) * ALIGN, 0)
    z_length = tl.where(penalised, length, 0)
    v_load_length = tl.where(momentum_history, length, 0)
    v_store_length = tl.where(use_momentum, length, 0)
    w_ptr += start
    g_ptr += start
    z_ptr += start
    v_ptr += start
    group_scale = 0.0
    if GROUP:
        norm_at = norm_offset
        if HAS_COUPLING:  # the norm its shrink reads: its own, or its coupled group's
            norm_at = tl.load(norm_index_ptr + norm_offset)
        group_scale = _group_scale(tl.load(group_norms_ptr + norm_at), lam)
    lanes = tl.arange(0, BLOCK)
    z_sq_sum = tl.zeros([BLOCK], dtype=COMPUTE)
    for first in range(0, length, BLOCK):
        offs = first + lanes
        z_stored = _update_tile(
            w_ptr, g_ptr, z_ptr, v_ptr, offs, _flat_index(start, offs), offs < length, offs < z_length,
            offs < v_load_length, offs < v_store_length, penalised, momentum_history, group_scale, inv_scale,
            weight_decay, rho, one_minus_dampening, kappa, lam, inv_mu, lr_kappa, lr_over_mu, seed, step,
            GROUP, COMPUTE, HAS_INV_SCALE, STOCHASTIC_ROUNDING,
        )
        if GROUP:
            z_sq_sum += z_stored * z_stored
    if GROUP:
        tl.store(group_norms_ptr + norm_offset, tl.sqrt(tl.sum(z_sq_sum, axis=0)), mask=live)


@triton.jit
def _rows(
    w_ptr, g_ptr, z_ptr, v_ptr, group_norms_ptr, norm_index_ptr, start, row_len, live_rows, v_load_rows,
    v_store_rows, norm_offset, momentum_history, inv_scale, weight_decay, rho, one_minus_dampening, kappa,
    lam, inv_mu, lr_kappa, lr_over_mu, seed, step,
    ROWS: tl.constexpr, COLS: tl.constexpr, COMPUTE: tl.constexpr, HAS_INV_SCALE: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr, HAS_COUPLING: tl.constexpr,
):
    """The 2-D path over a group chunk: ``[ROWS, COLS]`` tiles, one group a row (rows at
    or past a bound are masked out); writes the rows' norms. Aligned when the caller
    passes ``start`` and ``row_len`` in a form the compiler sees as multiples of the
    vector width."""
    w_ptr += start
    g_ptr += start
    z_ptr += start
    v_ptr += start
    rows = tl.arange(0, ROWS)
    live = rows < live_rows
    v_load = rows < v_load_rows
    v_store = rows < v_store_rows
    row_offs = rows.to(row_len.dtype) * row_len
    norm_at = norm_offset + rows
    if HAS_COUPLING:  # the norm each row's shrink reads: its own, or its coupled group's
        norm_at = tl.load(norm_index_ptr + norm_at, mask=live, other=0)
    norms = tl.load(group_norms_ptr + norm_at, mask=live, other=0.0)
    group_scale = _group_scale(norms, lam)[:, None]
    cols = tl.arange(0, COLS)
    z_sq_sum = tl.zeros([ROWS], dtype=COMPUTE)
    for first in range(0, row_len, COLS):
        col = first + cols
        offs = row_offs[:, None] + col[None, :]
        in_row = (col < row_len)[None, :]
        mask = live[:, None] & in_row
        z_stored = _update_tile(
            w_ptr, g_ptr, z_ptr, v_ptr, offs, _flat_index(start, offs), mask, mask, v_load[:, None] & in_row,
            v_store[:, None] & in_row, True, momentum_history, group_scale, inv_scale, weight_decay, rho,
            one_minus_dampening, kappa, lam, inv_mu, lr_kappa, lr_over_mu, seed, step,
            True, COMPUTE, HAS_INV_SCALE, STOCHASTIC_ROUNDING,
        )
        z_sq_sum += tl.sum(z_stored * z_stored, axis=1)
    tl.store(group_norms_ptr + norm_offset + rows, tl.sqrt(z_sq_sum), mask=live)


@triton.jit
def _slbi_bucket_kernel(
    params_ptr,
    grads_ptr,
    z_ptr,
    momentum_ptr,
    group_norms_ptr,
    chunks_ptr,
    slot_flags_ptr,
    hparams_ptr,
    rng_ptr,
    inv_scale_ptr,
    found_inf_ptr,
    norm_index_ptr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    SCALAR_COLS: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
    N_CHUNK_FIELDS: tl.constexpr,
    N_HPARAM_FIELDS: tl.constexpr,
    COMPUTE: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr,
    HAS_COUPLING: tl.constexpr,
):
    # Offsets in the table's integer type: int32 tables keep every offset below 2**31.
    chunk = chunks_ptr + tl.program_id(0).to(tl.int64) * N_CHUNK_FIELDS
    start = tl.load(chunk + _CHUNK_START)
    num_rows = tl.load(chunk + _CHUNK_ROWS)
    row_len = tl.load(chunk + _CHUNK_ROW_LEN)
    end = tl.load(chunk + _CHUNK_END)
    slot = tl.load(chunk + _CHUNK_SLOT)
    hparam_row = tl.load(chunk + _CHUNK_HPARAM_ROW)
    penalty = tl.load(chunk + _CHUNK_PENALTY)
    norm_offset = tl.load(chunk + _CHUNK_NORM_OFFSET)

    flags = tl.load(slot_flags_ptr + slot)
    active = (flags & _FLAG_ACTIVE) != 0
    if HAS_FOUND_INF:
        # Inf/NaN gradients somewhere (GradScaler): this step changes nothing.
        active = active & (tl.load(found_inf_ptr) == 0.0)
    momentum_ready = (flags & _FLAG_MOMENTUM_READY) != 0

    hp = hparams_ptr + hparam_row * N_HPARAM_FIELDS
    kappa = tl.load(hp + _HP_KAPPA).to(COMPUTE)
    inv_mu = (1.0 / tl.load(hp + _HP_MU)).to(COMPUTE)  # a product per element, not a division
    lam = tl.load(hp + _HP_LAM).to(COMPUTE)
    rho = tl.load(hp + _HP_MOMENTUM).to(COMPUTE)
    one_minus_dampening = (1.0 - tl.load(hp + _HP_DAMPENING)).to(COMPUTE)
    weight_decay = tl.load(hp + _HP_WEIGHT_DECAY).to(COMPUTE)
    lr_kappa = (tl.load(hp + _HP_LR) * tl.load(hp + _HP_KAPPA)).to(COMPUTE)
    lr_over_mu = (tl.load(hp + _HP_LR) / tl.load(hp + _HP_MU)).to(COMPUTE)
    inv_scale = 1.0
    if HAS_INV_SCALE:
        inv_scale = tl.load(inv_scale_ptr).to(COMPUTE)
    seed = tl.load(rng_ptr + _RNG_SEED).to(tl.uint32)
    step = tl.load(rng_ptr + _RNG_STEP).to(tl.uint32)
    use_momentum = tl.load(hp + _HP_USE_MOMENTUM) != 0.0
    momentum_history = use_momentum & momentum_ready
    live_rows = tl.where(active, num_rows, 0)
    v_load_rows = tl.where(momentum_history, live_rows, 0)
    v_store_rows = tl.where(use_momentum, live_rows, 0)

    if penalty == _PENALTY_GROUP:
        if row_len % ALIGN != 0:
            _rows(
                params_ptr, grads_ptr, z_ptr, momentum_ptr, group_norms_ptr, norm_index_ptr, start, row_len,
                live_rows, v_load_rows, v_store_rows, norm_offset, momentum_history, inv_scale, weight_decay,
                rho, one_minus_dampening, kappa, lam, inv_mu, lr_kappa, lr_over_mu, seed, step,
                ROWS, SCALAR_COLS, COMPUTE, HAS_INV_SCALE, STOCHASTIC_ROUNDING, HAS_COUPLING,
            )
        elif num_rows > 1:
            _rows(
                params_ptr, grads_ptr, z_ptr, momentum_ptr, group_norms_ptr, norm_index_ptr,
                (start // ALIGN) * ALIGN, (row_len // ALIGN) * ALIGN, live_rows, v_load_rows, v_store_rows,
                norm_offset, momentum_history, inv_scale, weight_decay, rho, one_minus_dampening, kappa, lam,
                inv_mu, lr_kappa, lr_over_mu, seed, step, ROWS, COLS, COMPUTE, HAS_INV_SCALE,
                STOCHASTIC_ROUNDING, HAS_COUPLING,
            )
        else:  # one row: the 1-D path
            _stream(
                params_ptr, grads_ptr, z_ptr, momentum_ptr, group_norms_ptr, norm_index_ptr, start, row_len,
                norm_offset, live_rows > 0, True, momentum_history, use_momentum, inv_scale, weight_decay,
                rho, one_minus_dampening, kappa, lam, inv_mu, lr_kappa, lr_over_mu, seed, step,
                True, BLOCK, ALIGN, COMPUTE, HAS_INV_SCALE, STOCHASTIC_ROUNDING, HAS_COUPLING,
            )
    else:
        # l1/"none" rows are back to back and a multiple of 16 long: the chunk's end is
        # rounded up into the parameter's zero padding.
        end = (end + _SLOT_ALIGNMENT - 1) // _SLOT_ALIGNMENT * _SLOT_ALIGNMENT
        length = tl.minimum(num_rows * row_len, end - start)
        _stream(
            params_ptr, grads_ptr, z_ptr, momentum_ptr, group_norms_ptr, norm_index_ptr, start, length,
            norm_offset, live_rows > 0, penalty != 0,
            momentum_history, use_momentum, inv_scale, weight_decay, rho, one_minus_dampening, kappa, lam,
            inv_mu, lr_kappa, lr_over_mu, seed, step,
            False, BLOCK, ALIGN, COMPUTE, HAS_INV_SCALE, STOCHASTIC_ROUNDING, HAS_COUPLING,
        )


@triton.jit
def _coupled_norms_kernel(
    group_norms_ptr, coupled_offsets_ptr, coupled_rows_ptr, coupled_scale_ptr, found_inf_ptr, num_rows,
    num_coupled, BLOCK: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
):
    """``group_norms[num_rows + c] = coupled_scale[c] · sqrt(Σ group_norms[member]²)``,
    one lane per coupled group ``c``, the squares added in member order (no FMA: the
    launch options), the square root rounded to nearest as IEEE says (``sqrt_rn``; in
    float64 ``sqrt`` is exact-rounded already): the bits of the C kernel's serial pass."""
    groups = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = groups < num_coupled
    stored = live  # (masks are built by comparing with bounds, see _update_tile)
    if HAS_FOUND_INF:  # inf/NaN gradients: nothing is written
        stored = groups < tl.where(tl.load(found_inf_ptr) == 0.0, num_coupled, 0)
    first = tl.load(coupled_offsets_ptr + groups, mask=live, other=0)
    count = tl.load(coupled_offsets_ptr + groups + 1, mask=live, other=0) - first
    sq_sum = tl.zeros([BLOCK], dtype=group_norms_ptr.dtype.element_ty)
    for member in range(0, tl.max(count, axis=0)):
        present = member < count
        row = tl.load(coupled_rows_ptr + first + member, mask=present, other=0)
        norm = tl.load(group_norms_ptr + row, mask=present, other=0.0)
        sq_sum = sq_sum + norm * norm
    root = tl.sqrt(sq_sum) if group_norms_ptr.dtype.element_ty == tl.float64 else tl.sqrt_rn(sq_sum)
    norms = tl.load(coupled_scale_ptr + groups, mask=live, other=0.0) * root
    tl.store(group_norms_ptr + num_rows + groups, norms, mask=stored)


COUPLED_BLOCK = 32 * NUM_WARPS
"""Coupled groups per program of ``_coupled_norms_kernel``: one per thread."""


@functools.cache
def kernel_constants(dtype: torch.dtype) -> dict[str, object]:
    """The constexpr sizes for a bucket of ``dtype``: each thread handles ``ALIGN``
    consecutive elements per stream, one 128-bit access of W and g (and of Z and v when
    they have the parameters' width; bfloat16 state of a float32 bucket moves in 64-bit
    accesses: 128-bit ones would need 8 float32 per thread, and Triton then sends the W
    store through shared memory to keep stores at 128 bits per thread). Cached: read only."""
    align = VECTOR_BYTES // dtype.itemsize
    threads = 32 * NUM_WARPS
    rows = abi.TRITON_GEOMETRY.rows_per_chunk
    return {
        "ROWS": rows,
        "COLS": align * threads // rows,
        "SCALAR_COLS": 2 * threads // rows,
        "BLOCK": align * threads,
        "ALIGN": align,
        "N_CHUNK_FIELDS": abi.CHUNK_FIELDS,
        "N_HPARAM_FIELDS": abi.HPARAM_FIELDS,
        "COMPUTE": tl.float64 if dtype == torch.float64 else tl.float32,
    }


LAUNCH_OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}
"""Triton compile options of every launch (also used by the ahead-of-time checks)."""


def launch(args: abi.BucketArgs) -> None:
    """Run ``slbi_triton::bucket_step`` (:class:`.abi.BucketArgs`): the step in one
    launch, the coupled norms (if any) in a second, then count the step in ``rng``
    unless ``found_inf`` is set.

    Raises:
        ValueError: if the coupled tables do not fit the buffers (:func:`.abi.coupling_of`).
    """
    coupling = abi.coupling_of(args)
    hparams, found_inf = args.hparams, args.found_inf
    num_chunks = args.chunks.shape[0]
    if num_chunks > 0:
        _slbi_bucket_kernel[(num_chunks,)](
            args.params,
            args.grads,
            args.z,
            # Unused pointers when absent (flags or constexprs keep them from being read).
            args.momentum if args.momentum is not None else args.z,
            args.group_norms,
            args.chunks,
            args.slot_flags,
            hparams,
            args.rng,
            args.inv_scale if args.inv_scale is not None else hparams,
            found_inf if found_inf is not None else hparams,
            coupling.norm_index if coupling is not None else args.chunks,
            **kernel_constants(args.params.dtype),
            HAS_INV_SCALE=args.inv_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            STOCHASTIC_ROUNDING=args.stochastic_rounding,
            HAS_COUPLING=coupling is not None,
            **LAUNCH_OPTIONS,
        )
    num_coupled = 0 if coupling is None else coupling.coupled_scale.numel()
    if num_coupled > 0:
        _coupled_norms_kernel[(triton.cdiv(num_coupled, COUPLED_BLOCK),)](
            args.group_norms, coupling.coupled_offsets, coupling.coupled_rows, coupling.coupled_scale,
            found_inf if found_inf is not None else hparams, args.group_norms.numel() - num_coupled,
            num_coupled, BLOCK=COUPLED_BLOCK, HAS_FOUND_INF=found_inf is not None, **LAUNCH_OPTIONS,
        )
    abi.count_step_(args.rng, found_inf)
