"""Triton JIT kernels of slbi-triton, installed as ``slbi_triton.kernels``.

``chunk_format`` is plain Python (the table layouts the kernels read) and always
importable; ``slbi_step`` imports Triton and is imported lazily by the Python layer,
so the torch backend works on machines without Triton.
"""
