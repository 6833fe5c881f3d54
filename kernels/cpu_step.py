"""The CPU implementation of ``slbi_triton::bucket_step``: the C kernel ``slbi_step_cpu.c``,
its build and its launcher.

The kernel reads the tables of the kernel ABI (:mod:`.abi`), one call per bucket: W, Z,
g and v read once, W, Z, v written once, the next step's group norms summed in the same
pass. It is built on first use with the system C compiler (``$CC``, else ``cc``), as
Inductor builds its CPU kernels, once per machine and variant, into a cache folder
(``$SLBI_TRITON_CACHE_DIR``, else ``$XDG_CACHE_HOME/slbi_triton``, else
``~/.cache/slbi_triton``). Which variant runs (prefetch, vector width) is measured on the
machine by :mod:`.cpu_tune` the first time and kept there too (:func:`variant`). Where no
compiler works, :func:`available` is ``False`` and the optimizer falls back to the
Inductor-compiled torch update.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from . import abi, cpu_tune

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("slbi_step_cpu.c")
HEADERS = ("slbi_step_cpu_avx2.h",)
"""The files SOURCE includes (beside it): part of the source a build is keyed by."""
SCALARS = {torch.float32: "float", torch.float64: "double"}
"""Bucket dtypes the kernel is built for, with their C type."""
STATE_DTYPES = {torch.float32: (torch.float32, torch.bfloat16), torch.float64: (torch.float64,)}
"""Per bucket dtype, the dtypes its Z and momentum may be stored in (bfloat16: with
stochastic rounding)."""

PREFETCH_MIN_NUMEL: dict[torch.dtype, int] = dict.fromkeys((torch.float32, torch.float64, torch.bfloat16),
                                                           1 << 20)
"""By state dtype, the bucket size from which a variant with software prefetch
(:mod:`.cpu_tune`) walks spans in prefetched tiles (see ``slbi_step_cpu.c``): smaller
buckets stay in the caches. A state dtype not listed never does. Read at every launch;
W, Z and v are the same bits either way."""
NO_PREFETCH = 2**63 - 1

# -fno-trapping-math: see slbi_step_cpu.c (without it, GCC leaves a loop scalar on AVX2).
_OPTIMISE = ["-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-std=c11", "-fPIC",
             "-shared"]
_BUILD_LOCK = threading.Lock()
_TUNE_LOCK = threading.Lock()
_USING: contextvars.ContextVar[str | None] = contextvars.ContextVar("slbi_cpu_variant", default=None)


def _defines(scalar: str, state_bf16: bool) -> list[str]:
    """The table layout of :mod:`.abi` as ``-D`` flags: one source of truth."""
    prefixes = ("CHUNK_", "HP_", "FLAG_", "RNG_")
    names = [
        n for n in dir(abi)
        if (n.startswith(prefixes) or n.endswith("_FIELDS")) and isinstance(getattr(abi, n), int)
    ]
    flags = [f"-D{name}={getattr(abi, name)}" for name in sorted(names)]
    flags += [f"-DPENALTY_{penalty.upper()}={code}" for penalty, code in abi.PENALTY_CODES.items()]
    return [*flags, f"-DSLBI_SCALAR={scalar}", f"-DSLBI_STATE_BF16={int(state_bf16)}"]


def _compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (which may carry arguments, e.g. ``ccache gcc``),
    else ``cc``, else ``gcc``."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def default_cache_dir() -> Path:
    """Where built kernels are kept: ``$SLBI_TRITON_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/slbi_triton``, else ``~/.cache/slbi_triton``."""
    root = os.environ.get("SLBI_TRITON_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slbi_triton"


def _machine_key() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    return "\n".join([platform.machine(), cpu_tune.cpu_model(), " ".join(sorted(cpu_tune.cpu_flags()))])


def source_bytes() -> bytes:
    """The kernel's source with the headers it includes (read beside it, where the compiler
    finds them), as builds are keyed by."""
    return b"\0".join(path.read_bytes() for path in (SOURCE, *(SOURCE.with_name(name) for name in HEADERS)))


def _build_name(dtype: torch.dtype, state_dtype: torch.dtype) -> str:
    return f"{SCALARS[dtype]}_bf16" if state_dtype == torch.bfloat16 else SCALARS[dtype]


def build(
    dtype: torch.dtype, state_dtype: torch.dtype, cache_dir: Path | None = None, variant: str | None = None
) -> Path | None:
    """Compile variant ``variant`` (default :data:`.cpu_tune.DEFAULT`) of the kernel for
    buckets of ``dtype`` with Z and v in ``state_dtype`` into ``cache_dir`` (default:
    :func:`default_cache_dir`), unless a build for the same source, flags, compiler and
    CPU is there already. Returns the shared library's path, or ``None`` (with a logged
    warning) when no compiler works or the cache folder cannot be written.

    Raises:
        ValueError: ``variant`` is not a variant this CPU can run.
    """
    chosen = cpu_tune.parse(variant) if variant is not None else cpu_tune.DEFAULT
    compiler = _compiler()
    if compiler is None:
        logger.warning("SLBI: no C compiler found ($CC, cc, gcc); the CPU step uses Inductor instead")
        return None
    try:
        state_bf16 = state_dtype == torch.bfloat16
        return _build_with(compiler, SCALARS[dtype], state_bf16, cache_dir or default_cache_dir(), chosen)
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("SLBI: cannot build the C kernel with %r (%s); the CPU step uses Inductor",
                       compiler, error)
        return None


def _compiler_version(compiler: list[str]) -> str:
    return subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout


def _build_with(
    compiler: list[str], scalar: str, state_bf16: bool, cache_dir: Path, variant: cpu_tune.Variant
) -> Path | None:
    version = _compiler_version(compiler)
    source = source_bytes()
    # With OpenMP first; a compiler without it still builds the kernel, single-threaded.
    candidates = []
    for parallel in (["-fopenmp"], []):
        flags = [*_OPTIMISE, *variant.flags(), *parallel, *_defines(scalar, state_bf16)]
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags).encode(), version.encode(), _machine_key().encode()])
        ).hexdigest()[:24]
        name = f"{scalar}_bf16" if state_bf16 else scalar
        candidates.append((flags, cache_dir / f"slbi_step_cpu_{name}_{variant.name}_{key}.so"))
    for _, target in candidates:
        if target.exists():  # also the single-threaded build: no retry of a failing -fopenmp
            return target
    for flags, target in candidates:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build under a temporary name, then rename: concurrent processes never load half a file.
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run(
                [*compiler, *flags, str(SOURCE), "-o", str(built), "-lm"],
                capture_output=True, text=True, timeout=300,
            )
            if result.returncode == 0:
                os.replace(built, target)
                return target
        logger.info("SLBI: building the CPU kernel with %s failed: %s", flags, result.stderr.strip())
    logger.warning("SLBI: the C kernel did not build with %r; the CPU step uses Inductor instead", compiler)
    return None


@functools.cache
def _library(dtype: torch.dtype, state_dtype: torch.dtype, variant: str) -> ctypes.CDLL | None:
    with _BUILD_LOCK:
        path = build(dtype, state_dtype, variant=variant)
    if path is None:
        return None
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:  # e.g. a cache folder on a noexec mount
        logger.warning("SLBI: cannot load the C kernel %s (%s); the CPU step uses Inductor", path, error)
        return None
    step = library.slbi_bucket_step
    step.argtypes = argtypes()
    step.restype = ctypes.c_int64
    return library


def variant(dtype: torch.dtype, state_dtype: torch.dtype | None = None) -> str | None:
    """The variant of the C kernel (:mod:`.cpu_tune`) that launches for buckets of
    ``dtype`` with ``state_dtype`` state run: the one :func:`using_variant` names, else
    ``$SLBI_TRITON_CPU_VARIANT``, else the autotuned one (tuned on first use, then read
    from the cache folder), or :data:`.cpu_tune.DEFAULT` with ``SLBI_TRITON_AUTOTUNE=0``.
    ``None`` where the kernel cannot be built for these dtypes.

    Raises:
        ValueError: ``$SLBI_TRITON_CPU_VARIANT`` is not a variant this CPU can run.
    """
    state_dtype = state_dtype or dtype
    if state_dtype not in STATE_DTYPES.get(dtype, ()):
        return None
    return _USING.get() or _chosen(dtype, state_dtype)


@contextlib.contextmanager
def using_variant(name: str) -> Iterator[None]:
    """Launches in this context (this thread or task) run variant ``name``: for tests and
    benchmarks that compare variants side by side in one process.

    Raises:
        ValueError: ``name`` is not a variant this CPU can run.
    """
    token = _USING.set(cpu_tune.parse(name).name)
    try:
        yield
    finally:
        _USING.reset(token)


@functools.cache
def _chosen(dtype: torch.dtype, state_dtype: torch.dtype) -> str | None:
    """The forced, cached or autotuned variant of a build, chosen once per process."""
    forced = cpu_tune.forced()
    if forced is not None:
        return forced.name
    if not cpu_tune.enabled():
        return cpu_tune.DEFAULT.name
    compiler = _compiler()
    if compiler is None:
        logger.warning("SLBI: no C compiler found ($CC, cc, gcc); the CPU step uses Inductor instead")
        return None
    try:
        with _TUNE_LOCK:
            return _tune(dtype, state_dtype, compiler, default_cache_dir())
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("SLBI: cannot tune the C kernel (%s); the CPU step uses Inductor", error)
        return None


def _tune(dtype: torch.dtype, state_dtype: torch.dtype, compiler: list[str], cache_dir: Path) -> str | None:
    """The cached choice for this build, else the fastest of :func:`.cpu_tune.candidates`
    on :func:`.cpu_tune.scratch_bucket` (each built first; :data:`.cpu_tune.DEFAULT` unless
    another beats it by :data:`.cpu_tune.MARGIN`), kept in the cache folder."""
    source = hashlib.sha256(source_bytes()).hexdigest()
    parts = [source, " ".join(_OPTIMISE), _compiler_version(compiler), _machine_key()]
    record = cpu_tune.choice_path(cache_dir, _build_name(dtype, state_dtype), parts)
    kept = cpu_tune.read_choice(record)
    if kept is not None:
        return kept.name
    names = [candidate.name for candidate in cpu_tune.candidates()]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        built = list(pool.map(lambda name: build(dtype, state_dtype, cache_dir, name), names))
    names = [name for name, path in zip(names, built, strict=True) if path is not None]
    names = [name for name in names if _library(dtype, state_dtype, name) is not None]
    if len(names) < 2:
        return names[0] if names else None
    start = time.perf_counter()
    args = cpu_tune.scratch_bucket(dtype, state_dtype)

    def step(name: str) -> None:
        with using_variant(name):
            launch(args, num_threads=1)

    preferred = cpu_tune.DEFAULT.name if cpu_tune.DEFAULT.name in names else None
    steps = {name: functools.partial(step, name) for name in names}
    best, scores = cpu_tune.fastest(steps, preferred=preferred)
    cpu_tune.write_choice(record, cpu_tune.parse(best), scores)
    logger.info("SLBI: the C kernel's variant for %s with %s state on %s: %s (tuned in %.2fs, kept in %s)",
                dtype, state_dtype, cpu_tune.cpu_model(), best, time.perf_counter() - start, record)
    return best


def available(dtype: torch.dtype, state_dtype: torch.dtype | None = None) -> bool:
    """Whether the C kernel exists (or can be built here) for buckets of ``dtype`` with Z
    and v in ``state_dtype`` (default: ``dtype``); builds (and tunes) it on first use.

    Raises:
        ValueError: ``$SLBI_TRITON_CPU_VARIANT`` is not a variant this CPU can run.
    """
    name = variant(dtype, state_dtype)
    return name is not None and _library(dtype, state_dtype or dtype, name) is not None


SIZE_ARGS: tuple[tuple[str, type], ...] = (
    ("wide_index", ctypes.c_int),
    ("num_chunks", ctypes.c_int64),
    ("numel", ctypes.c_int64),
    ("num_slots", ctypes.c_int64),
    ("num_groups", ctypes.c_int64),
    ("num_norms", ctypes.c_int64),
    ("num_coupled", ctypes.c_int64),
    ("num_members", ctypes.c_int64),
    ("prefetch_min_numel", ctypes.c_int64),
    ("num_threads", ctypes.c_int),
)
"""The C kernel's arguments after those of the op: what the launcher reads off the
buffers (the index tables' width, the chunks, elements, parameters, param groups, norms,
coupled groups and their members), the prefetch threshold and the thread count."""


def argtypes() -> list[type]:
    """The ``ctypes`` types of ``slbi_bucket_step``'s arguments: a pointer per tensor of
    :class:`.abi.BucketArgs` (``NULL`` for ``None``), an ``int`` per bool, then
    :data:`SIZE_ARGS`."""
    kinds = {"Tensor": ctypes.c_void_p, "bool": ctypes.c_int}
    return [kinds[spec.kind] for spec in abi.arg_specs()] + [kind for _, kind in SIZE_ARGS]


def launch(args: abi.BucketArgs, num_threads: int | None = None) -> None:
    """Run ``slbi_triton::bucket_step`` on CPU buffers in one call of the C kernel. Every
    buffer's dtype, layout and size is checked here, every chunk's and coupled table's
    bounds in the kernel before it writes: a bad input changes nothing.

    Args:
        args: the op's arguments (:class:`.abi.BucketArgs`).
        num_threads: OpenMP threads (default: ``torch.get_num_threads()``); the result
            does not depend on it.

    Raises:
        RuntimeError: if the kernel is not available for these dtypes (see :func:`available`).
        ValueError: if a buffer, a chunk or a coupled table does not fit the ABI.
    """
    params, chunks, hparams, group_norms = args.params, args.chunks, args.hparams, args.group_norms
    library = _library_for(params.dtype, args.z.dtype, args.stochastic_rounding)
    numel = params.numel()
    _check_buffers(
        (params, "params", params.dtype, numel),
        (args.grads, "grads", params.dtype, numel),
        (args.z, "z", args.z.dtype, numel),
        (args.momentum, "momentum", args.z.dtype, numel),
        (group_norms, "group_norms", abi.norm_dtype(params.dtype), None),
        (chunks, "chunks", chunks.dtype if chunks.dtype in (torch.int32, torch.int64) else torch.int64, None),
        (args.slot_flags, "slot_flags", torch.int32, None),
        (hparams, "hparams", torch.float64, None),
        (args.rng, "rng", torch.int64, abi.RNG_FIELDS),
        (args.inv_scale, "inv_scale", torch.float32, 1),
        (args.found_inf, "found_inf", torch.float32, 1),
    )
    if chunks.dim() != 2 or chunks.shape[1] != abi.CHUNK_FIELDS:
        shape = tuple(chunks.shape)
        raise ValueError(f"chunks must have shape (num_chunks, {abi.CHUNK_FIELDS}), got {shape}")
    if hparams.dim() != 2 or hparams.shape[1] != abi.HPARAM_FIELDS:
        shape = tuple(hparams.shape)
        raise ValueError(f"hparams must have shape (num_groups, {abi.HPARAM_FIELDS}), got {shape}")
    coupling = abi.coupling_of(args)
    num_coupled = 0 if coupling is None else coupling.coupled_scale.numel()
    bad = library.slbi_bucket_step(
        *[_pointer(value) for value in args[:-1]], args.stochastic_rounding,
        chunks.dtype == torch.int64, chunks.shape[0], numel, args.slot_flags.numel(), hparams.shape[0],
        group_norms.numel(), num_coupled, 0 if coupling is None else coupling.coupled_rows.numel(),
        PREFETCH_MIN_NUMEL.get(args.z.dtype, NO_PREFETCH),
        num_threads if num_threads is not None else torch.get_num_threads(),
    )
    if bad >= 0:  # checked before anything was written
        raise ValueError(f"chunk {bad} {chunks[bad].tolist()} reaches outside the buffers or tables")
    if bad == _BAD_COUPLING:
        raise ValueError("a coupled table (norm_index, coupled_offsets, coupled_rows) reaches outside "
                         "group_norms or the member list; nothing was written")
    if bad == _BAD_BUILD:  # _library_for chose the build: a mismatch is a defect here
        raise RuntimeError("the C kernel was called with another stochastic_rounding than its build")


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


_BAD_COUPLING, _BAD_BUILD = -2, -3  # slbi_bucket_step's other refusals (SLBI_BAD_*)


def _library_for(dtype: torch.dtype, state_dtype: torch.dtype, stochastic_rounding: bool) -> ctypes.CDLL:
    """The build for a bucket of ``dtype`` with ``state_dtype`` state; bfloat16 state of
    a wider bucket is stored with stochastic rounding, any other state without."""
    if stochastic_rounding != (state_dtype == torch.bfloat16 != dtype):
        raise ValueError(
            f"the C kernel stores {state_dtype} state of a {dtype} bucket "
            f"{'with' if state_dtype == torch.bfloat16 else 'without'} stochastic rounding"
        )
    key = (dtype, state_dtype, _USING.get())
    library = _LAUNCHED.get(key)
    if library is None:
        name = variant(dtype, state_dtype)
        library = _library(dtype, state_dtype, name) if name is not None else None
        if library is None:
            raise RuntimeError(f"the SLBI CPU kernel is not available for {dtype} with {state_dtype} state")
        _LAUNCHED[key] = library
    return library


_LAUNCHED: dict[tuple[torch.dtype, torch.dtype, str | None], ctypes.CDLL] = {}
"""The library launches run, by (dtype, state dtype, :func:`using_variant`'s name): one
dict lookup per launch instead of the two cached calls behind it (1-2 µs, against a
LeNet-5 step of 35 µs)."""


def _forget() -> None:
    """Forget every loaded library and chosen variant, as a new process would (tests)."""
    _library.cache_clear()
    _chosen.cache_clear()
    _LAUNCHED.clear()


def _check_buffers(*buffers: tuple[Tensor | None, str, torch.dtype, int | None]) -> None:
    """The kernel trusts raw pointers: each buffer is a contiguous CPU tensor of its dtype
    (and size, where one is given); ``None`` only for the optional ones."""
    for tensor, name, dtype, numel in buffers:
        if tensor is None:
            if name not in _OPTIONAL:
                raise ValueError(f"{name} is required")
        elif not tensor.is_cpu or tensor.dtype != dtype or not tensor.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous CPU tensor of {dtype}, got {tensor.dtype} on {tensor.device}"
            )
        elif numel is not None and tensor.numel() != numel:
            raise ValueError(f"{name} must have {numel} elements, got {tensor.numel()}")


_OPTIONAL = frozenset(("momentum", "inv_scale", "found_inf"))
