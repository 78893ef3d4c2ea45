"""pege-train: STE vs EWGS vs PEGE quantization-aware training, same recipe.

    pege-train                                  # digits, W2A2 and W3A3, 3 seeds
    pege-train --dataset cifar10 --data-dir DIR --bits 2/2,3/3,4/4 --epochs 200 --fp-epochs 200

Per seed, one full-precision model is pre-trained (--fp-epochs) and shared;
every (bit width, estimator) run starts from it with the same optimizer,
cosine learning rate and data order. Test accuracy is measured in eval mode,
that is with every element quantized (ratio 1). Writes runs.json, runs.csv,
summary.csv and three PNGs to --out, and prints the table.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import pickle
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .qat import Curriculum, prepare_qat, schedule

# ------------------------------------------------------------------ data


def load_digits_split():
    """scikit-learn's 8x8 digits (1797 real images), a fixed stratified
    80/20 split; pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    return (x[tr], y[tr]), (x[te], y[te])


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def load_cifar10(data_dir: str | None, download: bool):
    """CIFAR-10 in its python-pickle layout (cifar-10-batches-py/data_batch_1..5,
    test_batch), read directly: torchvision's reader insists on the official
    files' checksums. torchvision downloads it when --download is given."""
    if data_dir is None:
        raise SystemExit("--dataset cifar10 needs --data-dir DIR")
    root = Path(data_dir)
    if download:
        import torchvision
        torchvision.datasets.CIFAR10(str(root), download=True)
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)]
    if not all((base / n).is_file() for n in names + ["test_batch"]):
        raise SystemExit(f"CIFAR-10 not found in {root}: expected cifar-10-batches-py/"
                         "data_batch_1..5 and test_batch (pass --download to fetch it)")

    def read(files):
        xs, ys = [], []
        for f in files:
            with open(base / f, "rb") as fh:
                d = pickle.load(fh, encoding="latin1")
            xs.append(torch.tensor(d["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            ys.append(torch.tensor(d["labels"]))
        return torch.cat(xs), torch.cat(ys)

    return read(names), read(["test_batch"])


def cifar_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Standard augmentation on a uint8 batch: 4-pixel padded random crop and
    horizontal flip, then per-channel normalisation."""
    n = x.shape[0]
    padded = nn.functional.pad(x.float() / 255, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
    idx = torch.arange(32)
    rows = (dy[:, None] + idx)[:, None, :, None]  # n, 1, 32, 1
    cols = (dx[:, None] + idx)[:, None, None, :]  # n, 1, 1, 32
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None],
                 rows, cols]
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return normalize(out)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------- models


def digits_cnn() -> nn.Module:
    """Small CNN for 8x8 digits; conv1 and the classifier stay FP32."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(1, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


def resnet20() -> nn.Module:
    """ResNet-20 for CIFAR (He et al. 2016): 3 stages x 3 blocks, 16/32/64."""
    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for b in range(3):
            layers.append(BasicBlock(cin, cout, stride if b == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


# -------------------------------------------------------------- training


def evaluate(model, data, batch_size, prep):
    model.eval()
    x, y = data
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += (model(prep(x[i:i + batch_size])).argmax(1) == y[i:i + batch_size]).sum()
    return 100.0 * int(correct) / len(y)


def train_run(model, train, test, args, seed, epochs, prep_train, prep_test, desc,
              curriculum_steps=None, progress=True):
    """Trains in place; returns per-epoch curves. Data order depends on the
    seed only, so every estimator sees the same batches."""
    from tqdm import tqdm
    x, y = train
    steps_per_epoch = math.ceil(len(y) / args.batch_size)
    total = epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total, 1))
    cur = None
    if curriculum_steps is not None:
        cur = Curriculum(model, max(curriculum_steps, 1), kind=args.curriculum, k=args.k,
                         r0=args.r0)
    g = torch.Generator().manual_seed(seed)
    curves = dict(epoch=[], loss=[], test_acc=[], ratio=[])
    bar = tqdm(range(epochs), desc=desc, leave=False, disable=not progress, file=sys.stderr)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(y), generator=g)
        losses = []
        for i in range(0, len(y), args.batch_size):
            idx = order[i:i + args.batch_size]
            loss = nn.functional.cross_entropy(model(prep_train(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if cur is not None:
                cur.step()
            losses.append(loss.item())
        acc = evaluate(model, test, 512, prep_test)
        curves["epoch"].append(epoch + 1)
        curves["loss"].append(sum(losses) / len(losses))
        curves["test_acc"].append(acc)
        curves["ratio"].append(cur.ratio if cur is not None else 1.0)
        bar.set_postfix(loss=f"{curves['loss'][-1]:.3f}", acc=f"{acc:.1f}")
    return curves


# ------------------------------------------------------------------ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="pege-train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=("digits", "cifar10"), default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--download", action="store_true", help="fetch CIFAR-10 into --data-dir")
    ap.add_argument("--bits", default="2/2,3/3", help="W/A pairs, e.g. 2/2,3/3")
    ap.add_argument("--estimators", default="ste,ewgs,pege")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="QAT epochs (digits 20, cifar 200)")
    ap.add_argument("--fp-epochs", type=int, default=None, help="FP pre-training epochs")
    ap.add_argument("--curriculum", default="log",
                    choices=("log", "linear", "cosine", "exp", "step", "constant"))
    ap.add_argument("--curriculum-frac", type=float, default=0.5,
                    help="curriculum length as a fraction of QAT steps")
    ap.add_argument("--k", type=float, default=math.e - 1)
    ap.add_argument("--r0", type=float, default=0.0)
    ap.add_argument("--lam", type=float, default=1e-4, help="PEGE's lambda")
    ap.add_argument("--delta", type=float, default=0.2, help="EWGS's delta")
    ap.add_argument("--optimizer", choices=("adam", "sgd"), default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default="results/train")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    cifar = args.dataset == "cifar10"
    defaults = dict(epochs=200 if cifar else 20, fp_epochs=200 if cifar else 20,
                    optimizer="sgd" if cifar else "adam", lr=0.04 if cifar else 3e-3,
                    weight_decay=5e-4 if cifar else 0.0, batch_size=128 if cifar else 64)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.bit_pairs = [tuple(int(v) for v in b.split("/")) for b in args.bits.split(",")]
        assert all(len(p) == 2 for p in args.bit_pairs)
    except (ValueError, AssertionError):
        ap.error(f"--bits must look like 2/2,3/3, got {args.bits!r}")
    args.estimator_list = args.estimators.split(",")
    bad = [e for e in args.estimator_list if e not in ("ste", "ewgs", "pege")]
    if bad:
        ap.error(f"unknown estimator(s) {bad}; choose from ste, ewgs, pege")
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    return args


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dataset == "cifar10":
        train, test = load_cifar10(args.data_dir, args.download)
        model_fn, prep_train = resnet20, cifar_augment
        prep_test = lambda x: normalize(x.float() / 255)  # noqa: E731
    else:
        train, test = load_digits_split()
        model_fn, prep_train, prep_test = digits_cnn, (lambda x, g: x), (lambda x: x)
    steps_per_epoch = math.ceil(len(train[1]) / args.batch_size)
    cur_steps = max(1, int(args.curriculum_frac * args.epochs * steps_per_epoch))
    runs, t_start = [], time.time()
    for seed in args.seed_list:
        torch.manual_seed(seed)
        fp = model_fn()
        fp_curves = train_run(fp, train, test, args, seed, args.fp_epochs, prep_train, prep_test,
                              f"seed {seed} FP", progress=not args.no_progress)
        runs.append(dict(seed=seed, bits="fp", estimator="fp", final_acc=fp_curves["test_acc"][-1],
                         curves=fp_curves))
        for wb, ab in args.bit_pairs:
            for est in args.estimator_list:
                model = prepare_qat(copy.deepcopy(fp), weight_bits=wb, act_bits=ab, estimator=est,
                                    seed=seed, lam=args.lam if est == "pege" else 0.0,
                                    delta=args.delta if est == "ewgs" else 0.0,
                                    backend=args.backend)
                curves = train_run(model, train, test, args, seed + 1000, args.epochs,
                                   prep_train, prep_test, f"seed {seed} W{wb}A{ab} {est}",
                                   curriculum_steps=cur_steps if est == "pege" else None,
                                   progress=not args.no_progress)
                runs.append(dict(seed=seed, bits=f"W{wb}A{ab}", estimator=est,
                                 final_acc=curves["test_acc"][-1], curves=curves))
                print(f"seed {seed} W{wb}A{ab} {est:<4}: test acc {curves['test_acc'][-1]:.2f}%",
                      flush=True)
    summary = summarize(runs)
    write_outputs(out, args, runs, summary, cur_steps, time.time() - t_start)
    return summary


def summarize(runs):
    rows = []
    for bits in dict.fromkeys(r["bits"] for r in runs):
        for est in dict.fromkeys(r["estimator"] for r in runs if r["bits"] == bits):
            accs = [r["final_acc"] for r in runs if r["bits"] == bits and r["estimator"] == est]
            rows.append(dict(bits=bits, estimator=est, n=len(accs), mean=statistics.mean(accs),
                             std=statistics.stdev(accs) if len(accs) > 1 else 0.0))
    return rows


def write_outputs(out, args, runs, summary, cur_steps, seconds):
    config = {k: v for k, v in vars(args).items() if k not in ("bit_pairs",)}
    (out / "runs.json").write_text(json.dumps(dict(config=config, runs=runs,
                                                   summary=summary), indent=1))
    with open(out / "runs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["seed", "bits", "estimator", "final_test_acc"])
        for r in runs:
            w.writerow([r["seed"], r["bits"], r["estimator"], f"{r['final_acc']:.2f}"])
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    print(f"\n{args.dataset}: test accuracy (%), mean +- std over seeds {args.seeds}, "
          f"{args.epochs} QAT epochs after {args.fp_epochs} FP epochs ({seconds:.0f} s)")
    print("| bits | estimator | accuracy |\n|---|---|---:|")
    for row in summary:
        print(f"| {row['bits']} | {row['estimator']} | {row['mean']:.2f} +- {row['std']:.2f} |")
    plot(out, args, runs, summary, cur_steps)
    print(f"\nwrote {out}/runs.json, runs.csv, summary.csv, accuracy.png, curriculum.png, "
          "final.png")


def plot(out, args, runs, summary, cur_steps):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = [b for b in dict.fromkeys(r["bits"] for r in runs) if b != "fp"]
    fig, axes = plt.subplots(1, len(bits), figsize=(5 * len(bits), 4), squeeze=False)
    for ax, b in zip(axes[0], bits, strict=True):
        for est in args.estimator_list:
            curves = [r["curves"]["test_acc"] for r in runs if r["bits"] == b
                      and r["estimator"] == est]
            mean = [statistics.mean(v) for v in zip(*curves, strict=True)]
            ax.plot(range(1, len(mean) + 1), mean, label=est)
        ax.set_title(f"{args.dataset} {b}")
        ax.set_xlabel("QAT epoch")
        ax.set_ylabel("test accuracy (%), mean over seeds")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    t = [i / 100 for i in range(101)]
    ax.plot([v * cur_steps for v in t], [schedule(args.curriculum, v, args.k, args.r0) for v in t])
    ax.set_xlabel("training step")
    ax.set_ylabel("replacement ratio r")
    ax.set_title(f"{args.curriculum} curriculum (k={args.k:.3f}, r0={args.r0})")
    fig.tight_layout()
    fig.savefig(out / "curriculum.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r['bits']}\n{r['estimator']}" for r in summary]
    ax.bar(labels, [r["mean"] for r in summary], yerr=[r["std"] for r in summary], capsize=3)
    ax.set_ylabel("final test accuracy (%)")
    lo = min(r["mean"] - r["std"] for r in summary)
    ax.set_ylim(max(0, lo - 5), 100)
    fig.tight_layout()
    fig.savefig(out / "final.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
