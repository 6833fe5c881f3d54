"""The one custom op of slbi-triton: ``torch.ops.slbi_triton.bucket_step``.

One fused SLBI step over a flat bucket (``docs/design.md``, "The kernel ABI"), registered
by device: the C kernel on the CPU (:mod:`.cpu_step`), the Triton kernel on CUDA
(:mod:`.triton_step`). The optimizer calls it the same way in eager mode and inside
``torch.compile``, where it is one opaque, correctly ordered mutation of its buffers
(functionalised by torch); it allocates nothing, so a CUDA step can be captured in a
CUDA graph. Its fake implementation describes no outputs: it mutates only.

The op is defined with ``torch.library.Library`` rather than ``torch.library.custom_op``:
the latter's Python wrapper costs ~40 µs per eager call, this ~2 µs.

Arguments: those of :class:`.abi.BucketArgs`, in order, then ``interpret_triton`` (CPU
buffers only: run the Triton kernel under ``TRITON_INTERPRET=1`` instead of the C kernel,
for tests).
"""

from __future__ import annotations

import os

import torch

from . import abi, cpu_step

_LIBRARY = torch.library.Library("slbi_triton", "DEF")
_LIBRARY.define(
    "bucket_step(Tensor(a!) params, Tensor grads, Tensor(b!) z, Tensor(c!)? momentum, "
    "Tensor(d!) group_norms, Tensor chunks, Tensor slot_flags, Tensor hparams, Tensor(e!) rng, "
    "Tensor? inv_scale, Tensor? found_inf, bool stochastic_rounding, bool interpret_triton) -> ()"
)

bucket_step = torch.ops.slbi_triton.bucket_step.default
"""The op, ready to call: ``bucket_step(params, grads, z, momentum, ...)``."""


def triton_interpreted() -> bool:
    """Whether Triton kernels run under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_launcher():
    """The Triton launcher, or ``None`` when Triton cannot be imported."""
    try:
        from .triton_step import launch
    except ImportError:
        return None
    return launch


def _cpu(*args: object) -> None:
    *buffers, interpret_triton = args
    if interpret_triton:
        launch = triton_launcher()
        if launch is None or not triton_interpreted():
            raise RuntimeError("interpret_triton=True needs Triton and TRITON_INTERPRET=1")
        launch(abi.BucketArgs(*buffers))
    else:
        cpu_step.launch(abi.BucketArgs(*buffers))


def _cuda(*args: object) -> None:
    launch = triton_launcher()
    if launch is None:
        raise RuntimeError("slbi_triton::bucket_step on CUDA needs Triton, which cannot be imported")
    launch(abi.BucketArgs(*args[:-1]))


_LIBRARY.impl("bucket_step", _cpu, "CPU")
_LIBRARY.impl("bucket_step", _cuda, "CUDA")


@torch.library.register_fake("slbi_triton::bucket_step")
def _(*args: object) -> None:
    # Mutations only, no outputs: nothing to describe to the tracer.
    return None
