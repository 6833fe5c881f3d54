"""CUDA-only checks (skipped without a GPU; run by benchmarks/gpu_check.sh): the compiled
Triton kernel against the torch backend and the float64 reference, low-precision
buckets, and capture of a whole training step in a CUDA graph."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slbi_triton import SLBI

from .reference import RefParam, rel_err

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.version.hip is not None, reason="needs an NVIDIA GPU"
)

SHAPES = [(1,), (7,), (13, 17), (3, 1000), (7, 3, 5, 5), (5, 4, 2), (64, 576), (9, 600, 1, 1), (513, 4608)]
HPARAMS = {"lr": 0.07, "kappa": 1.5, "mu": 3.0, "lam": 0.5, "momentum": 0.8, "dampening": 0.2,
           "weight_decay": 1e-2}


def run(backend: str, dtype: torch.dtype, steps: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen).to("cuda", dtype)) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to("cuda", dtype) for s in SHAPES] for _ in range(steps)]
    opt = SLBI(params, backend=backend, **HPARAMS)
    refs = [RefParam(p, slot.penalty, HPARAMS) for p, slot in zip(params, opt._slots, strict=True)]
    for step_grads in grads:
        for slot, g, ref in zip(opt._slots, step_grads, refs, strict=True):
            slot.param.grad.copy_(g)
            slot.grad_seen = True
            ref.step(g)
        opt.step()
    torch.cuda.synchronize()
    return params, opt, refs


def test_triton_kernel_matches_float64_and_torch_backend() -> None:
    params_k, opt_k, refs = run("triton", torch.float32)
    params_t, _, _ = run("torch", torch.float32)
    assert all(b.backend == "triton" for b in opt_k._buckets)
    for a, b, ref in zip(params_k, params_t, refs, strict=True):
        assert rel_err(a, ref.w) <= 1e-5, a.shape
        assert rel_err(a, b) <= 1e-6, a.shape
        if ref.penalty != "none":
            assert rel_err(opt_k.state[a]["z"], ref.z) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_buckets_match_torch_backend(dtype: torch.dtype) -> None:
    params_k, _, refs = run("triton", dtype)
    params_t, _, _ = run("torch", dtype)
    for a, b, ref in zip(params_k, params_t, refs, strict=True):
        assert a.dtype == dtype
        # Same float32 math and round-to-nearest stores: at most an ulp apart.
        assert rel_err(a, b) <= 1e-3, a.shape
        assert rel_err(a, ref.w) <= 1e-2, a.shape


def test_deterministic_on_gpu() -> None:
    first, _, _ = run("triton", torch.float32, seed=3)
    second, _, _ = run("triton", torch.float32, seed=3)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_training_step_captured_in_cuda_graph() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.Flatten(), nn.Linear(8 * 12 * 12, 10)
    ).cuda()
    eager_model = copy.deepcopy(model)
    opt = SLBI(model.parameters(), lr=0.05, lam=0.05, mu=10.0)
    eager_opt = SLBI(eager_model.parameters(), lr=0.05, lam=0.05, mu=10.0)
    assert opt._buckets[0].backend == "triton"
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(32, 3, 16, 16, device="cuda", generator=gen),
                torch.randint(0, 10, (32,), device="cuda", generator=gen)) for _ in range(8)]

    def train_step(m, o, x, y):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    # Warm up on a side stream (two steps: the first has no momentum history).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:2]:
            static_x.copy_(x)
            static_y.copy_(y)
            train_step(model, opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in batches[:2]:
        train_step(eager_model, eager_opt, x, y)

    graph = torch.cuda.CUDAGraph()
    allocated = torch.cuda.memory_allocated()
    with torch.cuda.graph(graph):
        train_step(model, opt, static_x, static_y)
    for x, y in batches[2:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        train_step(eager_model, eager_opt, x, y)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - allocated < 64 * 2**20  # the graph's pool only
    for a, b in zip(model.parameters(), eager_model.parameters(), strict=True):
        assert rel_err(a, b) <= 1e-5
