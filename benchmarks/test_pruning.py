"""``python -m benchmarks.pruning --quick`` (on MNIST, which ``make data`` fetches): every arm
runs and the table is written (the full run is not in CI: ~40 min on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch_pruning")

from benchmarks import pruning


def test_quick_run_writes_every_arm(tmp_path: Path) -> None:
    table, rows = tmp_path / "table.md", tmp_path / "rows.json"
    argv = ["--quick", "--dataset", "mnist", "--threads", "1", "--markdown", str(table), "--json", str(rows)]
    arms = pruning.main(argv)
    names = [arm.name for arm in arms]
    assert len(names) == 4 and names[0].startswith("SGD, dense") and "MacTarget" in names[3]
    for arm in arms[1:]:
        assert arm.macs <= 0.52 and arm.after_pruning is not None and arm.recalibrated is not None
    assert arms[0].macs == 1.0 and arms[0].after_pruning is None
    assert len(json.loads(rows.read_text())) == 4
    text = table.read_text()
    assert "CPU:" in text and text.count("\n| ") == 5
