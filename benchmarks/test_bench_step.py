"""Quick-mode benchmarks of one optimizer step (CI sizes, a few rounds).

Run with the rest of the suite (``make test``); for real figures use
``python -m benchmarks.report``. These tests check that every contender runs and that
the accounting holds (bytes, state, memory and dispatch instruments); they never assert
timing targets.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from slbi_triton.kernels import cpu_step
from torch import nn

from benchmarks import harness as bh
from benchmarks.param_sets import PARAM_SETS, QUICK_SCALE, make_params, sweep_set

pytest.importorskip("pytest_benchmark")

CPU = torch.device("cpu")
QUICK_SETS = ["lenet5", "resnet20"]
STEP_CONTENDERS = [c.name for c in bh.contenders_for(CPU)]


def _quick_set(name: str) -> bh.SetSpec:
    if name.startswith("sweep"):
        return bh.SetSpec(name, sweep_set(10, 1000))
    return bh.named_set(name, QUICK_SCALE)


def test_cpu_contenders() -> None:
    names = [c.name for c in bh.contenders_for(CPU)]
    assert {"slbi-torch", "sgd-loop", "sgd-foreach", "paper"} <= set(names)
    assert "slbi-triton" not in names  # far too slow to time under the interpreter
    assert ("sgd-fused" in names) == bh.fused_sgd_supported(CPU)
    assert bh.default_contender_name(CPU) in names
    with pytest.raises(ValueError, match="unknown contender"):
        bh.contenders_for(CPU, ["adam"])


@pytest.mark.parametrize("contender", STEP_CONTENDERS)
@pytest.mark.parametrize("set_name", [*QUICK_SETS, "sweep10x1K"])
def test_step(benchmark, set_name: str, contender: str) -> None:
    spec = _quick_set(set_name)
    named = make_params(spec.shapes)
    before = [p.detach().clone() for _, p in named]
    opt = bh.ALL_CONTENDERS[contender].build(named)
    opt.step()  # first step: state allocation, compilation
    benchmark.group = f"step {set_name}"
    benchmark.pedantic(opt.step, rounds=3, iterations=1, warmup_rounds=1)
    for (_, p), b in zip(named, before, strict=True):
        assert torch.isfinite(p).all()
        assert not torch.equal(p.detach(), b)


def test_bench_set_accounting() -> None:
    spec = bh.named_set("resnet18", QUICK_SCALE)
    contenders = bh.contenders_for(CPU)
    rows = bh.bench_set(spec, contenders, CPU, rounds=2, warmup=1, min_sample_s=0.0, copy_bw=1e10,
                        reset_compiler=False)
    by_name = {r.contender: r for r in rows}
    assert set(by_name) == {c.name for c in contenders}
    stats = bh.set_stats(spec.shapes)
    assert 0 < stats.penalised_numel < stats.numel and stats.groups > 0
    for row in rows:
        assert row.error is None, (row.contender, row.error)
        assert row.median_s > 0 and len(row.samples_s) == 2 and row.first_step_s > 0
        assert row.numel == stats.numel and row.tensors == len(spec.shapes)
        assert row.bandwidth == pytest.approx(row.step_bytes / row.median_s)
        assert row.floor_share == pytest.approx(row.bandwidth / 1e10)
        assert row.dispatches is not None and row.dispatches > 0
        assert row.peak_extra_bytes is not None and row.peak_extra_bytes >= 0
    elem = 4
    slbi_bytes = 7 * stats.penalised_numel * elem + 5 * (stats.numel - stats.penalised_numel) * elem
    for row in rows:
        expected = 5 * stats.numel * elem if row.family == bh.FAMILY_SGD else slbi_bytes
        assert row.step_bytes == expected, row.contender
    sgd = [r for r in rows if r.family == bh.FAMILY_SGD]
    assert min(r.ratio_to_sgd for r in sgd) == pytest.approx(1.0)
    assert by_name["paper"].paper_speedup == pytest.approx(1.0)
    # State: SGD holds the momentum; the paper baseline momentum + Z + a stored Γ for every
    # penalised tensor; SLBI momentum + one parameter-sized Z + group norms and tables.
    for row in sgd:
        assert row.state_bytes == stats.param_bytes
    assert by_name["paper"].state_bytes == stats.param_bytes + 2 * stats.penalised_bytes
    slbi = by_name[bh.default_contender_name(CPU)]
    ok, beyond = bh.state_within_bound(slbi, stats.param_bytes)
    assert ok, beyond
    assert beyond >= 4 * stats.groups  # the float32 group norms are counted
    # The instruments see the loop: one dispatch per tensor and more for the for-loop SGD.
    assert by_name["sgd-loop"].dispatches >= stats.tensors
    assert by_name["sgd-foreach"].dispatches < stats.tensors
    if cpu_step.available(torch.float32):
        assert by_name["slbi-torch"].dispatches == 1  # one C kernel call for the one bucket


def test_state_bytes_counts_each_storage_once() -> None:
    flat = torch.zeros(100)
    a, b = nn.Parameter(flat[:40].view(4, 10)), nn.Parameter(flat[40:].view(6, 10))
    for p in (a, b):
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9)
    assert bh.state_bytes(opt, [a, b]) == 0  # both views of one storage, no momentum yet
    opt.step()
    assert bh.state_bytes(opt, [a, b]) == 100 * 4


def test_profile_step_instruments() -> None:
    big = torch.randn(1 << 18)
    out = torch.zeros(1 << 18)
    small = [torch.randn(16) for _ in range(12)]

    def with_temporary() -> None:
        out.add_(big * 2.0)

    def in_place() -> None:
        out.add_(big)

    def loop() -> None:
        for t in small:
            t.mul_(0.5)

    def foreach() -> None:
        torch._foreach_mul_(small, 0.5)

    prof = bh.profile_steps(
        {"temporary": with_temporary, "in_place": in_place, "loop": loop, "foreach": foreach}, CPU
    )
    assert prof["temporary"].peak_extra_bytes >= big.numel() * 4
    assert prof["in_place"].peak_extra_bytes < 1024
    assert prof["loop"].dispatches == len(small)
    assert prof["foreach"].dispatches == 1
    assert bh.profile_step(in_place, CPU).dispatches == 1


def test_interleaved_medians_rounds_and_inner_repeats() -> None:
    calls = {"a": 0, "b": 0}

    def step_a() -> None:
        calls["a"] += 1

    def step_b() -> None:
        calls["b"] += 1

    # A sample must last 1 s: after the warm-up, each sample repeats the step (at most 1000 times).
    samples = bh.interleaved_medians({"a": step_a, "b": step_b}, CPU, rounds=4, warmup=2, min_sample_s=1.0)
    assert [len(s) for s in samples.values()] == [4, 4]
    assert calls["a"] >= 2 + 4 * 10
    assert all(t > 0 for s in samples.values() for t in s)


def test_copy_bandwidth_positive() -> None:
    assert bh.copy_bandwidth(CPU, 1 << 20, repeats=3) > 1e8


def test_sweep_grids_respect_their_caps() -> None:
    for grid in (bh.CPU_SWEEP, bh.GPU_SWEEP, bh.QUICK_SWEEP):
        specs = bh.sweep_grid(**grid)
        assert specs
        for spec in specs:
            assert bh.set_stats(spec.shapes).numel <= 1.01 * grid["max_total"]
    labels = [s.label for s in bh.sweep_grid(**bh.CPU_SWEEP)]
    assert "sweep/10x4M" in labels and "sweep/1000x1K" in labels and "sweep/1000x4M" not in labels
    assert bh.named_set("resnet50@bf16", QUICK_SCALE).label == "resnet50@bfloat16"
    with pytest.raises(ValueError, match="parameter set"):
        bh.named_set("resnet51")


def _row(set_label: str, contender: str, family: str, median: float, **kw) -> bh.Row:
    stats = bh.set_stats(PARAM_SETS["resnet18"](QUICK_SCALE))
    fields = dict(
        set=set_label, contender=contender, family=family, backend=None, tensors=stats.tensors,
        numel=stats.numel, groups=stats.groups, param_bytes=stats.param_bytes,
        penalised_bytes=stats.penalised_bytes, build_s=0.0, first_step_s=0.0, second_step_s=0.0,
        median_s=median,
        samples_s=[median], step_bytes=bh.step_bytes(family, stats), state_bytes=stats.param_bytes,
        peak_extra_bytes=0, dispatches=1,
    )
    fields.update(kw)
    return bh.Row(**fields)


def test_targets_pass_fail_and_not_run() -> None:
    param_bytes = bh.set_stats(PARAM_SETS["resnet18"](QUICK_SCALE)).param_bytes
    rows = []
    for set_label, slbi_time in (("resnet18", 1.1), ("resnet50", 1.5)):
        set_rows = [
            _row(set_label, "slbi-torch", bh.FAMILY_SLBI, slbi_time, state_bytes=2 * param_bytes + 1000),
            _row(set_label, "sgd-foreach", bh.FAMILY_SGD, 1.0),
            _row(set_label, "sgd-loop", bh.FAMILY_SGD, 2.0),
            _row(set_label, "paper", bh.FAMILY_PAPER, 7.0, state_bytes=3 * param_bytes),
        ]
        bh.fill_derived(set_rows, copy_bw=None)
        rows += set_rows
    verdicts = {t.name: t.passed for t in bh.evaluate_targets(rows, CPU, "slbi-torch")}
    assert verdicts["CPU slbi-torch step vs fastest SGD (resnet18)"] is True
    assert verdicts["CPU slbi-torch step vs fastest SGD (resnet50)"] is False
    assert verdicts["CPU slbi-torch speed-up over PaperSLBI (resnet18)"] is True  # 7 / 1.1
    assert verdicts["CPU slbi-torch speed-up over PaperSLBI (resnet50)"] is False  # 7 / 1.5
    assert verdicts["state = SGD momentum + one param-sized Z + O(groups), all sets"] is True
    assert verdicts["no param-sized temporary in step() (resnet18)"] is True
    gpu = bh.evaluate_targets(rows, torch.device("cuda"), "slbi-triton")
    assert all(t.passed is None for t in gpu[:3])  # not run: no slbi-triton rows
    assert bh.target_table(gpu).count("N/A") >= 3


def test_report_cli_quick(tmp_path: Path) -> None:
    from benchmarks import report

    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    status = report.main([
        "--quick", "--sets", "lenet5,lenet5@bfloat16", "--sweep", "none", "--no-train", "--rounds", "1",
        "--warmup", "0", "--only", "paper=lenet5", "--json", str(out_json), "--markdown", str(out_md),
    ])
    assert status == 0
    data = json.loads(out_json.read_text())
    contenders = {c.name for c in bh.contenders_for(CPU)}
    assert {r["contender"] for r in data["rows"] if r["set"] == "lenet5"} == contenders
    assert {r["contender"] for r in data["rows"] if r["set"] == "lenet5@bfloat16"} == contenders - {"paper"}
    assert all(r["error"] is None for r in data["rows"])
    assert data["meta"]["copy_bandwidth_gbs"] > 0
    if cpu_step.available(torch.float32):
        assert 0 < data["meta"]["cpu_kernel_build_s"] < 120  # a real build, into an empty folder
    assert {t["verdict"] for t in data["targets"]} <= {"PASS", "FAIL", "N/A"}
    assert "| set |" in out_md.read_text()


@pytest.mark.skipif(not bh.triton_interpreted(), reason="slbi-triton on the CPU needs TRITON_INTERPRET=1")
def test_triton_contender_matches_torch_backend() -> None:
    spec = bh.named_set("lenet5", QUICK_SCALE)
    contenders = bh.contenders_for(CPU, ["slbi-torch", "slbi-triton", "sgd-foreach"])
    finals = {}
    for contender in contenders[:2]:
        named = make_params(spec.shapes)
        opt = contender.build(named)
        for _ in range(3):
            opt.step()
        finals[contender.name] = [p.detach().clone() for _, p in named]
    for a, b in zip(finals["slbi-torch"], finals["slbi-triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    rows = bh.bench_set(spec, contenders, CPU, rounds=1, warmup=0, min_sample_s=0.0, reset_compiler=False)
    assert all(r.error is None and math.isfinite(r.median_s) for r in rows)


def test_cuda_dispatch_attribution_by_range() -> None:
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name: str, device, start: float) -> SimpleNamespace:
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start))

    events = [
        event("bench::a", cuda, 1.0),  # the GPU user annotation of range a: not a kernel
        event("kernel", cuda, 5.0), event("kernel", cuda, 6.0), event("memcpy", cuda, 15.0),
        event("aten::add_", cpu, 5.0), event("kernel", cuda, 30.0),
    ]
    prof = SimpleNamespace(events=lambda: events)
    counts = bh._cuda_dispatches(prof, {"a": (0.0, 10.0), "b": (12.0, 20.0)})
    assert counts == {"a": 2, "b": 1}
