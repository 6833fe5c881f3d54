"""The optimizer state of the kept entries, as a new SLBI over the slim model.

Everything goes through ``opt.state_dict()`` / ``load_state_dict()``: the new optimizer
has the same param groups and parameter order (so the same indices), and every state
tensor is sliced like its parameter, aligned from the first dim (per-filter tensors such
as ``group_norms`` and a group layer's ``entry_epoch`` index the output filters); the
path history (epochs × filters, or epochs × weights for l1 layers) keeps the kept
columns; keys this module does not know are sliced by the same rule (tensors) or kept.

Γ of the kept groups. A group-penalised filter that loses input columns has a smaller
‖Z_g‖, which would shrink Γ_g = κ·Z_g·(1 − λ/‖Z_g‖) and could push it out of the
support. Its kept part is rescaled by ``c = 1 − λ/‖Z_full‖ + λ/‖Z_kept‖`` when the filter
is in the support (‖Z_full‖ > λ): then Γ of the kept entries is exactly what it was, and
‖c·Z_kept‖ > λ keeps it in the support. Filters outside the support keep Z (their norm
only shrinks, so they stay out); l1 entries are elementwise and need nothing. Z and
momentum are otherwise carried bit for bit, and the saved group norms of untouched
filters too. The new optimizer takes the old one's ``backend``, ``fused`` and ``state_dtype``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..channel_ids import channel_ids_of
from ..optimizer import SLBI
from ..validation import resolve_penalty
from .graph import Removed


def _keep(shape: torch.Size, pairs: list[tuple[int, list[int]]]) -> dict[int, Tensor]:
    """Per shrunk dim, the kept indices."""
    keep = {}
    for dim, indices in pairs:
        mask = torch.ones(shape[dim], dtype=torch.bool)
        mask[indices] = False
        keep[dim] = mask.nonzero().flatten()
    return keep


def _slice(value: Any, shape: torch.Size, keep: dict[int, Tensor]) -> Any:
    """``value`` indexed like a parameter of ``shape``, aligned from the first dim
    (dims of size 1 broadcast and stay); anything else unchanged."""
    if not isinstance(value, Tensor):
        return value
    for dim, index in keep.items():
        if dim < value.dim() and value.shape[dim] == shape[dim]:
            value = value.index_select(dim, index.to(value.device))
    return value


def _rescale_z(z_full: Tensor, z_kept: Tensor, keep_out: Tensor | None, lam: float) -> tuple[Tensor, Tensor]:
    """Z of a group layer that lost input columns, rescaled so that Γ of the kept entries
    stays; also which filters changed."""
    norms_full = z_full.double().flatten(1).norm(dim=1)
    if keep_out is not None:
        norms_full = norms_full[keep_out.to(norms_full.device)]
    norms_kept = z_kept.double().flatten(1).norm(dim=1)
    changed = (norms_full > lam) & (norms_kept > 0)
    factor = torch.where(changed, 1 - lam / norms_full + lam / norms_kept.clamp_min(1e-300), 1.0)
    # A factor of exactly 1 leaves the other filters' Z bit for bit.
    rescaled = (z_kept.double() * factor.view(-1, *([1] * (z_kept.dim() - 1)))).to(z_kept.dtype)
    return rescaled, changed


def _slice_entry(
    entry: Mapping[str, Any], shape: torch.Size, keep: dict[int, Tensor], lam: float | None
) -> dict[str, Any]:
    """One parameter's state; ``lam`` is set for a group-penalised parameter."""
    sliced = {key: _slice(value, shape, keep) for key, value in entry.items()}
    columns_removed = any(dim > 0 for dim in keep)
    if lam is not None and columns_removed and "z" in entry:
        sliced["z"], changed = _rescale_z(entry["z"], sliced["z"], keep.get(0), lam)
        if "group_norms" in sliced:
            fresh = sliced["z"].float().flatten(1).norm(dim=1).to(sliced["group_norms"].dtype)
            sliced["group_norms"] = torch.where(changed, fresh, sliced["group_norms"])
    return sliced


