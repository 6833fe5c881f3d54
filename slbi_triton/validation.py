"""Checks at the door: hyper-parameters, parameters, gradients and loaded state.

Every check raises ``ValueError`` or ``TypeError`` naming the parameter and the value,
and is called before the optimizer changes anything.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .channel_ids import channel_ids_of, check_channel_ids, check_held_out, held_out_of
from .penalties import auto_penalty

PENALTIES = ("auto", "l1", "group", "none")
BACKENDS = ("auto", "torch", "triton")
HYPERPARAMETERS = ("lr", "kappa", "mu", "lam", "momentum", "dampening", "weight_decay")

_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "lr": (lambda x: x >= 0.0, "a finite number >= 0"),
    "kappa": (lambda x: x > 0.0, "a finite number > 0"),
    "mu": (lambda x: x > 0.0, "a finite number > 0"),
    "lam": (lambda x: x >= 0.0, "a finite number >= 0"),
    "momentum": (lambda x: 0.0 <= x < 1.0, "in [0, 1)"),
    "dampening": (lambda x: 0.0 <= x <= 1.0, "in [0, 1]"),
    "weight_decay": (lambda x: x >= 0.0, "a finite number >= 0"),
}


def resolve_penalty(penalty: str, param: Tensor, name: str | None = None, coupled: bool = False) -> str:
    """The penalty a parameter gets: its group's, or for ``"auto"`` what
    :func:`.penalties.auto_penalty` makes of its name and shape (the optimizer also asks
    its module, where it knows it); a parameter with ``channel_ids`` (``coupled``) is
    group-penalised by its rows; an empty tensor has nothing to penalise (``"none"``)."""
    if param.numel() == 0:
        return "none"
    if coupled:
        return "group"
    return auto_penalty(param, name) if penalty == "auto" else penalty


def as_float(name: str, value: Any, read_device: bool = True) -> float | None:
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


def check_hyperparameters(group: Mapping[str, Any], where: str, read_device: bool = True) -> None:
    """Raise naming the first bad hyper-parameter or penalty of ``group``; the values of
    accelerator tensors are checked only when ``read_device`` (never per step)."""
    for key, (ok, expected) in _RULES.items():
        value = as_float(f"{key} ({where})", group[key], read_device)
        if value is None:
            continue
        if not math.isfinite(value) or not ok(value):
            raise ValueError(f"Invalid {key} ({where}): {group[key]!r}; expected {expected}")
    if isinstance(group["momentum"], Tensor):
        # Whether a group keeps a momentum buffer is decided on the host, every step.
        raise TypeError(f"momentum ({where}) must be a number, not a tensor: {group['momentum']!r}")
    for flag, why in _REFUSED_FLAGS.items():
        if group.get(flag, False) is True:
            raise ValueError(f"{where} has {flag}=True, which SLBI does not support: {why}")
    penalty = group["penalty"]
    if penalty not in PENALTIES:
        raise ValueError(f"Invalid penalty ({where}): {penalty!r}; expected one of {PENALTIES}")


def check_group_penalty(
    penalty: str, params: Iterable[Tensor], where: str, labels: Iterable[str] | None = None,
    coupled: Iterable[bool] | None = None,
) -> None:
    """Refuse penalty ``"group"`` on a 0-D/1-D parameter, unless it has ``channel_ids``
    (``coupled``: its rows are single elements); ``labels`` name the parameters in the
    message (default: their position in the group ``where``)."""
    if penalty != "group":
        return
    params = list(params)
    if labels is None:
        labels = [f"parameter {position} of {where}" for position in range(len(params))]
    coupled = [False] * len(params) if coupled is None else coupled
    for param, label, has_ids in zip(params, labels, coupled, strict=True):
        if param.dim() < 2 and not has_ids:
            raise ValueError(
                f"penalty 'group' needs a tensor of at least 2 dims, but {label} has shape "
                f"{tuple(param.shape)}; use penalty 'l1', 'none' or 'auto' for it"
            )


def check_parameter(param: Any, label: str) -> None:
    """A dense, real floating-point tensor that is not a ``DTensor``."""
    if not isinstance(param, Tensor):
        raise TypeError(f"{label} is not a Tensor but {type(param).__name__}")
    # A DTensor exists only once its module was imported: no import (and no cost) otherwise.
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(param, dtensor.DTensor):
        raise TypeError(
            f"{label} is a DTensor (FSDP2's fully_shard, or tensor parallelism): SLBI keeps each "
            "parameter, whole, in a flat local buffer and cannot step sharded parameters. Train with "
            "DistributedDataParallel instead (SLBI over the model's parameters, DDP's default "
            "gradient_as_bucket_view=False)"
        )
    if param.is_complex():
        raise TypeError(f"{label} is complex ({param.dtype}); SLBI supports real parameters only")
    if not param.is_floating_point():
        raise TypeError(f"{label} has dtype {param.dtype}; SLBI needs floating-point parameters")
    if param.is_sparse or param.layout != torch.strided:
        raise TypeError(f"{label} has layout {param.layout}; SLBI needs dense (strided) parameters")


def check_new_params(
    tensors: list[Any], names: list[str | None], penalty: str, where: str, taken: set[int],
    channel_ids: Any = None, followers: Any = None,
) -> None:
    """The parameters of a new param group ``where``: dense float tensors, none twice and
    none already in the optimizer (``taken``: their ids), fit for ``penalty`` and their
    ``channel_ids``."""
    labels = [
        f"parameter {name!r}" if name is not None else f"parameter {position} of {where}"
        for position, name in enumerate(names)
    ]
    seen = set(taken)
    for param, label in zip(tensors, labels, strict=True):
        check_parameter(param, label)
        if id(param) in seen:
            raise ValueError(f"{label} appears more than once in the optimizer's parameters")
        seen.add(id(param))
    check_channel_ids(tensors, channel_ids, where, names, followers)
    coupled = [ids is not None for ids in channel_ids or [None] * len(tensors)]
    check_group_penalty(penalty, tensors, where, labels, coupled)


def check_gradient(grad: Tensor, label: str) -> None:
    """Refuse sparse and complex gradients."""
    if grad.is_sparse or grad.layout != torch.strided:
        raise TypeError(f"SLBI does not support sparse gradients ({label}, layout {grad.layout})")
    if grad.is_complex():
        raise TypeError(f"SLBI does not support complex gradients ({label}, dtype {grad.dtype})")


_REFUSED_FLAGS = {
    "maximize": "SLBI minimises; to maximise an objective, step on its negation (loss = -objective)",
    "differentiable": (
        "the step updates flat buffers in place under torch.no_grad() (fused kernels), so autograd "
        "cannot differentiate through it"
    ),
}


def fused_from_torch_options(
    fused: Any, foreach: Any, maximize: Any = False, differentiable: Any = False
) -> bool | None:
    """torch.optim's implementation keywords, as ``SLBI`` runs them: ``fused=True`` the
    fused kernels; ``foreach`` (``True`` or ``False``: SLBI has no per-tensor loop) the
    multi-tensor torch ops, i.e. ``fused=False``; both ``True`` is refused, as in torch.
    ``maximize`` and ``differentiable`` are accepted when ``False``.

    Returns:
        the ``fused`` the optimizer runs with (``None``: chosen per bucket).
    """
    for name, value in (("fused", fused), ("foreach", foreach)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be None, True or False, got {value!r}")
    for name, why in _REFUSED_FLAGS.items():
        value = {"maximize": maximize, "differentiable": differentiable}[name]
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
        if value:
            raise ValueError(f"SLBI does not support {name}=True: {why}")
    if fused and foreach:
        raise ValueError("fused=True and foreach=True cannot be set together (as in torch.optim)")
    if foreach is not None and not fused:
        return False
    return fused


def check_state_dtype(state_dtype: Any) -> None:
    """``None`` (the parameters' dtype) or ``torch.bfloat16``."""
    if state_dtype not in (None, torch.bfloat16):
        raise ValueError(
            f"state_dtype must be None (the parameters' dtype) or torch.bfloat16, got {state_dtype!r}"
        )


def check_options(backend: Any, state_dtype: Any, seed: Any) -> None:
    """The optimizer's options other than hyper-parameters and torch's keywords."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")
    check_state_dtype(state_dtype)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}: {seed!r}")


def group_params(raw: Any) -> tuple[list[Any], list[str | None], list[Any]]:
    """A param group's ``"params"`` as torch.optim takes it (a tensor, or any ordered
    iterable of parameters or ``(name, parameter)``): the items, names and tensors."""
    if isinstance(raw, Tensor):
        items = [raw]
    elif isinstance(raw, (set, frozenset)):
        raise TypeError("params must be an ordered collection, not a set")
    else:
        items = list(raw)
    names = [item[0] if isinstance(item, tuple) else None for item in items]
    tensors = [item[1] if isinstance(item, tuple) else item for item in items]
    return items, names, tensors


def check_names(names: list[Any], total: int) -> None:
    """``assign_name``'s names: one string per parameter, none twice."""
    if len(names) != total:
        raise ValueError(f"assign_name got {len(names)} names for {total} parameters")
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise TypeError(f"names must be strings, got {bad[0]!r}")
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"assign_name got duplicate names: {duplicates}")


