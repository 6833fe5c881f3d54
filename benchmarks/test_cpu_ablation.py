"""benchmarks/cpu_ablation.py in CI quick mode: every contender runs, and the switches it
turns are back where they were afterwards."""

from __future__ import annotations

import torch
from slbi_triton.kernels import cpu_step

from benchmarks import cpu_ablation
from slbi_triton import hugepages


def test_cpu_ablation_quick(capsys) -> None:
    limits = (hugepages.MIN_BYTES, dict(cpu_step.PREFETCH_MIN_NUMEL))
    threads = str(torch.get_num_threads())  # main() sets the thread count: keep the session's
    argv = ["--sets", "resnet20", "--scale", "4", "--rounds", "2", "--threads", threads]
    assert cpu_ablation.main(argv) == 0
    out = capsys.readouterr().out
    for state in ("fp32", "bf16"):
        switched = ", no prefetch" if state == "bf16" else ", prefetch"
        for variant in ("", ", 4 KiB pages", switched):
            assert f"slbi {state} state{variant} " in out
    assert limits == (hugepages.MIN_BYTES, cpu_step.PREFETCH_MIN_NUMEL)
