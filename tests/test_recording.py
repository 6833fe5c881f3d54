"""Recording (``step(record=True, path=...)``): the statistics, the record file, the loader,
and that recording leaves the update bit for bit unchanged."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from slbi_triton import SLBI
from slbi_triton.recording import (
    RECORD_COLUMNS,
    RECORD_FILENAME,
    STATS,
    append_records,
    load_records,
    summary_stats,
)
from slbi_triton.toolbox import UnknownLayerError


def numpy_stats(values: torch.Tensor) -> list[float]:
    array = values.detach().double().reshape(-1).numpy()
    return [
        array.max(),
        array.min(),
        array.mean(),
        np.median(array),
        np.percentile(array, 25),
        np.percentile(array, 75),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (2,), (7, 3), (1000,), (4, 3, 5, 5)])
def test_summary_stats_match_numpy(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    values = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))).to(dtype)
    stats = summary_stats(values)
    assert stats.dtype == torch.float64 and stats.shape == (len(STATS),)
    assert stats.tolist() == pytest.approx(numpy_stats(values), rel=1e-12, abs=1e-12)


def test_summary_stats_non_finite_and_empty() -> None:
    stats = summary_stats(torch.tensor([1.0, float("nan"), -2.0])).tolist()
    assert math.isnan(stats[0]) and math.isnan(stats[2])  # max and mean see the NaN
    assert all(math.isnan(v) for v in summary_stats(torch.empty(0)).tolist())


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(16, 3)
        self.unused = nn.Parameter(torch.randn(5))
        with torch.no_grad():
            self.conv.weight.mul_(torch.linspace(0.1, 3.0, 4).view(4, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def make(backend: str = "torch", seed: int = 0) -> tuple[TinyNet, SLBI]:
    torch.manual_seed(seed)
    model = TinyNet()
    return model, SLBI(model.named_parameters(), lr=0.1, mu=2.0, lam=0.05, backend=backend)


def train_step(model: TinyNet, opt: SLBI, gen: torch.Generator, **step_kwargs) -> None:
    opt.zero_grad()
    model(torch.randn(6, 2, 4, 4, generator=gen)).square().mean().backward()
    opt.step(**step_kwargs)


def test_record_rows_hold_the_statistics_of_this_step(tmp_path) -> None:
    model, opt = make()
    gen = torch.Generator().manual_seed(1)
    train_step(model, opt, gen)
    opt.current_epoch = 3
    opt.zero_grad()
    model(torch.randn(6, 2, 4, 4, generator=gen)).square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if name != "unused"}
    opt.step(record=True, path=tmp_path)

    records = load_records(tmp_path)
    assert list(records) == list(RECORD_COLUMNS)
    assert records["layer"] == opt.names
    assert records["step"] == [2] * len(opt.names) and records["epoch"] == [3] * len(opt.names)
    sparsity = {row.name: row for row in opt.sparsity()}
    params = dict(model.named_parameters())
    for i, name in enumerate(records["layer"]):
        p = params[name]
        row = {key: column[i] for key, column in records.items()}
        assert row["numel"] == p.numel()
        weight = [row[f"weight_{s}"] for s in STATS]
        assert weight == pytest.approx(numpy_stats(p), rel=1e-9, abs=1e-12)
        if name == "unused":  # no gradient this step: skipped, nothing to summarise
            assert all(row[f"grad_{s}"] is None for s in STATS)
        else:
            grad = [row[f"grad_{s}"] for s in STATS]
            assert grad == pytest.approx(numpy_stats(grads[name]), rel=1e-9, abs=1e-12)
        if name == "conv.weight":
            norms = p.detach().reshape(4, -1).norm(dim=1)
            filters = [row[f"filter_norm_{s}"] for s in STATS]
            assert filters == pytest.approx(numpy_stats(norms), rel=1e-6)
        else:
            assert all(row[f"filter_norm_{s}"] is None for s in STATS)
        if p.dim() >= 2:
            assert row["penalty"] == ("group" if p.dim() == 4 else "l1")
            assert (row["support"], row["size"]) == (sparsity[name].support, sparsity[name].size)
            assert row["residue"] == pytest.approx(opt.residue(name), rel=1e-12)
        else:
            assert row["penalty"] == "none"
            assert row["support"] is None and row["size"] is None and row["residue"] is None
    assert 0 < sparsity["conv.weight"].support < 4  # a real part of the path, not all or nothing


def test_records_append_select_and_reload(tmp_path) -> None:
    model, opt = make()
    gen = torch.Generator().manual_seed(1)
    folder = tmp_path / "runs" / "tiny"  # created on first use
    for step in range(1, 7):
        record = step % 3 != 0
        layers = "conv.weight" if step < 4 else ["fc.weight", "conv.weight", "fc.weight"]
        train_step(model, opt, gen, record=record, path=folder, layers=layers)
    records = load_records(folder / RECORD_FILENAME)
    assert records["step"] == [1, 2, 4, 4, 5, 5]
    # Rows come in parameter order; a layer named twice is recorded once.
    assert records["layer"] == ["conv.weight"] * 2 + ["conv.weight", "fc.weight"] * 2
    assert records["epoch"] == [None] * 6
    lines = (folder / RECORD_FILENAME).read_text().splitlines()
    assert len(lines) == 6 and all(list(json.loads(line)) == list(RECORD_COLUMNS) for line in lines)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_recording_does_not_change_the_update(tmp_path, backend: str) -> None:
    runs = []
    for record in (True, False):
        model, opt = make(backend)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            train_step(model, opt, gen, record=record, path=tmp_path / backend)
        runs.append((model, opt))
    (model_a, opt_a), (model_b, opt_b) = runs
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert opt_a.state[a].keys() == opt_b.state[b].keys()
        for key in opt_a.state[a]:
            assert torch.equal(opt_a.state[a][key], opt_b.state[b][key]), (name, key)
    assert len(load_records(tmp_path / backend)["layer"]) == 4 * len(opt_a.names)


def test_record_bad_input(tmp_path) -> None:
    model, opt = make()
    gen = torch.Generator().manual_seed(1)
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    bad = [
        ({"path": None}, ValueError, "path="),
        ({"path": 3}, TypeError, "path"),
        ({"path": a_file}, ValueError, "is a file"),
        ({"path": tmp_path, "layers": ["conv.wieght"]}, UnknownLayerError, "did you mean 'conv.weight'"),
        ({"path": tmp_path, "layers": []}, ValueError, "empty"),
    ]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            train_step(model, opt, gen, record=True, **kwargs)
    assert not (tmp_path / RECORD_FILENAME).exists()
    # Off, recording checks nothing and writes nothing.
    train_step(model, opt, gen, record=False, path=None, layers=["nonsense"])
    unnamed = SLBI(TinyNet().parameters(), backend="torch")
    with pytest.raises(ValueError, match="assign_name"):
        unnamed.step(record=True, path=tmp_path)


def test_load_records_formats_and_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no record file"):
        load_records(tmp_path)
    append_records(
        tmp_path,
        [
            {"step": 1, "layer": "a", "weight_max": float("nan")},
            {"step": 2, "layer": "b", "weight_max": float("inf")},
        ],
    )
    records = load_records(tmp_path)
    assert list(records) == list(RECORD_COLUMNS)
    assert math.isnan(records["weight_max"][0]) and records["weight_max"][1] == math.inf
    assert records["epoch"] == [None, None]
    # Rows written by hand: other keys become columns, missing keys give None.
    hand = tmp_path / "hand.jsonl"
    hand.write_text('{"step": 1, "note": "x"}\n\n{"step": 2}\n')
    assert load_records(hand) == {"step": [1, 2], "note": ["x", None]}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert load_records(empty) == {}
    hand.write_text('{"step": 1}\n{"step": \n')
    with pytest.raises(ValueError, match=r"hand.jsonl:2"):
        load_records(hand)
    hand.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="not a JSON object"):
        load_records(hand)
