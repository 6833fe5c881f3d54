"""Every bad input of the optimizer and of the toolbox: a clear TypeError/ValueError that
names the parameter and the value, raised before any parameter or state changes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from slbi_triton import SLBI
from slbi_triton.toolbox import UnknownLayerError
from slbi_triton.validation import check_hyperparameters

from .helpers import SmallNet


def trained(order: bool = True) -> tuple[SmallNet, SLBI]:
    """After two steps (momentum, Z and group norms non-zero), with a fresh gradient."""
    torch.manual_seed(0)
    model = SmallNet()
    opt = SLBI(model.named_parameters(), lr=0.1, mu=3.0, lam=0.05, backend="torch", fused=False)
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(4, 1, 4, 4)).square().mean().backward()
        if step < 2:
            opt.step()
    if order:
        opt.update_order(0)
    return model, opt


def everything(model: nn.Module, opt: SLBI) -> dict:
    """All that a refused call must leave as it was."""
    out: dict = {"groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}
    out["group_params"] = [[id(p) for p in g["params"]] for g in opt.param_groups]
    for name, p in model.named_parameters():
        out[name] = p.detach().clone()
        out[f"{name}/grad"] = None if p.grad is None else p.grad.to_dense().clone()
        out[f"{name}/storage"] = p.untyped_storage().data_ptr()
        for key, value in opt.state[p].items():
            out[f"{name}/{key}"] = value.clone()
    out["kernels"] = opt.kernels()
    out["slbi"] = opt.state_dict()["slbi"]  # steps, seed, epoch, path history, frozen masks
    return copy.deepcopy(out)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        elif key == "slbi":
            assert repr(value) == repr(b[key])
        else:
            assert value == b[key], key


# -- construction -----------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_HYPERPARAMETERS = [
    ({"lr": -0.1}, ValueError, r"Invalid lr \(defaults\): -0\.1"),
    ({"lr": NAN}, ValueError, r"Invalid lr \(defaults\): nan"),
    ({"lr": INF}, ValueError, r"Invalid lr \(defaults\): inf"),
    ({"lr": torch.tensor(NAN)}, ValueError, r"Invalid lr \(defaults\): tensor\(nan\)"),
    ({"lr": "0.1"}, TypeError, r"lr \(defaults\) must be a real number, got str"),
    ({"lr": torch.ones(2)}, ValueError, r"lr \(defaults\) must be a number or a 1-element tensor"),
    ({"kappa": 0.0}, ValueError, r"Invalid kappa \(defaults\): 0\.0; expected a finite number > 0"),
    ({"kappa": -1.0}, ValueError, r"Invalid kappa \(defaults\): -1\.0"),
    ({"mu": 0.0}, ValueError, r"Invalid mu \(defaults\): 0\.0"),
    ({"mu": -3.0}, ValueError, r"Invalid mu \(defaults\): -3\.0"),
    ({"mu": INF}, ValueError, r"Invalid mu \(defaults\): inf"),
    ({"lam": -0.5}, ValueError, r"Invalid lam \(defaults\): -0\.5; expected a finite number >= 0"),
    ({"lam": NAN}, ValueError, r"Invalid lam \(defaults\): nan"),
    ({"momentum": -0.1}, ValueError, r"Invalid momentum \(defaults\): -0\.1; expected in \[0, 1\)"),
    ({"momentum": 1.0}, ValueError, r"Invalid momentum \(defaults\): 1\.0"),
    ({"momentum": True}, TypeError, r"momentum \(defaults\) must be a real number, got bool"),
    ({"dampening": 1.5}, ValueError, r"Invalid dampening \(defaults\): 1\.5"),
    ({"weight_decay": -1e-4}, ValueError, r"Invalid weight_decay \(defaults\): -0\.0001"),
    ({"penalty": "l2"}, ValueError, r"Invalid penalty \(defaults\): 'l2'; expected one of"),
    ({"backend": "cuda"}, ValueError, r"Invalid backend: 'cuda'; expected one of"),
    ({"fused": "yes"}, TypeError, r"fused must be None, True or False, got 'yes'"),
]


def untouched(params: list[nn.Parameter], values: list[torch.Tensor], pointers: list[int]) -> None:
    for p, value, pointer in zip(params, values, pointers, strict=True):
        assert torch.equal(p.detach(), value) and p.data_ptr() == pointer and p.grad is None
        # An internal on purpose: no post-accumulate-grad hook was registered either.
        assert p._post_accumulate_grad_hooks is None


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_refused_at_construction(kwargs, error, message) -> None:
    model = SmallNet()
    params = list(model.parameters())
    values, pointers = [p.detach().clone() for p in params], [p.data_ptr() for p in params]
    with pytest.raises(error, match=message):
        SLBI(model.parameters(), **kwargs)
    untouched(params, values, pointers)


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_HYPERPARAMETERS[:-2])
def test_bad_hyperparameters_in_a_later_group(kwargs, error, message) -> None:
    model = SmallNet()
    params = list(model.parameters())
    values, pointers = [p.detach().clone() for p in params], [p.data_ptr() for p in params]
    message = message.replace(r"\(defaults\)", r"\(param group 1\)")
    with pytest.raises(error, match=message):
        SLBI([{"params": params[:2]}, {"params": params[2:], **kwargs}])
    untouched(params, values, pointers)


def test_bad_parameters_refused_at_construction() -> None:
    model = SmallNet()
    params = list(model.parameters())
    values, pointers = [p.detach().clone() for p in params], [p.data_ptr() for p in params]
    cases = [
        (lambda: SLBI([("fc.bias", model.fc.bias)], penalty="group"), ValueError,
         r"penalty 'group' needs a tensor of at least 2 dims, but parameter 'fc.bias' has shape \(2,\)"),
        (lambda: SLBI([nn.Parameter(torch.tensor(1.0))], penalty="group"), ValueError,
         r"parameter 0 of param group 0 has shape \(\)"),
        (lambda: SLBI([{"params": params}, {"params": [model.fc.weight]}]), ValueError,
         "parameter 0 of param group 1 appears more than once"),
        (lambda: SLBI([model.fc.weight, model.fc.weight]), ValueError, "appears more than once"),
        (lambda: SLBI([("w", nn.Parameter(torch.zeros(2, dtype=torch.complex64)))]), TypeError,
         r"parameter 'w' is complex \(torch.complex64\)"),
        (lambda: SLBI([torch.zeros(3, dtype=torch.int64)]), TypeError, "floating-point"),
        (lambda: SLBI([3.0]), TypeError, "is not a Tensor but float"),
        (lambda: SLBI({model.fc.weight}), TypeError, "set"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        untouched(params, values, pointers)


# -- on a trained optimizer: nothing may change ------------------------------------------


def test_bad_param_groups_at_step_change_nothing() -> None:
    model, opt = trained()
    edits = [
        ("lr", -1.0, ValueError, r"Invalid lr \(param group 0\): -1\.0"),
        ("lr", NAN, ValueError, r"Invalid lr \(param group 0\): nan"),
        ("kappa", 0, ValueError, r"Invalid kappa \(param group 0\): 0"),
        ("mu", -1, ValueError, r"Invalid mu \(param group 0\): -1"),
        ("lam", -0.1, ValueError, r"Invalid lam \(param group 0\): -0\.1"),
        ("momentum", 1.0, ValueError, r"Invalid momentum \(param group 0\): 1\.0"),
        ("penalty", "lasso", ValueError, r"Invalid penalty \(param group 0\): 'lasso'"),
        ("penalty", "group", ValueError, r"penalty 'group' needs a tensor of at least 2 dims.*shape \(3,\)"),
    ]
    for key, value, error, message in edits:
        before = everything(model, opt)
        good = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        with pytest.raises(error, match=message):
            opt.step()
        opt.param_groups[0][key] = good
        assert_same(before, everything(model, opt))


def test_bool_equal_to_a_valid_number_is_still_refused_at_step() -> None:
    """The check of unchanged values is skipped only for the same type: 0 == False."""
    model, opt = trained()
    opt.param_groups[0]["weight_decay"] = 0
    opt.step()
    before = everything(model, opt)
    opt.param_groups[0]["weight_decay"] = False
    with pytest.raises(TypeError, match=r"weight_decay \(param group 0\) must be a real number, got bool"):
        opt.step()
    opt.param_groups[0]["weight_decay"] = 0
    assert_same(before, everything(model, opt))


def test_tensor_lr_edited_in_place_is_checked_at_step() -> None:
    """Plain values that passed are not checked again, tensors are (a scheduler edits them
    in place); a tensor on an accelerator is not read per step (that would wait for it)."""
    model, opt = trained()
    opt.param_groups[0]["lr"] = torch.tensor(0.1)
    opt.step()
    opt.param_groups[0]["lr"].fill_(-1.0)
    before = everything(model, opt)
    with pytest.raises(ValueError, match=r"Invalid lr \(param group 0\): tensor\(-1\.\)"):
        opt.step()
    assert_same(before, everything(model, opt))
    group = {**opt.defaults, "lr": torch.tensor(-1.0, device="meta")}
    check_hyperparameters(group, "param group 0", read_device=False)  # no .item() on meta
    with pytest.raises((NotImplementedError, RuntimeError)):
        check_hyperparameters(group, "param group 0")


def test_bad_add_param_group_changes_nothing() -> None:
    model, opt = trained()
    extra = nn.Linear(3, 3)
    cases = [
        ({"params": [extra.weight], "lr": -1}, ValueError, r"Invalid lr \(param group 1\): -1"),
        ({"params": [extra.weight], "mu": 0}, ValueError, r"Invalid mu \(param group 1\): 0"),
        ({"params": [extra.bias], "penalty": "group"}, ValueError, r"at least 2 dims.*shape \(3,\)"),
        ({"params": [("again", model.fc.weight)]}, ValueError, "parameter 'again' appears more than once"),
        ({"params": [extra.weight, extra.weight]}, ValueError, "more than once"),
        ([extra.weight], TypeError, "param_group must be a dict"),
    ]
    for group, error, message in cases:
        before = everything(model, opt)
        with pytest.raises(error, match=message):
            opt.add_param_group(group)
        assert_same(before, everything(model, opt))
        assert len(opt.param_groups) == 1


def test_sparse_and_complex_gradients_change_nothing() -> None:
    model, opt = trained()
    cases = []
    sparse = torch.sparse_coo_tensor([[0], [1]], [1.0], (2, 12), check_invariants=True)
    sparse_message = r"sparse gradients \(parameter 'fc.weight', layout torch.sparse_coo\)"
    cases.append((model.fc.weight, sparse, sparse_message))
    cases.append((model.fc.bias, torch.zeros(2, dtype=torch.complex64),
                  r"complex gradients \(parameter 'fc.bias', dtype torch.complex64\)"))
    for param, grad, message in cases:
        good = param.grad
        if grad.is_sparse:
            param.grad = grad
        else:
            param.grad = torch.zeros_like(param)
            param.grad.data = grad  # the only way to give a real parameter a complex gradient
        before = everything(model, opt)
        with pytest.raises(TypeError, match=message):
            opt.step()
        assert_same(before, everything(model, opt))
        param.grad = good


def test_toolbox_bad_input_changes_nothing(tmp_path) -> None:
    model, opt = trained()
    calls = [
        (lambda: opt.gamma("fc.wieght"), UnknownLayerError,
         "unknown layer 'fc.wieght'; did you mean 'fc.weight'"),
        (lambda: opt.w_star("nope"), UnknownLayerError, "unknown layer 'nope'; known layers"),
        (lambda: opt.residue("conv.weigth"), UnknownLayerError, "conv.weight"),
        (lambda: opt.order_score("fc"), UnknownLayerError, "unknown layer 'fc'"),
        (lambda: opt.path_history("x"), UnknownLayerError, "unknown layer 'x'"),
        (lambda: opt.prune_layer(10, ["fc.weight", "fc.wieght"]), UnknownLayerError, "fc.wieght"),
        (lambda: opt.prune_layer(-1, "fc.weight"), ValueError, r"percent must be in \[0, 100\], got -1"),
        (lambda: opt.prune_layer(100.01, "fc.weight"), ValueError, r"got 100\.01"),
        (lambda: opt.prune_layer(NAN, "fc.weight"), ValueError, "got nan"),
        (lambda: opt.prune_layer("10", "fc.weight"), TypeError, "percent must be a number"),
        (lambda: opt.recover(), ValueError, "nothing to recover"),
        (lambda: opt.update_order(-1), ValueError, r"epoch must be in \[0, 1048576\), got -1"),
        (lambda: opt.step(record=True), ValueError, r"step\(record=True\) needs path="),
        (lambda: opt.step(record=True, path=3), TypeError, "path must be a str or os.PathLike, got int"),
        (lambda: opt.step(record=True, path=tmp_path, layers=["fc.wieght"]), UnknownLayerError, "fc.weight"),
        (lambda: opt.assign_name(["a"]), ValueError, "assign_name got 1 names for 4 parameters"),
        (lambda: opt.assign_name(["a", "a", "b", "c"]), ValueError, r"duplicate names: \['a'\]"),
    ]
    for call, error, message in calls:
        before = everything(model, opt)
        with pytest.raises(error, match=message):
            call()
        assert_same(before, everything(model, opt))
    assert not list(tmp_path.iterdir())  # no record file written


def test_prune_before_update_order_changes_nothing() -> None:
    model, opt = trained(order=False)
    before = everything(model, opt)
    with pytest.raises(ValueError, match=r"layer 'conv.weight' has no prune order yet; call update_order"):
        opt.prune_layer(50, "conv.weight")
    with pytest.raises(ValueError, match="update_order"):
        opt.prune_layer(50, ["fc.weight", "conv.weight"], prune_bias=True, freeze=True)
    assert_same(before, everything(model, opt))
    assert not opt.state_dict()["slbi"]["frozen"]
    with pytest.raises(ValueError, match="nothing to recover"):
        opt.recover()


def test_bad_state_dicts_change_nothing() -> None:
    model, opt = trained()
    good = opt.state_dict()

    def edited(edit) -> dict:
        state_dict = copy.deepcopy(good)
        edit(state_dict)
        return state_dict

    cases = [
        (edited(lambda sd: sd["param_groups"][0].update(nesterov=True)), ValueError,
         "loaded param group 0 has nesterov=True, which SLBI does not implement"),
        (edited(lambda sd: sd["param_groups"][0].update(maximize=True)), ValueError, "maximize=True"),
        (edited(lambda sd: sd["param_groups"][0].update(lr=-0.5)), ValueError,
         r"Invalid lr \(loaded param group 0\): -0\.5"),
        (edited(lambda sd: sd["param_groups"][0].update(penalty="group")), ValueError, "at least 2 dims"),
        (edited(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0]))), ValueError,
         "the state dict has 2 param groups, this optimizer has 1"),
        (edited(lambda sd: sd["param_groups"][0]["params"].pop()), ValueError,
         "loaded param group 0 has 3 parameters, but param group 0 of this optimizer has 4"),
        (edited(lambda sd: sd["state"][2].update(z=torch.zeros(3, 12))), ValueError,
         r"state of parameter 2: 'z' has shape \(3, 12\), expected \(2, 12\)"),
        (edited(lambda sd: sd["state"][0].update(group_norms=torch.zeros(4))), ValueError,
         r"'group_norms' has shape \(4,\), expected \(3,\)"),
        (edited(lambda sd: sd["state"][0].update(entry_epoch=torch.zeros(3, 1, 3, 3))), ValueError,
         r"'entry_epoch' has shape \(3, 1, 3, 3\), expected \(3,\)"),
        (edited(lambda sd: sd["state"][1].update(momentum_buffer=[0.0, 1.0, 2.0])), TypeError,
         "'momentum_buffer' must be a tensor, got list"),
        (edited(lambda sd: sd["slbi"]["frozen"].update({0: torch.ones(2, dtype=torch.bool)})), ValueError,
         r"frozen mask of parameter 0 has shape \(2,\)"),
        (edited(lambda sd: sd["slbi"]["frozen"].update({9: torch.ones(1, dtype=torch.bool)})), ValueError,
         "names parameter 9, which is not loaded"),
        ({"state": {}}, TypeError, "state_dict must be a mapping with 'state' and 'param_groups'"),
    ]
    for state_dict, error, message in cases:
        before = everything(model, opt)
        with pytest.raises(error, match=message):
            opt.load_state_dict(state_dict)
        assert_same(before, everything(model, opt))
    opt.load_state_dict(good)  # and the good one still loads


def test_messages_name_the_value() -> None:
    """The value is in the message, also for tensors and non-finite numbers."""
    for value in (-1.0, math.inf, -math.inf):
        with pytest.raises(ValueError, match=str(value).replace("+", "")):
            SLBI([nn.Parameter(torch.zeros(2))], lr=value)


def test_bad_slbi_scalars_in_a_state_dict_change_nothing() -> None:
    model, opt = trained()
    for key, value in (("steps", None), ("steps", -1), ("rng_seed", 1.5), ("current_epoch", "3")):
        state_dict = copy.deepcopy(opt.state_dict())
        state_dict["slbi"][key] = value
        before = everything(model, opt)
        with pytest.raises(TypeError, match=rf"state_dict\['slbi'\]\['{key}'\] must be an int"):
            opt.load_state_dict(state_dict)
        assert_same(before, everything(model, opt))


def test_a_tuple_of_parameters_is_checked_like_a_list() -> None:
    model, opt = trained()
    before = everything(model, opt)
    with pytest.raises(TypeError, match=r"dtype torch\.int64; SLBI needs floating-point"):
        opt.add_param_group({"params": (torch.zeros(3, dtype=torch.long), nn.Parameter(torch.zeros(2)))})
    assert_same(before, everything(model, opt))


def test_a_backend_that_cannot_run_a_new_group_is_refused_first(monkeypatch) -> None:
    model, opt = trained()
    opt.backend = "triton"  # Triton runs CPU buffers only under TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    before = everything(model, opt)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA parameters"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))]})
    assert len(opt.param_groups) == 1
    assert_same(before, everything(model, opt))


def test_tensor_momentum_is_refused() -> None:
    with pytest.raises(TypeError, match=r"momentum \(defaults\) must be a number, not a tensor"):
        SLBI([nn.Parameter(torch.zeros(2))], momentum=torch.tensor(0.9))
