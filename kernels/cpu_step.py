"""The fused SLBI step on the CPU: the C kernel ``slbi_step_cpu.c`` and its launcher.

The kernel is the CPU twin of the Triton kernel: the same chunk, flag and
hyper-parameter tables (``chunk_format``), one call per bucket, W, Z, g and v read once
and W, Z, v written once, and the next step's group norms summed in the same pass. It
is built on first use with the system C compiler (``$CC``, else ``cc``), as Inductor
builds its CPU kernels, once per machine and dtype, into a cache folder
(``$SLBI_TRITON_CACHE_DIR``, else ``$XDG_CACHE_HOME/slbi_triton``, else
``~/.cache/slbi_triton``). Where no compiler works, :func:`available` is ``False`` and
the optimizer falls back to the Inductor-compiled torch update.
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

from . import chunk_format as cf

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("slbi_step_cpu.c")
SCALARS = {torch.float32: "float", torch.float64: "double"}
"""Bucket dtypes the kernel is built for, with their C type."""

PROFILER_NAME = "slbi_triton::cpu_bucket_step"
"""How a kernel call shows in ``torch.profiler`` traces."""

_OPTIMISE = ["-O3", "-march=native", "-ffp-contract=off", "-std=c11", "-fPIC", "-shared"]
_BUILD_LOCK = threading.Lock()


def _defines(scalar: str) -> list[str]:
    """The table layout of ``chunk_format`` as ``-D`` flags: one source of truth."""
    names = [n for n in dir(cf) if n.startswith(("CHUNK_", "HP_", "FLAG_")) or n.endswith("_FIELDS")]
    flags = [f"-D{name}={getattr(cf, name)}" for name in sorted(names)]
    flags += [f"-DPENALTY_{penalty.upper()}={code}" for penalty, code in cf.PENALTY_CODES.items()]
    return [*flags, f"-DSLBI_SCALAR={scalar}"]


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


def build(dtype: torch.dtype, cache_dir: Path | None = None) -> Path | None:
    """Compile the kernel for buckets of ``dtype`` into ``cache_dir`` (default:
    :func:`default_cache_dir`), unless a build for the same source, flags, compiler and
    CPU is there already. Returns the shared library's path, or ``None`` (with a logged
    warning) when no compiler works or the cache folder cannot be written."""
    compiler = _compiler()
    if compiler is None:
        logger.warning("SLBI: no C compiler found ($CC, cc, gcc); the CPU step uses Inductor instead")
        return None
    try:
        return _build_with(compiler, SCALARS[dtype], cache_dir or default_cache_dir())
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("SLBI: cannot build the C kernel with %r (%s); the CPU step uses Inductor",
                       compiler, error)
        return None


def _build_with(compiler: list[str], scalar: str, cache_dir: Path) -> Path | None:
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    # With OpenMP first; a compiler without it still builds the kernel, single-threaded.
    candidates = []
    for parallel in (["-fopenmp"], []):
        flags = [*_OPTIMISE, *parallel, *_defines(scalar)]
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags).encode(), version.encode(), _machine_key().encode()])
        ).hexdigest()[:24]
        candidates.append((flags, cache_dir / f"slbi_step_cpu_{scalar}_{key}.so"))
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
def _library(dtype: torch.dtype) -> ctypes.CDLL | None:
    with _BUILD_LOCK:
        path = build(dtype)
    if path is None:
        return None
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:  # e.g. a cache folder on a noexec mount
        logger.warning("SLBI: cannot load the C kernel %s (%s); the CPU step uses Inductor", path, error)
        return None
    step = library.slbi_bucket_step
    pointer = ctypes.c_void_p
    step.argtypes = [pointer] * 6 + [ctypes.c_int64] + [pointer] * 4 + [ctypes.c_int]
    step.restype = ctypes.c_int
    return library


def available(dtype: torch.dtype) -> bool:
    """Whether the C kernel exists (or can be built here) for buckets of ``dtype``."""
    return dtype in SCALARS and _library(dtype) is not None


def bucket_step(
    params: Tensor,
    grads: Tensor,
    z: Tensor,
    momentum: Tensor | None,
    group_norms: Tensor,
    chunks: Tensor,
    slot_flags: Tensor,
    hparams: Tensor,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    num_threads: int | None = None,
    check: bool = True,
) -> None:
    """Run one SLBI step over a flat CPU bucket in a single call of the C kernel.

    Args:
        params, grads, z: flat contiguous 1-D buffers of the bucket (float32 or float64).
        momentum: the flat momentum buffer, or ``None`` when no group keeps one.
        group_norms: float32 table of ‖Z_g‖, read for Γ_t and overwritten with ‖Z_{t+1,g}‖.
        chunks: int64 ``(num_chunks, CHUNK_FIELDS)`` table (see ``chunk_format``).
        slot_flags: int32 flag word per parameter (``FLAG_ACTIVE | FLAG_MOMENTUM_READY``).
        hparams: float64 ``(num_groups, HPARAM_FIELDS)`` hyper-parameter table.
        inv_scale: optional float32 1-element tensor that multiplies the gradients.
        found_inf: optional float32 1-element tensor: when non-zero, nothing is written.
        num_threads: OpenMP threads (default: ``torch.get_num_threads()``); the result
            does not depend on it.
        check: verify every buffer's device, layout, dtype and size first (the kernel
            trusts raw pointers); the optimizer, which built the buffers, skips it.

    Raises:
        RuntimeError: if the kernel is not available (see :func:`available`).
        ValueError: if a buffer is not a contiguous CPU tensor of the expected dtype/size.
    """
    library = _library(params.dtype) if params.dtype in SCALARS else None
    if library is None:
        raise RuntimeError(f"the SLBI CPU kernel is not available for {params.dtype}")
    # In the kernel's argument order, with the dtype and size each buffer must have.
    buffers = {
        "params": (params, params.dtype, params.numel()),
        "grads": (grads, params.dtype, params.numel()),
        "z": (z, params.dtype, params.numel()),
        "momentum": (momentum, params.dtype, params.numel()),
        "group_norms": (group_norms, torch.float32, None),
        "chunks": (chunks, torch.int64, None),
        "slot_flags": (slot_flags, torch.int32, None),
        "hparams": (hparams, torch.float64, None),
        "inv_scale": (inv_scale, torch.float32, 1),
        "found_inf": (found_inf, torch.float32, 1),
    }
    if check:
        _check_buffers(buffers)
    addresses = [None if tensor is None else tensor.data_ptr() for tensor, _, _ in buffers.values()]
    addresses.insert(6, chunks.shape[0])  # num_chunks follows the chunk table
    threads = num_threads if num_threads is not None else torch.get_num_threads()
    if torch._C._autograd._profiler_enabled():
        # Name the call for torch.profiler (the launch count of the benchmarks); the
        # range costs ~6 µs, so it is opened only while a profiler listens.
        with torch.profiler.record_function(PROFILER_NAME):
            library.slbi_bucket_step(*addresses, threads)
    else:
        library.slbi_bucket_step(*addresses, threads)


def _check_buffers(buffers: dict[str, tuple[Tensor | None, torch.dtype, int | None]]) -> None:
    """The kernel trusts raw pointers: check every buffer before handing them over."""
    for name, (tensor, dtype, numel) in buffers.items():
        if tensor is None:
            if name in ("momentum", "inv_scale", "found_inf"):
                continue
            raise ValueError(f"{name} is required")
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.dtype != dtype:
            raise ValueError(
                f"{name} must be a contiguous CPU tensor of {dtype}, got {tensor.dtype} on {tensor.device}"
            )
        if numel is not None and tensor.numel() != numel:
            raise ValueError(f"{name} must have {numel} elements, got {tensor.numel()}")
    chunks, hparams = buffers["chunks"][0], buffers["hparams"][0]
    if chunks.dim() != 2 or chunks.shape[1] != cf.CHUNK_FIELDS:
        raise ValueError(f"chunks must have shape (num_chunks, {cf.CHUNK_FIELDS}), got {tuple(chunks.shape)}")
    if hparams.dim() != 2 or hparams.shape[1] != cf.HPARAM_FIELDS:
        shape = tuple(hparams.shape)
        raise ValueError(f"hparams must have shape (num_groups, {cf.HPARAM_FIELDS}), got {shape}")
    _check_chunks(chunks, buffers["params"][0].numel(), buffers["slot_flags"][0].numel(),
                  hparams.shape[0], buffers["group_norms"][0].numel())


def _check_chunks(chunks: Tensor, numel: int, num_slots: int, num_groups: int, num_norms: int) -> None:
    """Every chunk stays inside the buffers and tables it indexes (see ``chunk_format``)."""
    if chunks.shape[0] == 0:
        return
    column = chunks.unbind(1)
    start, rows, row_len = column[cf.CHUNK_START], column[cf.CHUNK_ROWS], column[cf.CHUNK_ROW_LEN]
    end, slot, penalty = column[cf.CHUNK_END], column[cf.CHUNK_SLOT], column[cf.CHUNK_PENALTY]
    hparam_row, norm = column[cf.CHUNK_HPARAM_ROW], column[cf.CHUNK_NORM_OFFSET]
    group = penalty == cf.PENALTY_CODES["group"]
    # Bounded first, so that start + rows * row_len cannot overflow int64 (an l1/"none"
    # row may be longer than the tensor: its span is cut at `end`).
    bounded = (start >= 0) & (start <= numel) & (end >= 0) & (end <= numel)
    bounded &= (rows >= 0) & (rows < 2**31) & (row_len >= 0) & (row_len < 2**31)
    bad = ~bounded
    bad |= bounded & group & (start + rows * row_len > numel)  # l1/"none" spans are cut at `end`
    bad |= (slot < 0) | (slot >= num_slots) | (hparam_row < 0) | (hparam_row >= num_groups)
    bad |= (penalty < 0) | (penalty > max(cf.PENALTY_CODES.values()))
    bad |= group & ((norm < 0) | (norm + rows > num_norms))
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise ValueError(f"chunk {index} {chunks[index].tolist()} reaches outside the buffers or tables")


@torch.library.custom_op(
    "slbi_triton::cpu_bucket_step",
    mutates_args=("params", "z", "momentum", "group_norms"),
    device_types="cpu",
)
def cpu_bucket_step(
    params: Tensor,
    grads: Tensor,
    z: Tensor,
    momentum: Tensor | None,
    group_norms: Tensor,
    chunks: Tensor,
    slot_flags: Tensor,
    hparams: Tensor,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """:func:`bucket_step` as a torch custom op (``torch.ops.slbi_triton.cpu_bucket_step``):
    inside ``torch.compile`` the CPU step is one opaque, correctly ordered mutation of
    ``params``, ``z``, ``momentum`` and ``group_norms``, the same kernel as in eager mode."""
    bucket_step(params, grads, z, momentum, group_norms, chunks, slot_flags, hparams, inv_scale, found_inf)


@cpu_bucket_step.register_fake
def _(
    params, grads, z, momentum, group_norms, chunks, slot_flags, hparams, inv_scale=None, found_inf=None
) -> None:
    # Mutations only, no outputs: nothing to describe to the tracer.
    return None
