"""Tests for slbi_triton.slimming: physical slimming with the masked model's outputs, coupled
channels, Torch-Pruning's blind spots, the carried optimizer state, saving and bad input.

Supports are set through the optimizer's public state dict (``tests/slim_models.py``), so
no test trains; BatchNorm statistics and biases are random, so that removed channels
leave non-zero constants to fold.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn

from slbi_triton import SLBI
from slbi_triton.slimming import TOLERANCE, SlimError, fold, rebuild, slim
from slbi_triton.train import slbi_param_groups
from slbi_triton.train.models import LeNet, ResNet20

from .slim_models import ResNet18, random_outside, randomise_norms, set_support

torch_pruning = pytest.importorskip("torch_pruning")

CLASSIFIER = {"lenet": "fc2.weight", "resnet20": "fc.weight", "resnet18": "fc.weight"}


def _model(kind: str) -> nn.Module:
    return {"lenet": LeNet, "resnet20": ResNet20, "resnet18": ResNet18}[kind]()


def _images(kind: str, count: int, seed: int, size: int | None = None) -> torch.Tensor:
    channels, default = (3, 32) if kind == "resnet18" else (1, 28)
    side = size or default
    return torch.rand(count, channels, side, side, generator=torch.Generator().manual_seed(seed))


def _trained(kind: str, share: float = 0.4, fc_penalty: str = "group", seed: int = 0):
    """A model with random BatchNorms, an SLBI optimizer after one step (momentum), a
    support with ``share`` of every group layer's filters outside, and an entry order."""
    torch.manual_seed(seed)
    model = _model(kind)
    randomise_norms(model, seed)
    opt = SLBI(slbi_param_groups(model, fc_penalty), lr=0.1, mu=100.0, lam=1.0)
    images = _images(kind, 4, seed)
    opt.zero_grad()
    F.cross_entropy(model(images), torch.arange(4)).backward()
    opt.step()
    set_support(opt, random_outside(opt, share, seed, keep=(CLASSIFIER[kind],)))
    opt.update_order(1)
    return model, opt


def _w_star_model(model: nn.Module, opt: SLBI) -> nn.Module:
    masked = copy.deepcopy(model)
    params = dict(masked.named_parameters())
    with torch.no_grad():
        for name in opt.names:
            params[name].copy_(opt.w_star(name))
    return masked.eval()


