"""The CUDA implementation of ``slbi_triton::bucket_step``: one Triton launch per bucket.

The kernel reads the tables of the kernel ABI (:mod:`.abi`) and implements the update of
``docs/design.md`` per element, in float32 (float64 for float64 buckets). ``‖Z_g‖`` of
``Z_t`` comes from the group-norm table written by the previous step; this step writes
``‖Z_{t+1,g}‖`` for the next one. Each program owns whole groups, so the norms are plain
per-program reductions: deterministic, no atomics. Each of W, Z, g, v is read once and W,
Z, v written once.

Mixed precision (``torch.amp.GradScaler``): the gradients are multiplied by ``1/scale`` as
they are loaded, and when ``found_inf`` is non-zero every program stores nothing, so a
step with inf/NaN gradients leaves W, Z, v and the norms as they were, with no host sync.
"""

from __future__ import annotations

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
def _round_bf16_stochastic(value, random16):
    """float32 -> bfloat16, rounded up in magnitude with probability (dropped bits)/2**16."""
    bits = value.to(tl.uint32, bitcast=True)
    special = (bits & 0x7F800000) == 0x7F800000  # inf / NaN: keep them (NaN stays NaN)
    nan_bit = tl.where((bits & 0x007FFFFF) != 0, 0x0040, 0).to(tl.uint32)
    rounded = tl.where(special, (bits >> 16) | nan_bit, (bits + random16) >> 16)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


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
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    N_CHUNK_FIELDS: tl.constexpr,
    N_HPARAM_FIELDS: tl.constexpr,
    COMPUTE: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr,
):
    chunk = chunks_ptr + tl.program_id(0).to(tl.int64) * N_CHUNK_FIELDS
    start = tl.load(chunk + _CHUNK_START).to(tl.int64)
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
    mu = tl.load(hp + _HP_MU).to(COMPUTE)
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

    penalised = penalty != 0
    is_group = penalty == _PENALTY_GROUP
    use_momentum = tl.load(hp + _HP_USE_MOMENTUM) != 0.0
    momentum_history = use_momentum & momentum_ready

    # Scalar conditions become row bounds: rows at or past a bound are masked out.
    live_rows = tl.where(active, num_rows, 0)
    z_rows = tl.where(penalised, live_rows, 0)
    norm_rows = tl.where(is_group, live_rows, 0)
    v_load_rows = tl.where(momentum_history, live_rows, 0)
    v_store_rows = tl.where(use_momentum, live_rows, 0)

    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    row_base = start + rows.to(tl.int64) * row_len

    # Group shrinkage factor max(0, 1 − λ/‖Z_g‖) of Z_t, 0 where ‖Z_g‖ = 0.
    z_norm = tl.load(group_norms_ptr + norm_offset + rows, mask=rows < norm_rows, other=0.0)
    safe_norm = tl.where(z_norm > 0.0, z_norm, 1.0)
    group_scale = tl.where(z_norm > 0.0, tl.maximum(1.0 - lam / safe_norm, 0.0), 0.0)

    z_sq_sum = tl.zeros([ROWS], dtype=COMPUTE)
    for col0 in range(0, row_len, COLS):
        col = col0 + cols
        offs = row_base[:, None] + col[None, :]
        in_row = (col[None, :] < row_len) & (offs < end)
        mask = (rows < live_rows)[:, None] & in_row
        z_mask = (rows < z_rows)[:, None] & in_row
        w = tl.load(params_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        g = tl.load(grads_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        if HAS_INV_SCALE:
            g = g * inv_scale
        z = tl.load(z_ptr + offs, mask=z_mask, other=0.0).to(COMPUTE)
        v_mask = (rows < v_load_rows)[:, None] & in_row
        v = tl.load(momentum_ptr + offs, mask=v_mask, other=0.0).to(COMPUTE)

        u = g + weight_decay * w
        v_new = tl.where(momentum_history, rho * v + one_minus_dampening * u, u)

        gamma_l1 = tl.where(z >= 0.0, 1.0, -1.0) * tl.maximum(tl.abs(z) - lam, 0.0)
        gamma = kappa * tl.where(is_group, z * group_scale[:, None], gamma_l1)
        residual = tl.where(penalised, w - gamma, 0.0)

        w_new = w - lr_kappa * (v_new + residual / mu)
        z_next = z + lr_over_mu * residual
        if STOCHASTIC_ROUNDING:
            bits = _sr_hash(seed, step, offs)
            z_new = _round_bf16_stochastic(z_next, bits & 0xFFFF)
            v_stored = _round_bf16_stochastic(v_new, bits >> 16)
        else:
            z_new = z_next.to(z_ptr.dtype.element_ty)
            v_stored = v_new.to(momentum_ptr.dtype.element_ty)

        tl.store(params_ptr + offs, w_new.to(params_ptr.dtype.element_ty), mask=mask)
        tl.store(z_ptr + offs, z_new, mask=z_mask)
        v_store_mask = (rows < v_store_rows)[:, None] & in_row
        tl.store(momentum_ptr + offs, v_stored, mask=v_store_mask)

        # ‖Z_{t+1, g}‖ of the stored (rounded) values, for the next step's Γ.
        z_stored = tl.where(z_mask, z_new.to(COMPUTE), 0.0)
        z_sq_sum += tl.sum(z_stored * z_stored, axis=1)

    tl.store(group_norms_ptr + norm_offset + rows, tl.sqrt(z_sq_sum), mask=rows < norm_rows)


def launch(
    params: torch.Tensor,
    grads: torch.Tensor,
    z: torch.Tensor,
    momentum: torch.Tensor | None,
    group_norms: torch.Tensor,
    chunks: torch.Tensor,
    slot_flags: torch.Tensor,
    hparams: torch.Tensor,
    rng: torch.Tensor,
    inv_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    stochastic_rounding: bool,
) -> None:
    """Run ``slbi_triton::bucket_step`` in one launch (the arguments are those of the op,
    see :mod:`.ops`), then count the step in ``rng`` unless ``found_inf`` is set."""
    num_chunks = chunks.shape[0]
    if num_chunks > 0:
        _slbi_bucket_kernel[(num_chunks,)](
            params,
            grads,
            z,
            # Unused pointers when absent (flags or constexprs keep them from being read).
            momentum if momentum is not None else z,
            group_norms,
            chunks,
            slot_flags,
            hparams,
            rng,
            inv_scale if inv_scale is not None else hparams,
            found_inf if found_inf is not None else hparams,
            ROWS=abi.TRITON_GEOMETRY.rows_per_chunk,
            COLS=abi.TRITON_GEOMETRY.col_multiple,
            N_CHUNK_FIELDS=abi.CHUNK_FIELDS,
            N_HPARAM_FIELDS=abi.HPARAM_FIELDS,
            COMPUTE=tl.float64 if params.dtype == torch.float64 else tl.float32,
            HAS_INV_SCALE=inv_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            STOCHASTIC_ROUNDING=stochastic_rounding,
        )
    step = rng[abi.RNG_STEP :]
    if found_inf is None:
        step.add_(1)
    else:
        step.add_((found_inf == 0).to(torch.int64))
