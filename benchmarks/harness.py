"""The benchmark harness: every contender on one parameter set (or one training iteration of
a small model), side by side in one process, one :class:`Row` per contender.

What a row holds, per (parameter set, contender):

- **median step time** over interleaved rounds (:mod:`benchmarks.timing`);
- **first- and second-step times**: the first two ``opt.step()`` calls after construction,
  each timed alone: they include state allocation and any compilation (Triton JIT;
  Inductor compiles the CPU loop of bfloat16/float16 buckets on the second step, once
  momentum is ready). Each set starts with ``torch._dynamo.reset()``, like a fresh process
  (on-disk caches stay warm);
- **bytes per step**, the **floor** it implies at the measured copy bandwidth and the
  **state bytes** (:mod:`benchmarks.accounting`); achieved bandwidth = bytes / median;
- **peak extra memory** and **dispatches** of one step (:mod:`benchmarks.profiling`);
- which **kernel** an SLBI ran (``SLBI.kernels()``).

The summary script (``python -m benchmarks.report``), the pytest-benchmark files and the
GPU check all run this code, so CI exercises what produces the published tables.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from benchmarks.accounting import SetStats, floor_seconds, set_stats, state_bytes, step_bytes
from benchmarks.contenders import FAMILY_PAPER, FAMILY_SGD, Contender, NamedParams, kernels_of
from benchmarks.param_sets import SetSpec, make_params
from benchmarks.profiling import StepProfile, profile_steps
from benchmarks.timing import interleaved_medians, timed


@dataclass
class Row:
    """Figures of one (parameter set, contender)."""

    set: str
    contender: str
    family: str
    kernel: str | None  # SLBI.kernels(), joined by "+"
    tensors: int
    numel: int
    groups: int
    param_bytes: int
    penalised_bytes: int
    build_s: float
    first_step_s: float
    second_step_s: float
    median_s: float
    samples_s: list[float]
    step_bytes: int
    state_bytes: int
    peak_extra_bytes: int | None
    dispatches: int | None
    # Filled in once every contender of the set ran.
    ratio_to_sgd: float | None = None  # median / fastest SGD median
    ratio_to_fused: float | None = None  # median / SGD(fused=True) median
    paper_speedup: float | None = None  # paper median / this median
    bandwidth: float | None = None  # bytes per second
    floor_s: float | None = None  # step bytes / copy bandwidth
    floor_share: float | None = None  # floor / median = bandwidth / copy bandwidth
    state_vs_sgd: int | None = None  # state bytes − the fastest SGD's state bytes
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainRow:
    """One training iteration (forward, backward, step) of a small model."""

    model: str
    batch: int
    contender: str
    family: str
    median_s: float
    samples_s: list[float]
    first_iter_s: float
    overhead_pct: float | None = None  # vs the fastest SGD variant
    final_loss: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Started:
    """A contender after its first two steps."""

    contender: Contender
    opt: Optimizer
    named: NamedParams
    build_s: float
    first_s: float
    second_s: float


def clone_params(named: NamedParams) -> NamedParams:
    """Fresh parameters with copies of ``named``'s values and gradients."""
    out = []
    for name, param in named:
        fresh = nn.Parameter(param.detach().clone())
        fresh.grad = None if param.grad is None else param.grad.detach().clone()
        out.append((name, fresh))
    return out


def _reset_compiler() -> None:
    """Forget compiled graphs so that each set starts like a fresh process (the on-disk
    caches stay) and no set hits Dynamo's recompile limit because of the previous ones."""
    with contextlib.suppress(Exception):  # best effort; the compiler may be unavailable
        torch._dynamo.reset()


def _start(contender: Contender, named: NamedParams, device: torch.device) -> _Started:
    opt, build_s = timed(lambda: contender.build(named), device)
    _, first_s = timed(opt.step, device)
    _, second_s = timed(opt.step, device)
    return _Started(contender, opt, named, build_s, first_s, second_s)


def _profiles(steps: dict[str, Callable[[], Any]], device: torch.device,
              label: str) -> dict[str, StepProfile]:
    try:
        return profile_steps(steps, device)
    except Exception as exc:  # a profiler failure costs the memory and dispatch figures only
        print(f"# profiling {label} failed: {type(exc).__name__}: {exc}", flush=True)
        return {name: StepProfile(None, None) for name in steps}


def _row(spec: SetSpec, stats: SetStats, run: _Started, samples: list[float], profile: StepProfile) -> Row:
    params = [p for _, p in run.named]
    finite = all(bool(torch.isfinite(p.detach()).all()) for p in params)
    contender = run.contender
    return Row(
        spec.label, contender.name, contender.family, kernels_of(run.opt), stats.tensors, stats.numel,
        stats.groups, stats.param_bytes, stats.penalised_bytes, run.build_s, run.first_s, run.second_s,
        statistics.median(samples), samples, step_bytes(contender.family, stats, contender.state_dtype),
        state_bytes(run.opt, params), profile.peak_extra_bytes, profile.dispatches,
        error=None if finite else "non-finite parameters after the run",
    )


def _error_row(spec: SetSpec, stats: SetStats, contender: Contender, error: str) -> Row:
    return Row(
        spec.label, contender.name, contender.family, None, stats.tensors, stats.numel, stats.groups,
        stats.param_bytes, stats.penalised_bytes, math.nan, math.nan, math.nan, math.nan, [],
        step_bytes(contender.family, stats, contender.state_dtype), 0, None, None, error=error,
    )


