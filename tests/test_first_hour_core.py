"""What a new user meets in the first hour (issue 19), written the way users write it:
gradients written in place, sparse gradients, another optimizer's state dict, what
``penalty="auto"`` penalises, FSDP2, torch's keywords, safetensors and how often a step
compiles; then the everyday cases that must keep working (tied embeddings, schedulers,
closures, ``add_param_group``, ``AveragedModel``, bf16 autocast with ``GradScaler``,
DataLoader workers)."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from slbi_triton.kernels import cpu_step
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.utils import parametrizations

from slbi_triton import SLBI
from slbi_triton.penalties import auto_penalty, owners_in

LOSS = nn.functional.cross_entropy


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def kinds(opt: SLBI) -> dict[str, str]:
    """The penalty of every penalised parameter, by name (public API: ``sparsity()``)."""
    return {row.name: row.kind for row in opt.sparsity()}


def kind_of(opt: SLBI, param: torch.Tensor) -> str:
    """The penalty of a parameter, named or not, from its state (Z and group norms)."""
    state = opt.state[param]
    return "group" if "group_norms" in state else "l1" if "z" in state else "none"


# -- 2. gradients written in place after zero_grad() -------------------------------------


def test_gradients_copied_in_after_zero_grad_are_stepped_as_sgd_steps_them() -> None:
    """``torch.autograd.grad`` + ``p.grad.copy_(g)`` (Opacus, gradient surgery): with
    penalty "none" and κ = 1 SLBI's step is SGD's with momentum, so the runs agree."""
    model = mlp()
    twin = copy.deepcopy(model)
    slbi = SLBI(model.named_parameters(), lr=0.1, momentum=0.9, penalty="none")
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    for step in range(4):
        for net, opt in ((model, slbi), (twin, sgd)):
            opt.zero_grad(set_to_none=False)
            if step == 0:
                LOSS(net(x), y).backward()  # autograd makes the .grad tensors once
            else:
                grads = torch.autograd.grad(LOSS(net(x * step), y), list(net.parameters()))
                for param, grad in zip(net.parameters(), grads, strict=True):
                    param.grad.copy_(grad)
            opt.step()
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(a, b)


def test_only_the_gradients_written_since_zero_grad_are_stepped() -> None:
    model = mlp()
    opt = SLBI(model.named_parameters(), lr=0.1)
    LOSS(model(torch.randn(2, 5)), torch.tensor([0, 1])).backward()
    opt.step()
    opt.zero_grad()
    first, last = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    model[2].weight.grad.copy_(torch.ones(3, 4))
    opt.step()
    assert torch.equal(model[0].weight, first)  # nothing written: skipped, as SGD skips a None grad
    assert not torch.equal(model[2].weight, last)


def test_clipping_does_not_step_a_parameter_that_got_no_gradient() -> None:
    """``clip_grad_norm_`` scales every ``.grad`` in place, the unused head's too: that is
    no gradient, so the head stays where it was (as with SGD, whose grad there is None)."""
    body, head = mlp(), nn.Linear(3, 2)  # the head trained once, then no longer used
    model = nn.ModuleDict({"body": body, "head": head})
    opt = SLBI(model.named_parameters(), lr=0.1)
    x, y = torch.randn(4, 5), torch.randint(0, 2, (4,))
    LOSS(head(body(x)), y).backward()
    opt.step()
    for _ in range(3):
        opt.zero_grad()
        LOSS(body(x), y).backward()
        before, trained = head.weight.detach().clone(), body[0].weight.detach().clone()
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)
        opt.step()
        assert torch.equal(head.weight, before)
        assert not torch.equal(body[0].weight, trained)


# -- 3. sparse gradients -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["backward", "assigned"])
def test_sparse_gradient_gets_slbi_error_on_every_path(how: str) -> None:
    model = nn.Embedding(10, 4, sparse=True)
    opt = SLBI(model.named_parameters(), lr=0.1)
    before = model.weight.detach().clone()
    if how == "backward":
        with pytest.raises(TypeError, match="SLBI does not support sparse gradients"):
            model(torch.tensor([1, 2])).sum().backward()
    else:
        model.weight.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 4), (10, 4), check_invariants=True)
    for call in (opt.step, opt.zero_grad):
        with pytest.raises(TypeError, match=r"SLBI does not support sparse gradients \(parameter 'weight'"):
            call()
    assert torch.equal(model.weight, before)


# -- 4. another optimizer's state dict ---------------------------------------------------


OTHERS = [torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad]


@pytest.mark.parametrize("other", OTHERS, ids=lambda kind: kind.__name__)
def test_another_optimizers_state_dict_is_refused_and_nothing_changes(other) -> None:
    model = mlp()
    opt = SLBI(model.named_parameters(), lr=0.1)
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    LOSS(model(x), y).backward()
    opt.step()
    foreign = other(model.parameters())
    foreign.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"neither SLBI's nor torch\.optim\.SGD's"):
        opt.load_state_dict(foreign.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value), key


def test_sgd_state_dict_still_switches_a_run_over() -> None:
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.8)
    LOSS(model(torch.randn(4, 5)), torch.tensor([0, 1, 2, 0])).backward()
    sgd.step()
    opt = SLBI(model.named_parameters(), lr=0.1)
    opt.load_state_dict(sgd.state_dict())
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]) == (0.05, 0.8)
    weight = model[0].weight
    torch.testing.assert_close(opt.state[weight]["momentum_buffer"], sgd.state[weight]["momentum_buffer"])


# -- 5. what penalty "auto" penalises ----------------------------------------------------


class TinyViT(nn.Module):
    """The shapes that fooled a shape-only rule, next to the weights "auto" is for."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, stride=2)  # a conv: group, one per output filter
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))  # (1, 1, d): not a conv weight
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))  # (1, n, d)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 4)
        self.vocab = nn.Embedding(11, 8)
        self.up = nn.ConvTranspose2d(8, 3, 2)  # weight (in, out, k, k): dim 0 is the input
        self.normed = parametrizations.weight_norm(nn.Conv2d(3, 3, 1))
        with warnings.catch_warnings():  # the deprecated form still exists in models
            warnings.simplefilter("ignore", FutureWarning)
            self.legacy = nn.utils.weight_norm(nn.Linear(8, 8))


