"""Half-MAC ResNet-20 side by side: SLBI with coupled channel groups against Torch-Pruning.

    python -m benchmarks.pruning                    # the full table (~25-40 min on 2 cores)
    python -m benchmarks.pruning --quick            # tiny sizes, a smoke test (seconds)
    python -m benchmarks.pruning --markdown out.md --json out.json

Every arm starts from the same initial weights and sees the same data in the same order
(ResNet-20 on the first ``--train-size`` Fashion-MNIST training images, batch 128, lr 0.1
after a linear warm-up, momentum 0.9, ``--epochs`` epochs), is cut to about ``--target-macs``
of the dense model's MACs, then fine-tuned for one epoch (SGD, lr ``--finetune-lr``):

- ``SGD, dense``: no pruning (the fine-tune epoch is one more epoch of training);
- ``Torch-Pruning MagnitudePruner``: the SGD model, pruned by filter L2 norm;
- ``Torch-Pruning GroupNormPruner``: group-sparse training (``reg``) then pruning;
- ``SLBI, coupled groups + MacTarget``: ``SLBI(param_groups(model, x))`` (one group per
  removable channel, BatchNorm's γ and β its members) with :class:`slbi_triton.MacTarget`:
  from ``--ramp-start`` to ``--ramp-end`` of the steps, the channels with the smallest
  ‖Z_G‖ are held out of the support until the budget is met, and decay; then
  :func:`slbi_triton.prune_to` cuts them (the slim network).

Torch-Pruning needs the package's option-A shortcut pruner for this model
(:class:`slbi_triton.slimming.RouterPruner`); the pruning ratio of its arms is searched
so that their MACs match the target. MACs and parameters are Torch-Pruning's counter.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
import torch_pruning as tp
from torch import Tensor, nn

from benchmarks.report import machine_description
from slbi_triton import SLBI, MacTarget, param_groups, prune_to
from slbi_triton.slimming import RouterPruner, couple_routers
from slbi_triton.train.data import load_dataset, subset
from slbi_triton.train.models import ResNet20, ShortcutA


@dataclass
class Arm:
    """One row of the table."""

    name: str
    macs: float  # share of the dense model's MACs
    params: int
    trained: float  # test accuracy (%) of the trained model, before the cut
    after_pruning: float | None  # test accuracy (%) right after the cut
    recalibrated: float | None  # right after the cut, BatchNorm statistics re-estimated
    after_finetune: float  # test accuracy (%) after the fine-tune epoch
    seconds: float


class Bench:
    """Data, the shared initial weights and the training primitives of every arm."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        train, test = load_dataset(args.dataset, args.data_dir)
        self.train = subset(train, args.train_size)
        self.test = subset(test, args.test_size)
        torch.manual_seed(args.seed)
        self.initial = ResNet20().state_dict()
        self.example = self.train.tensors[0][:16]
        self.steps_per_epoch = math.ceil(args.train_size / args.batch_size)
        self.total_steps = self.steps_per_epoch * args.epochs
        dense = self.fresh()
        self.dense_macs, self.dense_params = tp.utils.count_ops_and_params(dense, self.example[:1])

    def fresh(self) -> nn.Module:
        model = ResNet20()
        model.load_state_dict(self.initial)
        return model

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The same order for every arm: a permutation seeded by (seed, epoch)."""
        generator = torch.Generator().manual_seed(self.args.seed * 1000 + epoch)
        order = torch.randperm(len(self.train), generator=generator)
        images, labels = self.train.tensors
        for start in range(0, len(order), self.args.batch_size):
            index = order[start : start + self.args.batch_size]
            yield images[index], labels[index]

    def train_epochs(
        self, model: nn.Module, opt: torch.optim.Optimizer, after_backward: Callable[[], None] | None = None,
        after_step: Callable[[], None] | None = None,
    ) -> None:
        """``--epochs`` epochs at lr ``--lr`` after a linear warm-up of ``--warmup`` steps."""
        step = 0
        model.train()
        for epoch in range(self.args.epochs):
            for images, labels in self.batches(epoch):
                step += 1
                for group in opt.param_groups:
                    group["lr"] = self.args.lr * min(1.0, step / self.args.warmup)
                opt.zero_grad()
                F.cross_entropy(model(images), labels).backward()
                if after_backward is not None:
                    after_backward()
                opt.step()
                if after_step is not None:
                    after_step()

    def finetune(self, model: nn.Module) -> None:
        """One epoch of SGD at ``--finetune-lr`` (the data of epoch ``--epochs``)."""
        opt = torch.optim.SGD(model.parameters(), lr=self.args.finetune_lr, momentum=0.9)
        model.train()
        for images, labels in self.batches(self.args.epochs):
            opt.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            opt.step()

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        model.eval()
        images, labels = self.test.tensors
        correct = sum(
            int((model(images[i : i + 1000]).argmax(1) == labels[i : i + 1000]).sum())
            for i in range(0, len(images), 1000)
        )
        model.train()
        return 100.0 * correct / len(images)

    @torch.no_grad()
    def recalibrated_accuracy(self, model: nn.Module) -> float:
        """Test accuracy with BatchNorm's running statistics re-estimated on
        ``--recalibrate`` training batches (no weight changes; on a copy)."""
        model = copy.deepcopy(model)
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)):
                module.reset_running_stats()
                module.momentum = None  # a plain average over the batches
        model.train()
        for _, (images, _labels) in zip(range(self.args.recalibrate), self.batches(0), strict=False):
            model(images)
        return self.accuracy(model)

    def size(self, model: nn.Module) -> tuple[float, int]:
        macs, params = tp.utils.count_ops_and_params(model, self.example[:1])
        return macs / self.dense_macs, int(params)

    def arm(self, name: str, model: nn.Module, trained: float, pruned: bool, seconds: float) -> Arm:
        """The row of ``model`` (cut, if ``pruned``) after the fine-tune epoch; ``trained``:
        the accuracy before the cut; ``seconds`` spent before the fine-tune."""
        macs, params = self.size(model)
        after = self.accuracy(model) if pruned else None
        recalibrated = self.recalibrated_accuracy(model) if pruned else None
        started = time.perf_counter()
        self.finetune(model)
        seconds += time.perf_counter() - started
        return Arm(name, macs, params, trained, after, recalibrated, self.accuracy(model), seconds)


def tp_pruner(kind: str, model: nn.Module, bench: Bench, ratio: float, **kwargs: Any) -> Any:
    """A Torch-Pruning pruner over ``model`` that knows the option-A shortcut."""
    routers = RouterPruner()
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    pruner_class = tp.pruner.MagnitudePruner if kind == "magnitude" else tp.pruner.GroupNormPruner
    pruner = pruner_class(
        model, bench.example[:1], importance=importance, pruning_ratio=ratio,
        ignored_layers=[model.fc], customized_pruners={ShortcutA: routers}, **kwargs,
    )
    couple_routers(pruner.DG, routers)
    return pruner


def prune_tp_to_target(kind: str, model: nn.Module, bench: Bench, **kwargs: Any) -> nn.Module:
    """Prune ``model`` in place with the ratio whose MACs come closest to the target from
    below (bisection over copies)."""
    low, high = 0.0, 0.95
    for _ in range(10):
        middle = (low + high) / 2
        trial = copy.deepcopy(model)
        tp_pruner(kind, trial, bench, middle, **kwargs).step()
        if bench.size(trial)[0] > bench.args.target_macs:
            low = middle
        else:
            high = middle
    tp_pruner(kind, model, bench, high, **kwargs).step()
    return model


def run_sgd_arms(bench: Bench) -> list[Arm]:
    """The dense SGD model, and Torch-Pruning's magnitude pruning of it."""
    started = time.perf_counter()
    model = bench.fresh()
    opt = torch.optim.SGD(model.parameters(), lr=bench.args.lr, momentum=0.9)
    bench.train_epochs(model, opt)
    seconds = time.perf_counter() - started
    trained = bench.accuracy(model)
    pruned = prune_tp_to_target("magnitude", copy.deepcopy(model), bench)
    magnitude = bench.arm("Torch-Pruning MagnitudePruner (SGD weights)", pruned, trained, True,
                          time.perf_counter() - started)
    return [bench.arm("SGD, dense (+1 epoch)", model, trained, False, seconds), magnitude]


