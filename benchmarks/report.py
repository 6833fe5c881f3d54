"""Print the benchmark summary: step figures per (set, contender), training overhead, targets.

    python -m benchmarks.report                  # full sizes on this machine's default device
    python -m benchmarks.report --quick          # CI sizes, a few rounds (seconds)
    python -m benchmarks.report --device cuda --json out.json --markdown out.md

Every contender runs side by side in one process (see ``benchmarks.harness`` for what is
measured and how). On the CPU the run uses one torch thread unless ``--threads`` says
otherwise: on a small machine shared with other work, OpenMP threads that wait at a
barrier for a descheduled sibling turn microsecond steps into tens of milliseconds
(``SGD(fused=True)`` was measured at 78 ms for 10 tensors of 1K elements on 2 busy cores),
which measures the neighbours, not the optimizers. The training iterations compare SLBI
with the SGD variants (the paper baseline is in the step table).

After the step table comes the bandwidth model (``benchmarks.accounting``): per set, the
bytes a step of the default SLBI, of ``SLBI(state_dtype=torch.bfloat16)`` and of
``SGD(fused=True)`` must move, the floor time that implies at the measured copy bandwidth,
and the measured step as a percentage of that floor. The targets (``benchmarks.targets``)
come last, each with the measured value and PASS/FAIL; they are reported, never asserted
(the exit status is 0 unless the run itself breaks, or ``--fail-on-target`` is given).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from slbi_triton.kernels import cpu_step, cpu_tune

from benchmarks.accounting import set_stats
from benchmarks.contenders import (
    FAMILY_SGD,
    FAMILY_SLBI,
    SGD_HPARAMS,
    SLBI_HPARAMS,
    Contender,
    contenders_for,
    default_contender_name,
)
from benchmarks.harness import Row, TrainRow, bench_set, bench_train
from benchmarks.param_sets import (
    CPU_SWEEP,
    GPU_SWEEP,
    QUICK_SCALE,
    QUICK_SWEEP,
    SetSpec,
    named_set,
    sweep_grid,
)
from benchmarks.tables import floor_table, step_table, target_table, train_table
from benchmarks.targets import Target, evaluate_targets
from benchmarks.timing import copy_bandwidth, cpu_kernel_build_seconds

ALL_SETS = ("lenet5", "resnet20", "resnet18", "resnet50", "vit_b16")
TRAIN_MODELS = ("lenet", "resnet20")


def git_commit(root: Path) -> str:
    """``git rev-parse --short HEAD`` (+ ``-dirty``), else ``$SLBI_COMMIT`` or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
            text=True, check=True, timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SLBI_COMMIT", "unknown")


def machine_description(device: torch.device) -> str:
    """CPU model and thread count, or the GPU name."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    model = platform.processor() or "cpu"
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name", model)
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']} model {fields['model']})"
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (``MemAvailable`` on the CPU), None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def estimated_bytes(spec: SetSpec, contenders: Sequence[Contender]) -> int:
    """Rough peak memory of ``bench_set``: per contender W, g and up to 3 state copies."""
    stats = set_stats(spec.shapes, spec.dtype)
    return stats.param_bytes * 5 * len(contenders) + stats.param_bytes * 2


def parse_only(values: Sequence[str]) -> dict[str, set[str]]:
    """``["slbi-torch=resnet50+lenet5"]`` → ``{"slbi-torch": {"resnet50", "lenet5"}}``."""
    only: dict[str, set[str]] = {}
    for value in values:
        name, sep, sets = value.partition("=")
        if not sep or not sets:
            raise SystemExit(f"--only expects CONTENDER=SET[+SET...], got {value!r}")
        only.setdefault(name, set()).update(s for s in sets.split("+") if s)
    return only


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="CI sizes (QUICK_SCALE), few rounds")
    parser.add_argument("--sets", default=",".join(ALL_SETS),
                        help="comma-separated sets, NAME or NAME@DTYPE (default: all five)")
    parser.add_argument("--sweep", choices=("auto", "cpu", "gpu", "quick", "none"), default="auto",
                        help="tensor count x size sweep grid (auto: by device and --quick)")
    parser.add_argument("--contenders", default=None,
                        help="comma-separated contenders (default: all available)")
    parser.add_argument("--only", action="append", default=[],
                        help="restrict a contender to some sets: CONTENDER=SET[+SET...] (repeatable)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds (default 5; quick 3; cuda 15)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up rounds (default 2; cuda 3; quick 1)")
    parser.add_argument("--min-sample", type=float, default=None,
                        help="seconds per sample; fast steps repeat (default 0.02; cuda 0.01; quick 0.002)")
    parser.add_argument("--no-train", action="store_true", help="skip the end-to-end training iterations")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (default 128; quick 8)")
    parser.add_argument("--copy-bytes", type=int, default=None, help="bytes per copy for the bandwidth floor")
    parser.add_argument("--json", type=Path, default=None, help="write all figures as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables as Markdown here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads: CPU default 1 (see the module docstring); 0 keeps torch's "
                             "default; CUDA runs leave the setting alone unless given")
    parser.add_argument("--fail-on-target", action="store_true", help="exit 1 when a target FAILs")
    return parser


@dataclass
class Settings:
    """How this run measures (from the command line and the device)."""

    device: torch.device
    quick: bool
    rounds: int
    warmup: int
    min_sample_s: float
    train_batch: int
    copy_bytes: int


def settings_from(args: argparse.Namespace) -> Settings:
    """Defaults by device and ``--quick``; sets torch's thread count."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    quick, cuda = args.quick, device.type == "cuda"
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    return Settings(
        device=device, quick=quick,
        rounds=args.rounds or (3 if quick else 15 if cuda else 5),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 3 if cuda else 2),
        min_sample_s=args.min_sample if args.min_sample is not None else (
            0.002 if quick else 0.01 if cuda else 0.02),
        train_batch=args.train_batch or (8 if quick else 128),
        copy_bytes=args.copy_bytes or ((8 << 20) if quick else (1 << 30) if cuda else (256 << 20)),
    )