def _relative_difference(a: nn.Module, b: nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        out, ref = a.eval()(images), b.eval()(images)
    return float((out - ref).abs().max() / ref.abs().max())


def _kept(size: int, indices: list[int]) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[indices] = False
    return mask.nonzero().flatten()


def _sliced(tensor: torch.Tensor, pairs: list[tuple[int, list[int]]]) -> torch.Tensor:
    for dim, indices in pairs:
        tensor = tensor.index_select(dim, _kept(tensor.shape[dim], indices))
    return tensor


def _out_removed(result, name: str) -> list[int]:
    return dict(result.removed.get(name, [])).get(0, [])


# ------------------------------------------------------------------------ identical outputs


@pytest.mark.parametrize("kind", ["lenet", "resnet20", "resnet18"])
def test_slim_model_computes_the_w_star_model(kind: str) -> None:
    model, opt = _trained(kind)
    before_model = copy.deepcopy(model.state_dict())
    before_opt = copy.deepcopy(opt.state_dict())
    images = _images(kind, 4, seed=1)
    result = slim(model, opt, images)

    reference = _w_star_model(model, opt)
    assert result.difference <= TOLERANCE
    assert _relative_difference(result.model, reference, images) <= TOLERANCE
    # Other images, and for the ResNets another size: carriers are exact at the borders.
    size = {"lenet": None, "resnet20": 20, "resnet18": 48}[kind]
    other = _images(kind, 3, seed=2, size=size)
    assert _relative_difference(result.model, reference, other) <= TOLERANCE
    slim_params = sum(p.numel() for p in result.model.parameters())
    assert slim_params < 0.85 * sum(p.numel() for p in model.parameters())
    # The inputs are untouched.
    torch.testing.assert_close(model.state_dict(), before_model, rtol=0, atol=0)
    torch.testing.assert_close(opt.state_dict()["state"], before_opt["state"], rtol=0, atol=0)


def test_removed_lists_every_changed_parameter_and_rebuild_round_trips(tmp_path) -> None:
    model, opt = _trained("resnet20")
    images = _images("resnet20", 4, seed=1)
    result = slim(model, opt, images)
    original = dict(model.named_parameters())
    slim_params = dict(result.model.named_parameters())
    for name, param in original.items():
        pairs = result.removed.get(name, [])
        assert [dim for dim, _ in pairs] == sorted({dim for dim, _ in pairs})
        expected = list(param.shape)
        for dim, indices in pairs:
            assert indices == sorted(set(indices)) and all(isinstance(i, int) for i in indices)
            expected[dim] -= len(indices)
        assert list(slim_params[name].shape) == expected
        assert bool(pairs) == (expected != list(param.shape))
    assert any(len(pairs) == 2 for pairs in result.removed.values())  # output and input side
    path = tmp_path / "slim.pt"
    torch.save({"model": result.model.state_dict(), "removed": result.removed}, path)
    saved = torch.load(path, weights_only=True)
    fresh = rebuild(ResNet20(), saved["removed"], torch.zeros(1, 1, 28, 28))
    fresh.load_state_dict(saved["model"])
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images), result.model.eval()(images), rtol=0, atol=0)
    assert len(fresh.layer2[0].shortcut.source) == len(result.model.layer2[0].shortcut.source)


def test_rebuild_refuses_a_record_of_another_architecture() -> None:
    model, opt = _trained("lenet")
    removed = slim(model, opt, _images("lenet", 4, seed=1)).removed
    images = torch.zeros(1, 1, 28, 28)
    with pytest.raises(ValueError, match="does not have"):
        rebuild(ResNet20(), removed, images)
    cut_apart = copy.deepcopy(removed)
    cut_apart["conv1.weight"] = [(0, [0, 1, 2, 3, 4])]  # conv2's inputs disagree now
    fresh = LeNet()
    shapes = {name: p.shape for name, p in fresh.named_parameters()}
    with pytest.raises(ValueError, match="does not match"):
        rebuild(fresh, cut_apart, images)
    assert {name: p.shape for name, p in fresh.named_parameters()} == shapes  # unchanged
    with pytest.raises(TypeError, match="removed must"):
        rebuild(LeNet(), {"conv1.weight": [(0, "abc")]}, images)


# ---------------------------------------------------------------------------- coupling


def test_coupled_channels_are_removed_by_intersection_not_union() -> None:
    """ResNet-18's first stage: the stem and both blocks' conv2 write the same 64
    channels. 32 zero filters in each, 8 in all three (union 56): only 8 may go."""
    torch.manual_seed(0)
    model = ResNet18()
    randomise_norms(model)
    opt = SLBI(slbi_param_groups(model, "group"), lr=0.1, mu=100.0, lam=1.0)
    common = list(range(8))
    outside = {
        "conv1.weight": list(range(32)),
        "layer1.0.conv2.weight": common + list(range(32, 56)),
        "layer1.1.conv2.weight": common + list(range(8, 20)) + list(range(32, 44)),
    }
    set_support(opt, outside)
    images = _images("resnet18", 2, seed=1)
    result = slim(model, opt, images)
    removed = _out_removed(result, "conv1.weight")
    # One of the eight may stay as the carrier of the zero-padded convs that read them.
    assert set(removed) <= set(common) and len(removed) >= len(common) - 1
    for name in outside:
        assert _out_removed(result, name) == removed
    assert dict(result.removed["layer2.0.downsample.0.weight"])[1] == removed
    assert result.model.layer1[0].conv1.weight.shape[1] == 64 - len(removed)
    assert _relative_difference(result.model, _w_star_model(model, opt), images) <= TOLERANCE


