"""The optimizer's flat storage: its buckets, the binding of parameters, gradients and state
into them, and the detection of parameters that moved.

:class:`FlatStorage` lays the parameters of every param group out in :class:`FlatBucket`s
(one per device and dtype), makes ``param.data``, ``param.grad`` and the state tensors
views into them, and keeps them bound: a gradient autograd creates is copied into the
flat buffer once (a post-accumulate-grad hook), and a parameter whose storage was
replaced (``model.to()``, ``load_state_dict(assign=True)``, ``module.weight = ...``,
``p.data = ...``) is found and bound again before the next step reads it.

Everything that touches private torch internals goes through :mod:`.torch_private`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import torch_private
from .buckets import FlatBucket, Slot
from .channel_ids import channel_ids_of, followers_of, held_out_of
from .kernels import abi
from .validation import check_gradient, check_parameter

Groups = Sequence[Mapping[str, Any]]
State = Mapping[Tensor, dict[str, Any]]
# (group penalty, parameter, its name, its index) -> the penalty it gets.
PenaltyOf = Callable[[str, Tensor, "str | None", int, bool], str]


class FlatStorage:
    """The buckets and slots of one optimizer.

    Args:
        state_dtype: dtype of Z and the momentum buffer (``None``: the parameters').
        seed: seed of stochastic rounding (docs/design.md, "Stochastic rounding").
        penalty_of: what each parameter's group penalty means for it (``"auto"``).
    """

    def __init__(self, state_dtype: torch.dtype | None, seed: int, penalty_of: PenaltyOf) -> None:
        self.state_dtype = state_dtype
        self.seed = seed
        self.penalty_of = penalty_of
        self.slots: list[Slot] = []
        self.buckets: list[FlatBucket] = []
        self.kernels: list[Any] = []  # per bucket, the kernel that updates it (it holds the bucket)
        self._by_id: dict[int, Slot] = {}
        # Where a module attribute that held one of our parameters was given another
        # Parameter: id(our parameter) -> (our parameter, [(module ref, attribute), ...]).
        self._replaced_in: dict[int, tuple[Tensor, list[tuple[weakref.ref, str]]]] = {}
        self._frozen: Mapping[Tensor, Tensor] = {}
        self._held: dict[int, Tensor] = {}  # the groups' "held_out" the buckets were given
        # Our post-accumulate-grad hooks: removed when this storage goes (a model outlives
        # its optimizer and must not carry dead hooks).
        self._handles: list[Any] = []
        weakref.finalize(self, _remove_hooks, self._handles)
        _watch(self)

    # -- layout -----------------------------------------------------------------------

    def layout(
        self, groups: Groups, state: State, choose: Callable[[FlatBucket], Any], steps: int | None = None
    ) -> None:
        """(Re)create the buckets from the parameters' current values and state, bind them
        and give each bucket its kernel (``choose(bucket)``, in :attr:`kernels`).

        Args:
            steps: the step count the buckets start at (default: the current one).
        """
        steps = self.steps_done() if steps is None else steps
        self._note_written()  # the old views' in-place writes count in the new layout too
        old = {id(slot.param): slot for slot in self.slots}
        _remove_hooks(self._handles)
        slots: list[Slot] = []
        for group_index, group in enumerate(groups):
            names = group.get("param_names", [None] * len(group["params"]))
            entries = zip(group["params"], names, channel_ids_of(group), followers_of(group), strict=True)
            for param, name, ids, follows in entries:
                penalty = self.penalty_of(group["penalty"], param, name, len(slots), ids is not None)
                slot = Slot(param, name, len(slots), group_index, penalty, channel_ids=ids, follows=follows)
                slots.append(slot)
        momentum_groups = {i for i, group in enumerate(groups) if group["momentum"] != 0}
        held = _held_out(groups)
        by_bucket: dict[tuple[torch.device, torch.dtype], list[Slot]] = {}
        for slot in slots:
            by_bucket.setdefault((slot.param.device, slot.param.dtype), []).append(slot)
        buckets, kernels = [], []
        for number, bucket_slots in enumerate(by_bucket.values()):
            # A momentum buffer kept in the state of a group now at ρ = 0 stays too.
            needs_momentum = any(
                s.group_index in momentum_groups or "momentum_buffer" in state.get(s.param, {})
                for s in bucket_slots
            )
            dtype = bucket_slots[0].param.dtype
            state_dtype = self.state_dtype if dtype != torch.float64 else None
            rng = (bucket_seed(self.seed, number), steps)
            bucket = FlatBucket(bucket_slots, needs_momentum, state_dtype, rng)
            record = [torch_private.version_of(bucket.grads)]
            for slot in bucket.slots:
                slot.grad_record = record
            stale = [s for s in bucket.slots if not self._bind(bucket, s, old.get(id(s.param)), state)]
            bucket.refresh_group_norms(stale)
            bucket.hold_out(held)
            kernels.append(choose(bucket))
            buckets.append(bucket)
        self.slots, self.buckets, self.kernels = slots, buckets, kernels
        self._held = {index: ids.clone() for index, ids in held.items()}
        self._by_id = {id(slot.param): slot for slot in slots}
        self.set_frozen(self._frozen)

    def sync_held_out(self, groups: Groups) -> None:
        """Give the buckets the groups' ``"held_out"`` (validated) if it changed since."""
        held = _held_out(groups)
        if held.keys() == self._held.keys() and all(torch.equal(held[i], self._held[i]) for i in held):
            return
        for bucket in self.buckets:
            bucket.hold_out(held)
        self._held = {index: ids.clone() for index, ids in held.items()}

    def stale_slots(self, groups: Groups) -> list[Slot]:
        """The slots whose penalty their group's penalty, names and ``channel_ids`` no
        longer give (e.g. after a penalty change)."""
        coupled = [ids is not None for group in groups for ids in channel_ids_of(group)]
        return [
            slot for slot in self.slots
            if slot.penalty != self.penalty_of(
                groups[slot.group_index]["penalty"], slot.param, slot.name, slot.index, coupled[slot.index]
            )
        ]

    def bucket_of(self, slot: Slot) -> FlatBucket:
        return next(bucket for bucket in self.buckets if any(s is slot for s in bucket.slots))

    def slot_of(self, param: Tensor) -> Slot | None:
        return self._by_id.get(id(param))

    def steps_done(self) -> int:
        """Steps taken (GradScaler-skipped ones not counted); reads the device counter."""
        return int(self.buckets[0].rng[abi.RNG_STEP]) if self.buckets else 0

    def set_frozen(self, masks: Mapping[Tensor, Tensor]) -> None:
        """Entries held at zero after every step: ``{param: bool mask}``."""
        self._frozen = masks
        for bucket in self.buckets:
            bucket.set_frozen(masks)

    def _bind(self, bucket: FlatBucket, slot: Slot, old: Slot | None, state: State) -> bool:
        """Copy a parameter, its gradient and its state into the flat buffers and make
        ``param.data``, an existing ``param.grad`` and the state tensors views into them.

        Returns whether the slot's group norms are current: taken over from the state
        (bit for bit, as the step that wrote them computed them), not to be recomputed.
        """
        param = slot.param
        entry = state.get(param, {})
        self._take_values(slot)
        grad = param.grad
        # A gradient that is not our view came from outside (autograd after a swapped
        # TensorImpl lost our hook, or the user): it is this step's.
        foreign = grad is not None and (old is None or grad.data_ptr() != old.grad_ptr)
        slot.grad_seen = foreign or (old is not None and old.grad_seen)
        if grad is not None:
            slot.grad_view.copy_(grad)
            param.grad = slot.grad_view
        slot.grad_ptr = slot.grad_view.data_ptr()
        slot.grad_record[0] = torch_private.version_of(slot.grad_view)
        z = entry.get("z")
        norms = entry.pop("group_norms", None)
        norms_current = slot.penalty != "group" or (
            norms is not None and z is not None and z.dtype == bucket.state_dtype
            and tuple(norms.shape) == (slot.num_groups,)
        )
        if slot.z_view is not None:
            if z is not None:
                slot.z_view.copy_(z)
            entry["z"] = slot.z_view
        else:
            entry.pop("z", None)
        if slot.penalty == "group":
            if norms_current:
                bucket.norms_of(slot).copy_(norms)
            entry["group_norms"] = bucket.norms_of(slot)
        slot.momentum_ready = entry.get("momentum_buffer") is not None
        if slot.momentum_ready:
            slot.momentum_view.copy_(entry["momentum_buffer"])
            entry["momentum_buffer"] = slot.momentum_view
        else:
            entry.pop("momentum_buffer", None)  # torch.optim.SGD can store None
        if entry and param not in state:
            state[param] = entry
        return norms_current

    def _take_values(self, slot: Slot) -> None:
        """Copy the parameter's values into its view, make the view its ``.data``, and hook
        it (again): a swapped TensorImpl dropped our hook, ``requires_grad`` may be new."""
        param = slot.param
        slot.param_view.copy_(param.detach())
        param.data = slot.param_view
        slot.data_ptr = slot.param_view.data_ptr()
        slot.impl = torch_private.impl_id(param)
        if slot.hook_handle is not None:
            slot.hook_handle.remove()
            slot.hook_handle = None
        if param.requires_grad:
            slot.hook_handle = param.register_post_accumulate_grad_hook(_GradArrived(weakref.ref(slot)))
            torch_private.rearm_grad_hooks(param)
            self._handles.append(slot.hook_handle)

    # -- keeping the bindings -----------------------------------------------------------

    def intact(self) -> bool:
        """The common case, checked cheaply every eager step: every parameter still lives
        where it was bound and its ``.grad`` is its view or ``None``."""
        if self._replaced_in:
            return False
        for slot in self.slots:
            param = slot.param
            if param.data_ptr() != slot.data_ptr or torch_private.impl_id(param) != slot.impl:
                return False
            if slot.hook_handle is None and param.requires_grad:
                return False  # requires_grad was switched on: it needs our hook
            grad = param.grad
            if grad is not None and grad is not slot.grad_view:
                return False
        return True

    def check(self) -> None:
        """What :meth:`sync` would refuse, before anything changes: a parameter whose shape
        changed or that is no longer a dense float tensor, and sparse/complex gradients."""
        replacements = self._pending_replacements()
        for slot in self.slots:
            param = replacements.get(id(slot.param), slot.param)
            if param is not slot.param or param.dtype != slot.param_view.dtype:
                check_parameter(param, slot.label)
            if param.shape != slot.param_view.shape:
                raise ValueError(
                    f"{slot.label} changed shape from {tuple(slot.param_view.shape)} to {tuple(param.shape)} "
                    "after the optimizer was built; build a new SLBI (or load its state_dict into one)"
                )
            grad = param.grad
            if grad is not None and grad is not slot.grad_view:
                check_gradient(grad, slot.label)

    def sync(
        self, groups: Groups, state: State, choose: Callable[[FlatBucket], Any],
        on_replace: Callable[[Tensor, Tensor], None],
    ) -> None:
        """Bind again what moved since the last step (checked by :meth:`check` first):
        a replaced Parameter takes the old one's place, group and state (and
        ``on_replace(old, new)`` is told); a cast or moved parameter re-lays the buffers;
        new values (``p.data = ...``) are copied in; a gradient found outside the flat
        buffer is copied in and bound."""
        replacements = self._pending_replacements()
        self._replaced_in.clear()
        relayout = bool(replacements)
        for slot in self.slots:
            new = replacements.get(id(slot.param))
            if new is not None:
                _replace_in_groups(groups, state, slot.param, new)
                on_replace(slot.param, new)
                slot.param = new
                slot.grad_seen = new.grad is not None  # our hook was never on it
        for bucket in self.buckets:
            for slot in bucket.slots:
                param = slot.param
                if param.device != bucket.device or param.dtype != bucket.dtype:
                    relayout = True
                elif param.stride() != slot.strides:
                    relayout = True  # another memory format (channels_last): lay it out so
                elif torch_private.impl_id(param) != slot.impl:
                    # Swapped: our hook was not called since, so a gradient there is this step's.
                    slot.grad_seen = slot.grad_seen or param.grad is not None
                    self._take_values(slot)
                elif param.data_ptr() != slot.data_ptr or (slot.hook_handle is None and param.requires_grad):
                    self._take_values(slot)  # p.data = ..., or requires_grad switched on
        if relayout:
            self.layout(groups, state, choose)
        for bucket in self.buckets:
            for slot in bucket.slots:
                grad = slot.param.grad
                if grad is not None and grad.data_ptr() != slot.grad_ptr:
                    # ``.grad.data`` replaced (model.double().float()): a fresh view.
                    slot.grad_view = bucket.view_of(bucket.grads, slot)
                    slot.grad_ptr = slot.grad_view.data_ptr()
                _bind_foreign_grad(slot)

    def note_replacement(self, module: torch.nn.Module, name: str, old: Tensor) -> None:
        """``module.<name>``, which holds ``old``, is being given another Parameter; only
        the place is kept, read at the next step (later re-assignments count too)."""
        if id(old) not in self._by_id:
            return
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
                new = None if module is None else getattr(module, name, None)
                # Assigned back, or re-tied to a parameter we update anyway: nothing to do.
                if not isinstance(new, Tensor) or new is old or id(new) in self._by_id:
                    continue
                if all(new is not other for other in found):
                    found.append(new)
            if len(found) > 1:
                raise ValueError(
                    f"{self._by_id[key].label} was replaced by {len(found)} different Parameters in "
                    "the model (tied weights untied by load_state_dict(assign=True)?); tie them again, or "
                    "build the optimizer after loading"
                )
            if found:
                result[key] = found[0]
        return result

    # -- gradients and the step ---------------------------------------------------------

    def zero_grad(self, set_to_none: bool) -> None:
        """Zero every flat gradient buffer in place (one fill per bucket); the bound
        ``.grad`` views stay, or become ``None`` with ``set_to_none``."""
        for bucket in self.buckets:
            bucket.grads.zero_()
        if torch.compiler.is_compiling():
            return  # traced: the flags matter to eager steps only
        for bucket in self.buckets:
            bucket.slots[0].grad_record[0] = torch_private.version_of(bucket.grads)
        for slot in self.slots:
            slot.grad_seen = False
            if set_to_none:
                slot.param.grad = None

    def active(self) -> list[list[bool]]:
        """Per bucket, which parameters this step updates: those with a gradient that
        arrived since the last ``zero_grad()`` (in a traced step: every ``.grad`` set)."""
        if torch.compiler.is_compiling():
            for slot in self.slots:
                _bind_foreign_grad(slot)
            return [[slot.param.grad is not None for slot in bucket.slots] for bucket in self.buckets]
        self._note_written()
        return [[slot.param.grad is not None and slot.grad_seen for slot in b.slots] for b in self.buckets]

    def _note_written(self) -> None:
        """Find the gradients written in place into the bound ``.grad`` views since the
        last ``zero_grad()`` by anything but autograd (``p.grad.copy_(g)``, DDP's
        averaged gradients), which no hook reports.

        The views share their flat buffer's version counter, and every write the
        optimizer knows of (``zero_grad``, a binding, autograd's accumulation, which the
        hook sees) records it. Only when the counter moved past every record are the
        parameters still without a gradient read: one that now holds a non-zero value
        has one. So the usual step reads nothing, and scaling a gradient nothing wrote
        (``clip_grad_norm_``, ``GradScaler.unscale_``) does not step an unused parameter.
        """
        candidates: list[Slot] = []
        for bucket in self.buckets:
            version, record = torch_private.version_of(bucket.grads), bucket.slots[0].grad_record
            if record[0] == version:
                continue  # the last write was one the optimizer knows of
            record[0] = version
            candidates += [s for s in bucket.slots if not s.grad_seen and s.param.grad is s.grad_view]
        by_device: dict[torch.device, list[Slot]] = {}
        for slot in candidates:
            by_device.setdefault(slot.grad_view.device, []).append(slot)
        for slots in by_device.values():
            # One wait for the device per device, not one per parameter.
            written = torch.stack([slot.grad_view.any() for slot in slots]).tolist()
            for slot, seen in zip(slots, written, strict=True):
                slot.grad_seen = seen

    def stepped(self, active: list[list[bool]], groups: Groups, state: State) -> None:
        """After a step: a parameter of a group with momentum now has ``v_t``."""
        for bucket, flags in zip(self.buckets, active, strict=True):
            for slot, on in zip(bucket.slots, flags, strict=True):
                if on and not slot.momentum_ready and groups[slot.group_index]["momentum"] != 0:
                    slot.momentum_ready = True
                    state[slot.param]["momentum_buffer"] = slot.momentum_view


def _held_out(groups: Groups) -> dict[int, Tensor]:
    """Param group → its ``"held_out"`` channel ids, for the groups that hold some out."""
    held = {index: held_out_of(group) for index, group in enumerate(groups)}
    return {index: ids for index, ids in held.items() if ids is not None}


def bucket_seed(seed: int, number: int) -> int:
    """The stochastic-rounding seed of the optimizer's ``number``-th bucket."""
    return (seed + 0x9E3779B9 * number) & 0xFFFFFFFF


def _bind_foreign_grad(slot: Slot) -> None:
    """A gradient outside the flat buffer (assigned by hand, made by a traced backward,
    written by DDP's bucket view): copy it in and bind the view; a sparse or complex one
    is refused with the optimizer's error (not torch's, from inside a copy)."""
    grad = slot.param.grad
    if grad is not None and grad is not slot.grad_view:
        check_gradient(grad, slot.label)
        slot.grad_view.copy_(grad)
        slot.param.grad = slot.grad_view
        slot.grad_seen = True
        if not torch.compiler.is_compiling():
            slot.grad_record[0] = torch_private.version_of(slot.grad_view)  # a write the optimizer made


class _GradArrived:
    """Post-accumulate-grad hook: the parameter received a gradient; a fresh one (autograd
    made a new tensor) is copied into the flat buffer and bound, once. It holds its slot
    weakly: the hook must not keep a dead optimizer's buffers alive."""

    def __init__(self, slot: weakref.ref[Slot]) -> None:
        self.slot = slot

    def __call__(self, param: Tensor) -> None:
        slot = self.slot()
        if slot is not None:
            slot.grad_seen = True
            _bind_foreign_grad(slot)
            if not torch.compiler.is_compiling():
                # Autograd's accumulation into the view: a write the optimizer knows of.
                slot.grad_record[0] = torch_private.version_of(slot.grad_view)


def _remove_hooks(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _replace_in_groups(groups: Groups, state: State, old: Tensor, new: Tensor) -> None:
    for group in groups:
        params = group["params"]
        for position, param in enumerate(params):
            if param is old:
                params[position] = new
    if old in state:
        state[new] = state.pop(old)


# Every live storage, for the module parameter-registration hook below; the hook is
# installed while one lives.
_WATCHED: weakref.WeakSet[FlatStorage] = weakref.WeakSet()
_HOOK: list[Any] = []


def _on_parameter_registration(module: torch.nn.Module, name: str, param: Tensor) -> None:
    """Global ``register_parameter`` hook: a module attribute that holds one of our
    parameters is being given another Parameter, which the optimizer could not see
    otherwise: the old Parameter would silently stop training."""
    try:
        old = module.get_parameter(name)
    except AttributeError:
        return  # a new attribute, not a replacement
    if old is not param:
        for storage in list(_WATCHED):
            storage.note_replacement(module, name, old)


def _watch(storage: FlatStorage) -> None:
    if not _HOOK:
        register = torch.nn.modules.module.register_module_parameter_registration_hook
        _HOOK.append(register(_on_parameter_registration))
    _WATCHED.add(storage)
    weakref.finalize(storage, _unwatch_if_idle)


def _unwatch_if_idle() -> None:
    if not _WATCHED and _HOOK:
        _HOOK.pop().remove()
