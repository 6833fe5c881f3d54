"""Every kernel through the optimizer (Triton under TRITON_INTERPRET=1, the C kernel,
Inductor, eager torch ops) against the independent float64 reference, on odd sizes and
every dtype; one kernel call per bucket and step whatever the number of tensors."""

from __future__ import annotations

import pytest
import torch
from slbi_triton.kernels import cpu_step
from torch import nn

from slbi_triton import SLBI

from .helpers import HPARAMS, KERNELS, penalty_of
from .reference import RefParam, rel_err

# Odd sizes: a 1-element tensor, ragged l1 tails, tiny and long groups (a row longer than
# one tile of columns), a 3-D group tensor and a 1×1 conv.
SHAPES = [(1,), (7,), (13, 17), (3, 1000), (7, 3, 5, 5), (5, 4, 2), (3, 300), (9, 600, 1, 1), (33,)]


def make_case(dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    z_init = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    for z in z_init:
        if z.dim() >= 3:  # spread ‖Z_g‖ over [0, 2λ]: some filters in the support, some out
            scale = torch.linspace(0, 2 * HPARAMS["lam"], z.shape[0]) / z.reshape(z.shape[0], -1).norm(dim=1)
            z.mul_(scale.reshape([-1] + [1] * (z.dim() - 1)).to(dtype))
    z_init[4][2].zero_()  # one filter with Z_g = 0 (its norm is 0: no NaN)
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES] for _ in range(6)]
    return params, z_init, grads


def run(kernel: str, dtype: torch.dtype, seed: int = 0, monkeypatch=None):
    """Six steps from a given Z (loaded through the state dict, norms recomputed)."""
    params, z_init, grads = make_case(dtype, seed)
    backend, fused = KERNELS[kernel]
    if kernel == "inductor" and monkeypatch is not None:
        monkeypatch.setattr(cpu_step, "available", lambda *args: False)
    opt = SLBI(params, backend=backend, fused=fused, **HPARAMS)
    state_dict = opt.state_dict()
    refs = []
    for index, (p, z) in enumerate(zip(params, z_init, strict=True)):
        ref = RefParam(p, penalty_of(opt, p), HPARAMS)
        if ref.penalty != "none":
            state_dict["state"][index] = {"z": z.clone()}
            ref.z = z.to(torch.float64)
            ref.initial_gamma = ref.gamma()
        refs.append(ref)
    opt.load_state_dict(state_dict)
    for step_grads in grads:
        for p, g, ref in zip(params, step_grads, refs, strict=True):
            p.grad = g.clone()
            ref.step(g)
        opt.step()
    return params, opt, refs


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_random_inputs_match_float64(kernel: str, monkeypatch) -> None:
    params, opt, refs = run(kernel, torch.float32, monkeypatch=monkeypatch)
    if kernel != "c" or cpu_step.available(torch.float32):
        assert [info.kernel for info in opt.kernels()] == [kernel]
    assert {ref.penalty for ref in refs} == {"none", "l1", "group"}
    for p, ref in zip(params, refs, strict=True):
        assert rel_err(p, ref.w) <= 1e-5, p.shape
        if ref.penalty != "none":
            assert rel_err(opt.state[p]["z"], ref.z) <= 1e-5, p.shape
            gamma = ref.initial_gamma.reshape(p.shape[0], -1)
            selected = gamma.abs().sum(dim=1) > 0 if ref.penalty == "group" else gamma != 0
            # At the start, part of each tensor is in the support and part is not.
            assert 0 < int(selected.sum()) < selected.numel(), p.shape
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_float64_parameters_update_in_float64(kernel: str, monkeypatch) -> None:
    """float64 models keep float64 arithmetic everywhere, group norms included."""
    params, opt, refs = run(kernel, torch.float64, monkeypatch=monkeypatch)
    assert [info.dtype for info in opt.kernels()] == [torch.float64]
    for p, ref in zip(params, refs, strict=True):
        assert p.dtype == torch.float64
        assert rel_err(p, ref.w) <= 1e-12, p.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_buckets(dtype: torch.dtype) -> None:
    params_t, _, refs = run("inductor", dtype, seed=1)
    params_k, opt_k, _ = run("triton", dtype, seed=1)
    assert [(info.kernel, info.dtype) for info in opt_k.kernels()] == [("triton", dtype)]
    # Triton's CPU interpreter rounds float32 → bfloat16 by truncation (the GPU rounds to
    # nearest even), so under the interpreter bf16 results drift by a few ulps per step;
    # the GPU check (benchmarks/gpu_check.sh) holds bf16 to the torch backend tightly.
    interpreted_bf16 = dtype == torch.bfloat16
    for a, b, ref in zip(params_k, params_t, refs, strict=True):
        assert a.dtype == dtype
        assert rel_err(b, ref.w) <= 1e-2  # the torch backend: float32 math, stored in dtype
        assert rel_err(a, ref.w) <= (4e-2 if interpreted_bf16 else 1e-2)
        if not interpreted_bf16:
            assert rel_err(a, b) <= 1e-4
        if ref.penalty != "none":
            assert opt_k.state[a]["z"].dtype == dtype


def test_mixed_dtypes_get_one_bucket_each() -> None:
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5, 2).bfloat16()),
              nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(3, 3).half())]
    opt = SLBI(params, backend="triton")
    kernels = opt.kernels()
    assert sorted(str(info.dtype) for info in kernels) == ["torch.bfloat16", "torch.float16", "torch.float32"]
    assert {info.params for info in kernels} == {(0, 2), (1,), (3,)}


def kernel_calls(opt: SLBI, params: list[nn.Parameter], steps: int, gen: torch.Generator) -> int:
    """How many times the op ran in ``steps`` steps (counted by torch.profiler; the
    Triton kernel on CPU buffers is the op ``bucket_step_interpreted``)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
    ops = ("slbi_triton::bucket_step", "slbi_triton::bucket_step_interpreted")
    return sum(event.count for event in prof.key_averages() if event.key in ops)


@pytest.mark.parametrize("kernel", ["triton", "c"])
@pytest.mark.parametrize("num_tensors", [4, 200])
def test_one_kernel_call_per_step_whatever_the_tensor_count(kernel: str, num_tensors: int) -> None:
    if kernel == "c" and not cpu_step.available(torch.float32):
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 2, 3, 3), (5, 7), (4,), (1,)]
    params = [nn.Parameter(torch.randn(shapes[i % 4], generator=gen)) for i in range(num_tensors)]
    opt = SLBI(params, backend=KERNELS[kernel][0])
    assert kernel_calls(opt, params, 2, gen) == 2  # one call per step for the single bucket


def test_long_rows_and_several_chunks_per_tensor() -> None:
    """l1 and "none" tensors longer than one row and than one chunk, with ragged tails:
    the Triton kernel equals the eager torch backend."""
    shapes = [(300, 250), (70001,), (9, 600, 1, 1)]
    results = []
    for backend in ("triton", "torch"):
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = SLBI(params, backend=backend, fused=False, **HPARAMS)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append(params)
    for a, b in zip(*results, strict=True):
        assert rel_err(a, b) <= 1e-6, a.shape
