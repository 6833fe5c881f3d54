"""DistributedDataParallel (gloo, CPU, two processes on 127.0.0.1): both ranks keep
identical weights, equal to one process training on the combined batch, with DDP's
default gradient buckets and with ``gradient_as_bucket_view=True``."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn

from slbi_triton import SLBI

from .helpers import flat_storages
from .reference import rel_err

WORLD = 2
STEPS = 6
BATCH = 8  # the combined batch; each rank takes BATCH // WORLD
MODES = (False, True)  # gradient_as_bucket_view


class DdpNet(nn.Module):
    """No BatchNorm: its batch statistics would differ between half and whole batches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)
        with torch.no_grad():
            self.conv.weight.mul_(torch.linspace(0.2, 2.0, 4).view(4, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def build() -> tuple[DdpNet, SLBI]:
    torch.manual_seed(0)
    model = DdpNet()
    opt = SLBI(model.named_parameters(), lr=0.1, mu=5.0, lam=0.05, momentum=0.9, backend="torch", fused=False)
    return model, opt


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 1, 8, 8, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        share = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        for bucket_view in MODES:
            model, opt = build()
            ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
            foreign_grads, ours = 0, set()
            params = list(model.parameters())
            for step in range(STEPS):
                x, y = batch(step)
                opt.zero_grad()
                F.cross_entropy(ddp(x[share]), y[share]).backward()
                if ours:  # grads outside our flat gradient buffer
                    foreign_grads += sum(p.grad.untyped_storage().data_ptr() not in ours for p in params)
                opt.step()
                ours = flat_storages([p.grad for p in params])
                assert len(ours) == 1  # after a step every gradient is a view into our buffer
            # Default: DDP copies the averaged gradients into our views, in place. With
            # bucket views: DDP points .grad at its buckets every step; step() copies back.
            assert foreign_grads == ((STEPS - 1) * len(params) if bucket_view else 0)
            state = {name: p.detach().clone() for name, p in model.named_parameters()}
            state.update({f"{n}/z": opt.state[p]["z"].clone() for n, p in model.named_parameters()
                          if "z" in opt.state[p]})
            torch.save(state, Path(out) / f"rank{rank}_view{bucket_view}.pt")
        # Both ranks done with every collective before either closes its connections (a
        # rank that tears down first can abort the other's gloo threads).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done and saved: leave without C++ static destructors. A normal exit right after the
    # group is destroyed can still meet a live gloo thread and abort the process
    # ("terminate called without an active exception", seen once in a full run).
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_ranks_agree_with_one_process(tmp_path) -> None:
    context = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP workers did not finish in 180 s")

    model, opt = build()  # one process, the combined batch
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    single = {name: p.detach() for name, p in model.named_parameters()}
    single.update({f"{n}/z": opt.state[p]["z"] for n, p in model.named_parameters() if "z" in opt.state[p]})

    for bucket_view in MODES:
        files = [tmp_path / f"rank{rank}_view{bucket_view}.pt" for rank in range(WORLD)]
        ranks = [torch.load(file, weights_only=True) for file in files]
        assert ranks[0].keys() == single.keys()
        for key, value in single.items():
            assert torch.equal(ranks[0][key], ranks[1][key]), (bucket_view, key)
            assert rel_err(ranks[0][key], value) <= 1e-6, (bucket_view, key)
