"""The Triton step compiled ahead of time for sm_90 and sm_80, no GPU needed
(``benchmarks/gpu_static.py``): every variant of the CI subset compiles, uses at most 128
registers, does not spill, and moves W, g, Z, v through full-width vector accesses on
every vector path. ``python -m benchmarks.gpu_static`` checks all variants.

The compiles run in a child process: this one runs Triton under the interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

gpu_static = pytest.importorskip("benchmarks.gpu_static")
pytest.importorskip("triton.backends.nvidia")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("gpu_static") / "rows.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_static", "--quick", "--json", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())


def test_every_variant_compiles_within_budget(rows: list[dict]) -> None:
    failures = {f"{r['arch']} {r['variant']}": r["problems"] for r in rows if r["problems"]}
    assert not failures, failures
    assert len(rows) == len(gpu_static.quick_jobs()) + len(gpu_static.COUPLED_NORM_JOBS)
    assert len([r for r in rows if r["kernel"] == "coupled norms"]) == len(gpu_static.COUPLED_NORM_JOBS)
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert all(r["regs"] <= gpu_static.MAX_REGISTERS and r["stack"] == 0 and r["spill"] == 0 for r in rows)


def test_vector_paths_are_full_width(rows: list[dict]) -> None:
    """Outside the scalar-rows path, every W, g, Z, v access is a 128-bit vector (64-bit
    for the bfloat16 Z and v of a float32 bucket, see ``kernel_constants``)."""
    for row in (r for r in rows if r["kernel"] == "step"):
        label = (row["arch"], row["variant"], row["paths"])
        assert set(row["paths"]) == {"l1/none", "group, one row", "rows, aligned", "rows, scalar"}, label
        narrow = [s for s, bits in row["expected_bits"].items() if bits < gpu_static.VECTOR_BITS]
        if narrow:
            assert 0 < row["vector_accesses"] < row["accesses"], label
        else:
            assert 0 < row["vector_accesses"] == row["accesses"], label


def test_variants_cover_every_launch() -> None:
    every = gpu_static.variants()
    assert len(every) == len({v.label for v in every}) == 56
    buckets = {"fp32", "fp32/bf16-sr", "bf16", "bf16/bf16-sr", "fp16", "fp16/bf16-sr", "fp64"}
    assert {v.bucket for v in every} == buckets
    assert {v.bucket for v, capability in gpu_static.quick_jobs() if capability == 80} == buckets
    assert {v.bucket for v, _ in gpu_static.quick_jobs() if v.coupled} == buckets


def test_ptx_reading_on_a_hand_written_fragment() -> None:
    """Register roots and access widths on PTX of the shape Triton emits."""
    ptx = """
    ld.param.b64 %rd1, [k_param_0];
    ld.param.b64 %rd2, [k_param_5];
    ld.global.b32 { %r1 }, [ %rd2 + 4 ];
    mul.wide.s32 %rd3, %r1, 4;
    add.s64 %rd4, %rd1, %rd3;
    @%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
    @%p1 st.global.v2.b32 [ %rd4 + 16 ], { %r2, %r3 };
    """
    roots = gpu_static.register_roots(ptx)
    assert roots["%rd4"] == {0, 5} and roots["%r1"] == {5}
    assert gpu_static._access_bits("ld.global.v4.b32") == 128
    assert gpu_static._access_bits("st.global.v2.b32") == 64
    assert gpu_static._access_bits("ld.global.b16") == 16


def test_vector_share_of_the_model_sets() -> None:
    from benchmarks.param_sets import PARAM_SETS

    assert gpu_static.vector_share(PARAM_SETS["vit_b16"](), torch.float32) == 1.0
    for name in ("resnet18", "resnet50"):  # all but conv1's 3×7×7 = 147-element filters
        share = gpu_static.vector_share(PARAM_SETS[name](), torch.bfloat16)
        assert 0.999 < share < 1.0
