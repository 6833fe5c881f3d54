"""The C kernel (the CPU implementation of ``slbi_triton::bucket_step``) on plain tensors:
against the torch reference over a grid of shapes and dtypes, float64 against the
independent float64 reference, its launcher's checks, its build and the fallback when no
compiler works."""

from __future__ import annotations

import ctypes
import re

import pytest
import torch
from slbi_triton.kernels import abi, cpu_step, cpu_tune, ops
from torch import nn

from slbi_triton import SLBI

from .helpers import (
    HPARAMS,
    Bucket,
    assert_equal_with_nans,
    assert_same_outputs,
    plant_special_values,
    random_bucket,
)
from .reference import RefParam, rel_err

pytestmark = pytest.mark.skipif(
    not cpu_step.available(torch.float32), reason="no C compiler: the CPU step falls back to Inductor"
)

# Odd sizes: a 1-element tensor, ragged l1 tails, tiny and long groups, a 3-D group
# tensor, a 1×1 conv, an l1 tensor longer than one chunk, empty tensors.
SHAPES = [(1,), (7,), (13, 17), (3, 1000), (7, 3, 5, 5), (5, 4, 2), (3, 300), (9, 600, 1, 1), (33,),
          (300, 250), (0,)]
PENALTIES = ["none", "none", "l1", "l1", "group", "group", "l1", "group", "none", "l1", "none"]
# (parameter dtype, state dtype): the kernel's three builds.
BUILDS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("ready", [True, False], ids=["momentum-ready", "first-step"])
@pytest.mark.parametrize(("dtype", "state_dtype"), BUILDS, ids=["fp32", "fp64", "fp32-bf16-state"])
def test_matches_torch_reference(dtype: torch.dtype, state_dtype: torch.dtype, ready: bool) -> None:
    """Bit for bit on W, Z, v (stochastic rounding included: the same hash); the group
    norms are sums in another order, so within a few ulps (and then handed over, so that
    every step is compared from the same inputs)."""
    bucket = random_bucket(SHAPES, PENALTIES, dtype, state_dtype, momentum_ready=ready)
    expected = bucket.clone()
    for _ in range(3):
        bucket.run("c")
        assert_reference_step(bucket, expected)
    assert bucket.rng.tolist() == [12345, 3] == expected.rng.tolist()


def assert_reference_step(bucket: Bucket, expected: Bucket) -> None:
    """Step ``expected`` with the reference and compare it with ``bucket``, which the C
    kernel stepped: W, Z, v bit for bit, the group norms within 4 ulps; then hand the
    norms over, so that the next step starts from the same inputs."""
    expected.run("reference")
    assert_equal_with_nans(bucket, expected)
    norms = bucket.group_norms
    assert torch.allclose(norms, expected.group_norms, rtol=4 * torch.finfo(norms.dtype).eps, atol=0)
    expected.group_norms.copy_(norms)


def variants() -> list[str]:
    """The variants the autotune picks from on this CPU, the default, one with tiles of one
    cache line (a group row then spans many tiles, each with its own partial sum), and the
    compiler's own vectorisation ("vdef": on x86-64 the others run the bfloat16-state loop
    written with AVX2 intrinsics)."""
    names = [v.name for v in cpu_tune.candidates()] + [cpu_tune.DEFAULT.name, "vdef-nopf"]
    return [*sorted(set(names)), f"{cpu_tune.DEFAULT.name.split('-')[0]}-pf256-t64"]


# κ = 1 and no dampening (with no gradient scale): the AVX2 loop skips those products.
UNIT_HPARAMS = {**HPARAMS, "kappa": 1.0, "dampening": 0.0}


