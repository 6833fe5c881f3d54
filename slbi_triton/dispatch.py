"""Which kernel runs a bucket, and how it is called: the optimizer's four paths side by side.

Each bucket gets one kernel when the buffers are laid out, never per step; the kernel
object holds its bucket and the tables it reads (a step calls ``kernel(active, ...)``):

- ``"triton"``: the op ``slbi_triton::bucket_step`` on CUDA (the Triton kernel), or the
  same kernel under the Triton interpreter on the CPU (``TRITON_INTERPRET=1``, tests: the
  op ``slbi_triton::bucket_step_interpreted``);
- ``"c"``: the same op on the CPU (the C kernel), for float32 buckets (with float32 or
  bfloat16 state) and float64 buckets;
- ``"inductor"``: :func:`functional.slbi_update_` compiled by Inductor, one fused loop per
  run of parameters (the CPU path for bfloat16/float16 buckets, or without a C compiler);
- ``"eager"``: the same function in plain torch ops (``fused=False``, and ``backend="torch"``
  on CUDA unless ``fused=True``).
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import functional
from .buckets import FlatBucket
from .kernels import abi, cpu_step, ops

logger = logging.getLogger(__name__)

KERNELS = ("triton", "c", "inductor", "eager")


@dataclass(frozen=True)
class KernelInfo:
    """One row of ``SLBI.kernels()``: which kernel updates which parameters.

    Attributes:
        kernel: ``"triton"``, ``"c"``, ``"inductor"`` or ``"eager"``.
        device, dtype: the bucket's device and parameter dtype.
        state_dtype: the dtype Z and the momentum buffer are stored in.
        params: the parameters' names (their index where unnamed), in parameter order.
        variant: for ``"c"``, the C kernel's variant (autotuned per machine, see
            ``kernels/cpu_tune.py``), e.g. ``"v256-nopf"``; ``None`` for the others.
    """

    kernel: str
    device: torch.device
    dtype: torch.dtype
    state_dtype: torch.dtype
    params: tuple[str | int, ...]
    variant: str | None = None


def kernel_infos(kernels: Sequence[BucketKernel]) -> list[KernelInfo]:
    """``SLBI.kernels()``: one :class:`KernelInfo` per bucket, from its kernel object."""
    return [
        KernelInfo(
            kernel.name, kernel.bucket.device, kernel.bucket.dtype, kernel.bucket.state_dtype,
            tuple(slot.name if slot.name is not None else slot.index
                  for slot in sorted(kernel.bucket.slots, key=lambda s: s.index)),
            kernel_variant(kernel.name, kernel.bucket.dtype, kernel.bucket.state_dtype),
        )
        for kernel in kernels
    ]


def kernel_variant(kernel: str, dtype: torch.dtype, state_dtype: torch.dtype) -> str | None:
    """``KernelInfo.variant`` of a bucket that ``kernel`` updates."""
    return cpu_step.variant(dtype, state_dtype) if kernel == "c" else None


class HparamTables:
    """The ABI's hyper-parameter table per device: uploaded again only when a plain value
    changed; built with device ops when a value is a tensor or the step is traced."""

    def __init__(self) -> None:
        self._cache: dict[torch.device, tuple[tuple[Any, ...], Tensor]] = {}

    def get(self, groups: Sequence[Mapping[str, Any]], device: torch.device) -> Tensor:
        if torch.compiler.is_compiling():
            return abi.hparam_table_traced(groups, device)
        values = tuple(group[key] for group in groups for key in _KEYS)
        if any(isinstance(value, Tensor) for value in values):
            return abi.hparam_table_traced(groups, device)  # read on the device, never cached
        cached = self._cache.get(device)
        if cached is not None and cached[0] == values:
            return cached[1]
        if device.type == "cpu":
            table = torch.tensor(abi.hparam_values(groups), dtype=torch.float64)
        else:  # device ops: a copy from pageable host memory would wait for the device
            table = abi.hparam_table_traced(groups, device)
        self._cache[device] = (values, table)
        return table


_KEYS = tuple(abi.HPARAM_KEYS.values())


class FusedKernel:
    """One call of the op ``slbi_triton::bucket_step`` per step of its bucket, group norms
    (own and coupled) included.

    Args:
        bucket: the bucket it updates.
        name: ``"triton"`` or ``"c"``.
    """

    def __init__(self, bucket: FlatBucket, name: str) -> None:
        self.name = name
        self.bucket = bucket
        geometry = abi.TRITON_GEOMETRY if name == "triton" else abi.CPU_GEOMETRY
        self.chunks = bucket.chunk_table(geometry)  # built once here, never in a traced step
        self.coupling = bucket.coupling or abi.CoupledTables(None, None, None, None)
        self.stochastic_rounding = bucket.stochastic_rounding
        interpreted = name == "triton" and bucket.device.type == "cpu"
        self.op = ops.bucket_step_interpreted if interpreted else ops.bucket_step

    def __call__(
        self, active: list[bool], groups: Sequence[Mapping[str, Any]], tables: HparamTables,
        inv_scale: Tensor | None, found_inf: Tensor | None,
    ) -> None:
        bucket = self.bucket
        self.op(
            bucket.params, bucket.grads, bucket.z, bucket.momentum, bucket.group_norms, self.chunks,
            bucket.slot_flags(active), tables.get(groups, bucket.device), bucket.rng, inv_scale, found_inf,
            *self.coupling, self.stochastic_rounding,
        )


@functools.cache
def _compiled_update(variant: tuple[Any, ...]) -> Callable[..., None]:
    """``functional.slbi_update_`` compiled by Inductor with dynamic shapes for one
    :func:`update_variant`: one fused loop per run, no temporaries.

    Each variant gets a copy of the function with a code object of its own: Dynamo keeps
    its compiled graphs per code object, so variants neither recompile each other's
    guards nor share ``torch._dynamo.config.recompile_limit`` (8), past which one code
    object runs eager, silently but for a log line (bf16 and fp16 buckets, bfloat16
    state, GradScaler and penalties reach it in one process).
    """
    source = functional.slbi_update_
    code = source.__code__.replace(co_name=f"slbi_update_variant_{len(_VARIANTS)}")
    _VARIANTS.append(variant)
    twin = types.FunctionType(code, source.__globals__, code.co_name, source.__defaults__, source.__closure__)
    twin.__kwdefaults__ = source.__kwdefaults__
    return torch.compile(twin, dynamic=True)


_VARIANTS: list[tuple[Any, ...]] = []  # the variants compiled so far, in order (names the code objects)


def update_variant(kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a compiled :func:`functional.slbi_update_` specialises on: the penalty and
    flags, which optional tensors are given, each tensor's dtype, rank and device, each
    number's type, the sizes, offsets and ints Dynamo never makes dynamic (0 and 1), and
    which sizes and ints are equal (Dynamo's "duck sizing" would guard on it)."""
    variant: list[Any] = []
    sizes: list[int] = []
    for key, value in sorted(kwargs.items()):
        if isinstance(value, Tensor):
            dims = (*value.shape, value.storage_offset())
            sizes += dims
            variant.append((key, value.dtype, value.device.type, tuple(size <= 1 for size in dims)))
        elif value is None or isinstance(value, (str, bool)):
            variant.append((key, value))
        elif isinstance(value, int):
            sizes.append(value)
            variant.append((key, int, value in (0, 1)))
        else:  # a float: dynamic
            variant.append((key, type(value)))
    variant.append(tuple(sizes.index(size) for size in sizes))
    return tuple(variant)


