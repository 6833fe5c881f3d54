"""The SLBI optimizer: the ``torch.optim`` face of Split Linearized Bregman Iteration.

The update is stated in ``docs/design.md`` ("The update"); the flat buffers live in
:mod:`.storage`, the kernels are chosen and called in :mod:`.dispatch`, the toolbox is
:mod:`.toolbox` and :mod:`.pruning`, and every check at the door is in :mod:`.validation`.
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from . import checkpoint, dispatch, torch_private
from .buckets import FlatBucket
from .dispatch import BucketKernel, HparamTables, KernelInfo, amp_inputs_for, check_backend, choose_kernel
from .names import drop_tied
from .penalties import ModulePenalties, owners_from
from .pruning import Pruner
from .storage import FlatStorage
from .toolbox import Toolbox
from .validation import (
    HYPERPARAMETERS,
    GroupChecks,
    check_hyperparameters,
    check_names,
    check_new_params,
    check_options,
    fused_from_torch_options,
    group_params,
)

__all__ = ["SLBI"]


def _toolbox_method(component: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """An SLBI method that forwards to ``self.<component>.<method>`` (same docstring and
    signature)."""

    @functools.wraps(method)
    def forward(self: SLBI, *args: Any, **kwargs: Any) -> Any:
        return getattr(getattr(self, component), method.__name__)(*args, **kwargs)

    return forward


class SLBI(Optimizer):
    r"""Split Linearized Bregman Iteration with momentum (FuSplit LBI).

    SGD with momentum plus a split variable ``Z`` per penalised parameter whose shrunken
    image ``Γ = κ·prox(Z)`` walks a regularisation path: weights (penalty ``"l1"``) or
    output filters (penalty ``"group"``) enter the support one by one. One step, per
    parameter ``W`` with gradient ``g`` (``docs/design.md``)::

        u       = g + wd·W
        v_{t+1} = u (first step) else ρ·v_t + (1−δ)·u
        Γ_t     = κ·prox(Z_t)
        W_{t+1} = W_t − α·κ·(v_{t+1} + (W_t − Γ_t)/μ)
        Z_{t+1} = Z_t + (α/μ)·(W_t − Γ_t)

    and ``W_{t+1} = W_t − α·κ·v_{t+1}`` for parameters with penalty ``"none"``.

    All parameters of one (device, dtype) live in flat contiguous buffers (weights,
    gradients, Z, momentum); every ``param.data``, ``param.grad`` and state tensor is a
    view into them, and one fused kernel call per buffer does the whole step.

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
        fused: for the torch backend, run the step fused: on the CPU, float32 and float64
            buffers in one call of the C kernel (built on first use with the system C
            compiler, then cached on disk), other dtypes as one Inductor-compiled loop
            per run of parameters. ``None`` (default): fused on the CPU, eager ops on
            CUDA; ``False``: eager ops. Without a working compiler the optimizer logs a
            warning and falls back to Inductor, then to eager ops. Which kernel runs a
            buffer is decided when the buffers are laid out (see :meth:`kernels`).
        state_dtype: ``torch.bfloat16`` stores Z and the momentum buffer in bfloat16
            (float32, bfloat16 and float16 parameters; float64 ones keep float64),
            computes the update in float32 and writes them back with reproducible
            stochastic rounding: half the state memory and the bytes per step of fused
            SGD. ``None`` (default): the parameters' dtype.
        seed: seed of the stochastic rounding (default: ``torch.initial_seed()``, so
            ``torch.manual_seed`` makes a run reproducible).
        foreach: as in ``torch.optim``; ``True`` or ``False``: multi-tensor torch ops (as
            ``fused=False``; SLBI has no per-tensor loop); ``None`` (default): ``fused``.
        maximize, differentiable: as in ``torch.optim``; only ``False`` (the default).

    Example:
        >>> opt = SLBI(model.named_parameters(), lr=0.1, kappa=1, mu=100)
        >>> opt.zero_grad()
        >>> loss_fn(model(x), y).backward()
        >>> opt.step()

    A parameter's ``.grad`` is ``None`` until a gradient arrives, which is copied once into
    the flat gradient buffer; ``.grad`` stays a view into it, and ``zero_grad()`` (default
    ``set_to_none=False``, unlike ``torch.optim``) zeroes the buffer and keeps the views.
    ``step()`` updates the parameters that received a gradient since (from autograd,
    assigned, or written into ``.grad`` in place) and skips the others, as SGD skips ``None``.

    State per parameter (``opt.state[p]``): ``"momentum_buffer"``, ``"z"``,
    ``"group_norms"`` and the toolbox's order (see :meth:`state_dict`).
    ``torch.amp.GradScaler`` hands the step its scale and inf flag: the gradients are
    unscaled as they are read, and a step with inf/NaN gradients writes nothing.
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
        state_dtype: torch.dtype | None = None,
        seed: int | None = None,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        values = (lr, kappa, mu, lam, momentum, dampening, weight_decay)
        defaults: dict[str, Any] = dict(zip(HYPERPARAMETERS, values, strict=True))
        defaults["penalty"] = penalty
        check_hyperparameters(defaults, "defaults")
        if isinstance(params, (set, frozenset)):
            # Iteration order would decide the state_dict indices: refuse, as torch does for a group.
            raise TypeError("params must be an ordered collection (a list), not a set")
        check_options(backend, state_dtype, seed)
        fused = fused_from_torch_options(fused, foreach, maximize, differentiable)
        self.backend = backend
        self.fused = fused
        self.state_dtype = state_dtype
        self.current_epoch: int | None = None
        self._init_components(torch.initial_seed() if seed is None else seed)
        # Penalty "auto" asks the modules, read from model.(named_)parameters() before
        # torch's __init__ consumes it.
        self._owners = owners_from(params)
        super().__init__(params, defaults)
        self._owners = {}  # the optimizer keeps no module alive
        self._relayout(steps=0)
        self._layout_ready = True

    def _init_components(self, seed: int) -> None:
        """The parts an SLBI is made of (also after unpickling)."""
        self._layout_ready = False
        self._owners: dict[int, list[torch.nn.Module]] = {}  # while __init__ adds the groups
        self._module_penalties = ModulePenalties()
        self._storage = FlatStorage(self.state_dtype, seed & 0xFFFFFFFF, self._module_penalties.resolve)
        self._toolbox = Toolbox(self, self._storage)
        self._pruner = Pruner(self._toolbox, self, self._storage)
        self._tables = HparamTables()
        self._step_calls = torch_private.StepCalls()
        self._group_checks = GroupChecks()
        # The penalties and channel_ids the layout was last checked against (_apply_group_changes).
        self._checked_layout: tuple[tuple[str, int], ...] | None = None
        self._own_hooks = checkpoint.OwnHooks()  # our state-dict hooks (see state_dict)
        self._pending_load: checkpoint.LoadPlan | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # An LR scheduler replaces ``opt.step`` by a wrapper Dynamo cannot trace: put an
        # equivalent, traceable one in its place (see torch_private).
        if name == "step" and torch_private.is_scheduler_wrapper(value):
            # The function it wraps: the class's step, or a step the user installed before.
            wrapped = getattr(value, "__wrapped__", type(self).step)
            mark_called = self._step_calls.mark_called
            value = torch_private.scheduler_step(functools.partial(wrapped, self), mark_called)
        super().__setattr__(name, value)

    @property
    def _opt_called(self) -> bool:
        """Read by LR schedulers: whether ``step()`` ran since the scheduler wrapped it."""
        return self._step_calls.opt_called

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self._step_calls.opt_called = value

    # -- copy and pickle ----------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` keep: torch's three fields, the options,
        the step count and seed, and the toolbox's state; the flat buffers are laid out
        anew from the (copied) parameters and state."""
        state = super().__getstate__()
        # Compact copies: a view would carry its whole flat buffer into a pickle.
        state["state"] = defaultdict(dict)
        for param, entry in self.state.items():
            state["state"][param] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in entry.items()}
        state["slbi"] = dict(
            backend=self.backend, fused=self.fused, state_dtype=self.state_dtype, seed=self._storage.seed,
            steps=self._storage.steps_done(), current_epoch=self.current_epoch,
            order_path=self._toolbox.order_path, frozen=self._pruner.frozen, snapshot=self._pruner.snapshot,
            aliases=self._toolbox.aliases, module_penalties=self._module_penalties.by_position,
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        extras = state.pop("slbi", None)
        super().__setstate__(state)
        if extras is None:  # not ours (e.g. a torch.optim pickle): nothing to lay out
            return
        self.backend, self.fused, self.state_dtype = extras["backend"], extras["fused"], extras["state_dtype"]
        self.current_epoch = extras["current_epoch"]
        self._init_components(extras["seed"])
        self._module_penalties.by_position = list(extras.get("module_penalties", ()))
        self._relayout(steps=extras["steps"])
        self._layout_ready = True
        self._toolbox.order_path = extras["order_path"]
        self._pruner.snapshot = extras["snapshot"]
        self._toolbox.aliases = extras.get("aliases", {})
        self._pruner.set_frozen(extras["frozen"])

    # -- param groups ---------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (validated before anything changes) and re-lay the buffers."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        merged = {**self.defaults, **param_group}
        where = f"param group {len(self.param_groups)}"
        check_hyperparameters(merged, where)
        owners = {**self._owners, **owners_from(param_group["params"])}
        # As torch.optim: a tensor, or a sequence of parameters or (name, parameter); a tied
        # weight listed under each of its names (named_parameters(remove_duplicate=False)) once.
        items, _, _ = group_params(param_group["params"])
        items, aliases = drop_tied(items)
        items, names, tensors = group_params(items)
        param_group = {**param_group, "params": items}
        taken = {id(p) for group in self.param_groups for p in group["params"]}
        check_new_params(tensors, names, merged["penalty"], where, taken, merged.get("channel_ids"),
                         merged.get("channel_followers"))
        for param in tensors:
            check_backend(self.backend, param.device)
        first = sum(len(group["params"]) for group in self.param_groups)
        super().add_param_group(param_group)
        self._toolbox.aliases.update({alias: first + position for alias, position in aliases.items()})
        self._module_penalties.add(tensors, owners)
        if self._layout_ready:
            self._relayout()

    def assign_name(self, names: Iterable[str]) -> None:
        """Name the parameters in order (the paper's form ``SLBI(model.parameters())``).

        Args:
            names: one name per parameter, in the order of ``param_groups``, e.g.
                ``[n for n, _ in model.named_parameters()]``.
        """
        names = list(names)
        check_names(names, sum(len(group["params"]) for group in self.param_groups))
        position = 0
        for group in self.param_groups:
            count = len(group["params"])
            group["param_names"] = names[position : position + count]
            position += count
        for slot in self._storage.slots:
            slot.name = names[slot.index]
        self._apply_group_changes(names_changed=True)  # "auto" may read the names

    def kernels(self) -> list[KernelInfo]:
        """Which kernel updates which parameters: one :class:`KernelInfo` per flat buffer
        (``"triton"``, ``"c"``, ``"inductor"`` or ``"eager"``; see ``docs/design.md``)."""
        return dispatch.kernel_infos(self._storage.kernels)

    def _relayout(self, steps: int | None = None) -> None:
        self._storage.layout(self.param_groups, self.state, self._choose_kernel, steps)
        self._checked_layout = self._layout_key()

    def _layout_key(self) -> tuple[tuple[str, int], ...]:
        """Per group, its penalty and its ``channel_ids`` and ``channel_followers`` lists (by
        identity: a new list re-lays)."""
        return tuple(
            (group["penalty"], id(group.get("channel_ids")), id(group.get("channel_followers")))
            for group in self.param_groups
        )

    def _choose_kernel(self, bucket: FlatBucket) -> BucketKernel:
        return choose_kernel(bucket, self.backend, self.fused)

    # -- gradients and the step -------------------------------------------------------

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero every gradient in place (one fill per flat buffer), keeping the views.

        Args:
            set_to_none: set every ``param.grad`` to ``None`` instead; the next gradient
                autograd makes is copied into the flat buffer again. Default: ``False``
                (``torch.optim``'s default is ``True``; keeping the views saves that copy).
        """
        if torch.compiler.is_compiling():
            if set_to_none:
                # A compiled step reads the flat buffer: the views must stay bound.
                raise RuntimeError(
                    "SLBI.zero_grad(set_to_none=True) inside torch.compile'd code: use opt.zero_grad() "
                    "(it zeroes the flat gradient buffer and keeps the views the compiled step reads)"
                )
        elif not self._storage.intact():
            self._group_checks.check(self.param_groups)
            self._storage.check()
            self._sync()
        self._storage.zero_grad(set_to_none)

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
                ``path`` (the paper's recording feature; eager steps only).
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
        if torch.compiler.is_compiling():
            if record:
                raise RuntimeError("step(record=True) inside torch.compile'd code: record in an eager step")
            active = self._storage.active()
        else:
            slots_to_record = self._toolbox.record_slots(path, layers) if record else None
            active = self._prepare_eager_step()
            if found_inf is not None and self._first_momentum_step(active):
                # A first step keeps no trace on the device of being skipped (v is
                # overwritten by u, not blended): decide here, once per parameter.
                if found_inf.item() != 0:
                    return loss
                found_inf = None
        self._run_kernels(active, grad_scale, found_inf)
        self._storage.stepped(active, self.param_groups, self.state)
        if not torch.compiler.is_compiling():
            self._pruner.commit_if_stepped()  # the step kept what prune_layer / use_w_star changed
        if record:
            self._toolbox.record(path, slots_to_record)
        return loss

    def _prepare_eager_step(self) -> list[list[bool]]:
        """Every check first, then the changes: validated hyper-parameters, a re-laid
        layout after a penalty change, re-bound parameters; the active slots."""
        self._group_checks.check(self.param_groups)
        intact = self._storage.intact()
        if not intact:
            self._storage.check()
        self._apply_group_changes()
        if not intact:
            self._sync()
        self._storage.sync_held_out(self.param_groups)
        return self._storage.active()

    def _sync(self) -> None:
        self._storage.sync(self.param_groups, self.state, self._choose_kernel, self._pruner.rekey)

    def _first_momentum_step(self, active: list[list[bool]]) -> bool:
        return any(
            on and self.param_groups[slot.group_index]["momentum"] != 0 and not slot.momentum_ready
            for bucket, flags in zip(self._storage.buckets, active, strict=True)
            for slot, on in zip(bucket.slots, flags, strict=True)
        )

    def _run_kernels(
        self, active: list[list[bool]], grad_scale: Tensor | None, found_inf: Tensor | None
    ) -> None:
        """One kernel call per bucket (an idle one only counts the step), then the frozen
        entries are zeroed again."""
        momentum = [group["momentum"] != 0 for group in self.param_groups]
        amp_inputs: dict[torch.device, tuple[Tensor | None, Tensor | None]] = {}
        for kernel, flags in zip(self._storage.kernels, active, strict=True):
            bucket = kernel.bucket
            if any(momentum[index] for index in bucket.group_indices):
                bucket.ensure_momentum()
            if bucket.device not in amp_inputs:
                amp_inputs[bucket.device] = amp_inputs_for(grad_scale, found_inf, bucket.device)
            kernel(flags, self.param_groups, self._tables, *amp_inputs[bucket.device])
            bucket.apply_frozen()

    def _apply_group_changes(self, names_changed: bool = False) -> None:
        """Re-lay the buffers when a parameter's penalty changed (its group's or its
        ``channel_ids``, validated before, or what "auto" makes of new names)."""
        key = self._layout_key()
        if key == self._checked_layout and not names_changed:
            return
        changed = self._storage.stale_slots(self.param_groups)
        if changed:  # the prune order and path of another penalty have another shape: they restart
            self._toolbox.forget_order([slot.param for slot in changed])
        if changed or [ids for _, *ids in key] != [ids for _, *ids in self._checked_layout]:
            self._relayout()
        self._checked_layout = key

    def _penalty_of(self, penalty: str, index: int, coupled: bool = False) -> str:
        """The penalty the parameter at ``index`` gets in a group with ``penalty`` (with
        ``channel_ids``: ``coupled``)."""
        slot = self._storage.slots[index]
        return self._module_penalties.resolve(penalty, slot.param, slot.name, index, coupled)

    # -- state dict -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state in torch's layout, ready for ``torch.save``.

        ``"state"`` maps each parameter's index to its ``"momentum_buffer"``, ``"z"``
        (in the state dtype), ``"group_norms"`` (‖Z_g‖ per output filter, as the last
        step computed them) and the toolbox's ``"entry_epoch"`` / ``"order_magnitude"``;
        ``"param_groups"`` holds the hyper-parameters; ``"slbi"`` the step count, the
        seed, the epoch, the toolbox's path history, the frozen masks and, while a
        ``recover()`` is pending, its saved copies (``"snapshot"``).

        Like ``torch.optim.SGD.state_dict()``, the tensors are the live state, not copies:
        here views into the flat buffers, so the dict follows later steps (copy it, e.g.
        with ``copy.deepcopy``, to keep a snapshot in memory). ``torch.save`` writes each
        flat buffer once, whole, for all the views into it. State dict hooks see the
        whole dict, ``"slbi"`` included.
        """
        self._own_hooks.first("state_dict_post", self.register_state_dict_post_hook, self._add_slbi_state)
        return super().state_dict()

    def _add_slbi_state(self, optimizer: SLBI, state_dict: dict[str, Any]) -> None:
        state_dict["slbi"] = {
            "steps": self._storage.steps_done(),
            "rng_seed": self._storage.seed,
            "current_epoch": self.current_epoch,
            **self._toolbox.state_dict(),
            **self._pruner.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load optimizer state and rebuild the flat buffers from it.

        Takes what :meth:`state_dict` returns, also through ``torch.save`` /
        ``torch.load(weights_only=True, map_location=...)``; training then continues bit
        for bit. Also takes a ``torch.optim.SGD`` state dict: its hyper-parameters and
        momentum are kept, SLBI's own (``kappa``, ``mu``, ``lam``, ``penalty``) stay as
        they are here, and Z starts at 0. Everything is validated before anything changes,
        after the load-state-dict pre-hooks ran (they see the dict as given).

        Args:
            state_dict: optimizer state, as returned by :meth:`state_dict`.
        """
        self._own_hooks.last("load_pre", self.register_load_state_dict_pre_hook, self._prepare_load)
        self._own_hooks.first("load_post", self.register_load_state_dict_post_hook, self._finish_load)
        super().load_state_dict(state_dict)

    def _prepare_load(self, optimizer: SLBI, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a state dict (nothing changes if it is refused); torch's loader gets
        the merged param groups and the state it may cast."""
        self._pending_load = checkpoint.plan_load(state_dict, self.param_groups, self._penalty_of)
        return self._pending_load.for_torch

    def _finish_load(self, optimizer: SLBI) -> None:
        """After torch's loader: the exact state, the flat buffers, the toolbox."""
        plan, self._pending_load = self._pending_load, None
        plan.restore_exact(self.state)
        self._storage.seed = int(plan.extras.get("rng_seed", self._storage.seed)) & 0xFFFFFFFF
        self.current_epoch = plan.extras.get("current_epoch")
        self._relayout(steps=int(plan.extras.get("steps", 0)))
        self._toolbox.load_state(plan.extras)
        self._pruner.load_state(plan.extras, plan.params)

    # -- the toolbox, by layer name (slbi_triton.toolbox, slbi_triton.pruning) ---------

    names = property(lambda self: self._toolbox.names, doc="The parameter names, in parameter order.")
    gamma = _toolbox_method("_toolbox", Toolbox.gamma)
    w_star = _toolbox_method("_toolbox", Toolbox.w_star)
    residue = _toolbox_method("_toolbox", Toolbox.residue)
    sparsity = _toolbox_method("_toolbox", Toolbox.sparsity)
    masks = _toolbox_method("_toolbox", Toolbox.masks)
    update_order = _toolbox_method("_toolbox", Toolbox.update_order)
    order_score = _toolbox_method("_toolbox", Toolbox.order_score)
    path_history = _toolbox_method("_toolbox", Toolbox.path_history)
    prune_layer = _toolbox_method("_pruner", Pruner.prune_layer)
    use_w_star = _toolbox_method("_pruner", Pruner.use_w_star)
    recover = _toolbox_method("_pruner", Pruner.recover)
    unfreeze = _toolbox_method("_pruner", Pruner.unfreeze)
