"""torch.compile: a training step with opt.step() compiles with no graph break, an LR
scheduler causes no recompile, and the compiled step equals the eager one."""

from __future__ import annotations

import copy

import pytest
import torch
from slbi_triton.kernels import cpu_step, ops
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from slbi_triton import SLBI

from .helpers import random_bucket
from .reference import rel_err

if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
    pytest.skip("this torch cannot trace Tensor.backward() in Dynamo", allow_module_level=True)

trace_backward = torch._dynamo.config.patch(trace_autograd_ops=True)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_run(backend: str, lr: float | torch.Tensor):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)
    )
    opt = SLBI(model.parameters(), lr=lr, lam=0.01, mu=10.0, backend=backend)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return model, opt, scheduler, train_step


def batches(count: int):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(count)]


@trace_backward
def test_train_step_has_no_graph_break() -> None:
    _, _, _, train_step = make_run("torch", 0.1)
    x, y = batches(1)[0]
    explanation = torch._dynamo.explain(train_step)(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@trace_backward
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lr", [0.1, "tensor"], ids=["float_lr", "tensor_lr"])
def test_scheduler_changing_lr_causes_no_recompile(lr, backend: str) -> None:
    lr = torch.tensor(0.1) if lr == "tensor" else lr
    _, opt, scheduler, train_step = make_run(backend, lr)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(train_step, backend=counter, fullgraph=True)
    data = batches(12)
    # Steps 1 and 2 compile (the momentum buffer is empty on the first step only).
    for x, y in data[:2]:
        compiled(x, y)
        scheduler.step()
    warm = counter.frame_count
    lrs = []
    for x, y in data[2:]:
        compiled(x, y)
        scheduler.step()
        lrs.append(float(opt.param_groups[0]["lr"]))
    assert counter.frame_count == warm  # 0 recompiles over 10 lr changes
    assert len(set(lrs)) == 10


@trace_backward
def test_compiled_train_step_matches_eager() -> None:
    model_e, _, sched_e, step_e = make_run("torch", torch.tensor(0.1))
    model_c, _, sched_c, step_c = make_run("torch", torch.tensor(0.1))
    compiled = torch.compile(step_c, fullgraph=True)  # Inductor
    for x, y in batches(20):
        step_e(x, y)
        sched_e.step()
        compiled(x, y)
        sched_c.step()
    for a, b in zip(model_c.parameters(), model_e.parameters(), strict=True):
        assert rel_err(a, b) <= 1e-6


def test_compiled_opt_step_alone() -> None:
    model_e, opt_e, _, _ = make_run("torch", 0.1)
    model_c, opt_c, _, _ = make_run("torch", 0.1)
    compiled_step = torch.compile(opt_c.step, fullgraph=True, backend="aot_eager")
    for x, y in batches(5):
        for model, opt, step in ((model_e, opt_e, opt_e.step), (model_c, opt_c, compiled_step)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            step()
    for a, b in zip(model_c.parameters(), model_e.parameters(), strict=True):
        assert rel_err(a, b) <= 1e-6


@trace_backward
def test_triton_op_under_compile_matches_eager() -> None:
    """The Triton kernel as a custom op inside a compiled step (kernels interpreted)."""
    model_e, _, _, step_e = make_run("triton", 0.1)
    model_c, opt_c, _, step_c = make_run("triton", 0.1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step_c, backend=counter, fullgraph=True)
    for x, y in batches(4):
        step_e(x, y)
        compiled(x, y)
    assert counter.frame_count == 2
    assert [info.kernel for info in opt_c.kernels()] == ["triton"]
    for a, b in zip(model_c.parameters(), model_e.parameters(), strict=True):
        assert rel_err(a, b) <= 1e-6


@trace_backward
def test_cpu_kernel_is_one_op_of_the_compiled_graph() -> None:
    """On the CPU the compiled step calls the C kernel's custom op (not traced torch math)."""
    _, opt, _, train_step = make_run("torch", 0.1)
    if not cpu_step.available(torch.float32):
        pytest.skip("no C compiler")
    assert [info.kernel for info in opt.kernels()] == ["c"]
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module.code)
        return graph_module.forward

    compiled = torch.compile(train_step, backend=capture, fullgraph=True)
    for x, y in batches(2):
        compiled(x, y)
    assert graphs and all(code.count("slbi_triton.bucket_step") == 1 for code in graphs)


@pytest.mark.parametrize("amp", [None, 0.0, 1.0], ids=["plain", "amp_finite", "amp_found_inf"])
@pytest.mark.parametrize("kernel", ["triton", "c"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32-state", "bf16-state"])
def test_opcheck_bucket_step(amp: float | None, kernel: str, state_dtype: torch.dtype) -> None:
    """Schema, fake implementation and aot dispatch of the op, with and without
    GradScaler's inv_scale / found_inf inputs and stochastic rounding."""
    if kernel == "c" and not cpu_step.available(torch.float32, state_dtype):
        pytest.skip("no C compiler")
    bucket = random_bucket([(5, 3, 2, 2), (7, 9), (4,)], ["group", "l1", "none"], state_dtype=state_dtype)
    if amp is not None:
        bucket.inv_scale, bucket.found_inf = torch.tensor([0.25]), torch.tensor([amp])
    op = ops.bucket_step_interpreted if kernel == "triton" else ops.bucket_step
    torch.library.opcheck(op, copy.deepcopy(tuple(bucket.args())))


@trace_backward
def test_set_to_none_in_compiled_code_is_refused() -> None:
    """A compiled step reads the flat gradient buffer: zero_grad(set_to_none=True) in
    compiled code would leave fresh gradients outside it, so it is refused."""
    model, opt, _, _ = make_run("torch", 0.1)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(Exception, match=r"zero_grad\(set_to_none=True\) inside torch.compile"):
        torch.compile(train_step, backend="aot_eager", fullgraph=True)(x, y)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