EXPECTED = {
    "patch.weight": "group",
    "attn.in_proj_weight": "l1",
    "attn.out_proj.weight": "l1",
    "head.weight": "l1",
    "up.weight": "l1",
}


@pytest.mark.parametrize("form", ["named_parameters", "parameters", "param groups"])
def test_auto_penalises_conv_and_linear_weights_only(form: str) -> None:
    model = TinyViT()
    if form == "named_parameters":
        opt = SLBI(model.named_parameters(), lr=0.1)
    elif form == "parameters":  # the paper's two-line form
        opt = SLBI(model.parameters(), lr=0.1)
        opt.assign_name([name for name, _ in model.named_parameters()])
    else:
        opt = SLBI([{"params": model.named_parameters(), "lam": 0.5}], lr=0.1)
    assert kinds(opt) == EXPECTED


def test_auto_without_modules_decides_by_name_then_shape() -> None:
    """A list carries no module: names keep tokens and parametrizations out, and an
    unnamed tensor with one "filter" (dim 0 is 1) is not penalised either."""
    model = TinyViT()
    opt = SLBI(list(model.named_parameters()), lr=0.1)
    named = kinds(opt)
    for name in ("cls_token", "pos_embed", "normed.parametrizations.weight.original1", "legacy.weight_v"):
        assert name not in named
    assert named["patch.weight"] == "group" and named["head.weight"] == "l1"
    bare_params = [model.cls_token, model.pos_embed, model.patch.weight, model.head.weight]
    bare = SLBI(bare_params, lr=0.1)
    assert [kind_of(bare, p) for p in bare_params] == ["none", "none", "group", "l1"]


def test_auto_penalty_is_one_function_for_any_caller() -> None:
    model = TinyViT()
    owners = owners_in(model)
    decided = {
        name: auto_penalty(param, name, owners.get(id(param), ())) for name, param in model.named_parameters()
    }
    assert {name: kind for name, kind in decided.items() if kind != "none"} == EXPECTED


