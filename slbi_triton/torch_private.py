"""Every private torch internal slbi-triton relies on, and nothing else.

Each one is used only where no public API does the job; :func:`check` verifies that the
running torch still has them (``tests/test_torch_private.py`` calls it, so a torch
upgrade that drops one fails with a message naming it).

1. ``Tensor._post_accumulate_grad_hooks``, re-assigned (:func:`rearm_grad_hooks`).
   After ``torch.utils.swap_tensors`` (``model.to()`` with
   ``swap_module_params_on_conversion``, ``load_state_dict(assign=True)``) a parameter
   keeps its hook dict but the autograd engine no longer calls it, and registering one
   more hook does not fix that; assigning the dict back registers it with the engine
   again. Without it the optimizer would miss every gradient of a swapped parameter.
   No public API re-arms hooks.
2. ``Tensor._cdata``, the address of a tensor's TensorImpl (:func:`impl_id`). The only way
   to see that ``torch.utils.swap_tensors`` swapped a parameter when its data stays where
   it was (``model.to(...)`` or ``load_state_dict`` under
   ``swap_module_params_on_conversion``, copying into the same storage): the swap drops the
   hooks, which must then be re-armed. No public API identifies a TensorImpl.
3. The LR scheduler protocol: ``opt.step._wrapped_by_lr_sched`` and ``opt._opt_called``
   (:func:`is_scheduler_wrapper`, :func:`scheduler_step`). An LR scheduler replaces
   ``opt.step`` by a wrapper defined in ``torch/optim/lr_scheduler.py``, a file Dynamo
   never traces, so ``opt.step()`` inside a compiled training step would break the graph.
   The optimizer installs an equivalent wrapper defined here, which sets the flag the
   scheduler reads to tell it that ``step()`` ran. No public API lets an optimizer
   replace the scheduler's wrapper.
4. ``Tensor._version``, the counter every in-place write bumps, shared by a view and its
   base (:func:`version_of`). The only cheap way to see that a ``.grad`` view was written
   in place by something other than autograd (``p.grad.copy_(g)``, DDP's averaged
   gradients) without reading every gradient each step. No public API exposes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "StepCalls", "check", "impl_id", "is_scheduler_wrapper", "rearm_grad_hooks", "scheduler_step",
    "version_of",
]

_HOOKS_ATTRIBUTE = "_post_accumulate_grad_hooks"
_IMPL_ATTRIBUTE = "_cdata"
_SCHEDULER_MARK = "_wrapped_by_lr_sched"
_SCHEDULER_FLAG = "_opt_called"
_VERSION_ATTRIBUTE = "_version"


def rearm_grad_hooks(param: Tensor) -> None:
    """Make the autograd engine call ``param``'s post-accumulate-grad hooks again (after
    its TensorImpl was swapped)."""
    setattr(param, _HOOKS_ATTRIBUTE, getattr(param, _HOOKS_ATTRIBUTE))


def impl_id(tensor: Tensor) -> int:
    """Identifies ``tensor``'s TensorImpl (changes when ``torch.utils.swap_tensors`` swaps it)."""
    return getattr(tensor, _IMPL_ATTRIBUTE)


def version_of(tensor: Tensor) -> int:
    """How many in-place writes ``tensor``'s data has had (any view of the same base
    counts: they share the counter)."""
    return getattr(tensor, _VERSION_ATTRIBUTE)


def is_scheduler_wrapper(value: Any) -> bool:
    """Whether ``value`` is the ``step`` wrapper an LR scheduler installs."""
    return bool(getattr(value, _SCHEDULER_MARK, False))


def scheduler_step(step: Callable[..., Any], mark_called: Callable[[], None]) -> Callable[..., Any]:
    """A traceable stand-in for the scheduler's wrapper: calls ``mark_called()`` (which
    must make the optimizer's ``_opt_called`` read True), then ``step``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        mark_called()
        return step(*args, **kwargs)

    setattr(wrapper, _SCHEDULER_MARK, True)
    return wrapper


@dataclass
class StepCalls:
    """The scheduler's "step was called" flag (the optimizer's ``_opt_called`` reads it).
    A compiled step sets it on this plain object, whose writes Dynamo replays without
    guarding on them."""

    opt_called: bool = False

    def mark_called(self) -> None:
        self.opt_called = True


def check() -> list[str]:
    """The internals above that this torch lacks or handles differently (empty: all fine)."""
    problems = []
    param = torch.nn.Parameter(torch.zeros(2))
    calls = []
    param.register_post_accumulate_grad_hook(lambda p: calls.append(p))
    try:
        torch.utils.swap_tensors(param, torch.nn.Parameter(torch.ones(2)))
        rearm_grad_hooks(param)
        param.sum().backward()
        if not calls:
            problems.append(f"Tensor.{_HOOKS_ATTRIBUTE}: re-assigning it no longer re-arms the hooks")
    except (AttributeError, RuntimeError, TypeError) as error:
        problems.append(f"Tensor.{_HOOKS_ATTRIBUTE}: {error}")

    other = torch.nn.Parameter(torch.zeros(2))
    before = impl_id(other) if hasattr(other, _IMPL_ATTRIBUTE) else None
    torch.utils.swap_tensors(other, torch.nn.Parameter(torch.zeros(2)))
    if before is None or not isinstance(before, int) or impl_id(other) == before:
        problems.append(f"Tensor.{_IMPL_ATTRIBUTE} no longer tells a swapped TensorImpl apart")

    base = torch.zeros(4)
    view = base[2:]
    before = version_of(base)
    view.add_(1)
    if version_of(base) == before or version_of(view) != version_of(base):
        problems.append(f"Tensor.{_VERSION_ATTRIBUTE} no longer counts in-place writes through a view")

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    if not is_scheduler_wrapper(optimizer.step):
        problems.append(f"LR schedulers no longer mark their step wrapper with {_SCHEDULER_MARK}")
    optimizer.step()
    if getattr(optimizer, _SCHEDULER_FLAG, None) is not True:
        problems.append(f"LR schedulers no longer record a step in optimizer.{_SCHEDULER_FLAG}")
    return problems
