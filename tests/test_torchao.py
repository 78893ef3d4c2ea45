"""The torchao drop-in (pege_kernels.torchao): quantize_ with PEGEQATConfig,
torchao's convert step, and the PT2E fake quantize."""
import copy
import warnings

import pytest
import torch
from torch import nn

import pege_kernels as pk

pytest.importorskip("torchao")
warnings.filterwarnings("ignore", module="torchao")
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_  # noqa: E402
from torchao.quantization.granularity import PerAxis, PerGroup  # noqa: E402
from torchao.quantization.qat import (FakeQuantizedLinear, IntxFakeQuantizeConfig,  # noqa: E402
                                      QATConfig, initialize_fake_quantizers)

from pege_kernels.torchao import PEGEFakeQuantizer, PEGEPT2EFakeQuantize, PEGEQATConfig  # noqa: E402,E501

INT4_G32 = dict(dtype=torch.int4, group_size=32)
INT8_TOKEN = dict(dtype=torch.int8, granularity="per_token", is_symmetric=False)


class Block(nn.Module):
    """A Hugging Face-style MLP block: Linear layers by name, 3-D activations."""

    def __init__(self, d=64, hidden=128):
        super().__init__()
        self.up_proj = nn.Linear(d, hidden)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return x + self.down_proj(torch.relu(self.up_proj(self.norm(x))))


def model_pair(weight=INT4_G32, act=INT8_TOKEN, estimator="ste", **kw):
    torch.manual_seed(0)
    base = nn.Sequential(Block(), Block())
    ours, theirs = base, copy.deepcopy(base)
    wc = IntxFakeQuantizeConfig(**weight) if weight else None
    ac = IntxFakeQuantizeConfig(**act) if act else None
    quantize_(ours, PEGEQATConfig(weight_config=wc, activation_config=ac, estimator=estimator,
                                  **kw))
    quantize_(theirs, QATConfig(activation_config=ac, weight_config=wc, step="prepare"))
    return ours, theirs


