"""The variants of the C kernel and the autotune that picks one per machine.

The C kernel (``slbi_step_cpu.c``) has switches whose best setting depends on the CPU, not
on the model: the software prefetch (off, or on so many bytes ahead in tiles of so many
bytes) and the vector width (256 or 512 bits, where the CPU has AVX-512). Every variant
writes the same W, Z and v bits (``tests/test_c_kernel.py``); only the speed differs. A
variant is named ``"{vector}-{prefetch}"``: ``vector`` is ``v256`` or ``v512``
(``-mprefer-vector-width``, x86-64 only; ``v256`` also runs the bfloat16-state loop
written by hand with AVX2 intrinsics, ``slbi_step_cpu_avx2.h``) or ``vdef`` (the compiler's
default width and its own vectorisation of every loop), ``prefetch``
is ``nopf`` or ``pf{ahead}-t{tile}`` (bytes of W), e.g. ``"v256-nopf"``,
``"v512-pf4096-t512"``.

The first time a build (bucket dtype, state dtype) is needed on a machine, every
:func:`candidates` variant is compiled and timed on a scratch bucket (:func:`scratch_bucket`,
larger than the last-level cache of current CPUs, as the buffers of a ResNet are) in
interleaved rounds, one thread (:func:`fastest`); the fastest (:data:`DEFAULT` unless another
beats it by :data:`MARGIN`) is kept in a JSON file
beside the compiled kernels, keyed by the CPU model and flags, the compiler, the source and
the candidates (:func:`choice_path`), so later processes read it. ``kernels/cpu_step.py``
runs this; ``SLBI.kernels()`` reports the variant in use.

Environment:
    ``SLBI_TRITON_CPU_VARIANT``: run this variant, untimed (tests, benchmarks); a bad name
        or one this CPU cannot run is an error.
    ``SLBI_TRITON_AUTOTUNE=0``: no autotune: :data:`DEFAULT` runs.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import abi

FORCE_ENV = "SLBI_TRITON_CPU_VARIANT"
AUTOTUNE_ENV = "SLBI_TRITON_AUTOTUNE"
RELEVANT_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                  "amx_bf16", "asimd", "sve", "bf16")
"""The CPU flags that decide which code the compiler emits for the kernel (benchmarks print them)."""
PREFETCHES = ((0, 0), (1024, 256), (4096, 512), (16384, 1024))
"""The (ahead, tile) bytes the autotune tries; (0, 0): no software prefetch."""
ROUNDS = 15
"""Timed rounds of the autotune (after one warm-up round)."""
MARGIN = 0.05
"""How much faster than :data:`DEFAULT` (a fraction of its score) another variant must be on
the scratch bucket to be chosen: on a shared machine two variants within a few percent swap
places from run to run (scores of 0.93 and 1.01 for one pair, the other way round in another
run), and one that wins the scratch bucket by noise can lose a ResNet step by 10 %."""

_NAME = re.compile(r"^(v256|v512|vdef)-(?:(nopf)|pf(\d+)-t(\d+))$")
_X86 = ("x86_64", "amd64", "i686", "i386")


@dataclass(frozen=True)
class Variant:
    """One build of the C kernel.

    Attributes:
        vector: 256 or 512 (bits, x86-64's ``-mprefer-vector-width``), or 0: the compiler's
            default for ``-march=native``.
        ahead: prefetch distance in bytes of W; 0: no software prefetch.
        tile: bytes of W per prefetched tile (0 without prefetch).
    """

    vector: int
    ahead: int
    tile: int

    @property
    def name(self) -> str:
        vector = f"v{self.vector}" if self.vector else "vdef"
        return f"{vector}-{f'pf{self.ahead}-t{self.tile}' if self.ahead else 'nopf'}"

    def flags(self) -> list[str]:
        """The compiler flags that make this variant."""
        width = [f"-mprefer-vector-width={self.vector}"] if self.vector else []
        hand = [f"-DSLBI_HAND_AVX2={int(self.vector == 256)}"]
        return [*width, *hand, f"-DSLBI_PREFETCH_BYTES={self.ahead}", f"-DSLBI_TILE_BYTES={self.tile or 512}"]


DEFAULT = Variant(256, 0, 0) if platform.machine().lower() in _X86 else Variant(0, 0, 0)
"""What runs with ``SLBI_TRITON_AUTOTUNE=0``: no software prefetch, 256-bit vectors on
x86-64 (the hardware prefetcher alone was at most 14 % slower where prefetch won, and
prefetch up to 50 % slower where it lost)."""


def parse(name: str) -> Variant:
    """The variant called ``name`` (see the module docstring), checked against this CPU.

    Raises:
        ValueError: not a variant name, or one this CPU cannot run.
    """
    match = _NAME.match(name.strip())
    if match is None:
        raise ValueError(
            f"{name!r} is not a C kernel variant: expected '{{v256|v512|vdef}}-nopf' or "
            "'{v256|v512|vdef}-pf<ahead>-t<tile>' (bytes), e.g. 'v256-nopf', 'v512-pf4096-t512'"
        )
    vector = 0 if match[1] == "vdef" else int(match[1][1:])
    ahead, tile = (0, 0) if match[2] else (int(match[3]), int(match[4]))
    if not match[2] and not (_lines(ahead) and _lines(tile) and tile <= 1 << 16 and ahead <= 1 << 20):
        raise ValueError(f"variant {name!r}: ahead and tile must be positive multiples of 64 bytes "
                         "(tile at most 64 KiB, ahead at most 1 MiB)")
    if vector and platform.machine().lower() not in _X86:
        raise ValueError(f"variant {name!r}: {match[1]} is for x86-64 CPUs; use 'vdef' on "
                         f"{platform.machine()}")
    if vector == 512 and "avx512f" not in cpu_flags():
        raise ValueError(f"variant {name!r}: this CPU ({cpu_model()}) has no AVX-512 (avx512f); use v256")
    return Variant(vector, ahead, tile)


def _lines(nbytes: int) -> bool:
    return nbytes > 0 and nbytes % 64 == 0


def candidates() -> list[Variant]:
    """The variants the autotune times on this CPU: each prefetch setting of
    :data:`PREFETCHES` with 256-bit vectors, and with 512-bit ones where the CPU has
    AVX-512 (on other architectures, the compiler's default width)."""
    if platform.machine().lower() not in _X86:
        widths = [0]
    else:
        widths = [256, 512] if "avx512f" in cpu_flags() else [256]
    return [Variant(width, ahead, tile) for width in widths for ahead, tile in PREFETCHES]


def forced() -> Variant | None:
    """The variant ``SLBI_TRITON_CPU_VARIANT`` names, or ``None``.

    Raises:
        ValueError: the name is not a variant this CPU can run.
    """
    name = os.environ.get(FORCE_ENV, "").strip()
    if not name:
        return None
    try:
        return parse(name)
    except ValueError as error:
        raise ValueError(f"{FORCE_ENV}={name!r}: {error}") from None


def enabled() -> bool:
    """Whether the autotune may run (``SLBI_TRITON_AUTOTUNE`` is not ``0``)."""
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


# -- the CPU ------------------------------------------------------------------------------


@functools.cache
def _cpuinfo(field: str) -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(field) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``: ``flags`` on x86, ``Features`` on arm)."""
    return frozenset((_cpuinfo("flags") or _cpuinfo("Features") or "").split())


def describe() -> str:
    """One line for benchmark headers: the CPU model and its :data:`RELEVANT_FLAGS`."""
    flags = cpu_flags()
    present = [flag for flag in RELEVANT_FLAGS if flag in flags]
    return f"{cpu_model()} ({platform.machine()}; {' '.join(present) or 'no vector flags listed'})"


# -- the cached choice --------------------------------------------------------------------


def choice_path(cache_dir: Path, build: str, parts: Sequence[str]) -> Path:
    """The file that keeps the choice for one build (e.g. ``"float_bf16"``): its name holds
    a hash of ``parts`` (source, flags, compiler, CPU; see ``cpu_step``), of the candidates
    and of the timing protocol, so a change of any of them tunes again."""
    protocol = [*parts, *(v.name for v in candidates()), f"rounds={ROUNDS}, ratio to the round's median",
                f"margin={MARGIN} for {DEFAULT.name}, over all rounds and each half",
                f"scratch={SCRATCH_ROWS}"]
    key = hashlib.sha256("\0".join(protocol).encode()).hexdigest()[:24]
    return cache_dir / f"slbi_step_cpu_{build}_{key}.tune.json"


def read_choice(path: Path) -> Variant | None:
    """The variant a previous autotune kept in ``path``, or ``None`` (none yet, unreadable,
    or no longer one this CPU runs)."""
    try:
        return parse(json.loads(path.read_text())["variant"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_choice(path: Path, chosen: Variant, scores: Mapping[str, float]) -> None:
    """Keep the choice and the scores behind it (:func:`fastest`; written under a
    temporary name, then renamed: a concurrent reader sees the old file or the new one)."""
    record = {
        "variant": chosen.name,
        "score": dict(scores),
        "cpu": cpu_model(),
        "flags": sorted(cpu_flags() & set(RELEVANT_FLAGS)),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as scratch:
        json.dump(record, scratch, indent=1)
    os.replace(scratch.name, path)


# -- the timing ---------------------------------------------------------------------------

SCRATCH_ROWS = 3648
"""Filters of 1152 elements (a 3×3 convolution on 128 channels) in the scratch bucket: 4.2M
elements, 50-67 MiB of W, g, Z and v, more than a 32 MiB last-level cache."""


def scratch_bucket(dtype: torch.dtype, state_dtype: torch.dtype) -> abi.BucketArgs:
    """A bucket shaped like a ResNet's buffers for the autotune: :data:`SCRATCH_ROWS`
    filters of 1152 elements under the group penalty, a 1000×512 l1 layer and 4096
    unpenalised elements, all with momentum, on huge pages as the optimizer's own buffers
    are. The values are constants (no NaN, no subnormals): the kernel's time does not
    depend on them, and random ones would take longer to make than the timing."""
    from .. import hugepages  # the package's allocator; imported here: it imports no kernel

    rows = SCRATCH_ROWS
    spans = _scratch_spans(rows)
    numel = spans[-1].offset + spans[-1].numel
    cpu = torch.device("cpu")
    buffers = [
        hugepages.zeros(numel, buffer_dtype, cpu, lane).fill_(value)
        for lane, (buffer_dtype, value) in enumerate(
            ((dtype, 0.01), (dtype, 0.001), (state_dtype, 0.005), (state_dtype, -0.002)))
    ]
    hparams = {"lr": 0.01, "kappa": 1.0, "mu": 100.0, "lam": 0.01, "momentum": 0.9, "dampening": 0.0,
               "weight_decay": 0.0}
    return abi.BucketArgs(
        *buffers, torch.full((rows,), 0.05, dtype=abi.norm_dtype(dtype)),
        abi.chunk_table(spans, abi.CPU_GEOMETRY, numel, rows),
        torch.tensor(abi.flag_words([True] * 3, [True] * 3), dtype=torch.int32),
        torch.tensor(abi.hparam_values([hparams]), dtype=torch.float64),
        torch.tensor([0, 0], dtype=torch.int64),
        stochastic_rounding=state_dtype == torch.bfloat16 != dtype,
    )


def _scratch_spans(rows: int) -> list[abi.Span]:
    group = abi.Span(0, rows * 1152, "group", rows, 1152)
    l1 = abi.Span(group.numel, 1000 * 512, "l1", 0, 0)
    return [group, l1, abi.Span(l1.offset + l1.numel, 4096, "none", 0, 0)]


def fastest(
    steps: Mapping[str, Callable[[], object]], rounds: int = ROUNDS, preferred: str | None = None
) -> tuple[str, dict[str, float]]:
    """The name of the fastest step, and every step's score: the median over ``rounds``
    timed rounds (after one warm-up round) of its time divided by the median time of
    that round. Each round calls every step once, in an order rotated by one per round.
    On a busy machine, load from other processes comes and goes over tens of
    milliseconds: the steps of one round see about the same load, and a ratio within a
    round cancels it where the median or the minimum of raw times (each of a few ms)
    picked the wrong variant in one run out of four. Ties go to the earlier name;
    ``preferred`` (a name of ``steps``) stays the choice unless another scores more than
    :data:`MARGIN` below it over all rounds and over each half of them (a disturbance in
    part of the timing, such as the builds' compilers still exiting, cannot decide)."""
    names = list(steps)
    if preferred is not None and preferred not in steps:
        raise ValueError(f"preferred {preferred!r} is not one of the steps {names}")
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds + 1):
        shift = index % len(names)
        times = {}
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            times[name] = time.perf_counter() - start
        if index:
            typical = statistics.median(times.values())
            for name in names:
                ratios[name].append(times[name] / typical)
    scores = {name: statistics.median(values) for name, values in ratios.items()}
    best = min(names, key=lambda name: (scores[name], names.index(name)))
    if preferred is not None and best != preferred:
        half = rounds // 2
        halves = (slice(None, half), slice(half, None)) if half else ()
        parts = [scores] + [
            {name: statistics.median(values[part]) for name, values in ratios.items()} for part in halves
        ]
        if any(part[best] >= part[preferred] * (1 - MARGIN) for part in parts):
            best = preferred
    return best, scores
