"""The SLBI optimizer: Split Linearized Bregman Iteration with momentum (DESIGN.md §1)."""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from . import functional
from .buckets import FlatBucket, Slot
from .kernels import chunk_format as cf
from .toolbox import ToolboxMixin

__all__ = ["SLBI"]

logger = logging.getLogger(__name__)

PENALTIES = ("auto", "l1", "group", "none")
BACKENDS = ("auto", "torch", "triton")
# Order of the columns of the kernel's hyper-parameter table.
_HPARAM_KEYS = {
    cf.HP_LR: "lr",
    cf.HP_KAPPA: "kappa",
    cf.HP_MU: "mu",
    cf.HP_LAM: "lam",
    cf.HP_MOMENTUM: "momentum",
    cf.HP_DAMPENING: "dampening",
    cf.HP_WEIGHT_DECAY: "weight_decay",
}


def _triton_step() -> Callable[..., None] | None:
    """The fused Triton launcher, or None when Triton cannot be imported."""
    try:
        from .kernels.slbi_step import slbi_bucket_step
    except ImportError:
        return None
    return slbi_bucket_step


@functools.cache
def _fused_torch_update() -> Callable[..., None]:
    """``functional.slbi_update_`` compiled by Inductor with dynamic shapes: one fused
    loop per run, no temporaries; compiled once per (penalty, momentum, dtype)."""
    return torch.compile(functional.slbi_update_, dynamic=True)


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    return float(value)


def _validate_hyperparameters(group: dict[str, Any], where: str) -> None:
    """Raise ValueError/TypeError naming the first bad hyper-parameter of ``group``."""
    checks: dict[str, tuple[Callable[[float], bool], str]] = {
        "lr": (lambda x: x >= 0.0, "a finite number >= 0"),
        "kappa": (lambda x: x > 0.0, "a finite number > 0"),
        "mu": (lambda x: x > 0.0, "a finite number > 0"),
        "lam": (lambda x: x >= 0.0, "a finite number >= 0"),
        "momentum": (lambda x: 0.0 <= x < 1.0, "in [0, 1)"),
        "dampening": (lambda x: 0.0 <= x <= 1.0, "in [0, 1]"),
        "weight_decay": (lambda x: x >= 0.0, "a finite number >= 0"),
    }
    for key, (ok, expected) in checks.items():
        value = _as_float(f"{key} ({where})", group[key])
        if not math.isfinite(value) or not ok(value):
            raise ValueError(f"Invalid {key} ({where}): {group[key]!r}; expected {expected}")
    penalty = group["penalty"]
    if penalty not in PENALTIES:
        raise ValueError(f"Invalid penalty ({where}): {penalty!r}; expected one of {PENALTIES}")


def resolve_penalty(penalty: str, param: Tensor) -> str:
    """The penalty a parameter gets: ``"auto"`` is group for ≥3-D, l1 for 2-D, none else."""
    if penalty != "auto":
        return penalty
    if param.dim() >= 3:
        return "group"
    return "l1" if param.dim() == 2 else "none"


