"""How fast can any SLBI step be, next to fused SGD? Time the memory traffic alone.

Usage: python -m benchmarks.traffic_floor [--numel N] [--rounds R] [--threads T] [--device D]

SGD with momentum reads W, g, v and writes W, v (5 parameter-sized arrays); SLBI also
reads and writes Z (7). This script times, side by side in one process, ``SGD(fused=True)``,
SLBI's step on one flat tensor of the same size (penalty l1), with float32 and with
bfloat16 state (the same 20 bytes an element as SGD's, in 7 arrays), and two Inductor loops
that only add arrays in place (no optimizer math): one with SGD's 5-array traffic, one
with SLBI's 7. The 7-array loop over fused SGD is what moving SLBI's bytes costs with
torch's allocator (4 KiB pages); SLBI's own buffers of 4 MiB or more are on huge pages
(``slbi_triton.hugepages``), so its step can come in below that loop. (The same loop with
Z and v in bfloat16 is no floor: Inductor's in-place bfloat16 adds take 2.2 × fused SGD.)
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.timing import interleaved_medians
from slbi_triton import SLBI


def _five_arrays(w: torch.Tensor, g: torch.Tensor, v: torch.Tensor) -> None:
    v.add_(g)  # reads g, v; writes v
    w.add_(v)  # reads w; writes w (v comes from the same fused loop)


def _seven_arrays(w: torch.Tensor, g: torch.Tensor, z: torch.Tensor, v: torch.Tensor) -> None:
    v.add_(g)
    w.add_(v)
    z.add_(w)  # reads z; writes z


def measure(numel: int, rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each contender, measured in interleaved rounds."""
    make = lambda: torch.randn(numel, device=device) * 1e-3  # noqa: E731
    sgd_param = torch.nn.Parameter(make())
    sgd_param.grad = make()
    sgd = torch.optim.SGD([sgd_param], lr=1e-3, momentum=0.9, fused=True)
    slbi_param = torch.nn.Parameter(make().view(-1, 1000) if numel % 1000 == 0 else make().view(1, -1))
    slbi_param.grad = make().view_as(slbi_param)
    slbi = SLBI([slbi_param], lr=1e-3, momentum=0.9, penalty="l1")
    bf16_param = torch.nn.Parameter(slbi_param.detach().clone())
    bf16_param.grad = slbi_param.grad.clone()
    slbi_bf16 = SLBI([bf16_param], lr=1e-3, momentum=0.9, penalty="l1", state_dtype=torch.bfloat16)
    w, g, z, v = (make() for _ in range(4))
    five = torch.compile(_five_arrays)
    seven = torch.compile(_seven_arrays)
    steps = {
        "sgd-fused": sgd.step,
        "slbi": slbi.step,
        "slbi, bf16 state": slbi_bf16.step,
        "5 arrays (SGD's traffic)": lambda: five(w, g, v),
        "7 arrays (SLBI's traffic)": lambda: seven(w, g, z, v),
    }
    samples = interleaved_medians(steps, device, rounds=rounds, warmup=3, min_sample_s=0.01)
    return {name: statistics.median(times) for name, times in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=11_689_512, help="elements (default: ResNet-18's)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    medians = measure(args.numel, args.rounds, device)
    sgd = medians["sgd-fused"]
    print(f"{args.numel:,} float32 elements on {device.type} ({torch.get_num_threads()} threads), "
          f"median of {args.rounds} interleaved rounds")
    for name, seconds in medians.items():
        print(f"  {name:28s} {seconds * 1e3:8.3f} ms   {seconds / sgd:5.2f} x fused SGD")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
