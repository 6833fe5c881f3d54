"""An independent float64 reference of the update in docs/design.md, written for the tests only.

It deliberately shares no code with the package: per parameter, plain float64 tensors,
the equations as printed in the design contract; coupled channel groups as sets of
(parameter, row) pairs (:func:`prox_norms`, :func:`step_coupled`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def prox_l1(z: Tensor, lam: float) -> Tensor:
    return torch.sign(z) * torch.clamp(z.abs() - lam, min=0.0)


def prox_group(z: Tensor, lam: float, norms: Tensor | None = None) -> Tensor:
    """Rows along dim 0 shrink by ``norms`` (default: their own ‖Z_r‖)."""
    rows = z.reshape(z.shape[0], -1)
    norms = rows.norm(dim=1, keepdim=True) if norms is None else norms.reshape(-1, 1)
    factor = torch.where(norms > 0, torch.clamp(1 - lam / torch.where(norms > 0, norms, 1.0), min=0.0), 0.0)
    return (rows * factor).reshape(z.shape)


def auto_penalty(shape: torch.Size) -> str:
    """Penalty "auto" for an unnamed tensor whose module is unknown: by shape; a tensor
    with one "filter" (dim 0 is 1: a token or embedding) is not penalised."""
    if len(shape) < 2 or shape[0] == 1:
        return "none"
    return "group" if len(shape) >= 3 else "l1"


@dataclass
class RefParam:
    w: Tensor
    penalty: str
    hp: dict
    z: Tensor = field(init=False)
    v: Tensor | None = None

    def __post_init__(self) -> None:
        self.w = self.w.detach().to(torch.float64).clone()
        self.z = torch.zeros_like(self.w)

    def gamma(self, norms: Tensor | None = None) -> Tensor:
        """Γ = κ·prox(Z); group rows shrink by ``norms`` if given (coupled groups)."""
        if self.penalty == "l1":
            return self.hp["kappa"] * prox_l1(self.z, self.hp["lam"])
        return self.hp["kappa"] * prox_group(self.z, self.hp["lam"], norms)

    def step(self, grad: Tensor | None, norms: Tensor | None = None) -> None:
        if grad is None:
            return
        hp = self.hp
        lr, kappa, mu = hp["lr"], hp["kappa"], hp["mu"]
        rho, damp, wd = hp["momentum"], hp["dampening"], hp["weight_decay"]
        u = grad.detach().to(torch.float64) + wd * self.w
        if rho == 0:
            v_next = u
        elif self.v is None:
            v_next = u.clone()
        else:
            v_next = rho * self.v + (1 - damp) * u
        if rho != 0:
            self.v = v_next
        if self.penalty == "none":
            self.w = self.w - lr * kappa * v_next
            return
        gamma = self.gamma(norms)
        w_t = self.w
        self.w = w_t - lr * kappa * (v_next + (w_t - gamma) / mu)
        self.z = self.z + (lr / mu) * (w_t - gamma)


Coupling = list[list[tuple[int, int]]]
"""Coupled channel groups: each a list of (parameter index, row) pairs."""


def prox_norms(refs: list[RefParam], coupling: Coupling) -> list[Tensor | None]:
    """Per parameter, the norm each row's group prox uses: its own ‖Z_r‖, or for a member
    of a coupled group G the RMS over G's rows, sqrt(Σ_{r∈G} ‖Z_r‖² / |G|)."""
    norms = [
        ref.z.reshape(ref.z.shape[0], -1).norm(dim=1) if ref.penalty == "group" else None for ref in refs
    ]
    own = [None if n is None else n.clone() for n in norms]
    for members in coupling:
        rms = torch.sqrt(sum(own[p][r] ** 2 for p, r in members) / len(members))
        for p, r in members:
            norms[p][r] = rms
    return norms


def step_coupled(refs: list[RefParam], grads: list[Tensor | None], coupling: Coupling) -> None:
    """One step of every parameter, Γ_t from the coupled norms of Z_t (all read first)."""
    norms = prox_norms(refs, coupling)
    for ref, grad, row_norms in zip(refs, grads, norms, strict=True):
        ref.step(grad, row_norms)


def rel_err(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (absolute error when b = 0)."""
    a64, b64 = a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()
    denom = b64.norm().item()
    diff = (a64 - b64).norm().item()
    return diff / denom if denom > 0 else diff
