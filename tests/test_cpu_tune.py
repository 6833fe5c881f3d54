"""The C kernel's variants and their autotune (``kernels/cpu_tune.py``): the names, the
forcing environment variable, the cached choice and its key, and what ``SLBI.kernels()``
reports. That every variant writes the same bits is in ``tests/test_c_kernel.py``."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable

import pytest
import torch
from slbi_triton.kernels import cpu_step, cpu_tune
from torch import nn

from slbi_triton import SLBI

from .helpers import HPARAMS

pytestmark = pytest.mark.skipif(
    not cpu_step.available(torch.float32), reason="no C compiler: the CPU step falls back to Inductor"
)
X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture
def unchosen(monkeypatch):
    """No variant forced and none chosen yet (as in a new process); the timing watched
    (the calls of ``cpu_tune.fastest``, by the names timed); forgotten again afterwards."""
    monkeypatch.delenv(cpu_tune.FORCE_ENV, raising=False)
    monkeypatch.delenv(cpu_tune.AUTOTUNE_ENV, raising=False)
    timed = []
    fastest = cpu_tune.fastest

    def spy(steps, *args, **kwargs):
        timed.append(sorted(steps))
        return fastest(steps, *args, **kwargs)

    monkeypatch.setattr(cpu_tune, "fastest", spy)
    cpu_step._forget()
    yield timed
    cpu_step._forget()


@pytest.fixture
def fresh(tmp_path, monkeypatch, unchosen):
    """``unchosen``, with an empty cache folder and nothing loaded (builds again)."""
    monkeypatch.setenv("SLBI_TRITON_CACHE_DIR", str(tmp_path))
    cpu_step._forget()
    yield tmp_path, unchosen
    cpu_step._forget()


def _slbi() -> SLBI:
    return SLBI([nn.Parameter(torch.randn(8, 3, 3, 3))], backend="torch", **HPARAMS)


@pytest.mark.parametrize("name", ["v256-nopf", "v512-pf4096-t512", "vdef-pf1024-t256", "v256-pf64-t64"])
def test_variant_names_round_trip(name: str) -> None:
    vector = name.split("-")[0]
    if (vector != "vdef") != X86 or (vector == "v512" and "avx512f" not in cpu_tune.cpu_flags()):
        pytest.skip(f"{vector} does not run on this CPU")
    variant = cpu_tune.parse(name)
    assert variant.name == name
    assert f"-DSLBI_PREFETCH_BYTES={variant.ahead}" in variant.flags()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("fast", "is not a C kernel variant"),
        ("v1024-nopf", "is not a C kernel variant"),
        ("v256-pf100-t64", "multiples of 64 bytes"),
        ("v256-pf4096-t0", "multiples of 64 bytes"),
        ("v256-pf4096-t131072", "tile at most 64 KiB"),
    ],
)
def test_bad_variant_names_are_refused(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cpu_tune.parse(name)


@pytest.mark.skipif(not X86 or "avx512f" in cpu_tune.cpu_flags(), reason="needs x86-64 without AVX-512")
def test_512_bit_vectors_need_avx512() -> None:
    with pytest.raises(ValueError, match="no AVX-512"):
        cpu_tune.parse("v512-nopf")
    assert {v.vector for v in cpu_tune.candidates()} == {256}


def test_forced_variant_runs_and_is_reported(unchosen, monkeypatch) -> None:
    name = cpu_tune.candidates()[-1].name
    monkeypatch.setenv(cpu_tune.FORCE_ENV, name)
    opt = _slbi()
    assert [(info.kernel, info.variant) for info in opt.kernels()] == [("c", name)]
    assert cpu_step.variant(torch.float32, torch.bfloat16) == name
    assert unchosen == []  # forced: nothing timed


def test_bad_forced_variant_is_a_clear_error(unchosen, monkeypatch) -> None:
    monkeypatch.setenv(cpu_tune.FORCE_ENV, "v256-pf4096")
    with pytest.raises(ValueError, match=r"SLBI_TRITON_CPU_VARIANT='v256-pf4096': .* not a C kernel variant"):
        _slbi()
    with pytest.raises(ValueError, match="not a C kernel variant"), cpu_step.using_variant("v256-pf4096"):
        pass


def test_autotune_off_runs_the_default(unchosen, monkeypatch) -> None:
    monkeypatch.setenv(cpu_tune.AUTOTUNE_ENV, "0")
    assert _slbi().kernels()[0].variant == cpu_tune.DEFAULT.name
    assert unchosen == []


def test_other_kernels_report_no_variant() -> None:
    opt = SLBI([nn.Parameter(torch.randn(4, 4))], backend="torch", fused=False)
    assert [(info.kernel, info.variant) for info in opt.kernels()] == [("eager", None)]


def test_autotune_runs_once_and_is_kept(fresh, monkeypatch) -> None:
    """The first use times every candidate and keeps the fastest in the cache folder; a
    new process reads it without timing; an unreadable record is tuned again."""
    folder, timed = fresh
    monkeypatch.setattr(cpu_tune, "SCRATCH_ROWS", 64)  # a short test, not a good measurement
    chosen = cpu_step.variant(torch.float32)
    assert timed == [sorted(v.name for v in cpu_tune.candidates())] and chosen in timed[0]
    [record] = folder.glob("slbi_step_cpu_float_*.tune.json")
    kept = json.loads(record.read_text())
    assert kept["variant"] == chosen and sorted(kept["score"]) == timed[0]
    assert kept["cpu"] == cpu_tune.cpu_model()
    cpu_step._forget()  # as a new process would
    assert cpu_step.variant(torch.float32) == chosen and len(timed) == 1
    record.write_text("{")
    cpu_step._forget()
    assert cpu_step.variant(torch.float32) in timed[0] and len(timed) == 2


class FakeClock:
    """``time.perf_counter`` for ``cpu_tune.fastest``: steps advance it by what they "take"."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def step(self, seconds) -> Callable[[], None]:
        """A step taking ``seconds``, or ``seconds(call)`` on its ``call``-th call."""
        calls = iter(range(1_000_000))

        def run() -> None:
            self.now += seconds(next(calls)) if callable(seconds) else seconds

        return run


