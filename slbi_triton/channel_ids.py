"""The param-group key ``"channel_ids"``: coupled channel groups (``docs/design.md``,
"Coupled channel groups"), read and checked at the door.

``channel_ids`` is a list parallel to a group's ``"params"``: per parameter ``None``, or
an int64 CPU tensor with one id per row (dim 0); rows of one param group sharing an id
``>= 0`` shrink together, ``-1`` couples nothing. ``FlatBucket`` builds the kernels'
tables from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .kernels import abi


def channel_ids_of(group: Mapping[str, Any]) -> list[Tensor | None]:
    """A param group's ``"channel_ids"``, one entry per parameter (``None``: no coupling)."""
    ids = group.get("channel_ids")
    return [None] * len(group["params"]) if ids is None else list(ids)


def followers_of(group: Mapping[str, Any]) -> list[bool]:
    """A param group's ``"channel_followers"``, one bool per parameter (default: none
    follows): a follower's rows shrink with their coupled group without counting in its
    norm (``docs/design.md``, "Which rows form a coupled group")."""
    follows = group.get("channel_followers")
    return [False] * len(group["params"]) if follows is None else [bool(f) for f in follows]


def _check_parallel(value: Any, key: str, what: str, params: Sequence[Tensor], where: str) -> None:
    """A param-group key's value is ``what`` (a sequence) with one entry per parameter."""
    if isinstance(value, (Tensor, str)) or not isinstance(value, Sequence):
        raise TypeError(f"{key} ({where}) must be {what} parallel to params, got {type(value).__name__}")
    if len(value) != len(params):
        raise ValueError(f"{key} ({where}) has {len(value)} entries for {len(params)} parameters")


def check_followers(params: Sequence[Tensor], channel_ids: Any, followers: Any, where: str) -> None:
    """``"channel_followers"`` (``None``: none): a list of bools parallel to ``params``;
    a follower has ``channel_ids``."""
    if followers is None:
        return
    _check_parallel(followers, "channel_followers", "a list of bools", params, where)
    if not all(isinstance(f, bool) for f in followers):
        raise TypeError(f"channel_followers ({where}) must hold bools")
    ids = channel_ids if channel_ids is not None else [None] * len(params)
    lonely = [i for i, (f, i_ids) in enumerate(zip(followers, ids, strict=True)) if f and i_ids is None]
    if lonely:
        raise ValueError(
            f"channel_followers ({where}): parameter {lonely[0]} follows a coupled group but has no "
            "channel_ids"
        )


def check_channel_ids(
    params: Sequence[Tensor], channel_ids: Any, where: str, names: Sequence[str | None] | None = None,
    followers: Any = None,
) -> None:
    """A param group's ``"channel_ids"`` (``None``: no coupling): a list parallel to its
    ``params``, each entry ``None`` or a 1-D int64 CPU tensor of one id per row (dim 0) of
    a parameter with rows, ids ``>= 0`` (a coupled group) or ``-1`` (none); the members
    of one coupled group share a device and dtype (one flat buffer)."""
    check_followers(params, channel_ids, followers, where)
    if channel_ids is None:
        return
    _check_parallel(channel_ids, "channel_ids", "a list", params, where)
    names = names or [None] * len(params)
    owners: dict[int, tuple[str, Tensor]] = {}
    for position, (param, ids, name) in enumerate(zip(params, channel_ids, names, strict=True)):
        if ids is None:
            continue
        label = f"parameter {name!r}" if name is not None else f"parameter {position} of {where}"
        _check_ids_of(param, ids, label)
        for value in set(ids[ids >= 0].tolist()):
            first, other = owners.setdefault(value, (label, param))
            if (other.device, other.dtype) != (param.device, param.dtype):
                raise ValueError(
                    f"channel id {value} ({where}) couples {first} ({other.dtype} on {other.device}) "
                    f"with {label} ({param.dtype} on {param.device}): a coupled group's members share "
                    "one device and dtype"
                )


def _check_ids_of(param: Tensor, ids: Any, label: str) -> None:
    """One parameter's ``channel_ids`` entry (not ``None``)."""
    if param.dim() == 0 or param.numel() == 0:
        raise ValueError(f"channel_ids of {label}: its shape {tuple(param.shape)} has no rows to couple")
    if not isinstance(ids, Tensor) or ids.dtype != torch.int64 or ids.device.type != "cpu" or ids.dim() != 1:
        described = (f"{ids.dtype} tensor of shape {tuple(ids.shape)} on {ids.device}"
                     if isinstance(ids, Tensor) else type(ids).__name__)
        raise TypeError(f"channel_ids of {label} must be None or a 1-D int64 CPU tensor, got {described}")
    if ids.numel() != param.shape[0]:
        raise ValueError(f"channel_ids of {label} has {ids.numel()} ids for its {param.shape[0]} rows "
                         f"(dim 0 of shape {tuple(param.shape)})")
    if bool((ids < -1).any()):
        raise ValueError(f"channel_ids of {label} holds {int(ids.min())}: an id is >= 0 (a coupled "
                         "group) or -1 (no group)")


def held_out_of(group: Mapping[str, Any]) -> Tensor | None:
    """A param group's ``"held_out"``: the channel ids held out of the support, or ``None``."""
    return group.get("held_out")


def coupled_channels(channel_ids: Sequence[Tensor | None], followers: Sequence[bool]) -> Tensor:
    """The ids of a param group that form coupled groups: held by two rows or more, at
    least one of them a member (not a follower); sorted."""
    pairs = zip(channel_ids, followers, strict=True)
    parts = [(ids[ids >= 0], follows) for ids, follows in pairs if ids is not None]
    if not parts:
        return torch.zeros(0, dtype=torch.int64)
    ids = torch.cat([part for part, _ in parts])
    following = torch.cat([torch.full_like(part, follows, dtype=torch.bool) for part, follows in parts])
    values, _, _, shared = abi.group_keys(ids, following)
    return values[shared]


def check_held_out(group: Mapping[str, Any], where: str) -> None:
    """``"held_out"`` (``None``: none): a 1-D int64 CPU tensor of ids of coupled groups of
    the param group (``docs/design.md``, "Held-out groups")."""
    held = held_out_of(group)
    if held is None:
        return
    plain_ids = isinstance(held, Tensor) and held.dtype == torch.int64 and held.device.type == "cpu"
    if not plain_ids or held.dim() != 1:
        described = (f"{held.dtype} tensor of shape {tuple(held.shape)} on {held.device}"
                     if isinstance(held, Tensor) else type(held).__name__)
        raise TypeError(
            f"held_out ({where}) must be None or a 1-D int64 CPU tensor of channel ids, got {described}"
        )
    if held.numel() == 0:
        return
    if group.get("channel_ids") is None:
        raise ValueError(
            f"held_out ({where}): the param group has no channel_ids, so no coupled group to hold out"
        )
    coupled = coupled_channels(channel_ids_of(group), followers_of(group))
    unknown = held[~torch.isin(held, coupled)]
    if unknown.numel():
        raise ValueError(
            f"held_out ({where}) names channel {int(unknown[0])}, which is not a coupled group of the "
            "param group (an id of two rows or more, one of them not a follower)"
        )
