"""Peak extra memory and dispatch count of one optimizer step, from ``torch.profiler``.

- **peak extra memory**: CUDA: ``max_memory_allocated`` minus the memory allocated before
  the step. CPU: the peak of the running sum of the allocations and frees that the c10 CPU
  allocator reports to ``torch.profiler`` (``profile_memory``) during one step; this sees
  Inductor-generated code too (``TorchDispatchMode`` would not: it disables
  ``torch.compile``). Allocations outside the c10 allocator (OpenMP scratch) are not seen.
- **dispatches**: CUDA: device kernels, memcpys and memsets in the trace of one step. CPU:
  top-level operators (aten and this package's ``slbi_triton::`` op; metadata ops such as
  views excluded), each call of an Inductor-compiled graph counted once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.timing import sync

RANGE_PREFIX = "bench::"
"""Prefix of the ``record_function`` range around each profiled step."""
OPERATOR_PREFIXES = ("aten::", "slbi_triton::")
"""Operators counted as dispatches on the CPU (when not nested in another)."""

# Operators that only create metadata or uninitialised storage: not counted as dispatches.
_METADATA_OPS = frozenset(
    {
        "aten::view", "aten::as_strided", "aten::empty", "aten::empty_strided", "aten::detach",
        "aten::alias", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
        "aten::reshape", "aten::_reshape_alias", "aten::slice", "aten::select", "aten::expand",
        "aten::unsqueeze", "aten::squeeze", "aten::t", "aten::transpose", "aten::permute",
        "aten::_unsafe_view", "aten::empty_like", "aten::result_type", "aten::is_nonzero",
        "aten::item", "aten::_local_scalar_dense", "aten::set_", "aten::split", "aten::detach_",
    }
)


@dataclass
class StepProfile:
    """Peak extra memory and dispatch count of one step."""

    peak_extra_bytes: int | None
    dispatches: int | None


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


def _nested_in_operator(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith(RANGE_PREFIX):
        if parent.name.startswith(OPERATOR_PREFIXES):
            return True
        parent = parent.cpu_parent
    return False


def _cpu_dispatches(prof: torch.profiler.profile) -> dict[str, int]:
    """Per range: top-level operators (metadata ops excluded) and compiled-graph calls."""
    counts: dict[str, int] = {}
    for event in prof.events():
        name = event.name
        operator = name.startswith(OPERATOR_PREFIXES) and name not in _METADATA_OPS
        if "CompiledFxGraph" not in name and (not operator or _nested_in_operator(event)):
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


def _cuda_peaks(steps: dict[str, Callable[[], Any]], device: torch.device) -> dict[str, int]:
    peaks = {}
    for name, step in steps.items():
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        peaks[name] = torch.cuda.max_memory_allocated(device) - before
    return peaks


def profile_steps(steps: dict[str, Callable[[], Any]], device: torch.device) -> dict[str, StepProfile]:
    """Peak extra memory and dispatches of one call of each step (module docstring).

    One profiler session covers all steps, each inside a ``record_function`` range and
    followed by a device synchronisation, so device work lands inside its own range.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = device.type == "cuda"
    peaks = _cuda_peaks(steps, device) if cuda else {}
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities, profile_memory=not cuda) as prof:
        for name, step in steps.items():
            with record_function(RANGE_PREFIX + name):
                step()
                sync(device)
    if cuda:
        ranges_us = {
            e.name[len(RANGE_PREFIX):]: (e.time_range.start, e.time_range.end)
            for e in prof.events()
            if e.name.startswith(RANGE_PREFIX) and e.device_type == torch.autograd.DeviceType.CPU
        }
        counts = _cuda_dispatches(prof, ranges_us)
        return {n: StepProfile(peaks.get(n), counts.get(n) or None) for n in steps}
    ranges_ns = {
        e.name()[len(RANGE_PREFIX):]: (e.start_ns(), e.end_ns())
        for e in prof.profiler.kineto_results.events()
        if e.name().startswith(RANGE_PREFIX)
    }
    peaks = _memory_peaks(prof, ranges_ns)
    counts = _cpu_dispatches(prof)
    return {n: StepProfile(peaks.get(n), counts.get(n, 0)) for n in steps}


def profile_step(step: Callable[[], Any], device: torch.device) -> StepProfile:
    """:func:`profile_steps` for a single step."""
    return profile_steps({"step": step}, device)["step"]
