"""What a step must move and what an optimizer holds: the bandwidth model and the state.

**Bytes per step** (the traffic of the algorithm, not of an implementation), with the
actual dtypes: SLBI reads W, g, Z, v and writes W, Z, v of a penalised parameter (7
arrays) and reads W, g, v and writes W, v of one with penalty ``"none"`` (5); W and g are
in the parameters' dtype, Z and v in the state dtype (2 bytes each with
``state_dtype=torch.bfloat16``). SGD with momentum moves 5 arrays in the parameters'
dtype. The paper baseline does SLBI's work and is charged SLBI's bytes. At a bandwidth of
B bytes/s no step takes less than bytes / B: the **floor**. The report divides the floor
at the measured copy bandwidth by each measured step time (% of floor).

**State bytes**: every tensor storage the optimizer holds (``opt.state`` and, walked
generically, the objects it owns: SLBI's flat buffers, group norms, tables), each counted
once, plus the storages behind ``param.data`` / ``param.grad``, minus the bytes of the
parameters and gradients themselves. For SGD that is the momentum; for SLBI momentum + Z
+ group norms + small tables + the alignment padding of its flat buffers.

    python -m benchmarks.accounting --bandwidth 4800     # the model of every set at 4.8 TB/s
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from benchmarks.contenders import FAMILY_SGD
from benchmarks.param_sets import PARAM_SETS, ParamShapes, penalty_of
from benchmarks.tables import render

SGD_ARRAYS = 5
"""SGD with momentum: read W, g, v; write W, v."""


@dataclass(frozen=True)
class SetStats:
    """Static figures of a parameter set."""

    tensors: int
    numel: int
    penalised_numel: int
    groups: int
    elem_size: int

    @property
    def param_bytes(self) -> int:
        return self.numel * self.elem_size

    @property
    def penalised_bytes(self) -> int:
        return self.penalised_numel * self.elem_size


def set_stats(shapes: ParamShapes, dtype: torch.dtype = torch.float32) -> SetStats:
    """Tensor count, elements, penalised elements and groups of a parameter set."""
    numels = [math.prod(shape) for _, shape in shapes]
    penalised = sum(n for n, (_, s) in zip(numels, shapes, strict=True) if penalty_of(s) != "none")
    groups = sum(s[0] for _, s in shapes if penalty_of(s) == "group")
    elem = torch.empty((), dtype=dtype).element_size()
    return SetStats(len(shapes), sum(numels), penalised, groups, elem)


def state_elem_size(stats: SetStats, state_dtype: torch.dtype | None) -> int:
    """Bytes of one element of SLBI's Z and v: bfloat16 state applies to 2- and 4-byte
    parameters (float64 ones keep float64)."""
    if state_dtype is None or stats.elem_size == 8:
        return stats.elem_size
    return torch.empty((), dtype=state_dtype).element_size()


def step_bytes(family: str, stats: SetStats, state_dtype: torch.dtype | None = None) -> int:
    """Bytes one step must move (module docstring)."""
    elem = stats.elem_size
    if family == FAMILY_SGD:
        return SGD_ARRAYS * elem * stats.numel
    state = state_elem_size(stats, state_dtype)
    unpenalised = stats.numel - stats.penalised_numel
    # W read and written, g read; Z and v read and written (no Z with penalty "none").
    return stats.penalised_numel * (3 * elem + 4 * state) + unpenalised * (3 * elem + 2 * state)


def floor_seconds(nbytes: int, bandwidth: float) -> float:
    """The shortest time ``nbytes`` can move in at ``bandwidth`` bytes/s."""
    return nbytes / bandwidth


def _collect_storages(obj: Any, found: dict[tuple[str, int], int], seen: set[int], depth: int) -> None:
    """Record ``(device, data_ptr) → nbytes`` of every tensor storage reachable from ``obj``."""
    if depth < 0 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta":
            storage = obj.untyped_storage()
            found[(str(obj.device), storage.data_ptr())] = storage.nbytes()
        return
    if isinstance(obj, dict):
        for value in obj.values():
            _collect_storages(value, found, seen, depth - 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            _collect_storages(value, found, seen, depth - 1)
    elif type(obj).__module__.startswith(("slbi_triton", "benchmarks")) and hasattr(obj, "__dict__"):
        _collect_storages(vars(obj), found, seen, depth - 1)


def state_bytes(opt: Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Bytes the optimizer holds beyond the parameters and gradients themselves (module
    docstring); flat-buffer padding counts as state."""
    params = list(params)
    found: dict[tuple[str, int], int] = {}
    seen: set[int] = set()
    _collect_storages(dict(opt.state), found, seen, depth=3)
    owned = {k: v for k, v in vars(opt).items() if k not in ("state", "param_groups", "defaults")}
    _collect_storages(owned, found, seen, depth=6)
    logical = 0
    for param in params:
        for tensor in (param.detach(), param.grad):
            if tensor is None:
                continue
            storage = tensor.untyped_storage()
            found[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
            logical += tensor.numel() * tensor.element_size()
    return sum(found.values()) - logical


MODEL_KINDS = (("SLBI", "slbi", None), ("SLBI bf16 state", "slbi", torch.bfloat16), ("SGD", FAMILY_SGD, None))


def model_table(names: Sequence[str], bandwidth: float, dtype: torch.dtype = torch.float32) -> str:
    """Bytes per step and floor time of each set at ``bandwidth`` bytes/s."""
    header = ["set", "params"]
    header += [f"{kind} {what}" for kind, _, _ in MODEL_KINDS for what in ("MB", "floor us")]
    lines = []
    for name in names:
        stats = set_stats(PARAM_SETS[name](), dtype)
        cells = [name, f"{stats.numel / 1e6:.2f}M"]
        for _, family, state_dtype in MODEL_KINDS:
            nbytes = step_bytes(family, stats, state_dtype)
            cells += [f"{nbytes / 1e6:.1f}", f"{1e6 * floor_seconds(nbytes, bandwidth):.1f}"]
        lines.append(cells)
    return render(header, lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accounting", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidth", type=float, default=4800.0, help="GB/s (default 4800: H200 HBM3e)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    print(f"# bytes per step and floor at {args.bandwidth:.0f} GB/s, {args.dtype} parameters")
    print(model_table(list(PARAM_SETS), args.bandwidth * 1e9, getattr(torch, args.dtype)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
