#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (issues 5, 13). Run from anywhere:
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine; results under $OUT
#   bash benchmarks/gpu_check.sh --dry-run   # the same stages on the CPU at CI sizes
#   bash benchmarks/gpu_check.sh --selftest  # only: does the uninstalled package import?
#
# Uses the torch and Triton already installed (installs nothing, needs no network) and
# imports the package straight from this tree: pyproject maps `slbi_triton.kernels` to the
# top-level `kernels/` folder, so a generated sitecustomize.py (first on PYTHONPATH) adds a
# meta-path finder that does the same mapping, whatever sys.path order Python or pytest use.
#
# Stages (each under `timeout`, all within GPU_CHECK_BUDGET_S, default 300 s):
#   env      versions, device, commit or source hash          -> env.json
#   parity   Triton vs torch backend vs float64 on the device,
#            float32/bfloat16/float16 buckets                  -> parity.json
#   pytest   tests/test_cuda.py (Triton vs torch vs float64 on CUDA,
#            bf16/fp16 buckets, CUDA-graph capture of a training step) -> pytest.log
#   compile  compile overhead of a LeNet training step (benchmarks/compile_overhead.py)
#   graph    CUDA-graph capture of opt.step(), torch.compile     -> graph.json
#   static   the kernel compiled ahead of time for sm_90 with this
#            machine's Triton: registers, spills, 128-bit accesses -> static.json
#   bench    the benchmark table vs SGD (loop/foreach/fused) and
#            PaperSLBI at full sizes, sweep, training, the bytes
#            each step must move and its floor at the measured
#            copy bandwidth, targets                           -> bench.json, bench.md
#   summary  per set, SLBI and SGD(fused=True) as % of the floor,
#            then the static table, printed last               -> summary.txt
# Everything else a stage prints goes to gpu_check.log. At most these 9 files are written.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=gpu
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --selftest) MODE=selftest ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run|--selftest]" >&2; exit 2 ;;
esac

if [[ -z "${OUT:-}" ]]; then
  OUT="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
fi
mkdir -p "$OUT"
: > "$OUT/gpu_check.log"
# The first interpreter that imports torch: $PYTHON, python3, python, this tree's .venv.
PY=""
for candidate in "${PYTHON:-}" python3 python "$REPO/.venv/bin/python"; do
  if [[ -n "$candidate" ]] && "$candidate" -c "import torch" >/dev/null 2>&1; then
    PY="$candidate"
    break
  fi
done
if [[ -z "$PY" ]]; then
  echo "gpu_check: no Python interpreter with torch found (set PYTHON=...)" | tee -a "$OUT/gpu_check.log" >&2
  exit 2
fi
BUDGET="${GPU_CHECK_BUDGET_S:-300}"
START=$SECONDS
LOG="$OUT/gpu_check.log"

# ---------------------------------------------------------------- the package, uninstalled
SHIM="$(mktemp -d "${TMPDIR:-/tmp}/slbi_shim.XXXXXX")"
trap 'rm -rf "$SHIM"' EXIT
cat > "$SHIM/sitecustomize.py" <<'PYEOF'
"""Written by benchmarks/gpu_check.sh: import slbi_triton from a source tree, uninstalled.

pyproject.toml maps the package ``slbi_triton.kernels`` to the top-level ``kernels/``
folder; this meta-path finder does the same mapping for ``$SLBI_REPO_ROOT``.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_ROOT = os.environ.get("SLBI_REPO_ROOT", "")


class SlbiKernelsFinder(importlib.abc.MetaPathFinder):
    """Find ``slbi_triton.kernels`` in ``$SLBI_REPO_ROOT/kernels``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "slbi_triton.kernels" or not _ROOT:
            return None
        folder = os.path.join(_ROOT, "kernels")
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
        )


sys.meta_path.insert(0, SlbiKernelsFinder())

# Chain to the next sitecustomize on sys.path, if the environment has one.
_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.loader is not None:
    try:
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
    except Exception as _exc:  # noqa: BLE001
        print(f"sitecustomize chain: {_spec.origin}: {_exc}", file=sys.stderr)
PYEOF
export SLBI_REPO_ROOT="$REPO"
export PYTHONPATH="$SHIM:$REPO${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
cd "$REPO" || exit 2

if [[ "$MODE" == selftest ]]; then
  "$PY" - <<'PYEOF'
import sys
import slbi_triton
import slbi_triton.kernels
from slbi_triton.kernels import abi
import benchmarks.harness
import benchmarks.gpu_static
print("finder:", type(sys.meta_path[0]).__name__)
print("slbi_triton:", slbi_triton.__file__)
print("slbi_triton.kernels:", slbi_triton.kernels.__file__)
try:
    from slbi_triton.kernels import triton_step
    print("triton_step:", triton_step.__file__)
except ImportError as exc:  # Triton missing: the C and torch kernels still work
    print("triton_step: not importable:", exc)
print("selftest ok")
PYEOF
  exit $?
fi

