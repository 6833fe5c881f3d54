"""Parameters whose storage is replaced after the optimizer was built: ``model.to(dtype)``
(``.double()``, ``.half()``, with and without swap_module_params_on_conversion),
``load_state_dict(assign=True)``, ``module.weight = Parameter(...)``, ``p.data = ...``.
The next step re-binds them into the flat buffers, Z and momentum follow, and no
parameter is ever silently left out of the update. Tied weights are one entry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slbi_triton import SLBI

from .helpers import SmallNet, all_params, flat_storages, penalty_of, snapshot
from .reference import RefParam, rel_err

HP = {"lr": 0.05, "kappa": 1.5, "mu": 4.0, "lam": 0.1, "momentum": 0.9, "dampening": 0.0,
      "weight_decay": 1e-3}


def make(steps: int = 2) -> tuple[SmallNet, SLBI]:
    """A model and optimizer after ``steps`` real steps (Z and momentum are non-zero)."""
    torch.manual_seed(0)
    model = SmallNet()
    opt = SLBI(model.named_parameters(), backend="torch", fused=False, **HP)
    for _ in range(steps):
        forward_backward(model, opt)
        opt.step()
    return model, opt


def forward_backward(model: SmallNet, opt: SLBI) -> None:
    opt.zero_grad()
    dtype = next(model.parameters()).dtype
    model(torch.randn(4, 1, 4, 4, dtype=dtype)).square().mean().backward()


def assert_in_flat_buffers(model: nn.Module, opt: SLBI) -> None:
    """One flat weight and gradient buffer per (device, dtype), state in the same dtype."""
    params = list(model.parameters())
    buckets = len(opt.kernels())
    assert len(flat_storages(params)) == buckets
    grads = [p.grad for p in params if p.grad is not None]  # None until autograd made one
    assert len(flat_storages(grads)) <= buckets and not flat_storages(grads) & flat_storages(params)
    for name, p in model.named_parameters():
        for key in ("z", "momentum_buffer"):
            if key in opt.state[p]:
                assert opt.state[p][key].dtype == p.dtype, (name, key)


def step_matches_reference(model: nn.Module, opt: SLBI, tol: float) -> None:
    """Give every parameter a gradient, step, and compare W and Z with the float64
    reference started from the optimizer's current W, Z and momentum."""
    gen = torch.Generator().manual_seed(5)
    refs, grads = {}, {}
    for name, p in model.named_parameters():
        ref = RefParam(p, penalty_of(opt, p), HP)
        state = opt.state[p]
        if "z" in state:
            ref.z = state["z"].double().clone()
        if "momentum_buffer" in state:
            ref.v = state["momentum_buffer"].double().clone()
        refs[name] = ref
        grads[name] = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.grad = grads[name].to(p.dtype)  # a foreign gradient: step() copies it in
        ref.step(p.grad)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} was left out of the update"
        assert rel_err(p, refs[name].w) <= tol, name
        if "z" in opt.state[p]:
            assert rel_err(opt.state[p]["z"], refs[name].z) <= tol, name
    assert_in_flat_buffers(model, opt)


