"""Timing: interleaved medians, the copy-bandwidth floor and the CPU kernel's build time.

Every contender of a set is timed in the same rounds, in a rotating order, so that load
from other processes on a shared machine hits all of them alike; warm-up rounds are
excluded. Tiny steps repeat inside one sample so that a sample lasts at least
``min_sample_s``. Ratios between contenders are the figures to quote, never bare times.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from slbi_triton.kernels import cpu_step


def sync(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``fn()``'s result and the seconds the call took, ``device`` synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def _time_sample(step: Callable[[], Any], device: torch.device, inner: int) -> float:
    def repeat() -> None:
        for _ in range(inner):
            step()

    return timed(repeat, device)[1] / inner


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
    """Seconds to build one variant of the SLBI CPU kernel (float32) into an empty cache
    folder; ``None`` without a C compiler. The first use on a new machine pays this once
    per candidate variant, then the autotune's timing (``kernels/cpu_tune.py``)."""
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        built = cpu_step.build(torch.float32, torch.float32, Path(scratch))
        return time.perf_counter() - start if built is not None else None
