"""The random numbers: Philox known answers, mask statistics and agreement."""
import math
import os
import subprocess
import sys

import pytest
import torch

import pege_kernels as pk
from pege_kernels.reference import philox4x32_10

from conftest import kernel_backends

# Random123's philox4x32_10 known-answer vectors: (counter, key) -> words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    words = philox4x32_10(*(torch.tensor([c]) for c in ctr), *key)
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_mask_fraction_within_binomial_bounds(ratio):
    n = 1 << 16
    frac = pk.replacement_mask((n,), ratio, seed=3, backend="reference").float().mean().item()
    p = round(ratio * 2**24) / 2**24
    assert abs(frac - p) <= 6 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_masks_nested_as_ratio_grows():
    masks = [pk.replacement_mask((5000,), r, seed=9, offset=4, backend="reference")
             for r in (0.1, 0.3, 0.6, 0.95)]
    for small, big in zip(masks, masks[1:], strict=False):
        assert bool((small & ~big).sum() == 0) and big.sum() > small.sum()


def test_other_seed_or_offset_gives_other_mask():
    m = pk.replacement_mask((4096,), 0.5, seed=1, offset=2, backend="reference")
    assert not torch.equal(m, pk.replacement_mask((4096,), 0.5, seed=2, offset=2, backend="reference"))
    assert not torch.equal(m, pk.replacement_mask((4096,), 0.5, seed=1, offset=3, backend="reference"))
    # seed and offset above 32 bits use their high words too
    assert not torch.equal(m, pk.replacement_mask((4096,), 0.5, seed=1 + 2**32, offset=2,
                                                  backend="reference"))
    assert not torch.equal(m, pk.replacement_mask((4096,), 0.5, seed=1, offset=2 + 2**32,
                                                  backend="reference"))


@kernel_backends()
@pytest.mark.parametrize("shape", [(0,), (1,), (3,), (1023,), (4097,), (7, 33, 5)])
@pytest.mark.parametrize("seed,offset", [(0, 0), (12345, 678), (2**40 + 7, 2**33 + 1)])
def test_masks_bit_identical_across_backends(backend, shape, seed, offset):
    ref = pk.replacement_mask(shape, 0.37, seed, offset, backend="reference")
    assert torch.equal(pk.replacement_mask(shape, 0.37, seed, offset, backend=backend), ref)


PHILOX_RUN = """
import torch, pege_kernels as pk
for shape, seed, offset in [((4097,), 12345, 678), ((70001,), 2**40 + 7, 2**33 + 1)]:
    for ratio in (0.37, 0.9):
        ref = pk.replacement_mask(shape, ratio, seed, offset, backend="reference")
        assert torch.equal(pk.replacement_mask(shape, ratio, seed, offset, backend="cpu"), ref)
x = torch.randn(70001) * 0.5
s, z = torch.tensor([0.05]), torch.tensor([3.0])
kw = dict(ratio=0.5, seed=5, offset=9)
assert torch.equal(pk.fake_quantize(x, s, z, -8, 7, backend="cpu", **kw),
                   pk.fake_quantize(x, s, z, -8, 7, backend="reference", **kw))
print("ok")
"""


@pytest.mark.skipif("cpu" not in pk.available_backends(), reason="no compiled CPU kernels")
@pytest.mark.parametrize("routine", ["portable", "avx2"])
def test_cpu_philox_routines(routine):
    """Each of the CPU kernels' Philox routines (AVX-512, AVX2, portable
    lanes; the best the CPU has runs by default) gives the reference's masks;
    PEGE_PHILOX caps the choice, so a run here covers the lower ones too."""
    env = dict(os.environ, PEGE_PHILOX=routine)
    out = subprocess.run([sys.executable, "-c", PHILOX_RUN], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