def run_group_norm_arm(bench: Bench) -> Arm:
    started = time.perf_counter()
    model = bench.fresh()
    opt = torch.optim.SGD(model.parameters(), lr=bench.args.lr, momentum=0.9)
    regulariser = tp_pruner("group_norm", model, bench, 0.5, reg=bench.args.tp_reg)
    bench.train_epochs(model, opt, after_backward=lambda: regulariser.regularize(model))
    trained = bench.accuracy(model)
    prune_tp_to_target("group_norm", model, bench, reg=bench.args.tp_reg)
    return bench.arm(f"Torch-Pruning GroupNormPruner (reg {bench.args.tp_reg:g})", model, trained, True,
                     time.perf_counter() - started)


def run_slbi_arm(bench: Bench) -> Arm:
    started = time.perf_counter()
    model = bench.fresh()
    args = bench.args
    groups = param_groups(model, bench.example, lam=args.lam)
    opt = SLBI(groups, lr=args.lr, kappa=args.kappa, mu=args.mu, momentum=0.9)
    start, end = (round(share * bench.total_steps) for share in (args.ramp_start, args.ramp_end))
    target = MacTarget(model, opt, bench.example, args.target_macs, start=start, end=end)
    bench.train_epochs(model, opt, after_step=target.step)
    trained = bench.accuracy(model)
    slim = prune_to(model, opt, bench.example, macs=args.target_macs).model
    name = (f"SLBI, coupled groups (κ {args.kappa:g}, μ {args.mu:g}, λ {args.lam:g}) + MacTarget "
            f"({args.ramp_start:g}-{args.ramp_end:g} of the steps) + prune_to")
    return bench.arm(name, slim, trained, True, time.perf_counter() - started)