def test_autotune_keeps_the_preferred_variant_unless_another_clearly_wins(monkeypatch) -> None:
    """Within cpu_tune.MARGIN of the preferred variant, a faster one is noise, not a choice;
    well below it, it wins."""
    clock = FakeClock()
    monkeypatch.setattr(cpu_tune, "time", clock)
    close = {"default": clock.step(4.0), "close": clock.step(4.0 * (1 - cpu_tune.MARGIN / 3))}
    assert cpu_tune.fastest(close, rounds=5, preferred="default")[0] == "default"
    assert cpu_tune.fastest(close, rounds=5)[0] == "close"  # without a preference: the fastest
    clear = {"default": clock.step(4.0), "clear": clock.step(1.0)}
    chosen, scores = cpu_tune.fastest(clear, rounds=5, preferred="default")
    assert chosen == "clear" and scores["clear"] < scores["default"] * (1 - cpu_tune.MARGIN)


def test_a_win_in_half_of_the_rounds_does_not_decide(monkeypatch) -> None:
    """A variant fast only while something else disturbed the first rounds stays unchosen."""
    clock = FakeClock()
    monkeypatch.setattr(cpu_tune, "time", clock)
    flaky = {"default": clock.step(4.0), "flaky": clock.step(lambda call: 1.0 if call < 5 else 4.0)}
    chosen, scores = cpu_tune.fastest(flaky, rounds=8, preferred="default")
    assert chosen == "default" and scores["flaky"] < scores["default"] * (1 - cpu_tune.MARGIN)


def test_choice_is_keyed_by_cpu_compiler_and_source(tmp_path) -> None:
    parts = ["source", "flags", "gcc 12.2", "AMD EPYC\navx2"]
    path = cpu_tune.choice_path(tmp_path, "float", parts)
    assert path == cpu_tune.choice_path(tmp_path, "float", list(parts))
    assert path.parent == tmp_path and path.name.startswith("slbi_step_cpu_float_")
    others = {cpu_tune.choice_path(tmp_path, "float_bf16", parts)}
    for index in range(len(parts)):
        changed = list(parts)
        changed[index] += " (another)"
        others.add(cpu_tune.choice_path(tmp_path, "float", changed))
    assert path not in others and len(others) == len(parts) + 1


def test_cpu_description_names_model_and_vector_flags() -> None:
    line = cpu_tune.describe()
    assert line.startswith(cpu_tune.cpu_model())
    if X86 and "avx2" in cpu_tune.cpu_flags():
        assert " avx2" in line
