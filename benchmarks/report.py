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

The targets of issue 5 are printed last, each with the measured value and PASS/FAIL;
they are reported, never asserted (the exit status is 0 unless the run itself breaks,
or ``--fail-on-target`` is given).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import harness as bh

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
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
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


def estimated_bytes(spec: bh.SetSpec, contenders: Sequence[bh.Contender]) -> int:
    """Rough peak memory of ``bench_set``: per contender W, g and up to 3 state copies."""
    stats = bh.set_stats(spec.shapes, spec.dtype)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the summary; returns the exit status."""
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    quick = args.quick
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    cuda = device.type == "cuda"
    rounds = args.rounds or (3 if quick else 15 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3 if cuda else 2)
    min_sample = args.min_sample if args.min_sample is not None else (
        0.002 if quick else 0.01 if cuda else 0.02)
    batch = args.train_batch or (8 if quick else 128)
    copy_bytes = args.copy_bytes or ((8 << 20) if quick else (1 << 30) if cuda else (256 << 20))
    scale = bh.QUICK_SCALE if quick else 1

    specs = [bh.named_set(s.strip(), scale) for s in args.sets.split(",") if s.strip()]
    sweep = args.sweep
    if sweep == "auto":
        sweep = "quick" if quick else ("gpu" if cuda else "cpu")
    if sweep != "none":
        grid = {"cpu": bh.CPU_SWEEP, "gpu": bh.GPU_SWEEP, "quick": bh.QUICK_SWEEP}[sweep]
        specs += bh.sweep_grid(**grid)
    names = [c.strip() for c in args.contenders.split(",")] if args.contenders else None
    contenders = bh.contenders_for(device, names)
    only = parse_only(args.only)
    default = bh.default_contender_name(device)
    if default not in {c.name for c in contenders}:
        default = next((c.name for c in contenders if c.family == bh.FAMILY_SLBI), default)

    started = time.time()
    root = Path(__file__).resolve().parent.parent
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(root),
        "device": str(device),
        "machine": machine_description(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "command": "python -m benchmarks.report " + " ".join(argv if argv is not None else sys.argv[1:]),
        "default_contender": default,
        "contenders": {c.name: c.description for c in contenders},
        "rounds": rounds, "warmup": warmup, "min_sample_s": min_sample,
        "hparams": {"slbi": bh.SLBI_HPARAMS, "sgd": bh.SGD_HPARAMS},
    }
    print(f"# slbi-triton benchmark  {meta['date']}  commit {meta['commit']}", flush=True)
    print(f"# {meta['device']}: {meta['machine']}; torch {meta['torch']}, triton {meta['triton']}",
          flush=True)
    copy_bw = bh.copy_bandwidth(device, copy_bytes)
    meta["copy_bandwidth_gbs"] = copy_bw / 1e9
    print(f"# copy bandwidth floor: {copy_bw / 1e9:.1f} GB/s ({copy_bytes >> 20} MiB copy_)", flush=True)
    print(f"# contenders: {', '.join(c.name for c in contenders)}; default SLBI: {default}", flush=True)
    if device.type == "cpu":
        # The C kernel's one-off build (the torch backend's "compile cost" on the CPU);
        # afterwards it is loaded from the disk cache, so the tables' 1st step omits it.
        meta["cpu_kernel_build_s"] = bh.cpu_kernel_build_seconds()
        built = meta["cpu_kernel_build_s"]
        print("# CPU kernel build (float32, empty cache): "
              + ("no C compiler" if built is None else f"{built:.2f}s"), flush=True)

    rows: list[bh.Row] = []
    train_rows: list[bh.TrainRow] = []

    def write_json(complete: bool) -> None:
        """(Re)write the JSON file: after every set, so a run cut short keeps its figures."""
        if args.json is None:
            return
        meta["complete"] = complete
        meta["elapsed_s"] = time.time() - started
        payload = {
            "meta": meta,
            "rows": [r.to_json() for r in rows],
            "train": [r.to_json() for r in train_rows],
            "targets": [{**t.__dict__, "verdict": t.verdict}
                        for t in bh.evaluate_targets(rows, device, default)],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_clean(payload), indent=1, default=str))

    for spec in specs:
        chosen = [c for c in contenders if c.name not in only or spec.label in only[c.name]]
        need, free = estimated_bytes(spec, chosen), available_bytes(device)
        if free is not None and need > 0.8 * free:
            print(f"# skip {spec.label}: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free",
                  flush=True)
            continue
        t0 = time.time()
        set_rows = bh.bench_set(spec, chosen, device, rounds=rounds, warmup=warmup,
                                min_sample_s=min_sample, copy_bw=copy_bw)
        rows += set_rows
        summary = ", ".join(
            f"{r.contender} {r.ratio_to_sgd:.2f}x" if r.ratio_to_sgd is not None else f"{r.contender} ERR"
            for r in set_rows
        )
        print(f"# {spec.label} ({time.time() - t0:.1f}s): {summary}", flush=True)
        write_json(complete=False)

    if not args.no_train:
        train_names = [c for c in contenders if c.family == bh.FAMILY_SGD or c.name == default]
        for model in TRAIN_MODELS:
            t0 = time.time()
            train_rows += bh.bench_train(model, train_names, device, batch=batch,
                                         rounds=rounds if cuda or quick else 3, warmup=warmup if cuda else 1,
                                         min_sample_s=min_sample if cuda else 0.0)
            print(f"# train {model} ({time.time() - t0:.1f}s)", flush=True)
            write_json(complete=False)

    targets = bh.evaluate_targets(rows, device, default)
    meta["elapsed_s"] = time.time() - started
    print()
    print(bh.step_table(rows))
    if train_rows:
        print()
        print(bh.train_table(train_rows))
    print()
    print(bh.target_table(targets))
    print(f"\n# {len(rows)} rows in {meta['elapsed_s']:.0f}s; ratios are medians measured side by side "
          "in this run", flush=True)
    write_json(complete=True)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        parts = [f"{meta['date']}, {meta['device']}: {meta['machine']}, torch {meta['torch']}, "
                 f"commit {meta['commit']}, copy floor {copy_bw / 1e9:.1f} GB/s", "",
                 bh.step_table(rows, markdown=True), ""]
        if train_rows:
            parts += [bh.train_table(train_rows, markdown=True), ""]
        parts += [bh.target_table(targets, markdown=True), ""]
        args.markdown.write_text("\n".join(parts))
    if args.fail_on_target and any(t.passed is False for t in targets):
        return 1
    return 0


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
