"""The C kernel of the CPU step (kernels/slbi_step_cpu.c) against the float64 reference
and the eager torch backend, on the odd sizes of test_kernel; its build, its launcher's
checks and the fallback when no compiler works."""

from __future__ import annotations

import pytest
import torch
from slbi_triton.kernels import chunk_format as cf
from slbi_triton.kernels import cpu_step
from torch import nn

from slbi_triton import SLBI

from .reference import rel_err
from .test_kernel import run

pytestmark = pytest.mark.skipif(
    not cpu_step.available(torch.float32), reason="no C compiler: the CPU step falls back to Inductor"
)


class CountingStep:
    """Wraps ``cpu_step.bucket_step`` and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.step = cpu_step.bucket_step

    def __call__(self, *args, **kwargs) -> None:
        self.calls += 1
        self.step(*args, **kwargs)


def test_matches_float64_reference(monkeypatch) -> None:
    counter = CountingStep()
    monkeypatch.setattr(cpu_step, "bucket_step", counter)
    params, opt, refs = run("torch", torch.float32, fused=True)
    assert counter.calls == 6  # one call per step for the single float32 bucket
    assert {ref.penalty for ref in refs} == {"none", "l1", "group"}
    for p, ref in zip(params, refs, strict=True):
        assert rel_err(p, ref.w) <= 1e-5, p.shape
        if ref.penalty != "none":
            assert rel_err(opt.state[p]["z"], ref.z) <= 1e-5, p.shape


def test_matches_eager_torch_backend() -> None:
    """W, Z, momentum and the group norms the kernel writes equal the eager torch ops."""
    params_c, opt_c, _ = run("torch", torch.float32, fused=True)
    params_e, opt_e, _ = run("torch", torch.float32, fused=False)
    for a, b in zip(params_c, params_e, strict=True):
        assert rel_err(a, b) <= 1e-6, a.shape
        for key in ("z", "momentum_buffer", "group_norms"):
            if key in opt_e.state[b]:
                assert rel_err(opt_c.state[a][key], opt_e.state[b][key]) <= 1e-6, (key, a.shape)


def test_float64_bucket_runs_in_float64(monkeypatch) -> None:
    counter = CountingStep()
    monkeypatch.setattr(cpu_step, "bucket_step", counter)
    params, _, refs = run("torch", torch.float64, fused=True)
    assert counter.calls == 6
    for p, ref in zip(params, refs, strict=True):
        assert p.dtype == torch.float64
        # Γ's group norms come from the float32 norm table; everything else is float64.
        assert rel_err(p, ref.w) <= (1e-6 if ref.penalty == "group" else 1e-12), p.shape


def test_one_call_per_step_for_many_tensors(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 2, 3, 3), (5, 7), (4,), (1,)]
    params = [nn.Parameter(torch.randn(shapes[i % 4], generator=gen)) for i in range(200)]
    opt = SLBI(params, backend="torch")
    counter = CountingStep()
    monkeypatch.setattr(cpu_step, "bucket_step", counter)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    assert counter.calls == 3


def _bucket_inputs(seed: int):
    """A bucket's buffers after one eager step (momentum ready), and its tables."""
    torch.manual_seed(seed)
    params = [nn.Parameter(torch.randn(s)) for s in [(80, 8, 3, 3), (300, 250), (301,), (9, 600, 1, 1)]]
    opt = SLBI(params, lr=0.05, mu=2.0, lam=0.3, backend="torch", fused=False)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    bucket = opt._buckets[0]
    inputs = opt._kernel_inputs(bucket, [True] * len(bucket.slots), "cpu")
    return [b.clone() for b in inputs[:5]], inputs[5:]


def test_thread_count_does_not_change_the_result() -> None:
    """Every chunk owns whole rows: 1 and 2 threads write the same bits."""
    results = []
    for threads in (1, 2):
        buffers, tables = _bucket_inputs(seed=3)
        for _ in range(3):
            cpu_step.bucket_step(*buffers, *tables, num_threads=threads)
        results.append(buffers)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_found_inf_writes_nothing_and_inv_scale_unscales() -> None:
    buffers, tables = _bucket_inputs(seed=4)
    before = [b.clone() for b in buffers]
    cpu_step.bucket_step(*buffers, *tables, found_inf=torch.ones(1))
    for a, b in zip(buffers, before, strict=True):
        assert torch.equal(a, b)
    # Gradients scaled by 1024 and read with inv_scale = 1/1024 give the unscaled step.
    scaled = [b.clone() for b in before]
    scaled[1].mul_(1024.0)
    cpu_step.bucket_step(*scaled, *tables, inv_scale=torch.full((1,), 1 / 1024), found_inf=torch.zeros(1))
    cpu_step.bucket_step(*buffers, *tables)
    for index in (0, 2, 3, 4):  # W, Z, momentum, group norms (the gradients differ by design)
        assert torch.equal(buffers[index], scaled[index])


