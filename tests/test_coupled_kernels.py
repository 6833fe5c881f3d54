"""Coupled channel groups in the kernels, on plain tensors: the C kernel, the Triton kernel
(interpreted) and the torch reference on the same coupled layouts (members in several
parameters, a 1-D one among them, a group across two param groups with the same λ and κ,
inactive members, bfloat16 state, GradScaler's found_inf, int64 tables), the float64
build against the independent float64 reference, and the checks of the coupled tables.

W, Z and v are compared bit for bit (the tolerances of tests/test_triton_kernel.py for
float64 and bfloat16 buckets); the own group norms are sums in another order (a few ulps),
so they are handed over before the coupled ones are compared: those are the same bits in
every implementation (squares added in member order, IEEE square root)."""

from __future__ import annotations

import pytest
import torch
from slbi_triton.kernels import abi, cpu_step, ops
from torch import Tensor

from slbi_triton import functional

from .helpers import HPARAMS, Bucket, assert_same_outputs, couple, layout, random_bucket
from .reference import RefParam, rel_err, step_coupled

needs_c = pytest.mark.skipif(not cpu_step.available(torch.float32), reason="no C compiler")
needs_triton = pytest.mark.skipif(not ops.triton_interpreted(), reason="needs TRITON_INTERPRET=1")

# Group-penalised: a conv (6 filters of 12), a 1-D parameter (6 rows of 1, e.g. BN γ), a
# linear (6 rows of 5), a conv of param group 1 (3 filters of 16: one chunk row each on the
# aligned path), a conv with 147-element filters; l1 and "none" parameters around them.
SHAPES = [(6, 3, 2, 2), (9, 7), (6,), (6, 5), (4,), (3, 4, 4), (2, 3, 7, 7)]
PENALTIES = ["group", "l1", "group", "group", "none", "group", "group"]
GROUP_OF = [0, 0, 0, 0, 0, 1, 1]
SECOND_GROUP = {**HPARAMS, "lr": 0.05, "momentum": 0.5, "weight_decay": 0.0}  # same λ, κ
# One key per group-penalty row, in norm order (rows 0-5 conv, 6-11 1-D, 12-17 linear,
# 18-20 the param group 1 conv, 21-22 the last conv): channels 0-4 of the first three are
# coupled, channel 5 only in the linear (-1 elsewhere); keys 0 and 1 also take rows of
# param group 1; key 7 couples the last conv's two filters; key 9 has one row (uncoupled).
ROW_KEYS = [0, 1, 2, 3, 4, -1,  0, 1, 2, 3, 4, 9,  0, 1, 2, 3, 4, -1,  0, 1, -1,  7, 7]
MEMBERS = {0: 4, 1: 4, 2: 3, 3: 3, 4: 3, 7: 2}  # key -> number of member rows


def coupled_bucket(
    dtype: torch.dtype = torch.float32, state_dtype: torch.dtype | None = None,
    geometry: abi.Geometry = abi.CPU_GEOMETRY, ready: bool = True, seed: int = 0,
) -> Bucket:
    """The layout above, random values, two param groups, coupled norms of the own ones."""
    bucket = random_bucket(SHAPES, PENALTIES, dtype, state_dtype, geometry, HPARAMS, ready, seed)
    spans, numel, num_norms = layout(SHAPES, PENALTIES)
    for span, group in zip(spans, GROUP_OF, strict=True):
        span.group_index = group
    bucket.spans = spans
    bucket.chunks = abi.chunk_table(spans, geometry, numel, num_norms)
    bucket.hparams = abi.hparam_table_traced([HPARAMS, SECOND_GROUP], torch.device("cpu"))
    return couple(bucket, ROW_KEYS)


def assert_coupled_step(bucket: Bucket, expected: Bucket, exact: bool = True) -> None:
    """W, Z, v equal (or, ``exact=False``, within 1e-12 relative: float64 interpreted);
    own norms within a few ulps, then handed over: the coupled norms the same bits."""
    for name in ("params", "z", "momentum"):
        got, want = getattr(bucket, name), getattr(expected, name)
        assert torch.equal(got, want) if exact else rel_err(got, want) <= 1e-12, name
    rows = bucket.group_norms.numel() - bucket.coupled_scale.numel()
    eps = torch.finfo(bucket.group_norms.dtype).eps
    assert torch.allclose(bucket.group_norms[:rows], expected.group_norms[:rows], rtol=16 * eps, atol=0)
    expected.group_norms[:rows] = bucket.group_norms[:rows]
    members = functional.member_table(expected.coupled_offsets, expected.coupled_rows)
    functional.coupled_norms_(expected.group_norms, members, expected.coupled_scale)
    assert torch.equal(bucket.group_norms, expected.group_norms)
    assert bucket.rng.tolist() == expected.rng.tolist()


