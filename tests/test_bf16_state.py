"""Optimizer state in bfloat16 with stochastic rounding (``state_dtype=torch.bfloat16``):
unbiased and reproducible rounding, the same sparse support as float32 state, and every
other feature (GradScaler, checkpoints in both directions, torch.compile, the toolbox).

The C and Triton kernels draw the same random bits as the torch reference and equal it
bit for bit (tests/test_c_kernel.py, tests/test_triton_kernel.py), so the statistics are
checked once, on the reference. A checkpoint resumes bit for bit with bfloat16 state as
with float32 state: tests/test_torch_optim_behaviour.py's round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slbi_triton import SLBI, functional

from .helpers import KERNELS, assert_equal_snapshots, assert_norms_fresh, build, loss_of, snapshot, train

# OddNet's optimizer (tests/helpers.py's ``build``) with bfloat16 state
BF16 = {"state_dtype": torch.bfloat16, "seed": 11}


def bits(step: int, count: int, seed: int = 7) -> torch.Tensor:
    return functional.sr_hash(seed, step, torch.arange(count, dtype=torch.int64))


def test_stochastic_rounding_is_unbiased_where_nearest_stalls() -> None:
    """Add an increment below half a bfloat16 ulp 1000 times: round to nearest never
    moves, stochastic rounding lands where float32 arithmetic does."""
    count, steps, increment = 4096, 1000, 1e-4  # half an ulp of 1.0 in bfloat16 is 2**-9
    stochastic = torch.ones(count, dtype=torch.bfloat16)
    nearest = torch.ones(count, dtype=torch.bfloat16)
    exact = torch.ones(count, dtype=torch.float32)
    for step in range(steps):
        random16 = bits(step, count) & 0xFFFF
        stochastic = functional.round_bf16_stochastic(stochastic.float() + increment, random16)
        nearest = (nearest.float() + increment).bfloat16()
        exact = exact + increment
    assert torch.equal(nearest, torch.ones_like(nearest))
    mean = stochastic.double().mean().item()
    # The sum of 4096 walks: its mean has a standard error of ~2e-4 here.
    assert abs(mean - exact.double().mean().item()) < 1e-3
    assert 1.09 < mean < 1.11


def test_stochastic_rounding_brackets_and_keeps_specials() -> None:
    """A finite value becomes one of the two bfloat16 values around it (its truncation, or
    one ulp further from zero); inf, -inf, NaN and 0 stay what they are."""
    values = torch.tensor([1.0 + 2**-10, -3.3, 1e-30, 3.0e38, float("inf"), float("-inf"), float("nan"), 0.0])
    low = values.view(torch.int32).long() & ~0xFFFF
    seen = set()
    for step in range(64):
        rounded = functional.round_bf16_stochastic(values, bits(step, values.numel()) & 0xFFFF).float()
        got = rounded.view(torch.int32).long()
        assert ((got[:4] == low[:4]) | (got[:4] == low[:4] + 0x10000)).all()
        seen.update((got[:4] == low[:4]).tolist())
        assert torch.isnan(rounded[6]) and torch.equal(rounded[4:6], values[4:6]) and rounded[7] == 0
    assert seen == {True, False}  # both neighbours occur


def test_hash_is_deterministic_and_varies() -> None:
    first = bits(3, 10_000)
    assert torch.equal(first, bits(3, 10_000))
    assert (first != bits(4, 10_000)).float().mean() > 0.99  # another step, other bits
    assert (first != bits(3, 10_000, seed=8)).float().mean() > 0.99
    low = (first & 0xFFFF).double() / 2**16
    assert abs(low.mean().item() - 0.5) < 0.01 and len(set(first.tolist())) == 10_000


def sparse_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    n, d, k = 200, 100, 8
    design = torch.randn(n, d) / n**0.5
    truth = torch.zeros(d)
    truth[torch.randperm(d)[:k]] = torch.randn(k).sign() * (1 + torch.rand(k))
    return design, design @ truth, truth != 0


@pytest.mark.parametrize("kernel", ["c", "triton", "inductor"])
def test_sparse_recovery_finds_the_float32_support(kernel: str) -> None:
    """Sparse least squares: SLBI's path selects the true support, with bfloat16 state as
    with float32 state."""
    design, target, support = sparse_problem()
    found = []
    # Interpreted Triton is slow: its bfloat16 run is compared with the C kernel's float32 one.
    for state_dtype in (torch.bfloat16,) if kernel == "triton" else (None, torch.bfloat16):
        weight = nn.Parameter(torch.zeros(1, design.shape[1]))
        backend, fused = KERNELS[kernel]
        opt = SLBI([("w", weight)], lr=0.5, mu=10.0, lam=1.0, momentum=0.0, penalty="l1",
                   state_dtype=state_dtype, seed=3, backend=backend, fused=fused)
        for _ in range(200):
            opt.zero_grad()
            ((design @ weight[0] - target) ** 2).sum().div(2).backward()
            opt.step()
        if state_dtype is not None:
            assert opt.state[weight]["z"].dtype == torch.bfloat16
            assert opt.kernels()[0].state_dtype == torch.bfloat16
        found.append(opt.masks()["w"][0])
    assert all(torch.equal(mask, support) for mask in found)


def test_state_bytes_halve() -> None:
    model, opt = build(**BF16)
    train(model, opt, range(1))
    for p in model.parameters():
        for key in ("z", "momentum_buffer"):
            if key in opt.state[p]:
                assert opt.state[p][key].dtype == torch.bfloat16, key
        if "group_norms" in opt.state[p]:
            assert opt.state[p]["group_norms"].dtype == torch.float32


def test_checkpoint_moves_between_float32_and_bfloat16_state() -> None:
    model, opt = build(**BF16)
    train(model, opt, range(3))
    saved = opt.state_dict()
    float_model, float_opt = build(**BF16 | {"state_dtype": None})
    float_model.load_state_dict(model.state_dict())
    float_opt.load_state_dict(saved)
    for p, q in zip(model.parameters(), float_model.parameters(), strict=True):
        for key, value in opt.state[p].items():
            loaded = float_opt.state[q][key]
            assert loaded.dtype == (q.dtype if key in ("z", "momentum_buffer") else value.dtype)
            assert torch.equal(loaded.to(value.dtype), value), key  # bfloat16 is exact in float32
    train(float_model, float_opt, range(3, 4))
    back_model, back = build(**BF16)
    back_model.load_state_dict(float_model.state_dict())
    back.load_state_dict(float_opt.state_dict())  # rounded to nearest on the way in
    state = back.state[back_model.conv.weight]
    assert state["z"].dtype == torch.bfloat16 and "group_norms" in state
    assert_norms_fresh(back)  # conv.weight's among them
    train(back_model, back, range(4, 6))
    assert all(torch.isfinite(p).all() for p in back_model.parameters())


def test_gradscaler_skip_changes_nothing() -> None:
    model, opt = build(**BF16)
    train(model, opt, range(2))
    before = snapshot(model, opt)
    steps = opt.state_dict()["slbi"]["steps"]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt.zero_grad()
    scaler.scale(model(torch.randn(4, 3, 9, 9)).square().mean()).backward()
    model.fc1.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert_equal_snapshots(snapshot(model, opt), before)
    assert opt.state_dict()["slbi"]["steps"] == steps


def test_toolbox_reads_bfloat16_state() -> None:
    model, opt = build(**BF16)
    train(model, opt, range(4))
    opt.update_order(0)
    before = snapshot(model, opt)
    gamma = opt.gamma("conv.weight")
    assert gamma.dtype == torch.float32 and gamma.shape == model.conv.weight.shape
    z = opt.state[model.conv.weight]["z"].float()
    assert torch.equal(gamma, functional.gamma_of(z, 1.0, 0.05, "group"))
    opt.prune_layer(50, ["conv.weight", "fc1.weight"], freeze=True)
    pruned = model.fc1.weight.detach() == 0
    assert pruned.any()
    opt.recover()
    assert_equal_snapshots(snapshot(model, opt), before)
    opt.prune_layer(50, "fc1.weight", freeze=True)
    train(model, opt, range(4, 6))
    assert (model.fc1.weight.detach()[pruned] == 0).all()
    assert (opt.state[model.fc1.weight]["z"][pruned] == 0).all()


def test_compiled_step_compiles_twice() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    model, opt = build(**BF16)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    torch._dynamo.reset()
    for index in range(6):
        opt.zero_grad()
        loss_of(model, index).backward()
        step()
    torch._dynamo.reset()
    assert counter.frame_count == 2


def test_float64_parameters_keep_float64_state() -> None:
    weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    opt = SLBI([weight], state_dtype=torch.bfloat16)
    weight.grad = torch.ones_like(weight)
    opt.step()
    assert opt.state[weight]["z"].dtype == torch.float64
    assert opt.kernels()[0].state_dtype == torch.float64


def test_bad_state_dtype_is_refused() -> None:
    message = r"state_dtype must be None .* or torch\.bfloat16, got torch\.float16"
    with pytest.raises(ValueError, match=message):
        SLBI([nn.Parameter(torch.zeros(2))], state_dtype=torch.float16)
    with pytest.raises(TypeError, match="seed must be an int"):
        SLBI([nn.Parameter(torch.zeros(2))], seed=1.5)