@pytest.mark.parametrize("hparams", [HPARAMS, UNIT_HPARAMS], ids=["hparams", "unit-factors"])
@pytest.mark.parametrize("variant", variants())
@pytest.mark.parametrize(("dtype", "state_dtype"), BUILDS, ids=["fp32", "fp64", "fp32-bf16-state"])
def test_every_variant_matches_torch_reference(
    dtype: torch.dtype, state_dtype: torch.dtype, variant: str, hparams: dict, monkeypatch
) -> None:
    """Every variant gives the reference's W, Z and v bits on the odd shapes, its
    prefetched tiles switched on however small the bucket (threshold 0)."""
    monkeypatch.setitem(cpu_step.PREFETCH_MIN_NUMEL, state_dtype, 0)
    bucket = random_bucket(SHAPES, PENALTIES, dtype, state_dtype, hparams=hparams, seed=9)
    expected = bucket.clone()
    with cpu_step.using_variant(variant):
        assert cpu_step.variant(dtype, state_dtype) == variant
        for _ in range(3):
            bucket.run("c")
            assert_reference_step(bucket, expected)


@pytest.mark.parametrize("hparams", [HPARAMS, UNIT_HPARAMS], ids=["hparams", "unit-factors"])
@pytest.mark.parametrize("variant", variants())
def test_special_values_in_bfloat16_state_match_torch_reference(variant: str, hparams: dict) -> None:
    """NaN, ±inf, ±0, subnormals and the largest floats in W, g, Z and v, in the 16-element
    turns of the AVX2 loop and in its tails: the reference's values, NaN included."""
    bucket = random_bucket(SHAPES, PENALTIES, torch.float32, torch.bfloat16, hparams=hparams, seed=4)
    plant_special_values(bucket)
    expected = bucket.clone()
    with cpu_step.using_variant(variant):
        for _ in range(2):
            bucket.run("c")
            expected.run("reference")
            assert_equal_with_nans(bucket, expected)
            expected.group_norms.copy_(bucket.group_norms)


@pytest.mark.skipif(not cpu_tune.DEFAULT.name.startswith("v256"), reason="the AVX2 loop is x86-64's")
@pytest.mark.parametrize("hparams", [HPARAMS, UNIT_HPARAMS], ids=["hparams", "unit-factors"])
@pytest.mark.parametrize(("ready", "momentum"), [(True, True), (False, True), (True, False)],
                         ids=["momentum-ready", "first-step", "no-momentum"])
def test_avx2_loop_writes_the_compilers_bits(hparams: dict, ready: bool, momentum: bool) -> None:
    """The bfloat16-state loop written with AVX2 intrinsics (v256) and the compiler's own
    (vdef) write the same W, Z and v bits, special values included (a NaN in W: NaN in
    both), in every momentum mode; the group norms within a few ulps (another order)."""
    hand = random_bucket(SHAPES, PENALTIES, torch.float32, torch.bfloat16, hparams=hparams,
                         momentum_ready=ready, momentum=momentum, seed=6)
    plant_special_values(hand)
    compiled = hand.clone()
    for _ in range(2):
        for bucket, variant in ((hand, "v256-nopf"), (compiled, "vdef-nopf")):
            with cpu_step.using_variant(variant):
                bucket.run("c")
        assert_equal_with_nans(hand, compiled)
        torch.testing.assert_close(hand.group_norms, compiled.group_norms, rtol=1e-5, atol=0, equal_nan=True)
        compiled.group_norms.copy_(hand.group_norms)  # the next step from the same inputs


# Past 2**20 elements, the threshold from which a variant prefetches: rows shorter than a
# tile, rows of one tile plus a ragged end, a long l1 tensor with a tail.
LARGE_SHAPES = [(3, 1000), (64, 64, 3, 3), (100, 97), (256, 576), (700, 1301), (7,), (129, 5, 5)]
LARGE_PENALTIES = ["l1", "group", "group", "group", "l1", "none", "group"]


@pytest.mark.parametrize(("dtype", "state_dtype"), BUILDS, ids=["fp32", "fp64", "fp32-bf16-state"])
def test_prefetched_tiles_match_torch_reference(dtype: torch.dtype, state_dtype: torch.dtype) -> None:
    """A bucket large enough for the prefetching walk, in a variant with prefetch, gives
    the reference's bits, with 1 thread and with 2."""
    bucket = random_bucket(LARGE_SHAPES, LARGE_PENALTIES, dtype, state_dtype, seed=8)
    assert bucket.params.numel() >= cpu_step.PREFETCH_MIN_NUMEL[state_dtype]
    expected, two_threads = bucket.clone(), bucket.clone()
    with cpu_step.using_variant(f"{cpu_tune.DEFAULT.name.split('-')[0]}-pf4096-t512"):
        for _ in range(2):
            cpu_step.launch(bucket.args(), num_threads=1)
            cpu_step.launch(two_threads.args(), num_threads=2)
            assert_reference_step(bucket, expected)
    assert_same_outputs(bucket, two_threads)