def test_inactive_parameters_are_left_alone() -> None:
    buffers, (chunks, flags, hparams) = _bucket_inputs(seed=5)
    before = [b.clone() for b in buffers]
    off = torch.zeros_like(flags)
    cpu_step.bucket_step(*buffers, chunks, off, hparams)
    for a, b in zip(buffers, before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: (b[0].double(), *b[1:]), r"grads must be a contiguous CPU tensor of torch\.float64"),
        (lambda b: (b[0], b[1], b[2][:-1], *b[3:]), "z must have"),
        (lambda b: (*b[:4], b[4].double()), r"group_norms must be a contiguous CPU tensor of torch\.float32"),
    ],
    ids=["dtype", "size", "norm-dtype"],
)
def test_launcher_refuses_bad_buffers(change, message) -> None:
    buffers, tables = _bucket_inputs(seed=6)
    with pytest.raises(ValueError, match=message):
        cpu_step.bucket_step(*change(buffers), *tables)
    with pytest.raises(ValueError, match=r"hparams must be a contiguous CPU tensor of torch\.float64"):
        cpu_step.bucket_step(*buffers, *tables[:2], tables[2].float())
    with pytest.raises(ValueError, match=f"chunks must have shape \\(num_chunks, {cf.CHUNK_FIELDS}\\)"):
        cpu_step.bucket_step(*buffers, tables[0][:, :3].contiguous(), *tables[1:])


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """Build into an empty cache folder; forget the loaded libraries before and after."""
    monkeypatch.setenv("SLBI_TRITON_CACHE_DIR", str(tmp_path))
    cpu_step._library.cache_clear()
    yield tmp_path
    cpu_step._library.cache_clear()


def test_build_is_cached_on_disk(fresh_build) -> None:
    assert cpu_step.available(torch.float32)
    built = sorted(fresh_build.glob("slbi_step_cpu_float_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    cpu_step._library.cache_clear()
    assert cpu_step.available(torch.float32)
    assert sorted(fresh_build.glob("*.so")) == built and built[0].stat().st_mtime_ns == stamp


def test_without_a_compiler_the_step_falls_back(fresh_build, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CC", str(fresh_build / "no-such-compiler"))
    assert not cpu_step.available(torch.float32)
    assert "cannot build the C kernel" in caplog.text
    params_f, _, refs = run("torch", torch.float32, fused=True)  # Inductor instead
    for p, ref in zip(params_f, refs, strict=True):
        assert rel_err(p, ref.w) <= 1e-5


def test_unwritable_cache_folder_falls_back(fresh_build, monkeypatch, caplog) -> None:
    monkeypatch.setenv("SLBI_TRITON_CACHE_DIR", "/proc/no-such-folder/slbi")  # mkdir fails
    assert not cpu_step.available(torch.float32)
    assert "cannot build the C kernel" in caplog.text
    params, _, refs = run("torch", torch.float32, fused=True)  # Inductor instead, no exception
    for p, ref in zip(params, refs, strict=True):
        assert rel_err(p, ref.w) <= 1e-5


def test_compiler_command_with_arguments(fresh_build, monkeypatch) -> None:
    compiler = cpu_step._compiler()
    monkeypatch.setenv("CC", f"{compiler[0]} -DSLBI_UNUSED_DEFINE=1")  # e.g. CC="ccache gcc"
    assert cpu_step.available(torch.float32)


def test_launcher_refuses_chunks_outside_the_buffers() -> None:
    buffers, (chunks, flags, hparams) = _bucket_inputs(seed=7)
    edits = [
        (cf.CHUNK_ROW_LEN, 1 << 40),  # would run far past the end
        (cf.CHUNK_START, -1),
        (cf.CHUNK_SLOT, flags.numel()),
        (cf.CHUNK_HPARAM_ROW, hparams.shape[0]),
        (cf.CHUNK_PENALTY, 7),
    ]
    for column, value in edits:
        bad = chunks.clone()
        bad[0, column] = value
        before = [b.clone() for b in buffers]
        with pytest.raises(ValueError, match=r"chunk 0 .* reaches outside the buffers or tables"):
            cpu_step.bucket_step(*buffers, bad, flags, hparams)
        assert all(torch.equal(a, b) for a, b in zip(buffers, before, strict=True))
    group_chunk = int((chunks[:, cf.CHUNK_PENALTY] == cf.PENALTY_CODES["group"]).nonzero()[0])
    bad = chunks.clone()
    bad[group_chunk, cf.CHUNK_NORM_OFFSET] = buffers[4].numel()
    with pytest.raises(ValueError, match=f"chunk {group_chunk} "):
        cpu_step.bucket_step(*buffers, bad, flags, hparams)


@pytest.mark.parametrize("config", ["c-kernel", "eager", "triton"])
def test_empty_tensors(config: str) -> None:
    """Parameters with no elements: nothing to update or penalise, nothing breaks."""
    shapes = [(0,), (0, 3, 3, 3), (4, 0, 3, 3), (3, 0), (2, 3, 3, 3)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    opt = SLBI(params, backend="triton" if config == "triton" else "torch", fused=config != "eager")
    assert [slot.penalty for slot in opt._slots] == ["none"] * 4 + ["group"]
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    opt.load_state_dict(opt.state_dict())
    assert torch.isfinite(params[-1]).all()


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
    cpu_step._library.cache_clear()  # as a new process would
    assert cpu_step.available(torch.float32)
    assert len([line for line in log.read_text().splitlines() if "-shared" in line]) == 2
    params, _, refs = run("torch", torch.float32, fused=True)
    for p, ref in zip(params, refs, strict=True):
        assert rel_err(p, ref.w) <= 1e-5
