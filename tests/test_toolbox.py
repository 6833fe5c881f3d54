"""The toolbox: read-outs against a float64 reference, the regularisation
path on a real training run, pruning, W*, recover, freeze and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn

from slbi_triton import SLBI, functional
from slbi_triton.recording import load_records
from slbi_triton.toolbox import SENTINEL_EPOCH, LayerSparsity, UnknownLayerError

from .helpers import assert_norms_fresh, set_z
from .helpers import snapshot as _snapshot
from .reference import prox_group, prox_l1, rel_err


class SmallCNN(nn.Module):
    """conv1 (6 filters) and conv2 (8 filters): group penalty; fc (10×32): l1; biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():
            # Spread the filter norms: some filters enter the support early, some never.
            self.conv1.weight.mul_(torch.linspace(0.05, 2.0, 6).view(6, 1, 1, 1))
            self.conv2.weight.mul_(torch.linspace(0.05, 2.0, 8).view(8, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.max_pool2d(torch.relu(self.conv1(x)), 2)  # 10×10 → 8×8 → 4×4
        return self.fc(torch.relu(self.conv2(h)).flatten(1))  # 2×2×8 = 32 features


def snapshot(model: nn.Module, opt: SLBI) -> dict[str, torch.Tensor]:
    """Copies of every W, Z, momentum and group norm, and the frozen masks."""
    out = _snapshot(model, opt)
    for index, mask in opt.state_dict()["slbi"]["frozen"].items():
        out[f"frozen/{index}"] = mask.clone()
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- read-outs ----------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_readouts_match_float64_reference(channels_last: bool) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    hp = {"conv": {"kappa": 2.0, "lam": 0.5, "mu": 3.0}, "fc": {"kappa": 1.5, "lam": 0.3, "mu": 7.0}}
    named = dict(model.named_parameters())
    groups = [
        {"params": [(n, named[n]) for n in ("conv1.weight", "conv2.weight")], **hp["conv"]},
        {"params": [("fc.weight", named["fc.weight"])], **hp["fc"]},
        {"params": [(n, p) for n, p in named.items() if n.endswith("bias")]},
    ]
    opt = SLBI(groups, backend="torch")
    assert opt.names == ["conv1.weight", "conv2.weight", "fc.weight", "conv1.bias", "conv2.bias", "fc.bias"]
    gen = torch.Generator().manual_seed(1)
    expected_rows, total = [], 0.0
    for name in ("conv1.weight", "conv2.weight", "fc.weight"):
        p = named[name]
        h = hp["fc" if name == "fc.weight" else "conv"]
        z = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.dim() == 4:  # ‖Z_g‖ from 0 to 2.5λ, away from λ: some filters in, some out
            ratios = [0.0, 0.3, 0.8, 1.2, 1.7, 2.5, 0.6, 1.4][: p.shape[0]]
            norms = h["lam"] * torch.tensor(ratios, dtype=torch.float64)
            z = z / z.reshape(p.shape[0], -1).norm(dim=1).view(-1, 1, 1, 1) * norms.view(-1, 1, 1, 1)
        set_z(opt, {p: z.to(p.dtype)})
        z = opt.state[p]["z"].double()  # the reference reads the Z the optimizer holds
        prox = prox_group if p.dim() == 4 else prox_l1
        gamma = h["kappa"] * prox(z, h["lam"])
        support = gamma != 0
        w = p.detach().double()
        residue = ((w - gamma) ** 2).sum().item() / (2 * h["mu"])
        total += residue

        assert rel_err(opt.gamma(name), gamma) <= 1e-6
        assert opt.gamma(name).dtype == p.dtype and opt.gamma(name).shape == p.shape
        assert torch.equal(opt.masks()[name], support)
        assert torch.equal(opt.w_star(name), torch.where(support, p.detach(), 0.0))
        assert opt.residue(name) == pytest.approx(residue, rel=1e-6)
        if p.dim() == 4:
            selected = support.reshape(p.shape[0], -1).any(dim=1)
            assert 0 < int(selected.sum()) < p.shape[0]
            expected_rows.append(
                LayerSparsity(
                    name, "group", p.shape[0], int(selected.sum()), int(selected.sum()) / p.shape[0]
                )
            )
        else:
            assert 0 < int(support.sum()) < p.numel()
            expected_rows.append(
                LayerSparsity(name, "l1", p.numel(), int(support.sum()), int(support.sum()) / p.numel())
            )
    assert_norms_fresh(opt)
    assert opt.sparsity() == expected_rows
    assert opt.residue() == pytest.approx(total, rel=1e-6)
    assert set(opt.masks()) == {"conv1.weight", "conv2.weight", "fc.weight"}
    # Read-outs are new tensors: editing them changes nothing; biases: W* is W.
    gamma = opt.gamma("fc.weight")
    opt.gamma("fc.weight").fill_(7.0)
    opt.w_star("fc.bias").fill_(7.0)
    assert torch.equal(opt.gamma("fc.weight"), gamma)
    assert torch.equal(opt.w_star("fc.bias"), named["fc.bias"].detach())
    assert not (named["fc.bias"] == 7.0).any()


def test_use_w_star_and_recover_bit_identical() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    opt = SLBI(model.named_parameters(), lr=0.1, mu=2.0, lam=0.05, backend="torch")
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 1, 10, 10)).square().mean().backward()
        opt.step()
    before = snapshot(model, opt)
    expected = {name: opt.w_star(name) for name in opt.names}
    opt.use_w_star()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), expected[name]), name
    assert not torch.equal(model.fc.weight.detach(), before["fc.weight"])  # W* differs from W
    opt.recover()
    assert_same(snapshot(model, opt), before)
    with pytest.raises(ValueError, match="nothing to recover"):
        opt.recover()


