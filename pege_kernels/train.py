"""pege-train: STE vs EWGS vs PEGE vs PEGE+EWGS quantization-aware training.

    pege-train                                  # mnist1d, W2A2 and W3A3, 5 seeds
    pege-train --dataset digits --seeds 0,1,2
    pege-train --bits 2/2 --tune 4              # choose on validation, then refit
    pege-train --dataset cifar10 --data-dir DIR --bits 2/2,3/3,4/4 --epochs 200 --fp-epochs 200
    pege-train --task lm                        # byte-level transformer, W2A8, 3 seeds

Per seed, one full-precision model is pre-trained (--fp-epochs) and shared;
every (bit width, estimator) run starts from it with the same optimizer,
cosine learning rate and data order, so estimators are compared in pairs,
seed by seed. A fixed stratified validation split (--val-frac of the training
set) gives the accuracy curves and, with --tune, the hyperparameters; the
test set is scored once per run, at its end, in eval mode (every element
quantized). --task lm trains a small decoder-only transformer on Python's
standard library sources (train_data.load_stdlib) and scores bits per byte
(lower is better); its W/A bits are per-group weights (--group-size) and
per-token activations, through the torchao drop-in (pege_kernels.torchao).
Writes runs.json, runs.csv, summary.csv and three PNGs to --out
and prints the table with every estimator's paired difference from STE.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import train_data as data
from .nn import ESTIMATORS, Progressive, Quantizer
from .qat import KINDS, Curriculum, prepare_qat

# ------------------------------------------------------------- quantizer


class TrainQuantizer(Quantizer):
    """nn.Quantizer plus the option pege-train adds over the public API.

    rho > 0, a discretization-error weight relative to the task gradient:
        each training step sets lam = rho * G / E, G the norm of dL/dy (the
        task gradient reaching this quantizer's output; a running mean,
        momentum 0.9, over the previous steps) and E = sqrt(sum_c n_c s_c^2
        / 12) the norm of x - Q(x) when every element's rounding error is
        uniform over its step s_c (n_c elements per channel). So the
        backward's lam * (x - Q(x)) term has about rho times the task
        gradient's norm on every tensor, whatever its size, scale or role.
        E is not the measured error: dividing by that, lam grew as training
        pulled values onto the grid, and diverged (docs/training.md).
        The op's raw lam weighs a sum over elements: one value is a
        different strength on every tensor.
    """

    momentum = 0.9

    @classmethod
    def adopt(cls, q: Quantizer, rho: float) -> TrainQuantizer:
        # prepare_qat builds nn.Quantizer; switching the class keeps its
        # parameters, buffers and seeds as they are.
        q.__class__ = cls
        q.rho, q.grad_norm = float(rho), None
        return q

    def _record_grad(self, g):
        n = float(g.norm())
        self.grad_norm = n if self.grad_norm is None else (
            self.momentum * self.grad_norm + (1 - self.momentum) * n)

    def forward(self, x):
        track = self.rho > 0 and self.training and torch.is_grad_enabled()
        if track and self.grad_norm is not None:
            with torch.no_grad():
                s = self.scale.detach().abs().clamp_min(1e-8)
                err = math.sqrt(x.numel() / s.numel() * float(s.square().sum()) / 12)
            self.lam = self.rho * self.grad_norm / err
        y = super().forward(x)
        if track and y.requires_grad:
            y.register_hook(self._record_grad)
        return y


def quantize(fp: nn.Module, bits, estimator: str, cfg, seed: int) -> nn.Module:
    """A copy of `fp` prepared for QAT with `estimator` (ESTIMATORS) and the
    hyperparameters in cfg (lam: raw, or None for rho; delta; backend)."""
    pege = estimator.startswith("pege")
    if cfg.task == "lm":
        return quantize_lm(fp, bits, estimator, cfg, seed)
    model = prepare_qat(copy.deepcopy(fp), weight_bits=bits[0], act_bits=bits[1],
                        estimator=estimator, seed=seed,
                        lam=(cfg.lam or 0.0) if pege else 0.0,
                        delta=cfg.delta if estimator.endswith("ewgs") else 0.0,
                        backend=cfg.backend)
    rho = cfg.rho if pege and cfg.lam is None else 0.0
    for m in model.modules():
        if isinstance(m, Quantizer):
            TrainQuantizer.adopt(m, rho)
    return model


def quantize_lm(fp: nn.Module, bits, estimator: str, cfg, seed: int) -> nn.Module:
    """A copy of the language model with every Linear of its blocks a torchao
    FakeQuantizedLinear carrying PEGE quantizers: bits[0]-bit symmetric
    weights per group of cfg.group_size inputs, bits[1]-bit asymmetric
    activations per token, both with qparams from the data (torchao's
    defaults). lam is the raw lam (--rho is for the image tasks)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    from .torchao import PEGEQATConfig
    model = copy.deepcopy(fp)
    pege = estimator.startswith("pege")
    quantize_(model.blocks, PEGEQATConfig(
        weight_config=IntxFakeQuantizeConfig(getattr(torch, f"int{bits[0]}"),
                                             group_size=cfg.group_size),
        activation_config=IntxFakeQuantizeConfig(getattr(torch, f"int{bits[1]}"), "per_token",
                                                 is_symmetric=False),
        estimator=estimator, lam=(cfg.lam or 0.0) if pege else 0.0,
        delta=cfg.delta if estimator.endswith("ewgs") else 0.0, seed=seed,
        backend=cfg.backend))
    return model


