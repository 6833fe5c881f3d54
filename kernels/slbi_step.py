"""The fused SLBI step: one Triton launch updates every tensor of a flat bucket.

Per element, in float32 (DESIGN.md §1, step t → t+1)::

    u       = g + wd · W
    v_{t+1} = u                          first step, or ρ = 0
            = ρ · v_t + (1 − δ) · u      otherwise
    Γ_t     = κ · prox(Z_t)              l1:    sign(Z) · max(|Z| − λ, 0)
                                         group: Z_g · max(0, 1 − λ / ‖Z_g‖)   (0 if ‖Z_g‖ = 0)
    W_{t+1} = W_t − α·κ·(v_{t+1} + (W_t − Γ_t) / μ)      penalised
    Z_{t+1} = Z_t + (α / μ) · (W_t − Γ_t)                penalised
    W_{t+1} = W_t − α·κ·v_{t+1}                           penalty "none"

‖Z_g‖ of Z_t comes from the group-norm table written by the previous step; this step
writes ‖Z_{t+1, g}‖ for the next one. Each program owns whole groups, so the norms are
plain per-program reductions: deterministic, no atomics. Each of W, Z, g, v is read once
and W, Z, v written once.

Mixed precision (``torch.amp.GradScaler``): the gradients are multiplied by ``1/scale``
as they are loaded, and when ``found_inf`` is non-zero every program stores nothing, so a
step with inf/NaN gradients leaves W, Z, v and the norms as they were, with no host sync.
"""

import torch
import triton
import triton.language as tl

from .chunk_format import (
    CHUNK_END,
    CHUNK_FIELDS,
    CHUNK_HPARAM_ROW,
    CHUNK_NORM_OFFSET,
    CHUNK_PENALTY,
    CHUNK_ROW_LEN,
    CHUNK_ROWS,
    CHUNK_SLOT,
    CHUNK_START,
    FLAG_ACTIVE,
    FLAG_MOMENTUM_READY,
    HP_DAMPENING,
    HP_KAPPA,
    HP_LAM,
    HP_LR,
    HP_MOMENTUM,
    HP_MU,
    HP_USE_MOMENTUM,
    HP_WEIGHT_DECAY,
    HPARAM_FIELDS,
    PENALTY_CODES,
    TILE_COLS,
    TILE_ROWS,
)

