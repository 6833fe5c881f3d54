"""What every ``torch.optim`` optimizer does, checked on SLBI with each kernel: state dict
round trips, param groups added later, hooks, ``zero_grad``, the closure, ``repr``,
``copy.deepcopy`` and ``pickle``, ``.grad`` left ``None`` until autograd makes one, and
the errors for complex and sparse gradients. Where SLBI differs from torch on purpose, the
test says so and why."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from slbi_triton.kernels import cpu_step
from torch import nn

from slbi_triton import SLBI

from .helpers import (
    OddNet,
    SmallNet,
    all_params,
    assert_equal_snapshots,
    build,
    flat_storages,
    loss_of,
    snapshot,
    train,
)


@pytest.fixture(params=["c", "eager", "triton"])  # keys of tests/helpers.py's KERNELS
def kernel(request) -> str:
    if request.param == "c" and not cpu_step.available(torch.float32):
        pytest.skip("no C compiler")
    return request.param


# -- state dict --------------------------------------------------------------------------


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["state-fp32", "state-bf16"])
@pytest.mark.parametrize("kernel", ["c", "eager", "triton", "inductor"])  # not the fixture: Inductor too
def test_state_dict_round_trip_continues_identically(kernel: str, state_dtype: torch.dtype | None) -> None:
    """With bfloat16 state the seed and step count are saved too: a resumed run draws the
    same random bits."""
    if kernel == "c" and not cpu_step.available(torch.float32, state_dtype):
        pytest.skip("no C compiler")
    options = {} if state_dtype is None else {"state_dtype": state_dtype, "seed": 11}
    model, opt = build(kernel, **options)
    train(model, opt, range(3))
    opt.update_order(0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, range(3, 6))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["state"][2]["z"].dtype == (state_dtype or torch.float32)  # conv.weight: as stored
    fresh_model, fresh_opt = build(kernel, **options)
    fresh_model.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    train(fresh_model, fresh_opt, range(3, 6))
    assert_equal_snapshots(snapshot(fresh_model, fresh_opt), snapshot(model, opt))


def test_param_group_added_after_steps(kernel: str) -> None:
    model, opt = build(kernel)
    extra = nn.Linear(5, 3)
    train(model, opt, range(2))
    before = snapshot(model, opt)
    opt.add_param_group({"params": list(extra.named_parameters(prefix="extra")), "lr": 0.01, "lam": 0.0})
    assert_equal_snapshots(snapshot(model, opt), before)  # nothing moved but where it lives
    for step in range(2, 4):
        opt.zero_grad()
        (loss_of(model, step) + extra(torch.ones(2, 5)).sum()).backward()
        opt.step()
    assert opt.names[-2:] == ["extra.weight", "extra.bias"]
    assert "z" in opt.state[extra.weight] and "momentum_buffer" in opt.state[extra.bias]
    assert opt.param_groups[-1]["lr"] == 0.01


# -- hooks -------------------------------------------------------------------------------


def test_step_and_state_dict_hooks() -> None:
    model, opt = build()
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o, args, kwargs)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o, args, kwargs)))
    opt.register_state_dict_pre_hook(lambda o: calls.append(("sd-pre", o)))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("sd-post", o, set(sd))))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load-pre", o)))
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load-post", o)))
    opt.zero_grad()
    loss_of(model, 0).backward()
    opt.step(record=False)
    # As for every torch.optim optimizer, the hooks see the optimizer in ``args`` too.
    assert calls == [("pre", opt, (opt,), {"record": False}), ("post", opt, (opt,), {"record": False})]
    calls.clear()
    opt.load_state_dict(opt.state_dict())
    assert calls == [("sd-pre", opt), ("sd-post", opt, {"state", "param_groups", "slbi"}),
                     ("load-pre", opt), ("load-post", opt)]


def test_step_pre_hook_can_replace_the_arguments(tmp_path) -> None:
    model, opt = build()
    opt.register_step_pre_hook(lambda o, args, kwargs: ((o,), {"record": True, "path": tmp_path}))
    opt.zero_grad()
    loss_of(model, 0).backward()
    opt.step()
    assert (tmp_path / "slbi_record.jsonl").exists()


# -- gradients ---------------------------------------------------------------------------


def test_grad_is_none_until_autograd_makes_one() -> None:
    torch.manual_seed(0)
    model = SmallNet()
    model.conv.bias.requires_grad_(False)
    opt = SLBI(model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # torch.optim code that tests `p.grad is None` (here SGD's weight decay) sees none.
    frozen = model.conv.bias.detach().clone()
    torch.optim.SGD([model.conv.bias], lr=0.1, weight_decay=0.5).step()
    assert torch.equal(model.conv.bias.detach(), frozen)
    model(SmallNet.inputs()).sum().backward()
    assert model.conv.bias.grad is None  # requires_grad=False: never a gradient
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and len(flat_storages(grads)) == 1  # bound, once
    addresses = [g.data_ptr() for g in grads]
    for _ in range(3):  # the steady state: autograd accumulates into the views, no copy
        opt.step()
        opt.zero_grad()
        model(SmallNet.inputs()).sum().backward()
        assert [p.grad.data_ptr() for p in model.parameters() if p.requires_grad] == addresses
    assert torch.equal(model.conv.bias.detach(), frozen)


def test_zero_grad_set_to_none_then_step(kernel: str) -> None:
    model, opt = build(kernel)
    reference_model, reference = build(kernel)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in model.parameters())
        loss_of(model, step).backward()
        opt.step()
        reference.zero_grad()
        loss_of(reference_model, step).backward()
        reference.step()
    assert_equal_snapshots(snapshot(model, opt), snapshot(reference_model, reference))
    assert len(flat_storages([p.grad for p in model.parameters() if p.grad is not None])) == 1


def test_closure_return_value_and_enable_grad() -> None:
    model, opt = build()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        return loss

    with torch.no_grad():  # the closure runs with gradients on, as in torch.optim
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert opt.step() is None


@pytest.mark.parametrize("kind", ["complex", "sparse"])
def test_complex_and_sparse_gradients_are_refused(kind: str) -> None:
    model, opt = build()
    train(model, opt, range(1))
    before = snapshot(model, opt)
    weight = model.fc1.weight
    if kind == "complex":
        if hasattr(weight, "grad_dtype"):
            weight.grad_dtype = None  # newer torch refuses a gradient of another dtype unless told
        weight.grad = torch.zeros(weight.shape, dtype=torch.complex64)
        message = "complex gradients"
    else:
        weight.grad = torch.zeros(weight.shape).to_sparse()
        message = "sparse gradients"
    with pytest.raises(TypeError, match=rf"SLBI does not support {message} \(parameter 'fc1.weight'"):
        opt.step()
    weight.grad = None
    assert_equal_snapshots(snapshot(model, opt), before)


def test_all_zero_gradients_still_move_penalised_weights() -> None:
    """A difference from SGD, on purpose: with g = 0 and no momentum, SGD leaves W alone,
    but SLBI's step is W ← W − α·κ·(W − Γ)/μ and Z ← Z + α/μ·(W − Γ): the weights keep
    moving toward their sparse image Γ, which is the method's math, not a bug."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 5))
    opt = SLBI([weight], lr=0.1, mu=2.0, lam=0.5, momentum=0.0)
    before = weight.detach().clone()
    weight.grad = torch.zeros_like(weight)
    opt.step()
    assert torch.allclose(weight.detach(), before - 0.1 * before / 2.0)  # Γ_0 = 0
    assert torch.allclose(opt.state[weight]["z"], 0.1 / 2.0 * before)


