"""benchmarks/cpu_ablation.py in CI quick mode: every contender runs, the autotuned variant
is compared with the fixed ones, and the switches it turns are back where they were."""

from __future__ import annotations

import torch
from slbi_triton.kernels import cpu_step, cpu_tune

from benchmarks import cpu_ablation
from slbi_triton import hugepages


def test_cpu_ablation_quick(capsys) -> None:
    limits = (hugepages.MIN_BYTES, dict(cpu_step.PREFETCH_MIN_NUMEL))
    threads = str(torch.get_num_threads())  # main() sets the thread count: keep the session's
    argv = ["--sets", "resnet20", "--scale", "4", "--rounds", "2", "--threads", threads]
    assert cpu_ablation.main(argv) == 0
    out = capsys.readouterr().out
    assert f"# CPU: {cpu_tune.describe()}" in out
    for state, state_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        chosen = cpu_step.variant(torch.float32, state_dtype)
        assert f"{state} state {chosen}" in out
        for variant in ["autotuned", "4 KiB pages", *(v.name for v in cpu_tune.candidates())]:
            assert f"slbi {state} state, {variant} " in out
        assert f"{state} state: autotuned {chosen} " in out
    assert limits == (hugepages.MIN_BYTES, cpu_step.PREFETCH_MIN_NUMEL)
    assert cpu_step.variant(torch.float32) == cpu_step._chosen(torch.float32, torch.float32)  # none forced
