"""The places a compiled training step finds its optimizer, as users write them: module
globals, a closure, an attribute of a trainer object, and ``torch.compile(opt.step)``
alone (torch's compiled-optimizer recipe). Each ``run_*`` trains ``steps`` steps with an
LR scheduler changing ``lr`` every step, compiled with ``backend`` (``None``: eager), and
returns the final weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from slbi_triton import SLBI

LOSS = nn.functional.cross_entropy


def build(lr_kind: str) -> tuple[nn.Module, SLBI, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    lr = torch.tensor(0.1) if lr_kind == "tensor" else 0.1
    optimizer = SLBI(net.named_parameters(), lr=lr, lam=0.01, mu=10.0)
    return net, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.99)


def batches(steps: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator))
            for _ in range(steps)]


def compiled(function: Callable, backend) -> Callable:
    return function if backend is None else torch.compile(function, backend=backend, fullgraph=True)


def train(step: Callable[[Tensor, Tensor], None], scheduler, steps: int) -> None:
    for x, y in batches(steps):
        step(x, y)
        scheduler.step()


# -- module globals, the way most training scripts are written -----------------------

model: nn.Module | None = None
opt: SLBI | None = None


def global_train_step(x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    LOSS(model(x), y).backward()
    opt.step()


def run_global(backend, lr_kind: str, steps: int) -> list[Tensor]:
    global model, opt
    model, opt, scheduler = build(lr_kind)
    train(compiled(global_train_step, backend), scheduler, steps)
    return list(model.parameters())


# -- a closure -----------------------------------------------------------------------


def run_closure(backend, lr_kind: str, steps: int) -> list[Tensor]:
    net, optimizer, scheduler = build(lr_kind)

    def train_step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad()
        LOSS(net(x), y).backward()
        optimizer.step()

    train(compiled(train_step, backend), scheduler, steps)
    return list(net.parameters())


# -- an attribute of a trainer object ----------------------------------------------------


class Trainer:
    def __init__(self, lr_kind: str) -> None:
        self.model, self.opt, self.scheduler = build(lr_kind)

    def train_step(self, x: Tensor, y: Tensor) -> None:
        self.opt.zero_grad()
        LOSS(self.model(x), y).backward()
        self.opt.step()


def run_trainer(backend, lr_kind: str, steps: int) -> list[Tensor]:
    trainer = Trainer(lr_kind)
    train(compiled(trainer.train_step, backend), trainer.scheduler, steps)
    return list(trainer.model.parameters())


# -- torch.compile(opt.step) alone, eager backward --------------------------------------


def run_opt_step(backend, lr_kind: str, steps: int) -> list[Tensor]:
    net, optimizer, scheduler = build(lr_kind)
    compiled_step = compiled(optimizer.step, backend)

    def train_step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad()
        LOSS(net(x), y).backward()
        compiled_step()

    train(train_step, scheduler, steps)
    return list(net.parameters())


HOLDERS = {"global": run_global, "closure": run_closure, "trainer": run_trainer, "opt_step": run_opt_step}