def bench_set(
    spec: SetSpec,
    contenders: Sequence[Contender],
    device: torch.device,
    *,
    rounds: int = 7,
    warmup: int = 3,
    min_sample_s: float = 0.02,
    copy_bw: float | None = None,
    reset_compiler: bool = True,
) -> list[Row]:
    """Benchmark every contender on one parameter set, side by side.

    Each contender gets its own copy of the same parameters and gradients (SLBI re-binds
    ``param.data`` into its flat buffers). Gradients stay set for the whole run and
    ``zero_grad`` is never called, so every step updates every parameter. A contender
    that fails is reported in its row, not raised.
    """
    if reset_compiler:
        _reset_compiler()
    stats = set_stats(spec.shapes, spec.dtype)
    base = make_params(spec.shapes, device=device, dtype=spec.dtype, seed=0)
    started: dict[str, _Started] = {}
    errors: dict[str, str] = {}
    for index, contender in enumerate(contenders):
        named = base if index == len(contenders) - 1 else clone_params(base)
        try:
            started[contender.name] = _start(contender, named, device)
        except Exception as exc:  # a failing contender is reported, not fatal
            errors[contender.name] = f"{type(exc).__name__}: {exc}"
    del base
    steps = {name: run.opt.step for name, run in started.items()}
    samples = interleaved_medians(steps, device, rounds, warmup, min_sample_s)
    profiles = _profiles(steps, device, spec.label)
    rows = [_row(spec, stats, run, samples[name], profiles[name]) for name, run in started.items()]
    rows += [_error_row(spec, stats, c, errors[c.name]) for c in contenders if c.name in errors]
    del started, steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fill_derived(rows, copy_bw)
    return rows


def fill_derived(rows: list[Row], copy_bw: float | None) -> None:
    """Bandwidth, floor, ratios to the fastest SGD, to fused SGD and to the paper baseline,
    state beyond SGD's."""
    ok = [r for r in rows if r.error is None and math.isfinite(r.median_s)]
    sgd = [r for r in ok if r.family == FAMILY_SGD]
    fastest = min(sgd, key=lambda r: r.median_s) if sgd else None
    fused = next((r for r in ok if r.contender == "sgd-fused"), None)
    paper = next((r for r in ok if r.family == FAMILY_PAPER), None)
    for row in ok:
        row.bandwidth = row.step_bytes / row.median_s if row.median_s > 0 else None
        if copy_bw:
            row.floor_s = floor_seconds(row.step_bytes, copy_bw)
            row.floor_share = row.floor_s / row.median_s if row.median_s > 0 else None
        if fastest is not None:
            row.ratio_to_sgd = row.median_s / fastest.median_s
            row.state_vs_sgd = row.state_bytes - fastest.state_bytes
        if fused is not None:
            row.ratio_to_fused = row.median_s / fused.median_s
        if paper is not None and row.median_s > 0:
            row.paper_speedup = paper.median_s / row.median_s


def train_iteration(model: nn.Module, opt: Optimizer, images: torch.Tensor, labels: torch.Tensor,
                    record: list[torch.Tensor]) -> Callable[[], None]:
    """One training iteration (``zero_grad``, forward, cross-entropy, backward, step) as a
    callable; each call appends its (detached) loss to ``record``."""
    loss_fn = nn.CrossEntropyLoss()

    def iteration() -> None:
        opt.zero_grad()
        loss = loss_fn(model(images), labels)
        loss.backward()
        opt.step()
        record.append(loss.detach())

    return iteration


def bench_train(
    model_name: str,
    contenders: Sequence[Contender],
    device: torch.device,
    *,
    batch: int = 128,
    rounds: int = 7,
    warmup: int = 2,
    min_sample_s: float = 0.0,
    reset_compiler: bool = True,
) -> list[TrainRow]:
    """One training iteration (``zero_grad``, forward, backward, step) per contender.

    Each contender trains its own copy of the same initial model on the same fixed batch
    of ``N × 1 × 28 × 28`` inputs (``slbi_triton.train.models.build_model``).
    """
    from slbi_triton.train.models import build_model

    if reset_compiler:
        _reset_compiler()
    torch.manual_seed(0)
    base = build_model(model_name).to(device)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 1, 28, 28, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)
    iterations, first, losses = {}, {}, {}
    for contender in contenders:
        model = copy.deepcopy(base)
        losses[contender.name] = []
        iteration = train_iteration(model, contender.build(list(model.named_parameters())), images, labels,
                                    losses[contender.name])
        _, first[contender.name] = timed(iteration, device)
        iterations[contender.name] = iteration
    samples = interleaved_medians(iterations, device, rounds, warmup, min_sample_s)
    rows = [
        TrainRow(model_name, batch, c.name, c.family, statistics.median(samples[c.name]), samples[c.name],
                 first[c.name], final_loss=float(losses[c.name][-1]))
        for c in contenders
    ]
    sgd = [r for r in rows if r.family == FAMILY_SGD]
    if sgd:
        fastest = min(r.median_s for r in sgd)
        for row in rows:
            row.overhead_pct = 100.0 * (row.median_s / fastest - 1.0)
    return rows