# -- copy, pickle, repr ------------------------------------------------------------------


def _prepared(kernel: str) -> tuple[OddNet, SLBI]:
    model, opt = build(kernel)
    train(model, opt, range(2))
    opt.update_order(1)
    opt.prune_layer(30, "fc1.weight", freeze=True)
    with pytest.warns(UserWarning, match="keeps the changes"):  # the step commits the prune
        train(model, opt, range(2, 3))
    opt.prune_layer(20, "conv.weight")  # pending: recover() undoes it
    return model, opt


def _step_both(model: nn.Module, opt: SLBI, twin: SLBI, step: int) -> None:
    """One step of ``opt`` on ``model``'s loss, and of ``twin`` on the same gradients."""
    opt.zero_grad()
    loss_of(model, step).backward()
    for ours, theirs in zip(all_params(opt), all_params(twin), strict=True):
        theirs.grad = None if ours.grad is None else ours.grad.clone()
    opt.step()
    twin.step()


@pytest.mark.parametrize("how", ["deepcopy-trainer", "deepcopy-optimizer", "pickle"])
def test_copies_are_independent_and_step_identically(kernel: str, how: str) -> None:
    """A copy lays out its own flat buffers (no storage shared with the original), keeps
    the options, the step count, the toolbox state (names, entry epochs, path history,
    frozen masks, the prune snapshot) and steps bit for bit like the original."""
    model, opt = _prepared(kernel)
    if how == "deepcopy-trainer":  # model and optimizer together: the copy trains the copy
        model_copy, opt_copy = copy.deepcopy((model, opt))
        assert all_params(opt_copy) == list(model_copy.parameters())
    elif how == "deepcopy-optimizer":  # alone: its parameters are copies, as in torch
        opt_copy = copy.deepcopy(opt)
    else:
        opt_copy = pickle.loads(pickle.dumps(opt))
    assert not flat_storages(all_params(opt_copy)) & flat_storages(all_params(opt))
    assert not flat_storages([v for p in all_params(opt_copy) for v in opt_copy.state[p].values()]) & \
        flat_storages([v for p in all_params(opt) for v in opt.state[p].values()])
    assert (opt_copy.backend, opt_copy.fused, opt_copy.kernels()[0].kernel) == (
        opt.backend, opt.fused, opt.kernels()[0].kernel)
    assert opt_copy.names == opt.names
    for name in ("conv.weight", "fc1.weight"):
        ours, theirs = opt.path_history(name), opt_copy.path_history(name)
        assert ours["epochs"] == theirs["epochs"] and torch.equal(ours["norms"], theirs["norms"])
        assert torch.equal(opt.order_score(name), opt_copy.order_score(name))
    assert repr(opt_copy.state_dict()["slbi"]) == repr(opt.state_dict()["slbi"])
    opt_copy.recover()  # the saved copies of the pending prune came along too
    opt.recover()
    for step in range(3, 5):
        _step_both(model, opt, opt_copy, step)
    for ours, theirs in zip(all_params(opt), all_params(opt_copy), strict=True):
        assert torch.equal(ours, theirs)
        assert opt.state[ours].keys() == opt_copy.state[theirs].keys()
        for key, value in opt.state[ours].items():
            assert torch.equal(value, opt_copy.state[theirs][key]), key
    with pytest.raises(ValueError, match="nothing to recover"):
        opt_copy.recover()


