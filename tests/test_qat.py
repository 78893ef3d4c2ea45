"""QAT layer: quantizer presets, estimators, curriculum, prepare_qat, convert."""
import math
import warnings

import pytest
import torch
from torch import nn

import pege_kernels as pk
from pege_kernels.nn import Quantizer
from pege_kernels.qat import schedule


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32),
                         nn.ReLU(), nn.Linear(32, 10))


def digits(n=512):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target[:n])


def test_ste_quantizer_agrees_with_torch_learnable():
    x = torch.randn(300, generator=torch.Generator().manual_seed(0))
    q = Quantizer(4, estimator="ste")
    q(x)  # LSQ init
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = q(xa)
    gf = 1.0 / math.sqrt(x.numel() * q.quant_max)
    s = q.scale.detach().clone().requires_grad_(True)
    yt = torch._fake_quantize_learnable_per_tensor_affine(xb, s, q.zero_point.clone(),
                                                          q.quant_min, q.quant_max, gf)
    assert torch.equal(y, yt)
    g = torch.randn(300, generator=torch.Generator().manual_seed(1))
    y.backward(g)
    yt.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    torch.testing.assert_close(q.scale.grad, s.grad, rtol=1e-5, atol=1e-6)


def test_lsq_init():
    x = torch.randn(16, 9)
    q = Quantizer(3, axis=0, channels=16)
    q(x)
    torch.testing.assert_close(q.scale.detach(), 2 * x.abs().mean(1) / math.sqrt(q.quant_max))


def test_pact_preset_is_clipping_at_alpha():
    x = torch.linspace(-2, 9, 101)
    q = Quantizer(3, preset="pact", estimator="ste", role="activation")
    alpha = q.scale.item() * q.quant_max
    s = alpha / q.quant_max
    expected = torch.clamp(torch.round(x / s), 0, q.quant_max) * s
    torch.testing.assert_close(q(x), expected, atol=1e-6, rtol=0)
    q(x).sum().backward()
    assert q.scale.grad is not None  # alpha is learnt


def test_dorefa_preset():
    w = torch.randn(8, 5)
    q = Quantizer(2, preset="dorefa", estimator="ste")
    t = torch.tanh(w)
    w01 = t / (2 * t.abs().max()) + 0.5
    expected = 2 * torch.round(w01 * 3) / 3 - 1
    torch.testing.assert_close(q(w), expected, atol=1e-6, rtol=0)


def test_minmax_preset_ema():
    q = Quantizer(4, preset="minmax", estimator="ste")
    a, b = torch.randn(100), 3 * torch.randn(100)
    q(a)
    torch.testing.assert_close(q.scale, a.abs().max().reshape(1) / 7)
    q(b)
    torch.testing.assert_close(q.scale, 0.9 * a.abs().max().reshape(1) / 7
                               + 0.1 * b.abs().max().reshape(1) / 7)
    assert not any(p.requires_grad for p in q.parameters())


def test_estimators_set_exactly_their_knobs():
    mk = lambda e: Quantizer(2, estimator=e, lam=0.5, delta=0.3)  # noqa: E731
    ste, ewgs, pege, both = mk("ste"), mk("ewgs"), mk("pege"), mk("pege+ewgs")
    for q in (ste, ewgs, pege, both):
        q.ratio = 0.25
    assert ste.settings() == (1.0, 0.0, 0.0)
    assert ewgs.settings() == (1.0, 0.0, 0.3)
    assert pege.settings() == (0.25, 0.5, 0.0)
    assert both.settings() == (0.25, 0.5, 0.3)
    pege.eval()
    assert pege.settings() == (1.0, 0.5, 0.0)  # eval: fully quantized


@pytest.mark.parametrize("kind", ["log", "linear", "cosine", "exp", "step", "constant"])
def test_schedules(kind):
    rs = [schedule(kind, t / 10, math.e - 1, 0.1) for t in range(11)]
    assert rs[0] == pytest.approx(0.1)
    assert all(b >= a for a, b in zip(rs, rs[1:], strict=False))
    assert rs[-1] == pytest.approx(0.1 if kind == "constant" else 1.0)


def test_log_schedule_formula():
    k = math.e - 1
    assert schedule("log", 0.5, k, 0.0) == pytest.approx(math.log(1 + k / 2) / math.log(1 + k))


def test_curriculum_drives_pege_quantizers_and_offsets():
    model = pk.prepare_qat(small_cnn(), weight_bits=2, act_bits=2, estimator="pege", lam=0.1)
    cur = pk.Curriculum(model, 10, lam=0.2)
    for _ in range(5):
        cur.step()
    qs = [m for m in model.modules() if isinstance(m, Quantizer)]
    assert all(q.ratio == cur.ratio and q.step == 5 and q.lam == 0.2 * cur.ratio for q in qs)
    state = cur.state_dict()
    fresh = pk.prepare_qat(small_cnn(), weight_bits=2, act_bits=2)
    cur2 = pk.Curriculum(fresh, 99)
    cur2.load_state_dict(state)
    assert cur2.ratio == cur.ratio and cur2.t == 5