class SLBI(ToolboxMixin, Optimizer):
    r"""Split Linearized Bregman Iteration with momentum (FuSplit LBI).

    SGD with momentum plus a split variable ``Z`` per penalised parameter whose shrunken
    image ``Γ = κ·prox(Z)`` walks a regularisation path: weights (penalty ``"l1"``) or
    output filters (penalty ``"group"``) enter the support one by one. One step, per
    parameter ``W`` with gradient ``g`` (DESIGN.md §1)::

        u       = g + wd·W
        v_{t+1} = u (first step) else ρ·v_t + (1−δ)·u
        Γ_t     = κ·prox(Z_t)
        W_{t+1} = W_t − α·κ·(v_{t+1} + (W_t − Γ_t)/μ)
        Z_{t+1} = Z_t + (α/μ)·(W_t − Γ_t)

    and ``W_{t+1} = W_t − α·κ·v_{t+1}`` for parameters with penalty ``"none"``.

    All parameters of one (device, dtype) live in flat contiguous buffers (weights,
    gradients, Z, momentum); every ``param.data`` and ``param.grad`` is a view into them,
    and one fused pass per buffer does the whole step.

    Args:
        params: ``model.parameters()``, ``model.named_parameters()`` or a list of
            param-group dicts.
        lr: learning rate α (default: 0.1).
        kappa: κ, the damping of the inverse scale space (default: 1.0).
        mu: μ (the paper's ν), the coupling between W and Γ (default: 100.0).
        lam: λ, the shrinkage threshold of ``prox`` (default: 1.0).
        momentum: momentum factor ρ in [0, 1) (default: 0.9).
        dampening: dampening δ for momentum (default: 0.0).
        weight_decay: L2 weight decay, added to the gradient as in SGD (default: 0.0).
        penalty: ``"auto"`` (≥3-D → ``"group"``, 2-D → ``"l1"``, else ``"none"``),
            ``"l1"``, ``"group"`` or ``"none"``; per param group (default: ``"auto"``).
        backend: ``"auto"`` (Triton for CUDA buffers when Triton imports, torch
            otherwise), ``"torch"`` or ``"triton"`` (default: ``"auto"``).
        fused: for the torch backend on the CPU, run each update as one loop compiled
            by Inductor (``torch.compile``; the first steps pay the compile). ``None``
            (default) turns it on for CPU buffers; ``False`` keeps plain eager ops. If
            compiling fails the optimizer logs a warning and stays eager.

    Example:
        >>> opt = SLBI(model.named_parameters(), lr=0.1, kappa=1, mu=100)
        >>> opt.zero_grad()
        >>> loss_fn(model(x), y).backward()
        >>> opt.step()

    ``zero_grad()`` zeroes the flat gradient buffer in place and keeps the views; a
    parameter that received no gradient since then is skipped by ``step()`` (W, Z and
    momentum unchanged), exactly as ``torch.optim.SGD`` skips a ``None`` gradient.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 0.1,
        kappa: float = 1.0,
        mu: float = 100.0,
        lam: float = 1.0,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        penalty: str = "auto",
        *,
        backend: str = "auto",
        fused: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "kappa": kappa,
            "mu": mu,
            "lam": lam,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "penalty": penalty,
        }
        _validate_hyperparameters(defaults, "defaults")
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")
        if fused not in (None, True, False):
            raise TypeError(f"fused must be None, True or False, got {fused!r}")
        self.backend = backend
        self.fused = fused
        self._slots: list[Slot] = []
        self._buckets: list[FlatBucket] = []
        self._layout_ready = False
        self._step_calls = _StepCalls()
        self._fused_failed = False
        self._hparam_tables: dict[torch.device, tuple[tuple[float, ...], Tensor]] = {}
        super().__init__(params, defaults)
        self._rebuild_layout()
        self._layout_ready = True
        self._init_toolbox()

    def __setattr__(self, name: str, value: Any) -> None:
        # A torch LR scheduler replaces ``opt.step`` by a wrapper defined in
        # torch/optim/lr_scheduler.py, a file Dynamo never traces: a compiled training
        # step would break its graph at ``opt.step()``. Install an equivalent wrapper
        # defined here instead (it sets the same flag the scheduler checks).
        if name == "step" and getattr(value, "_wrapped_by_lr_sched", False):
            value = _scheduler_tracked_step(self)
        super().__setattr__(name, value)

    @property
    def _opt_called(self) -> bool:
        """Read by LR schedulers: whether ``step()`` ran since the scheduler wrapped it."""
        return self._step_calls.opt_called

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self._step_calls.opt_called = value

    # -- param groups ---------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (validated before anything changes) and re-lay the buffers."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        merged = {**self.defaults, **param_group}
        where = f"param group {len(self.param_groups)}"
        _validate_hyperparameters(merged, where)
        raw = param_group["params"]
        if isinstance(raw, (Tensor, tuple)):
            raw = [raw]
        elif isinstance(raw, set):
            raise TypeError("params must be an ordered collection, not a set")
        else:
            raw = list(raw)
            param_group = {**param_group, "params": raw}
        names, tensors = [], []
        for item in raw:
            name, tensor = item if isinstance(item, tuple) else (None, item)
            names.append(name)
            tensors.append(tensor)
        self._validate_params(tensors, names, merged["penalty"], where)
        super().add_param_group(param_group)
        if self._layout_ready:
            self._rebuild_layout()

    def _validate_params(self, tensors: list[Any], names: list[str | None], penalty: str, where: str) -> None:
        seen = {id(p) for group in self.param_groups for p in group["params"]}
        for position, (param, name) in enumerate(zip(tensors, names, strict=True)):
            label = f"parameter {name!r}" if name is not None else f"parameter {position} of {where}"
            if not isinstance(param, Tensor):
                raise TypeError(f"{label} is not a Tensor but {type(param).__name__}")
            if param.is_complex():
                raise TypeError(f"{label} is complex ({param.dtype}); SLBI supports real parameters only")
            if not param.is_floating_point():
                raise TypeError(f"{label} has dtype {param.dtype}; SLBI needs floating-point parameters")
            if param.is_sparse or param.layout != torch.strided:
                raise TypeError(f"{label} has layout {param.layout}; SLBI needs dense (strided) parameters")
            if id(param) in seen:
                raise ValueError(f"{label} appears more than once in the optimizer's parameters")
            seen.add(id(param))
            if penalty == "group" and param.dim() < 2:
                raise ValueError(
                    f"penalty 'group' needs a tensor of at least 2 dims, but {label} has shape "
                    f"{tuple(param.shape)}; use penalty 'l1', 'none' or 'auto' for it"
                )

    def assign_name(self, names: Iterable[str]) -> None:
        """Name the parameters in order (the paper's form ``SLBI(model.parameters())``).

        Args:
            names: one name per parameter, in the order of ``param_groups``, e.g.
                ``[n for n, _ in model.named_parameters()]``.
        """
        names = list(names)
        total = sum(len(group["params"]) for group in self.param_groups)
        if len(names) != total:
            raise ValueError(f"assign_name got {len(names)} names for {total} parameters")
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"names must be strings, got {bad[0]!r}")
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"assign_name got duplicate names: {duplicates}")
        position = 0
        for group in self.param_groups:
            count = len(group["params"])
            group["param_names"] = names[position : position + count]
            position += count
        for slot in self._slots:
            slot.name = names[slot.index]

    # -- layout ---------------------------------------------------------------------

    def _rebuild_layout(self) -> None:
        """(Re)create the flat buckets from the parameters' current values and state."""
        old_slots = {id(slot.param): slot for slot in self._slots}
        for slot in self._slots:
            if slot.hook_handle is not None:
                slot.hook_handle.remove()
        slots: list[Slot] = []
        momentum_groups: set[int] = set()
        for group_index, group in enumerate(self.param_groups):
            names = group.get("param_names", [None] * len(group["params"]))
            if group["momentum"] != 0:
                momentum_groups.add(group_index)
            for param, name in zip(group["params"], names, strict=True):
                slots.append(
                    Slot(
                        param=param,
                        name=name,
                        index=len(slots),
                        group_index=group_index,
                        penalty=resolve_penalty(group["penalty"], param),
                    )
                )
        by_bucket: dict[tuple[torch.device, torch.dtype], list[Slot]] = {}
        for slot in slots:
            by_bucket.setdefault((slot.param.device, slot.param.dtype), []).append(slot)
        buckets = []
        for bucket_slots in by_bucket.values():
            needs_momentum = any(s.group_index in momentum_groups for s in bucket_slots)
            bucket = FlatBucket(bucket_slots, momentum=needs_momentum)
            bucket.backend = self._resolve_backend(bucket.device)
            if bucket.backend == "triton":
                bucket.chunks()  # built once here, never inside a traced step
            for slot in bucket.slots:
                self._bind_slot(slot, old_slots.get(id(slot.param)))
            bucket.refresh_group_norms()
            buckets.append(bucket)
        self._slots = slots
        self._buckets = buckets

    def _resolve_backend(self, device: torch.device) -> str:
        if self.backend == "torch":
            return "torch"
        triton_available = _triton_step() is not None
        if self.backend == "triton":
            if not triton_available:
                raise ValueError("backend='triton' but Triton cannot be imported; use backend='torch'")
            if device.type != "cuda" and not _triton_interpreted():
                raise ValueError(
                    f"backend='triton' needs CUDA parameters (got {device.type}); on the CPU set "
                    "TRITON_INTERPRET=1 (slow, for testing) or use backend='torch'"
                )
            return "triton"
        return "triton" if triton_available and device.type == "cuda" else "torch"

    def _bind_slot(self, slot: Slot, old: Slot | None) -> None:
        """Copy a parameter, its gradient and its state into the flat buffers and make
        ``param.data``, ``param.grad`` and the state tensors views into them."""
        param = slot.param
        state = self.state[param]
        slot.param_view.copy_(param.detach())
        grad = param.grad
        if grad is not None:
            slot.grad_view.copy_(grad)
        slot.grad_seen = old.grad_seen if old is not None else grad is not None
        param.data = slot.param_view
        param.grad = slot.grad_view
        if slot.z_view is not None:
            if "z" in state:
                slot.z_view.copy_(state["z"])
            state["z"] = slot.z_view
        else:
            state.pop("z", None)
        slot.momentum_ready = "momentum_buffer" in state
        if slot.momentum_ready:
            if slot.momentum_view is None:
                raise RuntimeError("internal error: momentum state without a momentum buffer")
            slot.momentum_view.copy_(state["momentum_buffer"])
            state["momentum_buffer"] = slot.momentum_view
        if param.requires_grad:
            slot.hook_handle = param.register_post_accumulate_grad_hook(_GradSeenHook(slot))

    def _sync_storage(self) -> None:
        """Re-bind parameters whose storage was replaced since the last step
        (``p.data = ...``, ``load_state_dict(assign=True)``); re-lay the buffers when a
        parameter moved to another device or dtype (``model.to(...)``)."""
        relayout = False
        for bucket in self._buckets:
            for slot in bucket.slots:
                param = slot.param
                if param.device != bucket.device or param.dtype != bucket.dtype:
                    relayout = True
                elif param.shape != slot.param_view.shape:
                    label = slot.name or f"parameter {slot.index}"
                    raise ValueError(
                        f"{label} changed shape from {tuple(slot.param_view.shape)} to "
                        f"{tuple(param.shape)} after the optimizer was built; build a new SLBI"
                    )
                elif param.data_ptr() != slot.param_view.data_ptr() or param.stride() != slot.strides:
                    slot.param_view.copy_(param.detach())
                    param.data = slot.param_view
        if relayout:
            self._rebuild_layout()

    # -- gradients ------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero every gradient in place (one fill per flat buffer), keeping the views.

        Args:
            set_to_none: also set every ``param.grad`` to ``None`` (``step()`` re-binds
                gradients that autograd creates afterwards). Default: ``False``.
        """
        for bucket in self._buckets:
            bucket.grads.zero_()
        if torch.compiler.is_compiling() and not set_to_none:
            return  # traced: the views stay bound; the flags matter to eager steps only
        for slot in self._slots:
            slot.grad_seen = False
            slot.param.grad = None if set_to_none else slot.grad_view

    def _active_slots(self) -> list[list[bool]]:
        """Which parameters to update, per bucket; foreign gradients are checked first,
        then copied into the flat buffer and their ``.grad`` re-bound as a view."""
        foreign: list[Slot] = []
        for slot in self._slots:
            grad = slot.param.grad
            if grad is None or _is_view_of(grad, slot.grad_view):
                continue
            label = slot.name or f"parameter {slot.index}"
            if grad.is_sparse or grad.layout != torch.strided:
                raise TypeError(f"SLBI does not support sparse gradients ({label}, layout {grad.layout})")
            if grad.is_complex():
                raise TypeError(f"SLBI does not support complex gradients ({label}, dtype {grad.dtype})")
            foreign.append(slot)
        for slot in foreign:
            slot.grad_view.copy_(slot.param.grad)
            slot.param.grad = slot.grad_view
            slot.grad_seen = True
        return [
            [slot.param.grad is not None and slot.grad_seen for slot in bucket.slots]
            for bucket in self._buckets
        ]

    # -- the step -------------------------------------------------------------------

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        record: bool = False,
        path: str | os.PathLike | None = None,
        layers: Iterable[str] | None = None,
    ) -> float | None:
        """Perform one SLBI step on every parameter that has a gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
            record: append per-layer statistics of this step to the record file under
                ``path`` (the paper's recording feature); costs nothing when ``False``.
            path: folder of the record file (required with ``record=True``).
            layers: names of the layers to record (default: all).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            # Traced by Dynamo (``torch.compile``): the host-side bookkeeping (validation,
            # re-binding replaced storage or foreign gradients) runs in eager steps only,
            # and every parameter whose ``.grad`` is set is updated.
            active_by_bucket = [[slot.param.grad is not None for slot in b.slots] for b in self._buckets]
        else:
            if record:
                self._check_record_args(path, layers)  # before anything changes
            self._check_group_changes()
            self._sync_storage()
            active_by_bucket = self._active_slots()
        momentum_groups = {i for i, group in enumerate(self.param_groups) if group["momentum"] != 0}
        for bucket, active in zip(self._buckets, active_by_bucket, strict=True):
            if not any(active):
                continue
            if momentum_groups:
                bucket.ensure_momentum()
            if bucket.backend == "triton":
                self._step_bucket_triton(bucket, active)
            else:
                self._step_bucket_torch(bucket, active)
            for slot, on in zip(bucket.slots, active, strict=True):
                if on and slot.group_index in momentum_groups:
                    slot.momentum_ready = True
                    self.state[slot.param]["momentum_buffer"] = slot.momentum_view
        self._after_step(record=record, path=path, layers=layers)
        return loss

    def _check_group_changes(self) -> None:
        """Validate hyper-parameters edited in ``param_groups``; re-lay the buffers when
        a group's penalty changed."""
        relayout = False
        for group_index, group in enumerate(self.param_groups):
            _validate_hyperparameters(group, f"param group {group_index}")
            for slot_param in group["params"]:
                if group["penalty"] == "group" and slot_param.dim() < 2:
                    raise ValueError(
                        f"penalty 'group' needs a tensor of at least 2 dims (param group {group_index}, "
                        f"shape {tuple(slot_param.shape)})"
                    )
        for slot in self._slots:
            group = self.param_groups[slot.group_index]
            if resolve_penalty(group["penalty"], slot.param) != slot.penalty:
                relayout = True
        if relayout:
            self._rebuild_layout()

    def _step_bucket_torch(self, bucket: FlatBucket, active: list[bool]) -> None:
        fused = self.fused if self.fused is not None else bucket.device.type == "cpu"
        fused = fused and not torch.compiler.is_compiling()  # an outer compile fuses it already
        for run in bucket.runs(active):
            group = self.param_groups[run.group_index]
            has_momentum = group["momentum"] != 0
            span = slice(run.start, run.end)
            rows = (-1, run.group_size) if run.penalty == "group" else (-1,)
            norms = bucket.group_norms[run.norm_start : run.norm_end] if run.penalty == "group" else None
            z = bucket.z[span].view(rows) if run.penalty != "none" else None
            args = (
                bucket.params[span].view(rows),
                bucket.grads[span].view(rows),
                z,
                bucket.momentum[span].view(rows) if has_momentum else None,
                norms,
            )
            kwargs = {key: group[key] for key in _HPARAM_KEYS.values()}
            kwargs.update(penalty=run.penalty, momentum_ready=run.momentum_ready)
            # Compile the steady state only: a first step (momentum not ready) runs once.
            if fused and not self._fused_failed and (run.momentum_ready or not has_momentum):
                try:
                    _fused_torch_update()(*args, **kwargs)
                except Exception as error:  # Inductor unavailable (no C++ compiler, ...)
                    logger.warning("SLBI: compiling the fused CPU update failed (%s); staying eager", error)
                    self._fused_failed = True
                    functional.slbi_update_(*args, **kwargs)
            else:
                functional.slbi_update_(*args, **kwargs)
            if norms is not None:
                functional.refresh_group_norms_(z, norms)

    def _step_bucket_triton(self, bucket: FlatBucket, active: list[bool]) -> None:
        launch = _triton_step()
        momentum = bucket.momentum if bucket.momentum is not None else bucket.params[:1]
        launch(
            bucket.params,
            bucket.grads,
            bucket.z,
            momentum,
            bucket.group_norms,
            bucket.chunks(),
            bucket.slot_flags(active),
            self._hparam_table(bucket.device),
        )

    def _hparam_table(self, device: torch.device) -> Tensor:
        """The float32 (num_groups, HPARAM_FIELDS) table on ``device``.

        With plain floats it is uploaded again only when a value changed. A traced
        step, or any hyper-parameter given as a tensor (e.g. ``lr=torch.tensor(0.1)``,
        which LR schedulers update in place), builds it with device ops instead: no
        ``.item()``, no host sync, no recompile, and it can be captured in a CUDA graph.
        """
        tensor_valued = any(
            isinstance(group[key], Tensor) for group in self.param_groups for key in _HPARAM_KEYS.values()
        )
        if tensor_valued or torch.compiler.is_compiling():
            zero = torch.zeros((), dtype=torch.float32, device=device)
            rows = []
            for group in self.param_groups:
                row = [zero] * cf.HPARAM_FIELDS
                for column, key in _HPARAM_KEYS.items():
                    row[column] = torch.as_tensor(group[key], dtype=torch.float32, device=device).reshape(())
                rows.append(torch.stack(row))
            return torch.stack(rows)
        values = []
        for group in self.param_groups:
            row = [0.0] * cf.HPARAM_FIELDS
            for column, key in _HPARAM_KEYS.items():
                row[column] = _as_float(key, group[key])
            values.extend(row)
        key = tuple(values)
        cached = self._hparam_tables.get(device)
        if cached is None or cached[0] != key:
            table = torch.tensor(values, dtype=torch.float32).view(-1, cf.HPARAM_FIELDS).to(device)
            self._hparam_tables[device] = (key, table)
        return self._hparam_tables[device][1]

    # -- state dict -----------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state (also a ``torch.optim.SGD`` state dict: momentum is
        kept, Z starts at 0) and rebuild the flat buffers from it."""
        state_dict = dict(state_dict)
        saved_groups = []
        for saved, current in zip(state_dict["param_groups"], self.param_groups, strict=False):
            if saved.get("nesterov", False):
                raise ValueError("the state dict uses Nesterov momentum, which SLBI does not implement")
            merged = {k: v for k, v in current.items() if k not in ("params", "param_names")}
            kept = (*self.defaults, "params", "param_names")
            merged.update({k: v for k, v in saved.items() if k in kept})
            saved_groups.append(merged)
        state_dict["param_groups"] = saved_groups + list(state_dict["param_groups"][len(saved_groups) :])
        for index, group in enumerate(saved_groups):
            _validate_hyperparameters(group, f"loaded param group {index}")
        super().load_state_dict(state_dict)
        self._rebuild_layout()


@dataclass
class _StepCalls:
    """Flags that a compiled step sets (Dynamo replays writes to this plain object,
    not to attributes of the optimizer itself)."""

    opt_called: bool = False
    steps_done: int = 0


def _scheduler_tracked_step(optimizer: SLBI) -> Callable[..., Any]:
    """``opt.step`` that records the call for LR schedulers, traceable by Dynamo."""

    def step(*args: Any, **kwargs: Any) -> Any:
        optimizer._step_calls.opt_called = True
        return type(optimizer).step(optimizer, *args, **kwargs)

    step._wrapped_by_lr_sched = True
    return step


class _GradSeenHook:
    """Post-accumulate-grad hook: the parameter received a gradient."""

    def __init__(self, slot: Slot) -> None:
        self.slot = slot

    def __call__(self, param: Tensor) -> None:
        self.slot.grad_seen = True


def _is_view_of(grad: Tensor, view: Tensor) -> bool:
    return grad.data_ptr() == view.data_ptr() and grad.stride() == view.stride()
