"""The GPU check's CPU-testable parts: the uninstalled import shim and the summary."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_summary import summarize

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _uninstalled_env(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """An interpreter and environment that see torch but not the installed package:
    the base interpreter of this venv with its site-packages as a plain path (``.pth``
    files, such as the editable install's finder, are not processed there)."""
    base = getattr(sys, "_base_executable", sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["EXTRA_PYTHONPATH"] = os.pathsep.join(site.getsitepackages())
    env["PYTHON"] = base
    env["OUT"] = str(tmp_path / "out")
    return base, env


@pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash")
def test_selftest_imports_the_package_uninstalled(tmp_path: Path) -> None:
    base, env = _uninstalled_env(tmp_path)
    if base == sys.executable:
        pytest.skip("not in a virtual environment: cannot hide the installed package")
    # Without the shim the kernels package is not importable from the source tree.
    control = subprocess.run(
        [base, "-c", "import slbi_triton"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**env, "PYTHONPATH": f"{REPO}{os.pathsep}{env['EXTRA_PYTHONPATH']}"},
    )
    assert control.returncode != 0 and "slbi_triton.kernels" in control.stderr
    result = subprocess.run(["bash", str(SCRIPT), "--selftest"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest ok" in result.stdout
    assert f"slbi_triton.kernels: {REPO / 'kernels' / '__init__.py'}" in result.stdout


def test_usage_error() -> None:
    result = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage" in result.stderr


def test_summary_from_partial_results(tmp_path: Path) -> None:
    (tmp_path / "env.json").write_text(json.dumps({"date": "D", "gpu": "NVIDIA H200", "torch": "2.11",
                                                   "triton": "3.6", "commit": "abc", "source_sha256": "f00"}))
    checks = [
        {"check": "float32 triton vs float64: w rel err", "value": 1e-7, "bound": 1e-6, "ok": True},
        {"check": "bfloat16 triton vs torch: w rel err", "value": 5e-3, "bound": 1e-3, "ok": False},
    ]
    (tmp_path / "parity.json").write_text(json.dumps({"parity": {"checks": checks}}))
    pytest_log = "== pytest (limit 45s)\n..F.\n===== 1 failed, 3 passed in 2.0s =====\n"
    (tmp_path / "pytest.log").write_text(pytest_log)
    graph = {"graph": {"ok": False, "error": "RuntimeError: capture"}}
    (tmp_path / "graph.json").write_text(json.dumps(graph))
    row = {"set": "resnet50", "median_s": 2e-4, "first_step_s": 1.5, "second_step_s": 1e-3, "floor_s": 1.7e-4,
           "floor_share": 0.85, "step_bytes": 715e6, "ratio_to_fused": 1.25, "dispatches": 1,
           "peak_extra_bytes": 0, "error": None}
    (tmp_path / "bench.json").write_text(json.dumps({
        "meta": {"default_contender": "slbi-triton", "copy_bandwidth_gbs": 4000, "complete": False},
        "rows": [{**row, "contender": "slbi-triton"},
                 {**row, "contender": "sgd-fused", "median_s": 1.6e-4, "ratio_to_fused": 1.0}],
        "train": [],
        "targets": [{"name": "GPU slbi-triton step vs SGD(fused=True) (resnet50)", "measured": "1.25x",
                     "threshold": "<= 1.50x", "verdict": "PASS"}],
    }))
    static = [{"arch": "sm_90", "variant": "fp32 i32", "regs": 40, "stack": 0, "spill": 0,
               "vector_accesses": 21, "accesses": 21, "problems": []},
              {"arch": "sm_90", "variant": "fp64 i64 amp", "regs": 140, "stack": 8, "spill": 2,
               "vector_accesses": 21, "accesses": 21, "problems": ["140 registers > 128"]}]
    (tmp_path / "static.json").write_text(json.dumps(static))
    text = summarize(tmp_path, "env:0:3,parity:1:20,bench:124:130,", 150)
    assert "NVIDIA H200" in text and "commit abc" in text
    assert "parity: 1/2 checks ok; FAILED: bfloat16 triton vs torch" in text
    assert "pytest: 1 failed, 3 passed in 2.0s" in text
    assert "cuda graph: FAIL RuntimeError: capture" in text
    assert "torch.compile: no result" in text
    assert "PARTIAL" in text and "bench rc=124 130s" in text
    assert "1.25" in text and "PASS" in text
    resnet50 = next(line for line in text.splitlines() if line.startswith("resnet50  slbi-triton"))
    assert resnet50.split()[2:6] == ["1.25", "200.0", "170.0", "85"]  # x fused, median, floor, % floor
    assert "static (compiled, not measured): 1/2 variants ok" in text and "140 registers > 128" in text
    assert summarize(tmp_path / "missing").count("no result") == 5
