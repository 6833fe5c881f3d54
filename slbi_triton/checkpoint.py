"""Loading a state dict: validation before anything changes, the merge of param groups
(also from a ``torch.optim.SGD`` state dict), and the state kept exactly as saved.

``SLBI.load_state_dict`` runs torch's loader, so its hooks run as for any optimizer; this
module plans the load (a load-state-dict pre-hook) and finishes it (a post-hook).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .channel_ids import channel_ids_of, check_channel_ids
from .pruning import Pruner
from .toolbox import ORDER_STATE_KEYS, Toolbox, as_epochs, order_shape
from .validation import check_group_penalty, check_hyperparameters, check_loaded_state

# (group penalty, parameter index) -> the penalty the optimizer gives that parameter.
PenaltyOf = Callable[[str, int, bool], str]

# Options of a torch.optim.SGD param group that SLBI has no use for: not loaded.
SGD_ONLY_KEYS = ("nesterov", "maximize", "foreach", "differentiable", "fused")
# The keys that tell whose a saved param group is: SLBI's own, or torch.optim.SGD's (every
# SGD param group has them; Adam's, RMSprop's, ... lack at least one).
SLBI_GROUP_KEYS = ("kappa", "mu", "lam", "penalty")
SGD_GROUP_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
# Kept in the dtype they were saved in: torch's loader would cast them to the parameter's
# (Z and v of bfloat16 state, float64 norms, int64 entry epochs); binding copies them
# into the buffers, and exact values keep a resume bit-exact.
EXACT_STATE_KEYS = ("z", "momentum_buffer", "group_norms", *ORDER_STATE_KEYS)


@dataclass
class LoadPlan:
    """A validated state dict, split between torch's loader and SLBI's own state.

    Attributes:
        for_torch: what torch's loader gets: the merged param groups, and the state it
            may cast.
        exact: per parameter, the state tensors to restore as saved.
        extras: ``state_dict["slbi"]`` (empty for a torch.optim state dict).
        params: saved parameter index -> parameter.
    """

    for_torch: dict[str, Any]
    exact: dict[Tensor, dict[str, Tensor]]
    extras: Mapping[str, Any]
    params: dict[Any, Tensor]

    def restore_exact(self, state: Mapping[Tensor, dict[str, Any]]) -> None:
        """Put the exact state into ``state`` (moved to each parameter's device)."""
        for param, values in self.exact.items():
            for key, value in values.items():
                value = value.to(param.device)
                state[param][key] = as_epochs(value) if key == "entry_epoch" else value


def plan_load(state_dict: Any, param_groups: Sequence[Mapping[str, Any]], penalty_of: PenaltyOf) -> LoadPlan:
    """Validate ``state_dict`` against ``param_groups`` and split it (raises
    ``TypeError``/``ValueError`` naming what is wrong; changes nothing)."""
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= state_dict.keys():
        raise TypeError("state_dict must be a mapping with 'state' and 'param_groups' (opt.state_dict())")
    merged_groups, targets = merge_groups(list(state_dict["param_groups"]), param_groups, penalty_of)
    state: dict[Any, Any] = {}
    exact: dict[Tensor, dict[str, Tensor]] = {}
    for key, entry in state_dict["state"].items():
        if key not in targets:
            state[key] = entry
            continue
        param, penalty = targets[key]
        entry = {k: v for k, v in entry.items() if v is not None}  # SGD may store None
        check_loaded_state(entry, param, state_shapes(param, penalty), f"state of parameter {key}")
        exact[param] = {k: entry.pop(k) for k in EXACT_STATE_KEYS if k in entry}
        state[key] = entry
    params = {key: param for key, (param, _) in targets.items()}
    extras = state_dict.get("slbi") or {}
    if not isinstance(extras, Mapping):
        raise TypeError(f"state_dict['slbi'] must be a dict, got {type(extras).__name__}")
    _check_scalars(extras)
    Pruner.check_state(extras, params)
    Toolbox.check_state(extras)
    for_torch = {**state_dict, "state": state, "param_groups": merged_groups}
    return LoadPlan(for_torch, exact, extras, params)


def _check_scalars(extras: Mapping[str, Any]) -> None:
    """``steps`` and ``rng_seed``: ints >= 0; ``current_epoch``: an int or ``None``."""
    for key, allow_none in (("steps", False), ("rng_seed", False), ("current_epoch", True)):
        if key not in extras or (allow_none and extras[key] is None):
            continue
        value = extras[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"state_dict['slbi'][{key!r}] must be an int >= 0, got {value!r}")


def merge_groups(
    saved_groups: list[Mapping[str, Any]], param_groups: Sequence[Mapping[str, Any]], penalty_of: PenaltyOf
) -> tuple[list[dict[str, Any]], dict[Any, tuple[Tensor, str]]]:
    """The loaded param groups merged into ours (validated): saved values win, as in
    torch, and SLBI's own keys missing from an SGD dict stay; for each saved parameter
    index, its parameter and penalty."""
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"the state dict has {len(saved_groups)} param groups, this optimizer has {len(param_groups)}"
        )
    merged_groups = []
    targets: dict[Any, tuple[Tensor, str]] = {}
    position = 0  # the parameter's index in this optimizer
    for index, (saved, current) in enumerate(zip(saved_groups, param_groups, strict=True)):
        where = f"loaded param group {index}"
        _check_origin(saved, where)
        for flag in ("nesterov", "maximize"):
            if saved.get(flag, False):
                raise ValueError(f"{where} has {flag}=True, which SLBI does not implement")
        if len(saved["params"]) != len(current["params"]):
            raise ValueError(
                f"{where} has {len(saved['params'])} parameters, but param group {index} of this "
                f"optimizer has {len(current['params'])}"
            )
        merged = {k: v for k, v in current.items() if k not in ("params", "param_names")}
        merged.update({k: v for k, v in saved.items() if k not in SGD_ONLY_KEYS})
        check_hyperparameters(merged, where)
        if isinstance(merged.get("channel_ids"), (list, tuple)):  # map_location may have moved them
            merged["channel_ids"] = [t.cpu() if isinstance(t, Tensor) else t for t in merged["channel_ids"]]
        check_channel_ids(current["params"], merged.get("channel_ids"), where, current.get("param_names"),
                          merged.get("channel_followers"))
        coupled = [ids is not None for ids in channel_ids_of({**merged, "params": current["params"]})]
        check_group_penalty(merged["penalty"], current["params"], where, coupled=coupled)
        merged_groups.append(merged)
        for key, param, has_ids in zip(saved["params"], current["params"], coupled, strict=True):
            targets[key] = (param, penalty_of(merged["penalty"], position, has_ids))
            position += 1
    return merged_groups, targets


