"""What a new user hits in the first hour with the toolbox and slim, and nothing is lost
silently: recover() undoes every layer pruned since the last recover(), a step commits
the changes (with a warning) instead of being thrown away, checkpoints keep the saved
copies, a W* with an empty support is refused by slim, wrapper prefixes (DDP,
torch.compile, FSDP, activation checkpointing) are accepted, and tied weights are named.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn

import slbi_triton
from slbi_triton import SLBI, SlimError, UnknownLayerError

from .helpers import assert_equal_snapshots, snapshot


def net() -> nn.Sequential:
    """``0.weight`` and ``1.weight``: group-penalised convs; ``3.weight``: l1."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def train(model: nn.Module, opt: SLBI, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def trained(**options) -> tuple[nn.Sequential, SLBI]:
    model = net()
    opt = SLBI(model.named_parameters(), lr=0.1, mu=2.0, lam=0.05, backend="torch", **options)
    train(model, opt, range(3))
    opt.update_order(0)
    return model, opt


def everything(model: nn.Module, opt: SLBI) -> dict[str, torch.Tensor]:
    """W, Z, momentum, group norms and the frozen masks, copied."""
    out = snapshot(model, opt)
    out.update({f"frozen/{i}": m.clone() for i, m in opt.state_dict()["slbi"]["frozen"].items()})
    return out


# -- 1. recover(): a saved copy per layer; a step commits -------------------------------


def test_recover_restores_every_layer_pruned_since_the_last_recover() -> None:
    model, opt = trained()
    before = everything(model, opt)
    opt.prune_layer(50, "0.weight")
    opt.prune_layer(50, "1.weight", freeze=True)
    opt.prune_layer(50, "0.weight", prune_bias=True)  # the same layer again
    opt.use_w_star()
    assert (model[0].weight.detach().flatten(1) == 0).all(dim=1).sum() >= 2
    assert (model[1].weight.detach().flatten(1) == 0).all(dim=1).sum() >= 3
    opt.recover()
    assert_equal_snapshots(everything(model, opt), before)  # both layers, bias, W*, freeze
    with pytest.raises(ValueError, match="nothing to recover: call prune_layer"):
        opt.recover()


def test_recover_then_step_trains_as_if_nothing_was_pruned() -> None:
    """The order that undoes a prune: recover() before step()."""
    model, opt = trained()
    twin_model, twin_opt = copy.deepcopy((model, opt))
    opt.prune_layer(50, ["0.weight", "1.weight"], prune_bias=True, freeze=True)
    opt.recover()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: nothing was committed
        train(model, opt, range(3, 5))
    train(twin_model, twin_opt, range(3, 5))
    assert_equal_snapshots(everything(model, opt), everything(twin_model, twin_opt))


@pytest.mark.parametrize("change", ["prune", "prune_frozen", "use_w_star"])
def test_a_step_after_a_change_commits_it_with_one_warning(change: str) -> None:
    """The other order: the step trains on from the pruned weights or W*, so recover()
    refuses (saying why) instead of throwing the step away."""
    model, opt = trained()
    twin_model, twin_opt = copy.deepcopy((model, opt))
    for optimizer in (opt, twin_opt):
        if change == "use_w_star":
            optimizer.use_w_star()
        else:
            optimizer.prune_layer(50, ["0.weight", "1.weight"], freeze=change == "prune_frozen")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, range(3, 6))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "keeps the changes" in messages[0] and "recover() before step()" in messages[0]
    assert caught[0].filename == __file__  # it points at the user's opt.step()
    after = everything(model, opt)
    what = "use_w_star()" if change == "use_w_star" else r"prune_layer\(50, \['0.weight', '1.weight'\]\)"
    with pytest.raises(ValueError, match=f"nothing to recover: a step after {what}"):
        opt.recover()
    assert_equal_snapshots(everything(model, opt), after)  # the steps are kept
    # The steps trained on from the changed weights: as a twin that never could recover.
    with pytest.warns(UserWarning, match="keeps the changes"):
        train(twin_model, twin_opt, range(3, 6))
    assert_equal_snapshots(after, everything(twin_model, twin_opt))
    if change == "prune_frozen":  # the freeze outlives the commit
        assert (model[1].weight.detach().flatten(1) == 0).all(dim=1).sum() == 3


