"""Device checks for the GPU run: kernel parity, CUDA-graph capture, torch.compile.

    python -m benchmarks.cuda_parity --device cuda --json parity.json
    python -m benchmarks.cuda_parity --device cuda --checks graph,compile --json graph.json
    python -m benchmarks.cuda_parity --device cpu --quick         # the same logic on the CPU

**parity**: ``SLBI(backend="triton")`` and ``SLBI(backend="torch")`` on device tensors, in
float32, bfloat16 and float16 buckets, against the paper-style baseline run in float64 on
the same device (``benchmarks.paper_slbi.PaperSLBI``, itself tested against an
independent float64 reference), through the public API only: three param groups (auto
penalty with momentum; l1 on every tensor, with dampening and weight decay; penalty
"none" without momentum), odd sizes, a channels_last conv weight, gradients assigned as
``p.grad`` each step. Checked: W, Z and the momentum buffer against float64 (relative
error), Triton against the torch backend (relative error, and ulps after one step), two
Triton runs bit-identical, and that the run reaches the interesting regime (part of each
penalised tensor in the support Γ ≠ 0). On the CPU the Triton kernel runs only under
``TRITON_INTERPRET=1``; the interpreter rounds float32 → bfloat16 by truncation, so the
tight bfloat16 Triton-vs-torch bounds are only checked on CUDA.

**graph**: capture ``opt.step()`` in a ``torch.cuda.CUDAGraph`` after warm-up steps on a side
stream, replay it, and compare with an eager twin step for step (bit-identical expected).
A capture failure is reported with its error, not raised.

**compile**: ``torch.compile(step, fullgraph=True)`` around ``opt.step()``; compared with the
eager twin after three steps. Also reported, not raised.

Exit status: 0 when every executed check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.paper_slbi import PaperSLBI

HP_GROUPS: list[dict[str, Any]] = [
    {"penalty": "auto", "lr": 0.1, "kappa": 1.5, "mu": 0.5, "lam": 0.3, "momentum": 0.9,
     "dampening": 0.0, "weight_decay": 0.0},
    {"penalty": "l1", "lr": 0.05, "kappa": 1.0, "mu": 0.4, "lam": 0.2, "momentum": 0.8,
     "dampening": 0.2, "weight_decay": 1e-2},
    {"penalty": "none", "lr": 0.1, "kappa": 1.0, "mu": 1.0, "lam": 1.0, "momentum": 0.0,
     "dampening": 0.0, "weight_decay": 0.0},
]
"""Param groups of the parity case (the third has no Z and no momentum buffer)."""

# (shape, group, channels_last). Odd sizes: 1 element, ragged tails, tiny and long groups.
CASE_QUICK: list[tuple[tuple[int, ...], int, bool]] = [
    ((1,), 0, False), ((7,), 0, False), ((13, 17), 0, False), ((3, 1000), 0, False),
    ((7, 3, 5, 5), 0, False), ((5, 4, 2), 0, False), ((9, 600, 1, 1), 0, False), ((16, 8, 3, 3), 0, True),
    ((33,), 0, False), ((6, 5, 3, 3), 1, False), ((11, 13), 1, False), ((5, 5), 2, False), ((10,), 2, False),
]
CASE_FULL = [*CASE_QUICK, ((64, 3, 7, 7), 0, False), ((1000, 512), 0, False), ((256,), 0, False),
             ((128, 64, 3, 3), 1, False)]

STEPS = 6

# Relative-error bounds: vs float64, and Triton vs the torch backend (on CUDA).
TOL_REF = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 4e-3}
TOL_REF_INTERPRETED_BF16 = 4e-2  # the CPU interpreter truncates to bfloat16
TOL_PAIR = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
# Max difference after one step, in units in the last place of the dtype.
ULP_PAIR = {torch.float32: 2.0, torch.bfloat16: 1.0, torch.float16: 1.0}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 (absolute error when ``b`` is 0)."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    denom = float(b64.norm())
    return float((a64 - b64).norm()) / (denom if denom > 0 else 1.0)


def max_ulps(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest ``|a − b|`` in ulps of ``dtype`` at ``b``'s magnitude."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    info = torch.finfo(dtype)
    mag = b64.abs().clamp(min=info.tiny)
    ulp = torch.exp2(torch.floor(torch.log2(mag))) * info.eps
    return float(((a64 - b64).abs() / ulp).max()) if a64.numel() else 0.0


Case = Sequence[tuple[tuple[int, ...], int, bool]]


def make_case(case: Case, seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Float64 initial weights and per-step gradients, with per-row scales from 0.01 to 2
    so that the shrinkage threshold splits rows and filters."""
    gen = torch.Generator().manual_seed(seed)
    weights, grads = [], []
    for shape, _, _ in case:
        rows = torch.logspace(-2, 0.3, shape[0], dtype=torch.float64).reshape(-1, *[1] * (len(shape) - 1))
        weights.append(torch.randn(shape, generator=gen, dtype=torch.float64) * rows)
    for _ in range(STEPS):
        grads.append([0.5 * torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in weights])
    return weights, grads


