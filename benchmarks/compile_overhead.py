"""Measure what compiling a training step with SLBI costs and gains (CPU or CUDA).

Usage: python -m benchmarks.compile_overhead [--device cpu|cuda] [--steps N]

Prints the eager step time, the first compiled call (tracing + Inductor compile), the
second call (the momentum buffer becomes ready: one more graph), and the compiled steady
state, for LeNet on 28×28 inputs (batch 128), all measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.timing import timed
from slbi_triton import SLBI
from slbi_triton.train.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    # Dynamo traces loss.backward() only where this switch exists (torch >= 2.13);
    # elsewhere the backward pass is a graph break and only the rest compiles.
    fullgraph = hasattr(torch._dynamo.config, "trace_autograd_ops")
    if fullgraph:
        torch._dynamo.config.trace_autograd_ops = True
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 28, 28, generator=gen).to(args.device)
    y = torch.randint(0, 10, (128,), generator=gen).to(args.device)

    def make_step() -> Callable[[], None]:
        torch.manual_seed(0)
        model = build_model("lenet").to(args.device)
        opt = SLBI(model.parameters(), lr=torch.tensor(0.1, device=args.device))

        def train_step() -> None:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        return train_step

    eager = make_step()
    eager()
    eager()
    device = torch.device(args.device)
    eager_times = [timed(eager, device)[1] for _ in range(args.steps)]
    compiled = torch.compile(make_step(), fullgraph=fullgraph)
    _, first = timed(compiled, device)
    _, second = timed(compiled, device)
    compiled_times = [timed(compiled, device)[1] for _ in range(args.steps)]
    eager_ms = 1e3 * statistics.median(eager_times)
    compiled_ms = 1e3 * statistics.median(compiled_times)
    print(f"device {args.device}, torch {torch.__version__}, LeNet batch 128, {args.steps} timed steps, "
          f"fullgraph={fullgraph}")
    print(f"eager step (median)           {eager_ms:9.1f} ms")
    print(f"compiled: first call          {1e3 * first:9.1f} ms  (trace + compile)")
    print(f"compiled: second call         {1e3 * second:9.1f} ms  (momentum ready: one more graph)")
    print(f"compiled step (median)        {compiled_ms:9.1f} ms  ({compiled_ms / eager_ms:.2f}x eager)")


if __name__ == "__main__":
    main()
