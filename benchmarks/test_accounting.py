"""The bandwidth model, the targets and the tables, on hand-made rows (no timing)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import accounting, harness, tables, targets
from benchmarks.contenders import FAMILY_PAPER, FAMILY_SGD, FAMILY_SLBI
from benchmarks.param_sets import PARAM_SETS, QUICK_SCALE

CPU = torch.device("cpu")
STATS = accounting.set_stats(PARAM_SETS["resnet18"](QUICK_SCALE))


def test_step_bytes_count_each_array_in_its_dtype() -> None:
    """7 arrays of a penalised element, 5 of the rest; bfloat16 Z and v count 2 bytes."""
    stats = accounting.SetStats(tensors=2, numel=100, penalised_numel=60, groups=3, elem_size=4)
    assert accounting.step_bytes(FAMILY_SLBI, stats) == 7 * 4 * 60 + 5 * 4 * 40
    assert accounting.step_bytes(FAMILY_SGD, stats) == 5 * 4 * 100
    assert accounting.step_bytes(FAMILY_SLBI, stats, torch.bfloat16) == 60 * (12 + 8) + 40 * (12 + 4)
    wide = accounting.SetStats(2, 100, 60, 3, elem_size=8)  # float64 keeps float64 state
    assert accounting.step_bytes(FAMILY_SLBI, wide, torch.bfloat16) == 7 * 8 * 60 + 5 * 8 * 40
    assert accounting.floor_seconds(4_000, 2e3) == pytest.approx(2.0)


def test_model_table_at_a_given_bandwidth(capsys) -> None:
    assert accounting.main(["--bandwidth", "1000"]) == 0
    out = capsys.readouterr().out
    resnet50 = accounting.set_stats(PARAM_SETS["resnet50"]())
    slbi = accounting.step_bytes(FAMILY_SLBI, resnet50)
    line = next(line for line in out.splitlines() if line.startswith("resnet50"))
    assert f"{slbi / 1e6:.1f}" in line and f"{1e6 * slbi / 1e12:.1f}" in line


def _row(set_label: str, contender: str, family: str, median: float, **kw) -> harness.Row:
    fields = dict(
        set=set_label, contender=contender, family=family, kernel=None, tensors=STATS.tensors,
        numel=STATS.numel, groups=STATS.groups, param_bytes=STATS.param_bytes,
        penalised_bytes=STATS.penalised_bytes, build_s=0.0, first_step_s=0.0, second_step_s=0.0,
        median_s=median, samples_s=[median], step_bytes=accounting.step_bytes(family, STATS),
        state_bytes=STATS.param_bytes, peak_extra_bytes=0, dispatches=1,
    )
    fields.update(kw)
    return harness.Row(**fields)


def _set_rows(set_label: str, slbi_time: float, bf16_time: float, bf16_extra: int) -> list[harness.Row]:
    rows = [
        _row(set_label, "slbi-torch", FAMILY_SLBI, slbi_time, state_bytes=2 * STATS.param_bytes + 1000),
        _row(set_label, "slbi-bf16", FAMILY_SLBI, bf16_time, state_bytes=STATS.param_bytes + bf16_extra),
        _row(set_label, "sgd-foreach", FAMILY_SGD, 1.0),
        _row(set_label, "sgd-fused", FAMILY_SGD, 1.0),
        _row(set_label, "sgd-loop", FAMILY_SGD, 2.0),
        _row(set_label, "paper", FAMILY_PAPER, 7.0, state_bytes=3 * STATS.param_bytes),
    ]
    harness.fill_derived(rows, copy_bw=1e9)
    return rows


def test_targets_pass_fail_and_not_run() -> None:
    rows = _set_rows("resnet18", 1.1, 1.05, 2000) + _set_rows("resnet50", 1.5, 1.2, 10 << 20)
    verdicts = {t.name: t.passed for t in targets.evaluate_targets(rows, CPU, "slbi-torch")}
    assert verdicts["CPU slbi-torch step vs fastest SGD (resnet18)"] is True
    assert verdicts["CPU slbi-torch step vs fastest SGD (resnet50)"] is False
    assert verdicts["CPU slbi-torch speed-up over PaperSLBI (resnet18)"] is True  # 7 / 1.1
    assert verdicts["CPU slbi-torch speed-up over PaperSLBI (resnet50)"] is False  # 7 / 1.5
    assert verdicts["slbi-bf16 step vs SGD(fused=True) (resnet18)"] is True  # 1.05 <= 1.1
    assert verdicts["slbi-bf16 step vs SGD(fused=True) (resnet50)"] is False
    assert verdicts["slbi-bf16 state vs SGD(fused=True) momentum (resnet18)"] is True
    assert verdicts["slbi-bf16 state vs SGD(fused=True) momentum (resnet50)"] is False  # 10 MiB beyond
    assert verdicts["state = SGD momentum + one param-sized Z + O(filters), all sets"] is True
    assert verdicts["no param-sized temporary in step() (resnet18)"] is True
    gpu = targets.evaluate_targets(rows, torch.device("cuda"), "slbi-triton")
    assert all(t.passed is None for t in gpu[:3])  # not run: no slbi-triton rows
    assert tables.target_table(gpu).count("N/A") >= 3
    missing = targets.evaluate_targets(rows[:3], CPU, "slbi-torch")
    assert {t.verdict for t in missing if "resnet50" in t.name} == {"N/A"}


def test_floor_table_and_derived_figures() -> None:
    rows = _set_rows("resnet18", 1.1, 1.05, 2000)
    fused = next(r for r in rows if r.contender == "sgd-fused")
    assert fused.floor_s == pytest.approx(fused.step_bytes / 1e9)
    assert fused.floor_share == pytest.approx(fused.floor_s / fused.median_s)
    assert next(r for r in rows if r.contender == "slbi-bf16").ratio_to_fused == pytest.approx(1.05)
    text = tables.floor_table(rows, ("slbi-torch", "slbi-bf16", "sgd-fused"))
    assert text.splitlines()[0].split() == ["set", "contender", "bytes/step", "floor", "median", "%", "of",
                                           "floor"]
    assert len(text.splitlines()) == 2 + 3
    assert "| % of floor |" in tables.floor_table(rows, ("sgd-fused",), markdown=True)
    assert "ERROR" in tables.step_table([_row("x", "slbi-torch", FAMILY_SLBI, float("nan"), error="boom")])
