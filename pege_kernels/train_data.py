"""pege-train's tasks: data (mnist1d, digits, cifar10; stdlib for the
language model), models, recipes.

Each loader returns ((x_train, y_train), (x_test, y_test)) as CPU tensors.
An image task's model keeps its first conv and classifier in FP32
(prepare_qat's "first_last" skip) and quantizes the layers in between; the
language model keeps its embeddings and output layer in FP32 and quantizes
every Linear of its blocks.
"""
from __future__ import annotations

import math
import pickle
import sysconfig
import zlib
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


def stdlib_splits():
    """The stdlib corpus's files by split: every .py file directly in this
    Python's standard library directory (sysconfig's "stdlib", e.g.
    lib/python3.11), by name, except the generated _sysconfigdata*.py (it
    holds this installation's paths); a file goes to test when crc32(name) %
    10 == 0, to validation when it is 1, to train otherwise (about 80/10/10,
    the same wherever the same Python version is installed)."""
    files = sorted(f for f in Path(sysconfig.get_paths()["stdlib"]).glob("*.py")
                   if not f.name.startswith("_sysconfigdata"))
    splits = {"train": [], "val": [], "test": []}
    for f in files:
        h = zlib.crc32(f.name.encode()) % 10
        splits["test" if h == 0 else "val" if h == 1 else "train"].append(f)
    return splits


def load_stdlib(train_windows: int, ctx: int = 64):
    """Byte-level language-model data from the standard library's sources
    (stdlib_splits; no download). Each split's files are joined with a
    newline, in name order, and cut into non-overlapping windows of ctx + 1
    bytes; x = a window's first ctx bytes, y = its last ctx (the next byte at
    every position). Train keeps `train_windows` windows drawn by a fixed
    generator; validation and test keep train_windows // 8 each.
    Returns (train, val, test) as (x, y) int64 pairs."""
    g = torch.Generator().manual_seed(0)
    out = []
    for name, files in stdlib_splits().items():
        text = b"\n".join(f.read_bytes() for f in files)
        n = len(text) // (ctx + 1)
        windows = torch.frombuffer(bytearray(text[:n * (ctx + 1)]), dtype=torch.uint8)
        windows = windows.reshape(n, ctx + 1).long()
        keep = train_windows if name == "train" else train_windows // 8
        if keep > n:
            raise ValueError(f"stdlib {name} split has {n} windows of {ctx + 1} bytes, "
                             f"{keep} asked for")
        windows = windows[torch.randperm(n, generator=g)[:keep]]
        out.append((windows[:, :-1].contiguous(), windows[:, 1:].contiguous()))
    return tuple(out)


def bits_per_byte(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy over every predicted byte, in bits."""
    return float(nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten())) / math.log(2)


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
class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal multi-head self-attention, then a GELU
    MLP of width 4 * dim, each with a residual."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class ByteLM(nn.Module):
    """Decoder-only byte-level transformer: token and position embeddings,
    `layers` DecoderBlocks, a final LayerNorm and an output layer (256 logits
    per position). The defaults have 0.14 M parameters."""

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, ctx: int = 64):
        super().__init__()
        self.embed, self.pos = nn.Embedding(256, dim), nn.Embedding(ctx, dim)
        self.blocks = nn.Sequential(*[DecoderBlock(dim, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 256)

    def forward(self, idx):
        x = self.embed(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.norm(self.blocks(x)))


TASKS = {
    "mnist1d": dict(model=mnist1d_cnn, epochs=30, fp_epochs=40, optimizer="adam",
                    lr=3e-3, weight_decay=0.0, batch_size=128, threads=1),
    "digits": dict(model=digits_cnn, epochs=20, fp_epochs=20, optimizer="adam",
                   lr=3e-3, weight_decay=0.0, batch_size=64, threads=1),
    "cifar10": dict(model=resnet20, epochs=200, fp_epochs=200, optimizer="sgd",
                    lr=0.04, weight_decay=5e-4, batch_size=128, threads=0),
    # --task lm: W/A bits are per-group (--group-size) weights, per-token activations.
    "stdlib": dict(model=ByteLM, epochs=2, fp_epochs=3, optimizer="adam", lr=3e-3,
                   weight_decay=0.0, batch_size=32, threads=1, bits="2/8", samples=8192,
                   seeds="0,1,2"),
}
METRICS = {"stdlib": "bits per byte"}  # otherwise accuracy (%)


def load(args):
    """((train, test), the train/test batch transforms, val) of args.dataset;
    val is None where the caller holds out part of train (image tasks)."""
    plain = (lambda x, g: x), (lambda x: x)
    if args.dataset == "stdlib":
        train, val, test = load_stdlib(args.samples)
        return (train, test), plain, val
    if args.dataset == "cifar10":
        return load_cifar10(args.data_dir, args.download), (
            cifar_augment, lambda x: normalize(x.float() / 255)), None
    if args.dataset == "digits":
        return load_digits_split(), plain, None
    return load_mnist1d(args.samples), plain, None
