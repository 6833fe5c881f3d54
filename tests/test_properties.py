"""Property-based tests (hypothesis): random shapes (0-D, 1-element, odd sizes), penalties
and hyper-parameters, some gradients missing; both backends against the float64
reference, and state_dict round trips. Examples are few and derandomized: the suite
stays fast and reproducible."""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from slbi_triton import SLBI

from .helpers import set_z
from .reference import RefParam, auto_penalty

SETTINGS = {"deadline": None, "derandomize": True, "suppress_health_check": [HealthCheck.too_slow]}
KEYS = ("lr", "kappa", "mu", "lam", "momentum", "dampening", "weight_decay")


@st.composite
def hyperparameters(draw) -> dict:
    unit = st.floats(0.0, 1.0)
    return {
        "lr": draw(st.floats(0.0, 0.5)),
        "kappa": draw(st.floats(0.1, 3.0)),
        "mu": draw(st.floats(0.5, 50.0)),
        "lam": draw(st.floats(0.0, 2.0)),
        "momentum": draw(st.one_of(st.just(0.0), st.floats(0.0, 0.95))),
        "dampening": draw(unit),
        "weight_decay": draw(st.one_of(st.just(0.0), st.floats(0.0, 0.1))),
    }


@st.composite
def problems(draw, max_params: int = 4) -> dict:
    """Parameter groups (one parameter each), initial W and Z, and gradients per step
    (``None``: the parameter gets no gradient at that step)."""
    count = draw(st.integers(1, max_params))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    steps = draw(st.integers(1, 3))
    groups, inits, grads = [], [], []
    for _ in range(count):
        shape = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=4)))
        choices = ["auto", "l1", "none"] + (["group"] if len(shape) >= 2 else [])
        penalty = draw(st.sampled_from(choices))
        groups.append({"penalty": penalty, **draw(hyperparameters())})
        w = torch.randn(shape, generator=gen)
        z = torch.randn(shape, generator=gen) * draw(st.floats(0.0, 3.0))  # around λ
        inits.append((w, z))
        present = draw(st.lists(st.booleans(), min_size=steps, max_size=steps))
        grads.append([torch.randn(shape, generator=gen) if on else None for on in present])
    return {"groups": groups, "inits": inits, "grads": grads, "steps": steps}


def run(problem: dict, backend: str, fused: bool | None):
    params = [nn.Parameter(w.clone()) for w, _ in problem["inits"]]
    groups = [{"params": [p], **group} for p, group in zip(params, problem["groups"], strict=True)]
    opt = SLBI(groups, backend=backend, fused=fused)
    refs, initial_z = [], {}
    for p, (_, z), group in zip(params, problem["inits"], problem["groups"], strict=True):
        penalty = auto_penalty(p.shape) if group["penalty"] == "auto" else group["penalty"]
        ref = RefParam(p, penalty, {k: group[k] for k in KEYS})
        if penalty != "none":
            initial_z[p] = z
            ref.z = z.double()
        refs.append(ref)
    set_z(opt, initial_z)
    for step in range(problem["steps"]):
        opt.zero_grad(set_to_none=True)
        for p, ref, grads in zip(params, refs, problem["grads"], strict=True):
            grad = grads[step]
            if grad is not None:
                p.grad = grad.clone()
            ref.step(grad)
        opt.step()
    return params, opt, refs


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> bool:
    """Max error within ``tol`` of the reference's scale (float32 math vs float64)."""
    expected = expected.double()
    return bool((actual.double() - expected).abs().max() <= tol * (1.0 + expected.abs().max()))


def check_against_reference(problem: dict, backend: str, fused: bool | None) -> None:
    params, opt, refs = run(problem, backend, fused)
    for p, ref in zip(params, refs, strict=True):
        assert close(p.detach(), ref.w, 1e-5), (p.shape, ref.penalty)
        state = opt.state[p]
        if ref.penalty != "none":
            assert close(state["z"], ref.z, 1e-5)
        if ref.v is not None:
            assert close(state["momentum_buffer"], ref.v, 1e-5)
        else:
            assert "momentum_buffer" not in state  # no gradient yet, or ρ = 0 throughout


@settings(max_examples=100, **SETTINGS)
@given(problems())
def test_torch_backend_matches_float64(problem: dict) -> None:
    check_against_reference(problem, "torch", fused=False)


@settings(max_examples=6, **SETTINGS)
@given(problems(max_params=2))
def test_torch_backend_inductor_matches_float64(problem: dict) -> None:
    check_against_reference(problem, "torch", fused=None)


@settings(max_examples=12, **SETTINGS)
@given(problems(max_params=3))
def test_triton_backend_matches_float64(problem: dict) -> None:
    check_against_reference(problem, "triton", fused=None)


@settings(max_examples=30, **SETTINGS)
@given(problems())
def test_state_dict_round_trip_is_exact(problem: dict) -> None:
    params, opt, _ = run(problem, "torch", fused=False)
    saved = copy.deepcopy(opt.state_dict())
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    groups = [{"params": [q], **group} for q, group in zip(twins, problem["groups"], strict=True)]
    twin = SLBI(groups, backend="torch", fused=False)
    twin.load_state_dict(saved)
    for p, q in zip(params, twins, strict=True):
        assert opt.state[p].keys() == twin.state[q].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(twin.state[q][key], value), key
    assert opt.state_dict()["slbi"]["steps"] == twin.state_dict()["slbi"]["steps"]