def test_prepare_swaps_every_linear_for_fake_quantized_linear():
    ours, _ = model_pair(estimator="pege", lam=1e-3, seed=5)
    linears = [m for m in ours.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 and all(type(m) is FakeQuantizedLinear for m in linears)
    quantizers = [q for m in linears for q in (m.activation_fake_quantizer,
                                               m.weight_fake_quantizer)]
    assert all(isinstance(q, PEGEFakeQuantizer) for q in quantizers)
    assert len({q.seed for q in quantizers}) == 8  # a distinct mask seed each
    assert [q.role for q in quantizers] == ["activation", "weight"] * 4
    # the same seeds on every process preparing the same model
    again, _ = model_pair(estimator="pege", lam=1e-3, seed=5)
    assert [q.seed for q in quantizers] == [q.seed for m in again.modules()
                                            if isinstance(m, FakeQuantizedLinear)
                                            for q in (m.activation_fake_quantizer,
                                                      m.weight_fake_quantizer)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ste_equals_torchao_qat(dtype):
    """estimator "ste": outputs equal torchao's QATConfig model bit for bit."""
    ours, theirs = model_pair()
    ours.to(dtype), theirs.to(dtype)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert torch.equal(ours(x), theirs(x))


def test_ste_weight_only_gradients_equal_torchao():
    """Weight-only int4 g32: x-gradients bit for bit (the fake-quantized weights
    are); weight gradients equal torchao's to its g * s * (1/s) rounding except
    where the code rounds to qmin or qmax and torchao's gradient is 0 (torch's
    clamp at its bound): the contract passes g while qmin <= x/s + z <= qmax
    (tests/test_group_reference)."""
    ours, theirs = model_pair(act=None)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    g = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(xa).backward(g)
    theirs(xb).backward(g)
    assert torch.equal(xa.grad, xb.grad)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        keep = torch.ones_like(a, dtype=torch.bool)
        if name.endswith("proj.weight"):
            keep = (b.grad != 0) | (a.grad == 0)
            w = a.detach()
            s, _ = pk.reference.group_qparams(w, -8, 7, 32, True)
            t = (w.reshape(w.shape[0], -1, 32) / s.unsqueeze(-1)).reshape(w.shape)
            assert bool((t[~keep].abs() >= 6.5).all())  # the top codes only
        torch.testing.assert_close(a.grad[keep], b.grad[keep], rtol=2.0 ** -20, atol=0,
                                   msg=name)


def test_curriculum_drives_the_quantizers():
    ours, theirs = model_pair(estimator="pege", lam=1e-3)
    cur = pk.Curriculum(ours, total_steps=4, kind="linear")
    qs = [m for m in ours.modules() if isinstance(m, PEGEFakeQuantizer)]
    assert all(q.ratio == 0.0 and q.step == 0 for q in qs)
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    full_precision = nn.Sequential(Block(), Block())
    assert torch.equal(ours(x), full_precision(x))  # r = 0: nothing replaced
    cur.step()
    cur.step()
    assert all(q.ratio == 0.5 and q.step == 2 for q in qs)
    w = ours[0].up_proj.weight
    wq = ours[0].up_proj.weight_fake_quantizer
    y = wq(w)
    mask = pk.replacement_mask(w.shape, 0.5, wq.seed)
    full = theirs[0].up_proj.weight_fake_quantizer(w)
    assert torch.equal(y[mask], full[mask]) and torch.equal(y[~mask], w[~mask])
    ours.eval()  # eval: ratio 1 for every estimator
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("range_learning", [False, True])
@pytest.mark.parametrize("granularity", ["group", "axis"])
def test_train_then_torchao_convert(range_learning, granularity):
    """Prepare, train with the curriculum, convert with torchao's QATConfig
    convert step: the int4-weight / int8-activation model's outputs equal the
    fake-quantized eval model's."""
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    g = PerGroup(32) if granularity == "group" else PerAxis(0)
    wc = IntxFakeQuantizeConfig(torch.int4, granularity=g, is_symmetric=True,
                                is_dynamic=not range_learning, range_learning=range_learning)
    quantize_(model, PEGEQATConfig(weight_config=wc,
                                   activation_config=IntxFakeQuantizeConfig(**INT8_TOKEN),
                                   estimator="pege", lam=1e-3))
    x = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(5))
    if range_learning:
        initialize_fake_quantizers(model, (x,))
        scales = [p for n, p in model.named_parameters() if n.endswith("scale")]
        assert len(scales) == 4
        before = [s.detach().clone() for s in scales]
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    cur = pk.Curriculum(model, total_steps=3)
    for step in range(3):
        xb = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(10 + step))
        model(xb).square().mean().backward()
        opt.step()
        opt.zero_grad()
        cur.step()
    if range_learning:
        assert all(not torch.equal(a, b) for a, b in zip(scales, before))  # learned
    model.eval()
    with torch.no_grad():
        expected = model(x)
    base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=g)
    quantize_(model, QATConfig(base, step="convert"))
    assert not any(isinstance(m, FakeQuantizedLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_static_qparams_come_from_the_first_call():
    q = PEGEFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=16, is_dynamic=False),
                          estimator="ste")
    a = torch.randn(8, 32, generator=torch.Generator().manual_seed(6))
    q(a)
    s = q.scale.clone()
    b = 10 * a
    assert torch.equal(q.scale, s) and not torch.equal(q(b), pk.fake_quantize_dynamic(
        b, -8, 7, group_size=16, symmetric=True))
    assert torch.equal(q.scale, s)


