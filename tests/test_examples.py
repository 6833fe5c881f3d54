"""The examples under examples/ run as users run them: as scripts, with module globals."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def run_script(path: Path, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(path), *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"), reason="needs torch >= 2.13")
def test_compile_example_compiles_twice() -> None:
    """The README's compile recipe, as a script: 12 steps with an lr change every step,
    two compiled frames."""
    out = run_script(REPO / "examples" / "compile_training.py", "12", "aot_eager")
    assert re.search(r"compiled frames: 2 in 12 steps", out), out