def specs_from(args: argparse.Namespace, settings: Settings) -> list[SetSpec]:
    """The named sets, then the sweep grid."""
    scale = QUICK_SCALE if settings.quick else 1
    specs = [named_set(s.strip(), scale) for s in args.sets.split(",") if s.strip()]
    sweep = args.sweep
    if sweep == "auto":
        sweep = "quick" if settings.quick else ("gpu" if settings.device.type == "cuda" else "cpu")
    if sweep != "none":
        specs += sweep_grid(**{"cpu": CPU_SWEEP, "gpu": GPU_SWEEP, "quick": QUICK_SWEEP}[sweep])
    return specs


def run_meta(argv: Sequence[str] | None, settings: Settings, contenders: Sequence[Contender],
             default: str) -> dict[str, Any]:
    """What the JSON and Markdown record about the run."""
    root = Path(__file__).resolve().parent.parent
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(root),
        "device": str(settings.device),
        "machine": machine_description(settings.device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "command": "python -m benchmarks.report " + " ".join(argv if argv is not None else sys.argv[1:]),
        "default_contender": default,
        "contenders": {c.name: c.description for c in contenders},
        "rounds": settings.rounds, "warmup": settings.warmup, "min_sample_s": settings.min_sample_s,
        "hparams": {"slbi": SLBI_HPARAMS, "sgd": SGD_HPARAMS},
    }


class Run:
    """The rows of one report run, rewritten to JSON after every set (a run cut short
    keeps its figures)."""

    def __init__(self, meta: dict[str, Any], json_path: Path | None, default: str, device: torch.device):
        self.meta, self.json_path, self.default, self.device = meta, json_path, default, device
        self.rows: list[Row] = []
        self.train_rows: list[TrainRow] = []
        self.started = time.time()

    def targets(self) -> list[Target]:
        return evaluate_targets(self.rows, self.device, self.default)

    def write_json(self, complete: bool) -> None:
        if self.json_path is None:
            return
        self.meta["complete"] = complete
        self.meta["elapsed_s"] = time.time() - self.started
        payload = {
            "meta": self.meta,
            "rows": [r.to_json() for r in self.rows],
            "train": [r.to_json() for r in self.train_rows],
            "targets": [{**t.__dict__, "verdict": t.verdict} for t in self.targets()],
        }
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(_clean(payload), indent=1, default=str))


def bench_sets(run: Run, specs: Sequence[SetSpec], contenders: Sequence[Contender], only: dict[str, set[str]],
               settings: Settings, copy_bw: float) -> None:
    """Every set, skipping those that would not fit in memory."""
    for spec in specs:
        chosen = [c for c in contenders if c.name not in only or spec.label in only[c.name]]
        need, free = estimated_bytes(spec, chosen), available_bytes(settings.device)
        if free is not None and need > 0.8 * free:
            print(f"# skip {spec.label}: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free",
                  flush=True)
            continue
        t0 = time.time()
        set_rows = bench_set(spec, chosen, settings.device, rounds=settings.rounds, warmup=settings.warmup,
                             min_sample_s=settings.min_sample_s, copy_bw=copy_bw)
        run.rows += set_rows
        summary = ", ".join(
            f"{r.contender} {r.ratio_to_sgd:.2f}x" if r.ratio_to_sgd is not None else f"{r.contender} ERR"
            for r in set_rows
        )
        print(f"# {spec.label} ({time.time() - t0:.1f}s): {summary}", flush=True)
        run.write_json(complete=False)


