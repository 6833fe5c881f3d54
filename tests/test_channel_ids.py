"""Coupled channel groups through the optimizer: the param-group key ``"channel_ids"``.

Every kernel (C, Triton interpreted, Inductor, eager) against the independent float64
reference on a layout with coupled rows in a conv, a 1-D parameter and a linear layer
(inactive members included); the toolbox's read-outs with the coupled norm; checkpoints
(a bit-exact resume); pruning; the checks of bad ``channel_ids``."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from slbi_triton.kernels import cpu_step
from torch import Tensor, nn

from slbi_triton import SLBI, functional

from .helpers import HPARAMS, KERNELS, all_params
from .reference import RefParam, prox_norms, rel_err, step_coupled

NAMES = ["conv.weight", "bn.weight", "fc.weight", "l1.weight", "bias"]
SHAPES = [(6, 3, 3, 3), (6,), (6, 10), (5, 7), (6,)]
# Channels 0-4 of the conv, all six of the BN weight and the linear layer: coupled
# (channel 5 by the last two only); the l1 and "none" parameters have no ids.
IDS = [torch.tensor([0, 1, 2, 3, 4, -1]), torch.arange(6), torch.arange(6), None, None]
COUPLING = [[(p, c) for p in (0, 1, 2) if IDS[p][c] >= 0] for c in range(6)]


def make_params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]


def group_of(params: list[Tensor], ids: list[Tensor | None] | None = None) -> dict:
    return {"params": list(zip(NAMES, params, strict=True)), "channel_ids": IDS if ids is None else ids}


def initial_z(seed: int = 1) -> list[Tensor]:
    """Z with row norms spread over [0, 2λ] (some rows in the support, some not)."""
    gen = torch.Generator().manual_seed(seed)
    zs = []
    for index, shape in enumerate(SHAPES):
        z = torch.randn(shape, generator=gen)
        rows = z.reshape(shape[0], -1)
        spread = torch.linspace(0, 2 * HPARAMS["lam"], shape[0]).roll(2 * index)  # other rows per layer
        rows.mul_(spread[:, None] / rows.norm(dim=1, keepdim=True))
        zs.append(z)
    return zs


def build(kernel: str, seed: int = 0, **options) -> tuple[list[nn.Parameter], SLBI]:
    params = make_params(seed)
    backend, fused = KERNELS[kernel]
    opt = SLBI([group_of(params)], backend=backend, fused=fused, **{**HPARAMS, **options})
    state_dict = opt.state_dict()
    for index, z in enumerate(initial_z()[:4]):
        state_dict["state"][index] = {"z": z.clone()}
    opt.load_state_dict(state_dict)
    return params, opt


def grads_of(step: int) -> list[Tensor | None]:
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(shape, generator=gen) for shape in SHAPES]
    if step % 2:
        grads[1] = None  # the 1-D member has no gradient every other step
    return grads


def train(params: list[nn.Parameter], opt: SLBI, steps: range) -> None:
    for step in steps:
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads_of(step), strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_every_kernel_matches_the_float64_reference(kernel: str, monkeypatch) -> None:
    if kernel == "inductor":
        monkeypatch.setattr(cpu_step, "available", lambda *args: False)
    params, opt = build(kernel)
    if kernel != "c" or cpu_step.available(torch.float32):
        assert [info.kernel for info in opt.kernels()] == [kernel]
    penalties = ["group", "group", "group", "l1", "none"]
    refs = [RefParam(p, penalty, HPARAMS) for p, penalty in zip(params, penalties, strict=True)]
    for ref, z in zip(refs[:4], initial_z()[:4], strict=True):
        ref.z = z.double()
    norms = prox_norms(refs, COUPLING)
    # The coupled norm changes which rows start in the support: the test sees the coupling.
    own = refs[1].z.abs()
    assert bool(((own > HPARAMS["lam"]) != (norms[1] > HPARAMS["lam"])).any())
    for step in range(5):
        step_coupled(refs, grads_of(step), COUPLING)
    train(params, opt, range(5))
    for p, ref in zip(params, refs, strict=True):
        assert rel_err(p, ref.w) <= 1e-5
        if ref.penalty != "none":
            assert rel_err(opt.state[p]["z"], ref.z) <= 1e-5
    for p in params[:3]:  # the state keeps each row's own norm
        own = opt.state[p]["z"].reshape(p.shape[0], -1).norm(dim=1)
        assert torch.allclose(opt.state[p]["group_norms"], own, rtol=1e-5)


def test_gamma_masks_and_sparsity_use_the_coupled_norm() -> None:
    params, opt = build("c")
    refs = [RefParam(p, "group", HPARAMS) for p in params[:3]]
    for ref, z in zip(refs, initial_z()[:3], strict=True):
        ref.z = z.double()
    norms = prox_norms(refs, COUPLING)
    for name, ref, row_norms in zip(NAMES[:3], refs, norms, strict=True):
        assert rel_err(opt.gamma(name), ref.gamma(row_norms)) <= 1e-6
        assert torch.equal(opt.masks()[name], ref.gamma(row_norms) != 0)
    rows = {row.name: row for row in opt.sparsity()}
    assert rows["bn.weight"].kind == "group"
    # Its rows in a coupled group above λ, but the one whose own Z is 0 (Γ = κ·Z_r·(...)).
    support = (norms[1] > HPARAMS["lam"]) & (refs[1].z != 0)
    assert 0 < rows["bn.weight"].support == int(support.sum()) < int((norms[1] > HPARAMS["lam"]).sum())


def test_ids_name_groups_within_their_param_group_only() -> None:
    """Two param groups using id 0 couple nothing across them; a group of one row is an
    uncoupled row; a param with ids is group-penalised whatever its group's penalty."""
    a, b, c = (nn.Parameter(torch.randn(3, 4)) for _ in range(3))
    ids = torch.tensor([0, 0, 1])
    opt = SLBI([{"params": [a], "channel_ids": [ids], "penalty": "none"},
                {"params": [b, c], "channel_ids": [torch.tensor([0, -1, 2]), None]}], **HPARAMS)
    bucket = opt._storage.buckets[0]
    assert bucket.coupling.coupled_offsets.diff().tolist() == [2]  # rows 0, 1 of a; nothing else
    assert "group_norms" in opt.state[a] and "group_norms" not in opt.state[c]
    assert opt.state[a]["group_norms"].shape == (3,) and opt.state[b]["group_norms"].shape == (3,)
    lonely = SLBI([{"params": [a], "channel_ids": [torch.tensor([0, 1, 2])]}], **HPARAMS)
    assert lonely._storage.buckets[0].coupling is None


