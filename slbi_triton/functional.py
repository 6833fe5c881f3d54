"""The SLBI math in plain torch ops: the torch backend and the executable reference.

Every function here implements an equation of DESIGN.md §1 on tensors of any shape; the
optimizer calls them on contiguous *runs* of its flat buffers (a run shares one param
group, one penalty and, for the group penalty, one group size). The Triton kernel in
``slbi_triton.kernels.slbi_step`` is tested against these functions, and both against a
float64 reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

Scalar = float | Tensor


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
    """‖Z_g‖₂ of each slice along dim 0 (one output filter or row), in float32."""
    return torch.linalg.vector_norm(z.reshape(z.shape[0], -1).float(), dim=1)


def prox_group(z: Tensor, lam: Scalar, group_norms: Tensor | None = None) -> Tensor:
    """Group shrinkage ``Z_g · max(0, 1 − λ/‖Z_g‖)`` over slices along dim 0."""
    if group_norms is None:
        group_norms = group_norms_of(z)
    factor = group_shrink_factor(group_norms, lam).to(z.dtype)
    return (z.reshape(z.shape[0], -1) * factor[:, None]).reshape(z.shape)


def gamma_of(z: Tensor, kappa: Scalar, lam: Scalar, penalty: str) -> Tensor:
    """Γ = κ · prox(Z) for one parameter tensor (never stored by the optimizer)."""
    if penalty == "l1":
        return kappa * prox_l1(z, lam)
    if penalty == "group":
        return kappa * prox_group(z, lam)
    raise ValueError(f"Γ is defined for penalties 'l1' and 'group', not {penalty!r}")


def slbi_update_(
    w: Tensor,
    g: Tensor,
    z: Tensor | None,
    v: Tensor | None,
    group_norms: Tensor | None,
    *,
    lr: Scalar,
    kappa: Scalar,
    mu: Scalar,
    lam: Scalar,
    momentum: Scalar,
    dampening: Scalar,
    weight_decay: Scalar,
    penalty: str,
    momentum_ready: bool,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One SLBI step (DESIGN.md §1) on a run of elements, in place, computed in float32
    (float64 for float64 parameters).

    Updates ``w``, ``z`` and ``v``; ``group_norms`` is read (‖Z_t‖) but not refreshed:
    call :func:`refresh_group_norms_` afterwards. (Inside one Inductor graph, refreshing
    the norms in the same function makes it materialise Z_{t+1} in a temporary.)

    Args:
        w, g: weights and gradients of the run, same shape and dtype: 1-D for penalties
            ``"l1"`` and ``"none"``, ``(groups, group_size)`` for ``"group"`` (2-D keeps
            Inductor's loops vectorised over each group).
        z: split variable of the run; ``None`` for penalty ``"none"``.
        v: momentum buffer of the run; ``None`` when ``momentum == 0``.
        group_norms: float32 ‖Z_g‖ of ``Z_t`` per group of the run (group penalty only).
        penalty: ``"l1"``, ``"group"`` or ``"none"``.
        momentum_ready: whether ``v`` holds ``v_t``; if not, ``v_{t+1} = u``.
        inv_scale: optional 0-d float32 tensor; ``g`` holds gradients scaled by
            ``1 / inv_scale`` (``torch.amp.GradScaler``) and is unscaled as it is read.
        found_inf: optional 0-d float32 tensor; where non-zero, ``w``, ``z`` and ``v``
            keep their values (decided on the device: no host sync).
    """
    # Where found_inf is set every store writes back the old value instead: inf/NaN in
    # the discarded branch of torch.where does not leak into the kept one.
    keep = None if found_inf is None else found_inf != 0

    def store(dst: Tensor, old: Tensor, new: Tensor) -> None:
        dst.copy_(new if keep is None else torch.where(keep, old, new))

    w32 = _widen(w)
    g32 = _widen(g) if inv_scale is None else _widen(g) * inv_scale
    u = g32 + weight_decay * w32  # u = g + wd · W_t
    if v is None:
        velocity = u
    else:
        v32 = _widen(v)
        velocity = momentum * v32 + (1.0 - dampening) * u if momentum_ready else u
        store(v, v32, velocity)
    if penalty == "none":
        store(w, w32, w32 - lr * kappa * velocity)
        return
    z32 = _widen(z)
    if penalty == "group":
        factor = group_shrink_factor(group_norms, lam)
        gamma = kappa * z32 * factor[:, None]
    else:
        gamma = kappa * prox_l1(z32, lam)
    residual = w32 - gamma  # W_t − Γ_t
    store(w, w32, w32 - lr * kappa * (velocity + residual / mu))
    store(z, z32, z32 + (lr / mu) * residual)


def _widen(t: Tensor) -> Tensor:
    """The precision the update runs in: float32, or float64 for float64 tensors."""
    return t if t.dtype == torch.float64 else t.float()


def refresh_group_norms_(z: Tensor, group_norms: Tensor, found_inf: Tensor | None = None) -> None:
    """Write ‖Z_g‖ of each row of the 2-D ``z`` (one group a row) into ``group_norms``;
    where ``found_inf`` (0-d) is non-zero, keep the old norms bit for bit."""
    if z.dtype == torch.float64:
        z = z.float()  # vector_norm does not narrow its input; the norm table is float32
    if found_inf is None:
        torch.linalg.vector_norm(z, dim=1, dtype=torch.float32, out=group_norms)
    else:
        norms = torch.linalg.vector_norm(z, dim=1, dtype=torch.float32)
        group_norms.copy_(torch.where(found_inf != 0, group_norms, norms))
