"""Parity of both backends with the independent float64 reference on a real model."""

from __future__ import annotations

import copy

import pytest
import torch
from slbi_triton.kernels import cpu_step

from slbi_triton import SLBI

from .helpers import OddNet, flat_storages
from .reference import RefParam, auto_penalty, rel_err

STEPS = 50


def make_groups(model: OddNet) -> list[dict]:
    """Three groups with different hyper-parameters and penalties."""
    fc_weights = [model.fc1.weight, model.fc2.weight]
    penalised = [model.conv.weight, *fc_weights]
    others = [p for p in model.parameters() if all(p is not w for w in penalised)]
    return [
        {"params": [model.conv.weight], "lr": 0.05, "mu": 2.0, "lam": 0.6, "momentum": 0.9,
         "dampening": 0.1, "weight_decay": 1e-3, "penalty": "group"},
        {"params": fc_weights, "lr": 0.05, "mu": 2.0, "lam": 0.05, "penalty": "auto"},
        {"params": others, "lr": 0.02, "kappa": 2.0, "mu": 5.0, "lam": 0.05, "momentum": 0.0,
         "penalty": "l1"},
    ]


def run_parity(backend: str, channels_last: bool, seed: int = 0, steps: int = STEPS):
    torch.manual_seed(seed)
    model = OddNet()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = make_groups(model)
    defaults = {"lr": 0.1, "kappa": 1.0, "mu": 100.0, "lam": 1.0, "momentum": 0.9, "dampening": 0.0,
                "weight_decay": 0.0}
    refs = {}
    for group in groups:
        hp = {**defaults, **{k: v for k, v in group.items() if k in defaults}}
        for p in group["params"]:
            penalty = auto_penalty(p.shape) if group["penalty"] == "auto" else group["penalty"]
            refs[p] = RefParam(p, penalty, hp)
    opt = SLBI(groups, backend=backend)
    data = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = torch.randn(8, 3, 9, 9, generator=data)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        opt.zero_grad()
        model(x).square().mean().backward()
        grads = {p: (p.grad.clone() if p.grad is not None else None) for p in refs}
        for p, ref in refs.items():
            ref.step(grads[p])
        opt.step()
    return model, opt, refs


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_float64_reference(backend: str, channels_last: bool) -> None:
    model, opt, refs = run_parity(backend, channels_last)
    for p, ref in refs.items():
        assert rel_err(p, ref.w) <= 1e-5, p.shape
        z = opt.state[p].get("z")
        if z is not None:
            assert rel_err(z, ref.z) <= 1e-5, p.shape
        assert torch.isfinite(p).all()
    # The λ values put part of each penalised tensor in the support, not all or none.
    conv_gamma = refs[model.conv.weight].gamma().reshape(7, -1).norm(dim=1)
    assert 0 < int((conv_gamma > 0).sum()) < 7
    fc_gamma = refs[model.fc1.weight].gamma()
    assert 0 < int((fc_gamma != 0).sum()) < fc_gamma.numel()
    norms = [opt.state[p]["group_norms"] for p in refs if "group_norms" in opt.state[p]]
    assert norms and all(torch.isfinite(n).all() for n in norms)
    # The parameter without gradient is untouched, has no gradient and no momentum state.
    assert torch.equal(model.unused.detach(), refs[model.unused].w.float())
    assert model.unused.grad is None
    assert "momentum_buffer" not in opt.state[model.unused]


def test_triton_matches_torch_backend() -> None:
    model_t, _, _ = run_parity("torch", channels_last=True)
    model_k, _, _ = run_parity("triton", channels_last=True)
    for a, b in zip(model_k.parameters(), model_t.parameters(), strict=True):
        assert rel_err(a, b) <= 1e-6


def test_deterministic_bit_identical_runs() -> None:
    for backend in ("torch", "triton"):
        model_a, opt_a, _ = run_parity(backend, channels_last=False, seed=3, steps=8)
        model_b, opt_b, _ = run_parity(backend, channels_last=False, seed=3, steps=8)
        for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
            assert torch.equal(a, b)
        for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
            for key, value in opt_a.state[a].items():
                assert torch.equal(value, opt_b.state[b][key]), key


def test_views_share_flat_storage() -> None:
    torch.manual_seed(0)
    model = OddNet().to(memory_format=torch.channels_last)
    opt = SLBI(model.named_parameters())
    opt.zero_grad()
    model(torch.randn(2, 3, 9, 9)).sum().backward()
    params = [p for p in model.parameters() if p is not model.unused]
    weights = flat_storages(list(model.parameters()))
    assert len(weights) == 1  # one flat weight buffer
    assert len(flat_storages([p.grad for p in params])) == 1  # one flat gradient buffer
    assert model.unused.grad is None  # no gradient was made for it
    opt.step()
    assert len(flat_storages([opt.state[p]["z"] for p in params if "z" in opt.state[p]])) == 1
    assert len(flat_storages([opt.state[p]["momentum_buffer"] for p in params])) == 1
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert flat_storages(list(model.parameters())) == weights


def test_model_copy_unaffected() -> None:
    """Building the optimizer does not change values, only where they live."""
    torch.manual_seed(0)
    model = OddNet()
    before = copy.deepcopy(model.state_dict())
    SLBI(model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("fused_path", ["c-kernel", "inductor"])
def test_fused_cpu_update_matches_eager(fused_path: str, monkeypatch) -> None:
    """The fused CPU step (the C kernel by default; Inductor where it cannot be built, and
    for bf16/fp16 buckets) equals plain eager ops."""
    if fused_path == "inductor":
        monkeypatch.setattr(cpu_step, "available", lambda *args: False)
    elif not cpu_step.available(torch.float32):
        pytest.skip("no C compiler")
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = OddNet()
        opt = SLBI(make_groups(model), backend="torch", fused=fused)
        data = torch.Generator().manual_seed(1)
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(8, 3, 9, 9, generator=data)).square().mean().backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert rel_err(a, b) <= 1e-6
