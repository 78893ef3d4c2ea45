"""pege-train's tasks: data (mnist1d, digits, cifar10), models, recipes.

Each loader returns ((x_train, y_train), (x_test, y_test)) as CPU tensors.
A task's model keeps its first conv and classifier in FP32 (prepare_qat's
"first_last" skip) and quantizes the layers in between.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

# ------------------------------------------------------------------ data


def load_mnist1d(num_samples: int = 5000):
    """MNIST-1D (Greydanus 2020), generated here by the mnist1d package with
    its default arguments (seed 42): 4000 training and 1000 test sequences of
    length 40, standardised. Nothing is downloaded. Shape (N, 1, 1, 40): the
    1-D convolutions are Conv2d with (1, k) kernels, which prepare_qat swaps."""
    from mnist1d.data import get_dataset_args, make_dataset
    a = get_dataset_args()
    a.num_samples = num_samples
    d = make_dataset(a)  # seeds numpy's and random's global generators with a.seed

    def tensors(x, y):
        return torch.tensor(x, dtype=torch.float32).reshape(len(y), 1, 1, -1), torch.tensor(y)
    return tensors(d["x"], d["y"]), tensors(d["x_test"], d["y_test"])


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


def stratified_split(y: torch.Tensor, frac: float, seed: int = 0):
    """(keep, held_out) index tensors: `frac` of every class held out, drawn
    with a fixed generator, so the validation split is the same in every run."""
    g = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = round(frac * len(idx))
        held.append(idx[:n])
        keep.append(idx[n:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values


# ---------------------------------------------------------------- models


def _block(cin, cout, kernel, stride=1):
    pad = (0, kernel[1] // 2) if isinstance(kernel, tuple) else kernel // 2
    return [nn.Conv2d(cin, cout, kernel, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def mnist1d_cnn(width: int = 8) -> nn.Module:
    """1-D CNN for MNIST-1D (length 40): four (1, 5)-kernel convs of `width`
    channels (strides 1, 2, 2, 1), then a linear classifier on the flattened
    width x 10 features. The three inner convs are quantized; at width 8,
    W2A2 STE is clearly below FP32 (docs/training.md)."""
    k = (1, 5)
    return nn.Sequential(*_block(1, width, k), *_block(width, width, k, (1, 2)),
                         *_block(width, width, k, (1, 2)), *_block(width, width, k),
                         nn.Flatten(), nn.Linear(width * 10, 10))


def digits_cnn() -> nn.Module:
    """Small CNN for 8x8 digits; conv1 and the classifier stay FP32."""
    return nn.Sequential(*_block(1, 32, 3), *_block(32, 64, 3), nn.MaxPool2d(2),
                         *_block(64, 64, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


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


# ----------------------------------------------------------------- tasks

# Per task: the model and the recipe's defaults. The small tasks run on one
# thread: their ops are too small to gain from more, and on a shared machine
# OpenMP threads that wait for a busy core make every op many times slower.
TASKS = {
    "mnist1d": dict(model=mnist1d_cnn, epochs=30, fp_epochs=40, optimizer="adam",
                    lr=3e-3, weight_decay=0.0, batch_size=128, threads=1),
    "digits": dict(model=digits_cnn, epochs=20, fp_epochs=20, optimizer="adam",
                   lr=3e-3, weight_decay=0.0, batch_size=64, threads=1),
    "cifar10": dict(model=resnet20, epochs=200, fp_epochs=200, optimizer="sgd",
                    lr=0.04, weight_decay=5e-4, batch_size=128, threads=0),
}


def load(args):
    """(train, test) and the train/test batch transforms of args.dataset."""
    plain = (lambda x, g: x), (lambda x: x)
    if args.dataset == "cifar10":
        return load_cifar10(args.data_dir, args.download), (
            cifar_augment, lambda x: normalize(x.float() / 255))
    if args.dataset == "digits":
        return load_digits_split(), plain
    return load_mnist1d(args.samples), plain
