"""What ``slbi-train`` prints and writes: CSV files, the per-epoch line and the final table."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loop import RunResult

SUMMARY_PRUNE_PERCENTS = (50, 80)
"""Pruning levels shown in the final table."""


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` with the union of their keys as columns (first-seen order); a key a
    row lacks is left empty."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _pct(value: float) -> str:
    return f"{100.0 * value:.2f}%"


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """One line per epoch for the log."""
    line = (
        f"{row['optimizer']:>4} epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4g}  "
        f"loss {row['train_loss']:.4f}  test {_pct(row['test_acc'])}"
    )
    if "test_acc_w_star" in row:
        line += f"  W* {_pct(row['test_acc_w_star'])}  conv filters out {_pct(row['conv_filters_out'])}"
    return line + f"  ({row['seconds']:.1f} s)"


def summary_table(results: Sequence[RunResult], conv_names: Sequence[str], layer: str) -> str:
    """The final table: dense and W* accuracy, conv filters outside the support, accuracy
    after pruning 50 % and 80 % of the filters of every conv layer and of ``layer``
    alone; one column per optimizer."""
    labels = [result.kind.upper() for result in results]
    lines: list[tuple[str, list[str]]] = []

    def add(label: str, values: dict[str, str]) -> None:
        lines.append((label, [values.get(kind, "-") for kind in labels]))

    add("test accuracy, dense (final)", {r.kind.upper(): _pct(r.final_accuracy) for r in results})
    add(
        "test accuracy, dense (best, epoch)",
        {r.kind.upper(): f"{_pct(r.best['test_acc'])} ({r.best['epoch']})" for r in results},
    )
    slbi = next((r for r in results if r.kind == "slbi"), None)
    if slbi is not None:
        final = slbi.rows[-1]
        conv_rows = [row for row in slbi.sparsity if row.name in conv_names]
        outside = sum(row.size - row.support for row in conv_rows)
        total = sum(row.size for row in conv_rows)
        add("test accuracy, W* (sparse)", {"SLBI": _pct(final["test_acc_w_star"])})
        add("conv filters outside the support", {"SLBI": f"{_pct(outside / total)} ({outside}/{total})"})
        by_percent = {row["percent"]: row for row in slbi.prune_rows}
        size = next(row.size for row in conv_rows if row.name == layer)
        for percent in SUMMARY_PRUNE_PERCENTS:
            row = by_percent[percent]
            add(
                f"test accuracy, {percent}% of every conv layer pruned",
                {"SLBI": f"{_pct(row['test_acc'])} ({row['conv_filters_pruned']}/{total})"},
            )
        for percent in SUMMARY_PRUNE_PERCENTS:
            row = by_percent[percent]
            add(
                f"test accuracy, {percent}% of {layer} pruned",
                {"SLBI": f"{_pct(row[f'test_acc_{layer}_only'])} ({row[f'{layer}_filters_pruned']}/{size})"},
            )
    add("training time", {r.kind.upper(): f"{r.seconds:.0f} s" for r in results})
    width = max(len(label) for label, _ in lines)
    columns = [max(len(labels[i]), *(len(values[i]) for _, values in lines)) for i in range(len(labels))]
    header = " " * width + "  " + "  ".join(label.rjust(w) for label, w in zip(labels, columns, strict=True))
    body = [
        label.ljust(width) + "  " + "  ".join(v.rjust(w) for v, w in zip(values, columns, strict=True))
        for label, values in lines
    ]
    return "\n".join([header, *body])


