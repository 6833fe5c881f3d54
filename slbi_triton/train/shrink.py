"""``--slim``: remove what the trained SLBI model's W* zeroes (:func:`slbi_triton.slim`),
measure parameters, MACs, CPU latency and test accuracy before and after, and train both
models on for ``--slim-epochs``."""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..optimizer import SLBI
from ..slimming import SlimResult, slim
from ..targets import prune_to
from .loop import EpochLoop, evaluate, w_star_accuracy, zero_filters
from .records import Data, RunResult, SlimReport

__all__ = ["cpu_latency", "slim_layers", "slim_run", "train_on"]

SLIM_EXAMPLES = 256
"""Test images that ``--slim`` traces the model on, measures constants on and checks the
slim model against W* on."""

LATENCY_BATCH = 128
LATENCY_ROUNDS = 15


@torch.no_grad()
def cpu_latency(models: Sequence[nn.Module], batch: Tensor, rounds: int = LATENCY_ROUNDS) -> list[float]:
    """Median forward time in ms of each model on ``batch``, on the CPU in eval mode with
    this process's thread count. After one warm-up call each, every round runs each model
    once in turn, so that all of them see the same machine load."""
    models = [copy.deepcopy(model).cpu().eval() for model in models]
    batch = batch.cpu()
    for model in models:
        model(batch)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for model, seconds in zip(models, times, strict=True):
            started = time.perf_counter()
            model(batch)
            seconds.append(time.perf_counter() - started)
    return [1000.0 * statistics.median(seconds) for seconds in times]


def slim_layers(optimizer: SLBI, removed: dict[str, list[tuple[int, list[int]]]]) -> list[dict[str, Any]]:
    """Per penalised layer: filters / neurons, how many W* zeroes and how many were removed."""
    rows = []
    for row in optimizer.sparsity():
        out = dict(removed.get(row.name, [])).get(0, [])
        zero = zero_filters(optimizer.w_star(row.name))
        rows.append(
            {
                "layer": row.name,
                "outputs": row.size if row.kind == "group" else None,
                "zero_in_w_star": zero,
                "removed": len(out),
                "zero_kept": zero - len(out),
            }
        )
    return rows


def slim_run(run: RunResult, data: Data, target_macs: float | None = None) -> tuple[SlimResult, SlimReport]:
    """Slim the trained SLBI model (W*, or cut to ``target_macs`` of its MACs with
    :func:`slbi_triton.prune_to`) and measure params, MACs, CPU latency and test accuracy
    before and after."""
    import torch_pruning as tp  # the [slim] extra; slim() has checked that it is there

    examples = data.test_x[:SLIM_EXAMPLES]
    if target_macs is None:
        result = slim(run.model, run.optimizer, examples)
    else:
        result = prune_to(run.model, run.optimizer, examples, macs=target_macs)
    measured = []
    for model in (run.model, result.model):
        macs, params = tp.utils.count_ops_and_params(model, examples[:1])
        measured.append({"params": params, "macs": macs})
    batch = data.test_x[:LATENCY_BATCH]
    for values, latency in zip(measured, cpu_latency([run.model, result.model], batch), strict=True):
        values["latency_ms"] = latency
    measured[0]["test_acc"] = run.rows[-1]["test_acc_w_star"]
    measured[1]["test_acc"] = evaluate(result.model, data.test_x, data.test_y)
    layers = slim_layers(run.optimizer, result.removed)
    report = SlimReport(
        measured[0],
        measured[1],
        result.difference,
        len(examples),
        layers,
        len(batch),
        LATENCY_ROUNDS,
        torch.get_num_threads(),
    )
    return result, report


def train_on(
    run: RunResult, result: SlimResult, args: argparse.Namespace, data: Data
) -> list[dict[str, Any]]:
    """Train the unslimmed and the slim model ``--slim-epochs`` more epochs each, at the
    final learning rate and with the same data order; their dense and W* test accuracy."""
    quiet = argparse.Namespace(**{**vars(args), "record_interval": 0})
    rows = []
    for label, model, optimizer in (
        ("unslimmed", run.model, run.optimizer),
        ("slim", result.model, result.optimizer),
    ):
        loop = EpochLoop(model, optimizer, None, torch.Generator().manual_seed(args.seed + 1), quiet)
        for epoch in range(1, args.slim_epochs + 1):
            loop.train_epoch(data, f"{label} +{epoch}/{args.slim_epochs}")
        w_star = w_star_accuracy(optimizer, model, data)
        rows.append(
            {
                "model": label,
                "epochs": args.slim_epochs,
                "test_acc": evaluate(model, data.test_x, data.test_y),
                "test_acc_w_star": w_star,
            }
        )
    return rows
