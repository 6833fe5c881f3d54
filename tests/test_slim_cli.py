"""Tests for ``slbi-train --slim``: the before / after table, ``slim.pt`` (rebuilt with
:func:`slbi_triton.train.cli.load_slim`), ``slim.csv``, ``--slim-epochs`` and bad
arguments. Synthetic data stand in for MNIST, as in tests/test_train.py."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch.utils.data import TensorDataset

from slbi_triton import SLBI, train
from slbi_triton.train.cli import load_slim
from slbi_triton.train.loop import evaluate

from .helpers import synthetic_digits

pytest.importorskip("torch_pruning")

# λ 0.005: after these ten steps a few filters and neurons are outside the support.
TINY = ["--epochs", "1", "--batch-size", "32", "--threads", "1", "--device", "cpu", "--warmup-iters", "2"]
TINY += ["--record-interval", "0", "--lam", "0.005"]


pytestmark = pytest.mark.usefixtures("torch_globals_restored")


@pytest.fixture
def synthetic_test_set(monkeypatch: pytest.MonkeyPatch) -> TensorDataset:
    """Serve 320 train / 200 test synthetic images to the CLI; the test set."""
    test_set = synthetic_digits(200, seed=1)
    train_set = synthetic_digits(320, seed=0)
    monkeypatch.setattr(train.cli, "load_dataset", lambda name, data_dir=None: (train_set, test_set))
    return test_set


def _row(printed: str, label: str) -> list[str]:
    line = next(line for line in printed.splitlines() if line.startswith(label))
    return line[len(label) :].split()


def test_slim_prints_the_table_and_saves_a_model_that_loads(
    tmp_path: Path, synthetic_test_set: TensorDataset, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert train.main([*TINY, "--out", str(out), "--slim", "--slim-epochs", "1"]) == 0
    printed = capsys.readouterr().out
    params_before, params_after, _ = _row(printed, "parameters")
    assert _row(printed, "MACs per image") and "CPU latency, batch 128 (median of 15" in printed
    accuracy_after = _row(printed, "test accuracy (before: W*)")[1]
    for model in ("unslimmed", "slim"):
        assert f"{model} model, 1 more epoch(s): test accuracy" in printed

    model, checkpoint = load_slim(out / "slim.pt")
    assert checkpoint["architecture"] == "lenet" and checkpoint["example_shape"] == [1, 1, 28, 28]
    count = sum(p.numel() for p in model.parameters())
    assert f"{count:,}" == params_after and count < int(params_before.replace(",", ""))
    images, labels = synthetic_test_set.tensors
    assert f"{100 * evaluate(model, images, labels):.2f}%" == accuracy_after

    with open(out / "slim.csv", newline="", encoding="utf-8") as handle:
        layers = list(csv.DictReader(handle))
    # The classifier fc2 is not penalised (W* would drop classes): not a layer of slim.csv.
    assert [row["layer"] for row in layers] == [f"conv{i}.weight" for i in (1, 2, 3)] + ["fc1.weight"]
    for row in layers:
        removed = dict(checkpoint["removed"].get(row["layer"], [])).get(0, [])
        assert int(row["removed"]) == len(removed) <= int(row["zero_in_w_star"])
    assert sum(int(row["removed"]) for row in layers) > 0

    # The saved optimizer state trains the rebuilt model on.
    opt = SLBI(train.slbi_param_groups(model, "group"))
    opt.load_state_dict(checkpoint["optimizer"])
    opt.zero_grad()
    F.cross_entropy(model(images[:8]), labels[:8]).backward()
    opt.step()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--slim", "--optimizer", "sgd"], "use it with --optimizer slbi"),
        (["--slim-epochs", "1"], "add --slim"),
    ],
)
def test_slim_arguments_are_checked_before_training(
    tmp_path: Path, synthetic_test_set: TensorDataset, capsys: pytest.CaptureFixture[str], argv, message
) -> None:
    out = tmp_path / "out"
    assert train.main([*TINY, "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_slim_without_torch_pruning_names_the_extra(
    tmp_path: Path, synthetic_test_set: TensorDataset, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    assert train.main([*TINY, "--out", str(tmp_path / "out"), "--slim"]) == 2
    assert "pip install slbi-triton[slim]" in capsys.readouterr().err


def test_slim_after_bfloat16_state(
    tmp_path: Path, synthetic_test_set: TensorDataset, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bf16"
    assert train.main([*TINY, "--out", str(out), "--slim", "--state-dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert "Z and momentum in bfloat16" in printed and _row(printed, "parameters")
    assert (out / "slim.csv").stat().st_size > 0
    model, checkpoint = load_slim(out / "slim.pt")
    assert checkpoint["architecture"] == "lenet"
    # The saved slim optimizer keeps Z in bfloat16, and loads into a bfloat16-state SLBI.
    dtypes = {entry["z"].dtype for entry in checkpoint["optimizer"]["state"].values() if "z" in entry}
    assert dtypes == {torch.bfloat16}
    opt = SLBI(train.slbi_param_groups(model, "group"), state_dtype=torch.bfloat16)
    opt.load_state_dict(checkpoint["optimizer"])
    assert {kernel.state_dtype for kernel in opt.kernels()} == {torch.bfloat16}