class TorchKernel:
    """:func:`functional.slbi_update_` per run of the bucket: eager, or Inductor-compiled
    (``name="inductor"``; a failed compile logs a warning and stays eager); then the
    coupled norms (:func:`functional.coupled_norms_`).

    Args:
        bucket: the bucket it updates.
        name: ``"inductor"`` or ``"eager"``.
    """

    def __init__(self, bucket: FlatBucket, name: str) -> None:
        self.name = name
        self.bucket = bucket

    def __call__(
        self, active: list[bool], groups: Sequence[Mapping[str, Any]], tables: HparamTables,
        inv_scale: Tensor | None, found_inf: Tensor | None,
    ) -> None:
        bucket = self.bucket
        traced = torch.compiler.is_compiling()  # an outer compile fuses the update already
        for run in bucket.runs(active):
            group = groups[run.group_index]
            kwargs = self._arguments(bucket, run, group, inv_scale, found_inf)
            # Compile the steady state only: a first step (momentum not ready) runs once.
            steady = run.momentum_ready or group["momentum"] == 0
            if self.name == "inductor" and steady and not traced:
                try:
                    _compiled_update(update_variant(kwargs))(**kwargs)
                except Exception as error:  # Inductor unavailable (no C++ compiler, ...)
                    logger.warning("SLBI: compiling the fused update failed (%s); staying eager", error)
                    self.name = "eager"
                    functional.slbi_update_(**kwargs)
            else:
                functional.slbi_update_(**kwargs)
            if run.penalty == "group":
                own = bucket.group_norms[run.norm_start : run.norm_end]
                functional.refresh_group_norms_(kwargs["z"], own, found_inf)
        bucket.refresh_coupled_norms(found_inf)
        abi.count_step_(bucket.rng, found_inf)

    def _arguments(
        self, bucket: FlatBucket, run: Any, group: Mapping[str, Any], inv_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> dict[str, Any]:
        span = slice(run.start, run.end)
        rows = (-1, run.group_size) if run.penalty == "group" else (-1,)
        has_momentum = group["momentum"] != 0 and bucket.momentum is not None
        norms = None
        if run.penalty == "group":  # the norms the rows' prox reads: own, or coupled
            norms = bucket.group_norms[run.norm_start : run.norm_end]
            if bucket.coupling is not None:
                norms = bucket.group_norms[bucket.coupling.norm_index[run.norm_start : run.norm_end]]
        kwargs = {key: group[key] for key in abi.HPARAM_KEYS.values()}
        kwargs.update(
            w=bucket.params[span].view(rows),
            g=bucket.grads[span].view(rows),
            z=bucket.z[span].view(rows) if run.penalty != "none" else None,
            v=bucket.momentum[span].view(rows) if has_momentum else None,
            group_norms=norms,
            penalty=run.penalty,
            momentum_ready=run.momentum_ready,
            inv_scale=inv_scale,
            found_inf=found_inf,
            rounding_rng=bucket.rng if bucket.stochastic_rounding else None,
            first_index=run.start,
        )
        return kwargs


BucketKernel = FusedKernel | TorchKernel


def check_backend(backend: str, device: torch.device) -> None:
    """Refuse ``backend="triton"`` where Triton cannot run parameters on ``device``."""
    if backend != "triton":
        return
    if ops.triton_launcher() is None:
        raise ValueError("backend='triton' but Triton cannot be imported; use backend='torch'")
    if device.type != "cuda" and not ops.triton_interpreted():
        raise ValueError(
            f"backend='triton' needs CUDA parameters (got {device.type}); on the CPU set "
            "TRITON_INTERPRET=1 (slow, for testing) or use backend='torch'"
        )


def choose_kernel(bucket: FlatBucket, backend: str, fused: bool | None) -> BucketKernel:
    """The kernel for ``bucket`` (see the module docstring for the rules).

    Raises:
        ValueError: ``backend="triton"`` where Triton cannot run.
    """
    check_backend(backend, bucket.device)
    on_cuda = bucket.device.type == "cuda"
    triton_ok = ops.triton_launcher() is not None
    if backend == "triton":
        return FusedKernel(bucket, "triton")
    if backend == "auto" and on_cuda and triton_ok:
        return FusedKernel(bucket, "triton")
    on_cpu = bucket.device.type == "cpu"
    if on_cpu and fused is not False and cpu_step.available(bucket.dtype, bucket.state_dtype):
        return FusedKernel(bucket, "c")
    compiled = fused if fused is not None else on_cpu
    return TorchKernel(bucket, "inductor" if compiled else "eager")


def amp_inputs_for(
    grad_scale: Tensor | None, found_inf: Tensor | None, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """GradScaler's scale as the factor that unscales the gradients, and its inf flag,
    on ``device``; device ops only (no host sync, traceable)."""
    inv_scale = None
    if grad_scale is not None:
        # The reciprocal in float64, as GradScaler.unscale_ takes it: the fused step
        # reads exactly the gradients an explicit unscale_() would have written.
        inv_scale = grad_scale.double().reciprocal().float().to(device)
    if found_inf is not None:
        found_inf = found_inf.to(device=device, dtype=torch.float32)
    return inv_scale, found_inf