@pytest.mark.parametrize("kernel", ["c", "eager"])
def test_checkpoint_round_trip_resumes_bit_exact(kernel: str) -> None:
    params, opt = build(kernel, state_dtype=torch.bfloat16)
    train(params, opt, range(3))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twin_params = [nn.Parameter(p.detach().clone()) for p in params]
    backend, fused = KERNELS[kernel]
    # Built without channel_ids: the loaded param group brings them.
    twin = SLBI([{"params": list(zip(NAMES, twin_params, strict=True))}], backend=backend, fused=fused,
                state_dtype=torch.bfloat16, **HPARAMS)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert [None if t is None else t.tolist() for t in saved["param_groups"][0]["channel_ids"]] == [
        None if t is None else t.tolist() for t in IDS]
    assert saved["state"][1]["group_norms"].shape == (6,)  # the own row norms
    twin.load_state_dict(saved)
    train(params, opt, range(3, 6))
    train(twin_params, twin, range(3, 6))
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, twin.state[q][key]), key
    assert torch.equal(opt._storage.buckets[0].group_norms, twin._storage.buckets[0].group_norms)


@pytest.mark.parametrize("kernel", ["c", "eager"])
def test_compiled_step_equals_the_eager_one(kernel: str) -> None:
    """Inside torch.compile (one graph) the C kernel stays the opaque op, the torch path
    is traced, the coupled pass included."""
    torch._dynamo.reset()
    params, opt = build(kernel)
    twin_params, twin = build(kernel)
    compiled = torch.compile(lambda: opt.step(), backend="aot_eager", fullgraph=True)
    for step in range(3):
        for p, q, g in zip(params, twin_params, grads_of(2 * step), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        compiled()
        twin.step()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q) if kernel == "c" else rel_err(p, q) <= 1e-6
    bucket, twin_bucket = opt._storage.buckets[0], twin._storage.buckets[0]
    assert torch.allclose(bucket.group_norms, twin_bucket.group_norms, rtol=1e-6)
    torch._dynamo.reset()


def stored_coupled_norms_are_fresh(opt: SLBI) -> bool:
    bucket = opt._storage.buckets[0]
    fresh = bucket.group_norms.clone()
    functional.coupled_norms_(fresh, bucket.coupled_members, bucket.coupling.coupled_scale)
    return torch.equal(fresh, bucket.group_norms)


