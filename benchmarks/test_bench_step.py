"""Quick-mode benchmarks of one optimizer step (CI sizes, a few rounds).

Run with the rest of the suite (``make test``); for real figures use
``python -m benchmarks.report``. These tests check that every contender runs and that
the harness's figures hold (bytes, state, memory and dispatch instruments, timing); they
never assert timing targets. The model and the targets: ``test_accounting.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from slbi_triton.kernels import cpu_step, ops
from torch import nn

from benchmarks import accounting, contenders, harness, param_sets, profiling, targets, timing
from benchmarks.param_sets import QUICK_SCALE, make_params, sweep_set

pytest.importorskip("pytest_benchmark")

CPU = torch.device("cpu")
QUICK_SETS = ["lenet5", "resnet20"]
STEP_CONTENDERS = [c.name for c in contenders.contenders_for(CPU)]


def _quick_set(name: str) -> param_sets.SetSpec:
    if name.startswith("sweep"):
        return param_sets.SetSpec(name, sweep_set(10, 1000))
    return param_sets.named_set(name, QUICK_SCALE)


def test_cpu_contenders() -> None:
    names = [c.name for c in contenders.contenders_for(CPU)]
    assert {"slbi-torch", "slbi-bf16", "sgd-loop", "sgd-foreach", "paper"} <= set(names)
    assert "slbi-triton" not in names  # far too slow to time under the interpreter
    assert ("sgd-fused" in names) == contenders.fused_sgd_supported(CPU)
    assert contenders.default_contender_name(CPU) in names
    with pytest.raises(ValueError, match="unknown contender"):
        contenders.contenders_for(CPU, ["adam"])


@pytest.mark.parametrize("contender", STEP_CONTENDERS)
@pytest.mark.parametrize("set_name", [*QUICK_SETS, "sweep10x1K"])
def test_step(benchmark, set_name: str, contender: str) -> None:
    spec = _quick_set(set_name)
    named = make_params(spec.shapes)
    before = [p.detach().clone() for _, p in named]
    opt = contenders.ALL_CONTENDERS[contender].build(named)
    opt.step()  # first step: state allocation, compilation
    benchmark.group = f"step {set_name}"
    benchmark.pedantic(opt.step, rounds=3, iterations=1, warmup_rounds=1)
    for (_, p), b in zip(named, before, strict=True):
        assert torch.isfinite(p).all()
        assert not torch.equal(p.detach(), b)


def test_bench_set_accounting() -> None:
    spec = param_sets.named_set("resnet18", QUICK_SCALE)
    chosen = contenders.contenders_for(CPU)
    rows = harness.bench_set(spec, chosen, CPU, rounds=2, warmup=1, min_sample_s=0.0, copy_bw=1e10,
                             reset_compiler=False)
    by_name = {r.contender: r for r in rows}
    assert set(by_name) == {c.name for c in chosen}
    stats = accounting.set_stats(spec.shapes)
    assert 0 < stats.penalised_numel < stats.numel and stats.groups > 0
    for row in rows:
        assert row.error is None, (row.contender, row.error)
        assert row.median_s > 0 and len(row.samples_s) == 2 and row.first_step_s > 0
        assert row.numel == stats.numel and row.tensors == len(spec.shapes)
        assert row.bandwidth == pytest.approx(row.step_bytes / row.median_s)
        assert row.floor_s == pytest.approx(row.step_bytes / 1e10)
        assert row.floor_share == pytest.approx(row.bandwidth / 1e10)
        assert row.dispatches is not None and row.dispatches > 0
        assert row.peak_extra_bytes is not None and row.peak_extra_bytes >= 0
    unpenalised = stats.numel - stats.penalised_numel
    slbi_bytes = 7 * 4 * stats.penalised_numel + 5 * 4 * unpenalised
    bf16_bytes = (3 * 4 + 4 * 2) * stats.penalised_numel + (3 * 4 + 2 * 2) * unpenalised  # Z, v: 2 bytes
    for row in rows:
        expected = {contenders.FAMILY_SGD: 5 * 4 * stats.numel}.get(row.family, slbi_bytes)
        assert row.step_bytes == (bf16_bytes if row.contender == "slbi-bf16" else expected), row.contender
    sgd = [r for r in rows if r.family == contenders.FAMILY_SGD]
    assert min(r.ratio_to_sgd for r in sgd) == pytest.approx(1.0)
    assert by_name["paper"].paper_speedup == pytest.approx(1.0)
    # State: SGD holds the momentum; the paper baseline momentum + Z + a stored Γ for every
    # penalised tensor; SLBI momentum + one parameter-sized Z + group norms and tables.
    for row in sgd:
        assert row.state_bytes == stats.param_bytes
    assert by_name["paper"].state_bytes == stats.param_bytes + 2 * stats.penalised_bytes
    slbi = by_name[contenders.default_contender_name(CPU)]
    ok, beyond = targets.state_within_bound(slbi, stats.param_bytes)
    assert ok, beyond
    assert beyond >= 4 * stats.groups  # the float32 group norms are counted
    # bfloat16 Z and v: SGD's momentum bytes, plus the norms, tables and padding.
    extra = by_name["slbi-bf16"].state_bytes - stats.param_bytes
    assert 4 * stats.groups <= extra <= targets.state_overhead_bound(stats.tensors, stats.groups)
    assert by_name["slbi-torch"].kernel == by_name["slbi-bf16"].kernel == "c"
    assert by_name["sgd-fused"].kernel is None
    # The instruments see the loop: one dispatch per tensor and more for the for-loop SGD.
    assert by_name["sgd-loop"].dispatches >= stats.tensors
    assert by_name["sgd-foreach"].dispatches < stats.tensors
    if cpu_step.available(torch.float32):  # one C kernel call for the one bucket
        assert by_name["slbi-torch"].dispatches == by_name["slbi-bf16"].dispatches == 1


def test_state_bytes_counts_each_storage_once() -> None:
    flat = torch.zeros(100)
    a, b = nn.Parameter(flat[:40].view(4, 10)), nn.Parameter(flat[40:].view(6, 10))
    for p in (a, b):
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9)
    assert accounting.state_bytes(opt, [a, b]) == 0  # both views of one storage, no momentum yet
    opt.step()
    assert accounting.state_bytes(opt, [a, b]) == 100 * 4


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

    prof = profiling.profile_steps(
        {"temporary": with_temporary, "in_place": in_place, "loop": loop, "foreach": foreach}, CPU
    )
    assert prof["temporary"].peak_extra_bytes >= big.numel() * 4
    assert prof["in_place"].peak_extra_bytes < 1024
    assert prof["loop"].dispatches == len(small)
    assert prof["foreach"].dispatches == 1
    assert profiling.profile_step(in_place, CPU).dispatches == 1


def test_interleaved_medians_rounds_and_inner_repeats() -> None:
    calls = {"a": 0, "b": 0}

    def step_a() -> None:
        calls["a"] += 1

    def step_b() -> None:
        calls["b"] += 1

    # A sample must last 1 s: after the warm-up, each sample repeats the step (at most 1000 times).
    steps = {"a": step_a, "b": step_b}
    samples = timing.interleaved_medians(steps, CPU, rounds=4, warmup=2, min_sample_s=1.0)
    assert [len(s) for s in samples.values()] == [4, 4]
    assert calls["a"] >= 2 + 4 * 10
    assert all(t > 0 for s in samples.values() for t in s)


def test_copy_bandwidth_positive() -> None:
    assert timing.copy_bandwidth(CPU, 1 << 20, repeats=3) > 1e8


def test_sweep_grids_respect_their_caps() -> None:
    for grid in (param_sets.CPU_SWEEP, param_sets.GPU_SWEEP, param_sets.QUICK_SWEEP):
        specs = param_sets.sweep_grid(**grid)
        assert specs
        for spec in specs:
            assert accounting.set_stats(spec.shapes).numel <= 1.01 * grid["max_total"]
    labels = [s.label for s in param_sets.sweep_grid(**param_sets.CPU_SWEEP)]
    assert "sweep/10x4M" in labels and "sweep/1000x1K" in labels and "sweep/1000x4M" not in labels
    assert param_sets.named_set("resnet50@bf16", QUICK_SCALE).label == "resnet50@bfloat16"
    with pytest.raises(ValueError, match="parameter set"):
        param_sets.named_set("resnet51")


def test_report_cli_quick(tmp_path: Path) -> None:
    from benchmarks import report

    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    status = report.main([
        "--quick", "--sets", "lenet5,lenet5@bfloat16", "--sweep", "none", "--no-train", "--rounds", "1",
        "--warmup", "0", "--only", "paper=lenet5", "--json", str(out_json), "--markdown", str(out_md),
    ])
    assert status == 0
    data = json.loads(out_json.read_text())
    names = {c.name for c in contenders.contenders_for(CPU)}
    assert {r["contender"] for r in data["rows"] if r["set"] == "lenet5"} == names
    assert {r["contender"] for r in data["rows"] if r["set"] == "lenet5@bfloat16"} == names - {"paper"}
    assert all(r["error"] is None for r in data["rows"])
    assert data["meta"]["copy_bandwidth_gbs"] > 0
    if cpu_step.available(torch.float32):
        assert 0 < data["meta"]["cpu_kernel_build_s"] < 120  # a real build, into an empty folder
    assert {t["verdict"] for t in data["targets"]} <= {"PASS", "FAIL", "N/A"}
    assert any(t["name"].startswith("slbi-bf16 step vs SGD(fused=True)") for t in data["targets"])
    markdown = out_md.read_text()
    assert "| set |" in markdown and "| % of floor |" in markdown


@pytest.mark.skipif(not ops.triton_interpreted(), reason="slbi-triton on the CPU needs TRITON_INTERPRET=1")
def test_triton_contender_matches_torch_backend() -> None:
    spec = param_sets.named_set("lenet5", QUICK_SCALE)
    chosen = contenders.contenders_for(CPU, ["slbi-torch", "slbi-triton", "sgd-foreach"])
    finals = {}
    for contender in chosen[:2]:
        named = make_params(spec.shapes)
        opt = contender.build(named)
        for _ in range(3):
            opt.step()
        finals[contender.name] = [p.detach().clone() for _, p in named]
    for a, b in zip(finals["slbi-torch"], finals["slbi-triton"], strict=True):
        assert torch.equal(a, b)  # the C and the interpreted Triton kernel agree bit for bit
    rows = harness.bench_set(spec, chosen, CPU, rounds=1, warmup=0, min_sample_s=0.0, reset_compiler=False)
    assert all(r.error is None and math.isfinite(r.median_s) for r in rows)
    assert {r.contender: r.kernel for r in rows}["slbi-triton"] == "triton"


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
    counts = profiling._cuda_dispatches(prof, {"a": (0.0, 10.0), "b": (12.0, 20.0)})
    assert counts == {"a": 2, "b": 1}