def test_tables_follow_the_keys() -> None:
    bucket = coupled_bucket()
    rows = len(ROW_KEYS)
    assert bucket.coupled_offsets.diff().tolist() == list(MEMBERS.values())
    assert bucket.group_norms.numel() == rows + len(MEMBERS)
    keys = torch.tensor(ROW_KEYS)
    for group, key in enumerate(MEMBERS):
        members = bucket.coupled_rows[bucket.coupled_offsets[group] : bucket.coupled_offsets[group + 1]]
        assert members.tolist() == (keys == key).nonzero().flatten().tolist()
        assert (bucket.norm_index[members] == rows + group).all()
        assert float(bucket.coupled_scale[group]) == pytest.approx(len(members) ** -0.5)
    uncoupled = [r for r, key in enumerate(ROW_KEYS) if key not in MEMBERS]
    assert bucket.norm_index[uncoupled].tolist() == uncoupled
    assert abi.coupled_tables(torch.tensor([-1, 3, 5, -1]), torch.float32, 64) is None  # no shared key


C_BUILDS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float32, torch.bfloat16)]
def steps_match_reference(bucket: Bucket, kernel: str, steps: int) -> Bucket:
    """Step ``bucket`` with ``kernel`` and a clone with the torch reference ``steps``
    times, comparing after each step (:func:`assert_coupled_step`); the reference bucket."""
    expected = bucket.clone()
    for _ in range(steps):
        bucket.run(kernel)
        expected.run("reference")
        assert_coupled_step(bucket, expected)
    return expected


C_IDS = ["fp32", "fp64", "fp32-bf16-state"]


@needs_c
@pytest.mark.parametrize("ready", [True, False], ids=["momentum-ready", "first-step"])
@pytest.mark.parametrize(("dtype", "state_dtype"), C_BUILDS, ids=C_IDS)
def test_c_kernel_matches_reference(dtype: torch.dtype, state_dtype: torch.dtype, ready: bool) -> None:
    steps_match_reference(coupled_bucket(dtype, state_dtype, ready=ready), "c", steps=3)


@needs_c
def test_coupling_changes_only_the_coupled_rows() -> None:
    """The same bucket without its coupled tables: the rows in no coupled group (and the
    l1 and "none" parameters) step to the same bits, coupled rows to others."""
    coupled = coupled_bucket()
    plain = random_bucket(SHAPES, PENALTIES, seed=0)
    plain.chunks, plain.hparams = coupled.chunks, coupled.hparams
    coupled.run("c")
    plain.run("c")
    row_keys = iter(ROW_KEYS)
    changed = 0
    for span in coupled.spans:
        part = slice(span.offset, span.offset + span.numel)
        if span.penalty != "group":
            assert torch.equal(coupled.params[part], plain.params[part])
            continue
        for row in range(span.num_groups):
            at = slice(part.start + row * span.group_size, part.start + (row + 1) * span.group_size)
            same = torch.equal(coupled.params[at], plain.params[at])
            if next(row_keys) not in MEMBERS:
                assert same
            changed += not same
    assert changed > 0


@needs_c
def test_float64_matches_the_independent_reference() -> None:
    bucket = coupled_bucket(torch.float64)
    spans = bucket.spans
    refs = []
    for span, shape, group in zip(spans, SHAPES, GROUP_OF, strict=True):
        part = slice(span.offset, span.offset + span.numel)
        ref = RefParam(bucket.params[part].view(shape), span.penalty, SECOND_GROUP if group else HPARAMS)
        ref.z, ref.v = bucket.z[part].view(shape).clone(), bucket.momentum[part].view(shape).clone()
        refs.append((part, shape, ref))
    row_of = [(p, r) for p, s in enumerate(spans) if s.penalty == "group" for r in range(s.num_groups)]
    coupling = [[row_of[i] for i, k in enumerate(ROW_KEYS) if k == key] for key in MEMBERS]
    inactive = 2  # the 1-D member: no gradient this step, its Z still counts
    bucket.slot_flags[inactive] = 0
    for _ in range(3):
        grads = [None if i == inactive else bucket.grads[part].view(shape) for i, (part, shape, _) in
                 enumerate(refs)]
        step_coupled([ref for *_, ref in refs], grads, coupling)
        bucket.run("c")
    for part, shape, ref in refs:
        assert rel_err(bucket.params[part].view(shape), ref.w) <= 1e-12
        if ref.penalty != "none":
            assert rel_err(bucket.z[part].view(shape), ref.z) <= 1e-12


