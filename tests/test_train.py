"""pege-train: data loaders, the rho-normalised lam, the pege+ewgs estimator,
paired statistics, and tiny end-to-end runs of the CLI (plain and --tune)."""
import csv
import json
import math
import pickle

import numpy as np
import pytest
import torch

from pege_kernels import train, train_data
from pege_kernels.nn import Quantizer

TINY = ["--samples", "200", "--epochs", "1", "--fp-epochs", "1", "--bits", "2/2",
        "--batch-size", "64", "--no-progress", "--jobs", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as main() sets for the small tasks; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    (xtr, ytr), (xte, yte) = train_data.load_cifar10(str(tmp_path), download=False)
    assert xtr.shape == (100, 3, 32, 32) and xtr.dtype == torch.uint8 and ytr.shape == (100,)
    assert torch.equal(xte.reshape(20, -1), torch.tensor(last["data"]))
    assert yte.tolist() == last["labels"]
    out = train_data.cifar_augment(xtr[:8], torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 32, 32) and torch.isfinite(out).all()
    assert train_data.resnet20()(out).shape == (8, 10)


def test_cifar10_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="CIFAR-10 not found"):
        train_data.load_cifar10(str(tmp_path / "nowhere"), download=False)
    with pytest.raises(SystemExit, match="--data-dir"):
        train_data.load_cifar10(None, download=False)


def test_mnist1d_is_generated_locally_and_deterministic():
    (x, y), (xt, yt) = train_data.load_mnist1d(100)
    assert x.shape == (80, 1, 1, 40) and xt.shape == (20, 1, 1, 40) and x.dtype == torch.float32
    assert set(y.tolist()) <= set(range(10))
    assert torch.equal(train_data.load_mnist1d(100)[0][0], x)
    assert train_data.mnist1d_cnn()(x[:4]).shape == (4, 10)


def test_validation_split_is_stratified_disjoint_and_fixed():
    y = torch.arange(100) % 10
    keep, held = train_data.stratified_split(y, 0.2)
    assert len(held) == 20 and torch.bincount(y[held]).tolist() == [2] * 10
    assert not set(keep.tolist()) & set(held.tolist()) and len(keep) + len(held) == 100
    assert torch.equal(train_data.stratified_split(y, 0.2)[1], held)


def one_quantizer(est, **cfg):
    args = train.parse_args(["--no-progress"])
    vars(args).update(cfg)
    model = train.quantize(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8),
                                               torch.nn.Linear(8, 2)), (2, 2), est, args, seed=0)
    return [m for m in model.modules() if isinstance(m, Quantizer)][0]  # middle layer's weight


def test_rho_sets_lam_to_rho_times_the_task_gradient_per_uniform_rounding_error():
    q = one_quantizer("pege", rho=0.05, lam=None)
    q.train()
    x = torch.randn(8, 8, requires_grad=True)
    g = torch.randn(8, 8)
    for _ in range(2):  # step 1 measures, step 2 uses the measurement
        q(x).backward(g)
    # 8 elements per channel; per channel a uniform error over the step s_c
    # has squared norm 8 * s_c^2 / 12.
    uniform = math.sqrt(sum(8 * float(s) ** 2 / 12 for s in q.scale.detach()))
    assert q.settings()[1] == q.lam
    assert math.isclose(q.lam * uniform, 0.05 * float(g.norm()), rel_tol=1e-5)


def test_raw_lam_overrides_rho_and_pege_ewgs_passes_delta():
    q = one_quantizer("pege", rho=0.05, lam=1e-3)
    assert q.rho == 0 and q.settings()[1] == 1e-3 and q.settings()[2] == 0.0
    q = one_quantizer("pege+ewgs", delta=0.3)
    assert q.estimator == "pege+ewgs" and q.settings()[2] == 0.3
    assert one_quantizer("ewgs", delta=0.3).settings() == (1.0, 0.0, 0.3)
    assert one_quantizer("ste", delta=0.3, rho=0.5).settings() == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("est,peer", [("pege", "ste"), ("pege+ewgs", "ewgs")])
def test_pege_at_constant_ratio_1_without_lam_is_its_peer(est, peer):
    args = train.parse_args(TINY + ["--rho", "0", "--curriculum", "constant", "--r0", "1"])
    (fit, val), (args.prep_train, args.prep_test), _ = train_data.load(args)
    torch.manual_seed(0)
    fp = args.model()
    losses = []
    for e in (peer, est):
        model = train.quantize(fp, (2, 2), e, args, seed=0)
        frac = args.curriculum_frac if e.startswith("pege") else None
        curves = train.train_run(model, fit, val, args, 0, 2, args.lr, e, frac)
        losses.append(curves["loss"] + curves["val_score"])
    assert losses[0] == losses[1]


