"""The records a run of ``slbi-train`` passes between its modules: the data on the
device, what one optimizer's run produced, what ``--slim`` measured, and the error that
ends a run with a one-line message."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..toolbox import LayerSparsity
from .plots import FilterPath

__all__ = ["Data", "RunError", "RunResult", "SlimReport"]


class RunError(Exception):
    """A problem reported to the user as one line, with a non-zero exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Data:
    """Train and test tensors on the training device."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


@dataclass
class RunResult:
    """What one optimizer's run produced."""

    kind: str
    rows: list[dict[str, Any]]
    path: FilterPath
    seconds: float
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sparsity: list[LayerSparsity] = field(default_factory=list)
    prune_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float:
        return self.rows[-1]["test_acc"]

    @property
    def best(self) -> dict[str, Any]:
        """The row of the best dense test accuracy (the first one of a tie)."""
        return max(self.rows, key=lambda row: row["test_acc"])


@dataclass
class SlimReport:
    """What ``--slim`` measured: ``before`` (the trained model; accuracy of W*) and
    ``after`` (the slim model), each with ``params``, ``macs`` (one image), ``latency_ms``
    (median of ``latency_rounds`` on a batch of ``latency_batch``, ``threads`` CPU
    threads) and ``test_acc``; the output difference on ``examples`` test images; one row
    per penalised layer; and, after ``--slim-epochs``, both models' accuracy trained on."""

    before: dict[str, float]
    after: dict[str, float]
    difference: float
    examples: int
    layers: list[dict[str, Any]]
    latency_batch: int
    latency_rounds: int
    threads: int
    trained_on: list[dict[str, Any]] = field(default_factory=list)
