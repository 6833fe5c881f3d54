"""The SLBI math in plain torch ops: the reference every kernel is tested against, and the
torch backend.

Each function implements an equation of ``docs/design.md`` ("The update", "Coupled channel
groups", "Stochastic rounding") on tensors of any shape. :func:`slbi_update_` is one step on a contiguous run
of elements sharing one param group and penalty; :func:`bucket_step_reference` is the op
``slbi_triton::bucket_step`` written with it, reading the same ABI tables as the C and
Triton kernels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .kernels import abi

Scalar = float | Tensor

_UINT32 = 0xFFFFFFFF


def prox_l1(z: Tensor, lam: Scalar) -> Tensor:
    """Soft threshold ``sign(Z) · max(|Z| − λ, 0)``, elementwise."""
    return torch.sign(z) * torch.clamp(z.abs() - lam, min=0.0)


def group_shrink_factor(group_norms: Tensor, lam: Scalar) -> Tensor:
    """``max(0, 1 − λ/‖Z_g‖)`` per group, 0 where ``‖Z_g‖ = 0`` (no NaN)."""
    safe_norms = torch.where(group_norms > 0, group_norms, torch.ones_like(group_norms))
    return torch.where(
        group_norms > 0, torch.clamp(1.0 - lam / safe_norms, min=0.0), torch.zeros_like(group_norms)
    )


def group_norms_of(z: Tensor) -> Tensor:
    """‖Z_g‖₂ of each slice along dim 0 (one output filter or row), in the arithmetic
    dtype of ``z`` (float64 for float64, else float32)."""
    return torch.linalg.vector_norm(z.reshape(z.shape[0], -1).to(compute_dtype(z.dtype)), dim=1)


def prox_group(z: Tensor, lam: Scalar, group_norms: Tensor | None = None) -> Tensor:
    """Group shrinkage ``Z_g · max(0, 1 − λ/‖Z_g‖)`` over slices along dim 0."""
    if group_norms is None:
        group_norms = group_norms_of(z)
    factor = group_shrink_factor(group_norms, lam).to(z.dtype)
    return (z.reshape(z.shape[0], -1) * factor[:, None]).reshape(z.shape)


def gamma_of(
    z: Tensor, kappa: Scalar, lam: Scalar, penalty: str, group_norms: Tensor | None = None
) -> Tensor:
    """Γ = κ · prox(Z) for one parameter tensor (never stored by the optimizer); for the
    group penalty, ``group_norms`` are the norms each row's prox uses (default: the rows'
    own ‖Z_r‖; a coupled row's is its group's, ``FlatBucket.prox_norms_of``)."""
    if penalty == "l1":
        return kappa * prox_l1(z, lam)
    if penalty == "group":
        return kappa * prox_group(z, lam, group_norms)
    raise ValueError(f"Γ is defined for penalties 'l1' and 'group', not {penalty!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update runs in: float64 for float64 parameters, else float32."""
    return abi.norm_dtype(dtype)


# -- stochastic rounding ------------------------------------------------------------------


def sr_hash(seed: Tensor | int, step: Tensor | int, index: Tensor) -> Tensor:
    """32 random bits per element (an int64 tensor in ``[0, 2**32)``): the counter-based
    hash of (seed, step, flat element index) of docs/design.md, bit for bit as the C and
    Triton kernels compute it in uint32 arithmetic."""
    seed = torch.as_tensor(seed, device=index.device) & _UINT32
    step = torch.as_tensor(step, device=index.device) & _UINT32
    h = ((index & _UINT32) * 0x9E3779B1) & _UINT32
    h = h ^ ((((index >> 32) & _UINT32) * 0x85EBCA77) & _UINT32)
    h = h ^ seed
    h = (h + step * 0xC2B2AE3D) & _UINT32
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _UINT32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _UINT32
    return h ^ (h >> 16)


def round_bf16_stochastic(value: Tensor, random16: Tensor) -> Tensor:
    """float32 → bfloat16, rounded up in magnitude with probability (dropped bits)/2**16,
    so the expected value is ``value``; inf stays inf, NaN becomes the quiet NaN
    (``0x7FC0``; its sign and payload are not kept).

    Args:
        value: float32 tensor.
        random16: int64 tensor of random integers in ``[0, 2**16)``, ``value``'s shape.
    """
    bits = value.view(torch.int32).to(torch.int64) & _UINT32
    rounded = torch.where(torch.isnan(value), 0x7FC0, (bits + random16) >> 16)
    # The 16 high bits, as int16 (two's complement), are the bfloat16's bits.
    return (rounded - ((rounded & 0x8000) << 1)).to(torch.int16).view(torch.bfloat16)


def run_bits(rng: Tensor, first_index: int, like: Tensor) -> Tensor:
    """The 32 random bits of each element of a run shaped like ``like`` whose first
    element has flat index ``first_index`` in a bucket with ``rng`` (int64 ``[seed, step]``)."""
    index = torch.arange(like.numel(), device=like.device, dtype=torch.int64) + first_index
    return sr_hash(rng[abi.RNG_SEED], rng[abi.RNG_STEP], index).view(like.shape)