def test_auto_leaves_tied_embedding_unpenalised_and_trains_a_transformer() -> None:
    """A small language model with its embedding tied to the output head: one entry, no
    penalty (an embedding table is no linear weight), attention and MLP weights l1."""
    torch.manual_seed(0)
    embed = nn.Embedding(30, 16)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1)
    head = nn.Linear(16, 30, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "encoder": encoder, "head": head})
    opt = SLBI(model.named_parameters(), lr=0.05, mu=20.0, lam=0.1)
    tokens = torch.randint(0, 30, (4, 6))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = LOSS(model["head"](model["encoder"](model["embed"](tokens))).flatten(0, 1), tokens.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert "embed.weight" not in kinds(opt)
    assert kinds(opt)["encoder.layers.0.linear1.weight"] == "l1"
    assert losses[-1] < losses[0]


# -- 6. FSDP2 ----------------------------------------------------------------------------


def test_fsdp2_parameters_are_refused_at_construction_naming_ddp(tmp_path) -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        fully_shard(model)
        with pytest.raises(TypeError, match=r"parameter '0.weight' is a DTensor \(FSDP2's fully_shard.*"
                                            r"DistributedDataParallel"):
            SLBI(model.named_parameters())
    finally:
        dist.destroy_process_group()


# -- 9. torch.optim's keywords -----------------------------------------------------------


def test_torch_keywords_are_accepted_as_torch_accepts_them() -> None:
    params = list(mlp().parameters())
    torch_style = {"foreach": None, "maximize": False, "differentiable": False, "fused": None}
    torch.optim.SGD(params, lr=0.1, **torch_style)
    assert SLBI(params, lr=0.1, **torch_style).kernels() == SLBI(params, lr=0.1).kernels()
    for foreach in (True, False):  # the multi-tensor torch ops: SLBI has no per-tensor loop
        assert {info.kernel for info in SLBI(params, foreach=foreach).kernels()} == {"eager"}
    if cpu_step.available(torch.float32):
        assert SLBI(params, fused=True, foreach=False).kernels()[0].kernel == "c"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"maximize": True}, "maximize=True: SLBI minimises; .*negation"),
    ({"differentiable": True}, "differentiable=True: .*autograd cannot differentiate through it"),
    ({"fused": True, "foreach": True}, "cannot be set together"),
])
def test_torch_keywords_slbi_cannot_honour_are_refused_saying_why(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SLBI(mlp().parameters(), **kwargs)


# -- 11. safetensors ---------------------------------------------------------------------


def test_safetensors_checkpoint_the_readme_way(tmp_path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    model = mlp()
    opt = SLBI(model.named_parameters(), lr=0.1)
    LOSS(model(torch.randn(4, 5)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="share"):  # every parameter is a view of one buffer
        safetensors.save_model(model, tmp_path / "refused.safetensors")
    path = tmp_path / "model.safetensors"
    state = model.state_dict()  # the README's one line: a compact copy of each tensor
    safetensors.save_file({k: v.clone(memory_format=torch.contiguous_format) for k, v in state.items()}, path)
    fresh = mlp()
    fresh_opt = SLBI(fresh.named_parameters(), lr=0.1)
    fresh.load_state_dict(safetensors.load_file(path))
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    assert fresh_opt.kernels()[0].params == opt.kernels()[0].params  # still bound: it trains on


# -- 12 / 13. how often a step compiles --------------------------------------------------


def test_bf16_cpu_step_compiles_each_variant_once(caplog) -> None:
    """bfloat16 parameters on the CPU run an Inductor loop per variant (here l1 and none):
    with a recompile limit of 1, a variant compiled twice, or two variants sharing one
    compiled function, would fall back to eager with a warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2)).to(torch.bfloat16)
    opt = SLBI(model.named_parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level(logging.WARNING), torch._dynamo.config.patch(
        recompile_limit=1, fail_on_recompile_limit_hit=True
    ):
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(3, 6, dtype=torch.bfloat16)).float().square().mean().backward()
            opt.step()
            scheduler.step()
    assert not [record for record in caplog.records if "staying eager" in record.getMessage()]
    assert opt.kernels()[0].kernel == "inductor"
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"), reason="needs torch >= 2.13")
@pytest.mark.parametrize(("lr", "compiles"), [(torch.tensor(0.1), 2), (0.1, 3)], ids=["tensor", "float"])
def test_compiled_training_step_with_lr_changed_every_10_steps(lr, compiles: int) -> None:
    """The README's count: twice with a tensor lr; a float lr changed less often than every
    step once more, when Dynamo makes it dynamic at its first change."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    opt = SLBI(model.named_parameters(), lr=lr, lam=0.01, mu=10.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)  # per "epoch" of 10 steps
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(fullgraph=True, backend=counter)
    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        LOSS(model(x), y).backward()
        opt.step()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for _ in range(21):
            train_step(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
            scheduler.step()
    torch._dynamo.reset()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1 / 4)
    assert counter.frame_count == compiles


# -- what must keep working --------------------------------------------------------------


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator))
            for _ in range(count)]


