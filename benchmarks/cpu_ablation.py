"""What huge pages and the C kernel's software prefetch each buy on the CPU.

Usage: python -m benchmarks.cpu_ablation [--sets resnet18,resnet50] [--scale S] [--rounds R]
[--threads T]

Times side by side, in one process and interleaved rounds, ``SGD(fused=True)`` and, for
float32 and bfloat16 state, SLBI three ways: as shipped; with its flat buffers from
``torch.zeros`` on 4 KiB pages (``slbi_triton.hugepages.MIN_BYTES`` raised while it is
built); and with the C kernel's tiled, prefetching walk switched the other way (off for
bfloat16 state, on from bfloat16's threshold for float32 state; ``cpu_step.PREFETCH_MIN_NUMEL``
changed around its steps). Each is printed as a multiple of fused SGD's step. The three
SLBI variants write the same W, Z and v (``tests/test_c_kernel.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
from slbi_triton.kernels import cpu_step

from benchmarks import param_sets
from benchmarks.contenders import SGD_HPARAMS, SLBI_HPARAMS
from benchmarks.timing import interleaved_medians
from slbi_triton import SLBI, hugepages

CPU = torch.device("cpu")


def _slbi(shapes: param_sets.ParamShapes, state_dtype: torch.dtype | None, huge_pages: bool) -> SLBI:
    saved = hugepages.MIN_BYTES
    if not huge_pages:
        hugepages.MIN_BYTES = sys.maxsize
    try:
        return SLBI(param_sets.make_params(shapes), state_dtype=state_dtype, **SLBI_HPARAMS)
    finally:
        hugepages.MIN_BYTES = saved


def _prefetch_switched(step: Callable[[], object], state_dtype: torch.dtype) -> Callable[[], None]:
    """``step`` with the prefetch threshold of ``state_dtype`` switched: on if it is off."""
    shipped = cpu_step.PREFETCH_MIN_NUMEL.get(state_dtype, cpu_step.NO_PREFETCH)
    bfloat16_threshold = cpu_step.PREFETCH_MIN_NUMEL[torch.bfloat16]
    switched = bfloat16_threshold if shipped == cpu_step.NO_PREFETCH else cpu_step.NO_PREFETCH

    def run() -> None:
        cpu_step.PREFETCH_MIN_NUMEL[state_dtype] = switched
        try:
            step()
        finally:
            if shipped == cpu_step.NO_PREFETCH:
                del cpu_step.PREFETCH_MIN_NUMEL[state_dtype]
            else:
                cpu_step.PREFETCH_MIN_NUMEL[state_dtype] = shipped

    return run


def contenders(shapes: param_sets.ParamShapes) -> dict[str, Callable[[], object]]:
    """The step of each contender, by name; fused SGD first."""
    sgd = torch.optim.SGD([p for _, p in param_sets.make_params(shapes)], **SGD_HPARAMS, fused=True)
    steps: dict[str, Callable[[], object]] = {"sgd-fused": sgd.step}
    for label, state_dtype in (("fp32 state", torch.float32), ("bf16 state", torch.bfloat16)):
        option = None if state_dtype == torch.float32 else state_dtype
        steps[f"slbi {label}"] = _slbi(shapes, option, huge_pages=True).step
        steps[f"slbi {label}, 4 KiB pages"] = _slbi(shapes, option, huge_pages=False).step
        prefetch = "no prefetch" if state_dtype in cpu_step.PREFETCH_MIN_NUMEL else "prefetch"
        steps[f"slbi {label}, {prefetch}"] = _prefetch_switched(_slbi(shapes, option, True).step, state_dtype)
    return steps


def measure(shapes: param_sets.ParamShapes, rounds: int) -> dict[str, float]:
    """Median seconds per step of each contender, measured in interleaved rounds."""
    samples = interleaved_medians(contenders(shapes), CPU, rounds=rounds, warmup=3, min_sample_s=0.01)
    return {name: statistics.median(times) for name, times in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", default="resnet18,resnet50", help="comma-separated set names")
    parser.add_argument("--scale", type=int, default=1, help="width divisor (param_sets)")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.sets.split(","):
        shapes = getattr(param_sets, name)(args.scale)
        medians = measure(shapes, args.rounds)
        sgd = medians["sgd-fused"]
        print(f"{name} ({param_sets.numel_of(shapes):,} parameters, {torch.get_num_threads()} threads, "
              f"median of {args.rounds} interleaved rounds)")
        for contender, seconds in medians.items():
            print(f"  {contender:32s} {seconds * 1e3:8.3f} ms   {seconds / sgd:5.2f} x fused SGD")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