def test_a_compiled_step_commits_too() -> None:
    """A step inside torch.compile'd code keeps no host bookkeeping: the next toolbox
    call sees the step count and commits."""
    model, opt = trained()
    compiled_step = torch.compile(opt.step, backend="eager")
    opt.prune_layer(50, "1.weight")
    x, y = batch(9)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    compiled_step()
    committed = pytest.warns(UserWarning, match="keeps the changes")
    with committed, pytest.raises(ValueError, match="a step after prune_layer"):
        opt.recover()


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
def test_checkpoints_keep_the_saved_copies_of_every_layer(how: str) -> None:
    model, opt = trained()
    before = everything(model, opt)
    opt.prune_layer(50, "0.weight", freeze=True)
    opt.prune_layer(50, "1.weight", prune_bias=True)
    pruned = everything(model, opt)
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        model, _ = trained()
        opt = SLBI(model.named_parameters(), lr=0.1, mu=2.0, lam=0.05, backend="torch")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
    elif how == "pickle":
        model, opt = pickle.loads(pickle.dumps((model, opt)))
    else:
        model, opt = copy.deepcopy((model, opt))
    assert_equal_snapshots(everything(model, opt), pruned)
    opt.recover()
    assert_equal_snapshots(everything(model, opt), before)


def test_a_bad_snapshot_in_a_state_dict_is_refused_before_anything_changes() -> None:
    model, opt = trained()
    opt.prune_layer(50, "1.weight")
    good = opt.state_dict()
    bad = copy.deepcopy(good)
    index = next(iter(bad["slbi"]["snapshot"]["saved"]))
    bad["slbi"]["snapshot"]["saved"][index]["weight"] = torch.zeros(2, 2)
    before = everything(model, opt)
    with pytest.raises(ValueError, match=r"\['snapshot'\]\['saved'\]\[\d+\]\['weight'\] must be a floating"):
        opt.load_state_dict(bad)
    assert_equal_snapshots(everything(model, opt), before)
    opt.recover()  # the pending copies are still there


# -- 7. slim: a W* with an empty support ---------------------------------------------------


def lenet_with_an_empty_support() -> tuple[nn.Module, SLBI, torch.Tensor]:
    """LeNet after two steps at λ 1: Z is far below λ, so W* is zero everywhere."""
    from slbi_triton.train.models import LeNet

    torch.manual_seed(0)
    model = LeNet()
    opt = SLBI(model.named_parameters(), lr=0.1, mu=100.0, lam=1.0)
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(images), torch.arange(4)).backward()
        opt.step()
    return model, opt, images


def test_slim_refuses_a_w_star_whose_support_is_empty() -> None:
    pytest.importorskip("torch_pruning")
    model, opt, images = lenet_with_an_empty_support()
    assert all(row.support == 0 for row in opt.sparsity())
    before = copy.deepcopy(model.state_dict())
    empty = r"W\* is zero in every output channel of \['conv1.weight'.*\(the support is empty there\)"
    with pytest.raises(SlimError, match=empty):
        slbi_triton.slim(model, opt, images)
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)


def test_slim_refuses_a_layer_pruned_entirely() -> None:
    pytest.importorskip("torch_pruning")
    model, opt, images = lenet_with_an_empty_support()
    opt.update_order(0)
    opt.prune_layer(100, "conv2.weight")
    with pytest.raises(SlimError, match=r"every output channel of \['conv2.weight'\] is zero \(pruned\)"):
        slbi_triton.slim(model, opt, images, remove="pruned")


class Residual(nn.Module):
    """stem → (conv_a → ReLU → conv_b) + skip → head: an empty block leaves the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + self.conv_b(torch.relu(self.conv_a(h)))
        return self.head(h.mean(dim=(2, 3)))


def test_slim_keeps_a_residual_block_whose_support_is_empty() -> None:
    """An empty layer that the skip connection goes around does not cut the output off."""
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = Residual()
    opt = SLBI(model.named_parameters(), lr=0.1, mu=100.0, lam=1.0)
    state = opt.state_dict()
    for index, name in enumerate(opt.names):
        if name in ("stem.weight", "head.weight"):  # in the support; the block's convs are not
            param = dict(model.named_parameters())[name]
            state["state"][index]["z"] = 3.0 * param.detach().sign()
    opt.load_state_dict(state)
    images = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    result = slbi_triton.slim(model, opt, images)
    assert result.difference <= slbi_triton.slimming.TOLERANCE
    assert result.model.conv_a.out_channels < 4


def test_slim_warns_where_the_input_has_no_gradient() -> None:
    """Token inputs: whether the output still reads them is not measured, so a loud warning."""
    pytest.importorskip("torch_pruning")

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.fc = nn.Linear(6, 3)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(tokens).mean(dim=1))

    model = Tokens()
    opt = SLBI(model.named_parameters(), lam=1.0, penalty="l1")  # "auto" leaves an embedding alone
    with pytest.warns(UserWarning, match=r"\['emb.weight', 'fc.weight'\].*support is empty.*not checked"):
        slbi_triton.slim(model, opt, torch.randint(0, 10, (4, 5)))


# -- 8. wrapper prefixes -------------------------------------------------------------------


@pytest.fixture
def gloo_group():
    """One process, gloo: enough for DistributedDataParallel to wrap a CPU model."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_an_optimizer_over_ddp_names_works_with_the_inner_module(gloo_group) -> None:
    model = net()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = SLBI(ddp.named_parameters(), lr=0.1, mu=2.0, lam=0.05, backend="torch")
    assert opt.names[0] == "module.0.weight"
    train(ddp, opt, range(3))
    opt.update_order(0)
    assert torch.equal(opt.w_star("0.weight"), opt.w_star("module.0.weight"))
    assert torch.equal(opt.path_history("0.weight")["norms"], opt.path_history("module.0.weight")["norms"])
    opt.prune_layer(50, "1.weight", prune_bias=True)  # finds module.1.bias too
    assert (model[1].bias.detach() == 0).sum() == 3
    images = batch(0)[0]
    for target in (ddp.module, ddp):
        result = slbi_triton.slim(target, opt, images, remove="pruned")
        assert result.removed["1.weight"] == result.removed["1.bias"][:1]
        assert result.optimizer.names == [name for name, _ in result.model.named_parameters()]
        assert result.model[1].out_channels == 3


