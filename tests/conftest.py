"""Test set-up: Triton kernels run on the CPU through the interpreter."""

import os

# Must be set before Triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
