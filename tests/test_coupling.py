"""param_groups: module-aware penalties and coupled channel groups; the MAC model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slbi_triton import ModuleGraphError, param_groups
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