# Triton reads module globals only when they are constexpr.
_CHUNK_END = tl.constexpr(CHUNK_END)
_CHUNK_HPARAM_ROW = tl.constexpr(CHUNK_HPARAM_ROW)
_CHUNK_NORM_OFFSET = tl.constexpr(CHUNK_NORM_OFFSET)
_CHUNK_PENALTY = tl.constexpr(CHUNK_PENALTY)
_CHUNK_ROW_LEN = tl.constexpr(CHUNK_ROW_LEN)
_CHUNK_ROWS = tl.constexpr(CHUNK_ROWS)
_CHUNK_SLOT = tl.constexpr(CHUNK_SLOT)
_CHUNK_START = tl.constexpr(CHUNK_START)
_FLAG_ACTIVE = tl.constexpr(FLAG_ACTIVE)
_FLAG_MOMENTUM_READY = tl.constexpr(FLAG_MOMENTUM_READY)
_HP_DAMPENING = tl.constexpr(HP_DAMPENING)
_HP_KAPPA = tl.constexpr(HP_KAPPA)
_HP_LAM = tl.constexpr(HP_LAM)
_HP_LR = tl.constexpr(HP_LR)
_HP_MOMENTUM = tl.constexpr(HP_MOMENTUM)
_HP_MU = tl.constexpr(HP_MU)
_HP_USE_MOMENTUM = tl.constexpr(HP_USE_MOMENTUM)
_HP_WEIGHT_DECAY = tl.constexpr(HP_WEIGHT_DECAY)
_PENALTY_GROUP = tl.constexpr(PENALTY_CODES["group"])


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
    inv_scale_ptr,
    found_inf_ptr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    N_CHUNK_FIELDS: tl.constexpr,
    N_HPARAM_FIELDS: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
):
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
    lr = tl.load(hp + _HP_LR)
    kappa = tl.load(hp + _HP_KAPPA)
    mu = tl.load(hp + _HP_MU)
    lam = tl.load(hp + _HP_LAM)
    rho = tl.load(hp + _HP_MOMENTUM)
    dampening = tl.load(hp + _HP_DAMPENING)
    weight_decay = tl.load(hp + _HP_WEIGHT_DECAY)
    inv_scale = 1.0
    if HAS_INV_SCALE:
        inv_scale = tl.load(inv_scale_ptr)

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

    z_sq_sum = tl.zeros([ROWS], dtype=tl.float32)
    for col0 in range(0, row_len, COLS):
        col = col0 + cols
        offs = row_base[:, None] + col[None, :]
        in_row = (col[None, :] < row_len) & (offs < end)
        mask = (rows < live_rows)[:, None] & in_row
        z_mask = (rows < z_rows)[:, None] & in_row
        w = tl.load(params_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grads_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_INV_SCALE:
            g = g * inv_scale
        z = tl.load(z_ptr + offs, mask=z_mask, other=0.0).to(tl.float32)
        v_mask = (rows < v_load_rows)[:, None] & in_row
        v = tl.load(momentum_ptr + offs, mask=v_mask, other=0.0).to(tl.float32)

        u = g + weight_decay * w
        v_new = tl.where(momentum_history, rho * v + (1.0 - dampening) * u, u)

        gamma_l1 = tl.where(z >= 0.0, 1.0, -1.0) * tl.maximum(tl.abs(z) - lam, 0.0)
        gamma = kappa * tl.where(is_group, z * group_scale[:, None], gamma_l1)
        residual = tl.where(penalised, w - gamma, 0.0)

        w_new = w - lr * kappa * (v_new + residual / mu)
        z_new = (z + (lr / mu) * residual).to(z_ptr.dtype.element_ty)

        tl.store(params_ptr + offs, w_new.to(params_ptr.dtype.element_ty), mask=mask)
        tl.store(z_ptr + offs, z_new, mask=z_mask)
        v_store_mask = (rows < v_store_rows)[:, None] & in_row
        tl.store(momentum_ptr + offs, v_new.to(momentum_ptr.dtype.element_ty), mask=v_store_mask)

        # ‖Z_{t+1, g}‖ of the stored (rounded) values, for the next step's Γ.
        z_stored = tl.where(z_mask, z_new.to(tl.float32), 0.0)
        z_sq_sum += tl.sum(z_stored * z_stored, axis=1)

    tl.store(group_norms_ptr + norm_offset + rows, tl.sqrt(z_sq_sum), mask=rows < norm_rows)


@torch.library.custom_op(
    "slbi_triton::bucket_step", mutates_args=("params", "z", "momentum", "group_norms")
)
def slbi_bucket_step(
    params: torch.Tensor,
    grads: torch.Tensor,
    z: torch.Tensor,
    momentum: torch.Tensor,
    group_norms: torch.Tensor,
    chunks: torch.Tensor,
    slot_flags: torch.Tensor,
    hparams: torch.Tensor,
    inv_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """Run one SLBI step over a flat bucket in a single kernel launch.

    A torch custom op (``torch.ops.slbi_triton.bucket_step``): ``torch.compile`` sees one
    opaque, correctly ordered mutation of ``params``, ``z``, ``momentum`` and
    ``group_norms``, and nothing inside it allocates, so it can be captured in a CUDA graph.

    Args:
        params, grads, z, momentum: flat 1-D buffers of the bucket (same length and
            dtype; ``momentum`` may be a 1-element placeholder when no group uses it).
        group_norms: float32 table of ‖Z_g‖, read for Γ_t and overwritten with ‖Z_{t+1,g}‖.
        chunks: int32 or int64 ``(num_chunks, CHUNK_FIELDS)`` table (see ``chunk_format``).
        slot_flags: int32 flag word per parameter (``FLAG_ACTIVE | FLAG_MOMENTUM_READY``).
        hparams: float32 ``(num_groups, HPARAM_FIELDS)`` hyper-parameter table.
        inv_scale: optional float32 1-element tensor: gradients are multiplied by it
            (``1 / GradScaler`` scale), so ``grads`` holds the scaled gradients.
        found_inf: optional float32 1-element tensor: when non-zero, nothing is written.
    """
    num_chunks = chunks.shape[0]
    if num_chunks == 0:
        return
    _slbi_bucket_kernel[(num_chunks,)](
        params,
        grads,
        z,
        momentum,
        group_norms,
        chunks,
        slot_flags,
        hparams,
        # Unused pointers when absent (the constexpr flags compile their loads out).
        inv_scale if inv_scale is not None else hparams,
        found_inf if found_inf is not None else hparams,
        ROWS=TILE_ROWS,
        COLS=TILE_COLS,
        N_CHUNK_FIELDS=CHUNK_FIELDS,
        N_HPARAM_FIELDS=HPARAM_FIELDS,
        HAS_INV_SCALE=inv_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
    )


@slbi_bucket_step.register_fake
def _(
    params, grads, z, momentum, group_norms, chunks, slot_flags, hparams, inv_scale=None, found_inf=None
) -> None:
    # Mutations only, no outputs: nothing to describe to the tracer.
    return None