# -- the update -------------------------------------------------------------------------


def slbi_update_(
    w: Tensor,
    g: Tensor,
    z: Tensor | None,
    v: Tensor | None,
    group_norms: Tensor | None,
    *,
    lr: Scalar, kappa: Scalar, mu: Scalar, lam: Scalar,
    momentum: Scalar, dampening: Scalar, weight_decay: Scalar, penalty: str,
    momentum_ready: bool,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    rounding_rng: Tensor | None = None,
    first_index: int = 0,
) -> None:
    """One SLBI step (docs/design.md, "The update") on a run of elements, in place, in
    float32 (float64 for float64 parameters); ``group_norms`` (‖Z_t,g‖) is read, not
    refreshed: call :func:`refresh_group_norms_` afterwards (in one Inductor graph a
    refresh would make Z_{t+1} a temporary).

    Args:
        w, g: weights and gradients of the run: 1-D for penalties ``"l1"``/``"none"``,
            ``(groups, group_size)`` for ``"group"``; ``z``: its split variable (``None``
            for ``"none"``); ``v``: its momentum buffer (``None`` when the group keeps
            none), holding ``v_t`` if ``momentum_ready`` (else ``v_{t+1} = u``).
        inv_scale: optional 0-d float32 tensor; ``g`` holds gradients scaled by
            ``1 / inv_scale`` (``torch.amp.GradScaler``), unscaled as they are read.
        found_inf: optional 0-d float32 tensor; non-zero: nothing changes (no host sync).
        rounding_rng: int64 ``[seed, step]``: store ``z`` and ``v`` (bfloat16) stochastically
            rounded with :func:`run_bits` from ``first_index`` (the run's first flat index
            in its bucket); ``None``: round to nearest.
    """
    keep = None if found_inf is None else found_inf != 0
    bits = None if rounding_rng is None else run_bits(rounding_rng, first_index, w)
    work = compute_dtype(w.dtype)
    w32 = w.to(work)
    g32 = g.to(work) if inv_scale is None else g.to(work) * inv_scale
    u = g32 + weight_decay * w32  # u = g + wd · W_t
    velocity = u
    if v is not None:
        v32 = v.to(work)
        if momentum_ready:
            velocity = momentum * v32 + (1.0 - dampening) * u
        _store(v, v32, velocity, keep, None if bits is None else bits >> 16)
    if penalty == "none":
        _store(w, w32, w32 - lr * kappa * velocity, keep)
        return
    z32 = z.to(work)
    if penalty == "group":
        gamma = kappa * z32 * group_shrink_factor(group_norms, lam)[:, None]
    else:
        gamma = kappa * prox_l1(z32, lam)
    residual = w32 - gamma  # W_t − Γ_t
    # (W − Γ)·(1/μ): the kernels multiply by 1/μ (formed in float64) rather than divide.
    _store(w, w32, w32 - lr * kappa * (velocity + residual * (1.0 / mu)), keep)
    _store(z, z32, z32 + (lr / mu) * residual, keep, None if bits is None else bits & 0xFFFF)


def _store(
    dst: Tensor, old: Tensor, new: Tensor, keep: Tensor | None, random16: Tensor | None = None
) -> None:
    """``dst = new`` (stochastically rounded with ``random16``), or ``old`` where ``keep``:
    inf/NaN in the discarded branch of ``torch.where`` does not leak into the kept one."""
    if random16 is not None:
        new = round_bf16_stochastic(new, random16).to(new.dtype)
    dst.copy_(new if keep is None else torch.where(keep, old, new))


def refresh_group_norms_(z: Tensor, group_norms: Tensor, found_inf: Tensor | None = None) -> None:
    """Write ‖Z_g‖ of each row of the 2-D ``z`` (one group a row) into ``group_norms``
    (in its dtype); where ``found_inf`` (0-d) is non-zero, keep the old norms bit for bit."""
    norms = torch.linalg.vector_norm(z.to(group_norms.dtype), dim=1)
    if found_inf is None:
        group_norms.copy_(norms)
    else:
        group_norms.copy_(torch.where(found_inf != 0, group_norms, norms))


def member_table(coupled_offsets: Tensor, coupled_rows: Tensor) -> Tensor:
    """The members of each of the ``C ≥ 1`` coupled groups as an int64 ``(M, C)`` table,
    ``M`` the largest group: column ``c`` lists group ``c``'s rows in order, then ``-1``.
    Built once per layout (it reads the offsets on the host)."""
    offsets, rows = coupled_offsets.cpu().to(torch.int64), coupled_rows.cpu().to(torch.int64)
    sizes = offsets[1:] - offsets[:-1]
    position = torch.arange(int(sizes.max()), dtype=torch.int64)[:, None]
    at = (offsets[:-1][None, :] + position).clamp(max=rows.numel() - 1)
    return torch.where(position < sizes[None, :], rows[at], -1).to(coupled_rows.device)


