"""A compiled training step compiles twice (the first step; then the momentum holds
history) and never again over 100 steps with an LR scheduler changing ``lr`` every step:
with float and tensor ``lr``, with Inductor and ``aot_eager``, wherever the optimizer
lives (tests/compile_holders.py). Host bookkeeping never becomes a guard."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from .compile_holders import HOLDERS
from .reference import rel_err

if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
    pytest.skip("this torch cannot trace Tensor.backward() in Dynamo", allow_module_level=True)

STEPS = 100


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("holder", list(HOLDERS))
def test_compiles_twice_then_never(holder: str, lr_kind: str, backend: str) -> None:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = HOLDERS[holder](counter, lr_kind, STEPS)
    torch._dynamo.reset()
    assert counter.frame_count == 2
    eager = HOLDERS[holder](None, lr_kind, STEPS)
    for a, b in zip(compiled, eager, strict=True):
        assert rel_err(a, b) <= (1e-5 if backend == "aot_eager" else 1e-4)
