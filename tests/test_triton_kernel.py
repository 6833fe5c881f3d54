"""The Triton kernel on plain tensors, under ``TRITON_INTERPRET=1``: flat buffers and ABI
tables built here, ``slbi_triton::bucket_step(..., interpret_triton=True)`` against
``functional.bucket_step_reference`` on the same inputs.

Tolerances: W, Z and v are bit-identical (the same operations in the same order;
stochastic rounding uses the same hash), except

- float64 buckets: the kernel multiplies by 1/μ where the reference divides (see
  ``_over_mu`` in ``kernels/triton_step.py``): ≤ 1e-12 relative;
- bfloat16 parameters: the interpreter converts float32 to bfloat16 by truncation, torch
  rounds to nearest even: within one bfloat16 ulp (on a GPU the conversion rounds);
- the group norms: sums of squares in another order: a few ulps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
from slbi_triton.kernels import abi, ops, triton_step
from torch import Tensor

from slbi_triton import functional

pytestmark = pytest.mark.skipif(not ops.triton_interpreted(), reason="needs TRITON_INTERPRET=1")

HPARAMS = {"lr": 0.07, "kappa": 1.5, "mu": 3.0, "lam": 0.5, "momentum": 0.8, "dampening": 0.2,
           "weight_decay": 1e-2}

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


@dataclass
class Span:
    """One parameter's place in the bucket (an ``abi.SlotSpan``)."""

    offset: int
    numel: int
    penalty: str
    num_groups: int
    group_size: int
    group_index: int = 0
    norm_offset: int = 0


@dataclass
class Bucket:
    """The op's arguments for one bucket."""

    params: Tensor
    grads: Tensor
    z: Tensor
    momentum: Tensor | None
    group_norms: Tensor
    chunks: Tensor
    slot_flags: Tensor
    hparams: Tensor
    rng: Tensor
    inv_scale: Tensor | None = None
    found_inf: Tensor | None = None
    stochastic_rounding: bool = False

    def args(self) -> tuple:
        return tuple(vars(self).values())

    def clone(self) -> Bucket:
        return Bucket(*(v.clone() if isinstance(v, Tensor) else v for v in self.args()))

    def step(self, kernel: str = "triton") -> None:
        if kernel == "reference":
            functional.bucket_step_reference(*self.args())
        else:
            ops.bucket_step(*self.args(), True)


