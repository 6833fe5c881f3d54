"""Quick-mode end-to-end benchmark: one training iteration (forward, backward, step).

CI sizes (batch 8 / 4); the report runs LeNet and ResNet-20 at batch 128. Asserts that
every contender trains and the overhead figures are consistent, never timing targets.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import contenders, harness

pytest.importorskip("pytest_benchmark")

CPU = torch.device("cpu")


@pytest.mark.parametrize(("model", "batch"), [("lenet", 8), ("resnet20", 4)])
def test_train_iteration_overhead(model: str, batch: int) -> None:
    default = contenders.default_contender_name(CPU)
    chosen = contenders.contenders_for(CPU, [default, "slbi-bf16", "sgd-loop", "sgd-foreach", "paper"])
    rows = harness.bench_train(model, chosen, CPU, batch=batch, rounds=2, warmup=0, reset_compiler=False)
    by_name = {r.contender: r for r in rows}
    assert set(by_name) == {c.name for c in chosen}
    for row in rows:
        assert row.median_s > 0 and row.first_iter_s > 0 and len(row.samples_s) == 2
        assert row.final_loss is not None and math.isfinite(row.final_loss)
        assert row.overhead_pct is not None
    sgd = [by_name["sgd-loop"], by_name["sgd-foreach"]]
    assert min(r.overhead_pct for r in sgd) == pytest.approx(0.0)
    # Same model, same data, same SGD hyper-parameters: the SGD variants train alike.
    assert sgd[0].final_loss == pytest.approx(sgd[1].final_loss, rel=1e-4)
    assert by_name[default].overhead_pct == pytest.approx(
        100 * (by_name[default].median_s / min(r.median_s for r in sgd) - 1)
    )


@pytest.mark.parametrize("contender", ["slbi-torch", "slbi-bf16", "sgd-foreach"])
def test_train_iteration(benchmark, contender: str) -> None:
    from slbi_triton.train.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet")
    opt = contenders.ALL_CONTENDERS[contender].build(list(model.named_parameters()))
    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    losses: list[torch.Tensor] = []
    iteration = harness.train_iteration(model, opt, images, labels, losses)
    iteration()
    benchmark.group = "train lenet batch 8"
    benchmark.pedantic(iteration, rounds=3, iterations=1, warmup_rounds=1)
    assert math.isfinite(float(losses[-1]))
