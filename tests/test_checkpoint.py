"""Checkpoints: the state dict's layout, torch.save / torch.load(weights_only=True), resuming
bit for bit in a new process (both backends), and loading a torch.optim.SGD state dict."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn

from slbi_triton import SLBI
from slbi_triton.toolbox import SENTINEL_EPOCH

from .helpers import flat_storages, penalty_of
from .reference import RefParam

REPO = Path(__file__).resolve().parents[1]


class CkptNet(nn.Module):
    """conv (group), BatchNorm, fc (l1), biases (none) and a 0-D scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)
        self.scale = nn.Parameter(torch.tensor(1.0))
        with torch.no_grad():
            self.conv.weight.mul_(torch.linspace(0.1, 2.0, 6).view(6, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc(h) * self.scale


def build(seed: int, backend: str, fused: bool | None, device: str = "cpu"):
    """Model, optimizer (two groups, momentum with dampening) and an LR scheduler."""
    torch.manual_seed(seed)
    model = CkptNet().to(device)
    named = dict(model.named_parameters())
    groups = [
        {"params": [("conv.weight", named["conv.weight"])], "lam": 0.3, "mu": 5.0},
        {"params": [(n, p) for n, p in named.items() if n != "conv.weight"], "lam": 0.02, "mu": 20.0,
         "momentum": 0.8, "dampening": 0.1, "weight_decay": 1e-3},
    ]
    opt = SLBI(groups, lr=0.05, backend=backend, fused=fused)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
    return model, opt, scheduler


def train(model: CkptNet, opt: SLBI, scheduler, steps: range, device: str = "cpu") -> None:
    """Steps with data fixed by the step index; the toolbox orders every 3 steps and
    prunes (frozen) once, so the path history and frozen masks matter on resume."""
    for step in steps:
        gen = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(8, 2, 6, 6, generator=gen), torch.randint(0, 5, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
        scheduler.step()
        if step % 3 == 2:
            opt.update_order(step // 3)
        if step == 4:
            opt.prune_layer(30, "conv.weight", freeze=True)


def checkpoint(model: CkptNet, opt: SLBI, scheduler) -> dict:
    return {"model": model.state_dict(), "opt": opt.state_dict(), "scheduler": scheduler.state_dict()}


def resume_worker(path: str, out: str, backend: str, fused: str, first: int, last: int) -> None:
    """Run in a new process: a fresh model and optimizer, load the checkpoint, train on."""
    fused_flag = None if fused == "None" else fused == "True"
    model, opt, scheduler = build(seed=123, backend=backend, fused=fused_flag)
    saved = torch.load(path, weights_only=True, map_location="cpu")
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    scheduler.load_state_dict(saved["scheduler"])
    train(model, opt, scheduler, range(first, last))
    torch.save(checkpoint(model, opt, scheduler), out)


def flat_state(model: nn.Module, opt: SLBI) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and optimizer state tensor, by name."""
    out = {f"model/{k}": v for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        for key, value in opt.state[p].items():
            out[f"{name}/{key}"] = value
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    ("backend", "fused", "steps", "new_process"),
    [("torch", False, 10, True), ("triton", None, 3, True), ("torch", None, 10, False)],
    ids=["torch-eager-new-process", "triton-interpreted-new-process", "torch-inductor"],
)
def test_resume_is_bit_for_bit(
    tmp_path, backend: str, fused: bool | None, steps: int, new_process: bool
) -> None:
    """Train ``steps``, save, load into a fresh model and optimizer (in a new process:
    nothing may depend on the process), train ``steps`` more: equal, bit for bit, to
    training ``2 · steps`` at once. (The Inductor variant resumes in this process, to
    compile once.)"""
    model, opt, scheduler = build(seed=0, backend=backend, fused=fused)
    train(model, opt, scheduler, range(steps))
    path, out = tmp_path / "ckpt.pt", tmp_path / "resumed.pt"
    torch.save(checkpoint(model, opt, scheduler), path)
    train(model, opt, scheduler, range(steps, 2 * steps))  # the uninterrupted run

    args = (str(path), str(out), backend, str(fused), steps, 2 * steps)
    if new_process:
        code = f"from tests.test_checkpoint import resume_worker; resume_worker(*{args!r})"
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        command = [sys.executable, "-c", code]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        resume_worker(*args)

    resumed_model, resumed_opt, _ = build(seed=7, backend=backend, fused=fused)
    resumed = torch.load(out, weights_only=True)
    resumed_model.load_state_dict(resumed["model"])
    resumed_opt.load_state_dict(resumed["opt"])
    assert_bitwise_equal(flat_state(resumed_model, resumed_opt), flat_state(model, opt))
    assert resumed["scheduler"] == scheduler.state_dict()
    assert resumed_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for name in ("conv.weight", "fc.weight"):
        ours, theirs = opt.path_history(name), resumed_opt.path_history(name)
        assert ours["epochs"] == theirs["epochs"] and len(ours["epochs"]) >= 2 * steps // 3
        assert torch.equal(ours["norms"], theirs["norms"])
        assert torch.equal(ours["selected"], theirs["selected"])
    frozen, resumed_frozen = opt.state_dict()["slbi"]["frozen"], resumed_opt.state_dict()["slbi"]["frozen"]
    assert resumed_frozen.keys() == {0} == frozen.keys()  # conv.weight is parameter 0
    assert torch.equal(resumed_frozen[0], frozen[0])
    assert resumed_opt.state_dict()["slbi"]["steps"] == 2 * steps


def test_group_norms_are_taken_over_not_recomputed() -> None:
    """The Triton kernel sums ‖Z_g‖² in another order than torch: a resume takes the
    saved norms as they are (here made to differ from a recompute in the last bits)."""
    model, opt, scheduler = build(seed=0, backend="torch", fused=False)
    train(model, opt, scheduler, range(3))
    saved = copy.deepcopy(opt.state_dict())
    norms = saved["state"][0]["group_norms"]
    norms.copy_(torch.nextafter(norms, torch.full_like(norms, float("inf"))))
    fresh_model, fresh_opt, _ = build(seed=1, backend="torch", fused=False)
    fresh_opt.load_state_dict(saved)
    assert torch.equal(fresh_opt.state[fresh_model.conv.weight]["group_norms"], norms)
    fresh_opt.step()  # nothing to update (no gradients): the norms stay as loaded
    assert torch.equal(fresh_opt.state[fresh_model.conv.weight]["group_norms"], norms)


def test_penalty_switched_on_after_loading_a_checkpoint_takes_effect() -> None:
    """A checkpoint saved with penalty "none", loaded into an l1 run, then the penalty set
    back to l1: the next step re-lays the buffers and runs l1 (Z in the state)."""
    def fresh(penalty: str):
        torch.manual_seed(0)
        param = nn.Parameter(torch.randn(6, 5))
        return param, SLBI([param], lr=0.1, mu=2.0, lam=0.01, penalty=penalty, backend="torch")

    def step(param, opt) -> None:
        opt.zero_grad()
        (param * torch.randn(param.shape)).sum().backward()
        opt.step()

    saved_param, saved_opt = fresh("none")
    step(saved_param, saved_opt)
    param, opt = fresh("l1")
    step(param, opt)
    opt.load_state_dict(saved_opt.state_dict())
    assert opt.param_groups[0]["penalty"] == "none" and "z" not in opt.state[param]
    opt.param_groups[0]["penalty"] = "l1"
    step(param, opt)
    opt.assign_name(["w"])
    assert [row.kind for row in opt.sparsity()] == ["l1"]
    assert "z" in opt.state[param] and opt.state[param]["z"].abs().sum() > 0


def test_state_dict_layout() -> None:
    model, opt, scheduler = build(seed=0, backend="torch", fused=False)
    train(model, opt, scheduler, range(6))
    saved = opt.state_dict()
    names = [n for n, _ in model.named_parameters()]
    order = ["conv.weight", *[n for n in names if n != "conv.weight"]]
    params = dict(model.named_parameters())
    assert set(saved) == {"state", "param_groups", "slbi"}
    for index, name in enumerate(order):
        p = params[name]
        entry = saved["state"][index]
        expected = {"momentum_buffer"}
        if name in ("conv.weight", "fc.weight"):
            expected |= {"z", "entry_epoch", "order_magnitude"}
        if name == "conv.weight":
            expected.add("group_norms")
        assert set(entry) == expected, name
        for key in ("momentum_buffer", "z"):
            if key in entry:
                assert entry[key].shape == p.shape and entry[key].dtype == p.dtype
        if name == "conv.weight":
            assert entry["group_norms"].shape == (6,) and entry["group_norms"].dtype == torch.float32
            assert entry["entry_epoch"].shape == (6,) and entry["entry_epoch"].dtype == torch.int64
        if name == "fc.weight":
            assert entry["entry_epoch"].shape == p.shape
    group = saved["param_groups"][1]
    assert group["params"] == list(range(1, len(order)))
    assert group["param_names"] == order[1:]
    assert {k: group[k] for k in ("momentum", "dampening", "weight_decay", "lam", "mu", "penalty")} == {
        "momentum": 0.8, "dampening": 0.1, "weight_decay": 1e-3, "lam": 0.02, "mu": 20.0, "penalty": "auto"}
    assert group["lr"] == pytest.approx(0.05 * 0.7)  # the scheduler's value
    # Live views into the flat buffers, like SGD's buffers: no copies are made.
    for key in ("z", "momentum_buffer"):
        views = [entry[key] for entry in saved["state"].values() if key in entry]
        assert len(flat_storages(views)) == 1, key
        live = opt.state[params["conv.weight"]][key]
        assert views[0].untyped_storage().data_ptr() == live.untyped_storage().data_ptr()
    # torch.save writes each flat buffer once, whatever the number of views into it.
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    storages = {}
    for entry in saved["state"].values():
        for key in ("z", "momentum_buffer", "group_norms"):
            if key in entry:
                storage = entry[key].untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    flat_bytes = sum(storages.values())
    assert flat_bytes < len(buffer.getvalue()) < 2 * flat_bytes + 30_000


def test_weights_only_load_into_fresh_optimizer_and_model() -> None:
    """Load order model-after-optimizer and optimizer-after-model both work; the saved
    dict is a snapshot after torch.save even though state_dict() hands out live views."""
    model, opt, scheduler = build(seed=0, backend="torch", fused=False)
    train(model, opt, scheduler, range(5))
    buffer = io.BytesIO()
    torch.save(checkpoint(model, opt, scheduler), buffer)
    expected = {k: v.clone() for k, v in flat_state(model, opt).items()}
    train(model, opt, scheduler, range(5, 7))  # changes the live state, not the file
    for model_first in (True, False):
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True, map_location=lambda storage, _: storage)
        fresh_model, fresh_opt, _ = build(seed=5, backend="torch", fused=False)
        if model_first:
            fresh_model.load_state_dict(saved["model"])
            fresh_opt.load_state_dict(saved["opt"])
        else:
            fresh_opt.load_state_dict(saved["opt"])
            fresh_model.load_state_dict(saved["model"])
        assert_bitwise_equal(flat_state(fresh_model, fresh_opt), expected)
        assert len(flat_storages(list(fresh_model.parameters()))) == 1  # the flat buffers are rebuilt
        for p in fresh_model.parameters():
            for value in fresh_opt.state[p].values():
                if value.dtype != torch.int64 and value.shape != (6,):
                    assert value.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()


def test_low_precision_state_keeps_its_dtypes() -> None:
    """torch's loader casts floating state to the parameter's dtype; the entry epochs
    (int64) and the float32 norms and magnitudes come back exactly as saved."""
    model, opt, _ = build(seed=0, backend="torch", fused=False)
    model.bfloat16()
    train_bf16 = [(torch.randn(4, 2, 6, 6).bfloat16(), torch.randint(0, 5, (4,))) for _ in range(4)]
    for epoch, (x, y) in enumerate(train_bf16):
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
        opt.update_order(epoch)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh_model, fresh_opt, _ = build(seed=1, backend="torch", fused=False)
    fresh_model.bfloat16()
    fresh_opt.load_state_dict(torch.load(buffer, weights_only=True))
    for p, q in zip(model.parameters(), fresh_model.parameters(), strict=True):
        for key, value in opt.state[p].items():
            loaded = fresh_opt.state[q][key]
            assert loaded.dtype == value.dtype, key
            assert torch.equal(loaded, value), key
    conv = fresh_opt.state[fresh_model.conv.weight]
    assert conv["group_norms"].dtype == torch.float32 and conv["order_magnitude"].dtype == torch.float32
    assert conv["entry_epoch"].dtype == torch.int64 and (conv["entry_epoch"] <= SENTINEL_EPOCH).all()


def test_cross_dtype_load_recomputes_group_norms() -> None:
    """A float32 checkpoint into a bfloat16 model: Z is rounded, so its norms are
    recomputed from the rounded Z rather than taken over."""
    model, opt, scheduler = build(seed=0, backend="torch", fused=False)
    train(model, opt, scheduler, range(4))
    saved = copy.deepcopy(opt.state_dict())
    fresh_model, fresh_opt, _ = build(seed=1, backend="torch", fused=False)
    fresh_model.bfloat16()
    fresh_opt.load_state_dict(saved)
    state = fresh_opt.state[fresh_model.conv.weight]
    assert state["z"].dtype == torch.bfloat16
    z_rows = state["z"].float().reshape(6, -1)
    assert torch.equal(state["group_norms"], torch.linalg.vector_norm(z_rows, dim=1))


def test_sgd_state_dict_switches_a_run_to_slbi() -> None:
    torch.manual_seed(0)
    model = CkptNet()
    sgd = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, dampening=0.05, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 2, 6, 6, generator=gen), torch.randint(0, 5, (6,), generator=gen))
               for _ in range(4)]
    for x, y in batches[:3]:
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sgd.step()
    buffer = io.BytesIO()
    torch.save(sgd.state_dict(), buffer)
    buffer.seek(0)
    opt = SLBI(model.named_parameters(), lr=1.0, kappa=2.0, mu=7.0, lam=0.05, momentum=0.5, backend="torch",
               fused=False)
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    group = opt.param_groups[0]
    sgd_values = (group["lr"], group["momentum"], group["dampening"], group["weight_decay"])
    assert sgd_values == (0.03, 0.9, 0.05, 1e-4)
    assert (group["kappa"], group["mu"], group["lam"], group["penalty"]) == (2.0, 7.0, 0.05, "auto")
    assert "nesterov" not in group and "maximize" not in group
    assert group["param_names"] == [n for n, _ in model.named_parameters()]
    refs = {}
    for p in model.parameters():
        state = opt.state[p]
        assert torch.equal(state["momentum_buffer"], sgd.state[p]["momentum_buffer"])
        penalty = penalty_of(opt, p)
        if penalty != "none":
            assert not state["z"].any()
        hp = {k: group[k] for k in ("lr", "kappa", "mu", "lam", "momentum", "dampening", "weight_decay")}
        refs[p] = RefParam(p, penalty, hp)
        refs[p].v = state["momentum_buffer"].double().clone()
    x, y = batches[3]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for p, ref in refs.items():
        ref.step(p.grad)
    opt.step()
    for p, ref in refs.items():  # the momentum carried over is v_t of the SLBI step
        assert torch.allclose(p.detach().double(), ref.w, rtol=1e-6, atol=1e-7)


def test_sgd_without_momentum_state_loads() -> None:
    torch.manual_seed(0)
    model = CkptNet()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = SLBI(model.parameters(), backend="torch", fused=False)
    opt.load_state_dict(sgd.state_dict())
    assert opt.param_groups[0]["momentum"] == 0 and opt.param_groups[0]["lr"] == 0.1
    assert all("momentum_buffer" not in opt.state[p] for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_triton_resume_is_bit_for_bit_and_loads_on_cpu() -> None:
    """On the GPU the kernel's ‖Z_g‖ summation order differs from torch's: the saved norms
    make the resume exact. The same checkpoint loads on the CPU with map_location."""
    model, opt, scheduler = build(seed=0, backend="triton", fused=None, device="cuda")
    train(model, opt, scheduler, range(6), "cuda")
    buffer = io.BytesIO()
    torch.save(checkpoint(model, opt, scheduler), buffer)
    train(model, opt, scheduler, range(6, 12), "cuda")
    for device, backend in (("cuda", "triton"), ("cpu", "torch")):
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True, map_location=device)
        fresh_model, fresh_opt, fresh_scheduler = build(seed=3, backend=backend, fused=False, device=device)
        fresh_model.load_state_dict(saved["model"])
        fresh_opt.load_state_dict(saved["opt"])
        fresh_scheduler.load_state_dict(saved["scheduler"])
        assert all(info.device.type == device for info in fresh_opt.kernels())
        if device == "cuda":
            train(fresh_model, fresh_opt, fresh_scheduler, range(6, 12), "cuda")
            assert_bitwise_equal(flat_state(fresh_model, fresh_opt), flat_state(model, opt))

