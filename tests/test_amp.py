"""Mixed precision with torch.amp.GradScaler (on the CPU, float32 parameters and scaled
losses): unscaled results equal float32 training, and a step with inf/NaN gradients
changes nothing while the scale backs off, on both backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn

from slbi_triton import SLBI

from .helpers import assert_equal_snapshots, snapshot
from .reference import rel_err

CONFIGS = [("torch", False), ("torch", None), ("triton", None)]
CONFIG_IDS = ["torch-eager", "torch-inductor", "triton-interpreted"]


class AmpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        with torch.no_grad():
            self.conv.weight.mul_(torch.linspace(0.2, 2.0, 4).view(4, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def build(backend: str, fused: bool | None, device: str = "cpu"):
    torch.manual_seed(0)
    model = AmpNet().to(device)
    named = dict(model.named_parameters())
    groups = [
        {"params": [(n, p) for n, p in named.items() if n.endswith("weight")]},
        {"params": [(n, p) for n, p in named.items() if n.endswith("bias")], "momentum": 0.0},
    ]
    opt = SLBI(groups, lr=0.1, mu=5.0, lam=0.05, momentum=0.9, dampening=0.1, backend=backend, fused=fused)
    return model, opt


def batch(step: int):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(6, 1, 6, 6, generator=gen), torch.randint(0, 3, (6,), generator=gen)


def steps_of(opt: SLBI) -> int:
    return opt.state_dict()["slbi"]["steps"]


def assert_unchanged(model: nn.Module, opt: SLBI, before: dict[str, torch.Tensor], steps: int) -> None:
    """Everything a skipped step must leave as it was: every weight and state tensor as in
    ``before`` (a ``snapshot``), the step count ``steps``."""
    assert_equal_snapshots(before, snapshot(model, opt))
    assert steps_of(opt) == steps


def scaled_step(model, opt, scaler, step: int, inject_inf: bool = False, clip: bool = False) -> None:
    x, y = batch(step)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if inject_inf:
        model.fc.weight.grad[1, 2] = float("inf")
    if clip:
        scaler.unscale_(opt)  # GradScaler then hands the optimizer grad_scale=None
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    scaler.step(opt)
    scaler.update()


def plain_step(model, opt, step: int, clip: bool = False) -> None:
    x, y = batch(step)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    opt.step()


@pytest.mark.parametrize(("backend", "fused"), CONFIGS, ids=CONFIG_IDS)
def test_scaled_training_matches_float32(backend: str, fused: bool | None) -> None:
    model_ref, opt_ref = build(backend, fused)
    model, opt = build(backend, fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    steps = 4 if backend == "triton" else 8
    for step in range(steps):
        plain_step(model_ref, opt_ref, step)
        scaled_step(model, opt, scaler, step)
    assert scaler.get_scale() > 2.0**12  # it grew, and nothing overflowed
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # GradScaler removed them
    for a, b in zip(model.parameters(), model_ref.parameters(), strict=True):
        assert rel_err(a, b) <= 1e-6
    for a, b in zip(model.parameters(), model_ref.parameters(), strict=True):
        for key in opt_ref.state[b]:
            assert rel_err(opt.state[a][key], opt_ref.state[b][key]) <= 1e-6, key


@pytest.mark.parametrize(("backend", "fused"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("when", ["first_step", "later_step"])
def test_inf_gradient_step_changes_nothing(backend: str, fused: bool | None, when: str, monkeypatch) -> None:
    """The skipped step leaves W, Z, momentum, group norms and the momentum flags as
    they were, the scale backs off, and training goes on as if the step never was:
    equal to a run without it. Later steps decide on the device (no ``.item()``); a
    first step reads found_inf once, so that momentum stays "not started"."""
    model_ref, opt_ref = build(backend, fused)
    model, opt = build(backend, fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    inf_at = 0 if when == "first_step" else 2
    for step in range(inf_at):
        plain_step(model_ref, opt_ref, step)
        scaled_step(model, opt, scaler, step)
    before, steps = snapshot(model, opt), steps_of(opt)
    items = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: items.append(1) or real_item(self))
    scaled_step(model, opt, scaler, 99, inject_inf=True)
    monkeypatch.setattr(torch.Tensor, "item", real_item)
    assert len(items) == (1 if when == "first_step" else 0)
    assert_unchanged(model, opt, before, steps)
    assert scaler.get_scale() == 2.0**9
    if when == "first_step":
        assert all("momentum_buffer" not in opt.state[p] for p in model.parameters())
    for step in range(inf_at, inf_at + 2):
        plain_step(model_ref, opt_ref, step)
        scaled_step(model, opt, scaler, step)
    for a, b in zip(model.parameters(), model_ref.parameters(), strict=True):
        assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("inject_inf", [False, True], ids=["finite", "inf"])
def test_unscale_then_clip_then_step(inject_inf: bool) -> None:
    """``scaler.unscale_(opt)`` first (to clip): the optimizer gets grad_scale=None and
    must not unscale again; found_inf still skips the step."""
    model_ref, opt_ref = build("torch", False)
    model, opt = build("torch", False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(3):
        plain_step(model_ref, opt_ref, step, clip=True)
        scaled_step(model, opt, scaler, step, clip=True)
    before, steps = snapshot(model, opt), steps_of(opt)
    if inject_inf:
        scaled_step(model, opt, scaler, 3, inject_inf=True, clip=True)
        assert_unchanged(model, opt, before, steps)
        assert scaler.get_scale() == 2.0**7
    else:
        plain_step(model_ref, opt_ref, 3, clip=True)
        scaled_step(model, opt, scaler, 3, clip=True)
        for a, b in zip(model.parameters(), model_ref.parameters(), strict=True):
            assert rel_err(a, b) <= 1e-6


def test_nan_gradient_skipped_and_plain_step_after() -> None:
    """A NaN (not only inf) is caught; after GradScaler, a plain ``opt.step()`` works
    (GradScaler removed its attributes)."""
    model, opt = build("torch", False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    scaled_step(model, opt, scaler, 0)
    x, y = batch(1)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    model.conv.weight.grad[0, 0, 0, 0] = float("nan")
    before, steps = snapshot(model, opt), steps_of(opt)
    scaler.step(opt)
    scaler.update()
    assert_unchanged(model, opt, before, steps)
    plain_step(model, opt, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.fc.weight.detach(), before["fc.weight"])


def test_compiled_step_takes_grad_scale_and_found_inf() -> None:
    """The AMP inputs are traced with no graph break: the compiled step unscales and
    skips on the device, like the eager one."""
    torch._dynamo.reset()
    model_e, opt_e = build("torch", None)
    model_c, opt_c = build("torch", None)
    compiled_step = torch.compile(opt_c.step, fullgraph=True, backend="aot_eager")
    scale = torch.tensor(8.0)
    for step in range(4):
        for model, opt, run in ((model_e, opt_e, opt_e.step), (model_c, opt_c, compiled_step)):
            x, y = batch(step)
            opt.zero_grad()
            (F.cross_entropy(model(x), y) * scale).backward()
            if step == 2:  # an overflowed step, after momentum has started
                model.fc.weight.grad[0, 0] = float("inf")
            opt.grad_scale, opt.found_inf = scale, torch.tensor(float(step == 2))
            before, steps = snapshot(model, opt), steps_of(opt)
            run()
            del opt.grad_scale, opt.found_inf
            if step == 2:
                assert_unchanged(model, opt, before, steps)
    for a, b in zip(model_c.parameters(), model_e.parameters(), strict=True):
        assert rel_err(a, b) <= 1e-6
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_autocast_grad_scaler_skips_on_the_device() -> None:
    """fp16 autocast on the GPU with the Triton kernel: a later overflowed step is
    skipped with no host sync (sync debug mode raises on one), and changes nothing."""
    model, opt = build("triton", None, device="cuda")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)

    def step(index: int, inject_inf: bool = False) -> None:
        x, y = (t.cuda() for t in batch(index))
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if inject_inf:
            model.fc.weight.grad[1, 2] = float("inf")
        # After the first step (which reads found_inf once: momentum not started yet).
        torch.cuda.set_sync_debug_mode("error" if index > 0 else "default")
        try:
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()

    for index in range(3):
        step(index)
    before, steps = snapshot(model, opt), steps_of(opt)
    step(3, inject_inf=True)
    assert_unchanged(model, opt, before, steps)
    assert scaler.get_scale() == 2.0**9
    step(4)
    assert not torch.equal(model.fc.weight.detach(), before["fc.weight"])
