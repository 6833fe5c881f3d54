"""The short summary printed last by ``benchmarks/gpu_check.sh``, from the JSON files it wrote.

    python -m benchmarks.gpu_summary OUT_DIR [--stages "env:0:5,parity:0:21,..."] [--elapsed 200]

Per set it prints the default SLBI (and ``SLBI(state_dtype=torch.bfloat16)``) next to
``SGD(fused=True)``: each one's step time, the floor that the bytes a step must move imply at
the measured copy bandwidth, and the step as a percentage of that floor; then the
ahead-of-time compile table of the kernel (``benchmarks.gpu_static``: static figures, read
from the compiled code, not measured).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PYTEST_VERDICT = re.compile(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped)[^\n]*)$", re.MULTILINE)
KEY_SETS = ("lenet5", "resnet20", "resnet18", "resnet50", "resnet50@bfloat16", "vit_b16")


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _num(value: Any, fmt: str, scale: float = 1.0) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return format(value * scale, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip()] + [fmt.format(*r).rstrip() for r in rows]


def _header(out: Path, stages: str, elapsed: int | None) -> list[str]:
    env = _load(out / "env.json") or {}
    lines = [
        f"== slbi-triton GPU check {env.get('date', '?')}: {env.get('gpu', env.get('device', '?'))}; "
        f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}; commit {env.get('commit', '?')}, "
        f"source {env.get('source_sha256', '?')}"
    ]
    if stages:
        parts = [s.split(":") for s in stages.strip(",").split(",") if s]
        lines.append("stages: " + " | ".join(f"{p[0]} rc={p[1]} {p[2]}s" for p in parts if len(p) == 3)
                     + (f" | total {elapsed}s" if elapsed is not None else ""))
    return lines


def _checks(out: Path) -> list[str]:
    """Parity, pytest, CUDA graph and torch.compile verdicts."""
    lines = []
    parity = (_load(out / "parity.json") or {}).get("parity")
    if parity:
        checks = parity.get("checks", [])
        failed = [c for c in checks if c.get("ok") is False]
        shown = "; ".join(f"{c['check']} = {c['value']:.3g} > {c['bound']:g}" for c in failed[:6])
        lines.append(f"parity: {len(checks) - len(failed)}/{len(checks)} checks ok"
                     + (f"; FAILED: {shown}" if failed else ""))
    else:
        lines.append("parity: no result")
    pytest_log = out / "pytest.log"
    if pytest_log.exists():
        text = pytest_log.read_text()
        verdicts = PYTEST_VERDICT.findall(text)
        if "skipped, pytest is not installed" in text:
            verdict = "not installed on this machine"
        elif verdicts:
            verdict = verdicts[-1].strip("= ")
        else:
            verdict = "no summary line (timed out or crashed; see pytest.log)"
        lines.append(f"pytest: {verdict}")
    graph = _load(out / "graph.json") or {}
    for check, label in (("graph", "cuda graph"), ("compile", "torch.compile")):
        lines.append(f"{label}: {_check_status(graph.get(check))}")
    return lines


def _check_status(result: dict[str, Any] | None) -> str:
    if result is None:
        return "no result (not run, or the stage was cut short)"
    if result.get("ok") is None:
        return str(result.get("skipped", "not run"))
    if not result.get("ok"):
        return "FAIL " + str(result.get("error", result))[:300]
    status = "ok"
    if "replay_s" in result:
        status += (f" (replay {_num(result['replay_s'], '.1f', 1e6)}us vs eager "
                   f"{_num(result.get('eager_s'), '.1f', 1e6)}us per step)")
    if "first_call_s" in result:
        status += f" (first call {_num(result['first_call_s'], '.1f')}s)"
    return status


def _set_order(rows: list[dict[str, Any]]) -> list[str]:
    sets = [s for s in KEY_SETS if any(r["set"] == s for r in rows)]
    return sets + list(dict.fromkeys(r["set"] for r in rows if r["set"].startswith("sweep/")))


def _bench_lines(bench: dict[str, Any]) -> list[str]:
    """Per set: each key contender vs fused SGD and as a share of the floor."""
    meta = bench.get("meta", {})
    default = meta.get("default_contender", "slbi-triton")
    partial = "" if meta.get("complete", True) else " (PARTIAL: the bench stage was cut short)"
    lines = [f"copy floor {_num(meta.get('copy_bandwidth_gbs'), '.0f')} GB/s; default SLBI contender "
             f"{default}; bench {_num(meta.get('elapsed_s'), '.0f')}s{partial}"]
    rows = bench.get("rows", [])
    by_key = {(r["set"], r["contender"]): r for r in rows}
    table = []
    for set_label in _set_order(rows):
        for contender in dict.fromkeys((default, "slbi-bf16", "sgd-fused", "slbi-torch", "paper")):
            row = by_key.get((set_label, contender))
            # slbi-torch on the GPU (eager ops): shown for the sets the check runs it on.
            torch_shown = set_label.startswith(("lenet5", "resnet50"))
            if row is None or (contender == "slbi-torch" != default and not torch_shown):
                continue
            if row.get("error") and not isinstance(row.get("median_s"), (int, float)):
                table.append([set_label, contender, "ERROR", str(row["error"])[:40]] + [""] * 7)
                continue
            table.append([
                set_label, contender, _num(row.get("ratio_to_fused"), ".2f"),
                _num(row.get("median_s"), ".1f", 1e6), _num(row.get("floor_s"), ".1f", 1e6),
                _num(row.get("floor_share"), ".0f", 100.0), _num(row.get("step_bytes"), ".1f", 1e-6),
                _num(row.get("first_step_s"), ".2f"), _num(row.get("second_step_s"), ".2f"),
                str(row.get("dispatches") if row.get("dispatches") is not None else "-"),
                _num(row.get("peak_extra_bytes"), ".2f", 2.0**-20),
            ])
    lines += _table(("set", "contender", "x fused SGD", "median us", "floor us", "% floor", "MB/step",
                     "1st s", "2nd s", "launches", "peak MiB"), table)
    train = bench.get("train", [])
    if train:
        lines.append("train (overhead vs fastest SGD): " + "; ".join(
            f"{t['model']} {t['contender']} {_num(t.get('overhead_pct'), '+.1f')}%"
            for t in train if t["contender"] in (default, "paper")))
    targets = bench.get("targets", [])
    if targets:
        lines += _table(("target", "measured", "required", "verdict"),
                        [[t["name"], t["measured"], t["threshold"], t["verdict"]] for t in targets])
    return lines


def _static_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    """The ahead-of-time compile table (benchmarks.gpu_static --json)."""
    if not rows:
        return ["static: no result"]
    failed = [r for r in rows if r.get("problems")]
    lines = [f"static (compiled, not measured): {len(rows) - len(failed)}/{len(rows)} variants ok"]
    table = [
        [r["arch"], r["variant"], str(r.get("regs", "-")), f"{r.get('stack', '-')} B/{r.get('spill', '-')}",
         f"{r.get('vector_accesses', 0)}/{r.get('accesses', 0)}", "; ".join(r.get("problems", [])) or "ok"]
        for r in rows
    ]
    return lines + _table(("arch", "variant", "regs", "stack/spill", "128-bit", "verdict"), table)


def summarize(out: Path, stages: str = "", elapsed: int | None = None) -> str:
    """The summary text for the files under ``out``."""
    lines = _header(out, stages, elapsed) + _checks(out)
    bench = _load(out / "bench.json")
    lines += _bench_lines(bench) if bench is not None else ["bench: no result"]
    lines += _static_lines(_load(out / "static.json"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--stages", default="")
    parser.add_argument("--elapsed", type=int, default=None)
    args = parser.parse_args(argv)
    print(summarize(args.out, args.stages, args.elapsed), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
