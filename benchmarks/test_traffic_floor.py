"""benchmarks/traffic_floor.py in CI quick mode: it runs and times all five contenders."""

from __future__ import annotations

import torch

from benchmarks import traffic_floor


def test_traffic_floor_quick(capsys) -> None:
    medians = traffic_floor.measure(numel=4096, rounds=2, device=torch.device("cpu"))
    assert set(medians) == {"sgd-fused", "slbi", "slbi, bf16 state", "5 arrays (SGD's traffic)",
                            "7 arrays (SLBI's traffic)"}
    assert all(seconds > 0 for seconds in medians.values())
    threads = str(torch.get_num_threads())  # main() sets the thread count: keep the session's
    assert traffic_floor.main(["--numel", "3000", "--rounds", "2", "--threads", threads]) == 0
    assert "7 arrays (SLBI's traffic)" in capsys.readouterr().out