def test_float64_matches_float64_reference() -> None:
    """The float64 build against the independent float64 reference: ≤ 1e-12."""
    shapes, penalties = SHAPES[:9], PENALTIES[:9]
    bucket = random_bucket(shapes, penalties, torch.float64)
    refs = []
    for span, shape in zip(bucket.spans, shapes, strict=True):
        part = slice(span.offset, span.offset + span.numel)
        ref = RefParam(bucket.params[part].view(shape), span.penalty, HPARAMS)
        ref.z, ref.v = bucket.z[part].view(shape).clone(), bucket.momentum[part].view(shape).clone()
        refs.append((part, shape, ref))
    for _ in range(4):
        for part, shape, ref in refs:
            ref.step(bucket.grads[part].view(shape))
        bucket.run("c")
    for part, shape, ref in refs:
        assert rel_err(bucket.params[part].view(shape), ref.w) <= 1e-12
        if ref.penalty != "none":
            assert rel_err(bucket.z[part].view(shape), ref.z) <= 1e-12


def test_thread_count_does_not_change_the_result() -> None:
    """Every chunk owns whole rows: 1 and 2 threads write the same bits."""
    buckets = []
    for threads in (1, 2):
        bucket = random_bucket(SHAPES, PENALTIES, seed=3)
        for _ in range(3):
            cpu_step.launch(bucket.args(), num_threads=threads)
        buckets.append(bucket)
    assert_same_outputs(*buckets)


def test_found_inf_writes_nothing_and_inv_scale_unscales() -> None:
    bucket = random_bucket(SHAPES, PENALTIES, seed=4)
    before = bucket.clone()
    bucket.found_inf = torch.ones(1)
    bucket.run("c")
    assert_same_outputs(bucket, before)  # the step counter too
    # Gradients scaled by 1024 and read with inv_scale = 1/1024 give the unscaled step.
    scaled = before.clone()
    scaled.grads.mul_(1024.0)
    scaled.inv_scale, scaled.found_inf = torch.full((1,), 1 / 1024), torch.zeros(1)
    scaled.run("c")
    before.run("c")
    assert_same_outputs(scaled, before)


def test_inactive_parameters_are_left_alone() -> None:
    bucket = random_bucket(SHAPES, PENALTIES, seed=5)
    before = bucket.clone()
    bucket.slot_flags.zero_()
    bucket.run("c")
    assert_same_outputs(bucket, before, skip=["rng"])
    assert int(bucket.rng[abi.RNG_STEP]) == 1  # an idle step is still counted


@pytest.mark.parametrize(
    ("field", "change", "message"),
    [
        ("grads", lambda t: t.double(), r"grads must be a contiguous CPU tensor of torch\.float32"),
        ("z", lambda t: t[:-1], "z must have"),
        ("group_norms", lambda t: t.double(),
         r"group_norms must be a contiguous CPU tensor of torch\.float32"),
        ("hparams", lambda t: t.float(), r"hparams must be a contiguous CPU tensor of torch\.float64"),
        ("chunks", lambda t: t[:, :3].contiguous(),
         rf"chunks must have shape \(num_chunks, {abi.CHUNK_FIELDS}\)"),
        ("rng", lambda t: t[:1], "rng must have 2 elements"),
    ],
)
def test_launcher_refuses_bad_buffers(field: str, change, message: str) -> None:
    bucket = random_bucket(SHAPES, PENALTIES, seed=6)
    setattr(bucket, field, change(getattr(bucket, field)))
    with pytest.raises(ValueError, match=message):
        bucket.run("c")


def test_stochastic_rounding_needs_bfloat16_state() -> None:
    bucket = random_bucket(SHAPES, PENALTIES, seed=6)
    bucket.stochastic_rounding = True
    with pytest.raises(ValueError, match="without stochastic rounding"):
        bucket.run("c")