def test_recover_after_a_penalty_change_refreshes_the_group_norms() -> None:
    """Saved while l1 (no norms to save), recovered while group: the norm table must be
    that of the restored Z, not of the Z the group layout computed. The layout changes in
    a step that GradScaler skips (inf gradient): a skipped step commits nothing."""
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(6, 5))
    opt = SLBI([("fc.weight", param)], lr=0.1, mu=2.0, lam=0.01, penalty="l1", backend="torch")

    def step(inf: bool = False) -> None:
        opt.zero_grad()
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
        scaler.scale((param * torch.randn(param.shape)).sum()).backward()
        if inf:
            param.grad[0, 0] = float("inf")
        scaler.step(opt)

    for _ in range(3):
        step()
    opt.update_order(0)
    z_before = opt.state[param]["z"].clone()
    opt.prune_layer(50, "fc.weight")
    opt.param_groups[0]["penalty"] = "group"
    step(inf=True)
    assert "group_norms" in opt.state[param]
    opt.recover()
    assert torch.equal(opt.state[param]["z"], z_before)
    expected = functional.group_norms_of(opt.state[param]["z"])
    assert torch.allclose(opt.state[param]["group_norms"], expected, rtol=1e-6)


# -- the regularisation path on a real training run -----------------------------------


def train(backend: str = "torch", epochs: int = 6, record_dir=None, layers=None):
    """SmallCNN on a fixed synthetic batch set; update_order after every epoch, the
    entry epochs kept after each."""
    torch.manual_seed(0)
    model = SmallCNN()
    opt = SLBI(model.named_parameters(), lr=0.1, kappa=1.0, mu=5.0, lam=0.1, momentum=0.9, backend=backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 10, 10, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    entries = []
    for epoch in range(epochs):
        opt.current_epoch = epoch
        for i in range(4):
            batch = slice(16 * i, 16 * (i + 1))
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step(record=record_dir is not None and i % 2 == 0, path=record_dir, layers=layers)
        opt.update_order(epoch)
        entries.append(
            {
                n: opt.state[p]["entry_epoch"].clone()
                for n, p in model.named_parameters()
                if "entry_epoch" in opt.state[p]
            }
        )
    return model, opt, entries


def test_training_run_path_and_records(tmp_path) -> None:
    layers = ["conv1.weight", "fc.weight"]
    model, opt, entries = train(record_dir=tmp_path, layers=layers)
    params = dict(model.named_parameters())
    assert set(entries[0]) == {"conv1.weight", "conv2.weight", "fc.weight"}
    for name in entries[0]:
        # Monotone: an entry keeps its first entry epoch; new entries get the current epoch.
        for epoch in range(1, len(entries)):
            old, new = entries[epoch - 1][name], entries[epoch][name]
            seen = old != SENTINEL_EPOCH
            assert torch.equal(new[seen], old[seen]), name
            assert set(new[~seen].unique().tolist()) <= {epoch, SENTINEL_EPOCH}, name
        # The entry epoch is the first epoch of the kept path where the entry was selected.
        history = opt.path_history(name)
        assert history["epochs"] == list(range(len(entries)))
        selected = history["selected"]
        first = [
            next((e for e in range(len(entries)) if selected[e, j]), SENTINEL_EPOCH)
            for j in range(selected.shape[1])
        ]
        assert entries[-1][name].reshape(-1).tolist() == first, name
        p = params[name]
        if p.dim() == 4:
            norms = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            assert history["norms"].shape == (len(entries), p.shape[0])
        else:
            norms = p.detach().abs().reshape(-1)
            assert history["norms"].shape == (len(entries), p.numel())
        assert torch.allclose(history["norms"][-1], norms, rtol=1e-6)
        score = opt.order_score(name).reshape(-1)
        assert torch.allclose(score, norms.double() - entries[-1][name].reshape(-1).double(), rtol=1e-6)
    # The path selects filters over several epochs and leaves some out (the sentinel).
    conv = entries[-1]["conv1.weight"]
    assert (conv == SENTINEL_EPOCH).any() and (conv < SENTINEL_EPOCH).any()
    assert len(set(entries[-1]["conv2.weight"].tolist()) - {SENTINEL_EPOCH}) >= 2

    records = load_records(tmp_path)
    recorded_steps = [s for s in range(1, 6 * 4 + 1) if (s - 1) % 2 == 0]
    assert len(records["layer"]) == len(layers) * len(recorded_steps)
    assert records["layer"] == layers * len(recorded_steps)
    assert records["step"] == [s for s in recorded_steps for _ in layers]
    assert records["epoch"] == [(s - 1) // 4 for s in recorded_steps for _ in layers]
    assert records["penalty"][:2] == ["group", "l1"]
    assert records["filter_norm_max"][1] is None and records["filter_norm_max"][0] > 0


def test_state_dict_carries_order(tmp_path) -> None:
    model, opt, _ = train(epochs=3)
    saved = opt.state_dict()
    twin_model = SmallCNN()
    twin_model.load_state_dict(model.state_dict())
    twin = SLBI(twin_model.named_parameters(), lr=0.1, kappa=1.0, mu=5.0, lam=0.1, backend="torch")
    twin.load_state_dict(saved)
    for name in ("conv2.weight", "fc.weight"):
        assert torch.equal(twin.order_score(name), opt.order_score(name))
    opt.prune_layer(37, ["conv2.weight", "fc.weight"])
    twin.prune_layer(37, ["conv2.weight", "fc.weight"])
    for a, b in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(a, b)


# -- pruning --------------------------------------------------------------------------


class PruneNet(nn.Module):
    """conv 2→10 filters of 3×3 on a 3×3 input, then linear 10→7 (70 weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 10, 3)
        self.fc = nn.Linear(10, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x).flatten(1)))


CONV_ENTRY = {2: 0, 5: 0, 7: 1, 1: 1, 8: 2}  # the other filters never enter the support
LAM = 0.5


def make_pruning_case():
    """A model after one real step (momentum is set), with Z chosen so that the entry
    epochs are known: conv filters by CONV_ENTRY, fc weights at random, fc row 3 never."""
    torch.manual_seed(0)
    model = PruneNet()
    opt = SLBI(model.named_parameters(), lr=0.1, mu=2.0, lam=LAM, momentum=0.9, backend="torch")
    opt.zero_grad()
    model(torch.randn(5, 2, 3, 3)).square().mean().backward()
    opt.step()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        # Ties: filters 3, 4, 6, 9 (never selected) are identical; filter 0 is smaller.
        model.conv.weight[[4, 6, 9]] = model.conv.weight[3].clone()
        model.conv.weight[0] = 0.1 * model.conv.weight[3]
        # fc row 3: never selected, tiny weights; some other weights tie in |w|.
        model.fc.weight[3] = 1e-3 * torch.arange(1, 11)
        model.fc.weight[5, :4] = torch.tensor([0.25, -0.25, 0.25, -0.25])
    fc_entry = torch.randint(0, 4, (7, 10), generator=gen)  # 3 = never
    fc_entry[3] = 3
    fc_entry[5, :4] = 3
    conv_z_dir = torch.randn(10, 2, 3, 3, generator=gen)
    conv_z_dir /= conv_z_dir.reshape(10, -1).norm(dim=1).view(-1, 1, 1, 1)
    fc_sign = torch.randint(0, 2, (7, 10), generator=gen) * 2.0 - 1.0
    for epoch in range(3):
        conv_in = torch.tensor([CONV_ENTRY.get(f, 99) <= epoch for f in range(10)])
        # In the support: ‖Z_g‖ = 2λ; out: 0.5λ (Z is non-zero there too).
        conv_scale = torch.where(conv_in, 2 * LAM, 0.5 * LAM).view(-1, 1, 1, 1)
        fc_z = fc_sign * torch.where(fc_entry <= epoch, 2 * LAM, 0.5 * LAM)
        set_z(opt, {model.conv.weight: conv_z_dir * conv_scale, model.fc.weight: fc_z})
        opt.update_order(epoch)
    conv_entry = torch.tensor([CONV_ENTRY.get(f, SENTINEL_EPOCH) for f in range(10)])
    fc_entry = torch.where(fc_entry == 3, SENTINEL_EPOCH, fc_entry)
    return model, opt, conv_entry, fc_entry


def expected_pruned(magnitude: torch.Tensor, entry: torch.Tensor, percent: int) -> set[int]:
    """Independent rule: the floor(percent·n/100) lowest magnitude − entry epoch, ties by index."""
    score = (magnitude.double() - entry.double()).reshape(-1).tolist()
    order = sorted(range(len(score)), key=lambda i: (score[i], i))
    return set(order[: percent * len(score) // 100])


@pytest.mark.parametrize("percent", [0, 37, 100])
def test_prune_share_ties_bias_and_recover(percent: int) -> None:
    model, opt, conv_entry, fc_entry = make_pruning_case()
    assert torch.equal(opt.state[model.conv.weight]["entry_epoch"], conv_entry)
    assert torch.equal(opt.state[model.fc.weight]["entry_epoch"], fc_entry)
    before = snapshot(model, opt)
    conv_norms = model.conv.weight.detach().reshape(10, -1).norm(dim=1)
    conv_pruned = expected_pruned(conv_norms, conv_entry, percent)
    fc_pruned = expected_pruned(model.fc.weight.detach().abs(), fc_entry, percent)
    if percent == 37:
        assert conv_pruned == {0, 3, 4}  # the cut splits the tie 3, 4, 6, 9 by index
        assert set(range(30, 40)) <= fc_pruned  # fc row 3 goes entirely

    opt.prune_layer(percent, ["conv.weight", "fc.weight"], prune_bias=True)

    after = snapshot(model, opt)
    assert len(conv_pruned) == 10 * percent // 100 and len(fc_pruned) == 70 * percent // 100
    rows = torch.tensor([f in conv_pruned for f in range(10)])
    fc_mask = torch.tensor([i in fc_pruned for i in range(70)]).view(7, 10)
    fc_rows = fc_mask.all(dim=1)
    if percent == 37:
        assert fc_rows.tolist() == [False, False, False, True, False, False, False]
    for key, mask in [
        ("conv.weight", rows.view(-1, 1, 1, 1).expand(10, 2, 3, 3)),
        ("conv.bias", rows),
        ("fc.weight", fc_mask),
        ("fc.bias", fc_rows),
    ]:
        for suffix in ("", "/z", "/momentum_buffer"):
            if key + suffix not in before:
                continue
            new, old = after[key + suffix], before[key + suffix]
            assert (new[mask] == 0).all(), key + suffix
            assert torch.equal(new[~mask], old[~mask]), key + suffix
    assert int((model.conv.weight.detach().reshape(10, -1) == 0).all(dim=1).sum()) == len(conv_pruned)
    assert int((model.fc.weight.detach() == 0).sum()) == len(fc_pruned)
    assert_norms_fresh(opt)

    opt.recover()
    assert_same(snapshot(model, opt), before)


def test_prune_count_rounds_down_exactly() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(10, 10)
    opt = SLBI(layer.named_parameters(), backend="torch")
    opt.update_order(0)
    # floor(percent·n/100) on the exact values: 57% of 100 is 57, although 0.57·100 in
    # floats is 56.99999999999999; 9.99% of 100 is 9.
    for percent, count in [(57, 57), (29, 29), (9.99, 9), (0, 0), (100, 100), (0.5, 0)]:
        opt.prune_layer(percent, "weight")
        assert int((layer.weight.detach() == 0).sum()) == count, percent
        opt.recover()
    # recover() undoes every prune since the last recover(), not only the last one.
    opt.prune_layer(10, "weight")
    opt.prune_layer(20, "weight")
    assert int((layer.weight.detach() == 0).sum()) == 20
    opt.recover()
    assert int((layer.weight.detach() == 0).sum()) == 0


def test_freeze_keeps_pruned_entries_at_zero() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    opt = SLBI(model.named_parameters(), lr=0.1, mu=5.0, lam=0.1, backend="torch")

    def steps(count: int) -> None:
        for _ in range(count):
            opt.zero_grad()
            model(torch.randn(8, 1, 10, 10)).square().mean().backward()
            opt.step()

    steps(4)
    opt.update_order(0)
    opt.prune_layer(50, ["conv2.weight", "fc.weight"], prune_bias=True, freeze=True)
    filters = (model.conv2.weight.detach().reshape(8, -1) == 0).all(dim=1)
    fc_zero = model.fc.weight.detach() == 0
    assert int(filters.sum()) == 4 and int(fc_zero.sum()) == 160
    kept = model.conv2.weight.detach()[~filters].clone()
    steps(3)
    state = opt.state[model.conv2.weight]
    for tensor in (model.conv2.weight, state["z"], state["momentum_buffer"]):
        assert (tensor.detach()[filters] == 0).all()
    assert (model.conv2.bias.detach()[filters] == 0).all()
    assert (opt.state[model.conv2.bias]["momentum_buffer"][filters] == 0).all()
    for tensor in (model.fc.weight, opt.state[model.fc.weight]["z"]):
        assert (tensor.detach()[fc_zero] == 0).all()
    assert not torch.equal(model.conv2.weight.detach()[~filters], kept)  # the rest trains
    assert_norms_fresh(opt)
    opt.unfreeze()
    steps(1)
    # fc weights get gradients again (the pruned conv2 filters stay dead: ReLU(0) has none).
    assert (model.fc.weight.detach()[fc_zero] != 0).any()


def test_recover_before_any_step_restores_the_start() -> None:
    """Prune before any step (frozen), recover: the first step is the first step of an
    optimizer that never pruned (momentum starts afresh, the freeze is gone). A step in
    between would commit the prune (tests/test_first_hour_toolbox.py)."""
    results = []
    for prune in (True, False):
        torch.manual_seed(0)
        conv = nn.Conv2d(2, 6, 3)
        opt = SLBI(conv.named_parameters(), lr=0.1, mu=5.0, lam=0.1, backend="torch")
        opt.update_order(0)
        if prune:
            opt.prune_layer(50, "weight", prune_bias=True, freeze=True)
            assert (conv.weight.detach() == 0).any()
            opt.recover()
            assert "momentum_buffer" not in opt.state[conv.weight]
        opt.zero_grad()
        conv(torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(4))).square().mean().backward()
        opt.step()
        results.append(snapshot(conv, opt))
    assert_same(results[0], results[1])


def test_recover_rebinds_momentum_dropped_by_load_state_dict() -> None:
    model, opt, _, _ = make_pruning_case()
    before = snapshot(model, opt)
    fresh = SLBI(PruneNet().named_parameters(), lr=0.1, mu=2.0, lam=LAM, backend="torch").state_dict()
    opt.prune_layer(50, "conv.weight")
    opt.load_state_dict(fresh)  # no momentum, Z = 0
    assert "momentum_buffer" not in opt.state[model.conv.weight]
    opt.recover()
    state = opt.state[model.conv.weight]
    assert torch.equal(state["momentum_buffer"], before["conv.weight/momentum_buffer"])
    assert torch.equal(state["z"], before["conv.weight/z"])
    assert torch.equal(model.conv.weight.detach(), before["conv.weight"])


# -- bad input ------------------------------------------------------------------------


def test_bad_input_clear_errors_nothing_changed(tmp_path) -> None:
    model, opt, _, _ = make_pruning_case()
    before = snapshot(model, opt)
    bad_calls = [
        (lambda: opt.gamma("conv.weigth"), UnknownLayerError, "did you mean 'conv.weight'"),
        (lambda: opt.w_star("nonsense"), KeyError, "known layers"),
        (lambda: opt.residue("fc.wieght"), ValueError, "fc.weight"),
        (lambda: opt.gamma(3), TypeError, "strings"),
        (lambda: opt.gamma("fc.bias"), ValueError, "penalty 'none'"),
        (lambda: opt.prune_layer(37, ["conv.weight", "conv.weigth"]), UnknownLayerError, "conv.weight"),
        (lambda: opt.prune_layer(37, "fc.bias"), ValueError, "penalty 'none'"),
        (lambda: opt.prune_layer(37, []), ValueError, "empty"),
        (lambda: opt.prune_layer(37, 5), TypeError, "layer_name"),
        (lambda: opt.prune_layer(-0.1, "conv.weight"), ValueError, "-0.1"),
        (lambda: opt.prune_layer(100.5, "conv.weight"), ValueError, r"\[0, 100\]"),
        (lambda: opt.prune_layer(float("nan"), "conv.weight"), ValueError, "nan"),
        (lambda: opt.prune_layer(float("inf"), "conv.weight"), ValueError, "inf"),
        (lambda: opt.prune_layer("37", "conv.weight"), TypeError, "percent"),
        (lambda: opt.prune_layer(True, "conv.weight"), TypeError, "percent"),
        (lambda: opt.recover(), ValueError, "nothing to recover"),
        (lambda: opt.update_order(-1), ValueError, "epoch"),
        (lambda: opt.update_order(1.5), TypeError, "epoch"),
        (lambda: opt.path_history("conv.weigth"), UnknownLayerError, "conv.weight"),
    ]
    for call, error, message in bad_calls:
        with pytest.raises(error, match=message):
            call()
        assert_same(snapshot(model, opt), before)
    # A layer added later has no order yet: the whole call is refused.
    extra = nn.Linear(3, 4)
    opt.add_param_group({"params": [("extra.weight", extra.weight)]})
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="update_order"):
        opt.prune_layer(50, ["conv.weight", "extra.weight"])
    assert_same(snapshot(model, opt), before)
    with pytest.raises(ValueError, match="nothing to recover"):
        opt.recover()


def test_names_required_and_unambiguous(tmp_path) -> None:
    model = SmallCNN()
    opt = SLBI(model.parameters(), backend="torch")
    with pytest.raises(ValueError, match="assign_name"):
        opt.names  # noqa: B018
    with pytest.raises(ValueError, match="assign_name"):
        opt.sparsity()
    opt.assign_name([n for n, _ in model.named_parameters()])
    assert opt.names == [n for n, _ in model.named_parameters()]
    assert opt.gamma("fc.weight").shape == (10, 32)
    twice = SLBI(
        [{"params": list(model.conv1.named_parameters())}, {"params": list(model.conv2.named_parameters())}],
        backend="torch",
    )
    with pytest.raises(ValueError, match=r"share the name\(s\) \['bias', 'weight'\]"):
        twice.gamma("weight")


def test_prune_before_update_order() -> None:
    model = SmallCNN()
    opt = SLBI(model.named_parameters(), backend="torch")
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="update_order"):
        opt.prune_layer(50, "conv1.weight")
    with pytest.raises(ValueError, match="update_order"):
        opt.order_score("conv1.weight")
    assert_same(snapshot(model, opt), before)
    assert opt.path_history("fc.weight")["norms"].shape == (0, 320)


def test_a_penalty_change_restarts_the_order_of_that_layer() -> None:
    """The order state of another penalty has another shape (per filter vs per weight):
    it restarts, and the toolbox and the state dict stay usable."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3)
    opt = SLBI([{"params": [("weight", conv.weight)], "penalty": "group"}], lr=0.1, mu=5.0, lam=0.1)
    for epoch in range(2):
        opt.zero_grad()
        conv(torch.randn(2, 2, 5, 5)).square().mean().backward()
        opt.step()
        opt.update_order(epoch)
    assert opt.order_score("weight").shape == (4,)
    opt.param_groups[0]["penalty"] = "l1"
    opt.zero_grad()
    conv(torch.randn(2, 2, 5, 5)).square().mean().backward()
    opt.step()
    opt.update_order(2)
    assert opt.order_score("weight").shape == conv.weight.shape
    assert opt.path_history("weight")["epochs"] == [2]
    fresh = SLBI([{"params": [("weight", conv.weight)], "penalty": "l1"}], lr=0.1, mu=5.0, lam=0.1)
    fresh.load_state_dict(opt.state_dict())
