"""param_groups: module-aware penalties and coupled channel groups; the MAC model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slbi_triton import SLBI, ModuleGraphError, channel_norms, param_groups, prune_to
from slbi_triton.coupling import channel_groups
from slbi_triton.slimming.graph import ChannelGraph
from slbi_triton.targets import MacModel
from slbi_triton.train.models import ResNet20


class Mixed(nn.Module):
    """Every kind of parameter the module rules tell apart."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.up = nn.ConvTranspose2d(8, 4, 2)
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.hidden = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.ones(1, 1, 4))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens).permute(0, 3, 1, 2)
        x = torch.relu(self.bn(self.conv(self.up(x))))
        return self.head(torch.relu(self.hidden(x.mean(dim=(2, 3)))))


def penalties(groups: list[dict]) -> dict[str, str]:
    return {name: group["penalty"] for group in groups for name, _ in group["params"]}


def test_module_rules_without_inputs() -> None:
    model = Mixed()
    result = penalties(param_groups(model, lam=0.3))
    assert result == {
        "emb.weight": "none", "up.weight": "none", "up.bias": "none", "conv.weight": "group",
        "conv.bias": "none", "bn.weight": "none", "bn.bias": "none", "hidden.weight": "group",
        "hidden.bias": "none", "head.weight": "none", "head.bias": "none", "scale": "none",
    }
    assert all(group["lam"] == 0.3 for group in param_groups(model, lam=0.3))
    # Each parameter once, as the model's own objects.
    listed = [param for group in param_groups(model) for _, param in group["params"]]
    assert len(listed) == len(list(model.parameters()))
    assert {id(p) for p in listed} == {id(p) for p in model.parameters()}


def test_a_tied_parameter_is_listed_once() -> None:
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7))
    model[1].weight = model[0].weight
    names = [name for group in param_groups(model) for name, _ in group["params"]]
    assert names.count("0.weight") == 1 and "1.weight" not in names


def test_resnet20_channel_groups_follow_the_residual_stream() -> None:
    model = ResNet20()
    groups = channel_groups(model, torch.randn(2, 1, 28, 28))
    # 16 stage-1 stream channels, each written by the stem and 3 blocks of stage 1 and,
    # through the option-A shortcuts, by the 3 blocks of stages 2 and 3: 10 writers.
    writers = sorted(len(w) for w in groups.writers)
    assert writers.count(10) == 16
    assert groups.outputs == {"fc.weight"}
    assert "fc.weight" not in groups.ids and "fc.bias" not in groups.ids
    # BatchNorm follows every conv: its γ and β are the members, the filters follow.
    assert all(name.endswith(".weight") and "conv" in name for name in groups.followers)
    stream = groups.ids["layer1.0.bn2.weight"]
    assert torch.equal(stream, groups.ids["bn1.weight"]) and torch.equal(stream, groups.ids["conv1.weight"])
    assert torch.equal(groups.ids["layer2.0.bn2.bias"][8:24], stream)  # channel c+8 carries stage-1 c
    assert (groups.ids["layer2.0.bn2.bias"][:8] != -1).all()
    assert len({int(i) for t in groups.ids.values() for i in t}) == groups.num_groups


def test_param_groups_with_inputs_carry_channel_ids() -> None:
    model = ResNet20()
    groups = param_groups(model, torch.randn(2, 1, 28, 28), mu=10.0)
    coupled, free = groups
    assert coupled["penalty"] == "group" and free["penalty"] == "none"
    assert [name for name, _ in free["params"]] == ["fc.weight", "fc.bias"]
    assert len(coupled["channel_ids"]) == len(coupled["params"]) == len(coupled["channel_followers"])
    for (name, param), ids, follows in zip(
        coupled["params"], coupled["channel_ids"], coupled["channel_followers"], strict=True
    ):
        assert ids.shape == (param.shape[0],) and ids.dtype == torch.int64
        assert follows == ("conv" in name)
    assert coupled["mu"] == free["mu"] == 10.0


def test_an_untraceable_model_names_the_layer_and_the_fallback() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.spare = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    with pytest.raises(ModuleGraphError, match=r"\['spare'\].*named_parameters\(\)"):
        param_groups(Unused(), torch.randn(1, 1, 8, 8))