def markdown(arms: list[Arm], bench: Bench) -> str:
    args = bench.args
    lines = [
        f"ResNet-20, {args.dataset} (first {args.train_size} training images, {args.test_size} test), "
        f"{args.epochs} epochs + 1 fine-tune epoch, target {args.target_macs:g} × MACs; "
        f"dense: {bench.dense_macs / 1e6:.1f} M MACs, {bench.dense_params:,} parameters; "
        f"CPU: {machine_description(torch.device('cpu'))}, torch {torch.__version__}",
        "",
        "| arm | MACs | params | trained, before the cut | right after the cut | same, BN statistics "
        f"re-estimated ({args.recalibrate} batches) | after the fine-tune epoch | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def percent(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f} %"

    for arm in arms:
        lines.append(
            f"| {arm.name} | {arm.macs:.2f} | {arm.params:,} | {percent(arm.trained)} | "
            f"{percent(arm.after_pruning)} | {percent(arm.recalibrated)} | {percent(arm.after_finetune)} | "
            f"{arm.seconds / 60:.1f} min |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=30000)
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--mu", type=float, default=2.0)
    parser.add_argument("--lam", type=float, default=0.05)
    parser.add_argument("--kappa", type=float, default=1.0)
    parser.add_argument("--ramp-start", type=float, default=0.1, help="MacTarget's start, share of the steps")
    parser.add_argument("--ramp-end", type=float, default=0.5, help="MacTarget's end, share of the steps")
    parser.add_argument("--tp-reg", type=float, default=5e-4)
    parser.add_argument("--recalibrate", type=int, default=20, help="batches re-estimating BN statistics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist"])
    parser.add_argument("--arms", default="sgd,group_norm,slbi")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.train_size, args.test_size, args.warmup, args.recalibrate = 1, 256, 500, 2, 2
        args.batch_size = 64
    return args


def main(argv: list[str] | None = None) -> list[Arm]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    print(f"CPU: {machine_description(torch.device('cpu'))}; torch {torch.__version__}", flush=True)
    arms: list[Arm] = []
    runners = {"sgd": run_sgd_arms, "group_norm": run_group_norm_arm, "slbi": run_slbi_arm}
    for key in args.arms.split(","):
        result = runners[key](bench)
        for arm in result if isinstance(result, list) else [result]:
            print(json.dumps(asdict(arm)), flush=True)
            arms.append(arm)
    table = markdown(arms, bench)
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as out:
            out.write(table + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump([asdict(arm) for arm in arms], out, indent=1)
    return arms


if __name__ == "__main__":
    main()
