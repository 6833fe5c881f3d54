"""Benchmark harness: contenders, timing, bytes and bandwidth, memory and dispatch counts.

Everything the summary script (``python -m benchmarks.report``), the pytest-benchmark files
and the GPU check need lives here, so that CI exercises exactly the code that produces the
published tables.

What is measured, per (parameter set, contender):

- **median step time** over interleaved rounds: every round times each contender once, in
  a rotating order, so that load from other processes on a shared machine hits all of them
  alike; warm-up rounds are excluded. Tiny sets repeat the step inside one sample so a
  sample lasts at least ``min_sample_s``. Ratios (to the fastest ``torch.optim.SGD``
  variant, to the paper-style baseline) are the figures to quote, never bare times.
- **first- and second-step times**: the first two ``opt.step()`` calls after
  construction, each timed alone: they include state allocation and any compilation
  (Triton JIT; the torch backend compiles its Inductor loop on the second step, once
  momentum is ready). Each set starts with ``torch._dynamo.reset()``, like a fresh
  process (Inductor's on-disk cache stays warm across runs).
- **bytes per step**: the minimum traffic of the algorithm, not of an implementation.
  SLBI reads W, Z, g, v and writes W, Z, v (7 × the bytes of a penalised parameter; 5 ×
  for penalty ``"none"``, which has no Z); SGD with momentum reads W, g, v and writes W, v
  (5 ×). The paper baseline does SLBI's work, so it is charged SLBI's bytes: its
  bandwidth is an *effective* figure. Achieved bandwidth = bytes / median time, and its
  share of the *floor*, the measured bandwidth of a large ``copy_`` on the device.
- **optimizer-state bytes**: every tensor storage the optimizer holds (``opt.state`` and,
  walked generically, its internal objects: SLBI's flat buckets, group norms, tables),
  counted once per storage, plus the storages behind ``param.data`` / ``param.grad``,
  minus the parameter and gradient bytes themselves. For SGD that is the momentum; for
  SLBI momentum + Z + group norms + small tables + alignment padding of its flat buffers.
- **peak extra memory during a step**: CUDA: ``max_memory_allocated`` minus the memory
  allocated before the step. CPU: the peak of the running sum of the allocations and
  frees that the c10 CPU allocator reports to ``torch.profiler`` (``profile_memory``)
  during one step; this sees Inductor-generated code too (``TorchDispatchMode`` would not:
  it disables ``torch.compile``). Allocations made outside the c10 allocator (e.g. OpenMP
  scratch) are not seen.
- **dispatches per step**: CUDA: device kernels, memcpys and memsets in a
  ``torch.profiler`` trace of one step. CPU: top-level aten operators in the trace (metadata
  ops like views excluded), with each call of an Inductor-compiled graph counted once
  (its C++ kernels are not traced separately).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from slbi_triton.kernels import cpu_step
from torch import nn
from torch.optim import Optimizer

from benchmarks.paper_slbi import PaperSLBI
from benchmarks.param_sets import PARAM_SETS, QUICK_SCALE, ParamShapes, make_params, penalty_of, sweep_set

NamedParams = list[tuple[str, nn.Parameter]]

SLBI_HPARAMS: dict[str, float] = {
    "lr": 0.01,
    "kappa": 1.0,
    "mu": 100.0,
    "lam": 1.0,
    "momentum": 0.9,
    "dampening": 0.0,
    "weight_decay": 0.0,
}
"""Hyper-parameters of every SLBI contender (the paper baseline gets the same)."""

SGD_HPARAMS: dict[str, float] = {"lr": 0.01, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0}
"""Hyper-parameters of every ``torch.optim.SGD`` contender."""

SLBI_BYTES_PENALISED = 7
"""SLBI traffic per element of a penalised tensor: read W, Z, g, v; write W, Z, v."""
SLBI_BYTES_UNPENALISED = 5
"""SLBI traffic per element with penalty ``"none"`` (no Z): read W, g, v; write W, v."""
SGD_BYTES = 5
"""SGD-with-momentum traffic per element: read W, g, v; write W, v."""

FAMILY_SLBI = "slbi"
FAMILY_SGD = "sgd"
FAMILY_PAPER = "paper"

# Operators that only create metadata or uninitialised storage: not counted as dispatches.
_METADATA_OPS = frozenset(
    {
        "aten::view", "aten::as_strided", "aten::empty", "aten::empty_strided", "aten::detach",
        "aten::alias", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
        "aten::reshape", "aten::_reshape_alias", "aten::slice", "aten::select", "aten::expand",
        "aten::unsqueeze", "aten::squeeze", "aten::t", "aten::transpose", "aten::permute",
        "aten::_unsafe_view", "aten::empty_like", "aten::result_type", "aten::is_nonzero",
        "aten::item", "aten::_local_scalar_dense", "aten::set_", "aten::split",
    }
)


# ----------------------------------------------------------------------------- devices


def sync(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def triton_interpreted() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    """Whether the package's Triton kernels import on this machine."""
    try:
        from slbi_triton.kernels import slbi_step  # noqa: F401
    except ImportError:
        return False
    return True