@needs_c
def test_inactive_members_found_inf_and_int64_tables() -> None:
    bucket = coupled_bucket(seed=3)
    before = bucket.clone()
    bucket.slot_flags[[0, 2]] = 0  # two members without a gradient: left alone
    expected = bucket.clone()
    bucket.run("c")
    expected.run("reference")
    assert_coupled_step(bucket, expected)
    for span in (bucket.spans[0], bucket.spans[2]):
        part = slice(span.offset, span.offset + span.numel)
        assert torch.equal(bucket.params[part], before.params[part])
    skipped = bucket.clone()
    skipped.found_inf = torch.ones(1)
    skipped.run("c")
    assert_same_outputs(skipped, bucket)  # nothing written, coupled norms and step included
    wide = before.clone()
    for name in ("chunks", "norm_index", "coupled_offsets", "coupled_rows"):
        setattr(wide, name, getattr(wide, name).long())
    narrow = before.clone()
    wide.run("c")
    narrow.run("c")
    assert_same_outputs(wide, narrow)


def _corrupt(bucket: Bucket, name: str, at: int, value: int) -> Bucket:
    bad = bucket.clone()
    getattr(bad, name)[at] = value
    return bad


@needs_c
def test_c_kernel_refuses_tables_outside_their_bounds() -> None:
    bucket = coupled_bucket(seed=4)
    rows = len(ROW_KEYS)
    bad_tables = [
        _corrupt(bucket, "norm_index", 5, 4),  # another row's own norm (another thread writes it)
        _corrupt(bucket, "norm_index", 5, rows + len(MEMBERS)),  # past the coupled norms
        _corrupt(bucket, "coupled_offsets", -1, 3),  # does not end at the members
        _corrupt(bucket, "coupled_offsets", 1, 9),  # goes back
        _corrupt(bucket, "coupled_rows", 0, rows),  # a coupled norm as member
        _corrupt(bucket, "coupled_rows", 2, -1),
    ]
    for bad in bad_tables:
        with pytest.raises(ValueError, match=r"coupled table .* reaches outside"):
            bad.run("c")
        assert_same_outputs(bad, bucket, skip=["norm_index", "coupled_offsets", "coupled_rows"], inputs=True)
    group_chunk = int((bucket.chunks[:, abi.CHUNK_PENALTY] == abi.PENALTY_CODES["group"]).nonzero()[-1])
    bad = _corrupt(bucket, "chunks", group_chunk, 0)
    bad.chunks[group_chunk] = bucket.chunks[group_chunk]
    bad.chunks[group_chunk, abi.CHUNK_NORM_OFFSET] = rows - 1  # its norms would overlap the coupled ones
    with pytest.raises(ValueError, match=rf"chunk {group_chunk} .* reaches outside"):
        bad.run("c")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda b: setattr(b, "coupled_rows", None), "all four or none; missing: coupled_rows"),
        (lambda b: setattr(b, "norm_index", b.norm_index.long()), r"norm_index must be .* of torch\.int32"),
        (lambda b: setattr(b, "coupled_scale", b.coupled_scale.double()), "coupled_scale must be"),
        (lambda b: setattr(b, "norm_index", b.norm_index[:-1]), "norm_index must have 23 elements"),
        (lambda b: setattr(b, "coupled_offsets", b.coupled_offsets[:-1]), "coupled_offsets must have 7"),
    ],
    ids=["partial", "index-dtype", "scale-dtype", "norm-index-size", "offsets-size"],
)
@pytest.mark.parametrize("kernel", ["c", "triton", "reference"])
def test_launchers_refuse_tables_that_do_not_fit(kernel: str, edit, message: str) -> None:
    if kernel == "c" and not cpu_step.available(torch.float32):
        pytest.skip("no C compiler")
    if kernel == "triton" and not ops.triton_interpreted():
        pytest.skip("needs TRITON_INTERPRET=1")
    bucket = coupled_bucket(seed=5)
    bad = bucket.clone()
    edit(bad)
    with pytest.raises(ValueError, match=message):
        bad.run(kernel)
    assert_same_outputs(bad, bucket)