def test_one_cycle_lr_cycles_lr_and_momentum() -> None:
    model = mlp()
    opt = SLBI(model.named_parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=8, base_momentum=0.8,
                                                    max_momentum=0.95)
    seen = []
    for x, y in batches(8):
        opt.zero_grad()
        LOSS(model(x), y).backward()
        opt.step()
        scheduler.step()
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
    lrs, momenta = zip(*seen, strict=True)
    assert max(lrs) > lrs[0] > lrs[-1] and min(momenta) < momenta[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_reduce_lr_on_plateau_and_sequential_lr() -> None:
    model = mlp()
    opt = SLBI(model.named_parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    for _ in range(3):
        plateau.step(1.0)  # a metric that never improves
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    sequential = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[2])
    for x, y in batches(6):
        opt.zero_grad()
        LOSS(model(x), y).backward()
        opt.step()
        sequential.step()
    assert 0 < opt.param_groups[0]["lr"] < 0.025


def test_closure_and_add_param_group_mid_training() -> None:
    model = mlp()
    opt = SLBI(model.named_parameters(), lr=0.1)
    x, y = batches(1)[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = LOSS(model(x), y)
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))
    extra = nn.Linear(3, 3)
    opt.add_param_group({"params": extra.named_parameters("extra"), "lr": 0.05})  # its module is read
    assert kinds(opt) == {"0.weight": "l1", "2.weight": "l1", "extra.weight": "l1"}
    before = extra.weight.detach().clone()
    momentum = opt.state[model[0].weight]["momentum_buffer"].clone()
    opt.zero_grad()
    LOSS(extra(model(x)), y).backward()
    opt.step()
    assert not torch.equal(extra.weight, before)
    assert not torch.equal(opt.state[model[0].weight]["momentum_buffer"], momentum)


def test_averaged_model_follows_the_mean_of_the_weights() -> None:
    model = mlp()
    opt = SLBI(model.named_parameters(), lr=0.1)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    swa_lr = torch.optim.swa_utils.SWALR(opt, swa_lr=0.05, anneal_epochs=2)
    history = []
    for x, y in batches(4):
        opt.zero_grad()
        LOSS(model(x), y).backward()
        opt.step()
        averaged.update_parameters(model)
        swa_lr.step()
        history.append(model[0].weight.detach().clone())
    torch.testing.assert_close(averaged.module[0].weight, torch.stack(history).mean(0))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_bf16_autocast_with_grad_scaler_on_the_cpu() -> None:
    model = mlp()
    opt = SLBI(model.named_parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in batches(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = LOSS(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    for param, old in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(param).all() and not torch.equal(param, old)


def test_dataloader_workers_forked_after_the_optimizer() -> None:
    model = mlp()
    opt = SLBI(model.named_parameters(), lr=0.1)
    x, y = map(torch.cat, zip(*batches(4), strict=True))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, num_workers=2,
                                         multiprocessing_context="fork")
    losses = []
    for _ in range(2):
        for inputs, targets in loader:
            opt.zero_grad()
            loss = LOSS(model(inputs), targets)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert len(losses) == 8 and all(map(torch.isfinite, map(torch.tensor, losses)))