@pytest.fixture(params=[False, True], ids=["set_data", "swap_tensors"])
def swap(request):
    """Run with torch.__future__.set_swap_module_params_on_conversion off and on."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(request.param)
    yield request.param
    torch.__future__.set_swap_module_params_on_conversion(previous)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["double", "half"])
def test_model_to_dtype_rebinds_and_state_follows(swap: bool, dtype: torch.dtype) -> None:
    model, opt = make()
    before = snapshot(model, opt)
    params_before = list(model.parameters())
    model.to(dtype)
    assert list(model.parameters()) == params_before or swap  # same Parameter objects
    step_matches_reference(model, opt, tol=1e-6 if dtype == torch.float64 else 2e-3)
    assert [info.dtype for info in opt.kernels()] == [dtype]
    # Z and momentum came along, cast (checked on a copy made right after the cast).
    model2, opt2 = make()
    model2.to(dtype)
    opt2.zero_grad()  # re-binds too
    after = snapshot(model2, opt2)
    assert after.keys() == before.keys()
    for key, value in before.items():
        if key.endswith("/group_norms"):
            # Of the cast Z, in the new dtype's arithmetic (float64 for float64).
            z = after[key.replace("group_norms", "z")].to(after[key].dtype).reshape(3, -1)
            assert after[key].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert torch.equal(after[key], torch.linalg.vector_norm(z, dim=1))
        else:
            assert torch.equal(after[key], value.to(dtype)), key


def test_model_double_then_real_backward_updates_everything(swap: bool) -> None:
    """With swap_tensors the autograd engine drops our post-accumulate-grad hooks; the
    re-bind re-arms them (zero_grad first) or trusts the gradient found (no zero_grad)."""
    for zero_grad_first in (True, False):
        model, opt = make()
        opt.zero_grad()  # no parameter has seen a gradient ...
        model.double()  # ... and here the hooks may go
        if zero_grad_first:
            forward_backward(model, opt)
        else:
            model(torch.randn(4, 1, 4, 4, dtype=torch.float64)).square().mean().backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        for name, p in model.named_parameters():
            assert not torch.equal(p.detach(), before[name]), (zero_grad_first, name)
        assert_in_flat_buffers(model, opt)
        # The hooks are armed again: every parameter steps.
        assert train_changes(model, opt, 1) == [True], zero_grad_first


def test_load_state_dict_assign_rebinds_new_parameters(swap: bool) -> None:
    model, opt = make()
    state = snapshot(model, opt)
    source = SmallNet()
    loaded = {k: v.clone() for k, v in source.state_dict().items()}
    old_params = list(model.parameters())
    model.load_state_dict(loaded, assign=True)
    new_params = list(model.parameters())
    assert swap or all(a is not b for a, b in zip(old_params, new_params, strict=True))
    forward_backward(model, opt)
    step_matches_reference(model, opt, tol=1e-6)
    # The optimizer now holds the model's Parameters, with their old Z and momentum.
    assert all_params(opt) == new_params
    assert opt.names == [n for n, _ in model.named_parameters()]
    model2, opt2 = make()
    model2.load_state_dict(loaded, assign=True)
    opt2.zero_grad()
    for name, p in model2.named_parameters():
        assert torch.equal(p.detach(), loaded[name]), name  # the loaded values, now in our buffer
        for key in ("z", "momentum_buffer"):
            if f"{name}/{key}" in state:
                assert torch.equal(opt2.state[p][key], state[f"{name}/{key}"]), (name, key)
    assert_in_flat_buffers(model2, opt2)


def test_module_attribute_given_new_parameter() -> None:
    model, opt = make()
    z = opt.state[model.fc.weight]["z"].clone()
    model.fc.weight = nn.Parameter(torch.randn(2, 12))
    opt.zero_grad()  # re-binds (as step() would): the reference starts from the moved state
    step_matches_reference(model, opt, tol=1e-6)
    assert opt.param_groups[0]["params"][2] is model.fc.weight
    opt.update_order(0)  # the toolbox sees the new Parameter under the old name
    assert opt.order_score("fc.weight").shape == (2, 12)
    assert not torch.equal(opt.state[model.fc.weight]["z"], z)  # it moved on from the old Z


def test_frozen_masks_follow_a_replaced_parameter() -> None:
    model, opt = make()
    opt.update_order(0)
    opt.prune_layer(50, "fc.weight", freeze=True)
    pruned = model.fc.weight.detach() == 0
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    forward_backward(model, opt)
    opt.step()
    assert (model.fc.weight.detach()[pruned] == 0).all()
    fc_index = [n for n, _ in model.named_parameters()].index("fc.weight")
    assert list(opt.state_dict()["slbi"]["frozen"]) == [fc_index]


def test_set_data_same_and_other_dtype() -> None:
    model, opt = make()
    new_values = torch.randn(2, 12)
    model.fc.weight.data = new_values.clone()
    forward_backward(model, opt)
    opt.step()
    assert_in_flat_buffers(model, opt)
    assert not torch.equal(model.fc.weight.detach(), new_values)  # updated from the new values
    model.conv.weight.data = model.conv.weight.detach().double()  # now two buckets
    assert {info.dtype for info in opt.kernels()} == {torch.float32}
    step_matches_reference_mixed(model, opt)


def step_matches_reference_mixed(model: SmallNet, opt: SLBI) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert {info.dtype for info in opt.kernels()} == {torch.float32, torch.float64}
    assert opt.state[model.conv.weight]["z"].dtype == torch.float64
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name
    assert_in_flat_buffers(model, opt)


def test_tied_weights_are_one_entry() -> None:
    torch.manual_seed(0)
    encoder, decoder = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    decoder.weight = encoder.weight
    model = nn.Sequential(encoder, nn.Tanh(), decoder)
    named = list(model.named_parameters())
    assert len(named) == 1
    opt = SLBI(named, backend="torch", fused=False, **HP)
    assert len(opt.param_groups[0]["params"]) == 1
    with pytest.raises(ValueError, match="more than once"):
        SLBI([encoder.weight, decoder.weight], backend="torch")
    ref = RefParam(encoder.weight, "l1", HP)
    x = torch.randn(3, 4)
    opt.zero_grad()
    model(x).square().sum().backward()  # both uses accumulate into the one view
    grad = encoder.weight.grad.clone()
    w = encoder.weight.detach().clone().requires_grad_()
    (torch.tanh(x @ w.T) @ w.T).square().sum().backward()
    assert torch.allclose(grad, w.grad, rtol=1e-6)
    ref.step(grad)
    opt.step()
    assert rel_err(encoder.weight, ref.w) <= 1e-6 and decoder.weight is encoder.weight


def test_untied_by_assign_is_refused_until_tied_again() -> None:
    torch.manual_seed(0)
    encoder, decoder = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    decoder.weight = encoder.weight
    model = nn.Sequential(encoder, nn.Tanh(), decoder)
    opt = SLBI(model.named_parameters(), backend="torch", fused=False, **HP)
    opt.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    before = snapshot(model, opt)
    weight = encoder.weight.detach().clone()
    # load_state_dict(assign=True) gives each module its own new Parameter.
    model.load_state_dict({"0.weight": weight.clone(), "2.weight": weight.clone()}, assign=True)
    assert encoder.weight is not decoder.weight
    with pytest.raises(ValueError, match="replaced by 2 different Parameters"):
        opt.step()
    (held,) = opt.param_groups[0]["params"]
    assert held is not encoder.weight
    assert torch.equal(held.detach(), before["0.weight"])
    decoder.weight = encoder.weight  # tied again
    opt.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert opt.param_groups[0]["params"][0] is encoder.weight
    assert not torch.equal(encoder.weight.detach(), weight)


def test_shape_change_is_refused_before_anything_changes() -> None:
    model, opt = make()
    forward_backward(model, opt)
    before = snapshot(model, opt)
    model.fc.weight.data = torch.zeros(3, 12)
    with pytest.raises(ValueError, match=r"parameter 'fc.weight' changed shape from \(2, 12\) to \(3, 12\)"):
        opt.step()
    model.fc.weight.data = before["fc.weight"].clone()
    model.fc.bias = nn.Parameter(torch.zeros(5))
    with pytest.raises(ValueError, match=r"fc\.bias"):
        opt.zero_grad()
    for name, p in model.named_parameters():
        if name != "fc.bias":
            for key, value in opt.state[p].items():
                assert torch.equal(value, before[f"{name}/{key}"]), (name, key)
    assert torch.equal(opt.param_groups[0]["params"][-1].detach(), before["fc.bias"])


# -- regressions found in review ------------------------------------------------------------


def train_changes(model: nn.Module, opt: SLBI, steps: int = 3) -> list[bool]:
    """For each step: whether every weight changed."""
    changed = []
    for _ in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        forward_backward(model, opt)
        opt.step()
        changed.append(all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)))
    return changed


@pytest.mark.parametrize("conversion", ["float", "to_cpu", "load_state_dict"])
def test_swap_in_place_keeps_training(conversion: str) -> None:
    """Under swap_module_params_on_conversion a conversion that keeps the data where it
    was still swaps the TensorImpl (and drops our hook): it is found and re-armed."""
    model, opt = make()
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        if conversion == "float":
            model.float()
        elif conversion == "to_cpu":
            model.to("cpu")
        else:
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert train_changes(model, opt) == [True, True, True]
    assert_in_flat_buffers(model, opt)


def test_requires_grad_switched_on_later_trains_every_step() -> None:
    torch.manual_seed(0)
    model = SmallNet()
    model.fc.weight.requires_grad_(False)
    opt = SLBI(model.named_parameters(), backend="torch", **HP)
    forward_backward(model, opt)
    opt.step()
    assert model.fc.weight.grad is None
    model.fc.weight.requires_grad_(True)
    assert train_changes(model, opt, 4) == [True] * 4


@pytest.mark.parametrize("round_trip", ["double", "half"])
def test_round_trip_conversion_keeps_grad_in_the_flat_buffer(round_trip: str) -> None:
    """``model.double().float()`` replaces ``.grad.data`` in place: the gradient is bound
    again, and training equals a run without the round trip."""
    model, opt = make()
    control_model, control = make()
    getattr(model, round_trip)().float()
    for m, o in ((model, opt), (control_model, control)):
        torch.manual_seed(9)
        for _ in range(3):
            forward_backward(m, o)
            o.step()
    assert_in_flat_buffers(model, opt)
    for a, b in zip(model.parameters(), control_model.parameters(), strict=True):
        assert rel_err(a, b) <= (1e-6 if round_trip == "double" else 2e-3)


def test_memory_format_change_after_construction_is_kept() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    opt = SLBI(conv.parameters(), backend="torch", **HP)
    conv.to(memory_format=torch.channels_last)
    conv(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert opt.state[conv.weight]["z"].is_contiguous(memory_format=torch.channels_last)


def test_a_dead_optimizer_leaves_no_hook_and_no_buffer() -> None:
    import gc
    import weakref

    torch.manual_seed(0)
    model = SmallNet()
    opt = SLBI(model.parameters(), backend="torch")
    forward_backward(model, opt)
    opt.step()
    z = weakref.ref(opt.state[model.fc.weight]["z"])  # the slot's own view of the flat Z
    dead = weakref.ref(opt)
    del opt
    gc.collect()
    assert dead() is None and z() is None  # the hooks kept neither the optimizer nor its buffers
    again = SLBI(model.parameters(), backend="torch")
    del again
    gc.collect()
    # An internal on purpose: the hook dict of the parameter holds none of ours.
    assert not model.fc.weight._post_accumulate_grad_hooks