def _to(x: torch.Tensor, device: torch.device, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    out = x.to(device=device, dtype=dtype, copy=True)
    if channels_last and out.dim() == 4:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def run_optimizer(kind: str, case: Case, weights: list[torch.Tensor], grads: list[list[torch.Tensor]],
                  device: torch.device, dtype: torch.dtype,
                  steps: int = STEPS) -> dict[str, list[torch.Tensor | None]]:
    """Run ``kind`` ("triton", "torch" or "reference") and return W, Z and v per tensor."""
    from slbi_triton import SLBI

    params = [nn.Parameter(_to(w, device, dtype, cl)) for w, (_, _, cl) in zip(weights, case, strict=True)]
    groups = []
    for index, hp in enumerate(HP_GROUPS):
        members = [p for p, (_, g, _) in zip(params, case, strict=True) if g == index]
        groups.append({"params": members, **hp})
    if kind == "reference":
        opt = PaperSLBI(groups, lr=0.1)
        z_key = "z_buffer"
    else:
        opt = SLBI(groups, backend=kind)
        z_key = "z"
    for step_grads in grads[:steps]:
        for p, g, (_, _, cl) in zip(params, step_grads, case, strict=True):
            p.grad = _to(g, device, dtype, cl)
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out: dict[str, list[torch.Tensor | None]] = {"w": [], "z": [], "v": []}
    for p in params:
        state = opt.state.get(p, {})
        out["w"].append(p.detach().clone())
        z = state.get(z_key)
        out["z"].append(None if z is None else z.detach().clone())
        v = state.get("momentum_buffer")
        out["v"].append(None if v is None else v.detach().clone())
    return out


def _worst(a: dict[str, list], b: dict[str, list], fn) -> dict[str, float]:
    worst: dict[str, float] = {}
    for key in ("w", "z", "v"):
        values = [fn(x, y) for x, y in zip(a[key], b[key], strict=True) if x is not None and y is not None]
        worst[key] = max(values) if values else 0.0
    return worst


def support_fractions(case: Case, reference: dict[str, list]) -> list[float]:
    """Fraction of each penalised tensor in the support of Γ = κ·prox(Z) at the end."""
    fractions = []
    for (shape, group, _), z in zip(case, reference["z"], strict=True):
        if z is None:
            continue
        lam = HP_GROUPS[group]["lam"]
        penalty = HP_GROUPS[group]["penalty"]
        if penalty == "auto":
            penalty = "group" if len(shape) >= 3 else "l1" if len(shape) == 2 else "none"
        z = z.double().cpu()
        selected = z.reshape(z.shape[0], -1).norm(dim=1) > lam if penalty == "group" else z.abs() > lam
        fractions.append(float(selected.double().mean()))
    return fractions


def check_parity(device: torch.device, quick: bool) -> dict[str, Any]:
    """The parity checks (module docstring); returns a JSON-able report with ``ok``."""
    case = CASE_QUICK if quick else CASE_FULL
    weights, grads = make_case(case)
    use_triton = device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    interpreted = device.type != "cuda"
    reference = run_optimizer("reference", case, weights, grads, device, torch.float64)
    fractions = support_fractions(case, reference)
    report: dict[str, Any] = {"device": str(device), "steps": STEPS, "tensors": len(case), "checks": []}

    def add(name: str, value: float, bound: float | None, note: str = "") -> None:
        ok = None if bound is None else bool(value <= bound)
        report["checks"].append({"check": name, "value": value, "bound": bound, "ok": ok, "note": note})

    partial = sum(1 for f in fractions if 0 < f < 1)
    shown = [round(f, 2) for f in fractions]
    add("reference: penalised tensors not partly in the support", float(len(fractions) - partial),
        float(len(fractions) // 2), f"{partial}/{len(fractions)} partial; fractions {shown}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        label = str(dtype).removeprefix("torch.")
        backends = ["torch"] + (["triton"] if use_triton else [])
        results = {b: run_optimizer(b, case, weights, grads, device, dtype) for b in backends}
        truncating = interpreted and dtype == torch.bfloat16
        for backend, result in results.items():
            bound = TOL_REF_INTERPRETED_BF16 if truncating and backend == "triton" else TOL_REF[dtype]
            for key, err in _worst(result, reference, rel_err).items():
                add(f"{label} {backend} vs float64: {key} rel err", err, bound)
        if "triton" not in results:
            continue
        note = "not bounded: the CPU interpreter truncates float32 -> bfloat16" if truncating else ""
        for key, err in _worst(results["triton"], results["torch"], rel_err).items():
            add(f"{label} triton vs torch: {key} rel err", err, None if truncating else TOL_PAIR[dtype], note)
        one = {b: run_optimizer(b, case, weights, grads, device, dtype, steps=1) for b in backends}
        ulps = _worst(one["triton"], one["torch"], lambda a, b, d=dtype: max_ulps(a, b, d))
        for key, value in ulps.items():
            add(f"{label} triton vs torch after 1 step: {key} max ulps", value,
                None if truncating else ULP_PAIR[dtype], note)
        if dtype == torch.float32:
            again = run_optimizer("triton", case, weights, grads, device, dtype)
            same = all(
                torch.equal(x, y) for key in ("w", "z", "v")
                for x, y in zip(results["triton"][key], again[key], strict=True) if x is not None
            )
            add("float32 triton: two runs bit-identical (0 = yes)", 0.0 if same else 1.0, 0.0)
    if not use_triton:
        report["note"] = "Triton not run: no CUDA and TRITON_INTERPRET unset"
    report["ok"] = all(c["ok"] is not False for c in report["checks"])
    return report


def _small_model_params(device: torch.device) -> list[tuple[str, nn.Parameter]]:
    from benchmarks.param_sets import make_params, resnet20

    return make_params(resnet20(), device=device, seed=3)


def _twin(device: torch.device, backend: str):
    from slbi_triton import SLBI

    named = _small_model_params(device)
    return named, SLBI(named, backend=backend, lr=0.05, mu=0.5, lam=0.3)


def _max_diff(a: list[tuple[str, nn.Parameter]], b: list[tuple[str, nn.Parameter]]) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for (_, x), (_, y) in zip(a, b, strict=True))


def check_cuda_graph(device: torch.device, backend: str) -> dict[str, Any]:
    """Capture ``opt.step()`` in a CUDA graph and compare replays with eager steps."""
    from slbi_triton import SLBI

    if device.type != "cuda":
        return {"ok": None, "skipped": "needs CUDA"}
    helpers = sorted(n for n in dir(SLBI) if "graph" in n.lower() or "capture" in n.lower())
    report: dict[str, Any] = {"backend": backend, "helpers_on_SLBI": helpers}
    try:
        named, opt = _twin(device, backend)
        twin_named, twin = _twin(device, backend)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                opt.step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        replays = 5
        for _ in range(replays):
            graph.replay()
        for _ in range(3 + replays):
            twin.step()
        torch.cuda.synchronize(device)
        diff = _max_diff(named, twin_named)
        zdiff = max(
            float((opt.state[p]["z"] - twin.state[q]["z"]).abs().max())
            for (_, p), (_, q) in zip(named, twin_named, strict=True) if "z" in opt.state[p]
        )
        report.update({"captured": True, "replays": replays, "max_abs_diff_w": diff, "max_abs_diff_z": zdiff,
                       "ok": diff == 0.0 and zdiff == 0.0})
        start = time.perf_counter()
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize(device)
        replay_s = (time.perf_counter() - start) / 20
        start = time.perf_counter()
        for _ in range(20):
            twin.step()
        torch.cuda.synchronize(device)
        report.update({"replay_s": replay_s, "eager_s": (time.perf_counter() - start) / 20})
    except Exception as exc:  # reported, not raised
        report.update({"captured": False, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                       "traceback": traceback.format_exc()[-3000:]})
    return report


def check_compile(device: torch.device, backend: str) -> dict[str, Any]:
    """``torch.compile(fullgraph=True)`` of a function calling ``opt.step()``."""
    report: dict[str, Any] = {"backend": backend}
    try:
        named, opt = _twin(device, backend)
        twin_named, twin = _twin(device, backend)

        @torch.compile(fullgraph=True)
        def compiled_step() -> None:
            opt.step()

        start = time.perf_counter()
        compiled_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        report["first_call_s"] = time.perf_counter() - start
        for _ in range(2):
            compiled_step()
        for _ in range(3):
            twin.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        diff = _max_diff(named, twin_named)
        report.update({"compiled": True, "max_abs_diff_w": diff, "ok": diff <= 1e-6})
    except Exception as exc:  # reported, not raised
        report.update({"compiled": False, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                       "traceback": traceback.format_exc()[-3000:]})
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected checks, print a summary, optionally write JSON; exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cuda_parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--checks", default="parity", help="comma-separated: parity, graph, compile")
    parser.add_argument("--backend", default=None, help="backend for graph/compile (default: triton on CUDA)")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller tensors")
    parser.add_argument("--json", type=Path, default=None, help="write the report here (rewritten per check)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = args.backend or ("triton" if device.type == "cuda" else "torch")
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = set(checks) - {"parity", "graph", "compile"}
    if unknown:
        parser.error(f"unknown checks {sorted(unknown)}")
    report: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    for check in checks:
        start = time.perf_counter()
        if check == "parity":
            result = check_parity(device, args.quick)
        elif check == "graph":
            result = check_cuda_graph(device, backend)
        else:
            result = check_compile(device, backend)
        result["elapsed_s"] = time.perf_counter() - start
        report[check] = result
        _print(check, result)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1, default=str))
    failed = [c for c in checks if report[c].get("ok") is False]
    print(f"# checks {','.join(checks)}: {'FAIL ' + ','.join(failed) if failed else 'ok'}", flush=True)
    return 1 if failed else 0


def _print(check: str, result: dict[str, Any]) -> None:
    if check == "parity":
        for c in result["checks"]:
            verdict = {True: "ok", False: "FAIL", None: "info"}[c["ok"]]
            bound = "" if c["bound"] is None else f" (<= {c['bound']:g})"
            value = c["value"]
            shown = f"{value:.3g}" if isinstance(value, float) and math.isfinite(value) else str(value)
            print(f"{verdict:4}  {c['check']}: {shown}{bound} {c['note']}".rstrip(), flush=True)
        if "note" in result:
            print(f"note  {result['note']}", flush=True)
    else:
        shown = {k: v for k, v in result.items() if k != "traceback"}
        print(f"{check}: {json.dumps(shown, default=str)}", flush=True)
        if "traceback" in result:
            print(result["traceback"], file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