def test_prune_freeze_and_recover_keep_the_coupled_norms_fresh() -> None:
    params, opt = build("c")
    train(params, opt, range(2))
    opt.update_order(0)
    before = opt._storage.buckets[0].group_norms.clone()
    opt.prune_layer(50, "conv.weight", freeze=True)
    assert stored_coupled_norms_are_fresh(opt)
    assert not torch.equal(before, opt._storage.buckets[0].group_norms)
    opt.recover()
    assert stored_coupled_norms_are_fresh(opt)
    assert torch.equal(before, opt._storage.buckets[0].group_norms)
    opt.prune_layer(50, "conv.weight", freeze=True)
    with pytest.warns(UserWarning):  # the step keeps the pruned, frozen rows
        train(params, opt, range(2, 4))
    assert stored_coupled_norms_are_fresh(opt)


def test_new_channel_ids_list_relayouts() -> None:
    params, opt = build("c")
    train(params, opt, range(1))
    opt.param_groups[0]["channel_ids"] = [None] * len(params)
    train(params, opt, range(1, 2))
    assert opt._storage.buckets[0].coupling is None
    assert "group_norms" not in opt.state[params[1]]  # the 1-D parameter is "none" again


# -- bad input ---------------------------------------------------------------------------


def _ids(*entries):
    return list(entries) + [None] * (len(NAMES) - len(entries))


BAD_IDS = [
    (torch.arange(6), TypeError, "must be a list parallel to params"),
    ([None, None], ValueError, r"has 2 entries for 5 parameters"),
    (_ids(torch.arange(6, dtype=torch.int32)), TypeError, r"conv.weight' must be None or a 1-D int64 CPU"),
    (_ids(torch.zeros(6)), TypeError, "must be None or a 1-D int64 CPU tensor"),
    (_ids(torch.arange(5)), ValueError, r"conv.weight' has 5 ids for its 6 rows"),
    (_ids(torch.tensor([0, 1, -2, 3, 4, 5])), ValueError, "holds -2"),
]


@pytest.mark.parametrize(("ids", "error", "message"), BAD_IDS,
                         ids=["tensor", "length", "int32", "float", "rows", "negative"])
def test_bad_channel_ids_are_refused_before_any_change(ids, error, message) -> None:
    params = make_params()
    with pytest.raises(error, match=message):
        SLBI([group_of(params, ids)], **HPARAMS)
    good, opt = build("c")
    train(good, opt, range(1))
    state = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in good]
    extra = [nn.Parameter(p.detach().clone()) for p in params]
    with pytest.raises(error, match=message):
        opt.add_param_group({"params": list(zip([f"x.{n}" for n in NAMES], extra, strict=True)),
                             "channel_ids": ids})
    assert len(opt.param_groups) == 1
    bad = copy.deepcopy(state)
    bad["param_groups"][0]["channel_ids"] = ids
    with pytest.raises(error, match=message):
        opt.load_state_dict(bad)
    opt.param_groups[0]["channel_ids"] = ids  # edited between steps: refused at the next
    for p in good:
        p.grad = torch.ones_like(p)
    with pytest.raises(error, match=message):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(good, weights, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(all_params(opt), good, strict=True))


def test_members_in_different_buffers_are_refused_naming_both() -> None:
    a, b = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    ids = [torch.tensor([0, 1, 2]), torch.tensor([-1, -1, 2])]
    with pytest.raises(ValueError, match=r"channel id 2 .* couples parameter 'a' \(torch.float32 on cpu\) "
                                         r"with parameter 'b' \(torch.float64 on cpu\)"):
        SLBI([{"params": [("a", a), ("b", b)], "channel_ids": ids}])
    SLBI([{"params": [("a", a), ("b", b)], "channel_ids": [ids[0], torch.tensor([-1, -1, -1])]}])


@pytest.mark.parametrize("shape", [(), (0, 3)], ids=["0-d", "no-rows"])
def test_channel_ids_need_rows(shape: tuple[int, ...]) -> None:
    param = nn.Parameter(torch.randn(shape))
    with pytest.raises(ValueError, match=r"has no rows to couple"):
        SLBI([{"params": [("p", param)], "channel_ids": [torch.zeros(shape[:1], dtype=torch.int64)]}])


def test_a_1d_parameter_in_a_group_penalty_group_needs_channel_ids() -> None:
    weight, scale = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="penalty 'group' needs a tensor of at least 2 dims"):
        SLBI([{"params": [weight, scale], "penalty": "group"}])
    opt = SLBI([{"params": [weight, scale], "penalty": "group", "channel_ids": [None, torch.arange(4)]}])
    assert opt.state[scale]["group_norms"].shape == (4,)
