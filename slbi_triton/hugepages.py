"""Allocating the flat CPU buffers on transparent huge pages.

A step streams every flat buffer from memory once; on 4 KiB pages a ResNet-50 step walks
about 120,000 pages, and the page walks and the hardware prefetcher's stops at each
page boundary cost as much as the arithmetic. On Linux, a CPU buffer of at least
:data:`MIN_BYTES` is therefore a private anonymous mapping advised ``MADV_HUGEPAGE``,
starting its lane's offset past a 2 MiB boundary (:func:`zeros`): where the kernel's THP
mode is ``madvise`` (the usual default) or ``always``, it is backed by 2 MiB pages; with
``never`` it keeps 4 KiB pages and works the same. Anywhere else (other systems, CUDA,
small buffers) it is ``torch.zeros``. Measured on the ResNet-18/50 sets, 1 thread, side by
side: on 4 KiB pages the step takes 9-13 % longer with bfloat16 state, 19-35 % with
float32 state (``python -m benchmarks.cpu_ablation``). torch can do the same for every
large allocation (``THP_MEM_ALLOC_ENABLE=1``, which speeds fused SGD up too); this module
does it for the optimizer's buffers alone, and so for the parameters and gradients
viewing them.
"""

from __future__ import annotations

import logging
import mmap

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 << 20
"""The x86-64 and arm64 (4 KiB base pages) transparent huge page."""
MIN_BYTES = 4 << 20
"""Smaller buffers stay in the caches, or would waste most of a huge page."""
LANE_BYTES = 1088
"""How far apart in a huge page buffers of successive lanes start (17 cache lines)."""


def advisable(device: torch.device, nbytes: int) -> bool:
    """Whether :func:`zeros` maps a buffer of ``nbytes`` on ``device`` itself."""
    return device.type == "cpu" and nbytes >= MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE")


def zeros(numel: int, dtype: torch.dtype, device: torch.device, lane: int = 0) -> Tensor:
    """A zero 1-D tensor of ``numel`` elements: on huge pages where :func:`advisable`,
    else from ``torch.zeros``. Buffers that a loop streams side by side take lanes 0, 1,
    2, 3: a huge-page buffer starts ``lane * LANE_BYTES`` past a 2 MiB boundary. All at
    the boundary, element i of each would share its L1 and L2 set and its 4 KiB alias
    class with element i of the others (measured: the float32-state step up to 1.5 x
    slower)."""
    nbytes = numel * dtype.itemsize
    if not advisable(device, nbytes):
        return torch.zeros(numel, dtype=dtype, device=device)
    # Private: a forked process (a DataLoader worker) gets a copy on write, as with malloc.
    # Anonymous memory reads as zero.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES + lane * LANE_BYTES, flags=mmap.MAP_PRIVATE)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError as error:  # a kernel built without THP: 4 KiB pages, nothing else changes
        logger.debug("SLBI: madvise(MADV_HUGEPAGE) refused (%s)", error)
    start = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
    # The tensor holds the mapping (unmapped when the last view goes).
    offset = -start % HUGE_PAGE_BYTES + lane * LANE_BYTES
    return torch.frombuffer(mapping, dtype=dtype, count=numel, offset=offset)
