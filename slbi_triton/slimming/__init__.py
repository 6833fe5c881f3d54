"""Physical slimming of SLBI-trained networks: the filters and neurons SLBI zeroes are
removed, the model's function and the optimizer state are kept.

    result = slbi_triton.slim(model, opt, example_inputs)               # remove="w_star"
    result.model       # a smaller nn.Module: eval outputs equal the W* model's (≤ 1e-5 relative)
    result.optimizer   # a new SLBI over it: W, Z, momentum, order, path, frozen masks carried
    result.removed     # {parameter name: [(dim, removed indices), ...]}

``remove="w_star"`` removes what ``W* = W ⊙ 1[Γ ≠ 0]`` zeroes (filters and neurons
outside the support, and pruned ones); ``remove="pruned"`` only output filters / neurons
whose weights are all zero, which is what ``prune_layer`` leaves. The slim model holds
``W*`` (or ``W``) of the kept entries.

Torch-Pruning's ``DependencyGraph`` (the optional extra ``pip install slbi-triton[slim]``)
traces the model, finds the coupled channels and slices the layers. The glue here
(:mod:`.graph`, :mod:`.router`, :mod:`.fold`, :mod:`.state`, :mod:`.check`) adds what it
lacks for this use:

- a channel tied across layers (residual adds, concatenations) is removed only when every
  layer that writes it has a zero filter there: the intersection, never the union;
- the constant a removed channel leaves downstream (a BatchNorm shift or a bias through
  ReLU) is measured on the masked model and folded into the consumers (:mod:`.fold`);
- parameter-free modules that move channels (channel routers, such as ResNet's option-A
  shortcut) get a pruner that follows their channel map (:mod:`.router`);
- the optimizer state follows the kept entries, with Γ of the kept groups unchanged
  (:mod:`.state`);
- the slim model is always checked against the masked one on ``example_inputs``, and
  a masked model whose output no longer depends on its input (a layer with every output
  channel zero cuts every path) is refused first (:func:`.check.check_not_cut`);
- names are matched up to wrapper prefixes (:mod:`slbi_triton.names`), and DDP /
  ``torch.compile`` wrappers are looked through.

``removed`` has one ``(dim, indices)`` pair per dim that shrank, in dim order: a conv
weight that lost output filters and input channels has ``[(0, [...]), (1, [...])]``.
It is plain ints and lists, so the slim model saves as ``{"model": state_dict,
"removed": removed}`` and loads with ``torch.load(weights_only=True)``: :func:`rebuild`
applies the removals to a fresh instance of the original architecture.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..names import unwrap_model, unwrapped
from ..optimizer import SLBI
from .check import TOLERANCE, SlimError, as_inputs, check_not_cut, compare


def __getattr__(name: str) -> Any:
    """``RouterPruner`` and ``couple_routers`` (:mod:`.router`), imported on first use:
    they need Torch-Pruning, an optional extra."""
    if name in ("RouterPruner", "couple_routers"):
        from . import router

        return getattr(router, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "REMOVE_MODES", "TOLERANCE", "RouterPruner", "SlimError", "SlimResult", "couple_routers", "rebuild",
    "slim",
]

logger = logging.getLogger(__name__)

REMOVE_MODES = ("w_star", "pruned")
"""Accepted values of ``slim(..., remove=...)``."""


def _graph() -> Any:
    """The Torch-Pruning glue, imported on first use (Torch-Pruning is an optional extra)."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "slbi_triton.slim() needs Torch-Pruning (torch-pruning>=1.6,<1.7): pip install slbi-triton[slim]"
        ) from exc
    from . import graph

    return graph


@dataclass
class SlimResult:
    """What :func:`slim` returns.

    Attributes:
        model: the physically smaller model (a new module; the input model is untouched).
        optimizer: a new :class:`SLBI` over ``model`` with the kept entries' state.
        removed: ``{parameter name: [(dim, removed indices), ...]}`` for every parameter
            whose shape changed.
        difference: the largest difference between slim and masked outputs on the example
            inputs, relative to the masked outputs' scale.
    """

    model: nn.Module
    optimizer: SLBI
    removed: dict[str, list[tuple[int, list[int]]]]
    difference: float


