"""Parameter names as the toolbox and ``slim`` match them: wrapper prefixes and tied weights.

Wrappers add their own module to every parameter name: ``DistributedDataParallel`` and
``DataParallel`` put ``module.`` in front, ``torch.compile`` ``_orig_mod.`` (in front, or
at the module it compiled), FSDP ``_fsdp_wrapped_module.`` and activation checkpointing
``_checkpoint_wrapped_module.`` at each module they wrap. Two names that differ only by
these are the same parameter (:func:`unwrapped`).

A tied weight (``head.weight = emb.weight``) is one tensor under two names;
``named_parameters()`` lists it once, under its first name, and
``named_parameters(remove_duplicate=False)`` under each: :func:`drop_tied` keeps the
first and remembers the others as aliases.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["WRAPPER_COMPONENTS", "drop_tied", "module_path", "unwrap_model", "unwrapped"]

WRAPPER_COMPONENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
"""Name components that wrappers insert at any depth (``module.`` is dropped in front only)."""


def unwrapped(name: str) -> str:
    """``name`` without wrapper components: ``module._orig_mod.conv.weight`` → ``conv.weight``."""
    parts = [part for part in name.split(".") if part not in WRAPPER_COMPONENTS]
    # DDP's "module." only ever comes first; a leaf called "module" stays.
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def module_path(name: str) -> str:
    """The module part of a parameter name, unwrapped: ``module.head.weight`` → ``head``."""
    return unwrapped(name).rpartition(".")[0]


def unwrap_model(model: Any) -> Any:
    """The user's module inside ``DistributedDataParallel``, ``DataParallel`` and
    ``torch.compile`` wrappers (any nesting); anything else as it is."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(model, nn.Module) and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def _named(item: Any) -> bool:
    pair = isinstance(item, tuple) and len(item) == 2
    return pair and isinstance(item[0], str) and isinstance(item[1], Tensor)


def drop_tied(items: list[Any]) -> tuple[list[Any], dict[str, int]]:
    """A param group's parameters with each tensor once: a ``(name, tensor)`` whose tensor
    came earlier under another name (a tied weight) is dropped.

    Returns:
        The kept items, and ``{dropped name: position of its tensor in the kept items}``.
    """
    kept: list[Any] = []
    aliases: dict[str, int] = {}
    first: dict[int, tuple[str, int]] = {}  # id(tensor) -> (its first name, position)
    for item in items:
        if _named(item):
            name, tensor = item
            seen = first.get(id(tensor))
            if seen is not None and seen[0] != name:
                aliases[name] = seen[1]
                continue
            first.setdefault(id(tensor), (name, len(kept)))
        kept.append(item)
    return kept, aliases