_FUSED_SGD: dict[str, bool] = {}


def fused_sgd_supported(device: torch.device) -> bool:
    """Whether ``torch.optim.SGD(fused=True)`` steps on ``device`` for float32 parameters."""
    key = device.type
    if key not in _FUSED_SGD:
        try:
            param = nn.Parameter(torch.ones(4, device=device))
            param.grad = torch.ones(4, device=device)
            torch.optim.SGD([param], lr=0.1, momentum=0.9, fused=True).step()
            _FUSED_SGD[key] = True
        except (RuntimeError, ValueError, TypeError):
            _FUSED_SGD[key] = False
    return _FUSED_SGD[key]


def default_slbi_backend(device: torch.device) -> str:
    """The backend ``SLBI(..., backend="auto")`` picks for parameters on ``device``."""
    from slbi_triton import SLBI

    param = nn.Parameter(torch.zeros(2, 2, device=device))
    param.grad = torch.zeros_like(param)
    opt = SLBI([param], backend="auto")
    buckets = getattr(opt, "_buckets", [])
    backend = getattr(buckets[0], "backend", None) if buckets else None
    if isinstance(backend, str):
        return backend
    return "triton" if device.type == "cuda" and triton_importable() else "torch"


# ----------------------------------------------------------------------------- contenders


@dataclass(frozen=True)
class Contender:
    """One optimizer configuration in the benchmark."""

    name: str
    family: str  # FAMILY_SLBI, FAMILY_SGD or FAMILY_PAPER
    build: Callable[[NamedParams], Optimizer] = field(repr=False, compare=False)
    description: str = ""


def _slbi(backend: str) -> Callable[[NamedParams], Optimizer]:
    def build(named: NamedParams) -> Optimizer:
        from slbi_triton import SLBI

        return SLBI(named, backend=backend, **SLBI_HPARAMS)

    return build


def _sgd(mode: str) -> Callable[[NamedParams], Optimizer]:
    flags = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[mode]

    def build(named: NamedParams) -> Optimizer:
        return torch.optim.SGD([p for _, p in named], **SGD_HPARAMS, **flags)

    return build


def _paper(named: NamedParams) -> Optimizer:
    return PaperSLBI([p for _, p in named], **SLBI_HPARAMS)


ALL_CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("slbi-torch", FAMILY_SLBI, _slbi("torch"), 'SLBI(backend="torch")'),
        Contender("slbi-triton", FAMILY_SLBI, _slbi("triton"), 'SLBI(backend="triton")'),
        Contender("slbi-auto", FAMILY_SLBI, _slbi("auto"), 'SLBI(backend="auto")'),
        Contender("sgd-loop", FAMILY_SGD, _sgd("loop"), "SGD(momentum=0.9, foreach=False)"),
        Contender("sgd-foreach", FAMILY_SGD, _sgd("foreach"), "SGD(momentum=0.9, foreach=True)"),
        Contender("sgd-fused", FAMILY_SGD, _sgd("fused"), "SGD(momentum=0.9, fused=True)"),
        Contender("paper", FAMILY_PAPER, _paper, "PaperSLBI: per-parameter loop, the paper's toolbox"),
    )
}
"""Every contender the harness knows, by name."""


def default_contender_name(device: torch.device) -> str:
    """The contender that stands for ``SLBI``'s default backend on ``device``."""
    backend = default_slbi_backend(device)
    name = f"slbi-{backend}"
    return name if name in ALL_CONTENDERS else "slbi-auto"


