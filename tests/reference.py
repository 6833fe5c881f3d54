"""An independent float64 reference of the update in docs/design.md, written for the tests only.

It deliberately shares no code with the package: per parameter, plain float64 tensors,
the equations as printed in the design contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def prox_l1(z: Tensor, lam: float) -> Tensor:
    return torch.sign(z) * torch.clamp(z.abs() - lam, min=0.0)


def prox_group(z: Tensor, lam: float) -> Tensor:
    rows = z.reshape(z.shape[0], -1)
    norms = rows.norm(dim=1, keepdim=True)
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

    def gamma(self) -> Tensor:
        prox = prox_l1 if self.penalty == "l1" else prox_group
        return self.hp["kappa"] * prox(self.z, self.hp["lam"])

    def step(self, grad: Tensor | None) -> None:
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
        gamma = self.gamma()
        w_t = self.w
        self.w = w_t - lr * kappa * (v_next + (w_t - gamma) / mu)
        self.z = self.z + (lr / mu) * (w_t - gamma)


def rel_err(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (absolute error when b = 0)."""
    a64, b64 = a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()
    denom = b64.norm().item()
    diff = (a64 - b64).norm().item()
    return diff / denom if denom > 0 else diff