def test_launcher_refuses_chunks_outside_the_buffers() -> None:
    bucket = random_bucket(SHAPES, PENALTIES, seed=7)
    edits = [
        (abi.CHUNK_ROW_LEN, 1 << 30),  # a group row far past the end
        (abi.CHUNK_START, -1),
        (abi.CHUNK_SLOT, bucket.slot_flags.numel()),
        (abi.CHUNK_HPARAM_ROW, bucket.hparams.shape[0]),
        (abi.CHUNK_PENALTY, 7),
        (abi.CHUNK_NORM_OFFSET, bucket.group_norms.numel()),
    ]
    group_chunk = int((bucket.chunks[:, abi.CHUNK_PENALTY] == abi.PENALTY_CODES["group"]).nonzero()[0])
    for column, value in edits:
        bad = bucket.clone()
        bad.chunks[group_chunk, column] = value
        message = rf"chunk {group_chunk} .* reaches outside the buffers or tables"
        with pytest.raises(ValueError, match=message):
            bad.run("c")
        assert_same_outputs(bad, bucket)


def test_int64_chunk_table() -> None:
    """Tables past 2**31 elements are int64: the kernel reads both widths alike."""
    narrow = random_bucket(SHAPES, PENALTIES, seed=8)
    wide = narrow.clone()
    wide.chunks = wide.chunks.long()
    narrow.run("c")
    wide.run("c")
    assert_same_outputs(narrow, wide)


def c_prototype() -> list[tuple[str, str]]:
    """``(type, name)`` of each parameter of ``slbi_bucket_step`` in the C source."""
    source = cpu_step.SOURCE.read_text()
    found = re.search(r"int64_t slbi_bucket_step\(([^)]*)\)\s*\{", source)
    assert found, "slbi_bucket_step's definition not found"
    params = []
    for declaration in found.group(1).split(","):
        words = " ".join(declaration.split()).replace("*", "* ").split()
        params.append((" ".join(words[:-1]), words[-1]))
    return params


def test_c_prototype_follows_the_op_arguments() -> None:
    """The C kernel takes the op's arguments in ``abi.BucketArgs``' order and names (a
    pointer per tensor, const exactly when the op does not write it; an int per bool),
    then ``cpu_step.SIZE_ARGS``; ``ctypes`` is given the same list."""
    c_types = {ctypes.c_int: "int", ctypes.c_int64: "int64_t"}
    expected = []
    for spec in abi.arg_specs():
        if spec.kind == "bool":
            expected.append(("int", spec.name))
        else:
            expected.append(("pointer" if spec.written else "const pointer", spec.name))
    expected += [(c_types[kind], name) for name, kind in cpu_step.SIZE_ARGS]
    found = [
        ("const pointer" if kind.startswith("const") else "pointer", name) if "*" in kind else (kind, name)
        for kind, name in c_prototype()
    ]
    assert found == expected
    assert len(cpu_step.argtypes()) == len(expected)
    schema = str(ops.bucket_step._schema)
    assert [spec.name for spec in abi.arg_specs()] == [a.name for a in ops.bucket_step._schema.arguments]
    assert all(f"Tensor({alias}!)" in schema for alias in "abcde") and "Tensor(f!)" not in schema


# -- the build ------------------------------------------------------------------------------


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """Build the default variant (no autotune) into an empty cache folder; forget the
    loaded libraries and chosen variants before and after."""
    monkeypatch.setenv("SLBI_TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(cpu_tune.AUTOTUNE_ENV, "0")
    monkeypatch.delenv(cpu_tune.FORCE_ENV, raising=False)
    cpu_step._forget()
    yield tmp_path
    cpu_step._forget()


def _train(fused: bool | None = True) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s)) for s in [(7, 3, 5, 5), (13, 17), (9,)]]
    opt = SLBI(params, backend="torch", fused=fused, **HPARAMS)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    return [p.detach().clone() for p in params]