@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_mac_model_prices_removals_like_torch_pruning(fraction: float) -> None:
    torch.manual_seed(0)
    model = ResNet20().eval()
    example = torch.randn(1, 1, 28, 28)
    groups = channel_groups(model, example)
    macs = MacModel(model, groups, example)
    order = torch.randperm(groups.num_groups)
    count = macs.removal_count(order, fraction)
    removed = torch.zeros(groups.num_groups, dtype=torch.bool)
    removed[order[:count]] = True
    assert macs.macs(removed) <= fraction * macs.total
    removed[order[count - 1]] = False
    assert macs.macs(removed) > fraction * macs.total  # the first count that meets it
    # The MACs hooked on a physically pruned copy agree.
    removed[order[count - 1]] = True
    pruned = copy.deepcopy(model)
    graph = ChannelGraph(pruned, (example,))
    sets = [s for s in graph.sets if s.blocked is None and s.producers]
    graph.remove([sets[i] for i in torch.nonzero(removed).flatten().tolist()])
    measured = MacModel(pruned, channel_groups(pruned, example), example).total
    assert measured == pytest.approx(macs.macs(removed), rel=1e-9)


def trained_resnet(batch: int, steps: int) -> tuple[ResNet20, SLBI, torch.Tensor, torch.Tensor]:
    """A ResNet-20 with coupled groups after ``steps`` SLBI steps on one random batch."""
    torch.manual_seed(0)
    model = ResNet20()
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    opt = SLBI(param_groups(model, x, lam=0.002), lr=0.1, mu=100)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, x, y


def test_followers_read_the_group_norm_without_counting_in_it() -> None:
    model, opt, _, _ = trained_resnet(batch=8, steps=3)
    group = opt.param_groups[0]
    ids = dict(zip([id(p) for p in group["params"]], group["channel_ids"], strict=True))
    # bn1's γ and β (members) against conv1's filters (followers) of the same channels.
    z = {name: opt.state[param]["z"] for name, param in model.named_parameters() if id(param) in ids}
    members = torch.zeros(channel_norms(opt).numel(), dtype=torch.float64)
    counts = torch.zeros_like(members)
    for name, param in model.named_parameters():
        if id(param) in ids and "conv" not in name:
            rows = z[name].double().reshape(param.shape[0], -1).square().sum(1)
            members.index_add_(0, ids[id(param)], rows)
            counts.index_add_(0, ids[id(param)], torch.ones_like(rows))
    expected = (members / counts).sqrt()
    assert torch.allclose(channel_norms(opt), expected, rtol=1e-5)
    gamma = opt.gamma("conv1.weight")
    shrink = (1 - 0.002 / expected[ids[id(model.conv1.weight)]]).clamp(min=0).float()
    assert torch.allclose(gamma, z["conv1.weight"] * shrink.view(-1, 1, 1, 1), rtol=1e-5, atol=1e-9)


def test_a_follower_without_ids_is_refused_before_anything_changes() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    follows = [True, False, False, False]
    groups = [{"params": list(model.parameters()), "penalty": "none", "channel_followers": follows}]
    with pytest.raises(ValueError, match="follows a coupled group but has no channel_ids"):
        SLBI(groups)
    groups[0]["channel_followers"] = [True]
    with pytest.raises(ValueError, match="1 entries for 4 parameters"):
        SLBI(groups)


@pytest.mark.parametrize("macs", [0.5, 0.8])
def test_prune_to_slims_to_the_target_and_leaves_the_inputs_alone(macs: float) -> None:
    model, opt, x, y = trained_resnet(batch=16, steps=2)
    before = copy.deepcopy(model.state_dict())
    norms = channel_norms(opt)
    result = prune_to(model, opt, x, macs=macs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert torch.equal(channel_norms(opt), norms)
    groups = channel_groups(model, x)
    dense = MacModel(model, groups, x[:1]).total
    slim = MacModel(result.model, channel_groups(result.model, x), x[:1]).total
    assert slim <= macs * dense
    assert slim > (macs - 0.1) * dense
    assert result.difference < 1e-4
    # The slim optimizer's coupled groups fit the slim model, and it trains on.
    new = result.optimizer
    assert all(ids.shape[0] == p.shape[0] for p, ids in zip(new.param_groups[0]["params"],
                                                            new.param_groups[0]["channel_ids"], strict=True))
    new.zero_grad()
    nn.functional.cross_entropy(result.model(x), y).backward()
    new.step()


def test_prune_to_refuses_bad_targets_and_uncoupled_optimizers() -> None:
    model = ResNet20()
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"macs must be in \(0, 1\]"):
        prune_to(model, SLBI(param_groups(model, x)), x, macs=1.5)
    with pytest.raises(ValueError, match="no coupled channel groups"):
        prune_to(model, SLBI(model.named_parameters()), x, macs=0.5)