def test_prepare_qat_swaps_and_keeps_weights():
    ref = small_cnn()
    model = pk.prepare_qat(small_cnn(), weight_bits=3, act_bits=3, seed=5)
    kinds = [type(m).__name__ for m in model if not isinstance(m, (nn.ReLU,))]
    assert kinds[0] == "Conv2d" and kinds[-1] == "Linear"  # first and last kept
    assert isinstance(model[2], pk.nn.QuantConv2d) and isinstance(model[6], pk.nn.QuantLinear)
    assert torch.equal(model[2].weight, ref[2].weight)
    again = pk.prepare_qat(small_cnn(), weight_bits=3, act_bits=3, seed=5)
    assert model[2].weight_quant.seed == again[2].weight_quant.seed
    assert model[2].weight_quant.seed != model[6].weight_quant.seed
    everything = pk.prepare_qat(small_cnn(), weight_bits=3, act_bits=3, skip=())
    assert sum(isinstance(m, (pk.nn.QuantConv2d, pk.nn.QuantLinear))
               for m in everything.modules()) == 4


@pytest.mark.parametrize("estimator", ["ste", "ewgs", "pege"])
def test_w2a2_trains_with_falling_loss(estimator):
    x, y = digits()
    model = pk.prepare_qat(small_cnn(), weight_bits=2, act_bits=2, estimator=estimator,
                           lam=1e-3, delta=0.2)
    cur = pk.Curriculum(model, 40)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        cur.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10, losses


def test_convert_is_exact_and_holds_int_codes():
    x, _ = digits(64)
    model = pk.prepare_qat(small_cnn(), weight_bits=3, act_bits=3, skip=())
    model(x)  # LSQ init
    model.eval()
    expected = model(x)
    conv = pk.convert(model)
    assert torch.equal(conv(x), expected)
    codes = [m.weight_quant.codes for m in conv.modules() if hasattr(m, "weight_quant")]
    assert codes and all(c.dtype == torch.int8 and c.min() >= -4 and c.max() <= 3 for c in codes)
    assert not any(p.numel() > 1000 and p.dtype == torch.float32 and p.dim() > 1
                   for n, p in conv.named_parameters() if "weight" in n)


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32),
                         nn.ReLU(), nn.Linear(32, 10))