def contenders_for(device: torch.device, names: Sequence[str] | None = None) -> list[Contender]:
    """The contenders to run on ``device``.

    By default: ``slbi-torch``; ``slbi-triton`` on CUDA (the Triton CPU interpreter is far
    too slow to time); ``slbi-auto`` only when the default backend is neither of those;
    the three SGD variants (``sgd-fused`` where the device supports it); ``paper``.
    Named contenders are checked: an unknown or unsupported name raises ``ValueError``
    (``slbi-triton`` is allowed on the CPU under ``TRITON_INTERPRET=1``, for tests).
    """
    if names is None:
        names = ["slbi-torch"]
        if device.type == "cuda" and triton_importable():
            names.append("slbi-triton")
        if default_contender_name(device) == "slbi-auto":
            names.append("slbi-auto")
        names += ["sgd-loop", "sgd-foreach"]
        if fused_sgd_supported(device):
            names.append("sgd-fused")
        names.append("paper")
    chosen = []
    for name in names:
        if name not in ALL_CONTENDERS:
            raise ValueError(f"unknown contender {name!r}; known: {sorted(ALL_CONTENDERS)}")
        if name == "slbi-triton" and not (
            triton_importable() and (device.type == "cuda" or triton_interpreted())
        ):
            raise ValueError("contender 'slbi-triton' needs CUDA and Triton (or TRITON_INTERPRET=1)")
        if name == "sgd-fused" and not fused_sgd_supported(device):
            raise ValueError(f"contender 'sgd-fused': SGD(fused=True) is not supported on {device.type}")
        chosen.append(ALL_CONTENDERS[name])
    return chosen


# ----------------------------------------------------------------------------- parameter sets


