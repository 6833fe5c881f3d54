"""Held-out groups (hold_out) and steering the path to a MAC budget (MacTarget), through
the public API, on the package's ResNet-20 (docs/design.md, "Held-out groups" and
"Steering the path to a size while training")."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from slbi_triton import SLBI, MacTarget, channel_norms, hold_out, param_groups, prune_to
from slbi_triton.coupling import channel_groups
from slbi_triton.targets import MacModel
from slbi_triton.train.models import ResNet20


def batch(seed: int = 0, size: int = 16) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 1, 28, 28, generator=generator)
    return images, torch.randint(0, 10, (size,), generator=generator)


def train(model: nn.Module, opt: SLBI, steps: int, after_step=None) -> None:
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if after_step is not None:
            after_step()


def setup(mu: float = 2.0, seed: int = 0) -> tuple[nn.Module, SLBI, Tensor]:
    torch.manual_seed(seed)
    model = ResNet20()
    x, _ = batch(100)
    return model, SLBI(param_groups(model, x, lam=0.002), lr=0.1, mu=mu, momentum=0.9), x


def ids_of(opt: SLBI, param: Tensor) -> Tensor:
    group = opt.param_groups[0]
    return next(ids for p, ids in zip(group["params"], group["channel_ids"], strict=True) if p is param)


def test_a_held_channel_loses_gamma_and_its_w_decays() -> None:
    twin, twin_opt, _ = setup()  # the same run without the hold
    train(twin, twin_opt, 33)
    row = int(twin.bn1.weight.detach().abs().argmax())  # a channel the run keeps large
    model, opt, _ = setup()
    train(model, opt, 3)
    channel = int(ids_of(opt, model.bn1.weight)[row])
    norms = channel_norms(opt)
    hold_out(opt, [channel])
    # Reported unheld, zero Γ at once for the BatchNorm members and the conv filters.
    assert torch.equal(channel_norms(opt), norms)
    assert float(opt.gamma("bn1.weight")[row]) == 0 and float(opt.gamma("bn1.bias")[row]) == 0
    assert not bool(opt.gamma("conv1.weight")[row].any())
    assert int(opt.gamma("bn1.weight").ne(0).sum()) == model.bn1.weight.numel() - 1
    train(model, opt, 30)
    held, free = model.bn1.weight.detach().abs(), twin.bn1.weight.detach().abs()
    # The coupling alone leaves (1 − lr·κ/μ)^30 = 0.21 of it; its gradient pulls back.
    assert float(held[row]) < 0.5 * float(free[row])
    assert not bool(opt.w_star("bn1.weight")[row]) and not bool(opt.w_star("conv1.weight")[row].any())
    assert opt.param_groups[0]["held_out"].tolist() == [channel]
    hold_out(opt, [])  # released: Γ comes back with Z
    assert float(opt.gamma("bn1.weight")[row]) != 0


def test_held_groups_survive_a_checkpoint_bit_for_bit() -> None:
    model, opt, x = setup()
    train(model, opt, 3)
    hold_out(opt, ids_of(opt, model.layer1[0].bn1.weight)[:5])
    train(model, opt, 2)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 3)
    resumed = ResNet20()
    resumed.load_state_dict(saved_model)
    resumed_opt = SLBI(param_groups(resumed, x, lam=0.002), lr=0.1, mu=2.0, momentum=0.9)
    resumed_opt.load_state_dict(saved_opt)
    train(resumed, resumed_opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters(), strict=True))
    assert torch.equal(channel_norms(opt), channel_norms(resumed_opt))


def test_bad_held_sets_are_refused_before_anything_changes() -> None:
    model, opt, x = setup()
    train(model, opt, 1)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="not a coupled group"):
        hold_out(opt, [10**6])
    assert "held_out" not in opt.param_groups[0]
    opt.param_groups[0]["held_out"] = [1, 2]
    with pytest.raises(TypeError, match="1-D int64 CPU tensor of channel ids"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    opt.param_groups[0]["held_out"] = torch.tensor([10**6])
    with pytest.raises(ValueError, match="not a coupled group"):
        opt.step()
    with pytest.raises(ValueError, match="no coupled channel groups"):
        hold_out(SLBI(model.named_parameters()), [0])
    with pytest.raises(ValueError, match=r"macs must be in \(0, 1\]"):
        MacTarget(model, opt, x, macs=0, start=0, end=1)
    with pytest.raises(ValueError, match="start and end"):
        MacTarget(model, opt, x, macs=0.5, start=5, end=1)


def test_mac_target_ramps_to_the_budget_and_the_slim_network_keeps_the_outputs() -> None:
    """The promise: channels held out during training are near zero at the end, so the
    network cut to the budget computes nearly what the trained one does. Without the
    ramp, cutting the same share changes the outputs far more."""
    model, opt, x = setup(mu=1.0)
    target = MacTarget(model, opt, x, macs=0.5, start=5, end=25, every=5)
    budgets: list[float] = []

    def after_step() -> None:
        target.step()
        budgets.append(target.budget())

    train(model, opt, 70, after_step=after_step)
    assert budgets == sorted(budgets, reverse=True) and budgets[0] == 1.0 and budgets[-1] == 0.5
    assert target.kept_macs() <= 0.5
    assert target.state_dict()["steps"] == 70

    control, control_opt, _ = setup(mu=1.0)
    train(control, control_opt, 70)

    def cut_difference(trained: nn.Module, trained_opt: SLBI) -> float:
        result = prune_to(trained, trained_opt, x, macs=0.5)
        dense = MacModel(trained, channel_groups(trained, x), x[:1]).total
        assert MacModel(result.model, channel_groups(result.model, x), x[:1]).total <= 0.5 * dense
        trained.eval()
        result.model.eval()
        with torch.no_grad():
            full, slim = trained(x), result.model(x)
        trained.train()
        return float((slim - full).norm() / full.norm())

    steered, plain = cut_difference(model, opt), cut_difference(control, control_opt)
    assert steered < 0.05
    assert plain > 5 * steered


@pytest.mark.parametrize("kernel", ["c", "eager"])
def test_a_compiled_step_sees_the_held_set_change(kernel: str) -> None:
    """hold_out between compiled steps takes effect in the compiled step (the table is an
    input of the graph, not a constant), as in the eager one."""
    from .test_channel_ids import build, grads_of

    torch._dynamo.reset()
    params, opt = build(kernel)
    twin_params, twin = build(kernel)
    compiled = torch.compile(lambda: opt.step(), backend="aot_eager", fullgraph=True)
    for step in range(4):
        if step == 1:
            hold_out(opt, [0, 5])
            hold_out(twin, [0, 5])
        if step == 3:
            hold_out(opt, [2])
            hold_out(twin, [2])
        for p, q, g in zip(params, twin_params, grads_of(2 * step), strict=True):
            p.grad, q.grad = (None, None) if g is None else (g.clone(), g.clone())
        compiled()
        twin.step()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q) if kernel == "c" else torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert not bool(opt.gamma("conv.weight")[2].any()) and bool(opt.gamma("conv.weight")[0].any())
    torch._dynamo.reset()