def test_per_group_weights_train_and_convert_exactly():
    """weight_group_size: Linear weights get a learned (scale, zero point) per
    (output, group of G inputs); LSQ's init and gradient scale are per group;
    convert keeps int codes + per-group scales with the eval outputs' bits."""
    x, y = digits(128)
    model = pk.prepare_qat(mlp(), weight_bits=4, act_bits=4, weight_group_size=16, skip=())
    wq = model[1].weight_quant
    assert wq.scale.shape == (64, 4) and wq.zero_point.shape == (64, 4)
    assert "group_size=16" in repr(wq)
    model(x)  # LSQ init: 2 mean|w| / sqrt(qmax) per group
    w = model[1].weight.detach().reshape(64, 4, 16)
    torch.testing.assert_close(wq.scale.detach(), 2 * w.abs().mean(-1) / math.sqrt(7))
    cur = pk.Curriculum(model, 6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(6):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        # ratio 0 at step 0 (nothing replaced, no scale gradient), then > 0
        assert wq.scale.grad.shape == (64, 4)
        assert bool(wq.scale.grad.abs().sum() > 0) == (step > 0)
        opt.step()
        cur.step()
    model.eval()
    expected = model(x)
    conv = pk.convert(model)
    assert torch.equal(conv(x), expected)
    iw = conv[1].weight_quant
    assert iw.codes.dtype == torch.int8 and iw.codes.shape == (64, 64)
    assert iw.scale.shape == (64, 4) and iw.group_size == 16
    assert int(iw.codes.min()) >= -8 and int(iw.codes.max()) <= 7


def test_per_group_arguments_are_checked():
    with pytest.raises(ValueError, match="does not divide 1.in_features = 64"):
        pk.prepare_qat(mlp(), weight_bits=4, act_bits=4, weight_group_size=48, skip=())
    with pytest.raises(ValueError, match="not both"):
        pk.nn.Quantizer(4, axis=0, channels=8, group_size=4)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        pk.nn.Quantizer(4, channels=(8, 2), group_size=0)


def test_compile_quantized_model():
    x, _ = digits(32)
    model = pk.prepare_qat(small_cnn(), weight_bits=2, act_bits=2, estimator="pege")
    pk.Curriculum(model, 10).step()
    model(x)  # LSQ init outside the compiled region
    torch._dynamo.reset()
    # No graph break through a fused backend; the reference fallback computes
    # its Philox words eagerly (one break, see docs/method.md).
    fused = "cpu" in pk.available_backends()
    compiled = torch.compile(model, fullgraph=fused)
    torch.testing.assert_close(compiled(x), model(x))


def test_torch_ao_qconfig_drop_in():
    from torch.ao.quantization import QConfig, prepare_qat
    qconfig = QConfig(activation=pk.PEGEFakeQuantize.with_args(bits=4, signed=False,
                                                               role="activation"),
                      weight=pk.PEGEFakeQuantize.with_args(bits=4, estimator="pege"))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    model.qconfig = qconfig
    model = prepare_qat(model.train())
    cur = pk.Curriculum(model, 5)
    x, y = digits(128)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cur.step()
    assert math.isfinite(loss.item())
    assert any(isinstance(m, pk.PEGEFakeQuantize) for m in model.modules())


def test_torch_ao_range_arguments_and_clamped_zero_point():
    fq = pk.PEGEFakeQuantize(quant_min=0, quant_max=15)
    assert (fq.quantizer.bits, fq.quantizer.signed) == (4, False)
    fq = pk.PEGEFakeQuantize(quant_min=-8, quant_max=7)
    assert (fq.quantizer.bits, fq.quantizer.signed) == (4, True)
    with pytest.raises(ValueError, match="b-bit range"):
        pk.PEGEFakeQuantize(quant_min=-3, quant_max=7)
    with pytest.raises(TypeError):
        pk.PEGEFakeQuantize(observer=None)  # unknown arguments are not swallowed
    fq.quantizer.zero_point.fill_(100.0)
    assert fq.calculate_qparams()[1].tolist() == [7]


@pytest.mark.parametrize("kw,match", [
    (dict(bits=0), "bits"), (dict(bits=17), "bits"), (dict(estimator="sgd"), "estimator"),
    (dict(preset="foo"), "preset"), (dict(lam=-1.0), "lam"), (dict(role="bias"), "role")])
def test_bad_quantizer_config(kw, match):
    args = dict(bits=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        Quantizer(args.pop("bits"), **args)


@pytest.mark.parametrize("kw,match", [(dict(total_steps=0), "total_steps"),
                                      (dict(kind="sigmoid"), "kind"),
                                      (dict(lam=-0.1), "lam"), (dict(k=0.0), "k")])
def test_bad_curriculum_config(kw, match):
    args = dict(total_steps=10)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        pk.Curriculum(nn.Linear(2, 2), args.pop("total_steps"), **args)


def test_bad_prepare_qat_config():
    with pytest.raises(ValueError, match="estimator"):
        pk.prepare_qat(small_cnn(), weight_bits=2, act_bits=2, estimator="lsq")
    with pytest.raises(ValueError, match="bits"):
        pk.prepare_qat(small_cnn(), weight_bits=0, act_bits=2)


def test_dynamic_presets_are_torchaos_per_token_and_per_group_quantizers():
    qat = pytest.importorskip("torchao.quantization.qat")
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(11))
    tok = Quantizer(8, preset="dynamic", role="activation", estimator="ste")
    grp = Quantizer(4, preset="dynamic_symmetric", group_size=32, estimator="ste")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao_tok = qat.IntxFakeQuantizer(qat.IntxFakeQuantizeConfig(torch.int8, "per_token",
                                                                  is_symmetric=False))
        ao_grp = qat.IntxFakeQuantizer(qat.IntxFakeQuantizeConfig(torch.int4, group_size=32))
    assert torch.equal(tok(x), ao_tok(x))
    assert torch.equal(grp(x[0]), ao_grp(x[0]))
    assert "per token" in repr(tok) and tok.scale.numel() == 0


def test_dynamic_activation_preset_in_prepare_qat_trains_with_the_curriculum():
    model = pk.prepare_qat(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32),
                                         nn.ReLU(), nn.Linear(32, 4)),
                           weight_bits=4, act_bits=8, act_preset="dynamic", act_signed=True,
                           estimator="pege", lam=1e-3)
    aq = model[2].act_quant
    assert aq.spec.dynamic == "asymmetric" and (aq.quant_min, aq.quant_max) == (-128, 127)
    cur = pk.Curriculum(model, 2, kind="linear")
    cur.step()
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(12))
    y = aq(x)
    mask = pk.replacement_mask(x.shape, 0.5, aq.seed, offset=1)
    full = pk.fake_quantize_dynamic(x, -128, 127)
    assert torch.equal(y[mask], full[mask]) and torch.equal(y[~mask], x[~mask])
    model(torch.randn(8, 16)).sum().backward()
    assert model[2].weight.grad is not None


def test_dynamic_preset_is_not_per_channel():
    with pytest.raises(ValueError, match="per token or per group"):
        Quantizer(8, preset="dynamic", axis=0, channels=4)
