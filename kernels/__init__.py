"""The fused kernels of slbi-triton, installed as ``slbi_triton.kernels``.

:mod:`.abi` (the tables every kernel reads) and :mod:`.ops` (the op
``slbi_triton::bucket_step``) are plain Python; :mod:`.cpu_step` builds and calls the C
kernel; :mod:`.triton_step` imports Triton and is imported only when a bucket needs it, so
the CPU paths work on machines without Triton.
"""
