"""What huge pages and each variant of the C kernel buy on this CPU, and how close the
autotune's choice comes to the best variant.

Usage: python -m benchmarks.cpu_ablation [--sets resnet18,resnet50] [--scale S] [--rounds R]
[--threads T]

Times side by side, in one process and interleaved rounds, ``SGD(fused=True)`` and, for
float32 and bfloat16 state, SLBI as shipped (the autotuned variant, ``SLBI.kernels()``);
with its flat buffers from ``torch.zeros`` on 4 KiB pages (``slbi_triton.hugepages.MIN_BYTES``
raised while it is built); and the same optimizer as shipped stepped with each variant the
autotune picks from (``cpu_step.using_variant``: the same buffers, so only the code
differs). Each is printed as a multiple of fused SGD's step; per state, the last line
compares the autotuned variant with the fastest fixed one. The variants write the same
W, Z and v (``tests/test_c_kernel.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
from slbi_triton.kernels import cpu_step, cpu_tune

from benchmarks import param_sets
from benchmarks.contenders import SGD_HPARAMS, SLBI_HPARAMS
from benchmarks.timing import interleaved_medians
from slbi_triton import SLBI, hugepages

CPU = torch.device("cpu")
STATES = (("fp32", torch.float32), ("bf16", torch.bfloat16))


def _slbi(shapes: param_sets.ParamShapes, state_dtype: torch.dtype, huge_pages: bool) -> SLBI:
    saved = hugepages.MIN_BYTES
    if not huge_pages:
        hugepages.MIN_BYTES = sys.maxsize
    try:
        option = None if state_dtype == torch.float32 else state_dtype
        return SLBI(param_sets.make_params(shapes), state_dtype=option, **SLBI_HPARAMS)
    finally:
        hugepages.MIN_BYTES = saved


def _with_variant(step: Callable[[], object], name: str) -> Callable[[], None]:
    def run() -> None:
        with cpu_step.using_variant(name):
            step()

    return run


def contenders(shapes: param_sets.ParamShapes) -> dict[str, Callable[[], object]]:
    """The step of each contender, by name; fused SGD first. A fixed variant's name is
    ``"slbi {state} state, {variant}"``."""
    sgd = torch.optim.SGD([p for _, p in param_sets.make_params(shapes)], **SGD_HPARAMS, fused=True)
    steps: dict[str, Callable[[], object]] = {"sgd-fused": sgd.step}
    for label, state_dtype in STATES:
        shipped = _slbi(shapes, state_dtype, huge_pages=True)
        steps[f"slbi {label} state, autotuned"] = shipped.step
        steps[f"slbi {label} state, 4 KiB pages"] = _slbi(shapes, state_dtype, huge_pages=False).step
        for variant in cpu_tune.candidates():
            steps[f"slbi {label} state, {variant.name}"] = _with_variant(shipped.step, variant.name)
    return steps


def measure(shapes: param_sets.ParamShapes, rounds: int) -> dict[str, float]:
    """Median seconds per step of each contender, measured in interleaved rounds."""
    samples = interleaved_medians(contenders(shapes), CPU, rounds=rounds, warmup=3, min_sample_s=0.01)
    return {name: statistics.median(times) for name, times in samples.items()}


def autotune_line(medians: dict[str, float], label: str, chosen: str | None) -> str:
    """The autotuned variant's step next to the fastest fixed variant's."""
    prefix = f"slbi {label} state, "
    fixed = {name[len(prefix):]: t for name, t in medians.items()
             if name.startswith(prefix) and name[len(prefix):] not in ("autotuned", "4 KiB pages")}
    best = min(fixed, key=fixed.__getitem__)
    tuned = medians[f"{prefix}autotuned"]
    return (f"  {label} state: autotuned {chosen} {tuned / fixed[best]:.3f} x the fastest fixed variant "
            f"({best}); {chosen} fixed {fixed[chosen] / fixed[best]:.3f} x")


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
    chosen = {label: cpu_step.variant(torch.float32, state_dtype) for label, state_dtype in STATES}
    if not all(cpu_step.available(torch.float32, state_dtype) for _, state_dtype in STATES):
        raise SystemExit("the C kernel cannot be built here: nothing to compare")
    print(f"# CPU: {cpu_tune.describe()}")
    print("# C kernel variants: " + ", ".join(f"{label} state {name}" for label, name in chosen.items()))
    for name in args.sets.split(","):
        shapes = getattr(param_sets, name)(args.scale)
        medians = measure(shapes, args.rounds)
        sgd = medians["sgd-fused"]
        print(f"{name} ({param_sets.numel_of(shapes):,} parameters, {torch.get_num_threads()} threads, "
              f"median of {args.rounds} interleaved rounds)")
        for contender, seconds in medians.items():
            print(f"  {contender:36s} {seconds * 1e3:8.3f} ms   {seconds / sgd:5.2f} x fused SGD")
        for label, _ in STATES:
            print(autotune_line(medians, label, chosen[label]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