@dataclass(frozen=True)
class SetSpec:
    """A parameter set to benchmark: its name, shapes and dtype."""

    name: str
    shapes: ParamShapes = field(repr=False)
    dtype: torch.dtype = torch.float32

    @property
    def label(self) -> str:
        """``name``, with ``@dtype`` appended when it is not float32."""
        if self.dtype == torch.float32:
            return self.name
        return f"{self.name}@{str(self.dtype).removeprefix('torch.')}"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    """``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def size_label(numel: int) -> str:
    """``1024`` → ``"1K"``, ``4194304`` → ``"4M"`` (binary prefixes)."""
    for unit, shift in (("M", 20), ("K", 10)):
        if numel >= 1 << shift and numel % (1 << shift) == 0:
            return f"{numel >> shift}{unit}"
    return str(numel)


def named_set(spec: str, scale: int = 1) -> SetSpec:
    """A named set, ``"resnet50"`` or ``"resnet50@bfloat16"``, at width divisor ``scale``."""
    name, _, dtype = spec.partition("@")
    if name not in PARAM_SETS:
        raise ValueError(f"unknown parameter set {name!r}; known: {sorted(PARAM_SETS)}")
    return SetSpec(name, PARAM_SETS[name](scale=scale), parse_dtype(dtype) if dtype else torch.float32)


def sweep_grid(counts: Iterable[int], sizes: Iterable[int], max_total: int) -> list[SetSpec]:
    """Sweep sets ``count × size`` with at most ``max_total`` elements in all."""
    specs = []
    for count in counts:
        for size in sizes:
            if count * size <= max_total:
                specs.append(SetSpec(f"sweep/{count}x{size_label(size)}", sweep_set(count, size)))
    return specs


CPU_SWEEP = {"counts": (10, 100, 1000), "sizes": (1 << 10, 1 << 15, 1 << 22), "max_total": 48 << 20}
"""The CPU sweep: 7 points up to 48M elements (2 cores, 24 GiB shared)."""
GPU_SWEEP = {"counts": (10, 100, 1000), "sizes": (1 << 10, 1 << 14, 1 << 18, 1 << 22), "max_total": 512 << 20}
"""The GPU sweep: 11 points up to 512M elements."""
QUICK_SWEEP = {"counts": (10, 100), "sizes": (1 << 6, 1 << 10), "max_total": 1 << 20}
"""The CI sweep: tiny tensors, same code path."""


def quick_sets() -> list[SetSpec]:
    """Every named set at ``QUICK_SCALE`` (CI sizes)."""
    return [named_set(name, QUICK_SCALE) for name in PARAM_SETS]


# ----------------------------------------------------------------------------- accounting


@dataclass(frozen=True)
class SetStats:
    """Static figures of a parameter set."""

    tensors: int
    numel: int
    penalised_numel: int
    groups: int
    largest_numel: int
    elem_size: int

    @property
    def param_bytes(self) -> int:
        return self.numel * self.elem_size

    @property
    def penalised_bytes(self) -> int:
        return self.penalised_numel * self.elem_size


def set_stats(shapes: ParamShapes, dtype: torch.dtype = torch.float32) -> SetStats:
    """Tensor count, elements, penalised elements and groups of a parameter set."""
    numels = [math.prod(shape) for _, shape in shapes]
    penalised = sum(n for n, (_, s) in zip(numels, shapes, strict=True) if penalty_of(s) != "none")
    groups = sum(s[0] for _, s in shapes if penalty_of(s) == "group")
    elem = torch.empty((), dtype=dtype).element_size()
    return SetStats(len(shapes), sum(numels), penalised, groups, max(numels, default=0), elem)


def step_bytes(family: str, stats: SetStats) -> int:
    """Minimum bytes one step moves (see the module docstring)."""
    if family == FAMILY_SGD:
        return SGD_BYTES * stats.param_bytes
    unpenalised = stats.param_bytes - stats.penalised_bytes
    return SLBI_BYTES_PENALISED * stats.penalised_bytes + SLBI_BYTES_UNPENALISED * unpenalised


def _collect_storages(obj: Any, found: dict[tuple[str, int], int], seen: set[int], depth: int) -> None:
    """Record ``(device, data_ptr) → nbytes`` of every tensor storage reachable from ``obj``."""
    if depth < 0 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta":
            storage = obj.untyped_storage()
            found[(str(obj.device), storage.data_ptr())] = storage.nbytes()
        return
    if isinstance(obj, dict):
        for value in obj.values():
            _collect_storages(value, found, seen, depth - 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            _collect_storages(value, found, seen, depth - 1)
    elif type(obj).__module__.startswith(("slbi_triton", "benchmarks")) and hasattr(obj, "__dict__"):
        _collect_storages(vars(obj), found, seen, depth - 1)


def state_bytes(opt: Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Bytes the optimizer holds beyond the parameters and gradients themselves.

    Every storage reachable from ``opt.state`` and from the optimizer's own attributes
    (walked through containers and objects of this project), plus the storages behind
    each ``param.data`` and ``param.grad``, each counted once, minus the logical bytes of
    the parameters and gradients. Flat-buffer padding therefore counts as state.
    """
    params = list(params)
    found: dict[tuple[str, int], int] = {}
    seen: set[int] = set()
    _collect_storages(dict(opt.state), found, seen, depth=3)
    internals = {k: v for k, v in vars(opt).items() if k not in ("state", "param_groups", "defaults")}
    _collect_storages(internals, found, seen, depth=6)
    logical = 0
    for param in params:
        for tensor in (param.detach(), param.grad):
            if tensor is None:
                continue
            storage = tensor.untyped_storage()
            found[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
            logical += tensor.numel() * tensor.element_size()
    return sum(found.values()) - logical


RANGE_PREFIX = "bench::"
"""Prefix of the ``record_function`` range around each profiled step."""


def _memory_peaks(prof: torch.profiler.profile, ranges: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Per range: the peak of the running sum of CPU allocator events inside it."""
    events = []
    for event in prof.profiler.kineto_results.events():
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU:
            events.append((event.start_ns(), event.nbytes()))
    events.sort()
    peaks = {}
    for name, (start, end) in ranges.items():
        running = peak = 0
        for stamp, nbytes in events:
            if start <= stamp <= end:
                running += nbytes
                peak = max(peak, running)
        peaks[name] = peak
    return peaks


def _range_of(event: Any) -> str | None:
    """The benchmark range an event runs in (its nearest ``bench::`` ancestor)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(RANGE_PREFIX):
            return parent.name[len(RANGE_PREFIX):]
        parent = parent.cpu_parent
    return None


def _cpu_dispatches(prof: torch.profiler.profile) -> dict[str, int]:
    """Per range: top-level aten operators (metadata ops excluded), compiled-graph calls
    and calls of the SLBI CPU kernel."""
    counts: dict[str, int] = {}
    for event in prof.events():
        name = event.name
        if "CompiledFxGraph" not in name and name != cpu_step.PROFILER_NAME:
            if not name.startswith("aten::") or name in _METADATA_OPS:
                continue
            parent = event.cpu_parent
            nested = False
            while parent is not None and not parent.name.startswith(RANGE_PREFIX):
                if parent.name.startswith("aten::"):
                    nested = True
                    break
                parent = parent.cpu_parent
            if nested:
                continue
        owner = _range_of(event)
        if owner is not None:
            counts[owner] = counts.get(owner, 0) + 1
    return counts


def _cuda_dispatches(prof: torch.profiler.profile, ranges: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Per range: device kernels, memcpys and memsets that start inside it."""
    counts = dict.fromkeys(ranges, 0)
    for event in prof.events():
        # Device-side copies of the record_function ranges (GPU user annotations) are no work.
        if event.device_type != torch.autograd.DeviceType.CUDA or event.name.startswith(RANGE_PREFIX):
            continue
        start_us = event.time_range.start
        for name, (lo, hi) in ranges.items():
            if lo <= start_us <= hi:
                counts[name] += 1
                break
    return counts


@dataclass
class StepProfile:
    """Peak extra memory and dispatch count of one step."""

    peak_extra_bytes: int | None
    dispatches: int | None


def profile_steps(steps: dict[str, Callable[[], Any]], device: torch.device) -> dict[str, StepProfile]:
    """Peak extra memory and dispatches of one call of each step (module docstring).

    One profiler session covers all steps, each inside a ``record_function`` range and
    followed by a device synchronisation, so device work lands inside its own range.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    peaks: dict[str, int] = {}
    if device.type == "cuda":
        for name, step in steps.items():
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step()
            sync(device)
            peaks[name] = torch.cuda.max_memory_allocated(device) - before
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    else:
        activities = [ProfilerActivity.CPU]
    with profile(activities=activities, profile_memory=device.type != "cuda") as prof:
        for name, step in steps.items():
            with record_function(RANGE_PREFIX + name):
                step()
                sync(device)
    range_events = {
        e.name[len(RANGE_PREFIX):]: e
        for e in prof.events()
        if e.name.startswith(RANGE_PREFIX) and e.device_type == torch.autograd.DeviceType.CPU
    }
    if device.type == "cuda":
        ranges_us = {n: (e.time_range.start, e.time_range.end) for n, e in range_events.items()}
        counts: dict[str, int] = _cuda_dispatches(prof, ranges_us)
        return {n: StepProfile(peaks.get(n), counts.get(n) or None) for n in steps}
    raw = {}
    for event in prof.profiler.kineto_results.events():
        if event.name().startswith(RANGE_PREFIX):
            raw[event.name()[len(RANGE_PREFIX):]] = (event.start_ns(), event.end_ns())
    peaks = _memory_peaks(prof, raw)
    counts = _cpu_dispatches(prof)
    return {n: StepProfile(peaks.get(n), counts.get(n, 0)) for n in steps}


def profile_step(step: Callable[[], Any], device: torch.device) -> StepProfile:
    """:func:`profile_steps` for a single step."""
    return profile_steps({"step": step}, device)["step"]


# ----------------------------------------------------------------------------- timing


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 9) -> float:
    """Bytes per second of ``dst.copy_(src)`` on ``device`` (read + write counted).

    The floor for bandwidth-bound steps: the median of ``repeats`` samples of copies of
    ``nbytes`` after two warm-up samples (a sample repeats the copy for at least 10 ms).
    """
    numel = max(1, nbytes // 4)
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    samples = interleaved_medians({"copy": lambda: dst.copy_(src)}, device, rounds=repeats, warmup=2,
                                  min_sample_s=0.01)
    return 2 * numel * 4 / statistics.median(samples["copy"])


def cpu_kernel_build_seconds() -> float | None:
    """Seconds to build the SLBI CPU kernel (float32) into an empty cache folder: the
    one-off cost the first step pays on a new machine; ``None`` without a C compiler."""
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        built = cpu_step.build(torch.float32, Path(scratch))
        return time.perf_counter() - start if built is not None else None


def clone_params(named: NamedParams) -> NamedParams:
    """Fresh parameters with copies of ``named``'s values and gradients."""
    out = []
    for name, param in named:
        fresh = nn.Parameter(param.detach().clone())
        fresh.grad = None if param.grad is None else param.grad.detach().clone()
        out.append((name, fresh))
    return out


def _time_sample(step: Callable[[], Any], device: torch.device, inner: int) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        step()
    sync(device)
    return (time.perf_counter() - start) / inner


def interleaved_medians(
    steps: dict[str, Callable[[], Any]],
    device: torch.device,
    rounds: int,
    warmup: int,
    min_sample_s: float,
) -> dict[str, list[float]]:
    """Per-step times of each callable over interleaved rounds (warm-up excluded).

    Each round calls every callable once (``inner`` times in a row for callables faster
    than ``min_sample_s``, ``inner`` fixed after the warm-up), in an order rotated by one
    every round. Returns the ``rounds`` per-step times of each callable.
    """
    names = list(steps)
    inner = dict.fromkeys(names, 1)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            per_step = _time_sample(steps[name], device, inner[name])
            if round_index >= warmup:
                samples[name].append(per_step)
            elif round_index == warmup - 1 and per_step < min_sample_s:
                inner[name] = min(1000, math.ceil(min_sample_s / max(per_step, 1e-7)))
    return samples


# ----------------------------------------------------------------------------- results


@dataclass
class Row:
    """Figures of one (parameter set, contender)."""

    set: str
    contender: str
    family: str
    backend: str | None
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
    paper_speedup: float | None = None  # paper median / this median
    bandwidth: float | None = None  # bytes per second
    floor_share: float | None = None  # bandwidth / copy bandwidth
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


def _backend_of(opt: Optimizer) -> str | None:
    buckets = getattr(opt, "_buckets", None)
    if not buckets:
        return None
    backends = sorted({str(getattr(b, "backend", "?")) for b in buckets})
    return "+".join(backends)


def _reset_compiler() -> None:
    """Forget compiled graphs so that each set starts like a fresh process (the on-disk
    caches stay) and no set hits Dynamo's recompile limit because of the previous ones."""
    with contextlib.suppress(Exception):  # best effort; the compiler may be unavailable
        torch._dynamo.reset()


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
    ``zero_grad`` is never called, so every step updates every parameter.
    """
    if reset_compiler:
        _reset_compiler()
    stats = set_stats(spec.shapes, spec.dtype)
    base = make_params(spec.shapes, device=device, dtype=spec.dtype, seed=0)
    opts: dict[str, tuple[Contender, Optimizer, NamedParams, float, tuple[float, float]]] = {}
    errors: dict[str, str] = {}
    for index, contender in enumerate(contenders):
        named = base if index == len(contenders) - 1 else clone_params(base)
        try:
            sync(device)
            start = time.perf_counter()
            opt = contender.build(named)
            sync(device)
            built = time.perf_counter()
            opt.step()
            sync(device)
            stepped = time.perf_counter()
            opt.step()
            sync(device)
            first = (stepped - built, time.perf_counter() - stepped)
            opts[contender.name] = (contender, opt, named, built - start, first)
        except Exception as exc:  # a failing contender is reported, not fatal
            errors[contender.name] = f"{type(exc).__name__}: {exc}"
    del base
    samples = interleaved_medians(
        {name: entry[1].step for name, entry in opts.items()}, device, rounds, warmup, min_sample_s
    )
    try:
        profiles = profile_steps({name: entry[1].step for name, entry in opts.items()}, device)
    except Exception as exc:  # a profiler failure costs the memory and dispatch figures only
        print(f"# profiling {spec.label} failed: {type(exc).__name__}: {exc}", flush=True)
        profiles = {name: StepProfile(None, None) for name in opts}
    rows = []
    for name, (contender, opt, named, build_s, first_s) in opts.items():
        params = [p for _, p in named]
        profile = profiles[name]
        finite = all(bool(torch.isfinite(p.detach()).all()) for p in params)
        rows.append(
            Row(
                set=spec.label,
                contender=name,
                family=contender.family,
                backend=_backend_of(opt),
                tensors=stats.tensors,
                numel=stats.numel,
                groups=stats.groups,
                param_bytes=stats.param_bytes,
                penalised_bytes=stats.penalised_bytes,
                build_s=build_s,
                first_step_s=first_s[0],
                second_step_s=first_s[1],
                median_s=statistics.median(samples[name]),
                samples_s=samples[name],
                step_bytes=step_bytes(contender.family, stats),
                state_bytes=state_bytes(opt, params),
                peak_extra_bytes=profile.peak_extra_bytes,
                dispatches=profile.dispatches,
                error=None if finite else "non-finite parameters after the run",
            )
        )
    for contender in contenders:
        if contender.name in errors:
            rows.append(
                Row(spec.label, contender.name, contender.family, None, stats.tensors, stats.numel,
                    stats.groups, stats.param_bytes, stats.penalised_bytes, math.nan, math.nan, math.nan,
                    math.nan, [], step_bytes(contender.family, stats), 0, None, None,
                    error=errors[contender.name])
            )
    del opts
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fill_derived(rows, copy_bw)
    return rows


def fill_derived(rows: list[Row], copy_bw: float | None) -> None:
    """Ratios to the fastest SGD and to the paper baseline, bandwidth, state vs SGD."""
    ok = [r for r in rows if r.error is None and math.isfinite(r.median_s)]
    sgd = [r for r in ok if r.family == FAMILY_SGD]
    fastest = min(sgd, key=lambda r: r.median_s) if sgd else None
    paper = next((r for r in ok if r.family == FAMILY_PAPER), None)
    for row in ok:
        row.bandwidth = row.step_bytes / row.median_s if row.median_s > 0 else None
        if copy_bw and row.bandwidth is not None:
            row.floor_share = row.bandwidth / copy_bw
        if fastest is not None:
            row.ratio_to_sgd = row.median_s / fastest.median_s
            row.state_vs_sgd = row.state_bytes - fastest.state_bytes
        if paper is not None and row.median_s > 0:
            row.paper_speedup = paper.median_s / row.median_s


# ----------------------------------------------------------------------------- training


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

    Each contender trains its own copy of the same initial model on the same fixed
    batch of ``N × 1 × 28 × 28`` inputs (``slbi_triton.train.models.build_model``).
    """
    from slbi_triton.train.models import build_model

    if reset_compiler:
        _reset_compiler()
    torch.manual_seed(0)
    base = build_model(model_name).to(device)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 1, 28, 28, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)
    loss_fn = nn.CrossEntropyLoss()
    iterations: dict[str, Callable[[], float]] = {}
    families: dict[str, str] = {}
    first: dict[str, float] = {}
    losses: dict[str, list[float]] = {}
    for contender in contenders:
        model = copy.deepcopy(base)
        opt = contender.build(list(model.named_parameters()))
        record: list[float] = []

        def iteration(model: nn.Module = model, opt: Optimizer = opt, record: list[float] = record) -> None:
            opt.zero_grad()
            loss = loss_fn(model(images), labels)
            loss.backward()
            opt.step()
            record.append(loss.detach())

        sync(device)
        start = time.perf_counter()
        iteration()
        sync(device)
        first[contender.name] = time.perf_counter() - start
        iterations[contender.name] = iteration
        families[contender.name] = contender.family
        losses[contender.name] = record
    samples = interleaved_medians(iterations, device, rounds, warmup, min_sample_s)
    rows = [
        TrainRow(model_name, batch, name, families[name], statistics.median(samples[name]),
                 samples[name], first[name], final_loss=float(losses[name][-1]))
        for name in iterations
    ]
    sgd = [r for r in rows if r.family == FAMILY_SGD]
    if sgd:
        fastest = min(r.median_s for r in sgd)
        for row in rows:
            row.overhead_pct = 100.0 * (row.median_s / fastest - 1.0)
    return rows


# ----------------------------------------------------------------------------- targets


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


def _find(rows: Sequence[Row], set_label: str, contender: str) -> Row | None:
    return next(
        (r for r in rows if r.set == set_label and r.contender == contender and r.error is None), None
    )


def state_overhead_bound(tensors: int, groups: int) -> int:
    """O(groups) allowance on top of SGD's momentum + one param-sized Z: per tensor, the
    flat-buffer alignment padding of W, g, Z and v (≤ 64 bytes each) plus table rows
    (64 bytes); per group a float32 norm (and as much spare); 64 KiB for fixed tables."""
    return 320 * tensors + 8 * groups + (64 << 10)


def state_within_bound(slbi: Row, sgd_state: int) -> tuple[bool, int]:
    """Whether SLBI's state is SGD's momentum + one param-sized Z + O(groups); returns the
    check and the bytes beyond ``sgd_state + param_bytes``."""
    extra = slbi.state_bytes - sgd_state
    beyond = extra - slbi.param_bytes
    ok = extra >= slbi.penalised_bytes and beyond <= state_overhead_bound(slbi.tensors, slbi.groups)
    return ok, beyond


def peak_within_bound(row: Row) -> bool:
    """No parameter-sized temporary: peak extra memory ≤ 1% of the parameter bytes + 64 KiB."""
    return row.peak_extra_bytes is not None and row.peak_extra_bytes <= row.param_bytes // 100 + (64 << 10)


def evaluate_targets(rows: Sequence[Row], device: torch.device, default: str) -> list[Target]:
    """The issue's targets for ``device``, evaluated on ``rows`` (contender ``default``)."""
    targets: list[Target] = []
    kind = device.type
    if kind == "cpu":
        for set_label in ("resnet18", "resnet50"):
            row = _find(rows, set_label, default)
            ratio = row.ratio_to_sgd if row else None
            targets.append(Target(
                f"CPU {default} step vs fastest SGD ({set_label})",
                f"{ratio:.2f}x" if ratio is not None else "not run", "<= 1.20x",
                None if ratio is None else ratio <= 1.2,
            ))
        for set_label in ("resnet18", "resnet50"):
            row = _find(rows, set_label, default)
            speedup = row.paper_speedup if row else None
            targets.append(Target(
                f"CPU {default} speed-up over PaperSLBI ({set_label})",
                f"{speedup:.2f}x" if speedup is not None else "not run", ">= 5.00x",
                None if speedup is None else speedup >= 5.0,
            ))
    else:
        row = _find(rows, "resnet50", default)
        share = row.floor_share if row else None
        targets.append(Target(
            f"GPU {default} bandwidth, share of copy floor (resnet50)",
            f"{100 * share:.1f}%" if share is not None else "not run", ">= 80%",
            None if share is None else share >= 0.8,
        ))
        fused = _find(rows, "resnet50", "sgd-fused")
        ratio = row.median_s / fused.median_s if row and fused else None
        targets.append(Target(
            f"GPU {default} step vs SGD(fused=True) (resnet50)",
            f"{ratio:.2f}x" if ratio is not None else "not run", "<= 1.50x",
            None if ratio is None else ratio <= 1.5,
        ))
        dtype_rows = [r for r in rows if r.contender == default and r.error is None and "@" not in r.set]
        counts = sorted({r.dispatches for r in dtype_rows if r.dispatches is not None})
        targets.append(Target(
            f"GPU {default} launches per step constant over sets and sweep",
            f"{counts[0]}..{counts[-1]} over {len(dtype_rows)} sets" if counts else "not measured",
            "min == max", None if not counts else counts[0] == counts[-1],
        ))
    # Memory targets, on every device.
    slbi_rows = [r for r in rows if r.contender == default and r.error is None]
    verdicts = []
    worst: tuple[int, str] | None = None
    for row in slbi_rows:
        sgd_states = [
            r.state_bytes for r in rows if r.set == row.set and r.family == FAMILY_SGD and r.error is None
        ]
        if not sgd_states:
            continue
        ok, beyond = state_within_bound(row, min(sgd_states))
        verdicts.append(ok)
        if worst is None or beyond > worst[0]:
            worst = (beyond, row.set)
    targets.append(Target(
        "state = SGD momentum + one param-sized Z + O(groups), all sets",
        f"max {worst[0] / 1024:.1f} KiB beyond ({worst[1]})" if worst else "not run",
        "<= 320 B/tensor + 8 B/group + 64 KiB",
        all(verdicts) if verdicts else None,
    ))
    for set_label in ("resnet18", "resnet50"):
        row = _find(rows, set_label, default)
        peak = row.peak_extra_bytes if row else None
        targets.append(Target(
            f"no param-sized temporary in step() ({set_label})",
            f"peak +{peak / 2**20:.2f} MiB ({100 * peak / row.param_bytes:.2f}% of params)"
            if row is not None and peak is not None else "not run",
            "<= 1% of params + 64 KiB",
            None if row is None or peak is None else peak_within_bound(row),
        ))
    return targets


# ----------------------------------------------------------------------------- formatting


def _fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{sign}{n / scale:.1f}{unit}"
    return f"{sign}{int(n)}B"


def _fmt_time(s: float | None) -> str:
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


STEP_COLUMNS = ("set", "params", "contender", "x fastest SGD", "paper/x", "median", "1st step", "2nd step",
                "bytes/step", "GB/s", "% floor", "state", "state-SGD", "peak extra", "dispatches")


def step_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """The per-(set, contender) table."""
    lines = []
    for r in rows:
        if r.error is not None and not math.isfinite(r.median_s):
            cells = [r.set, _fmt_count(r.numel), r.contender, "ERROR", r.error[:60]] + [""] * 10
        else:
            cells = [
                r.set, _fmt_count(r.numel), r.contender,
                _opt(r.ratio_to_sgd, ".2f"), _opt(r.paper_speedup, ".2f"),
                _fmt_time(r.median_s), _fmt_time(r.first_step_s), _fmt_time(r.second_step_s),
                _fmt_bytes(r.step_bytes),
                _opt(None if r.bandwidth is None else r.bandwidth / 1e9, ".1f"),
                _opt(None if r.floor_share is None else 100 * r.floor_share, ".0f"),
                _fmt_bytes(r.state_bytes), _fmt_bytes(r.state_vs_sgd), _fmt_bytes(r.peak_extra_bytes),
                "-" if r.dispatches is None else str(r.dispatches),
            ]
        lines.append(cells)
    return _render(STEP_COLUMNS, lines, markdown)


TRAIN_COLUMNS = ("model", "batch", "contender", "overhead vs SGD", "median iter", "first iter", "loss")


def train_table(rows: Sequence[TrainRow], markdown: bool = False) -> str:
    """The end-to-end training-iteration table."""
    lines = [
        [r.model, str(r.batch), r.contender,
         "-" if r.overhead_pct is None else f"{r.overhead_pct:+.1f}%",
         _fmt_time(r.median_s), _fmt_time(r.first_iter_s), _opt(r.final_loss, ".3f")]
        for r in rows
    ]
    return _render(TRAIN_COLUMNS, lines, markdown)


def target_table(targets: Sequence[Target], markdown: bool = False) -> str:
    """Each target with its measured value and verdict."""
    lines = [[t.name, t.measured, t.threshold, t.verdict] for t in targets]
    return _render(("target", "measured", "required", "verdict"), lines, markdown)


def _render(header: Sequence[str], lines: Sequence[Sequence[str]], markdown: bool) -> str:
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
