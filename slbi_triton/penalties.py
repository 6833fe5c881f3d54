"""What ``penalty="auto"`` gives a parameter: :func:`auto_penalty`, the one rule.

A tensor's shape does not say what it is: a ViT class token (1, 1, d) and position
embedding (1, n, d) look like conv weights, an embedding table like a linear weight, and a
``ConvTranspose`` weight is laid out (in, out, k, k), so grouping along dim 0 would group
*input* channels. The rule therefore asks, in this order:

1. **The module that holds the parameter**, where it is known: a ``Conv1d/2d/3d`` weight
   gets ``"group"`` (dim 0 is its output filters); a ``ConvTranspose`` weight ``"l1"``
   (elementwise: its dim 0 is the input channels); a ``Linear`` weight, and the input
   projections of ``MultiheadAttention``, ``"l1"``; anything else (biases, norms,
   embeddings, tokens, ``weight_norm``'s and other parametrizations' tensors) ``"none"``.
   A tensor held by several modules (tied weights) takes the weakest of their penalties.
2. Else **the name** (``named_parameters()``): only a tensor named ``*.weight`` outside
   ``parametrizations.`` is penalised (``"group"`` for ≥3-D, ``"l1"`` for 2-D);
   ``cls_token``, ``pos_embed``, ``weight_g`` ... get ``"none"``.
3. Else **the shape**: ≥3-D ``"group"``, 2-D ``"l1"``, except a tensor whose dim 0 is 1
   (one "filter": a token or embedding, which a group penalty would zero whole).

The module is known when the optimizer is given ``model.parameters()`` or
``model.named_parameters()`` (or a param group's ``"params"`` is one of them):
:func:`owners_from` reads the module from the generator before it is consumed, with the
public :func:`inspect.getgeneratorlocals`. A list of tensors carries no module, so steps
2-3 decide; they cannot tell a ``ConvTranspose`` or ``Embedding`` weight named
``*.weight`` from a conv or linear one (give those an explicit penalty).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

# Weakest first: several rules for one tensor (tied weights) agree on the weakest.
_STRENGTH = ("none", "l1", "group")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_MODULE_GENERATORS = (nn.Module.parameters.__code__, nn.Module.named_parameters.__code__)

Owners = Mapping[int, Sequence[nn.Module]]


def auto_penalty(param: Tensor, name: str | None = None, owners: Iterable[nn.Module] = ()) -> str:
    """The penalty ``"auto"`` gives ``param`` (see the module docstring for the rule).

    Args:
        param: the parameter.
        name: its name in ``named_parameters()``, if known.
        owners: the modules that hold ``param`` directly (``module.<attribute>``), if
            known; they decide, and the name and shape only when none of them holds it.
    """
    if param.numel() == 0 or param.dim() < 2:
        return "none"
    by_module = module_penalty(param, owners)
    if by_module is not None:
        return by_module
    if name is not None:
        parts = name.split(".")
        if parts[-1] != "weight" or "parametrizations" in parts:
            return "none"
    elif param.shape[0] == 1:
        return "none"
    return "group" if param.dim() >= 3 else "l1"


def module_penalty(param: Tensor, owners: Iterable[nn.Module]) -> str | None:
    """Step 1 of the rule alone: the weakest penalty the modules that hold ``param`` give
    it; ``None`` when none of ``owners`` holds it."""
    found = [penalty for module in owners if (penalty := _by_module(module, param)) is not None]
    return min(found, key=_STRENGTH.index) if found else None


def _by_module(module: nn.Module, param: Tensor) -> str | None:
    """The penalty ``module``'s kind gives ``param``; ``None`` if it does not hold it."""
    held = module.named_parameters(recurse=False, remove_duplicate=False)
    attribute = next((key for key, value in held if value is param), None)
    if attribute is None:
        return None
    if attribute == "weight" and isinstance(module, _CONVS):
        return "group"  # (out, in / groups, *kernel): dim 0 is the output filters
    if attribute == "weight" and isinstance(module, (*_TRANSPOSED_CONVS, nn.Linear)):
        return "l1"  # a ConvTranspose's dim 0 is its input channels: no group along it
    if attribute in _ATTENTION_WEIGHTS and isinstance(module, nn.MultiheadAttention):
        return "l1"
    return "none"


def owners_in(model: nn.Module) -> dict[int, list[nn.Module]]:
    """``id(parameter)`` → the modules of ``model`` that hold it directly."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for _, param in module.named_parameters(recurse=False, remove_duplicate=False):
            holders = owners.setdefault(id(param), [])
            if all(module is not other for other in holders):
                holders.append(module)
    return owners


def owners_from(params: Any) -> dict[int, list[nn.Module]]:
    """The owners (:func:`owners_in`) of the parameters ``params`` will yield, when
    ``params`` is an unstarted ``model.parameters()`` / ``model.named_parameters()``
    generator; ``{}`` for anything else (read without consuming it)."""
    if not inspect.isgenerator(params) or params.gi_code not in _MODULE_GENERATORS:
        return {}
    model = inspect.getgeneratorlocals(params).get("self")
    return owners_in(model) if isinstance(model, nn.Module) else {}


class ModulePenalties:
    """What "auto" means for each parameter of an optimizer whose module was found, by
    position in parameter order (``None``: no module known). Kept by position, so it
    holds no module and survives a replaced Parameter, a copy and a pickle."""

    def __init__(self, by_position: Sequence[str | None] = ()) -> None:
        self.by_position = list(by_position)

    def add(self, params: Iterable[Tensor], owners: Owners) -> None:
        """Append the parameters of a new param group."""
        for param in params:
            self.by_position.append(module_penalty(param, owners.get(id(param), ())))

    def resolve(
        self, penalty: str, param: Tensor, name: str | None, index: int, coupled: bool = False
    ) -> str:
        """The penalty of the parameter at ``index`` in a group with ``penalty`` (with
        ``channel_ids``: ``coupled``, the group penalty by its rows)."""
        if param.numel() == 0:
            return "none"  # nothing to penalise, whatever the group says
        if coupled:
            return "group"
        if penalty != "auto":
            return penalty
        known = self.by_position[index] if index < len(self.by_position) else None
        return known if known is not None else auto_penalty(param, name)