def _check_origin(saved: Mapping[str, Any], where: str) -> None:
    """Refuse a param group of another optimizer than SLBI or ``torch.optim.SGD`` (Adam's
    lr, betas and moments would otherwise be taken in, or silently dropped)."""
    if not isinstance(saved, Mapping) or "params" not in saved:
        raise TypeError(f"{where} must be a dict with 'params' (opt.state_dict()['param_groups'])")
    if all(key in saved for key in SLBI_GROUP_KEYS) or all(key in saved for key in SGD_GROUP_KEYS):
        return
    missing = [key for key in SGD_GROUP_KEYS if key not in saved]
    raise ValueError(
        f"{where} is neither SLBI's nor torch.optim.SGD's (it lacks {missing}; its keys are "
        f"{sorted(k for k in saved if k != 'params')}): SLBI loads its own state dicts and, to switch "
        "a run over, torch.optim.SGD's. Another optimizer's state has no meaning here: build SLBI "
        "with the hyper-parameters you want and keep the model's weights"
    )


def state_shapes(param: Tensor, penalty: str) -> dict[str, tuple[int, ...]]:
    """The shape of each state tensor of ``param`` under ``penalty``."""
    shapes = {"z": tuple(param.shape), "momentum_buffer": tuple(param.shape)}
    if penalty == "group":
        shapes["group_norms"] = (param.shape[0],)
    if penalty != "none":
        shapes.update(dict.fromkeys(ORDER_STATE_KEYS, order_shape(param, penalty)))
    return shapes


class OwnHooks:
    """The optimizer's own state-dict hooks, registered anew before each use so that they
    run first (post-hooks: the user's see the finished dict or optimizer) or last
    (pre-hooks: the user's see the dict as given)."""

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}

    def first(self, key: str, register: Callable[..., Any], hook: Callable[..., Any]) -> None:
        self._remove(key)
        self._handles[key] = register(hook, prepend=True)

    def last(self, key: str, register: Callable[..., Any], hook: Callable[..., Any]) -> None:
        self._remove(key)
        self._handles[key] = register(hook)

    def _remove(self, key: str) -> None:
        handle = self._handles.pop(key, None)
        if handle is not None:
            handle.remove()