def test_paired_difference_and_t_interval():
    runs = [dict(seed=s, bits="W2A2", estimator=e, score=a) for s, (x, y) in
            enumerate([(80, 81), (82, 84), (81, 81), (79, 82), (80, 82)])
            for e, a in (("ste", x), ("pege", y))]
    ste, pege = train.summarize(runs)
    assert math.isnan(ste["diff_mean"])
    d = [1, 2, 0, 3, 2]
    half = 2.7764451051977934 * np.std(d, ddof=1) / math.sqrt(5)
    assert pege["n"] == 5 and pege["diff_mean"] == pytest.approx(1.6)
    assert pege["ci_low"] == pytest.approx(1.6 - half)
    assert pege["ci_high"] == pytest.approx(1.6 + half)


def test_cli_smoke_on_mnist1d(tmp_path, capsys):
    summary = train.main(TINY + ["--seeds", "0,1", "--out", str(tmp_path)])
    assert [(r["bits"], r["estimator"]) for r in summary] == [
        ("fp", "fp"), ("W2A2", "ste"), ("W2A2", "ewgs"), ("W2A2", "pege"), ("W2A2", "pege+ewgs")]
    assert all(math.isfinite(r["ci_low"]) for r in summary[2:])
    assert "| W2A2 | pege | " in capsys.readouterr().out
    saved = json.loads((tmp_path / "runs.json").read_text())
    assert len(saved["runs"]) == 10 and all(0 <= r["score"] <= 100 for r in saved["runs"])
    assert all(len(r["curves"]["val_score"]) == 1 for r in saved["runs"])
    with open(tmp_path / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 and {"diff_mean", "ci_low", "ci_high"} <= set(rows[0])
    for png in ("accuracy.png", "curriculum.png", "final.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeds_in_worker_processes_give_the_same_runs(tmp_path):
    """--jobs 2 forks workers: run as the CLI runs, from a fresh process (a
    process that has run autograd's threads cannot fork them)."""
    import os
    import subprocess
    import sys
    args = TINY[:-2] + ["--seeds", "0,1", "--estimators", "ste,pege"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for jobs, out in (("1", "one"), ("2", "two")):
        proc = subprocess.run([sys.executable, "-m", "pege_kernels.train", *args, "--jobs", jobs,
                               "--out", str(tmp_path / out)], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "no worker processes" not in proc.stderr
    one, two = (json.loads((tmp_path / d / "runs.json").read_text())["runs"]
                for d in ("one", "two"))
    assert [(r["seed"], r["estimator"]) for r in one] == [(r["seed"], r["estimator"]) for r in two]
    assert [(r["score"], r["curves"]) for r in one] == [(r["score"], r["curves"]) for r in two]


def test_workers_fall_back_to_one_process_after_autograd(tmp_path, capsys, monkeypatch):
    """Where forked workers cannot run autograd (torch raises in the child
    once the parent has started autograd's device threads), the runs go one
    at a time, with a line saying so."""
    import os
    parent, fp_task = os.getpid(), train._fp_task

    def fp_task_or_fail(seed):
        if os.getpid() != parent:
            raise RuntimeError("Unable to handle autograd's threading in combination with "
                               "fork-based multiprocessing")
        return fp_task(seed)

    monkeypatch.setattr(train, "_fp_task", fp_task_or_fail)
    args = TINY[:-2] + ["--seeds", "0,1", "--estimators", "ste", "--jobs", "2"]
    summary = train.main(args + ["--out", str(tmp_path)])
    assert len(summary) == 2
    assert "no worker processes" in capsys.readouterr().err


def test_tune_chooses_on_validation_then_scores_test_once(tmp_path, monkeypatch):
    scored = []
    evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda model, split, *a: (
        scored.append(len(split[1])) or evaluate(model, split, *a)))
    summary = train.main(TINY + ["--seeds", "0", "--tune", "2", "--tune-seeds", "100",
                                 "--estimators", "ste,pege+ewgs", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "runs.json").read_text())
    tuned, final = saved["tuning"], saved["runs"]
    assert len(tuned) == 1 + 2 * 2 and {r["phase"] for r in tuned} == {"tune"}
    for est in ("ste", "pege+ewgs"):
        accs = {r["config"]: r["score"] for r in tuned if r["estimator"] == est}
        chosen = next(r for r in final if r["estimator"] == est)
        assert accs[chosen["config"]] == max(accs.values())
    # Tuning runs score (per epoch and at the end) the validation split
    # only; the final runs, trained on train + val, score test once each.
    (tr, te), _, _ = train_data.load(train.parse_args(TINY))
    n_val = len(train_data.stratified_split(tr[1], 0.2)[1])
    assert scored[:2 * len(tuned)] == [n_val] * (2 * len(tuned))
    assert scored[2 * len(tuned):] == [len(te[1])] * 3
    assert len(summary) == 3 and summary[0]["estimator"] == "fp"


def test_tune_candidates_same_count_for_every_estimator_defaults_first():
    args = train.parse_args([])
    for est in train.ESTIMATORS:
        cands = train.candidates(args, est, 4)
        assert len(cands) == 4 and cands[0] is args
        assert all(args.lr / 3 <= c.lr <= args.lr * 3 for c in cands)
        assert all(c.delta == args.delta for c in cands) != est.endswith("ewgs")
        assert all(c.rho == args.rho for c in cands) != est.startswith("pege")


LM_TINY = ["--task", "lm", "--samples", "256", "--epochs", "1", "--fp-epochs", "1",
           "--batch-size", "64", "--no-progress", "--jobs", "1"]


def test_stdlib_splits_are_disjoint_fixed_and_by_file():
    splits = train_data.stdlib_splits()
    names = [{f.name for f in files} for files in splits.values()]
    assert all(names) and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert splits == train_data.stdlib_splits()
    where = {f.name: k for k, files in splits.items() for f in files}
    # crc32(name) % 10: random.py 0 (test), dataclasses.py 1 (val), argparse.py 5 (train)
    assert (where["random.py"], where["dataclasses.py"], where["argparse.py"]) == (
        "test", "val", "train")
    assert not any(n.startswith("_sysconfigdata") for n in where)
    (xa, ya), val, test = train_data.load_stdlib(64, ctx=16)
    assert xa.shape == ya.shape == (64, 16) and val[0].shape == test[0].shape == (8, 16)
    assert torch.equal(xa[:, 1:], ya[:, :-1])  # y is x shifted by one byte
    assert torch.equal(train_data.load_stdlib(64, ctx=16)[0][0], xa)
    with pytest.raises(ValueError, match="windows"):
        train_data.load_stdlib(10 ** 9)


def test_bits_per_byte_of_a_uniform_model_is_8():
    logits = torch.zeros(3, 5, 256)
    assert train_data.bits_per_byte(logits, torch.randint(0, 256, (3, 5))) == pytest.approx(8.0)


def test_lm_quantizes_every_block_linear_with_the_torchao_drop_in():
    pytest.importorskip("torchao")
    from torchao.quantization.qat import FakeQuantizedLinear

    from pege_kernels.torchao import PEGEFakeQuantizer
    args = train.parse_args(LM_TINY)
    fp = args.model()
    model = train.quantize(fp, (2, 8), "pege", args, seed=3)
    fq = [m for m in model.modules() if isinstance(m, FakeQuantizedLinear)]
    assert len(fq) == 4 * len(model.blocks) and type(model.head) is torch.nn.Linear
    w = fq[0].weight_fake_quantizer
    a = fq[0].activation_fake_quantizer
    assert isinstance(w, PEGEFakeQuantizer) and w.config.granularity.group_size == 32
    assert a.config.dtype == torch.int8 and a.role == "activation"
    assert all(type(m) is torch.nn.Linear for m in fp.modules() if isinstance(m, torch.nn.Linear))


def test_cli_smoke_lm(tmp_path, capsys):
    pytest.importorskip("torchao")
    summary = train.main(LM_TINY + ["--seeds", "0,1", "--estimators", "ste,pege",
                                    "--out", str(tmp_path)])
    assert [(r["bits"], r["estimator"]) for r in summary] == [
        ("fp", "fp"), ("W2A8", "ste"), ("W2A8", "pege")]
    out = capsys.readouterr().out
    assert "test bits per byte" in out and "| W2A8 | pege | " in out
    saved = json.loads((tmp_path / "runs.json").read_text())
    assert all(0 < r["score"] < 9 for r in saved["runs"])  # bits per byte of a byte model
    assert (tmp_path / "final.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lm_tune_minimises_validation_bits_per_byte(tmp_path):
    pytest.importorskip("torchao")
    train.main(LM_TINY + ["--seeds", "0", "--tune", "2", "--tune-seeds", "100",
                          "--estimators", "pege", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "runs.json").read_text())
    scores = {r["config"]: r["score"] for r in saved["tuning"] if r["estimator"] == "pege"}
    chosen = next(r for r in saved["runs"] if r["estimator"] == "pege")
    assert scores[chosen["config"]] == min(scores.values())
    assert "lam" in chosen["hp"] and "rho" not in chosen["hp"]