def check_loaded_state(
    entry: Mapping[str, Any], param: Tensor, expected: Mapping[str, tuple[int, ...]], where: str
) -> None:
    """Each loaded state tensor of one parameter has the shape ``expected`` gives it."""
    for key, shape in expected.items():
        value = entry.get(key)
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: {key!r} must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{where}: {key!r} has shape {tuple(value.shape)}, expected {shape} for a parameter of "
                f"shape {tuple(param.shape)}"
            )


class GroupChecks:
    """The per-step check of ``param_groups`` (edited by users and schedulers): a group
    whose values are plain numbers that were valid last step is not checked again; tensor
    values are checked every step (on the CPU only: the step never waits for a device)."""

    KEYS = (*HYPERPARAMETERS, "penalty")

    def __init__(self) -> None:
        self._valid: dict[int, tuple[Any, ...]] = {}
        self._held: dict[int, tuple[Tensor, tuple[Any, ...]]] = {}  # the held_out last found valid

    def check(self, param_groups: Iterable[Mapping[str, Any]]) -> None:
        for index, group in enumerate(param_groups):
            self._check_held_out(index, group)
            values = tuple(map(group.__getitem__, self.KEYS))
            types = tuple(map(type, values))
            plain = not any(issubclass(kind, Tensor) for kind in types)
            # With the types: False == 0 and 1 == True, but a bool is not a valid value.
            seen = (values, types, id(group["params"]), len(group["params"]), id(group.get("channel_ids")),
                    id(group.get("channel_followers")))
            if plain and self._valid.get(index) == seen:
                continue
            where = f"param group {index}"
            check_hyperparameters(group, where, read_device=False)
            check_channel_ids(group["params"], group.get("channel_ids"), where, group.get("param_names"),
                              group.get("channel_followers"))
            coupled = [ids is not None for ids in channel_ids_of(group)]
            check_group_penalty(group["penalty"], group["params"], where, coupled=coupled)
            if plain:
                self._valid[index] = seen

    def _check_held_out(self, index: int, group: Mapping[str, Any]) -> None:
        """``"held_out"``, checked again when it or the group's channel ids changed."""
        held = held_out_of(group)
        layout = (id(group.get("channel_ids")), id(group.get("channel_followers")), id(group["params"]))
        valid = self._held.get(index)
        if held is None or (valid is not None and valid[1] == layout and isinstance(held, Tensor)
                            and held.dtype == valid[0].dtype
                            and held.device == valid[0].device and torch.equal(held, valid[0])):
            return
        check_held_out(group, f"param group {index}")
        self._held[index] = (held.clone(), layout)