def _slice_path(
    path: Mapping[str, Any], shape: torch.Size, keep: dict[int, Tensor], group: bool
) -> dict[str, Any]:
    """Path history (epochs × filters for group layers, × weights for l1 layers)."""
    if group:
        columns = keep.get(0)
    else:
        flat = torch.arange(shape.numel()).view(shape)
        for dim, index in keep.items():
            flat = flat.index_select(dim, index)
        columns = flat.flatten()
    if columns is None:
        return dict(path)
    return {
        key: value.index_select(1, columns) if key in ("norms", "selected") else value
        for key, value in path.items()
    }


def carry_state(
    opt: SLBI, model: nn.Module, removed: Removed, renames: Mapping[str, str] | None = None
) -> SLBI:
    """A new :class:`SLBI` over ``model`` (the slim model) with ``opt``'s param groups and
    its state sliced to the kept entries, under ``model``'s names (``renames`` maps ``opt``'s
    to them where they differ, e.g. by a wrapper prefix). Saved copies for ``recover()``
    are not carried: the entries they would restore are gone."""
    names = [(renames or {}).get(name, name) for name in opt.names]
    params = dict(model.named_parameters())
    saved = copy.deepcopy(opt.state_dict())  # the live state dict holds views into opt's buffers
    shapes = [param.shape for group in opt.param_groups for param in group["params"]]
    keeps = [_keep(shape, removed.get(name, [])) for name, shape in zip(names, shapes, strict=True)]
    groups, lams, kinds = [], [], {}
    for group in opt.param_groups:
        first, count = len(lams), len(group["params"])
        hyper = {key: value for key, value in group.items() if key not in ("params", "param_names")}
        group_names = names[first : first + count]
        new_group = {**copy.deepcopy(hyper), "params": [(name, params[name]) for name in group_names]}
        ids = channel_ids_of(group)
        if group.get("channel_ids") is not None:  # the kept rows' coupled groups
            new_group["channel_ids"] = [
                None if row_ids is None else _slice(row_ids, shapes[first + i], keeps[first + i])
                for i, row_ids in enumerate(ids)
            ]
        groups.append(new_group)
        # A coupled row's Z is kept as it is: its group's members lose rows only together,
        # so the norm its prox reads, and its Γ, stay (a rescale is for a filter's own norm).
        lams += [None if row_ids is not None else float(group["lam"]) for row_ids in ids]
        for name, param, row_ids in zip(group_names, group["params"], ids, strict=True):
            kinds[name] = resolve_penalty(group["penalty"], param, coupled=row_ids is not None)

    state = {}
    for index, entry in saved["state"].items():
        lam = lams[index] if kinds.get(names[index]) == "group" else None  # None: no rescale
        state[index] = _slice_entry(entry, shapes[index], keeps[index], lam)
    extras = dict(saved.get("slbi") or {})
    extras.pop("snapshot", None)
    if "frozen" in extras:
        extras["frozen"] = {i: _slice(mask, shapes[i], keeps[i]) for i, mask in extras["frozen"].items()}
    if "order_path" in extras:
        position = {name: i for i, name in enumerate(opt.names)}  # the path is keyed by opt's names
        paths = {position[name]: path for name, path in extras["order_path"].items()}
        extras["order_path"] = {
            names[i]: _slice_path(path, shapes[i], keeps[i], kinds.get(names[i]) == "group")
            for i, path in paths.items()
        }
    # The options of the old optimizer too: its kernel family and state dtype.
    new = SLBI(groups, backend=opt.backend, fused=opt.fused, state_dtype=opt.state_dtype)
    for saved_group, group in zip(saved["param_groups"], new.param_groups, strict=True):
        saved_group["param_names"] = group["param_names"]  # torch's loader would take the saved ones
        if "channel_ids" in group:
            saved_group["channel_ids"] = group["channel_ids"]
    new.load_state_dict({**saved, "state": state, "slbi": extras})
    return new
