"""The SLBI optimizer: Split Linearized Bregman Iteration with momentum (DESIGN.md §1)."""

from __future__ import annotations

import functools
import logging
import math
import os
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from . import functional
from .buckets import FlatBucket, Slot
from .kernels import chunk_format as cf
from .kernels import cpu_step
from .toolbox import ToolboxMixin, _as_epochs, order_shape

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
_VALIDATED_KEYS = (*_HPARAM_KEYS.values(), "penalty")


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


def _as_float(name: str, value: Any, read_device: bool = True) -> float | None:
    """``value`` as a float; ``None`` for a tensor on an accelerator when not
    ``read_device`` (reading it would wait for the device)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        if not read_device and value.device.type != "cpu":
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    return float(value)


def _validate_hyperparameters(group: dict[str, Any], where: str, read_device: bool = True) -> None:
    """Raise ValueError/TypeError naming the first bad hyper-parameter of ``group``; the
    values of accelerator tensors are checked only when ``read_device`` (not per step:
    the step never waits for the device)."""
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
        value = _as_float(f"{key} ({where})", group[key], read_device)
        if value is None:
            continue
        if not math.isfinite(value) or not ok(value):
            raise ValueError(f"Invalid {key} ({where}): {group[key]!r}; expected {expected}")
    penalty = group["penalty"]
    if penalty not in PENALTIES:
        raise ValueError(f"Invalid penalty ({where}): {penalty!r}; expected one of {PENALTIES}")


def _check_group_penalty(
    penalty: str, params: Iterable[Tensor], where: str, labels: Iterable[str] | None = None
) -> None:
    """Refuse penalty ``"group"`` on a 0-D/1-D parameter; ``labels`` name the parameters
    in the message (default: their position in the group ``where``)."""
    if penalty != "group":
        return
    params = list(params)
    if labels is None:
        labels = [f"parameter {position} of {where}" for position in range(len(params))]
    for param, label in zip(params, labels, strict=True):
        if param.dim() < 2:
            raise ValueError(
                f"penalty 'group' needs a tensor of at least 2 dims, but {label} has shape "
                f"{tuple(param.shape)}; use penalty 'l1', 'none' or 'auto' for it"
            )


def resolve_penalty(penalty: str, param: Tensor) -> str:
    """The penalty a parameter gets: ``"auto"`` is group for ≥3-D, l1 for 2-D, none else;
    an empty tensor has nothing to penalise (``"none"``, whatever its group says)."""
    if param.numel() == 0:
        return "none"
    if penalty != "auto":
        return penalty
    if param.dim() >= 3:
        return "group"
    return "l1" if param.dim() == 2 else "none"


# Order state that ``load_state_dict`` restores with the dtype it was saved in: torch's
# loader would cast it to the parameter's dtype (int64 epochs to float, float32 norms
# and magnitudes of a bfloat16 parameter to bfloat16).
_EXACT_STATE_KEYS = ("group_norms", "entry_epoch", "order_magnitude")
# Options of a torch.optim.SGD param group that SLBI has no use for: not loaded.
_SGD_ONLY_KEYS = ("nesterov", "maximize", "foreach", "differentiable", "fused")


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
        fused: for the torch backend on the CPU, run the step fused: float32 and float64
            buckets in one pass of the C kernel ``slbi_step_cpu.c`` (built on first use
            with the system C compiler, 0.3-0.5 s, then cached on disk), other dtypes
            as one Inductor-compiled loop per run of parameters (``torch.compile``).
            ``None`` (default) turns it on for CPU buffers; ``False`` keeps plain eager
            ops. Without a working compiler the optimizer logs a warning and falls back
            to Inductor, then to eager ops. Which kernel runs a buffer is decided when
            the buffers are laid out (at construction, ``add_param_group`` or
            ``load_state_dict``), not at every step.

    Example:
        >>> opt = SLBI(model.named_parameters(), lr=0.1, kappa=1, mu=100)
        >>> opt.zero_grad()
        >>> loss_fn(model(x), y).backward()
        >>> opt.step()

    ``zero_grad()`` zeroes the flat gradient buffer in place and keeps the views; a
    parameter that received no gradient since then is skipped by ``step()`` (W, Z and
    momentum unchanged), exactly as ``torch.optim.SGD`` skips a ``None`` gradient.

    State per parameter (``opt.state[p]``, and ``state_dict()`` by index):
    ``"momentum_buffer"`` and ``"z"`` (the parameter's shape), ``"group_norms"`` (float32
    ‖Z_g‖ per output filter, group penalty), and the toolbox's ``"entry_epoch"`` and
    ``"order_magnitude"``; ``state_dict()["slbi"]`` holds the toolbox's path history and
    frozen masks. ``torch.amp.GradScaler`` hands the optimizer its scale and inf flag
    (``_step_supports_amp_scaling``): the step unscales the gradients as it reads them and
    writes nothing when they hold inf/NaN, without waiting for the device.
    """

    # GradScaler.step() then sets ``self.grad_scale`` and ``self.found_inf`` instead of
    # unscaling every gradient and syncing on found_inf itself, and deletes them after.
    _step_supports_amp_scaling = True

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
        if isinstance(params, (set, frozenset)):
            # Iteration order would decide the state_dict indices: refuse, as torch does for a group.
            raise TypeError("params must be an ordered collection (a list), not a set")
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")
        if fused not in (None, True, False):
            raise TypeError(f"fused must be None, True or False, got {fused!r}")
        self.backend = backend
        self.fused = fused
        self._slots: list[Slot] = []
        self._slot_by_id: dict[int, Slot] = {}
        self._buckets: list[FlatBucket] = []
        self._layout_ready = False
        self._step_calls = _StepCalls()
        self._fused_failed = False
        # Per param group, the plain values last found valid (see _validate_groups), and
        # the penalties the layout was last checked against (see _apply_group_changes).
        self._valid_groups: dict[int, tuple[Any, ...]] = {}
        self._checked_penalties: tuple[str, ...] | None = None
        self._hparam_tables: dict[tuple[torch.device, torch.dtype], tuple[tuple[float, ...], Tensor]] = {}
        # Where a module's attribute that held one of our parameters was given another
        # Parameter (``load_state_dict(assign=True)``, ``module.weight = ...``):
        # id(our parameter) -> (our parameter, [(module, attribute name), ...]).
        self._replaced_in: dict[int, tuple[Tensor, list[tuple[weakref.ref, str]]]] = {}
        super().__init__(params, defaults)
        self._rebuild_layout()
        self._layout_ready = True
        self._init_toolbox()
        _watch_parameter_replacement(self)

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
        labels = [
            f"parameter {name!r}" if name is not None else f"parameter {position} of {where}"
            for position, name in enumerate(names)
        ]
        for param, label in zip(tensors, labels, strict=True):
            if not isinstance(param, Tensor):
                raise TypeError(f"{label} is not a Tensor but {type(param).__name__}")
            _check_parameter_tensor(param, label)
            if id(param) in seen:
                raise ValueError(f"{label} appears more than once in the optimizer's parameters")
            seen.add(id(param))
        _check_group_penalty(penalty, tensors, where, labels)

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
            # A momentum buffer kept in the state of a group now at ρ = 0 stays too
            # (it is used again if ρ goes back up, as in torch.optim.SGD).
            needs_momentum = any(
                s.group_index in momentum_groups or "momentum_buffer" in self.state[s.param]
                for s in bucket_slots
            )
            bucket = FlatBucket(bucket_slots, momentum=needs_momentum)
            bucket.backend = self._resolve_backend(bucket.device)
            bucket.cpu_kernel = (
                bucket.backend == "torch"
                and bucket.device.type == "cpu"
                and self.fused is not False
                and cpu_step.available(bucket.dtype)
            )
            if bucket.backend == "triton":
                bucket.chunks("triton")  # built once here, never inside a traced step
            elif bucket.cpu_kernel:
                bucket.chunks("cpu")
            stale_norms = [
                slot
                for slot in bucket.slots
                if not self._bind_slot(bucket, slot, old_slots.get(id(slot.param)))
            ]
            bucket.refresh_group_norms(stale_norms)
            buckets.append(bucket)
        self._slots = slots
        self._slot_by_id = {id(slot.param): slot for slot in slots}
        self._buckets = buckets
        # The penalties this layout resolved (see _apply_group_changes).
        self._checked_penalties = tuple(group["penalty"] for group in self.param_groups)

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

    def _bind_slot(self, bucket: FlatBucket, slot: Slot, old: Slot | None) -> bool:
        """Copy a parameter, its gradient and its state into the flat buffers and make
        ``param.data``, ``param.grad`` and the state tensors views into them.

        Returns whether the slot's group norms are current: taken over from the state
        (bit for bit, as the step that wrote them computed them) rather than to be
        recomputed from Z.
        """
        param = slot.param
        state = self.state[param]
        slot.param_view.copy_(param.detach())
        grad = param.grad
        if grad is not None:
            slot.grad_view.copy_(grad)
        slot.grad_seen = old.grad_seen if old is not None else grad is not None
        param.data = slot.param_view
        param.grad = slot.grad_view
        slot.impl = param._cdata
        slot.data_ptr = slot.param_view.data_ptr()
        norms_current = True
        z = state.get("z")
        if slot.z_view is not None:
            if z is not None:
                slot.z_view.copy_(z)
            state["z"] = slot.z_view
        else:
            state.pop("z", None)
        norms = state.pop("group_norms", None)
        if slot.penalty == "group":
            # Norms of a Z that is now cast to another dtype are stale by a rounding.
            norms_current = (
                norms is not None
                and z is not None
                and z.dtype == slot.z_view.dtype
                and tuple(norms.shape) == (slot.num_groups,)
            )
            if norms_current:
                bucket.norms_of(slot).copy_(norms)
            state["group_norms"] = bucket.norms_of(slot)
        slot.momentum_ready = state.get("momentum_buffer") is not None
        if slot.momentum_ready:
            slot.momentum_view.copy_(state["momentum_buffer"])
            state["momentum_buffer"] = slot.momentum_view
        else:
            state.pop("momentum_buffer", None)  # torch.optim.SGD can store None
        if param.requires_grad:
            slot.hook_handle = param.register_post_accumulate_grad_hook(_GradSeenHook(slot))
            # Assigning the hook dict (re-)arms it in the autograd engine: after
            # torch.utils.swap_tensors the parameter keeps the dict but the engine no
            # longer calls it, and registering one more hook does not fix that.
            param._post_accumulate_grad_hooks = param._post_accumulate_grad_hooks
        return norms_current

    def _sync_storage(self) -> None:
        """Re-bind parameters that left the flat buffers since the last step, before
        the update reads them, so that none is silently left out:

        - a module attribute given another Parameter (``load_state_dict(assign=True)``,
          ``module.weight = nn.Parameter(...)``): the new Parameter takes the old one's
          place, state and group;
        - ``model.to(dtype/device)``, ``.double()``, ``.half()`` (with or without
          ``torch.__future__.set_swap_module_params_on_conversion``): the buffers are
          laid out again and Z and momentum follow the cast;
        - ``p.data = ...``: the new values are copied into the buffer.

        Everything is checked first: a shape change raises before anything changes.
        """
        replacements = self._pending_replacements()
        for slot in self._slots:
            param = replacements.get(id(slot.param), slot.param)
            label = slot.label
            if param is not slot.param or param.dtype != slot.param_view.dtype:
                _check_parameter_tensor(param, label)
            if param.shape != slot.param_view.shape:
                raise ValueError(
                    f"{label} changed shape from {tuple(slot.param_view.shape)} to {tuple(param.shape)} "
                    "after the optimizer was built; build a new SLBI (or load its state_dict into one)"
                )
        self._replaced_in.clear()
        relayout = bool(replacements)
        for slot in self._slots:
            if id(slot.param) in replacements:
                self._replace_param(slot, replacements[id(slot.param)])
        for bucket in self._buckets:
            for slot in bucket.slots:
                param = slot.param
                if param._cdata != slot.impl:
                    # Swapped TensorImpl: our hook was not called since, so trust a
                    # gradient found outside the flat buffer (as SGD would use it).
                    grad = param.grad
                    foreign = grad is not None and not _lives_in(grad, bucket.grads)
                    slot.grad_seen = slot.grad_seen or foreign
                    relayout = True
                elif param.device != bucket.device or param.dtype != bucket.dtype:
                    relayout = True
                elif param.data_ptr() != slot.param_view.data_ptr() or param.stride() != slot.strides:
                    slot.param_view.copy_(param.detach())
                    param.data = slot.param_view
        if relayout:
            self._rebuild_layout()

    def _note_replacement(self, module: torch.nn.Module, name: str, old: Tensor) -> None:
        """Called when ``module.<name>``, which holds ``old``, is given another Parameter.

        Only the place is kept: :meth:`_pending_replacements` reads what it holds at the
        next step, so later re-assignments (re-tying weights, assigning back) count too.
        """
        if id(old) not in self._slot_by_id:
            return  # not ours, or a place already watched (replaced again)
        _, places = self._replaced_in.setdefault(id(old), (old, []))
        if not any(m() is module and n == name for m, n in places):
            places.append((weakref.ref(module), name))

    def _pending_replacements(self) -> dict[int, Tensor]:
        """id(our parameter) -> the Parameter that replaced it in the model; raises if
        one of ours (tied weights) was replaced by different Parameters."""
        result: dict[int, Tensor] = {}
        for key, (old, places) in self._replaced_in.items():
            found: list[Tensor] = []
            for module_ref, name in places:
                module = module_ref()
                new = None if module is None else module._parameters.get(name)
                # Assigned back, or re-tied to a parameter we update anyway: nothing to do.
                if new is None or new is old or id(new) in self._slot_by_id:
                    continue
                if all(new is not other for other in found):
                    found.append(new)
            if len(found) > 1:
                raise ValueError(
                    f"{self._slot_by_id[key].label} was replaced by {len(found)} different Parameters in "
                    "the model (tied weights untied by load_state_dict(assign=True)?); tie them again, or "
                    "build the optimizer after loading"
                )
            if found:
                result[key] = found[0]
        return result

    def _replace_param(self, slot: Slot, new: Tensor) -> None:
        """Put ``new`` in ``slot.param``'s place: param group, state and toolbox masks."""
        old = slot.param
        params = self.param_groups[slot.group_index]["params"]
        params[next(i for i, p in enumerate(params) if p is old)] = new
        if old in self.state:
            self.state[new] = self.state.pop(old)
        self._rekey_param(old, new)
        slot.param = new
        # Our hook was never on ``new``: a gradient it holds came from autograd.
        slot.grad_seen = new.grad is not None

    # -- gradients ------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero every gradient in place (one fill per flat buffer), keeping the views.

        Args:
            set_to_none: also set every ``param.grad`` to ``None`` (``step()`` re-binds
                gradients that autograd creates afterwards). Default: ``False``.
        """
        if torch.compiler.is_compiling() and set_to_none:
            # A compiled step cannot re-bind gradients that autograd creates afresh: it
            # would train on the stale flat buffer. Refuse rather than train wrongly.
            raise RuntimeError(
                "SLBI.zero_grad(set_to_none=True) inside torch.compile'd code: use opt.zero_grad() "
                "(it zeroes the flat gradient buffer and keeps the views the compiled step reads)"
            )
        if not torch.compiler.is_compiling() and not self._bindings_intact():
            self._sync_storage()  # so that the views below are views of the current buffers
        for bucket in self._buckets:
            bucket.grads.zero_()
        if torch.compiler.is_compiling() and not set_to_none:
            return  # traced: the views stay bound; the flags matter to eager steps only
        for slot in self._slots:
            slot.grad_seen = False
            slot.param.grad = None if set_to_none else slot.grad_view

    def _check_gradients(self) -> None:
        """Refuse sparse and complex gradients (before anything changes)."""
        for slot in self._slots:
            grad = slot.param.grad
            if grad is None or _is_view_of(grad, slot.grad_view):
                continue
            label = slot.label
            if grad.is_sparse or grad.layout != torch.strided:
                raise TypeError(f"SLBI does not support sparse gradients ({label}, layout {grad.layout})")
            if grad.is_complex():
                raise TypeError(f"SLBI does not support complex gradients ({label}, dtype {grad.dtype})")

    def _bindings_intact(self) -> bool:
        """The common case, checked cheaply every step: every parameter still lives where
        it was bound and its ``.grad`` is our view or ``None``, so there is nothing to
        re-bind and no foreign gradient to check or copy."""
        if self._replaced_in:
            return False
        for slot in self._slots:
            param = slot.param
            if param._cdata != slot.impl or param.data_ptr() != slot.data_ptr:
                return False
            grad = param.grad
            if grad is not None and grad is not slot.grad_view:
                return False
        return True

    def _active_slots(self, intact: bool = False) -> list[list[bool]]:
        """Which parameters to update, per bucket; unless the bindings are ``intact``,
        foreign gradients (checked by :meth:`_check_gradients`) are first copied into the
        flat buffer and re-bound as views."""
        if not intact:
            for slot in self._slots:
                grad = slot.param.grad
                if grad is not None and not _is_view_of(grad, slot.grad_view):
                    slot.grad_view.copy_(grad)
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

        Under ``torch.amp.GradScaler.step(opt)`` the gradients are unscaled as they are
        read and, if they hold inf/NaN, nothing changes (W, Z, momentum, group norms);
        the check runs on the device, except on a parameter's very first step with
        momentum, where the host reads ``found_inf`` once so that the skipped step also
        keeps the momentum "not started".

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
        # Set by GradScaler.step() for this call only (it deletes them afterwards).
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        momentum_groups = {i for i, group in enumerate(self.param_groups) if group["momentum"] != 0}
        if torch.compiler.is_compiling():
            # Traced by Dynamo (``torch.compile``): the host-side bookkeeping (validation,
            # re-binding replaced storage or foreign gradients) runs in eager steps only,
            # and every parameter whose ``.grad`` is set is updated.
            active_by_bucket = [[slot.param.grad is not None for slot in b.slots] for b in self._buckets]
        else:
            # Every check first, then the changes.
            if record:
                self._check_record_args(path, layers)
            self._validate_groups()
            intact = self._bindings_intact()
            if not intact:
                self._check_gradients()
            self._apply_group_changes()
            if not intact:
                self._sync_storage()
            active_by_bucket = self._active_slots(intact)
            if found_inf is not None and any(
                on and slot.group_index in momentum_groups and not slot.momentum_ready
                for bucket, active in zip(self._buckets, active_by_bucket, strict=True)
                for slot, on in zip(bucket.slots, active, strict=True)
            ):
                # A first step keeps no trace on the device of being skipped (v is
                # overwritten by u, not blended): decide here, once per parameter.
                if found_inf.item() != 0:
                    active_by_bucket = [[False] * len(bucket.slots) for bucket in self._buckets]
                found_inf = None
        amp_inputs: dict[torch.device, tuple[Tensor | None, Tensor | None]] = {}
        for bucket, active in zip(self._buckets, active_by_bucket, strict=True):
            if not any(active):
                continue
            if momentum_groups:
                bucket.ensure_momentum()
            if bucket.device not in amp_inputs:
                amp_inputs[bucket.device] = _amp_inputs(grad_scale, found_inf, bucket.device)
            inv_scale, bucket_found_inf = amp_inputs[bucket.device]
            if bucket.backend == "triton":
                self._step_bucket_triton(bucket, active, inv_scale, bucket_found_inf)
            else:
                self._step_bucket_torch(bucket, active, inv_scale, bucket_found_inf)
            for slot, on in zip(bucket.slots, active, strict=True):
                if on and slot.group_index in momentum_groups:
                    slot.momentum_ready = True
                    self.state[slot.param]["momentum_buffer"] = slot.momentum_view
        self._after_step(record=record, path=path, layers=layers)
        return loss

    def _validate_groups(self) -> None:
        """Validate hyper-parameters and penalties edited in ``param_groups``; a group
        whose values are plain numbers that were valid last step is not checked again."""
        for group_index, group in enumerate(self.param_groups):
            # With the types: False == 0 and 1 == True, but a bool is not a valid value.
            values = tuple((type(group[key]), group[key]) for key in _VALIDATED_KEYS)
            values += (id(group["params"]), len(group["params"]))
            plain = not any(isinstance(group[key], Tensor) for key in _VALIDATED_KEYS)
            if plain and self._valid_groups.get(group_index) == values:
                continue
            where = f"param group {group_index}"
            _validate_hyperparameters(group, where, read_device=False)
            _check_group_penalty(group["penalty"], group["params"], where)
            if plain:
                self._valid_groups[group_index] = values

    def _apply_group_changes(self) -> None:
        """Re-lay the buffers when a group's penalty changed (validated before)."""
        penalties = tuple(group["penalty"] for group in self.param_groups)
        if penalties == self._checked_penalties:
            return
        for slot in self._slots:
            group = self.param_groups[slot.group_index]
            if resolve_penalty(group["penalty"], slot.param) != slot.penalty:
                self._rebuild_layout()
                break
        self._checked_penalties = penalties

    def _step_bucket_torch(
        self, bucket: FlatBucket, active: list[bool], inv_scale: Tensor | None, found_inf: Tensor | None
    ) -> None:
        if bucket.cpu_kernel:
            # One pass of the C kernel over the whole bucket, group norms included.
            args = (*self._kernel_inputs(bucket, active, "cpu"), inv_scale, found_inf)
            if torch.compiler.is_compiling():
                torch.ops.slbi_triton.cpu_bucket_step(*args)  # one opaque op in the graph
            else:
                cpu_step.bucket_step(*args, check=False)  # the bucket built these buffers
            return
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
            kwargs.update(inv_scale=inv_scale, found_inf=found_inf)
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
                functional.refresh_group_norms_(z, norms, found_inf)

    def _step_bucket_triton(
        self, bucket: FlatBucket, active: list[bool], inv_scale: Tensor | None, found_inf: Tensor | None
    ) -> None:
        _triton_step()(*self._kernel_inputs(bucket, active, "triton"), inv_scale, found_inf)

    def _kernel_inputs(self, bucket: FlatBucket, active: list[bool], kernel: str) -> tuple[Any, ...]:
        """The buffers and tables a fused ``kernel`` (``"triton"`` or ``"cpu"``) takes for
        ``bucket``, in its argument order (GradScaler's inputs follow them)."""
        momentum = bucket.momentum
        if momentum is None and kernel == "triton":
            momentum = bucket.params[:1]  # a placeholder the kernel never touches (no ρ anywhere)
        return (
            bucket.params,
            bucket.grads,
            bucket.z,
            momentum,
            bucket.group_norms,
            bucket.chunks(kernel),
            bucket.slot_flags(active),
            self._hparam_table(bucket.device, torch.float32 if kernel == "triton" else torch.float64),
        )

    def _hparam_table(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The (num_groups, HPARAM_FIELDS) table on ``device``: float32 for the Triton
        kernel, float64 for the CPU kernel (which forms its coefficients in double).

        With plain floats it is uploaded again only when a value changed. A traced
        step, or any hyper-parameter given as a tensor (e.g. ``lr=torch.tensor(0.1)``,
        which LR schedulers update in place), builds it with device ops instead: no
        ``.item()``, no host sync, no recompile, and it can be captured in a CUDA graph.
        """
        tensor_valued = any(
            isinstance(group[key], Tensor) for group in self.param_groups for key in _HPARAM_KEYS.values()
        )
        if tensor_valued or torch.compiler.is_compiling():
            zero = torch.zeros((), dtype=dtype, device=device)
            rows = []
            for group in self.param_groups:
                row = [zero] * cf.HPARAM_FIELDS
                for column, key in _HPARAM_KEYS.items():
                    value = group[key]
                    if isinstance(value, Tensor):
                        row[column] = value.to(device=device, dtype=dtype).reshape(())
                    else:
                        # Traced, ``zero + value`` keeps a float an input of the graph
                        # (torch.as_tensor(value) would bake it in: a recompile per lr).
                        row[column] = zero + value
                use_momentum = group["momentum"] != 0
                row[cf.HP_USE_MOMENTUM] = torch.as_tensor(use_momentum, dtype=dtype, device=device)
                rows.append(torch.stack(row))
            return torch.stack(rows)
        values = []
        for group in self.param_groups:
            row = [0.0] * cf.HPARAM_FIELDS
            for column, key in _HPARAM_KEYS.items():
                row[column] = _as_float(key, group[key])
            row[cf.HP_USE_MOMENTUM] = float(row[cf.HP_MOMENTUM] != 0.0)
            values.extend(row)
        key = tuple(values)
        cached = self._hparam_tables.get((device, dtype))
        if cached is None or cached[0] != key:
            table = torch.tensor(values, dtype=dtype).view(-1, cf.HPARAM_FIELDS).to(device)
            self._hparam_tables[(device, dtype)] = (key, table)
        return self._hparam_tables[(device, dtype)][1]

    # -- state dict -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state in torch's layout, ready for ``torch.save``.

        ``"state"`` maps each parameter's index to its ``"momentum_buffer"``, ``"z"``,
        ``"group_norms"`` (float32 ‖Z_g‖ per output filter, as the last step computed
        them) and the toolbox's ``"entry_epoch"`` / ``"order_magnitude"``;
        ``"param_groups"`` holds the hyper-parameters; ``"slbi"`` the toolbox's path
        history, frozen masks, step count and epoch.

        Like ``torch.optim.SGD.state_dict()``, the tensors are the live state, not copies:
        here views into the flat buffers, so the dict follows later steps (copy it, e.g.
        with ``copy.deepcopy``, to keep a snapshot in memory). ``torch.save`` writes each
        flat buffer once, whole, for all the views into it.
        """
        state_dict = super().state_dict()
        state_dict["slbi"] = self._toolbox_state_dict()
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load optimizer state and rebuild the flat buffers from it.

        Takes what :meth:`state_dict` returns, also through ``torch.save`` /
        ``torch.load(weights_only=True, map_location=...)``; training then continues bit
        for bit. Also takes a ``torch.optim.SGD`` state dict: its hyper-parameters and
        momentum are kept, SLBI's own (``kappa``, ``mu``, ``lam``, ``penalty``) stay as
        they are here, and Z starts at 0. Everything is validated before anything changes.

        Args:
            state_dict: optimizer state, as returned by :meth:`state_dict`.
        """
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= state_dict.keys():
            raise TypeError("state_dict must be a mapping with 'state' and 'param_groups' (opt.state_dict())")
        saved_groups = list(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        merged_groups = []
        targets: dict[Any, tuple[Tensor, str]] = {}  # saved index -> (parameter, penalty)
        for index, (saved, current) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            where = f"loaded param group {index}"
            for flag in ("nesterov", "maximize"):
                if saved.get(flag, False):
                    raise ValueError(f"{where} has {flag}=True, which SLBI does not implement")
            if len(saved["params"]) != len(current["params"]):
                raise ValueError(
                    f"{where} has {len(saved['params'])} parameters, but param group {index} of this "
                    f"optimizer has {len(current['params'])}"
                )
            # Saved values win (as in torch); SLBI's own keys missing from an SGD dict stay.
            merged = {k: v for k, v in current.items() if k not in ("params", "param_names")}
            merged.update({k: v for k, v in saved.items() if k not in _SGD_ONLY_KEYS})
            _validate_hyperparameters(merged, where)
            _check_group_penalty(merged["penalty"], current["params"], where)
            merged_groups.append(merged)
            for key, param in zip(saved["params"], current["params"], strict=True):
                targets[key] = (param, resolve_penalty(merged["penalty"], param))
        state: dict[Any, Any] = {}
        exact: dict[Tensor, dict[str, Tensor]] = {}
        for key, entry in state_dict["state"].items():
            if key not in targets:
                state[key] = entry
                continue
            param, penalty = targets[key]
            entry = {k: v for k, v in entry.items() if v is not None}  # SGD may store None
            _check_loaded_state(entry, param, penalty, f"state of parameter {key}")
            exact[param] = {k: entry.pop(k) for k in _EXACT_STATE_KEYS if k in entry}
            if "z" in entry and entry["z"].dtype != param.dtype:
                exact[param].pop("group_norms", None)  # Z gets rounded: recompute its norms
            state[key] = entry
        params_by_key = {key: param for key, (param, _) in targets.items()}
        extras = state_dict.get("slbi")
        self._check_toolbox_state(extras, params_by_key)
        super().load_state_dict({**state_dict, "state": state, "param_groups": merged_groups})
        for param, values in exact.items():
            for key, value in values.items():
                value = value.to(param.device)
                self.state[param][key] = _as_epochs(value) if key == "entry_epoch" else value
        self._rebuild_layout()
        self._load_toolbox_state(extras, params_by_key)


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


# Every live SLBI, for the module parameter-registration hook below.
_WATCHED: weakref.WeakSet[SLBI] = weakref.WeakSet()


def _on_parameter_registration(module: torch.nn.Module, name: str, param: Tensor) -> None:
    """Global ``register_parameter`` hook: tell each SLBI when a module attribute that
    holds one of its parameters is given another Parameter (``load_state_dict(...,
    assign=True)`` without swap, ``module.weight = nn.Parameter(...)``), which the
    optimizer could not see otherwise: the old Parameter would silently stop training."""
    old = module._parameters.get(name)
    if old is not None and old is not param:
        for optimizer in list(_WATCHED):
            optimizer._note_replacement(module, name, old)


@functools.cache
def _install_registration_hook() -> None:
    torch.nn.modules.module.register_module_parameter_registration_hook(_on_parameter_registration)


def _watch_parameter_replacement(optimizer: SLBI) -> None:
    _install_registration_hook()
    _WATCHED.add(optimizer)


def _check_parameter_tensor(param: Tensor, label: str) -> None:
    if param.is_complex():
        raise TypeError(f"{label} is complex ({param.dtype}); SLBI supports real parameters only")
    if not param.is_floating_point():
        raise TypeError(f"{label} has dtype {param.dtype}; SLBI needs floating-point parameters")
    if param.is_sparse or param.layout != torch.strided:
        raise TypeError(f"{label} has layout {param.layout}; SLBI needs dense (strided) parameters")


def _check_loaded_state(entry: dict[str, Any], param: Tensor, penalty: str, where: str) -> None:
    """Shapes and types of one parameter's loaded state, against the parameter."""
    expected: dict[str, tuple[int, ...]] = {"z": tuple(param.shape), "momentum_buffer": tuple(param.shape)}
    if penalty == "group":
        expected["group_norms"] = (param.shape[0],)
    if penalty != "none":
        expected["entry_epoch"] = expected["order_magnitude"] = order_shape(param, penalty)
    for key, shape in expected.items():
        value = entry.get(key)
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: {key!r} must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{where}: {key!r} has shape {tuple(value.shape)}, expected {shape} for a parameter of "
                f"shape {tuple(param.shape)} with penalty {penalty!r}"
            )


def _amp_inputs(
    grad_scale: Tensor | None, found_inf: Tensor | None, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """GradScaler's scale as the factor that unscales the gradients, and its inf flag,
    on ``device``; device ops only (no host sync, traceable)."""
    inv_scale = None
    if grad_scale is not None:
        # The reciprocal in float64, as GradScaler.unscale_ takes it: the fused step
        # reads exactly the gradients an explicit unscale_() would have written.
        inv_scale = grad_scale.double().reciprocal().float().to(device)
    if found_inf is not None:
        found_inf = found_inf.to(device=device, dtype=torch.float32)
    return inv_scale, found_inf


def _is_view_of(grad: Tensor, view: Tensor) -> bool:
    if grad.layout != torch.strided:
        return False
    return grad.data_ptr() == view.data_ptr() and grad.stride() == view.stride()


def _lives_in(tensor: Tensor, flat: Tensor) -> bool:
    """Whether ``tensor`` shares ``flat``'s storage."""
    if tensor.device != flat.device:
        return False
    return tensor.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
