"""Worker processes for tests/test_qat_process.py (resume, DDP).

    python qat_worker.py train OUT STEPS [--resume CKPT] [--save-at K CKPT]
    python qat_worker.py ddp OUT RANK WORLD INIT_FILE
    python qat_worker.py fsdp2 OUT RANK WORLD INIT_FILE
"""
import sys

import torch
from torch import nn

import pege_kernels as pk


def model_and_data(lam=1e-3):
    from sklearn.datasets import load_digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    model = pk.prepare_qat(model, weight_bits=2, act_bits=2, estimator="pege", lam=lam)
    d = load_digits()
    x = torch.tensor(d.images[:256], dtype=torch.float32).unsqueeze(1) / 16.0
    return model, x, torch.tensor(d.target[:256])


def batch(x, y, step, lo=0, hi=32):
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(step))[:32]
    return x[idx[lo:hi]], y[idx[lo:hi]]


def train(out, steps, resume=None, save_at=None):
    model, x, y = model_and_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cur = pk.Curriculum(model, steps)
    start = 0
    if resume:
        state = torch.load(resume)
        model(x[:1])  # creates nothing new; LSQ state comes from the checkpoint
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        cur.load_state_dict(state["cur"])
        start = cur.t
    for step in range(start, steps):
        if save_at is not None and step == save_at[0]:
            torch.save(dict(model=model.state_dict(), opt=opt.state_dict(),
                            cur=cur.state_dict()), save_at[1])
            return
        xb, yb = batch(x, y, step)
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cur.step()
    torch.save(model.state_dict(), out)


def ddp(out, rank, world, init_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    # lam = 0: the lam term is a sum over elements, so DDP's gradient average
    # scales the activations' share by 1 / world_size (see README).
    model, x, y = model_and_data(lam=0.0)
    # At r < 1 activation masks are drawn per rank-local tensor, so only the
    # finished curriculum (r = 1) can equal the single-process step exactly.
    cur = pk.Curriculum(model, 1)
    cur.step()
    ddp_model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
    per = 32 // world
    xb, yb = batch(x, y, 0, rank * per, (rank + 1) * per)
    loss = nn.functional.cross_entropy(ddp_model(xb), yb)
    opt.zero_grad()
    loss.backward()
    opt.step()
    masks = {n: pk.replacement_mask(m.weight.shape, 0.5, m.weight_quant.seed)
             for n, m in model.named_modules() if hasattr(m, "weight_quant")}
    torch.save(dict(weights=model.state_dict(), masks=masks), out)
    dist.destroy_process_group()


def fsdp2(out, rank, world, init_file):
    """One FSDP2 (fully_shard) step on CPU / gloo: the package's LSQ
    quantizers (prepare_qat) and the torchao drop-in's dynamic per-group /
    per-token quantizers, in one model."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    from pege_kernels.torchao import PEGEQATConfig
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    pk.prepare_qat(model, weight_bits=4, act_bits=4, estimator="pege", skip=[2, 3])
    quantize_(model, PEGEQATConfig(
        weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32),
        activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
        estimator="pege"), filter_fn=lambda m, name: type(m) is nn.Linear)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2))
    per = 32 // world
    xb, yb = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    # LSQ's first-batch init writes the scales: run it before sharding (the
    # statistic is all-reduced, so every rank starts from the global batch's).
    with torch.no_grad():
        model(xb)
    cur = pk.Curriculum(model, 1)
    cur.step()  # r = 1: activation masks drawn per rank-local tensor agree only there
    for m in model:
        if any(p.requires_grad for p in m.parameters()):
            fully_shard(m)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(xb), yb)
    loss.backward()
    opt.step()
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
             for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(state, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "train":
        steps = int(sys.argv[3])
        rest = sys.argv[4:]
        resume = rest[rest.index("--resume") + 1] if "--resume" in rest else None
        save_at = ((int(rest[rest.index("--save-at") + 1]), rest[rest.index("--save-at") + 2])
                   if "--save-at" in rest else None)
        train(out, steps, resume, save_at)
    else:
        {"ddp": ddp, "fsdp2": fsdp2}[mode](out, int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