# bfloat16 parameters aside (the interpreter rounds them by truncation: tests/test_triton_kernel.py).
TRITON_KINDS = [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)
]


@needs_triton
@pytest.mark.parametrize(("dtype", "state_dtype"), TRITON_KINDS, ids=["fp32", "fp32-bf16sr", "fp16-bf16sr"])
def test_triton_kernel_matches_reference(dtype: torch.dtype, state_dtype: torch.dtype) -> None:
    bucket = coupled_bucket(dtype, state_dtype, abi.TRITON_GEOMETRY, seed=6)
    bucket.slot_flags[2] = 0  # an inactive member
    steps_match_reference(bucket, "triton", steps=2)


@needs_triton
def test_triton_float64_int64_tables_and_found_inf() -> None:
    bucket = coupled_bucket(torch.float64, geometry=abi.TRITON_GEOMETRY, seed=7)
    expected = bucket.clone()
    wide = bucket.clone()
    for name in ("chunks", "norm_index", "coupled_offsets", "coupled_rows"):
        setattr(wide, name, getattr(wide, name).long())
    for stepped in (bucket, wide):
        stepped.run("triton")
    expected.run("reference")
    assert_coupled_step(bucket, expected, exact=False)
    assert_same_outputs(wide, bucket)
    skipped = bucket.clone()
    skipped.found_inf = torch.ones(1)
    skipped.run("triton")
    assert_same_outputs(skipped, bucket)


def _coupled_norm(bucket: Bucket, key: int) -> Tensor:
    rows = len(ROW_KEYS)
    return bucket.group_norms[rows + list(MEMBERS).index(key)]


def test_coupled_norm_is_the_rms_of_its_rows() -> None:
    bucket = coupled_bucket(torch.float64)
    own = bucket.group_norms[: len(ROW_KEYS)]
    for key in MEMBERS:
        members = own[torch.tensor(ROW_KEYS) == key]
        rms = float(members.square().mean().sqrt())
        assert float(_coupled_norm(bucket, key)) == pytest.approx(rms, rel=1e-15)


def _held_bucket(dtype: torch.dtype, geometry: abi.Geometry, seed: int) -> tuple[Bucket, Bucket]:
    """The bucket with key 0 held out (s_G = 0, docs/design.md "Held-out groups"), and a
    copy of it before the step."""
    bucket = coupled_bucket(dtype, geometry=geometry, seed=seed)
    bucket.coupled_scale[list(MEMBERS).index(0)] = 0
    members = functional.member_table(bucket.coupled_offsets, bucket.coupled_rows)
    functional.coupled_norms_(bucket.group_norms, members, bucket.coupled_scale)
    return bucket, bucket.clone()


def _assert_held_rows_lost_gamma(bucket: Bucket, before: Bucket) -> None:
    """Every row of key 0 stepped with Γ = 0: Z grew by (α/μ)·W_t exactly in float64."""
    row_keys = iter(ROW_KEYS)
    hparams = {0: HPARAMS, 1: SECOND_GROUP}
    held = 0
    for span in bucket.spans:
        if span.penalty != "group":
            continue
        scale = hparams[span.group_index]["lr"] / hparams[span.group_index]["mu"]
        for row in range(span.num_groups):
            at = slice(span.offset + row * span.group_size, span.offset + (row + 1) * span.group_size)
            if next(row_keys) == 0:
                held += 1
                grown = before.z[at].double() + scale * before.params[at].double()
                assert torch.allclose(bucket.z[at].double(), grown, rtol=1e-6, atol=1e-7)
    assert held == 4


@pytest.mark.parametrize(
    "kernel", [pytest.param("c", marks=needs_c), pytest.param("triton", marks=needs_triton)]
)
def test_a_held_group_steps_with_no_gamma_in_every_kernel(kernel: str) -> None:
    geometry = abi.CPU_GEOMETRY if kernel == "c" else abi.TRITON_GEOMETRY
    bucket, before = _held_bucket(torch.float32, geometry, seed=11)
    expected = steps_match_reference(bucket, kernel, steps=1)
    assert float(_coupled_norm(bucket, 0)) == 0.0
    _assert_held_rows_lost_gamma(bucket, before)
    _assert_held_rows_lost_gamma(expected, before)


@needs_c
def test_a_held_group_in_float64_grows_z_by_w() -> None:
    bucket, before = _held_bucket(torch.float64, abi.CPU_GEOMETRY, seed=12)
    steps_match_reference(bucket, "c", steps=1)
    _assert_held_rows_lost_gamma(bucket, before)