# -------------------------------------------------------------- training


def evaluate(model, split, batch_size, prep, metric="accuracy"):
    """Accuracy (%) or, for metric "bits per byte", the mean cross-entropy
    of every predicted byte in bits, in eval mode."""
    model.eval()
    x, y = split
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            out, yb = model(prep(x[i:i + batch_size])), y[i:i + batch_size]
            if metric == "accuracy":
                total += float((out.argmax(1) == yb).sum())
            else:
                total += data.bits_per_byte(out, yb) * len(yb)
    return (100.0 if metric == "accuracy" else 1.0) * total / len(y)


def train_run(model, fit, val, cfg, seed, epochs, lr, desc, curriculum_frac=None):
    """Trains in place on `fit`; returns per-epoch curves (validation accuracy
    when `val` is given). Data order depends on the seed only, so every
    estimator sees the same batches. curriculum_frac: the curriculum's length
    as a fraction of the steps (PEGE), or None."""
    from tqdm import tqdm
    x, y = fit
    total = epochs * math.ceil(len(y) / cfg.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total, 1))
    cur = None
    if curriculum_frac is not None:
        cur = Curriculum(model, max(1, int(curriculum_frac * total)), kind=cfg.curriculum,
                         k=cfg.k, r0=cfg.r0)
    g = torch.Generator().manual_seed(seed)
    curves = dict(epoch=[], loss=[], val_score=[], ratio=[], lam=[])
    bar = tqdm(range(epochs), desc=desc, leave=False, disable=not cfg.progress, file=sys.stderr)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(y), generator=g)
        losses = []
        for i in range(0, len(y), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            # (batch, classes) or (batch, positions, bytes): one loss per target
            loss = nn.functional.cross_entropy(model(cfg.prep_train(x[idx], g)).flatten(0, -2),
                                               y[idx].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if cur is not None:
                cur.step()
            losses.append(loss.item())
        lams = [m.lam for m in model.modules() if isinstance(m, Progressive)
                and m.estimator == "pege"]
        curves["epoch"].append(epoch + 1)
        curves["loss"].append(sum(losses) / len(losses))
        curves["ratio"].append(cur.ratio if cur is not None else 1.0)
        curves["lam"].append(sum(lams) / len(lams) if lams else 0.0)
        if val is not None:
            curves["val_score"].append(evaluate(model, val, 512, cfg.prep_test, cfg.metric))
            bar.set_postfix(loss=f"{curves['loss'][-1]:.3f}", val=f"{curves['val_score'][-1]:.3f}")
    return curves


def fp_run(seed, fit, val, test, args, phase):
    """The seed's FP model, pre-trained on `fit`, and its run record."""
    torch.manual_seed(seed)
    fp = args.model()
    curves = train_run(fp, fit, val, args, seed, args.fp_epochs, args.fp_lr,
                       f"{phase} seed {seed} FP")
    score_on = test if test is not None else val
    return fp, dict(phase=phase, seed=seed, bits="fp", estimator="fp", config=0,
                    score=evaluate(fp, score_on, 512, args.prep_test, args.metric), curves=curves)


def qat_run(fp, seed, job, fit, val, test, phase):
    """One job (bits, estimator, config index, cfg) from the seed's FP model,
    scored on `test` when given (once, at the end), else on `val`."""
    bits, est, index, cfg = job
    t0 = time.time()
    model = quantize(fp, bits, est, cfg, seed)
    name = f"W{bits[0]}A{bits[1]}"
    curves = train_run(model, fit, val, cfg, seed + 1000, cfg.epochs, cfg.lr,
                       f"{phase} seed {seed} {name} {est} #{index}",
                       cfg.curriculum_frac if est.startswith("pege") else None)
    score = evaluate(model, test if test is not None else val, 512, cfg.prep_test, cfg.metric)
    where = "test" if test is not None else "val"
    print(f"{phase} seed {seed} {name} {est:<9} #{index}: {where} {cfg.metric} {score:.3f} "
          f"({time.time() - t0:.0f} s)", flush=True)
    return dict(phase=phase, seed=seed, bits=name, estimator=est, config=index, score=score,
                curves=curves, hp=hyperparameters(cfg, est))


_SHARED = None  # (jobs, fit, val, test, args, phase) for forked workers


def _worker_init(threads):
    torch.set_num_threads(max(threads, 1))


def _fp_task(seed):
    jobs, fit, val, test, args, phase = _SHARED
    return fp_run(seed, fit, val, test, args, phase)


def _qat_task(task):
    fp, seed, j = task
    jobs, fit, val, test, args, phase = _SHARED
    return qat_run(fp, seed, jobs[j], fit, val, test, phase)


def _in_worker(task):
    """What a worker runs: ("fp", seed) or ("qat", (fp, seed, job index))."""
    kind, arg = task
    return (_fp_task if kind == "fp" else _qat_task)(arg)


def run_jobs(jobs, fit, val, test, seeds, args, phase):
    """Per seed, one FP model pre-trained on `fit`, then every job (bits,
    estimator, config index, cfg) from it; runs in seed order. With
    args.jobs > 1 the FP models, then the jobs, are spread over that many
    worker processes (forked: they share the data); a run depends only on its
    seed and job, not on the process that ran it."""
    global _SHARED

    def tasks_of(fps):
        return [(fp, seed, j) for (fp, _), seed in zip(fps, seeds) for j in range(len(jobs))]

    workers = min(args.jobs, len(seeds) * max(len(jobs), 1))
    _SHARED = (jobs, fit, val, test, args, phase)
    try:
        fps = qat = None
        if workers > 1:
            import multiprocessing
            ctx = multiprocessing.get_context("fork")
            try:
                with ctx.Pool(workers, _worker_init, (args.threads,)) as pool:
                    fps = pool.map(_in_worker, [("fp", seed) for seed in seeds], chunksize=1)
                    qat = pool.map(_in_worker, [("qat", t) for t in tasks_of(fps)],
                                   chunksize=1)
            except RuntimeError as err:  # a process that has run autograd cannot fork
                if "fork" not in str(err):
                    raise
                print(f"pege-train: no worker processes ({err}); one run at a time",
                      file=sys.stderr)
                fps = qat = None
        if qat is None:
            fps = [_fp_task(seed) for seed in seeds]
            qat = [_qat_task(t) for t in tasks_of(fps)]
    finally:
        _SHARED = None
    runs = []
    for i, (_, fp_record) in enumerate(fps):
        runs += [fp_record] + qat[i * len(jobs):(i + 1) * len(jobs)]
    return runs


# ---------------------------------------------------------------- tuning

def hyperparameters(cfg, est):
    """The hyperparameters that act on `est`'s runs."""
    keys = ["lr"] + (["delta"] if est.endswith("ewgs") else [])
    if est.startswith("pege"):
        keys += ["rho" if cfg.lam is None and cfg.task != "lm" else "lam",
                 "curriculum_frac", "k"]
    hp = {k: getattr(cfg, k) for k in keys}
    if "lam" in hp and hp["lam"] is None:
        hp["lam"] = 0.0  # what the op gets
    return hp


def candidates(args, est, n):
    """n configurations for `est`: the defaults, then n - 1 random draws from
    its search space (log-uniform lr in [lr/3, 3 lr], delta in [0.03, 1],
    rho in [0.001, 0.1] (lm: lam in [1e-5, 1e-2]); uniform curriculum_frac in
    [0.1, 0.6]). Every
    estimator gets the same n, so the ones with more knobs pay for them."""
    rng = random.Random(f"{args.tune_seed}/{est}")

    def log_uniform(lo, hi):
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    out = [args]
    for _ in range(n - 1):
        cfg = copy.copy(args)
        cfg.lr = log_uniform(args.lr / 3, args.lr * 3)
        if est.endswith("ewgs"):
            cfg.delta = log_uniform(0.03, 1.0)
        if est.startswith("pege"):
            if args.task == "lm":
                cfg.lam = log_uniform(1e-5, 1e-2)
            else:
                cfg.lam, cfg.rho = None, log_uniform(0.001, 0.1)
            cfg.curriculum_frac = rng.uniform(0.1, 0.6)
        out.append(cfg)
    return out


def tune(args, fit, val, train, test):
    """Chooses each (bits, estimator)'s configuration by mean validation
    score (accuracy, or bits per byte: lower) over --tune-seeds (trained on fit = train minus val), then runs
    the chosen ones on train (fit + val) over --seeds, scored once on test."""
    jobs = [(bits, est, i, cfg) for bits in args.bit_pairs for est in args.estimator_list
            for i, cfg in enumerate(candidates(args, est, args.tune))]
    tuned = run_jobs(jobs, fit, val, None, args.tune_seed_list, args, "tune")
    accs = {}
    for r in tuned:
        accs.setdefault((r["bits"], r["estimator"], r["config"]), []).append(
            r["score"] if args.metric == "accuracy" else -r["score"])
    chosen = []
    for bits in args.bit_pairs:
        for est in args.estimator_list:
            options = [j for j in jobs if j[0] == bits and j[1] == est]
            # max keeps the first of the best on ties: the defaults come first.
            chosen.append(max(options, key=lambda j: statistics.mean(
                accs[(f"W{j[0][0]}A{j[0][1]}", j[1], j[2])])))
    final = run_jobs(chosen, train, None, test, args.seed_list, args, "final")
    return tuned, final


# --------------------------------------------------------------- results


def paired(diffs):
    """Mean, std and the 95% t-interval of per-seed differences."""
    n, mean = len(diffs), statistics.mean(diffs)
    if n < 2:
        return mean, 0.0, float("nan"), float("nan")
    from scipy.stats import t
    std = statistics.stdev(diffs)
    half = t.ppf(0.975, n - 1) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def summarize(runs):
    """Per (bits, estimator): n, mean and std of the score over seeds, and the
    paired difference from STE of the same seed (same FP start, same batches):
    mean, std and 95% t-interval (NaN where there is no STE run)."""
    rows = []
    for bits in dict.fromkeys(r["bits"] for r in runs):
        of_bits = [r for r in runs if r["bits"] == bits]
        ste = {r["seed"]: r["score"] for r in of_bits if r["estimator"] == "ste"}
        for est in dict.fromkeys(r["estimator"] for r in of_bits):
            accs = {r["seed"]: r["score"] for r in of_bits if r["estimator"] == est}
            row = dict(bits=bits, estimator=est, n=len(accs), mean=statistics.mean(accs.values()),
                       std=statistics.stdev(accs.values()) if len(accs) > 1 else 0.0)
            seeds = [s for s in accs if s in ste]
            stats = (paired([accs[s] - ste[s] for s in seeds]) if seeds and est != "ste"
                     else (float("nan"),) * 4)
            row.update(zip(("diff_mean", "diff_std", "ci_low", "ci_high"), stats, strict=True))
            rows.append(row)
    return rows


def table(summary, metric):
    acc = metric.endswith("accuracy")
    unit, diff_unit, f = (" (%)", " (pt)", ".2f") if acc else ("", "", ".3f")
    lines = [f"| bits | estimator | {metric}{unit} | vs STE, paired{diff_unit} | 95% interval |",
             "|---|---|---:|---:|---:|"]
    for r in summary:
        diff = ci = "-"
        if not math.isnan(r["diff_mean"]):
            diff = f"{r['diff_mean']:+{f}} +- {r['diff_std']:{f}}"
            if not math.isnan(r["ci_low"]):
                ci = f"[{r['ci_low']:+{f}}, {r['ci_high']:+{f}}]"
        name = "FP32" if r["bits"] == "fp" else r["bits"]
        lines.append(f"| {name} | {r['estimator']} | {r['mean']:{f}} +- {r['std']:{f}} | "
                     f"{diff} | {ci} |")
    return "\n".join(lines)


def write_outputs(out, args, runs, tuned, summary, seconds):
    skip = ("bit_pairs", "model", "prep_train", "prep_test")
    config = {k: v for k, v in vars(args).items() if k not in skip}
    (out / "runs.json").write_text(json.dumps(dict(config=config, runs=runs, tuning=tuned,
                                                   summary=summary), indent=1))
    with open(out / "runs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["phase", "seed", "bits", "estimator", "config", "split", args.metric, "hp"])
        score = "test" if args.score == "test" else "val"
        for r in tuned + runs:
            w.writerow([r["phase"], r["seed"], r["bits"], r["estimator"], r["config"],
                        "val" if r["phase"] == "tune" else score, f"{r['score']:.4f}",
                        json.dumps(r.get("hp", {}))])
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    metric = f"{'test' if args.score == 'test' else 'validation'} {args.metric}"
    how = (f"hyperparameters tuned on validation ({args.tune} per estimator, seeds "
           f"{args.tune_seeds}), refit on train+val" if args.tune else "default hyperparameters")
    print(f"\n{args.dataset}: {metric}, mean +- std over seeds {args.seeds}; {how}; "
          f"{args.epochs} QAT epochs after {args.fp_epochs} FP epochs ({seconds:.0f} s)")
    print(table(summary, metric))
    if args.tune:
        print("\nchosen:", "; ".join(f"{r['bits']} {r['estimator']} #{r['config']} {r['hp']}"
                                     for r in runs if r["seed"] == args.seed_list[0]
                                     and r["estimator"] != "fp"))
    plot(out, args, runs, tuned, summary, metric)
    print(f"\nwrote {out}/runs.json, runs.csv, summary.csv, accuracy.png, curriculum.png, "
          "final.png")


def plot(out, args, runs, tuned, summary, metric):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .qat import schedule

    bits = [b for b in dict.fromkeys(r["bits"] for r in runs) if b != "fp"]
    fig, axes = plt.subplots(1, len(bits), figsize=(5 * len(bits), 4), squeeze=False)
    for ax, b in zip(axes[0], bits, strict=True):
        for est in args.estimator_list:
            # With --tune the final runs have no validation split: the curves
            # are the tuning runs of the configuration chosen.
            cfg = next(r["config"] for r in runs if r["bits"] == b and r["estimator"] == est)
            curves = [r["curves"]["val_score"] for r in tuned or runs if r["bits"] == b
                      and r["estimator"] == est and r["config"] == cfg]
            if curves and curves[0]:
                mean = [statistics.mean(v) for v in zip(*curves, strict=True)]
                ax.plot(range(1, len(mean) + 1), mean, label=est)
        ax.set_title(f"{args.dataset} {b}")
        ax.set_xlabel("QAT epoch")
        ax.set_ylabel(f"validation {args.metric}, mean over seeds")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    t = [i / 100 for i in range(101)]
    ax.plot(t, [schedule(args.curriculum, v, args.k, args.r0) for v in t])
    ax.set_xlabel(f"training step / curriculum length ({args.curriculum_frac:g} of QAT)")
    ax.set_ylabel("replacement ratio r")
    ax.set_title(f"{args.curriculum} curriculum (k={args.k:.3f}, r0={args.r0})")
    fig.tight_layout()
    fig.savefig(out / "curriculum.png", dpi=100)
    plt.close(fig)

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 4.5))
    labels = [f"{r['bits']}\n{r['estimator']}" for r in summary]
    ax.bar(labels, [r["mean"] for r in summary], yerr=[r["std"] for r in summary], capsize=3)
    ax.set_ylabel(f"final {metric}, mean +- std")
    lo, hi = (min(r["mean"] - r["std"] for r in summary), max(r["mean"] + r["std"] for r in summary))
    ax.set_ylim(*((max(0, lo - 5), 100) if args.metric == "accuracy" else
                  (lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))))
    ax.tick_params(axis="x", labelsize=8)
    diffs = [r for r in summary if not math.isnan(r["diff_mean"])]
    if diffs:
        err = [[r["diff_mean"] - r["ci_low"] for r in diffs],
               [r["ci_high"] - r["diff_mean"] for r in diffs]]
        err = None if any(math.isnan(e) for e in err[0]) else err
        bx.bar([f"{r['bits']}\n{r['estimator']}" for r in diffs],
               [r["diff_mean"] for r in diffs], yerr=err, capsize=3, color="tab:orange")
    bx.axhline(0, color="black", lw=0.8)
    bx.tick_params(axis="x", labelsize=8)
    bx.set_ylabel(f"paired difference from STE{' (pt)' if args.metric == 'accuracy' else ''}, "
                  "95% interval")
    fig.tight_layout()
    fig.savefig(out / "final.png", dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="pege-train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=("image", "lm"), default="image",
                    help="image classification (--dataset), or lm: a byte-level transformer "
                         "on Python's standard library sources (bits per byte)")
    ap.add_argument("--dataset", choices=tuple(k for k in data.TASKS if k != "stdlib"),
                    default="mnist1d", help="the image task's data")
    ap.add_argument("--data-dir", default=None, help="cifar10: where the data lies")
    ap.add_argument("--download", action="store_true", help="fetch CIFAR-10 into --data-dir")
    ap.add_argument("--samples", type=int, default=None,
                    help="mnist1d: sequences generated (80%% train, 20%% test; default 5000); "
                         "lm: training windows (default 8192)")
    ap.add_argument("--bits", default=None,
                    help="W/A pairs, e.g. 2/2,3/3 (default; lm: 2/8)")
    ap.add_argument("--group-size", type=int, default=32, help="lm: weights per group")
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--seeds", default=None, help="default 0,1,2,3,4 (lm: 0,1,2)")
    ap.add_argument("--val-frac", type=float, default=0.2,
                    help="fraction of the training set held out for validation")
    ap.add_argument("--score", choices=("test", "val"), default="test",
                    help="score runs on the test set, or on validation only (test untouched)")
    ap.add_argument("--tune", type=int, default=0, metavar="N",
                    help="try N configurations per estimator on validation, then refit")
    ap.add_argument("--tune-seeds", default="100,101")
    ap.add_argument("--tune-seed", type=int, default=0, help="seed of the random search")
    ap.add_argument("--epochs", type=int, default=None, help="QAT epochs")
    ap.add_argument("--fp-epochs", type=int, default=None, help="FP pre-training epochs")
    ap.add_argument("--curriculum", default="log", choices=KINDS)
    ap.add_argument("--curriculum-frac", type=float, default=0.25,
                    help="curriculum length as a fraction of QAT steps")
    ap.add_argument("--k", type=float, default=math.e - 1, help="log curriculum's k")
    ap.add_argument("--r0", type=float, default=0.0)
    ap.add_argument("--rho", type=float, default=0.0,
                    help="PEGE's discretization-error weight relative to the task gradient")
    ap.add_argument("--lam", type=float, default=None,
                    help="the op's raw lambda instead of --rho (a sum over elements)")
    ap.add_argument("--delta", type=float, default=0.2, help="EWGS's delta")
    ap.add_argument("--optimizer", choices=("adam", "sgd"), default=None)
    ap.add_argument("--lr", type=float, default=None, help="QAT learning rate")
    ap.add_argument("--fp-lr", type=float, default=None, help="FP learning rate")
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (0: torch's default; mnist1d, digits: 1)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="runs trained at once, one process each (default: the cores "
                         "available divided by --threads; 1 where --threads is 0)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default="results/train")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.task == "lm":
        args.dataset = "stdlib"
    task = dict(dict(bits="2/2,3/3", samples=5000, seeds="0,1,2,3,4"), **data.TASKS[args.dataset])
    for key in ("epochs", "fp_epochs", "optimizer", "lr", "weight_decay", "batch_size",
                "threads", "bits", "samples", "seeds"):
        if getattr(args, key) is None:
            setattr(args, key, task[key])
    args.metric = data.METRICS.get(args.dataset, "accuracy")
    if args.jobs is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        args.jobs = max(1, cores // args.threads) if args.threads else 1
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    args.fp_lr = args.fp_lr if args.fp_lr is not None else task["lr"]
    args.model, args.progress = task["model"], not args.no_progress
    try:
        args.bit_pairs = [tuple(int(v) for v in b.split("/")) for b in args.bits.split(",")]
    except ValueError:
        args.bit_pairs = []
    if not args.bit_pairs or any(len(p) != 2 for p in args.bit_pairs):
        ap.error(f"--bits must look like 2/2,3/3, got {args.bits!r}")
    args.estimator_list = args.estimators.split(",")
    bad = [e for e in args.estimator_list if e not in ESTIMATORS]
    if bad:
        ap.error(f"unknown estimator(s) {bad}; choose from {', '.join(ESTIMATORS)}")
    if args.task == "lm":
        dim = data.ByteLM().embed.embedding_dim
        if args.rho:
            ap.error("--rho is for the image tasks; --task lm takes the raw --lam")
        if any(not (1 <= w <= 8 and 2 <= a <= 8) for w, a in args.bit_pairs):
            ap.error(f"--task lm needs weight bits in 1..8 and activation bits in 2..8, "
                     f"got {args.bits!r}")
        if args.group_size < 1 or dim % args.group_size:
            ap.error(f"--group-size must divide the model's width {dim}, got {args.group_size}")
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    args.tune_seed_list = [int(s) for s in args.tune_seeds.split(",")]
    if not 0 < args.val_frac < 1:
        ap.error("--val-frac must be in (0, 1)")
    if args.tune and args.score == "val":
        ap.error("--tune scores its final runs on test; drop --score val")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    (train, test), (args.prep_train, args.prep_test), val = data.load(args)
    if val is None:
        keep, held = data.stratified_split(train[1], args.val_frac)
        fit, val = (train[0][keep], train[1][keep]), (train[0][held], train[1][held])
    else:  # the task's own validation split; --tune refits on train + val
        fit, train = train, tuple(torch.cat(p) for p in zip(train, val))
    if args.tune:
        tuned, runs = tune(args, fit, val, train, test)
    else:
        jobs = [(bits, est, 0, args) for bits in args.bit_pairs for est in args.estimator_list]
        tuned, runs = [], run_jobs(jobs, fit, val, test if args.score == "test" else None,
                                   args.seed_list, args, "run")
    summary = summarize(runs)
    write_outputs(out, args, runs, tuned, summary, time.time() - t_start)
    return summary


if __name__ == "__main__":
    main()
