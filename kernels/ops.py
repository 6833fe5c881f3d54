"""The custom ops of slbi-triton: ``torch.ops.slbi_triton.bucket_step`` and its test twin.

``bucket_step`` performs one fused SLBI step over a flat bucket (``docs/design.md``, "The
kernel ABI"), registered by device: the C kernel on the CPU (:mod:`.cpu_step`), the Triton
kernel on CUDA (:mod:`.triton_step`). The optimizer calls it the same way in eager mode
and inside ``torch.compile``, where it is one opaque, correctly ordered mutation of its
buffers (functionalised by torch); it allocates nothing, so a CUDA step can be captured in
a CUDA graph. Its fake implementation describes no outputs: it mutates only.

``bucket_step_interpreted`` takes the same arguments and runs the Triton kernel on CPU
buffers under Triton's interpreter (``TRITON_INTERPRET=1``): how the tests and a
``backend="triton"`` optimizer on the CPU run the GPU kernel without a GPU. A second op,
rather than a flag of the first, keeps the test-only path out of the production op's
signature while staying an opaque op under ``torch.compile`` like the real one.

Both are defined with ``torch.library.Library`` rather than ``torch.library.custom_op``:
the latter's Python wrapper costs ~40 µs per eager call, this ~2 µs. Their schema is
derived from :class:`.abi.BucketArgs` (:func:`.abi.op_schema`).
"""

from __future__ import annotations

import os

import torch

from . import abi, cpu_step

_LIBRARY = torch.library.Library("slbi_triton", "DEF")
_LIBRARY.define(abi.op_schema("bucket_step"))
_LIBRARY.define(abi.op_schema("bucket_step_interpreted"))

bucket_step = torch.ops.slbi_triton.bucket_step.default
"""The op, ready to call: ``bucket_step(*abi.BucketArgs(...))``."""
bucket_step_interpreted = torch.ops.slbi_triton.bucket_step_interpreted.default
"""The Triton kernel under its interpreter, on CPU buffers (tests)."""


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
    cpu_step.launch(abi.BucketArgs(*args))


def _interpreted(*args: object) -> None:
    launch = triton_launcher()
    if launch is None or not triton_interpreted():
        raise RuntimeError("slbi_triton::bucket_step_interpreted needs Triton and TRITON_INTERPRET=1")
    launch(abi.BucketArgs(*args))


def _cuda(*args: object) -> None:
    launch = triton_launcher()
    if launch is None:
        raise RuntimeError("slbi_triton::bucket_step on CUDA needs Triton, which cannot be imported")
    launch(abi.BucketArgs(*args))


_LIBRARY.impl("bucket_step", _cpu, "CPU")
_LIBRARY.impl("bucket_step", _cuda, "CUDA")
_LIBRARY.impl("bucket_step_interpreted", _interpreted, "CPU")


@torch.library.register_fake("slbi_triton::bucket_step")
def _(*args: object) -> None:
    # Mutations only, no outputs: nothing to describe to the tracer.
    return None


@torch.library.register_fake("slbi_triton::bucket_step_interpreted")
def _(*args: object) -> None:
    return None