def test_a_compiled_models_names_are_accepted() -> None:
    model = net()
    compiled = torch.compile(model, backend="eager")
    opt = SLBI(compiled.named_parameters(), lr=0.1, mu=2.0, lam=0.05, backend="torch")
    assert opt.names[0] == "_orig_mod.0.weight"
    train(model, opt, range(2))
    opt.update_order(0)
    opt.prune_layer(50, ["0.weight", "_orig_mod.1.weight", "module.3.weight"])
    opt.recover()
    result = slbi_triton.slim(compiled, opt, batch(0)[0], remove="pruned")
    assert result.optimizer.names[0] == "0.weight"
    # And the other way round: an optimizer over the plain model, names with prefixes.
    plain = SLBI(model.named_parameters(), backend="torch")
    assert torch.equal(plain.gamma("_orig_mod.3.weight"), plain.gamma("3.weight"))


def test_fsdp_and_checkpoint_wrapper_names_are_accepted() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = nn.Sequential(checkpoint_wrapper(nn.Linear(4, 3)))
    opt = SLBI(model.named_parameters(), backend="torch")
    assert opt.names[0] == "0._checkpoint_wrapped_module.weight"
    assert torch.equal(opt.w_star("0.weight"), model[0].weight.detach() * 0)
    # FSDP (use_orig_params=True) names its parameters like this:
    opt.assign_name(["_fsdp_wrapped_module.0.weight", "_fsdp_wrapped_module.0.bias"])
    assert opt.gamma("0.weight").shape == (3, 4)
    opt.assign_name(["module.0.weight", "0.weight"])  # two names that unwrap alike
    with pytest.raises(UnknownLayerError, match=r"ambiguous.*\['0.weight', 'module.0.weight'\]"):
        opt.gamma("_orig_mod.0.weight")


# -- 10. tied weights ----------------------------------------------------------------------


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


def lm_steps(model: TiedLM, opt: SLBI) -> None:
    tokens = torch.randint(0, 12, (4, 5), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        opt.step()


def test_an_unknown_name_says_it_may_be_a_tied_weight() -> None:
    model = TiedLM()
    opt = SLBI(model.named_parameters(), backend="torch")
    with pytest.raises(UnknownLayerError, match=r"If 'head.weight' is tied .*remove_duplicate=False"):
        opt.w_star("head.weight")
    with pytest.raises(UnknownLayerError) as typo:  # a typo is not taken for a tie
        opt.w_star("emb.wieght")
    assert "tied" not in str(typo.value)


def test_both_names_of_a_tied_weight_work_with_remove_duplicate_false() -> None:
    model, twin = TiedLM(), TiedLM()
    # "l1": "auto" leaves a weight an embedding holds unpenalised.
    hyper = {"lr": 0.1, "mu": 2.0, "lam": 0.01, "penalty": "l1", "backend": "torch"}
    opt = SLBI(model.named_parameters(remove_duplicate=False), **hyper)
    twin_opt = SLBI(twin.named_parameters(), **hyper)
    assert opt.names == twin_opt.names == ["emb.weight", "mix.weight", "mix.bias"]
    lm_steps(model, opt)
    lm_steps(twin, twin_opt)
    assert torch.equal(model.emb.weight, twin.emb.weight)  # the tied tensor is stepped once
    assert torch.equal(opt.w_star("head.weight"), opt.w_star("emb.weight"))
    opt.update_order(0)
    opt.prune_layer(50, "head.weight")
    assert int((model.head.weight == 0).sum()) == 36
    opt.recover()
    copied = pickle.loads(pickle.dumps(opt))
    assert torch.equal(copied.gamma("head.weight"), opt.gamma("emb.weight"))
