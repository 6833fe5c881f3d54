"""The Triton kernel on plain tensors, under ``TRITON_INTERPRET=1``: flat buffers and ABI
tables built here, ``slbi_triton::bucket_step_interpreted`` against
``functional.bucket_step_reference`` on the same inputs.

Tolerances: W, Z and v are bit-identical (the same operations in the same order;
stochastic rounding uses the same hash), except

- float64 buckets: the same operations, but the interpreter's float64 arithmetic is not
  held to torch's: ≤ 1e-12 relative;
- bfloat16 parameters: the interpreter converts float32 to bfloat16 by truncation, torch
  rounds to nearest even: within one bfloat16 ulp (on a GPU the conversion rounds);
- the group norms: sums of squares in another order: a few ulps.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from slbi_triton.kernels import abi, ops, triton_step
from torch import Tensor

from .helpers import (
    HPARAMS,
    SPECIAL_VALUES,
    Bucket,
    assert_equal_with_nans,
    assert_same_outputs,
    plant_special_values,
    random_bucket,
)

pytestmark = pytest.mark.skipif(not ops.triton_interpreted(), reason="needs TRITON_INTERPRET=1")

# Every path of the kernel, small: l1/"none" streams with unaligned tails and one longer
# than a chunk (8K elements), empty tensors, a 1-element tensor; groups of 25 and 147
# elements (scalar rows), aligned groups (16, 64 elements; 10 filters: two chunks), a
# one-row group, and groups longer than TRITON_GEOMETRY.long_group (one chunk per group:
# 1040 elements on the stream path, 1025 on the scalar one).
SHAPES = [(1,), (7,), (13, 17), (3, 1000), (40, 250), (0,), (0, 4, 4), (7, 1, 5, 5), (3, 3, 7, 7),
          (10, 4, 4), (3, 16, 2, 2), (1, 1, 64), (2, 65, 16), (2, 1025, 1), (33,)]
PENALTIES = ["none", "none", "l1", "l1", "l1", "none", "group", "group", "group", "group", "group", "group",
             "group", "group", "none"]
# (parameter dtype, state dtype, stochastic rounding): every bucket kind but float64.
KINDS = [(torch.float32, torch.float32, False), (torch.float32, torch.bfloat16, True),
         (torch.bfloat16, torch.bfloat16, False), (torch.bfloat16, torch.bfloat16, True),
         (torch.float16, torch.float16, False), (torch.float16, torch.bfloat16, True)]


Kind = tuple[torch.dtype, torch.dtype, bool]
KIND_IDS = ["fp32", "fp32-bf16sr", "bf16", "bf16-bf16sr", "fp16", "fp16-bf16sr"]


def make_bucket(
    kind: Kind = KINDS[0], shapes: list = SHAPES, penalties: list = PENALTIES, ready: bool = True,
    momentum: bool = True, seed: int = 0,
) -> Bucket:
    """A bucket of the Triton geometry (tests/helpers.py's ``random_bucket``)."""
    dtype, state_dtype, rounding = kind
    return random_bucket(shapes, penalties, dtype, state_dtype, abi.TRITON_GEOMETRY, HPARAMS, ready, seed,
                         momentum, rounding)


def kernel_paths(bucket: Bucket) -> set[str]:
    """The kernel paths the bucket's chunks take (as ``_slbi_bucket_kernel`` chooses)."""
    align = triton_step.kernel_constants(bucket.params.dtype)["ALIGN"]
    paths = set()
    for _, rows, row_len, _, _, _, penalty, _ in bucket.chunks.tolist():
        if penalty != abi.PENALTY_CODES["group"]:
            paths.add("stream")
        elif row_len % align:
            paths.add("scalar rows")
        else:
            paths.add("aligned rows" if rows > 1 else "one-row stream")
    return paths


def assert_within_ulps(got: Tensor, want: Tensor, ulps: float) -> None:
    """``|got − want| ≤ ulps`` units in the last place of ``want``'s dtype at ``want``."""
    info = torch.finfo(want.dtype)
    got64, want64 = got.double(), want.double()
    ulp = torch.exp2(torch.floor(torch.log2(want64.abs().clamp(min=info.tiny)))) * info.eps
    assert bool(((got64 - want64).abs() <= ulps * ulp).all()), float(((got64 - want64).abs() / ulp).max())


def assert_step_matches(bucket: Bucket, expected: Bucket) -> None:
    """W, Z, v as the module docstring says; norms to a few ulps; padding stays zero."""
    truncated = bucket.params.dtype == torch.bfloat16  # by the interpreter
    pairs = [(bucket.params, expected.params), (bucket.z, expected.z)]
    if bucket.momentum is not None:
        pairs.append((bucket.momentum, expected.momentum))
    for got, want in pairs:
        if truncated and not (bucket.stochastic_rounding and got is not bucket.params):
            assert_within_ulps(got, want, 1)
        else:
            assert torch.equal(got, want)
    # Norms of Z_{t+1}: a few float32 ulps, or one bfloat16 ulp of Z when that differs.
    rtol = torch.finfo(torch.bfloat16).eps if truncated else 8 * torch.finfo(torch.float32).eps
    assert torch.allclose(bucket.group_norms, expected.group_norms, rtol=rtol, atol=1e-30)
    assert bucket.rng.tolist() == expected.rng.tolist()


@pytest.mark.parametrize("ready", [True, False], ids=["momentum-ready", "first-step"])
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_matches_reference(kind: Kind, ready: bool) -> None:
    bucket = make_bucket(kind, ready=ready)
    assert kernel_paths(bucket) == {"stream", "scalar rows", "aligned rows", "one-row stream"}
    before, expected = bucket.clone(), bucket.clone()
    bucket.run("triton")
    expected.run("reference")
    assert_step_matches(bucket, expected)
    assert not torch.equal(bucket.params, before.params)  # it did update


@pytest.mark.parametrize("kind", [KINDS[0], KINDS[1]], ids=KIND_IDS[:2])
def test_special_values_match_reference(kind: Kind) -> None:
    """NaN, ±inf, ±0, subnormals and the largest floats in W, g, Z and v: the reference's
    values, NaN included (a NaN Z under l1 gives a NaN Γ, as torch's clamp does). Without
    subnormals: the interpreter's numpy arithmetic and torch's disagree on one of them."""
    bucket = make_bucket(kind, seed=4)
    plant_special_values(bucket, [value for value in SPECIAL_VALUES if value != 1e-40])
    expected = bucket.clone()
    bucket.run("triton")
    expected.run("reference")
    assert_equal_with_nans(bucket, expected)


def test_padding_stays_zero_and_steps_chain() -> None:
    """Three steps in a row (the step counter changes the random bits), padding included."""
    bucket = make_bucket(KINDS[1])
    expected = bucket.clone()
    padding = torch.ones(bucket.params.numel(), dtype=torch.bool)
    for span in bucket.spans:
        padding[span.offset : span.offset + span.numel] = False
    for _ in range(3):
        bucket.run("triton")
        expected.run("reference")
        assert_step_matches(bucket, expected)
        expected.group_norms.copy_(bucket.group_norms)  # compare each step from the same inputs
    for buffer in (bucket.params, bucket.z, bucket.momentum):
        assert not buffer[padding].any()
    assert bucket.rng.tolist() == [12345, 3]


def test_float64_matches_float64_reference() -> None:
    """float64 buckets are computed in float64 (hyper-parameters included): ≤ 1e-12."""
    bucket = make_bucket((torch.float64, torch.float64, False))
    expected = bucket.clone()
    for _ in range(3):
        bucket.run("triton")
        expected.run("reference")
    for got, want in ((bucket.params, expected.params), (bucket.z, expected.z),
                      (bucket.momentum, expected.momentum), (bucket.group_norms, expected.group_norms)):
        assert float((got - want).norm() / want.norm()) <= 1e-12
        assert float(((got - want).abs() / want.abs().clamp(min=1e-300)).max()) <= 1e-12


@pytest.mark.parametrize("kind", [KINDS[0], KINDS[1], (torch.float64, torch.float64, False)],
                         ids=["fp32", "fp32-bf16sr", "fp64"])
def test_int64_chunk_table(kind: Kind) -> None:
    narrow = make_bucket(kind)
    wide = replace(narrow.clone(), chunks=narrow.chunks.to(torch.int64))
    narrow.run("triton")
    wide.run("triton")
    assert_same_outputs(wide, narrow, skip=["chunks"], inputs=True)


@pytest.mark.parametrize(("shapes", "penalties"), [([(1,)], ["none"]), ([(1, 1)], ["l1"]),
                                                  ([(1, 1, 1)], ["group"])], ids=["none", "l1", "group"])
def test_one_element_bucket(shapes: list, penalties: list) -> None:
    bucket = make_bucket(KINDS[0], shapes, penalties)
    assert bucket.params.numel() == abi.SLOT_ALIGNMENT
    expected = bucket.clone()
    bucket.run("triton")
    expected.run("reference")
    assert_step_matches(bucket, expected)


def test_empty_bucket_counts_the_step() -> None:
    bucket = make_bucket(KINDS[0], [(0,), (0, 3, 3)], ["none", "group"])
    assert bucket.chunks.shape[0] == 0
    bucket.run("triton")
    assert bucket.rng.tolist() == [12345, 1]


def test_grad_scaler_inputs() -> None:
    """inv_scale unscales the gradients as they are read; found_inf set: nothing changes
    and the step is not counted."""
    plain = make_bucket(KINDS[1])
    scaled = plain.clone()
    scaled.grads.mul_(1024.0)  # a power of two: the unscaled gradients are exact
    scaled.inv_scale, scaled.found_inf = torch.full((1,), 1 / 1024), torch.zeros(1)
    expected = scaled.clone()
    scaled.run("triton")
    expected.run("reference")
    plain.run("triton")
    assert_step_matches(scaled, expected)
    assert_step_matches(scaled, plain)
    before = scaled.clone()
    scaled.found_inf.fill_(1.0)
    scaled.run("triton")
    assert_same_outputs(scaled, before, skip=["found_inf"], inputs=True)


def test_inactive_parameters_and_no_momentum_buffer() -> None:
    """A parameter without a gradient keeps W, Z and its norms; a bucket whose group keeps
    no momentum passes no buffer (the kernel then reads none)."""
    bucket = make_bucket(KINDS[0], momentum=False)
    bucket.slot_flags[::2] = 0
    before, expected = bucket.clone(), bucket.clone()
    bucket.run("triton")
    expected.run("reference")
    assert_step_matches(bucket, expected)
    untouched = [s for i, s in enumerate(bucket.spans) if i % 2 == 0 and s.numel]
    for span in untouched:
        part = slice(span.offset, span.offset + span.numel)
        assert torch.equal(bucket.params[part], before.params[part])
        assert torch.equal(bucket.z[part], before.z[part])
