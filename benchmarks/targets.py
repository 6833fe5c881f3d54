"""The performance targets of the issues, evaluated on benchmark rows: PASS, FAIL or N/A
(not measured). They are reported, never asserted (``report --fail-on-target`` asserts).

- CPU (issue 5): the default SLBI within 1.2 × the fastest SGD on ResNet-18/50, and 5 ×
  faster than the paper's per-parameter loop;
- CPU (issue 14): ``SLBI(state_dtype=torch.bfloat16)`` within 1.1 × ``SGD(fused=True)`` on
  ResNet-18/50, its state no more than SGD's momentum + O(tensors + filters);
- GPU: the default SLBI at ≥ 80 % of the copy floor and within 1.5 × ``SGD(fused=True)``
  on ResNet-50, one launch count for every set;
- memory, every device: SLBI's state = SGD's momentum + one parameter-sized Z + O(filters),
  no parameter-sized temporary inside ``step()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from benchmarks.contenders import FAMILY_SGD

if TYPE_CHECKING:
    from benchmarks.harness import Row

RESNETS = ("resnet18", "resnet50")


@dataclass
class Target:
    """One performance target: what was measured, the bar, PASS/FAIL (None: not measured)."""

    name: str
    measured: str
    threshold: str
    passed: bool | None

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "N/A"}[self.passed]


def find(rows: Sequence[Row], set_label: str, contender: str) -> Row | None:
    """The error-free row of ``contender`` on ``set_label``, if any."""
    matches = (r for r in rows if r.set == set_label and r.contender == contender and r.error is None)
    return next(matches, None)


def state_overhead_bound(tensors: int, groups: int) -> int:
    """O(tensors + filters) allowance on top of the expected state: per tensor, the flat
    buffers' alignment padding (≤ 64 bytes in each of W, g, Z and v) plus a table row (64
    bytes); per filter a float32 norm (and as much spare); 64 KiB for fixed tables."""
    return 320 * tensors + 8 * groups + (64 << 10)


def state_within_bound(slbi: Row, sgd_state: int) -> tuple[bool, int]:
    """Whether SLBI's state is SGD's momentum + one param-sized Z + O(filters); returns
    the check and the bytes beyond ``sgd_state + param_bytes``."""
    extra = slbi.state_bytes - sgd_state
    beyond = extra - slbi.param_bytes
    ok = extra >= slbi.penalised_bytes and beyond <= state_overhead_bound(slbi.tensors, slbi.groups)
    return ok, beyond


def peak_within_bound(row: Row) -> bool:
    """No parameter-sized temporary: peak extra memory ≤ 1% of the parameter bytes + 64 KiB."""
    return row.peak_extra_bytes is not None and row.peak_extra_bytes <= row.param_bytes // 100 + (64 << 10)


def _ratio_target(name: str, value: float | None, bar: float, at_most: bool = True) -> Target:
    passed = None if value is None else (value <= bar if at_most else value >= bar)
    measured = f"{value:.2f}x" if value is not None else "not run"
    return Target(name, measured, f"{'<=' if at_most else '>='} {bar:.2f}x", passed)


def cpu_targets(rows: Sequence[Row], default: str) -> list[Target]:
    """Issue 5's CPU targets for the default SLBI contender."""
    targets = []
    for label in RESNETS:
        row = find(rows, label, default)
        targets.append(_ratio_target(f"CPU {default} step vs fastest SGD ({label})",
                                     row.ratio_to_sgd if row else None, 1.2))
    for label in RESNETS:
        row = find(rows, label, default)
        targets.append(_ratio_target(f"CPU {default} speed-up over PaperSLBI ({label})",
                                     row.paper_speedup if row else None, 5.0, at_most=False))
    return targets


def bf16_state_targets(rows: Sequence[Row]) -> list[Target]:
    """Issue 14: bfloat16 state within 1.1 × fused SGD, state ≤ its momentum + O(filters)."""
    targets = []
    for label in RESNETS:
        row = find(rows, label, "slbi-bf16")
        targets.append(_ratio_target(f"slbi-bf16 step vs SGD(fused=True) ({label})",
                                     row.ratio_to_fused if row else None, 1.1))
    for label in RESNETS:
        row, fused = find(rows, label, "slbi-bf16"), find(rows, label, "sgd-fused")
        beyond = None if row is None or fused is None else row.state_bytes - fused.state_bytes
        bound = None if row is None else state_overhead_bound(row.tensors, row.groups)
        targets.append(Target(
            f"slbi-bf16 state vs SGD(fused=True) momentum ({label})",
            f"{beyond / 1024:+.1f} KiB" if beyond is not None else "not run",
            f"<= {bound / 1024:.0f} KiB (320 B/tensor + 8 B/filter + 64 KiB)" if bound is not None else "-",
            None if beyond is None else beyond <= bound,
        ))
    return targets


def gpu_targets(rows: Sequence[Row], default: str) -> list[Target]:
    """The GPU targets for the default SLBI contender."""
    row = find(rows, "resnet50", default)
    share = row.floor_share if row else None
    targets = [Target(
        f"GPU {default} bandwidth, share of copy floor (resnet50)",
        f"{100 * share:.1f}%" if share is not None else "not run", ">= 80%",
        None if share is None else share >= 0.8,
    )]
    targets.append(_ratio_target(f"GPU {default} step vs SGD(fused=True) (resnet50)",
                                 row.ratio_to_fused if row else None, 1.5))
    fp32_rows = [r for r in rows if r.contender == default and r.error is None and "@" not in r.set]
    counts = sorted({r.dispatches for r in fp32_rows if r.dispatches is not None})
    targets.append(Target(
        f"GPU {default} launches per step constant over sets and sweep",
        f"{counts[0]}..{counts[-1]} over {len(fp32_rows)} sets" if counts else "not measured",
        "min == max", None if not counts else counts[0] == counts[-1],
    ))
    return targets


def memory_targets(rows: Sequence[Row], default: str) -> list[Target]:
    """State and peak-memory targets of the default SLBI contender, on every device."""
    verdicts, worst = [], None
    for row in (r for r in rows if r.contender == default and r.error is None):
        sgd = [r.state_bytes for r in rows if r.set == row.set and r.family == FAMILY_SGD and r.error is None]
        if not sgd:
            continue
        ok, beyond = state_within_bound(row, min(sgd))
        verdicts.append(ok)
        if worst is None or beyond > worst[0]:
            worst = (beyond, row.set)
    targets = [Target(
        "state = SGD momentum + one param-sized Z + O(filters), all sets",
        f"max {worst[0] / 1024:.1f} KiB beyond ({worst[1]})" if worst else "not run",
        "<= 320 B/tensor + 8 B/filter + 64 KiB", all(verdicts) if verdicts else None,
    )]
    for label in RESNETS:
        row = find(rows, label, default)
        peak = row.peak_extra_bytes if row else None
        targets.append(Target(
            f"no param-sized temporary in step() ({label})",
            f"peak +{peak / 2**20:.2f} MiB ({100 * peak / row.param_bytes:.2f}% of params)"
            if row is not None and peak is not None else "not run",
            "<= 1% of params + 64 KiB", None if row is None or peak is None else peak_within_bound(row),
        ))
    return targets


def evaluate_targets(rows: Sequence[Row], device: torch.device, default: str) -> list[Target]:
    """Every target for ``device``, evaluated on ``rows`` (default SLBI contender ``default``)."""
    if device.type == "cpu":
        targets = cpu_targets(rows, default) + bf16_state_targets(rows)
    else:
        targets = gpu_targets(rows, default)
    return targets + memory_targets(rows, default)
