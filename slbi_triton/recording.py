"""The record file of ``SLBI.step(record=True, path=DIR)``: writer, statistics and loader.

The file is ``DIR/slbi_record.jsonl`` (JSON Lines): one JSON object per line, one line per
layer per recorded step, appended to across steps and runs. Every line has the same keys
(:data:`RECORD_COLUMNS`); a key that does not apply to a layer holds ``null``:

- ``step`` (int, 1-based count of ``step()`` calls of this optimizer object), ``epoch``
  (``opt.current_epoch``: int or null), ``layer`` (the parameter's name), ``penalty``
  (``"l1"``, ``"group"`` or ``"none"``), ``numel`` (elements of the parameter);
- ``grad_<stat>``: the raw gradient of this step (null when the parameter received no
  gradient and was skipped); ``weight_<stat>``: the weights after the update;
  ``filter_norm_<stat>``: ‖W_g‖₂ of each output filter or row (group penalty only); each
  ``<stat>`` is one of :data:`STATS`: max, min, mean, median, q25, q75 (percentiles with
  linear interpolation, as ``numpy.percentile``);
- ``support``: weights (l1) or filters (group) with Γ ≠ 0 after the update, ``size``: the
  number of weights or filters, ``residue``: ‖W − Γ‖²/(2μ) (penalised layers only).

Non-finite statistics (a diverging run) are written as Python's :mod:`json` writes them
(``NaN``, ``Infinity``, ``-Infinity``) and read back as floats by :func:`load_records`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["RECORD_COLUMNS", "RECORD_FILENAME", "STATS", "append_records", "load_records", "summary_stats"]

RECORD_FILENAME = "slbi_record.jsonl"
STATS = ("max", "min", "mean", "median", "q25", "q75")
_STAT_COLUMNS = tuple(f"{what}_{stat}" for what in ("grad", "weight", "filter_norm") for stat in STATS)
RECORD_COLUMNS = (
    "step",
    "epoch",
    "layer",
    "penalty",
    "numel",
    *_STAT_COLUMNS,
    "support",
    "size",
    "residue",
)


def summary_stats(values: Tensor) -> Tensor:
    """max, min, mean, median, 25th and 75th percentile of ``values`` (any shape).

    Returns a float64 tensor of shape ``(len(STATS),)`` on ``values``' device, so the
    caller can gather the statistics of many tensors and copy them to the host at once.
    Percentiles interpolate linearly between order statistics (``numpy.percentile``);
    a sort replaces ``torch.quantile``, which refuses tensors of more than 2**24 elements.
    """
    flat = values.detach().reshape(-1)
    if flat.numel() == 0:
        return torch.full((len(STATS),), float("nan"), dtype=torch.float64, device=flat.device)
    # Sorting in float32 (float64 for float64 input) is exact: the order of the values does
    # not depend on the precision they are compared in, and every pick is widened after.
    ordered = torch.sort(flat if flat.dtype == torch.float64 else flat.float()).values.double()
    last = ordered.numel() - 1
    picks = []
    for q in (0.5, 0.25, 0.75):
        position = q * last
        low = int(position)
        high = min(low + 1, last)
        picks.append(ordered[low] + (position - low) * (ordered[high] - ordered[low]))
    return torch.stack([ordered[-1], ordered[0], flat.double().mean(), *picks])


def append_records(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` (dicts keyed by :data:`RECORD_COLUMNS`) to the record file under
    the folder ``path``, creating the folder if needed."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({key: row.get(key) for key in RECORD_COLUMNS}) + "\n" for row in rows)
    with open(folder / RECORD_FILENAME, "a", encoding="utf-8") as handle:
        handle.write(lines)


def load_records(path: str | os.PathLike) -> dict[str, list[Any]]:
    """Load a record file as columns.

    Args:
        path: the folder passed to ``step(record=True, path=...)``, or the record file.

    Returns:
        ``{column: [value of each row]}`` in file order, with the columns of
        :data:`RECORD_COLUMNS` (plus any other key found in the file); a row without a
        key gives ``None`` in that column. An empty file gives ``{}``.

    Example:
        >>> cols = load_records("runs/lenet")
        >>> steps = [s for s, name in zip(cols["step"], cols["layer"]) if name == "conv1.weight"]
    """
    source = Path(path)
    if source.is_dir():
        source = source / RECORD_FILENAME
    if not source.is_file():
        raise FileNotFoundError(f"no record file at {str(source)!r}; record with step(record=True, path=...)")
    rows = []
    with open(source, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}:{number} is not a JSON record: {error}") from error
            if not isinstance(row, dict):
                raise ValueError(f"{source}:{number} is not a JSON object but {type(row).__name__}")
            rows.append(row)
    columns: dict[str, list[Any]] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for key, column in columns.items():
        column.extend(row.get(key) for row in rows)
    return columns