# ---------------------------------------------------------------- stages
STAGES=""
run_stage() {  # run_stage NAME LIMIT_S CMD...: timeout-limited, output to the log
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < 15)); then
    echo "== $name: skipped, time budget spent" | tee -a "$LOG"
    STAGES+="${name}:skip:0,"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s, ${left}s left)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo >>"$LOG"  # a stage killed mid-line leaves no newline
  echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  STAGES+="${name}:${rc}:$((SECONDS - t0)),"
}

if [[ "$MODE" == dry ]]; then
  DEVICE=cpu
  export TRITON_INTERPRET=1
  PARITY_ARGS=(--device cpu --quick)
  BENCH_ARGS=(--device cpu --quick --threads 1 --sets lenet5,resnet18,resnet50,resnet50@bfloat16 --sweep quick)
  STATIC_ARGS=(--quick)
  PYTEST_ENV=(TRITON_INTERPRET=1)
  GRAPH_CHECKS=graph
else
  DEVICE=cuda
  export TRITON_INTERPRET=0  # compiled kernels on the GPU, whatever the environment says
  PARITY_ARGS=(--device cuda)
  BENCH_ARGS=(--device cuda --sets resnet50,resnet18,vit_b16,resnet20,lenet5,resnet50@bfloat16
              --only slbi-torch=lenet5+resnet50 --only paper=lenet5+resnet18+resnet50)
  STATIC_ARGS=(--arch 90)
  PYTEST_ENV=(TRITON_INTERPRET=0)
  GRAPH_CHECKS=graph,compile
fi

run_stage env 30 "$PY" - "$OUT/env.json" "$DEVICE" <<'PYEOF'
import datetime, hashlib, json, os, platform, subprocess, sys
from pathlib import Path

out, device = sys.argv[1], sys.argv[2]
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "executable": sys.executable, "host": platform.node()}
try:
    info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, check=True, timeout=10).stdout.strip()
except Exception as exc:
    info["commit"] = f"unknown ({type(exc).__name__})"
digest = hashlib.sha256()
for folder in ("slbi_triton", "kernels", "benchmarks", "tests"):
    for path in sorted(Path(folder).rglob("*.py")):
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
info["source_sha256"] = digest.hexdigest()[:16]
import torch
info["torch"] = torch.__version__
info["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    info["cuda"] = torch.version.cuda
    props = torch.cuda.get_device_properties(0)
    info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
try:
    import triton
    info["triton"] = triton.__version__
except ImportError as exc:
    info["triton"] = f"absent ({exc})"
try:
    import pytest
    info["pytest"] = pytest.__version__
except ImportError:
    info["pytest"] = None
import slbi_triton
import slbi_triton.kernels
info["slbi_triton"] = slbi_triton.__file__
info["slbi_triton.kernels"] = slbi_triton.kernels.__file__
try:
    from slbi_triton.kernels import triton_step  # noqa: F401
    info["triton_kernels_import"] = True
except ImportError as exc:
    info["triton_kernels_import"] = f"failed: {exc}"
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,"
                                         "memory.total", "--format=csv,noheader"], capture_output=True,
                                        text=True, timeout=15).stdout.strip()
except Exception as exc:
    info["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
info["device"] = device
Path(out).write_text(json.dumps(info, indent=1))
print(json.dumps(info, indent=1))
PYEOF

run_stage parity 50 "$PY" -m benchmarks.cuda_parity "${PARITY_ARGS[@]}" --checks parity --json "$OUT/parity.json"

if "$PY" -c "import pytest" >/dev/null 2>&1; then
  # tests/test_cuda.py holds the CUDA tests (the rest of tests/ builds CPU tensors and
  # runs Triton under the interpreter: that is CI's job, not the GPU's).
  PYTEST_FILES=(tests/test_cuda.py)
  run_stage pytest 45 env "${PYTEST_ENV[@]}" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
    "${PYTEST_FILES[@]}" -rf
  # The log of the stage is the tail of gpu_check.log; keep pytest's own output apart too.
  awk '/^== pytest \(/{keep=1} keep' "$LOG" > "$OUT/pytest.log"
else
  echo "== pytest: skipped, pytest is not installed" | tee -a "$LOG" "$OUT/pytest.log"
  STAGES+="pytest:absent:0,"
fi

run_stage compile 40 "$PY" -m benchmarks.compile_overhead --device "$DEVICE" --steps 20

run_stage graph 45 "$PY" -m benchmarks.cuda_parity --device "$DEVICE" --checks "$GRAPH_CHECKS" --json "$OUT/graph.json"

# No GPU needed, but this machine's Triton is the one whose code runs here.
run_stage static 60 "$PY" -m benchmarks.gpu_static "${STATIC_ARGS[@]}" --json "$OUT/static.json"

# Last: the benchmark table rewrites its JSON after every set, so a cut run keeps figures.
run_stage bench 130 "$PY" -m benchmarks.report "${BENCH_ARGS[@]}" --json "$OUT/bench.json" --markdown "$OUT/bench.md"

# The summary always runs, even when the budget is spent.
timeout 20 "$PY" -m benchmarks.gpu_summary "$OUT" --stages "$STAGES" --elapsed "$((SECONDS - START))" \
  2>>"$LOG" | tee "$OUT/summary.txt"
