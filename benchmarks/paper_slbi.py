"""Per-parameter SLBI baseline, written the way the paper's original toolbox does it.

The FuSplit-LBI / DessiLBI toolbox (Chen Liu, Yanwei Fu et al.; ``slbi_opt.py`` in
``DessiLBI2020/DessiLBI``, the ``slbi.py`` of ``yao-lab/FSplitLBI``) steps one parameter at a
time in a Python loop. For a penalised parameter it keeps ``momentum_buffer``, ``z_buffer``
and a stored ``gamma_buffer`` (Γ), takes a full copy of ``W`` every step
(``last_p = copy.deepcopy(p.data)``), materialises the whole update as a temporary, then
recomputes and stores ``Γ = κ·prox(Z)`` after the ``Z`` update so the next step can read
it. This module keeps that structure and its memory traffic, as the baseline the fused
implementation replaces, while computing exactly the update of ``docs/design.md`` so
benchmarks compare equal work. Where the original differs from it this module follows it:

- weight decay enters the gradient before momentum (``u = g + wd·W``, the
  ``torch.optim.SGD`` convention); the original adds ``wd·W`` to the momentum buffer itself
  after the momentum update, and skips 1-D and ``bn`` parameters;
- the threshold is ``lam``; the original hard-codes λ = 1;
- penalties follow ``penalty="auto"`` (≥3-D → group, 2-D → l1, else none); the original
  penalises only the layers named in ``initialize_slbi`` and shrinks only 2-D and 4-D ones;
- the group prox is 0 where ‖Z_g‖ = 0 also for ``lam = 0`` (the original divides by zero).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

_PENALTIES = ("auto", "l1", "group", "none")


def shrink(z: torch.Tensor, lam: float) -> torch.Tensor:
    """Elementwise soft threshold: ``sign(z)·max(|z| − lam, 0)`` (l1 proximal map)."""
    return z.sign() * torch.clamp(z.abs() - lam, min=0.0)


def shrink_group(z: torch.Tensor, lam: float) -> torch.Tensor:
    """Group soft threshold over slices along dim 0: ``z_g·max(0, 1 − lam/‖z_g‖₂)``.

    A group whose norm is 0 maps to 0.
    """
    flat = z.reshape(z.shape[0], -1)
    norm = torch.linalg.vector_norm(flat, ord=2, dim=1)
    factor = torch.where(norm > 0, torch.clamp(1.0 - lam / norm, min=0.0), torch.zeros_like(norm))
    return (flat * factor.unsqueeze(1)).reshape(z.shape)


def _resolve_penalty(penalty: str, p: torch.Tensor) -> str:
    """The penalty a parameter gets: ``"auto"`` is group for ≥3-D, l1 for 2-D, else none."""
    if penalty != "auto":
        return penalty
    if p.dim() >= 3:
        return "group"
    if p.dim() == 2:
        return "l1"
    return "none"


class PaperSLBI(Optimizer):
    """Split LBI with momentum, one parameter at a time (the original toolbox's loop).

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        lr: learning rate α.
        kappa: κ, the damping factor of the W update and the scale of Γ.
        mu: μ (the paper's ν), the coupling between W and Γ.
        lam: λ, the shrinkage threshold (the original hard-codes 1).
        momentum: ρ; 0 keeps no momentum buffer.
        dampening: δ.
        weight_decay: wd, added to the gradient before momentum.
        penalty: ``"auto"``, ``"l1"``, ``"group"`` or ``"none"`` (per param group).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        kappa: float = 1.0,
        mu: float = 100.0,
        lam: float = 1.0,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        penalty: str = "auto",
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if kappa <= 0:
            raise ValueError(f"kappa must be > 0, got {kappa}")
        if mu <= 0:
            raise ValueError(f"mu must be > 0, got {mu}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if penalty not in _PENALTIES:
            raise ValueError(f"penalty must be one of {_PENALTIES}, got {penalty!r}")
        defaults = dict(
            lr=lr,
            kappa=kappa,
            mu=mu,
            lam=lam,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            penalty=penalty,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, refusing an unknown penalty or ``"group"`` on 0-D/1-D tensors."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        penalty = group["penalty"]
        bad = None
        if penalty not in _PENALTIES:
            bad = f"penalty must be one of {_PENALTIES}, got {penalty!r}"
        elif penalty == "group" and any(p.dim() < 2 for p in group["params"]):
            bad = 'penalty "group" needs tensors with at least 2 dimensions'
        if bad is not None:
            self.param_groups.pop()
            raise ValueError(bad)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One SLBI step over every parameter that has a gradient (``docs/design.md``, "The update")."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu = group["mu"]
            kappa = group["kappa"]
            lam = group["lam"]
            lr_kappa = group["lr"] * kappa
            lr_gamma = group["lr"] / mu
            weight_decay = group["weight_decay"]
            momentum = group["momentum"]
            dampening = group["dampening"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if weight_decay != 0:
                    d_p = d_p.add(p, alpha=weight_decay)
                param_state = self.state[p]

                if momentum != 0:
                    if "momentum_buffer" not in param_state:
                        buf = param_state["momentum_buffer"] = torch.clone(d_p).detach()
                    else:
                        buf = param_state["momentum_buffer"]
                        buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
                    d_p = buf

                penalty = _resolve_penalty(group["penalty"], p)
                if penalty == "none":
                    p.add_(d_p, alpha=-lr_kappa)
                    continue

                if "z_buffer" not in param_state:
                    param_state["z_buffer"] = torch.zeros_like(p)
                    param_state["gamma_buffer"] = torch.zeros_like(p)
                z = param_state["z_buffer"]
                gamma = param_state["gamma_buffer"]
                new_grad = d_p * lr_kappa + (p - gamma) * (lr_kappa / mu)
                last_p = torch.clone(p)
                p.sub_(new_grad)
                z.add_(gamma - last_p, alpha=-lr_gamma)
                if penalty == "l1":
                    param_state["gamma_buffer"] = kappa * shrink(z, lam)
                else:
                    param_state["gamma_buffer"] = kappa * shrink_group(z, lam)
        return loss