STREAM_1 = ["conv1.weight", *(f"layer1.{b}.conv2.weight" for b in range(3))]
STREAM_2 = [f"layer2.{b}.conv2.weight" for b in range(3)]
STREAM_3 = [f"layer3.{b}.conv2.weight" for b in range(3)]


def test_shortcut_a_ties_a_channel_to_its_place_in_later_stages() -> None:
    """The option-A shortcut moves stage 1's channel 3 to 11 in stage 2 and 27 in
    stage 3 (Torch-Pruning alone ties it to channel 3 of every stage)."""
    model, opt = _trained("resnet20", share=0.0)
    # Negative shifts before the ReLU: the removed channels leave 0, so no channel has to
    # stay as a carrier and only the coupling decides.
    with torch.no_grad():
        model.bn1.bias[3] = -10.0
        for stage, channels in ((1, [3]), (2, [0, 11]), (3, [8, 16, 27])):
            for block in getattr(model, f"layer{stage}"):
                block.bn2.bias[channels] = -10.0
    images = _images("resnet20", 4, seed=1)
    almost = {**{n: [3] for n in STREAM_1}, **{n: [11] for n in STREAM_2}, "layer3.0.conv2.weight": [27]}
    set_support(opt, {**almost, "layer3.1.conv2.weight": [27]})
    assert "conv1.weight" not in slim(model, opt, images).removed  # layer3.2.conv2[27] is live

    # All ten writers of the channel zero; stage 2's padding channel 0 (stage 3's 16) and
    # stage 3's padding channel 8.
    set_support(
        opt,
        {
            **{n: [3] for n in STREAM_1},
            **{n: [0, 11] for n in STREAM_2},
            **{n: [8, 16, 27] for n in STREAM_3},
        },
    )
    result = slim(model, opt, images)
    assert all(_out_removed(result, n) == [3] for n in STREAM_1)
    assert all(_out_removed(result, n) == [0, 11] for n in STREAM_2)
    assert all(_out_removed(result, n) == [8, 16, 27] for n in STREAM_3)
    assert dict(result.removed["fc.weight"]) == {1: [8, 16, 27]}
    assert dict(result.removed["layer2.0.conv1.weight"])[1] == [3]
    shortcut = result.model.layer2[0].shortcut
    assert (shortcut.in_channels, len(shortcut.source)) == (15, 30)
    # Stage 3's shortcut: 15 padding channels (8 is gone), stage 2's 30 kept channels, 16.
    assert result.model.layer3[0].shortcut.source.tolist() == [-1] * 15 + list(range(30)) + [-1] * 16
    assert _relative_difference(result.model, _w_star_model(model, opt), images) <= TOLERANCE


# ------------------------------------------------------------------------- remove="pruned"


def test_remove_pruned_takes_out_only_the_pruned_filters() -> None:
    model, opt = _trained("lenet", share=0.5)
    opt.prune_layer(30, ["conv2.weight", "conv3.weight"], prune_bias=True)
    pruned = {
        name: (dict(model.named_parameters())[name].detach().flatten(1) == 0).all(dim=1)
        for name in ("conv2.weight", "conv3.weight")
    }
    images = _images("lenet", 4, seed=1)
    result = slim(model, opt, images, remove="pruned")
    for name, mask in pruned.items():
        assert _out_removed(result, name) == mask.nonzero().flatten().tolist()
    assert "conv1.weight" not in result.removed  # outside the support, but not pruned
    assert _relative_difference(result.model, copy.deepcopy(model), images) <= TOLERANCE


# --------------------------------------------------------------------------- state carry


