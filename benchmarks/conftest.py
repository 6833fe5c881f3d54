"""Quick-mode set-up for the benchmark tests (CI sizes; see ``benchmarks/test_bench_*.py``).

Triton kernels, where a test uses them on the CPU, run under the interpreter, as in
``tests/``. Each benchmark test runs with one torch thread: on a shared machine, OpenMP
threads that wait for a busy core turn microsecond steps into milliseconds, and the
quick tests check plumbing, not speed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run the test with ``torch.set_num_threads(1)`` and restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
