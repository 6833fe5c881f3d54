"""Test set-up: Triton kernels run on the CPU through the interpreter."""

import os

# Must be set before Triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Imported after it: torch may import Triton.
import pytest
import torch


@pytest.fixture
def torch_globals_restored():
    """``slbi_triton.train.main()`` sets the thread count and denormal flushing for the
    whole process: put them back after the test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)
