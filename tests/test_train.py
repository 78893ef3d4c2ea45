"""pege-train: the CIFAR-10 loader on a tiny file in CIFAR's format, and a
one-epoch smoke run of the CLI on digits."""
import csv
import json
import pickle

import numpy as np
import pytest
import torch

from pege_kernels import train


def write_tiny_cifar(root, n=20):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        with open(base / name, "wb") as fh:
            pickle.dump(batch, fh)
    return batch


def test_cifar10_loader_reads_python_pickle_layout(tmp_path):
    last = write_tiny_cifar(tmp_path)
    (xtr, ytr), (xte, yte) = train.load_cifar10(str(tmp_path), download=False)
    assert xtr.shape == (100, 3, 32, 32) and xtr.dtype == torch.uint8 and ytr.shape == (100,)
    assert torch.equal(xte.reshape(20, -1), torch.tensor(last["data"]))
    assert yte.tolist() == last["labels"]
    out = train.cifar_augment(xtr[:8], torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 32, 32) and torch.isfinite(out).all()
    assert train.resnet20()(out).shape == (8, 10)


def test_cifar10_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="CIFAR-10 not found"):
        train.load_cifar10(str(tmp_path / "nowhere"), download=False)
    with pytest.raises(SystemExit, match="--data-dir"):
        train.load_cifar10(None, download=False)


def test_cli_smoke_on_digits(tmp_path):
    summary = train.main(["--seeds", "0,1", "--bits", "2/2", "--epochs", "1", "--fp-epochs", "1",
                          "--out", str(tmp_path), "--no-progress"])
    assert [(r["bits"], r["estimator"]) for r in summary] == [
        ("fp", "fp"), ("W2A2", "ste"), ("W2A2", "ewgs"), ("W2A2", "pege")]
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert len(runs) == 8 and all(0 <= r["final_acc"] <= 100 for r in runs)
    with open(tmp_path / "summary.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    for png in ("accuracy.png", "curriculum.png", "final.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_bits():
    with pytest.raises(SystemExit):
        train.parse_args(["--bits", "2-2"])
