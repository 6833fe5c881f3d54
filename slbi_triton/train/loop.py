"""The training loop of ``slbi-train``: optimizers, schedulers, epochs, evaluation and
the pruning sweep."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import Tensor, nn
from tqdm import tqdm

from .. import functional
from ..coupling import layer_weights, param_groups
from ..optimizer import SLBI
from ..targets import MacTarget
from ..toolbox import LayerSparsity
from .models import build_model
from .plots import FilterPath
from .records import Data, RunError, RunResult
from .report import epoch_line, write_csv

PRUNE_PERCENTS = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)
"""Shares of the conv filters pruned for ``prune.csv``."""

EVAL_BATCH_SIZE = 1000

TRACE_EXAMPLES = 16
"""Training images that ``--target-macs`` traces the model on (channel groups, MACs)."""


STATE_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}
"""``--state-dtype``: SLBI's ``state_dtype`` (``None``: the parameters' dtype, float32 here)."""


def conv_weight_names(model: nn.Module) -> list[str]:
    """Names of the conv weights, in parameter order."""
    return [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def default_path_layer(model: nn.Module) -> str:
    """The conv weight with the most filters (the last one of a tie): conv3 for LeNet."""
    params = dict(model.named_parameters())
    names = conv_weight_names(model)
    return max(reversed(names), key=lambda name: params[name].shape[0])


def slbi_param_groups(model: nn.Module, fc_penalty: str) -> list[dict[str, Any]]:
    """Param groups for SLBI: conv weights ``"group"`` (one group per filter), fully
    connected weights ``fc_penalty``, everything else (biases, norm layers) and the
    classifier (the model's last layer, see :func:`slbi_triton.param_groups`) ``"none"``."""
    conv = set(conv_weight_names(model))
    classifier = classifier_weight(model)
    # fc_penalty "group" or "none" shares its list with the conv weights or the biases.
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"group": [], fc_penalty: [], "none": []}
    for name, param in model.named_parameters():
        if name in conv and name != classifier:
            groups["group"].append((name, param))
        elif param.dim() == 2 and name != classifier:
            groups[fc_penalty].append((name, param))
        else:
            groups["none"].append((name, param))
    return [{"params": params, "penalty": penalty} for penalty, params in groups.items() if params]


def classifier_weight(model: nn.Module) -> str | None:
    """The name of the weight of the model's last conv / linear layer (its classifier)."""
    return next((name for name, _, _ in reversed(layer_weights(model))), None)


DEFAULT_MU, DEFAULT_LAM = 100.0, 1.0
TARGET_MU, TARGET_LAM = 2.0, 0.05
"""μ and λ with --target-macs: a held channel decays by lr·κ/μ a step, so the coupling
must be stronger (benchmarks/RESULTS.md, "Half-MAC ResNet-20")."""


def fill_mu_lam(args: argparse.Namespace) -> None:
    """``--mu`` / ``--lam`` not given: their defaults, which depend on ``--target-macs``."""
    targeted = getattr(args, "target_macs", None) is not None
    if args.mu is None:
        args.mu = TARGET_MU if targeted else DEFAULT_MU
    if args.lam is None:
        args.lam = TARGET_LAM if targeted else DEFAULT_LAM


def build_optimizer(
    kind: str, model: nn.Module, args: argparse.Namespace, example: Tensor | None = None
) -> torch.optim.Optimizer:
    """SLBI or SGD with the hyper-parameters of ``args`` (SLBI's Z and momentum stored in
    ``--state-dtype``; with ``--target-macs``, coupled channel groups traced on
    ``example``); bad values give a RunError."""
    try:
        if kind == "sgd":
            return torch.optim.SGD(
                model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
            )
        coupled = getattr(args, "target_macs", None) is not None
        fill_mu_lam(args)
        return SLBI(
            param_groups(model, example) if coupled else slbi_param_groups(model, args.fc_penalty),
            lr=args.lr,
            kappa=args.kappa,
            mu=args.mu,
            lam=args.lam,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            state_dtype=STATE_DTYPES[args.state_dtype],
        )
    except (ValueError, TypeError) as exc:
        raise RunError(f"invalid hyper-parameter: {exc}") from exc


def build_schedulers(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace
) -> tuple[torch.optim.lr_scheduler.LRScheduler | None, torch.optim.lr_scheduler.LRScheduler | None]:
    """The per-step warm-up (LinearLR) and the per-epoch decay (StepLR), either ``None``
    when disabled. Both are chainable, so they compose when they overlap."""
    warmup = None
    if args.warmup_iters > 0:
        warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1.0 / args.warmup_iters, end_factor=1.0, total_iters=args.warmup_iters
        )
    decay = None
    if args.lr_step > 0:
        decay = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step, gamma=args.lr_gamma)
    return warmup, decay


