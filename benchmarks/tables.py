"""Text and Markdown tables of benchmark rows, the floor model and the targets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.harness import Row, TrainRow
    from benchmarks.targets import Target


def fmt_bytes(n: float | None) -> str:
    """``1536`` → ``"1.5KiB"``; ``-`` for missing values."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{sign}{n / scale:.1f}{unit}"
    return f"{sign}{int(n)}B"


def fmt_time(s: float | None) -> str:
    """Seconds as ``s``, ``ms`` or ``us``; ``-`` for missing values."""
    if s is None or not math.isfinite(s):
        return "-"
    if s >= 1:
        return f"{s:.2f}s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f}ms"
    return f"{s * 1e6:.0f}us"


def _fmt_count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def _pct(share: float | None) -> str:
    return _opt(None if share is None else 100 * share, ".0f")


STEP_COLUMNS = ("set", "params", "contender", "kernel", "x fastest SGD", "x fused SGD", "paper/x", "median",
                "1st step", "2nd step", "bytes/step", "floor", "% floor", "state", "state-SGD", "peak extra",
                "dispatches")


def _step_cells(r: Row) -> list[str]:
    if r.error is not None and not math.isfinite(r.median_s):
        return [r.set, _fmt_count(r.numel), r.contender, "-", "ERROR", r.error[:60]] + [""] * 11
    return [
        r.set, _fmt_count(r.numel), r.contender, r.kernel or "-",
        _opt(r.ratio_to_sgd, ".2f"), _opt(r.ratio_to_fused, ".2f"), _opt(r.paper_speedup, ".2f"),
        fmt_time(r.median_s), fmt_time(r.first_step_s), fmt_time(r.second_step_s),
        fmt_bytes(r.step_bytes), fmt_time(r.floor_s), _pct(r.floor_share),
        fmt_bytes(r.state_bytes), fmt_bytes(r.state_vs_sgd), fmt_bytes(r.peak_extra_bytes),
        "-" if r.dispatches is None else str(r.dispatches),
    ]


def step_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """The per-(set, contender) table."""
    return render(STEP_COLUMNS, [_step_cells(r) for r in rows], markdown)


FLOOR_COLUMNS = ("set", "contender", "bytes/step", "floor", "median", "% of floor")


def floor_table(rows: Sequence[Row], contenders: Sequence[str], markdown: bool = False) -> str:
    """The bandwidth model next to the measurement: bytes a step must move, the floor time
    at the copy bandwidth, the median step, and floor / median."""
    lines = [
        [r.set, r.contender, fmt_bytes(r.step_bytes), fmt_time(r.floor_s), fmt_time(r.median_s),
         _pct(r.floor_share)]
        for name in contenders for r in rows if r.contender == name and r.error is None
    ]
    order = {label: i for i, label in enumerate(dict.fromkeys(r.set for r in rows))}
    lines.sort(key=lambda cells: order[cells[0]])
    return render(FLOOR_COLUMNS, lines, markdown)


TRAIN_COLUMNS = ("model", "batch", "contender", "overhead vs SGD", "median iter", "first iter", "loss")


def train_table(rows: Sequence[TrainRow], markdown: bool = False) -> str:
    """The end-to-end training-iteration table."""
    lines = [
        [r.model, str(r.batch), r.contender,
         "-" if r.overhead_pct is None else f"{r.overhead_pct:+.1f}%",
         fmt_time(r.median_s), fmt_time(r.first_iter_s), _opt(r.final_loss, ".3f")]
        for r in rows
    ]
    return render(TRAIN_COLUMNS, lines, markdown)


def target_table(targets: Sequence[Target], markdown: bool = False) -> str:
    """Each target with its measured value and verdict."""
    lines = [[t.name, t.measured, t.threshold, t.verdict] for t in targets]
    return render(("target", "measured", "required", "verdict"), lines, markdown)


def render(header: Sequence[str], lines: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """Aligned text columns, or a Markdown table."""
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)] if lines else [
        len(h) for h in header]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*cells) for cells in lines]
    return "\n".join(line.rstrip() for line in out)