def sqrt_rn(x: Tensor) -> Tensor:
    """The square root rounded to nearest, as IEEE 754 defines it and the C and Triton
    kernels compute it: torch's vectorised CPU kernels (Sleef) may miss by an ulp. float32
    goes through float64 (rounded twice, still exact: 53 ≥ 2·24 + 2 bits); float64 on the
    CPU through NumPy (the hardware instruction), on CUDA torch's is exact already."""
    if x.dtype == torch.float32:
        return torch.sqrt(x.double()).float()
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.from_numpy(np.sqrt(x.numpy()))
    return torch.sqrt(x)


def coupled_norms_(
    group_norms: Tensor, members: Tensor, coupled_scale: Tensor, found_inf: Tensor | None = None
) -> None:
    """Write the coupled norms ``‖Z_G‖ = s_G · sqrt(Σ_{r∈G} ‖Z_r‖²)`` into the last
    ``C`` entries of ``group_norms`` from the rows' own norms (its first entries), the
    squares added in member order, as the C and Triton kernels add them: the same bits.

    Args:
        group_norms: the ``R`` own norms, then the ``C`` coupled ones.
        members: :func:`member_table` of the coupled tables.
        coupled_scale: ``s_G`` per group, in ``group_norms``' dtype.
        found_inf: optional 0-d float32 tensor; non-zero: keep the old norms bit for bit.
    """
    num_coupled = coupled_scale.numel()
    own = group_norms[members.clamp(min=0)]
    squares = torch.where(members >= 0, own * own, torch.zeros_like(own))
    sq_sum = torch.zeros(num_coupled, dtype=group_norms.dtype, device=group_norms.device)
    for position in range(members.shape[0]):  # in member order, one add at a time
        sq_sum = sq_sum + squares[position]
    norms = coupled_scale * sqrt_rn(sq_sum)
    target = group_norms[group_norms.numel() - num_coupled :]
    target.copy_(norms if found_inf is None else torch.where(found_inf != 0, target, norms))


# -- the op, in torch ----------------------------------------------------------------------


def bucket_step_reference(args: abi.BucketArgs) -> None:
    """``slbi_triton::bucket_step`` in torch ops, chunk by chunk from the same tables
    (slow: for tests). Every kernel is tested against it."""
    params, z, momentum, group_norms, rng = args.params, args.z, args.momentum, args.group_norms, args.rng
    if args.found_inf is not None and bool(args.found_inf.reshape(()) != 0):
        return
    coupling = abi.coupling_of(args)
    inv = None if args.inv_scale is None else args.inv_scale.reshape(())
    for chunk in args.chunks.tolist():
        flags = int(args.slot_flags[chunk[abi.CHUNK_SLOT]])
        if not flags & abi.FLAG_ACTIVE:
            continue
        hp = args.hparams[chunk[abi.CHUNK_HPARAM_ROW]].tolist()
        penalty = next(k for k, code in abi.PENALTY_CODES.items() if code == chunk[abi.CHUNK_PENALTY])
        start, rows, row_len = chunk[abi.CHUNK_START], chunk[abi.CHUNK_ROWS], chunk[abi.CHUNK_ROW_LEN]
        stop = min(start + rows * row_len, chunk[abi.CHUNK_END])
        shape = (rows, row_len) if penalty == "group" else (stop - start,)
        span = slice(start, stop)
        norms = prox_norms = None
        if penalty == "group":
            norms = group_norms[chunk[abi.CHUNK_NORM_OFFSET] : chunk[abi.CHUNK_NORM_OFFSET] + rows]
            prox_norms = norms
            if coupling is not None:
                at = coupling.norm_index[chunk[abi.CHUNK_NORM_OFFSET] : chunk[abi.CHUNK_NORM_OFFSET] + rows]
                prox_norms = group_norms[at.long()]
        use_momentum = hp[abi.HP_USE_MOMENTUM] != 0.0 and momentum is not None
        slbi_update_(
            params[span].view(shape),
            args.grads[span].view(shape),
            None if penalty == "none" else z[span].view(shape),
            momentum[span].view(shape) if use_momentum else None,
            prox_norms,
            **{key: hp[column] for column, key in abi.HPARAM_KEYS.items()},
            penalty=penalty,
            momentum_ready=bool(flags & abi.FLAG_MOMENTUM_READY),
            inv_scale=inv,
            rounding_rng=rng if args.stochastic_rounding else None,
            first_index=start,
        )
        if norms is not None:
            refresh_group_norms_(z[span].view(shape), norms)
    if coupling is not None:
        members = member_table(coupling.coupled_offsets, coupling.coupled_rows)
        coupled_norms_(group_norms, members, coupling.coupled_scale)
    abi.count_step_(rng)