def batches(
    x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled mini-batches of ``(x, y)``; the order comes from ``generator`` (CPU)."""
    order = torch.randperm(len(x), generator=generator).to(x.device)
    for start in range(0, len(x), batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in eval mode (train mode restored)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, len(x), EVAL_BATCH_SIZE):
        logits = model(x[start : start + EVAL_BATCH_SIZE])
        correct += (logits.argmax(dim=1) == y[start : start + EVAL_BATCH_SIZE]).sum()
    model.train(was_training)
    return int(correct) / len(x)


def filter_norms(weight: Tensor) -> Tensor:
    """‖W_g‖₂ of every output filter, float32 on the CPU."""
    return functional.group_norms_of(weight.detach()).cpu()


@dataclass
class EpochLoop:
    """The training loop's state across epochs: schedulers, data order and step count."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    warmup: torch.optim.lr_scheduler.LRScheduler | None
    generator: torch.Generator
    args: argparse.Namespace
    steps_done: int = 0
    target: MacTarget | None = None  # --target-macs: steps after every optimizer step

    def train_epoch(self, data: Data, label: str) -> tuple[float, float]:
        """One pass over the training set with a progress bar; the mean train loss and
        accuracy. SLBI writes its record every ``--record-interval`` steps."""
        args, model, optimizer = self.args, self.model, self.optimizer
        slbi = optimizer if isinstance(optimizer, SLBI) else None
        model.train()
        device = data.train_x.device
        total_loss = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        steps = math.ceil(len(data.train_x) / args.batch_size)
        with tqdm(total=steps, desc=label, unit="batch", leave=False, disable=None) as bar:
            for x, y in batches(data.train_x, data.train_y, args.batch_size, self.generator):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad()
                loss.backward()
                self.steps_done += 1
                if slbi is not None:
                    record = args.record_interval > 0 and self.steps_done % args.record_interval == 0
                    slbi.step(record=record, path=args.out if record else None)
                else:
                    optimizer.step()
                if self.target is not None:
                    self.target.step()
                if self.warmup is not None and self.steps_done <= args.warmup_iters:
                    self.warmup.step()
                total_loss += loss.detach() * len(y)
                correct += (logits.argmax(dim=1) == y).sum()
                bar.update()
                if self.steps_done % 25 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
        return float(total_loss) / len(data.train_x), int(correct) / len(data.train_x)


def train_run(
    kind: str, args: argparse.Namespace, data: Data, layer: str, metrics: list[dict[str, Any]]
) -> RunResult:
    """Train one optimizer (``"slbi"`` or ``"sgd"``) for ``--epochs`` epochs from the
    initial weights and data order of ``--seed``, evaluating after every epoch.

    Each epoch's row is appended to ``metrics`` (shared by the runs of one invocation) and
    ``metrics.csv`` is rewritten, so a long run can be followed while it trains. An SLBI
    run ends with the pruning sweep.
    """
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model = build_model(args.model).to(data.train_x.device)
    params = dict(model.named_parameters())
    conv_names = conv_weight_names(model)
    example = data.train_x[:TRACE_EXAMPLES]
    optimizer = build_optimizer(kind, model, args, example)
    slbi = optimizer if isinstance(optimizer, SLBI) else None
    warmup, decay = build_schedulers(optimizer, args)
    loop = EpochLoop(model, optimizer, warmup, torch.Generator().manual_seed(args.seed), args)
    if slbi is not None and getattr(args, "target_macs", None) is not None:
        loop.target = mac_target(model, slbi, example, args, len(data.train_x))

    norms = [filter_norms(params[layer])]  # SGD's path; SLBI's is kept by update_order
    if slbi is not None:
        slbi.update_order(0)  # the initial weights open the path (nothing is selected yet)
    rows: list[dict[str, Any]] = []
    sparsity: list[LayerSparsity] = []
    for epoch in range(1, args.epochs + 1):
        epoch_started = time.perf_counter()
        row = train_and_test(loop, kind, epoch, data)
        if slbi is not None:
            sparsity = slbi_readouts(slbi, model, epoch, data, conv_names, row)
        else:
            norms.append(filter_norms(params[layer]))
        row["seconds"] = time.perf_counter() - epoch_started
        if decay is not None:
            decay.step()
        rows.append(row)
        metrics.append(row)
        write_csv(args.out / "metrics.csv", metrics)
        tqdm.write(epoch_line(row, args.epochs))

    if loop.target is not None:
        tqdm.write(f"MacTarget: {int(loop.target.held().sum())} channels held out of the support, "
                   f"{loop.target.kept_macs():.2f} × MACs left")
    if slbi is None:
        path = FilterPath("SGD", list(range(args.epochs + 1)), torch.stack(norms))
        return RunResult(kind, rows, path, time.perf_counter() - started, model, optimizer)
    history = slbi.path_history(layer)
    path = FilterPath("SLBI", history["epochs"], history["norms"], history["selected"])
    prune_rows = prune_sweep(slbi, model, conv_names, layer, data, args.prune_bias)
    seconds = time.perf_counter() - started
    return RunResult(kind, rows, path, seconds, model, optimizer, sparsity, prune_rows)


def mac_target(
    model: nn.Module, slbi: SLBI, example: Tensor, args: argparse.Namespace, samples: int
) -> MacTarget:
    """``--target-macs``: the budget ramps down from 10 % to 50 % of the steps (a dense
    start, then half the run for the held channels to decay and the rest to adapt;
    benchmarks/RESULTS.md, "Half-MAC ResNet-20")."""
    total = args.epochs * math.ceil(samples / args.batch_size)
    return MacTarget(model, slbi, example, args.target_macs, start=total // 10, end=total // 2)


def train_and_test(loop: EpochLoop, kind: str, epoch: int, data: Data) -> dict[str, Any]:
    """Train epoch ``epoch`` (SLBI's ``current_epoch`` set first) and test the dense
    model: the epoch's row of ``metrics.csv`` so far. A non-finite loss is a RunError."""
    if isinstance(loop.optimizer, SLBI):
        loop.optimizer.current_epoch = epoch
    train_loss, train_acc = loop.train_epoch(data, f"{kind} epoch {epoch}/{loop.args.epochs}")
    if not math.isfinite(train_loss):
        raise RunError(f"{kind} diverged in epoch {epoch} (train loss {train_loss}); try a smaller --lr", 1)
    return {
        "optimizer": kind,
        "epoch": epoch,
        "lr": loop.optimizer.param_groups[0]["lr"],
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_acc": evaluate(loop.model, data.test_x, data.test_y),
    }


def slbi_readouts(
    slbi: SLBI, model: nn.Module, epoch: int, data: Data, conv_names: Sequence[str], row: dict[str, Any]
) -> list[LayerSparsity]:
    """After epoch ``epoch``: ``update_order(epoch)``, then into ``row`` the test accuracy
    of W* (``use_w_star()`` → evaluate → ``recover()``), the residue, the share of conv
    filters outside the support and the support share of every penalised layer. Returns
    the sparsity rows."""
    slbi.update_order(epoch)
    row["test_acc_w_star"] = w_star_accuracy(slbi, model, data)
    row["residue"] = slbi.residue()
    sparsity = slbi.sparsity()
    row["conv_filters_out"] = conv_filters_outside(sparsity, conv_names)
    row.update({f"support_{r.name}": r.fraction for r in sparsity})
    return sparsity


def w_star_accuracy(slbi: SLBI, model: nn.Module, data: Data) -> float:
    """Test accuracy of W* (``use_w_star()`` → evaluate → ``recover()``)."""
    slbi.use_w_star()
    accuracy = evaluate(model, data.test_x, data.test_y)
    slbi.recover()
    return accuracy


def zero_filters(weight: Tensor) -> int:
    """How many output filters (rows along dim 0) of ``weight`` are all zero."""
    return int((weight.detach().reshape(weight.shape[0], -1) == 0).all(dim=1).sum())


def conv_filters_outside(sparsity: Sequence[LayerSparsity], conv_names: Sequence[str]) -> float:
    """Share of all conv filters with Γ_g = 0."""
    rows = [row for row in sparsity if row.name in conv_names]
    total = sum(row.size for row in rows)
    return 1.0 - sum(row.support for row in rows) / total


def pruned_accuracy(
    optimizer: SLBI, model: nn.Module, layers: list[str], percent: float, data: Data, prune_bias: bool
) -> tuple[float, int]:
    """Test accuracy after ``prune_layer(percent, layers)``, and how many filters of
    ``layers`` are zero then; ``recover()`` gives the weights back before returning."""
    params = dict(model.named_parameters())
    optimizer.prune_layer(percent, layers, prune_bias=prune_bias)
    zeroed = sum(zero_filters(params[name]) for name in layers)
    accuracy = evaluate(model, data.test_x, data.test_y)
    optimizer.recover()
    return accuracy, zeroed


def prune_sweep(
    optimizer: SLBI, model: nn.Module, conv_names: list[str], layer: str, data: Data, prune_bias: bool
) -> list[dict[str, Any]]:
    """For each share of :data:`PRUNE_PERCENTS`: test accuracy after pruning that share of
    the filters of every conv layer by order (``test_acc``), and of ``layer`` alone
    (``test_acc_<layer>_only``), each followed by ``recover()``."""
    rows = []
    for percent in PRUNE_PERCENTS:
        every, every_zeroed = pruned_accuracy(optimizer, model, conv_names, percent, data, prune_bias)
        alone, alone_zeroed = pruned_accuracy(optimizer, model, [layer], percent, data, prune_bias)
        rows.append(
            {
                "percent": percent,
                "test_acc": every,
                "conv_filters_pruned": every_zeroed,
                f"test_acc_{layer}_only": alone,
                f"{layer}_filters_pruned": alone_zeroed,
            }
        )
    return rows