def test_state_is_carried_to_the_kept_entries_with_gamma_unchanged(monkeypatch) -> None:
    model, opt = _trained("lenet", fc_penalty="l1")
    # 60 % of fc1's weights: the 40 % outside the support, and some of the kept neurons'.
    opt.prune_layer(60, "fc1.weight", freeze=True)
    opt.current_epoch = 3
    saved = opt.state_dict()

    # Keys of state_dict()["slbi"] that slim does not know are passed on unchanged.
    state_dict, load_state_dict, loaded = SLBI.state_dict, SLBI.load_state_dict, []

    def state_dict_with_seed(self: SLBI) -> dict:
        state = state_dict(self)
        return {**state, "slbi": {**state["slbi"], "seed": 7}}

    def spied_load(self: SLBI, state: dict) -> None:
        loaded.append(state)
        load_state_dict(self, state)

    monkeypatch.setattr(SLBI, "state_dict", state_dict_with_seed)
    monkeypatch.setattr(SLBI, "load_state_dict", spied_load)
    result = slim(model, opt, _images("lenet", 4, seed=1))
    monkeypatch.undo()
    assert loaded[-1]["slbi"]["seed"] == 7

    new = result.optimizer
    new_saved = new.state_dict()
    assert new.names == opt.names
    kinds = {row.name: row.kind for row in opt.sparsity()}
    assert {row.name: row.kind for row in new.sparsity()} == kinds
    for index, name in enumerate(opt.names):
        pairs = result.removed.get(name, [])
        old, fresh = saved["state"][index], new_saved["state"][index]
        torch.testing.assert_close(
            fresh["momentum_buffer"], _sliced(old["momentum_buffer"], pairs), rtol=0, atol=0
        )
        if kinds.get(name) is None:
            continue
        outputs = [(0, dict(pairs).get(0, []))]
        order_pairs = outputs if kinds[name] == "group" else pairs
        for key in ("entry_epoch", "order_magnitude"):
            torch.testing.assert_close(fresh[key], _sliced(old[key], order_pairs), rtol=0, atol=0)
        columns_cut = any(dim > 0 for dim, _ in pairs)
        if not (kinds[name] == "group" and columns_cut):
            torch.testing.assert_close(fresh["z"], _sliced(old["z"], pairs), rtol=0, atol=0)
        gamma_old, gamma_new = _sliced(opt.gamma(name), pairs), new.gamma(name)
        torch.testing.assert_close(gamma_new, gamma_old, rtol=1e-5, atol=1e-7)
        assert torch.equal(gamma_new != 0, gamma_old != 0)  # the same support
        history, new_history = opt.path_history(name), new.path_history(name)
        assert new_history["epochs"] == history["epochs"]
        columns = (
            _kept(history["norms"].shape[1], outputs[0][1])
            if kinds[name] == "group"
            else _sliced(
                torch.arange(history["norms"].shape[1]).view(dict(model.named_parameters())[name].shape),
                pairs,
            ).flatten()
        )
        torch.testing.assert_close(new_history["norms"], history["norms"][:, columns], rtol=0, atol=0)
        assert torch.equal(new_history["selected"], history["selected"][:, columns])
    fc1 = opt.names.index("fc1.weight")
    frozen = new_saved["slbi"]["frozen"][fc1]
    assert torch.equal(frozen, _sliced(saved["slbi"]["frozen"][fc1], result.removed["fc1.weight"]))
    assert frozen.any() and not frozen.all() and len(dict(result.removed["fc1.weight"])[0]) > 20
    assert (new_saved["slbi"]["steps"], new_saved["slbi"]["current_epoch"]) == (1, 3)
    assert new_saved["param_groups"] == saved["param_groups"]