def _check_pair(model: Any, opt: Any) -> dict[str, str]:
    """``{optimizer's name: model's name}`` of every parameter: the same tensor, under the
    same name up to wrapper prefixes (an optimizer built over ``ddp.named_parameters()``
    or a ``torch.compile``'d model's has ``module.`` / ``_orig_mod.`` in front)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(opt, SLBI):
        raise TypeError(f"opt must be an SLBI optimizer, got {type(opt).__name__}")
    own = {id(param): name for name, param in model.named_parameters()}
    opt_params = [param for group in opt.param_groups for param in group["params"]]
    names = {}
    for name, param in zip(opt.names, opt_params, strict=True):
        model_name = own.get(id(param))
        if model_name is None or unwrapped(model_name) != unwrapped(name):
            raise ValueError(
                f"the optimizer's parameter {name!r} is not the model's parameter of that name; build the "
                "optimizer over this model's named_parameters()"
            )
        names[name] = model_name
    return names


@torch.no_grad()
def _masked(model: nn.Module, opt: SLBI, remove: str, names: Mapping[str, str]) -> nn.Module:
    """A copy of ``model`` with W* (``"w_star"``) or as it is (``"pruned"``); ``names``
    maps the optimizer's names to the model's."""
    masked = copy.deepcopy(model)
    masked.zero_grad(set_to_none=True)
    if remove == "w_star":
        params = dict(masked.named_parameters())
        for name in opt.names:
            params[names[name]].copy_(opt.w_star(name))
    return masked


def slim(model: nn.Module, opt: SLBI, example_inputs: Any, remove: str = "w_star") -> SlimResult:
    """Remove the filters and neurons that ``W*`` (or pruning) zeroes, physically.

    Args:
        model: the trained model; it and ``opt`` are not changed. A
            ``DistributedDataParallel``, ``DataParallel`` or ``torch.compile`` wrapper is
            looked through: the result is the slim inner module.
        opt: the :class:`SLBI` optimizer built over ``model.named_parameters()`` (or
            the wrapper's: names are matched up to wrapper prefixes).
        example_inputs: a tensor or a tuple of tensors, ``model(*inputs)``; used to trace
            the model, to measure the constants removed channels leave and to check the
            result (use a few real samples).
        remove: ``"w_star"`` (default) or ``"pruned"``.

    Returns:
        A :class:`SlimResult`.

    Raises:
        SlimError: every output channel of a layer is zero (``W*`` has an empty support
            there, or ``prune_layer`` took them all) and the model's output no longer
            depends on its input; a removed channel is not constant downstream; or the
            slim model's eval outputs differ from the masked model's by more than
            :data:`TOLERANCE`.
        ImportError: Torch-Pruning is not installed.
    """
    inputs = as_inputs(example_inputs)
    if remove not in REMOVE_MODES:
        raise ValueError(f"remove must be one of {REMOVE_MODES}, got {remove!r}")
    model = unwrap_model(model)
    names = _check_pair(model, opt)
    graph = _graph()
    from . import fold, state

    masked = _masked(model, opt, remove, names)
    check_not_cut(masked, inputs, remove)
    work = copy.deepcopy(masked)
    channels = graph.ChannelGraph(work, inputs)
    candidates = [
        s
        for s in channels.sets
        if s.blocked is None and s.producers and all(_zero_row(member) for member in s.producers)
    ]
    constants, reference = fold.measure(candidates, channels, masked, inputs)
    removed_sets, kept = fold.plan(constants)
    fold.fold(removed_sets, kept, channels)
    sets = [constant.channels for constant in removed_sets]
    removed = channels.record(sets)
    channels.remove(sets)
    difference = compare(work, reference, inputs)
    logger.info(
        "slim: removed %d of %d channel sets (%d zero in every producer; %d kept as carriers or "
        "last channels); largest output difference %.2g",
        len(removed_sets),
        len(channels.sets),
        len(candidates),
        len(kept),
        difference,
    )
    return SlimResult(work, state.carry_state(opt, work, removed, names), removed, difference)


def _zero_row(member: Any) -> bool:
    return not bool(member.module.weight[member.index].any())


def rebuild(model: nn.Module, removed: Mapping[str, Any], example_inputs: Any) -> nn.Module:
    """Apply the removals of a slim model to a fresh instance of its original architecture,
    in place, so that the slim model's state dict loads into it.

    Args:
        model: a new instance of the architecture that was slimmed.
        removed: the slim result's ``removed`` (e.g. read back with ``torch.load``).
        example_inputs: inputs to trace the model with, as for :func:`slim`.

    Returns:
        ``model``, smaller.

    Raises:
        ValueError: ``removed`` does not fit this architecture (checked before any change).
    """
    inputs = as_inputs(example_inputs)
    model = unwrap_model(model)
    own = {unwrapped(name): name for name, _ in model.named_parameters()}
    wanted = _normalised(removed)
    unknown = sorted(name for name in wanted if unwrapped(name) not in own)
    if unknown:
        raise ValueError(f"removed names parameters this model does not have: {unknown}")
    wanted = {own[unwrapped(name)]: pairs for name, pairs in wanted.items()}
    channels = _graph().ChannelGraph(model, inputs)
    cut = {(name, dim): set(indices) for name, pairs in wanted.items() for dim, indices in pairs}
    sets = []
    for channel_set in channels.sets:
        flags = {
            member.index in cut.get((channels.param_name(member.module, "weight"), 0), ())
            for member in channel_set.producers
        }
        if flags == {True, False}:
            raise ValueError("removed cuts coupled filters apart; it was not made for this architecture")
        if True in flags:
            sets.append(channel_set)
    if channels.record(sets) != wanted:
        raise ValueError("removed does not match the channel sets of this architecture")
    channels.remove(sets)
    return model


def _normalised(removed: Mapping[str, Any]) -> dict[str, list[tuple[int, list[int]]]]:
    """``removed`` in :func:`slim`'s form (also from tuples), sorted; TypeError if it is not
    ``{name: [(dim, indices), ...]}``."""
    if not isinstance(removed, Mapping):
        raise TypeError(f"removed must be a dict, got {type(removed).__name__}")
    try:
        return {
            str(name): sorted((int(dim), sorted(int(i) for i in indices)) for dim, indices in pairs)
            for name, pairs in sorted(removed.items())
        }
    except (TypeError, ValueError) as exc:
        raise TypeError("removed must map parameter names to [(dim, [indices, ...]), ...]") from exc