def bench_training(run: Run, contenders: Sequence[Contender], settings: Settings) -> None:
    """The training iterations: the SGD variants and the default SLBI."""
    cuda = settings.device.type == "cuda"
    chosen = [c for c in contenders if c.family == FAMILY_SGD or c.name == run.default]
    for model in TRAIN_MODELS:
        t0 = time.time()
        run.train_rows += bench_train(
            model, chosen, settings.device, batch=settings.train_batch,
            rounds=settings.rounds if cuda or settings.quick else 3, warmup=settings.warmup if cuda else 1,
            min_sample_s=settings.min_sample_s if cuda else 0.0,
        )
        print(f"# train {model} ({time.time() - t0:.1f}s)", flush=True)
        run.write_json(complete=False)


def tables_text(run: Run, markdown: bool = False) -> str:
    """The step table, the floor model, the training table and the targets."""
    floor = (run.default, "slbi-bf16", "sgd-fused")
    parts = [step_table(run.rows, markdown), "",
             f"bandwidth floor at the copy bandwidth ({run.meta['copy_bandwidth_gbs']:.1f} GB/s):",
             floor_table(run.rows, floor, markdown), ""]
    if run.train_rows:
        parts += [train_table(run.train_rows, markdown), ""]
    parts.append(target_table(run.targets(), markdown))
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the summary; returns the exit status."""
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    device = settings.device
    names = [c.strip() for c in args.contenders.split(",")] if args.contenders else None
    contenders = contenders_for(device, names)
    default = default_contender_name(device)
    if default not in {c.name for c in contenders}:
        default = next((c.name for c in contenders if c.family == FAMILY_SLBI), default)
    run = Run(run_meta(argv, settings, contenders, default), args.json, default, device)
    meta = run.meta
    say = functools.partial(print, flush=True)
    say(f"# slbi-triton benchmark  {meta['date']}  commit {meta['commit']}")
    say(f"# {meta['device']}: {meta['machine']}; torch {meta['torch']}, triton {meta['triton']}")
    copy_bw = copy_bandwidth(device, settings.copy_bytes)
    meta["copy_bandwidth_gbs"] = copy_bw / 1e9
    say(f"# copy bandwidth floor: {copy_bw / 1e9:.1f} GB/s ({settings.copy_bytes >> 20} MiB copy_)")
    say(f"# contenders: {', '.join(c.name for c in contenders)}; default SLBI: {default}")
    if device.type == "cpu":
        # The C kernel's one-off build; afterwards it loads from the disk cache, so the
        # tables' first step omits it.
        built = meta["cpu_kernel_build_s"] = cpu_kernel_build_seconds()
        say("# CPU kernel build (float32, one variant, empty cache): "
            + ("no C compiler" if built is None else f"{built:.2f}s"))
        # The variants the C kernel runs here (autotuned on first use, before any timing).
        meta["cpu"] = cpu_tune.describe()
        meta["cpu_variants"] = {str(state): cpu_step.variant(torch.float32, state)
                                for state in (torch.float32, torch.bfloat16)}
        say(f"# CPU: {meta['cpu']}; {_variants_text(meta)}")
    bench_sets(run, specs_from(args, settings), contenders, parse_only(args.only), settings, copy_bw)
    if not args.no_train:
        bench_training(run, contenders, settings)
    print()
    print(tables_text(run))
    print(f"\n# {len(run.rows)} rows in {time.time() - run.started:.0f}s; ratios are medians measured "
          "side by side in this run", flush=True)
    run.write_json(complete=True)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        head = (f"{meta['date']}, {meta['device']}: {meta['machine']}, torch {meta['torch']}, "
                f"commit {meta['commit']}, copy floor {copy_bw / 1e9:.1f} GB/s")
        if "cpu" in meta:
            head += f"\n\nCPU: {meta['cpu']}; {_variants_text(meta)}"
        args.markdown.write_text(head + "\n\n" + tables_text(run, markdown=True) + "\n")
    return 1 if args.fail_on_target and any(t.passed is False for t in run.targets()) else 0


def _variants_text(meta: dict[str, Any]) -> str:
    """``C kernel variants: float32 state v256-nopf, bfloat16 state ...``"""
    chosen = [f"{state.removeprefix('torch.')} state {name or 'none (no C kernel)'}"
              for state, name in meta["cpu_variants"].items()]
    return "C kernel variants: " + ", ".join(chosen)


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "absent"
    return str(triton.__version__)


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


if __name__ == "__main__":
    raise SystemExit(main())
