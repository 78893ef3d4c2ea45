"""QAT across processes: exact resume from a checkpoint, DDP and FSDP2 on 2 ranks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

WORKER = str(Path(__file__).with_name("qat_worker.py"))


def run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, WORKER, *map(str, args)], check=True, env=env, timeout=300)


def test_resume_is_bitwise_exact(tmp_path):
    run("train", tmp_path / "straight.pt", 12)
    run("train", tmp_path / "unused.pt", 12, "--save-at", 5, tmp_path / "ckpt.pt")
    run("train", tmp_path / "resumed.pt", 12, "--resume", tmp_path / "ckpt.pt")
    a, b = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_ranks_match_single_process(tmp_path):
    """Weight masks agree across ranks (seeds never depend on the rank), and a
    DDP step equals one process on the concatenated batch. Checked at r = 1:
    below it, activation masks are drawn per rank-local tensor (see README)."""
    init = tmp_path / "init"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, WORKER, "ddp", str(tmp_path / f"r{r}.pt"), str(r),
                               "2", str(init)], env=env) for r in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    run("ddp", tmp_path / "single.pt", 0, 1, tmp_path / "init1")
    r0, r1, single = (torch.load(tmp_path / f) for f in ("r0.pt", "r1.pt", "single.pt"))
    assert all(torch.equal(r0["masks"][k], r1["masks"][k]) for k in r0["masks"])
    for k, v in single["weights"].items():
        torch.testing.assert_close(r0["weights"][k], v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r1["weights"][k], v, rtol=1e-5, atol=1e-6)


def test_fsdp2_two_ranks_match_single_process(tmp_path):
    """fully_shard (FSDP2) on gloo: one step of a model carrying the package's
    LSQ quantizers and the torchao drop-in's per-group / per-token ones equals
    the single-process step on the whole batch (at r = 1, lam = 0, as for DDP)."""
    pytest.importorskip("torchao")
    init = tmp_path / "init"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, WORKER, "fsdp2", str(tmp_path / "sharded.pt"),
                               str(r), "2", str(init)], env=env) for r in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    run("fsdp2", tmp_path / "single.pt", 0, 1, tmp_path / "init1")
    sharded, single = torch.load(tmp_path / "sharded.pt"), torch.load(tmp_path / "single.pt")
    assert sharded.keys() == single.keys() and any("scale" in k for k in single)
    for k, v in single.items():
        torch.testing.assert_close(sharded[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_autocast_cpu_bf16():
    import pege_kernels as pk
    model = pk.prepare_qat(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32),
                                         nn.ReLU(), nn.Linear(32, 4)),
                           weight_bits=4, act_bits=4)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    q = model[2]
    assert q.weight.grad is not None and q.weight_quant.scale.grad is not None