def test_training_continues_as_the_unslimmed_run_on_the_kept_entries() -> None:
    """Pruned, frozen filters (zero weights and bias) are removed: the slim run's updates
    of the kept entries are the unslimmed run's, up to rounding (measured: ≤ 7e-6 of how
    far the weights moved, over six steps)."""
    model, opt = _trained("lenet", share=0.0)
    opt.prune_layer(40, ["conv2.weight", "conv3.weight", "fc1.weight"], prune_bias=True, freeze=True)
    images, labels = _images("lenet", 16, seed=3), torch.arange(16) % 10
    result = slim(model, opt, images, remove="pruned")
    start = {name: p.detach().clone() for name, p in result.model.named_parameters()}
    unslimmed = dict(model.named_parameters())
    for step in range(3):
        for network, optimizer in ((model, opt), (result.model, result.optimizer)):
            optimizer.zero_grad()
            F.cross_entropy(network(images[step::3]), labels[step::3]).backward()
            optimizer.step()
        for name, param in result.model.named_parameters():
            kept = _sliced(unslimmed[name].detach(), result.removed.get(name, []))
            moved = float((param.detach() - start[name]).abs().max())
            torch.testing.assert_close(param.detach(), kept, rtol=0, atol=1e-4 * moved + 1e-9)
    assert all(not torch.equal(p.detach(), start[n]) for n, p in result.model.named_parameters())


# ------------------------------------------------------- what Torch-Pruning would miss


class GatedNet(nn.Module):
    """Channels scaled per image by a gate (squeeze-and-excitation style): a removed
    channel is not constant after it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.conv1(images))
        features = features * torch.sigmoid(images.mean(dim=(1, 2, 3))).view(-1, 1, 1, 1)
        return self.fc(self.conv2(features).mean(dim=(2, 3)))


class PadShortcutNet(nn.Module):
    """A residual add with an ``F.pad`` channel shortcut, which Torch-Pruning reads as
    elementwise (channel i tied to channel i, not i + 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.conv_a(images))
        out = F.relu(self.conv_b(a) + F.pad(a, (0, 0, 0, 0, 2, 2)))
        return self.fc(out.mean(dim=(2, 3)))


def _zero_filters(model: nn.Module, filters: dict[str, list[int]]) -> SLBI:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in filters:
                param[filters[name]] = 0
            elif name.endswith("bias"):
                param.uniform_(0.1, 0.5)
    return SLBI(model.named_parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("network", "filters"),
    [(GatedNet, {"conv1.weight": [1]}), (PadShortcutNet, {"conv_a.weight": [3], "conv_b.weight": [3]})],
    ids=["gate", "pad-shortcut"],
)
def test_ops_that_are_not_channel_wise_stop_slimming(network: type[nn.Module], filters) -> None:
    torch.manual_seed(0)
    model = network()
    opt = _zero_filters(model, filters)
    with pytest.raises(SlimError, match="not constant"):
        slim(model, opt, torch.rand(4, 1, 8, 8), remove="pruned")


def test_the_output_check_cannot_be_skipped(monkeypatch) -> None:
    model, opt = _trained("lenet")
    monkeypatch.setattr(fold, "fold", lambda *args: None)  # forget the constants
    with pytest.raises(SlimError, match=r"differs from the masked model's by [0-9.e-]+ \("):
        slim(model, opt, _images("lenet", 4, seed=1))


# ---------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_before_anything_changes() -> None:
    model, opt = _trained("lenet")
    images = _images("lenet", 2, seed=1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="remove must be one of"):
        slim(model, opt, images, remove="all")
    for bad in ([1, 2], {"images": images}, images.numpy(), []):
        with pytest.raises(TypeError, match="example_inputs"):
            slim(model, opt, bad)
    with pytest.raises(TypeError, match="SLBI"):
        slim(model, torch.optim.SGD(model.parameters(), lr=0.1), images)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        slim("lenet", opt, images)
    other = LeNet()
    with pytest.raises(ValueError, match="not the model's parameter"):
        slim(other, opt, images)
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)


def test_missing_torch_pruning_names_the_extra(monkeypatch) -> None:
    model, opt = _trained("lenet")
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ImportError, match=r"pip install slbi-triton\[slim\]"):
        slim(model, opt, _images("lenet", 2, seed=1))
