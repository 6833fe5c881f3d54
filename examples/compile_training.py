"""The user guide's "Compiling a training loop" (docs/usage.md), as a script: module-level globals, a whole
training step (forward, backward, ``opt.step()``) compiled with ``fullgraph=True``, and an
LR scheduler changing ``lr`` every step. It compiles twice (the first step; then the
momentum buffer holds history) and never again.

    python examples/compile_training.py [STEPS] [BACKEND]   # default: 300 inductor

Prints the time of the first and second call (they compile), the median of the later
ones and the number of compiled frames.
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from slbi_triton import SLBI

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 300
BACKEND = sys.argv[2] if len(sys.argv) > 2 else "inductor"

torch._dynamo.config.trace_autograd_ops = True  # Dynamo traces loss.backward() (torch >= 2.13)
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    nn.Linear(16 * 5 * 5, 84), nn.ReLU(), nn.Linear(84, 10),
)
opt = SLBI(model.named_parameters(), lr=torch.tensor(0.1), kappa=1.0, mu=100.0, lam=1.0)
scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.999)  # lr changes every step
compiles = CompileCounterWithBackend(BACKEND)  # counts the frames Dynamo compiles


@torch.compile(fullgraph=True, backend=compiles)
def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


data = torch.Generator().manual_seed(1)
seconds = []
for _ in range(STEPS):
    x, y = torch.randn(128, 1, 28, 28, generator=data), torch.randint(0, 10, (128,), generator=data)
    started = time.perf_counter()
    loss = train_step(x, y)
    seconds.append(time.perf_counter() - started)
    scheduler.step()

later = statistics.median(seconds[2:]) if STEPS > 2 else float("nan")
print(f"backend {BACKEND}: first call {seconds[0]:.2f} s, second {seconds[1]:.2f} s, later calls "
      f"{1e3 * later:.1f} ms (median of {STEPS - 2}); lr now {float(opt.param_groups[0]['lr']):.4f}")
print(f"compiled frames: {compiles.frame_count} in {STEPS} steps; final loss {float(loss):.4f}")