@pytest.mark.parametrize("call,match", [
    (lambda: PEGEFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=32),
                               estimator="lsq"), "estimator"),
    (lambda: PEGEFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=32), lam=-1.0),
     "lam"),
    (lambda: PEGEFakeQuantizer(object()), "IntxFakeQuantizeConfig"),
    (lambda: PEGEFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=32,
                                                      scale_precision=torch.bfloat16)),
     "scale_precision"),
    (lambda: PEGEFakeQuantizer(IntxFakeQuantizeConfig(torch.uint4, group_size=32)),
     "signed dtype"),
    (lambda: PEGEQATConfig(), "weight_config"),
    (lambda: quantize_(nn.Sequential(nn.Linear(48, 8)), PEGEQATConfig(
        weight_config=IntxFakeQuantizeConfig(**INT4_G32))), "does not divide"),
    (lambda: quantize_(pk.prepare_qat(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8),
                                                    nn.Linear(8, 8)),
                                      weight_bits=4, act_bits=4),
                       PEGEQATConfig(weight_config=IntxFakeQuantizeConfig(
                           torch.int4, granularity=PerAxis(0)))), "filter_fn"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_pt2e_prepare_train_convert():
    """PEGEPT2EFakeQuantize through torchao's prepare_qat_pt2e / convert_pt2e:
    trains with the curriculum; at its end (r = 1) the converted model's
    outputs equal the fake-quantized graph's."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import (QuantizationAnnotation, QuantizationSpec,
                                                     Quantizer)

    def spec(dtype, lo, hi, role):
        return QuantizationSpec(dtype=dtype, quant_min=lo, quant_max=hi,
                                qscheme=torch.per_tensor_affine,
                                observer_or_fake_quant_ctr=PEGEPT2EFakeQuantize.with_args(
                                    role=role, estimator="pege", lam=1e-3))

    class LinearQuantizer(Quantizer):
        def annotate(self, gm):
            for n in gm.graph.nodes:
                if n.op == "call_function" and n.target == torch.ops.aten.linear.default:
                    n.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={n.args[0]: spec(torch.uint8, 0, 15, "activation"),
                                         n.args[1]: spec(torch.int8, -8, 7, "weight")},
                        _annotated=True)
            return gm

        def validate(self, gm):
            pass

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.rand(4, 16, generator=torch.Generator().manual_seed(7))
    prepared = prepare_qat_pt2e(torch.export.export(model, (x,)).module(), LinearQuantizer())
    fqs = [m for m in prepared.modules() if isinstance(m, PEGEPT2EFakeQuantize)]
    assert len(fqs) == 4
    cur = pk.Curriculum(prepared, total_steps=3)
    prepared(x)  # LSQ's first-batch init
    init = [q.quantizer.scale.detach().clone() for q in fqs]
    opt = torch.optim.SGD(prepared.parameters(), lr=1e-2)
    for step in range(3):
        xb = torch.rand(4, 16, generator=torch.Generator().manual_seed(20 + step))
        prepared(xb).square().mean().backward()
        opt.step()
        opt.zero_grad()
        cur.step()
    assert all(q.quantizer.ratio == 1.0 for q in fqs)
    assert all(not torch.equal(q.quantizer.scale, s) for q, s in zip(fqs, init))  # learned
    with torch.no_grad():
        expected = prepared(x)
        converted = convert_pt2e(prepared)
        torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-6)


def test_pt2e_rejects_per_channel_and_dynamic_specs():
    with pytest.raises(ValueError, match="per tensor"):
        PEGEPT2EFakeQuantize(dtype=torch.int8, quant_min=-8, quant_max=7,
                             qscheme=torch.per_channel_affine)
    with pytest.raises(ValueError, match="is_dynamic"):
        PEGEPT2EFakeQuantize(dtype=torch.int8, quant_min=-8, quant_max=7, is_dynamic=True)


def test_pt2e_range_from_the_spec_dtype_and_default_qscheme():
    q = PEGEPT2EFakeQuantize(dtype=torch.uint8, qscheme=None)
    assert (q.quant_min, q.quant_max, q.dtype) == (0, 255, torch.uint8)
    assert q.qscheme == torch.per_tensor_affine


def test_learned_scale_through_zero_stays_valid_and_repr_names_the_estimator():
    q = PEGEFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=32, is_dynamic=False,
                                                 range_learning=True), estimator="pege")
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    q._initialized = True  # what torchao's initialize_fake_quantizers sets
    before = q(w).detach()
    with torch.no_grad():
        q.scale.neg_()  # an optimizer step through zero: |s| gives the same values
    assert isinstance(q.scale, torch.nn.Parameter) and bool((q.scale < 0).all())
    assert torch.equal(q(w), before)
    assert "estimator=pege" in repr(q) and "role=weight" in repr(q)

