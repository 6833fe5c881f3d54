"""The CPU implementation of ``slbi_triton::bucket_step``: the C kernel ``slbi_step_cpu.c``,
its build and its launcher.

The kernel reads the tables of the kernel ABI (:mod:`.abi`), one call per bucket: W, Z,
g and v read once, W, Z, v written once, the next step's group norms summed in the same
pass. It is built on first use with the system C compiler (``$CC``, else ``cc``), as
Inductor builds its CPU kernels, once per machine and variant, into a cache folder
(``$SLBI_TRITON_CACHE_DIR``, else ``$XDG_CACHE_HOME/slbi_triton``, else
``~/.cache/slbi_triton``). Where no compiler works, :func:`available` is ``False`` and the
optimizer falls back to the Inductor-compiled torch update.
"""

from __future__ import annotations

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
from pathlib import Path

import torch
from torch import Tensor

from . import abi

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("slbi_step_cpu.c")
SCALARS = {torch.float32: "float", torch.float64: "double"}
"""Bucket dtypes the kernel is built for, with their C type."""
STATE_DTYPES = {torch.float32: (torch.float32, torch.bfloat16), torch.float64: (torch.float64,)}
"""Per bucket dtype, the dtypes its Z and momentum may be stored in (bfloat16: with
stochastic rounding)."""

PREFETCH_MIN_NUMEL: dict[torch.dtype, int] = {torch.bfloat16: 1 << 20}
"""By state dtype, the bucket size from which the C kernel walks spans in tiles with
software prefetch (see ``slbi_step_cpu.c``); a state dtype not listed never does. The
bfloat16-state loop (hash, conversions) is long enough per element that the hardware
prefetcher falls behind; the float32-state loop keeps it ahead on huge pages and was
slower with the prefetch (``python -m benchmarks.cpu_ablation``). Read at every launch;
W, Z and v are the same bits either way."""
NO_PREFETCH = 2**63 - 1

_OPTIMISE = ["-O3", "-march=native", "-ffp-contract=off", "-std=c11", "-fPIC", "-shared"]
# For bfloat16 state, 512-bit vectors where the CPU has them (GCC prefers 256 by default):
# its 16-bit packs and hash run at about twice the speed. float32 state gains nothing from
# them, and small tensors lose a little (longer masked tails).
_WIDE_VECTORS = ["-mprefer-vector-width=512"]
_BUILD_LOCK = threading.Lock()


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
    described = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            wanted = ("model name", "flags", "Features")
            described += [line for line in cpuinfo if line.startswith(wanted)][:2]
    except OSError:
        described.append(platform.processor())
    return "".join(described)


def build(dtype: torch.dtype, state_dtype: torch.dtype, cache_dir: Path | None = None) -> Path | None:
    """Compile the kernel for buckets of ``dtype`` with Z and v in ``state_dtype`` into
    ``cache_dir`` (default: :func:`default_cache_dir`), unless a build for the same
    source, flags, compiler and CPU is there already. Returns the shared library's path,
    or ``None`` (with a logged warning) when no compiler works or the cache folder cannot
    be written."""
    compiler = _compiler()
    if compiler is None:
        logger.warning("SLBI: no C compiler found ($CC, cc, gcc); the CPU step uses Inductor instead")
        return None
    try:
        state_bf16 = state_dtype == torch.bfloat16
        return _build_with(compiler, SCALARS[dtype], state_bf16, cache_dir or default_cache_dir())
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("SLBI: cannot build the C kernel with %r (%s); the CPU step uses Inductor",
                       compiler, error)
        return None


def _build_with(compiler: list[str], scalar: str, state_bf16: bool, cache_dir: Path) -> Path | None:
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    # With OpenMP first; a compiler without it still builds the kernel, single-threaded.
    candidates = []
    for parallel in (["-fopenmp"], []):
        flags = [*_OPTIMISE, *(_WIDE_VECTORS if state_bf16 else []), *parallel, *_defines(scalar, state_bf16)]
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags).encode(), version.encode(), _machine_key().encode()])
        ).hexdigest()[:24]
        variant = f"{scalar}_bf16" if state_bf16 else scalar
        candidates.append((flags, cache_dir / f"slbi_step_cpu_{variant}_{key}.so"))
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
def _library(dtype: torch.dtype, state_dtype: torch.dtype) -> ctypes.CDLL | None:
    with _BUILD_LOCK:
        path = build(dtype, state_dtype)
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


def available(dtype: torch.dtype, state_dtype: torch.dtype | None = None) -> bool:
    """Whether the C kernel exists (or can be built here) for buckets of ``dtype`` with Z
    and v in ``state_dtype`` (default: ``dtype``)."""
    state_dtype = state_dtype or dtype
    return state_dtype in STATE_DTYPES.get(dtype, ()) and _library(dtype, state_dtype) is not None


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
    library = _library(dtype, state_dtype) if state_dtype in STATE_DTYPES.get(dtype, ()) else None
    if library is None:
        raise RuntimeError(f"the SLBI CPU kernel is not available for {dtype} with {state_dtype} state")
    return library


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