def test_repr_lists_the_groups_and_options() -> None:
    _, opt = build()
    text = repr(opt)
    assert text.startswith("SLBI (") and "Parameter Group 0" in text
    for key in ("lr: 0.05", "mu: 2.0", "lam: 0.05", "kappa: 1.0", "penalty: auto"):
        assert key in text


def test_momentum_buffer_only_where_a_group_keeps_one() -> None:
    kept, plain = nn.Parameter(torch.randn(10)), nn.Parameter(torch.randn(30, 30, dtype=torch.float64))
    opt = SLBI([{"params": [kept], "momentum": 0.9}, {"params": [plain], "momentum": 0.0}], lr=0.1)
    kept.grad, plain.grad = torch.ones_like(kept), torch.ones_like(plain)
    opt.step()
    assert "momentum_buffer" in opt.state[kept] and "momentum_buffer" not in opt.state[plain]
    assert [info.dtype for info in opt.kernels()] == [torch.float32, torch.float64]


def test_a_scheduler_keeps_a_step_wrapper_installed_before_it() -> None:
    """As with torch.optim.SGD: the scheduler wraps whatever ``opt.step`` is."""
    import types

    model, opt = build()
    calls = []
    original = opt.step

    def logged_step(self, *args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    opt.step = types.MethodType(logged_step, opt)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    for step in range(3):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
        scheduler.step()
    assert calls == [1, 1, 1]
