"""pytest-benchmark cases (run: pytest benchmarks/): fwd+bwd at 1M fp32."""
import pytest
import torch

import pege_kernels as pk
from bench_ops import inputs, methods, saved_bytes_per_element

DEVICE = torch.device("cuda" if "cuda" in pk.available_backends() else "cpu")
METHODS = methods(DEVICE, "per-tensor", [b for b in pk.available_backends(DEVICE) if b in ("cpu", "cuda")])


@pytest.mark.parametrize("name", [m for m in METHODS if m != "reference compiled"])
def test_fwd_bwd_1m(benchmark, name):
    x, dy, s, z = inputs(1 << 20, torch.float32, "per-tensor", DEVICE)
    xs, ss, zs = (t.clone().requires_grad_(True) for t in (x, s, z))
    f = METHODS[name]

    def step():
        torch.autograd.grad(f(xs, ss, zs), [xs, ss, zs], dy, allow_unused=True)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(step)


class KernelBuildError(Exception):
    """Stands for an exception outside RuntimeError, e.g. Triton's CompilationError."""


def test_failing_methods_are_marked_na(monkeypatch, tmp_path, capsys):
    """A method raising any exception, at construction, in warm-up or in the
    saved-bytes call, is reported n/a; the others are timed and written out."""
    import bench_ops

    calls = {"late": 0}

    def broken(x, s, z):
        raise KernelBuildError("kernel failed to compile")

    def late(x, s, z):  # fails from its second call on: in the warm-up
        calls["late"] += 1
        if calls["late"] > 1:
            raise KernelBuildError()
        return x * 1.0

    def fine(x, s, z):
        return x * 2.0

    def no_saved_bytes(x, s, z):  # timed fine; its saved-bytes call fails
        return x * 3.0

    def saved_bytes(f, *args):
        if f is no_saved_bytes:
            raise KernelBuildError("hooks")
        return saved_bytes_per_element(f, *args)

    monkeypatch.setattr(bench_ops, "saved_bytes_per_element", saved_bytes)
    monkeypatch.setattr(bench_ops, "methods", lambda *a: {
        "broken": broken, "late": late, "fine": fine, "no saved bytes": no_saved_bytes})
    bench_ops.main(["--sizes", "4K", "--dtypes", "float32", "--modes", "per-tensor",
                    "--rounds", "1", "--round-time", "0.001", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "broken per-tensor float32 4K: KernelBuildError: kernel failed to compile" in out
    assert "late per-tensor float32 4K: KernelBuildError: " in out
    assert "no saved bytes per-tensor float32: saved bytes n/a (KernelBuildError: hooks)" in out
    results = (tmp_path / "results.csv").read_text()
    assert "fine" in results and "no saved bytes" in results and "copy" in results
    assert "broken" not in results and "late" not in results
    assert (tmp_path / "gbps.png").exists()


def test_history_rows_are_appended_with_date_commit_and_setup(monkeypatch, tmp_path):
    import csv

    import bench_ops

    monkeypatch.setattr(bench_ops, "methods", lambda *a: {"double": lambda x, s, z: x * 2.0})
    args = ["--sizes", "4K", "--dtypes", "float32", "--modes", "per-tensor", "--rounds", "1",
            "--round-time", "0.001", "--out", str(tmp_path), "--history",
            str(tmp_path / "h.csv")]
    bench_ops.main(args)
    bench_ops.main(args)
    with open(tmp_path / "h.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 6  # copy and double: fwd, bwd, full; per run
    assert {r["method"] for r in rows} == {"copy", "double"}
    assert all(r["date"] and r["commit"] and "THP_MEM_ALLOC_ENABLE" in r["setup"]
               and "--history" in r["command"] for r in rows)


def test_train_step_bench_prints_table_and_equal_outputs(capsys):
    """bench_train_step.py on a tiny block, one round on CPU: its table, and
    torchao's QATConfig and PEGEQATConfig(estimator="ste") outputs equal."""
    pytest.importorskip("torchao")
    import bench_train_step

    bench_train_step.main(["--device", "cpu", "--dim", "64", "--heads", "2",
                           "--batch", "1", "--seq", "16", "--rounds", "1", "--warmup", "1"])
    out = capsys.readouterr().out
    assert "outputs equal torchao: True" in out
    assert "| variant " in out and "| median ms | min ms | torchao / this |" in out
    for name in ("full precision", "torchao QATConfig", "pege_kernels ste",
                 "pege_kernels pege"):
        assert f"| {name} " in out


def test_grouped_modes_time_the_op_and_torchao(tmp_path, capsys):
    """per-group and per-token: the op (dynamic and learned qparams) and
    torchao's fake quantizer each get a row, on (n / 4096, 4096) inputs."""
    pytest.importorskip("torchao")
    import bench_ops

    backends = [b for b in pk.available_backends("cpu") if b == "cpu"] or ["reference"]
    bench_ops.main(["--sizes", "16K", "--dtypes", "float32", "--modes", "per-group,per-token",
                    "--backends", backends[0], "--skip", "torchao compiled", "--rounds", "1",
                    "--round-time", "0.001", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for mode in ("per-group", "per-token"):
        for method in (f"pege {backends[0]} dynamic", f"pege {backends[0]} learned",
                       "torchao eager"):
            assert f"| {mode} | float32 | 16K | {method} |" in out, (mode, method)
    assert "n/a" not in out
