"""What ``slbi-train`` prints and writes: CSV files, the per-epoch line and the final table."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .records import RunResult, SlimReport

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


def _count(value: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.0f}"


def slim_table(report: SlimReport) -> str:
    """Before / after slimming: parameters, MACs, CPU latency and test accuracy, then
    the filters removed and, after ``--slim-epochs``, the accuracies trained on."""
    before, after = report.before, report.after

    def ratio(key: str) -> str:
        return f"{after[key] / before[key]:.2f}"

    rows = [
        ("parameters", f"{before['params']:,.0f}", f"{after['params']:,.0f}", ratio("params")),
        ("MACs per image", _count(before["macs"]), _count(after["macs"]), ratio("macs")),
        (
            f"CPU latency, batch {report.latency_batch} (median of {report.latency_rounds}, "
            f"{report.threads} thread(s))",
            f"{before['latency_ms']:.2f} ms",
            f"{after['latency_ms']:.2f} ms",
            ratio("latency_ms"),
        ),
        ("test accuracy (before: W*)", _pct(before["test_acc"]), _pct(after["test_acc"]), ""),
    ]
    width = max(len(row[0]) for row in rows)
    lines = [f"{'':{width}}  {'before':>10}  {'after':>10}  {'ratio':>6}"]
    for label, old, new, factor in rows:
        lines.append(f"{label:{width}}  {old:>10}  {new:>10}  {factor:>6}")
    zero = sum(row["zero_in_w_star"] for row in report.layers)
    removed = sum(row["removed"] for row in report.layers)
    line = f"filters and neurons zero in W*: {zero}, removed: {removed}"
    if removed < zero:
        line += (
            f" (the other {zero - removed} write channels that coupled layers still use, carry "
            "constants, or are logits)"
        )
    lines.append(line)
    lines.append(
        f"largest output difference, slim vs W*, on {report.examples} test images: "
        f"{report.difference:.2g} of the logit scale"
    )
    for row in report.trained_on:
        lines.append(
            f"{row['model']} model, {row['epochs']} more epoch(s): test accuracy {_pct(row['test_acc'])} "
            f"(W* {_pct(row['test_acc_w_star'])})"
        )
    return "\n".join(lines)
