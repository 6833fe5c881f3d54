"""CUDA-only checks (skipped without a GPU; run by benchmarks/gpu_check.sh): the compiled
Triton kernel against the torch backend and the float64 reference, low-precision
buckets, and capture of a whole training step in a CUDA graph."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slbi_triton import SLBI

from .helpers import penalty_of, random_bucket
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
    refs = [RefParam(p, penalty_of(opt, p), HPARAMS) for p in params]
    for step_grads in grads:
        for p, g, ref in zip(params, step_grads, refs, strict=True):
            p.grad = g.clone()
            ref.step(g)
        opt.step()
    torch.cuda.synchronize()
    return params, opt, refs


def test_triton_kernel_matches_float64_and_torch_backend() -> None:
    params_k, opt_k, refs = run("triton", torch.float32)
    params_t, _, _ = run("torch", torch.float32)
    assert [info.kernel for info in opt_k.kernels()] == ["triton"]
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


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["state-fp32", "state-bf16"])
def test_training_step_captured_in_cuda_graph(state_dtype: torch.dtype | None) -> None:
    """Replays equal eager steps; with bfloat16 state too (the step counter that keys the
    stochastic rounding advances on the device, inside the graph)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.Flatten(), nn.Linear(8 * 12 * 12, 10)
    ).cuda()
    eager_model = copy.deepcopy(model)
    hparams = {"lr": 0.05, "lam": 0.05, "mu": 10.0, "state_dtype": state_dtype, "seed": 3}
    opt = SLBI(model.parameters(), **hparams)
    eager_opt = SLBI(eager_model.parameters(), **hparams)
    assert [info.kernel for info in opt.kernels()] == ["triton"]
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_kernel_matches_torch_reference_on_plain_tensors(dtype: torch.dtype) -> None:
    """The op on CUDA buffers (the compiled Triton kernel) against the torch reference:
    float64 to 1e-12, float32 to 1e-6 (the GPU may contract a*b+c into an FMA)."""
    shapes = [(7, 3, 5, 5), (64, 576), (13, 17), (3, 1000), (33,)]
    penalties = ["group", "group", "l1", "l1", "none"]
    bucket = random_bucket(shapes, penalties, dtype)
    expected = bucket.clone()
    on_gpu = bucket.to("cuda")
    for _ in range(3):
        on_gpu.run("cuda")
        expected.run("reference")
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for got, want in zip(on_gpu.outputs(), expected.outputs(), strict=True):
        assert rel_err(got.cpu(), want) <= tolerance


def test_bfloat16_state_on_cuda_matches_torch_reference() -> None:
    """Stochastic rounding on the GPU uses the reference's random bits: the stored Z and v
    equal the reference's except where float32 rounding of the value before rounding
    differs (FMA), by one bfloat16 ulp at most."""
    shapes, penalties = [(64, 576), (13, 17), (3, 1000)], ["group", "l1", "l1"]
    bucket = random_bucket(shapes, penalties, torch.float32, torch.bfloat16)
    expected = bucket.clone()
    on_gpu = bucket.to("cuda")
    on_gpu.run("cuda")
    expected.run("reference")
    for got, want in ((on_gpu.z, expected.z), (on_gpu.momentum, expected.momentum)):
        got = got.cpu()
        assert (got != want).float().mean() <= 1e-3
        ulp = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
        assert int(ulp.max()) <= 1