def layout(shapes: list[tuple[int, ...]], penalties: list[str]) -> tuple[list[Span], int, int]:
    """Spans as the optimizer lays them out: 16-element aligned, zero padding between."""
    spans, offset, norms = [], 0, 0
    for shape, penalty in zip(shapes, penalties, strict=True):
        numel = math.prod(shape)
        groups = shape[0] if penalty == "group" else 0
        spans.append(Span(offset, numel, penalty, groups, numel // shape[0] if groups else 0, 0, norms))
        offset = -(-(offset + numel) // abi.SLOT_ALIGNMENT) * abi.SLOT_ALIGNMENT
        norms += groups
    return spans, offset, norms


Kind = tuple[torch.dtype, torch.dtype, bool]
KIND_IDS = ["fp32", "fp32-bf16sr", "bf16", "bf16-bf16sr", "fp16", "fp16-bf16sr"]


def make_bucket(
    kind: Kind = KINDS[0], shapes: list = SHAPES, penalties: list = PENALTIES, ready: bool = True,
    momentum: bool = True, seed: int = 0,
) -> Bucket:
    """Random W, g, Z, v (zero padding), ‖Z_g‖ spread over [0, 2λ] so that some filters
    are in the support and some not, one filter with Z_g = 0, every parameter active."""
    dtype, state_dtype, rounding = kind
    spans, numel, num_norms = layout(shapes, penalties)
    generator = torch.Generator().manual_seed(seed)
    buffers = [torch.zeros(numel, dtype=torch.float64) for _ in range(4)]
    for span in spans:
        for buffer in buffers:
            buffer[span.offset : span.offset + span.numel] = torch.randn(span.numel, generator=generator)
        if span.penalty == "group" and span.num_groups:
            rows = buffers[2][span.offset : span.offset + span.numel].view(span.num_groups, -1)
            spread = torch.linspace(0, 2 * HPARAMS["lam"], span.num_groups, dtype=torch.float64)
            rows.mul_((spread / rows.norm(dim=1))[:, None])
    z = buffers[2].to(state_dtype)
    norms = torch.zeros(num_norms, dtype=abi.norm_dtype(dtype))
    for span in spans:
        if span.penalty == "group" and span.num_groups:
            rows = z[span.offset : span.offset + span.numel].view(span.num_groups, -1)
            own = norms[span.norm_offset : span.norm_offset + span.num_groups]
            functional.refresh_group_norms_(rows, own)
    hparams = {**HPARAMS, "momentum": HPARAMS["momentum"] if momentum else 0.0}
    v = buffers[3].to(state_dtype) if momentum else None
    return Bucket(
        buffers[0].to(dtype), buffers[1].to(dtype), z, v, norms,
        abi.chunk_table(spans, abi.TRITON_GEOMETRY, numel, num_norms),
        torch.tensor(abi.flag_words([True] * len(spans), [ready] * len(spans)), dtype=torch.int32),
        abi.hparam_table_traced([hparams], torch.device("cpu")),
        torch.tensor([12345, 7], dtype=torch.int64), stochastic_rounding=rounding,
    )


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
    expected = bucket.clone()
    bucket.step()
    expected.step("reference")
    assert_step_matches(bucket, expected)
    assert not torch.equal(bucket.params, make_bucket(kind, ready=ready).params)  # it did update


def test_padding_stays_zero_and_steps_chain() -> None:
    """Three steps in a row (the step counter changes the random bits), padding included."""
    bucket = make_bucket(KINDS[1])
    expected = bucket.clone()
    spans, numel, _ = layout(SHAPES, PENALTIES)
    padding = torch.ones(numel, dtype=torch.bool)
    for span in spans:
        padding[span.offset : span.offset + span.numel] = False
    for _ in range(3):
        bucket.step()
        expected.step("reference")
        assert_step_matches(bucket, expected)
        expected.group_norms.copy_(bucket.group_norms)  # compare each step from the same inputs
    for buffer in (bucket.params, bucket.z, bucket.momentum):
        assert not buffer[padding].any()
    assert bucket.rng.tolist() == [12345, 10]


def test_float64_matches_float64_reference() -> None:
    """float64 buckets are computed in float64 (hyper-parameters included): ≤ 1e-12."""
    bucket = make_bucket((torch.float64, torch.float64, False))
    expected = bucket.clone()
    for _ in range(3):
        bucket.step()
        expected.step("reference")
    for got, want in ((bucket.params, expected.params), (bucket.z, expected.z),
                      (bucket.momentum, expected.momentum), (bucket.group_norms, expected.group_norms)):
        assert float((got - want).norm() / want.norm()) <= 1e-12
        assert float(((got - want).abs() / want.abs().clamp(min=1e-300)).max()) <= 1e-12


@pytest.mark.parametrize("kind", [KINDS[0], KINDS[1], (torch.float64, torch.float64, False)],
                         ids=["fp32", "fp32-bf16sr", "fp64"])
def test_int64_chunk_table(kind: Kind) -> None:
    narrow = make_bucket(kind)
    wide = replace(narrow.clone(), chunks=narrow.chunks.to(torch.int64))
    narrow.step()
    wide.step()
    for got, want in zip(wide.args(), narrow.args(), strict=True):
        if isinstance(want, Tensor) and want is not narrow.chunks:
            assert torch.equal(got, want)


@pytest.mark.parametrize(("shapes", "penalties"), [([(1,)], ["none"]), ([(1, 1)], ["l1"]),
                                                  ([(1, 1, 1)], ["group"])], ids=["none", "l1", "group"])
def test_one_element_bucket(shapes: list, penalties: list) -> None:
    bucket = make_bucket(KINDS[0], shapes, penalties)
    assert bucket.params.numel() == abi.SLOT_ALIGNMENT
    expected = bucket.clone()
    bucket.step()
    expected.step("reference")
    assert_step_matches(bucket, expected)


def test_empty_bucket_counts_the_step() -> None:
    bucket = make_bucket(KINDS[0], [(0,), (0, 3, 3)], ["none", "group"])
    assert bucket.chunks.shape[0] == 0
    bucket.step()
    assert bucket.rng.tolist() == [12345, 8]


def test_grad_scaler_inputs() -> None:
    """inv_scale unscales the gradients as they are read; found_inf set: nothing changes
    and the step is not counted."""
    plain = make_bucket(KINDS[1])
    scaled = plain.clone()
    scaled.grads.mul_(1024.0)  # a power of two: the unscaled gradients are exact
    scaled.inv_scale, scaled.found_inf = torch.full((1,), 1 / 1024), torch.zeros(1)
    expected = scaled.clone()
    scaled.step()
    expected.step("reference")
    plain.step()
    assert_step_matches(scaled, expected)
    assert_step_matches(scaled, plain)
    before = scaled.clone()
    scaled.found_inf.fill_(1.0)
    scaled.step()
    for got, want in zip(scaled.args(), before.args(), strict=True):
        if isinstance(want, Tensor) and want is not before.found_inf:
            assert torch.equal(got, want)


def test_inactive_parameters_and_no_momentum_buffer() -> None:
    """A parameter without a gradient keeps W, Z and its norms; a bucket whose group keeps
    no momentum passes no buffer (the kernel then reads none)."""
    bucket = make_bucket(KINDS[0], momentum=False)
    bucket.slot_flags[::2] = 0
    expected = bucket.clone()
    bucket.step()
    expected.step("reference")
    assert_step_matches(bucket, expected)
    spans, _, _ = layout(SHAPES, PENALTIES)
    untouched = [s for i, s in enumerate(spans) if i % 2 == 0 and s.numel]
    fresh = make_bucket(KINDS[0], momentum=False)
    for span in untouched:
        part = slice(span.offset, span.offset + span.numel)
        assert torch.equal(bucket.params[part], fresh.params[part])
        assert torch.equal(bucket.z[part], fresh.z[part])
