"""Tests for the benchmark building blocks: parameter sets and the paper-style SLBI baseline."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.paper_slbi import PaperSLBI
from benchmarks.param_sets import (
    PARAM_SETS,
    QUICK_SCALE,
    make_params,
    numel_of,
    resnet18,
    resnet50,
    sweep_set,
    vit_b16,
)

EXPECTED_COUNTS = {
    "lenet5": 61_706,
    "resnet20": 269_722,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "vit_b16": 86_567_656,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_param_set_counts(name: str) -> None:
    shapes = PARAM_SETS[name]()
    assert numel_of(shapes) == EXPECTED_COUNTS[name]
    names = [n for n, _ in shapes]
    assert len(names) == len(set(names))


def test_param_set_layouts() -> None:
    r18 = dict(resnet18())
    assert len(r18) == 62
    assert r18["conv1.weight"] == (64, 3, 7, 7)
    assert r18["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert r18["layer2.0.downsample.1.bias"] == (128,)
    assert "layer1.0.downsample.0.weight" not in r18
    assert r18["fc.weight"] == (1000, 512)
    r50 = dict(resnet50())
    assert len(r50) == 161
    assert r50["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert r50["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    vit = vit_b16()
    assert [n for n, _ in vit[:3]] == ["cls_token", "pos_embed", "patch_embed.proj.weight"]
    vit_d = dict(vit)
    assert vit_d["pos_embed"] == (1, 197, 768)
    assert vit_d["blocks.11.attn.qkv.weight"] == (2304, 768)
    assert vit_d["blocks.0.mlp.fc2.weight"] == (768, 3072)
    assert vit_d["head.weight"] == (1000, 768)


@pytest.mark.parametrize("name", sorted(PARAM_SETS))
def test_quick_scale_keeps_topology(name: str) -> None:
    full, quick = PARAM_SETS[name](), PARAM_SETS[name](scale=QUICK_SCALE)
    assert [n for n, _ in quick] == [n for n, _ in full]
    assert [len(s) for _, s in quick] == [len(s) for _, s in full]
    assert numel_of(quick) < numel_of(full) / 20
    with pytest.raises(ValueError, match="scale"):
        PARAM_SETS[name](scale=0)


@pytest.mark.parametrize("numel", [1, 7, 67, 101, 1_000, 4_096, 65_537, 1 << 20, 10**7 + 3])
def test_sweep_set(numel: int) -> None:
    count = 5
    shapes = sweep_set(count, numel)
    assert len(shapes) == count
    assert len({n for n, _ in shapes}) == count
    assert [len(s) for _, s in shapes] == [4, 2, 4, 2, 4]
    tol = 0.01 if numel >= 100 else 0.015
    for _, shape in shapes:
        assert abs(math.prod(shape) - numel) <= tol * numel


def test_sweep_set_exact_for_round_sizes() -> None:
    for numel in (9 * 64 * 64, 9 * 10**4, 9 << 16):
        assert {math.prod(s) for _, s in sweep_set(2, numel)} == {numel}
    # Not a multiple of 9: 2-D exact, the 3×3 conv within 0.1%.
    conv, matrix = (math.prod(s) for _, s in sweep_set(2, 1 << 20))
    assert matrix == 1 << 20 and abs(conv - (1 << 20)) <= 1e-3 * (1 << 20)


def test_make_params() -> None:
    shapes = sweep_set(3, 100)
    params = make_params(shapes, dtype=torch.float64, seed=3)
    assert [n for n, _ in params] == [n for n, _ in shapes]
    for (_, shape), (_, p) in zip(shapes, params, strict=True):
        assert isinstance(p, torch.nn.Parameter)
        assert p.shape == shape and p.grad is not None and p.grad.shape == shape
        assert p.dtype == torch.float64 and p.grad.dtype == torch.float64
    again = make_params(shapes, dtype=torch.float64, seed=3)
    assert all(torch.equal(a.grad, b.grad) for (_, a), (_, b) in zip(params, again, strict=True))
    other = make_params(shapes, dtype=torch.float64, seed=4)
    assert not torch.equal(params[0][1], other[0][1])


def _reference_run(
    weights: list[torch.Tensor],
    grads: list[list[torch.Tensor]],
    *,
    lr: float,
    kappa: float,
    mu: float,
    lam: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
) -> list[torch.Tensor]:
    """The update of docs/design.md in float64, functional, Γ recomputed from Z (never stored)."""
    w = [x.detach().to(torch.float64).clone() for x in weights]
    z = [torch.zeros_like(x) for x in w]
    v: list[torch.Tensor | None] = [None] * len(w)
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            u = g.to(torch.float64) + weight_decay * w[i]
            first = momentum == 0 or v[i] is None
            vel = u if first else momentum * v[i] + (1 - dampening) * u
            v[i] = vel
            if w[i].dim() >= 2:
                if w[i].dim() == 2:
                    prox = torch.sign(z[i]) * torch.clamp(torch.abs(z[i]) - lam, min=0)
                else:
                    zg = z[i].reshape(z[i].shape[0], -1)
                    norms = zg.norm(dim=1, keepdim=True)
                    scale = torch.zeros_like(norms)
                    nz = norms > 0
                    scale[nz] = torch.clamp(1 - lam / norms[nz], min=0)
                    prox = (zg * scale).reshape(z[i].shape)
                gamma = kappa * prox
                w_next = w[i] - lr * kappa * (vel + (w[i] - gamma) / mu)
                z[i] = z[i] + (lr / mu) * (w[i] - gamma)
                w[i] = w_next
            else:
                w[i] = w[i] - lr * kappa * vel
    return w


SHAPES = [(6, 3, 3, 3), (5, 4, 2), (7, 9), (4,)]

CONFIGS = [
    dict(lr=0.5, kappa=2.0, mu=5.0, lam=0.2, momentum=0.9, dampening=0.0, weight_decay=0.0),
    dict(lr=0.3, kappa=1.5, mu=3.0, lam=0.2, momentum=0.8, dampening=0.3, weight_decay=1e-2),
    dict(lr=0.4, kappa=1.0, mu=2.0, lam=0.2, momentum=0.0, dampening=0.0, weight_decay=5e-3),
]


def _row_scale(shape: tuple[int, ...]) -> torch.Tensor:
    """Per-row factors from 0.01 to 2, so that a shrinkage threshold splits rows and groups."""
    return torch.logspace(-2, 0.3, shape[0], dtype=torch.float64).reshape(-1, *[1] * (len(shape) - 1))


def _support_fraction(gamma: torch.Tensor) -> float:
    """Fraction of groups (≥3-D) or weights (2-D) where Γ ≠ 0."""
    if gamma.dim() >= 3:
        return (gamma.reshape(gamma.shape[0], -1).norm(dim=1) > 0).double().mean().item()
    return (gamma != 0).double().mean().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", CONFIGS)
def test_paper_slbi_matches_reference(config: dict[str, float], dtype: torch.dtype) -> None:
    steps = 10
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) * _row_scale(s) for s in SHAPES]
    grads = [
        [0.03 * torch.randn(s, generator=gen, dtype=torch.float64) * _row_scale(s) for s in SHAPES]
        for _ in range(steps)
    ]
    params = [torch.nn.Parameter(x.to(dtype, copy=True)) for x in init]
    opt = PaperSLBI(params, **config)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.to(dtype, copy=True)
        opt.step()
    expected = _reference_run(init, grads, **config)

    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for p, e in zip(params, expected, strict=True):
        err = (p.detach().to(torch.float64) - e).norm() / e.norm()
        assert err <= tol
    # The run must leave the trivial regime: part of each penalised tensor entered the support.
    for p in params[:3]:
        assert 0 < _support_fraction(opt.state[p]["gamma_buffer"]) < 1
    assert "z_buffer" not in opt.state[params[3]]
    assert ("momentum_buffer" in opt.state[params[0]]) == (config["momentum"] != 0)


def test_paper_slbi_first_step_momentum() -> None:
    """The first step uses v = u (no dampening); the second ρ·v + (1 − δ)·u."""
    lr, kappa, wd, rho, delta = 0.1, 2.0, 0.01, 0.9, 0.5
    w0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    g1 = torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64)
    g2 = torch.tensor([-0.5, 1.0, 2.0], dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = PaperSLBI([p], lr=lr, kappa=kappa, momentum=rho, dampening=delta, weight_decay=wd)
    p.grad = g1.clone()
    opt.step()
    v1 = g1 + wd * w0
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], v1, rtol=0, atol=0)
    w1 = w0 - lr * kappa * v1
    torch.testing.assert_close(p.detach(), w1)
    p.grad = g2.clone()
    opt.step()
    v2 = rho * v1 + (1 - delta) * (g2 + wd * w1)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], v2)
    torch.testing.assert_close(p.detach(), w1 - lr * kappa * v2)
    torch.testing.assert_close(p.grad, g2, rtol=0, atol=0)


def test_paper_slbi_first_step_penalised() -> None:
    """Step 1 from Z = 0: Γ = 0, so W₁ = W₀ − ακ(u + W₀/μ) and Z₁ = (α/μ)·W₀."""
    lr, kappa, mu = 0.2, 1.5, 4.0
    params = make_params([("w", (3, 2, 2, 2)), ("fc", (4, 5))], dtype=torch.float64)
    w0 = [p.detach().clone() for _, p in params]
    opt = PaperSLBI([p for _, p in params], lr=lr, kappa=kappa, mu=mu, lam=0.5)
    opt.step()
    for (_, p), w in zip(params, w0, strict=True):
        torch.testing.assert_close(p.detach(), w - lr * kappa * (p.grad + w / mu))
        torch.testing.assert_close(opt.state[p]["z_buffer"], (lr / mu) * w)


def test_paper_slbi_group_zero_norm_and_skip() -> None:
    p = torch.nn.Parameter(torch.zeros(3, 2, 2, 2))
    skipped = torch.nn.Parameter(torch.ones(2, 2))
    opt = PaperSLBI([p, skipped], lr=0.1, lam=0.0)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(opt.state[p]["gamma_buffer"], torch.zeros_like(p))
    assert torch.equal(skipped.detach(), torch.ones(2, 2))
    assert skipped not in opt.state


def test_paper_slbi_bad_input() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="kappa"):
        PaperSLBI([p], lr=0.1, kappa=0.0)
    with pytest.raises(ValueError, match="penalty"):
        PaperSLBI([p], lr=0.1, penalty="l2")
    with pytest.raises(ValueError, match="group"):
        PaperSLBI([p], lr=0.1, penalty="group")
    opt = PaperSLBI([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1)
    with pytest.raises(ValueError, match="penalty"):
        opt.add_param_group({"params": [p], "penalty": "bogus"})
    assert len(opt.param_groups) == 1