def test_build_is_cached_on_disk(fresh_build) -> None:
    assert cpu_step.available(torch.float32)
    built = sorted(fresh_build.glob("slbi_step_cpu_float_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    cpu_step._forget()
    assert cpu_step.available(torch.float32)
    assert sorted(fresh_build.glob("*.so")) == built and built[0].stat().st_mtime_ns == stamp
    assert cpu_step.available(torch.float32, torch.bfloat16)
    assert len(sorted(fresh_build.glob("slbi_step_cpu_float_bf16_*.so"))) == 1


def test_every_included_header_is_part_of_the_build_key() -> None:
    included = re.findall(r'^#include "([^"]+)"', cpu_step.SOURCE.read_text(), flags=re.MULTILINE)
    assert sorted(included) == sorted(cpu_step.HEADERS)


def test_build_is_keyed_by_the_headers_beside_the_source(fresh_build, monkeypatch) -> None:
    """A source tree whose header differs gets a build of its own, never the shipped one (the
    compiler includes the header beside the source it compiles)."""
    copy = fresh_build / "kernels"
    copy.mkdir()
    for name in (cpu_step.SOURCE.name, *cpu_step.HEADERS):
        (copy / name).write_bytes(cpu_step.SOURCE.with_name(name).read_bytes())
    shipped = cpu_step.build(torch.float32, torch.float32, fresh_build)
    monkeypatch.setattr(cpu_step, "SOURCE", copy / cpu_step.SOURCE.name)
    assert cpu_step.build(torch.float32, torch.float32, fresh_build) == shipped
    header = copy / cpu_step.HEADERS[0]
    header.write_text(header.read_text() + "\n/* another header */\n")
    changed = cpu_step.build(torch.float32, torch.float32, fresh_build)
    assert changed is not None and changed != shipped and changed.exists()


@pytest.mark.parametrize("how", ["no-compiler", "unwritable-cache"])
def test_without_a_build_the_step_falls_back(fresh_build, monkeypatch, caplog, how: str) -> None:
    expected = _train(fused=False)
    if how == "no-compiler":
        monkeypatch.setenv("CC", str(fresh_build / "no-such-compiler"))
    else:
        monkeypatch.setenv("SLBI_TRITON_CACHE_DIR", "/proc/no-such-folder/slbi")  # mkdir fails
    assert not cpu_step.available(torch.float32)
    assert "cannot build the C kernel" in caplog.text
    torch.manual_seed(0)
    opt = SLBI([nn.Parameter(torch.randn(3, 3))], backend="torch")
    assert [info.kernel for info in opt.kernels()] == ["inductor"]
    for a, b in zip(_train(), expected, strict=True):  # Inductor instead, no exception
        assert rel_err(a, b) <= 1e-6


def test_compiler_command_with_arguments(fresh_build, monkeypatch) -> None:
    compiler = cpu_step._compiler()
    monkeypatch.setenv("CC", f"{compiler[0]} -DSLBI_UNUSED_DEFINE=1")  # e.g. CC="ccache gcc"
    assert cpu_step.available(torch.float32)


def test_compiler_without_openmp_builds_once(fresh_build, monkeypatch) -> None:
    """A compiler that refuses -fopenmp gets a single-threaded kernel, and a later process
    loads it from the cache without trying -fopenmp again."""
    log = fresh_build / "calls.log"
    wrapper = fresh_build / "cc-without-openmp"
    real = cpu_step._compiler()[0]
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        'case " $* " in *" -fopenmp "*) exit 1 ;; esac\n'
        f'exec "{real}" "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    assert cpu_step.available(torch.float32)
    builds = [line for line in log.read_text().splitlines() if "-shared" in line]
    assert len(builds) == 2 and "-fopenmp" in builds[0] and "-fopenmp" not in builds[1]
    cpu_step._forget()  # as a new process would
    assert cpu_step.available(torch.float32)
    assert len([line for line in log.read_text().splitlines() if "-shared" in line]) == 2
    bucket = random_bucket(SHAPES, PENALTIES)
    expected = bucket.clone()
    bucket.run("c")
    expected.run("reference")
    assert torch.equal(bucket.params, expected.params)


def test_the_op_on_the_cpu_is_the_c_kernel(monkeypatch) -> None:
    calls = []
    launch = cpu_step.launch
    monkeypatch.setattr(cpu_step, "launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    bucket = random_bucket(SHAPES[:3], PENALTIES[:3])
    ops.bucket_step(*bucket.args())
    assert calls == [1]
