"""QLinear: from_linear, quantize_weight and quantize_model against the format's independent
reference (reference.py), forward against the float64 reference, dequantize, constructor
errors, repr, .to(), TorchScript, torch.compile(fullgraph) on a quantized model."""

import io

import pytest
import torch
from torch import nn

import linquant as lq
from reference import (linear_bound, ref_stored_values, ref_stored_weight, ref_weight, ref_weight_values,
                       ref_weight_format)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd K (no group divides it), N = 1 with a group that divides K and one that does not, K = 64.
FORMAT_SHAPES = [(5, 37), (1, 40), (3, 64)]
FORMAT_GROUPS = [None, 8, 12, 16]  # multiples of 4, as 2 bits need


def format_weight(n, k, gen):
    """Rows of mixed magnitudes and offsets (asymmetric ranges, zero points away from 0); from
    N = 3 a row of 1e-5 (fp16 scales below its smallest normal: subnormal, or its smallest subnormal
    where they round to 0)
    and a constant row (scale |c|)."""
    mag = 10.0 ** (torch.rand(n, 1, generator=gen) * 3 - 2)
    w = torch.randn(n, k, generator=gen) * mag + torch.randn(n, 1, generator=gen) * mag
    if n >= 3:
        w[1] = torch.randn(k, generator=gen) * 1e-5
        w[2] = 0.3
    return w


def check_reference_format(qw, weight, bits, group_size, symmetric, dtype=None):
    """qw's scales, zeros and stored values are those of reference.py's format, bit for bit."""
    n, k = weight.shape
    q, s, z = ref_weight_format(weight, bits, group_size, symmetric, dtype)
    assert qw.scales.dtype == s.dtype and qw.scales.shape == s.shape and torch.equal(qw.scales, s)
    assert (qw.zeros is None) == symmetric
    if not symmetric:
        assert qw.zeros.dtype == torch.int32 and torch.equal(qw.zeros, z)
    assert qw.qweight.dtype == (torch.int8 if bits == 8 and symmetric else torch.uint8)
    assert qw.qweight.shape == (n, k if bits == 8 else -(-k * bits // 8))
    assert torch.equal(ref_stored_values(qw.qweight, bits, k), q)
    return q, s, z


def check_forward(layer, x, w, bits, group_size):
    """layer(x) against x @ w.T + bias in float64, w the reference's float64 weight [N, K]."""
    x64 = x.double().reshape(-1, x.shape[-1])
    ref = x64 @ w.T + layer.bias.double()
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == x.shape[:-1] + (w.shape[0],)
    bound = linear_bound(x64, w, layer.qweight, layer.scales, layer.zeros, bits, group_size, x.dtype, ref)
    err = (y.double().reshape(ref.shape) - ref).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_from_linear_is_the_reference_format(bits, dtype, gen):
    # The buffers against the format computed from its formulas, not from the layer's own output:
    # a wrong scale or values quantized with the unrounded fp32 scale show here. Then the forward
    # and dequantize() on the reference's float64 weight.
    for n, k in FORMAT_SHAPES:
        lin = nn.Linear(k, n, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(format_weight(n, k, gen))
        weight = lin.weight.detach()
        for group_size in FORMAT_GROUPS:
            for symmetric in (True, False):
                layer = lq.QLinear.from_linear(lin, bits, group_size, symmetric)
                assert layer.scales.dtype == dtype and torch.equal(layer.bias, lin.bias.detach())
                q, s, z = check_reference_format(layer, weight, bits, group_size, symmetric)
                w = ref_stored_weight(q, s, z, bits, group_size, k)
                assert torch.equal(layer.dequantize(), w.float().to(dtype))  # fp32 product, then dtype
                check_forward(layer, torch.randn(2, 3, k, generator=gen).to(dtype), w, bits, group_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_quantize_weight_scales_in_another_dtype(dtype, gen):
    # fp32 weights with fp16 / bf16 scales: the values are quantized with the rounded scales.
    for n, k in FORMAT_SHAPES:
        w = format_weight(n, k, gen)
        for bits, group_size, symmetric in [(8, None, True), (4, 12, False), (2, 16, True), (8, 8, False)]:
            qw = lq.quantize_weight(w, bits, group_size, symmetric, dtype=dtype)
            check_reference_format(qw, w, bits, group_size, symmetric, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 64), (4, 32), (4, 100), (2, 16)], ids=str)
def test_asymmetric_weights_come_back_within_half_a_stored_step(dtype, bits, group_size, gen):
    # Asymmetric scales that fp16 / bf16 cannot hold exactly are rounded up and the zero points
    # chosen for the stored scales, so each group's stored range still spans its [min, max]:
    # every weight within half a stored step (and fp32's rounding of s * (q - z)). Groups far from
    # 0 show it most: with the fp32 scale's zero point, N(1, 0.1) weights at 8 bits in bf16 came
    # back up to 2.7 steps off. fp32 weights with scales in dtype, and weights in dtype (a model's).
    n, k = 48, 300
    for w in (torch.randn(n, k, generator=gen), torch.randn(n, k, generator=gen) * 0.1 + 1,
              -torch.rand(n, k, generator=gen) * 3 - 1e3, torch.rand(n, k, generator=gen) * 1e-6):
        for weight, scales_dtype in ((w, dtype), (w.to(dtype), None)):
            qw = lq.quantize_weight(weight, bits, group_size, False, dtype=scales_dtype)
            assert qw.scales.dtype == dtype
            w_hat = ref_weight(qw.qweight, qw.scales, qw.zeros, bits, group_size, k)
            g = k if group_size is None else group_size
            step = qw.scales.double().repeat_interleave(g, dim=1)[:, :k]
            err = (w_hat - weight.double()).abs()
            assert bool((err <= step * 0.5 + weight.double().abs() * 2.0**-22).all()), float((err / step).max())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weights_at_their_dtypes_largest_value_come_back_finite(dtype, gen):
    # Groups reaching the weight dtype's largest value, whose stored scale rounded up put the grid
    # point of the group's end past it: fp16 weights at 65504 stored the 8-bit symmetric scale
    # 65504 / 127 = 515.8 as 516, and 127 x 516 = 65532 came back inf in fp16 (4-bit asymmetric:
    # 15 x 4432). Now the scale one step down where that keeps both ends within the limit and
    # within half a step, else the weight takes the grid point a step in: every weight finite in its
    # dtype and within a stored step; the reference format bit for bit; the groups away from the
    # limit within half a step, as ever.
    top = torch.finfo(dtype).max
    n, k = 7, 44  # the last group of 16 is 12 long
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    w[0, 0] = top
    w[1, 21] = -top
    w[2] = top * (1 - torch.rand(k, generator=gen, dtype=torch.float64) * 2.0**-6)  # far from 0
    w[3, k - 1] = top
    w[4, :22] = top * torch.rand(22, generator=gen, dtype=torch.float64)
    w[5] = -top * (1 - torch.rand(k, generator=gen, dtype=torch.float64) * 2.0**-9)
    w = w.to(dtype)
    w64 = w.double()
    reaches = w64.abs() >= top * (1 - 2.0**-5)
    # (bf16 scales for fp32 weights at FLT_MAX would overflow: a ValueError, test_errors.py.)
    for scales_dtype in (None, torch.float32) + ((torch.bfloat16,) if dtype != torch.float32 else ()):
        for bits, group_size in ((8, None), (8, 16), (4, 16), (4, None), (2, 16)):
            for symmetric in (True, False):
                qw = lq.quantize_weight(w, bits, group_size, symmetric, dtype=scales_dtype)
                check_reference_format(qw, w, bits, group_size, symmetric, scales_dtype)
                w_hat = lq.dequantize_weight(qw, dtype)
                assert bool(w_hat.isfinite().all())
                g = k if group_size is None else group_size
                step = qw.scales.double().repeat_interleave(g, dim=1)[:, :k]
                rounding = w64.abs() * torch.finfo(dtype).eps  # w_hat's rounding to dtype, doubled
                err = (w_hat.double() - w64).abs() - rounding
                where = (scales_dtype, bits, group_size, symmetric)
                assert bool((err < step).all()), where
                g_reach = torch.stack([reaches[:, i:i + g].any(1) for i in range(0, k, g)], 1)
                calm = ~g_reach.repeat_interleave(g, dim=1)[:, :k]
                assert bool((err <= step / 2)[calm].all()), where
    # The mse search's candidates are checked the same way: finite.
    qw = lq.quantize_weight(w, 4, 16, False, method="mse")
    assert bool(lq.dequantize_weight(qw, dtype).isfinite().all())


def group_sse(w_hat, w, group_size):
    """float64 squared error of each group (each row per channel) of w_hat against w: [N, G]."""
    err = (w_hat - w.double()).square()
    if group_size is None:
        return err.sum(-1, keepdim=True)
    return torch.stack([err[:, i:i + group_size].sum(-1) for i in range(0, w.shape[1], group_size)], dim=-1)


# The clipping ratios method="mse" tries, as the docs give them: 1 down to 0.5 in steps of 1/40.
MSE_GRID = [1 - i / 40 for i in range(21)]


def ref_candidate(w, ratio, bits, group_size, symmetric, dtype):
    """(stored values, scales, zeros) of w quantized with the reference qparams of w * ratio."""
    _, s, z = ref_weight_format(w * ratio, bits, group_size, symmetric, dtype)
    q = ref_weight_values(w, s, z, bits, 0 if group_size is None else None, group_size)
    return (q + 2 ** (bits - 1) if symmetric and bits < 8 else q), s, z


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 12, False), (2, 8, True), (2, None, False),
                                                       (4, 32, True)])
def test_mse_method_takes_each_groups_best_clipping_ratio(bits, group_size, symmetric, dtype, gen):
    # Against the reference formulas: the stored values are w quantized with the stored scales and
    # zero points, and every group's squared error is the least of the ratio grid's candidates
    # (each computed by the reference), so never above minmax's. Heavy tails: clipping pays.
    n, k = 6, 72
    w = (torch.randn(n, k, generator=gen) * torch.rand(n, k, generator=gen).pow(4) * 3).to(dtype)
    qw = lq.quantize_weight(w, bits, group_size, symmetric, method="mse")
    got_q = ref_stored_values(qw.qweight, bits, k)
    axis = 0 if group_size is None else None
    expected_q = ref_weight_values(w, qw.scales, qw.zeros, bits, axis, group_size)
    assert torch.equal(got_q, expected_q + 2 ** (bits - 1) if symmetric and bits < 8 else expected_q)
    got = group_sse(ref_stored_weight(got_q, qw.scales, qw.zeros, bits, group_size, k), w, group_size)
    candidates = torch.stack([
        group_sse(ref_stored_weight(*ref_candidate(w, r, bits, group_size, symmetric, dtype), bits, group_size, k),
                  w, group_size) for r in MSE_GRID])
    best, minmax = candidates.amin(0), candidates[0]
    assert torch.all(got <= best * (1 + 1e-9) + 1e-300), (got, best)
    assert torch.all(got <= minmax * (1 + 1e-9))
    if bits < 8:  # some group gains from clipping at 4 and 2 bits on these tails
        assert got.sum() < minmax.sum()
    # The same scales through every entry point: QLinear, quantize_model.
    lin = nn.Linear(k, n, bias=False, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = lq.QLinear.from_linear(lin, bits, group_size, symmetric, method="mse")
    assert torch.equal(layer.scales, qw.scales) and torch.equal(layer.qweight, qw.qweight)
    model = lq.quantize_model(nn.Sequential(lin), bits, group_size, symmetric, exclude=(), method="mse")
    assert torch.equal(model[0].scales, qw.scales)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mse_ties_keep_minmaxs_range(dtype):
    # 2 bits symmetric (steps -2..1): minmax's scale 3 and ratio 0.5's scale 1.5 both leave a
    # squared error of exactly 4 in this group (every value dyadic), the least of the grid. A group
    # that gains nothing from clipping keeps minmax's scale, so ties go to the larger range.
    w = torch.tensor([[-0.5, 1.0, 3.0, -1.0, -0.5, 1.0, -0.5, -0.5]], dtype=dtype)
    bits, group_size, k = 2, 8, 8
    candidates = [(r, *ref_candidate(w, r, bits, group_size, True, dtype)) for r in MSE_GRID]
    sse = {r: float(group_sse(ref_stored_weight(q, s, z, bits, group_size, k), w, group_size)) for r, q, s, z in candidates}
    scales = {r: float(s) for r, _, s, _ in candidates}
    assert sse[1.0] == sse[0.5] == min(sse.values()) == 4.0
    assert (scales[1.0], scales[0.5]) == (3.0, 1.5)  # a tie between two different scales
    qw = lq.quantize_weight(w, bits, group_size, True, method="mse")
    assert qw.scales.tolist() == [[3.0]]


def test_method_is_checked():
    for call in (lambda: lq.quantize_weight(torch.randn(4, 8), method="absmax"),
                 lambda: lq.quantize_model(nn.Sequential(nn.Linear(8, 4)), method="MSE"),
                 lambda: lq.QLinear.from_linear(nn.Linear(8, 4), method=None)):
        with pytest.raises(ValueError, match="method must be one of 'minmax', 'mse', got"):
            call()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, False), (4, 12, True), (2, 8, False)])
def test_quantize_model_is_the_reference_format(bits, group_size, symmetric, dtype, gen):
    model = nn.Sequential(nn.Linear(37, 5), nn.ReLU(), nn.Linear(5, 1, bias=False)).to(dtype)
    weights = [m.weight.detach().clone() for m in (model[0], model[2])]
    lq.quantize_model(model, bits, group_size, symmetric, exclude=())
    for layer, weight in zip((model[0], model[2]), weights):
        assert isinstance(layer, lq.QLinear)
        check_reference_format(layer, weight, bits, group_size, symmetric)


def test_conv1d_transposed_weight(gen):
    lin = nn.Linear(64, 96)
    conv_like = nn.Module()
    conv_like.weight = nn.Parameter(lin.weight.detach().t().contiguous())  # [in, out]
    conv_like.bias = lin.bias
    a = lq.QLinear.from_linear(lin, 8)
    b = lq.QLinear.from_linear(conv_like, 8, transposed=True)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)


def test_repr_and_to_dtype():
    q = lq.QLinear.from_linear(nn.Linear(64, 32), 4, 32, symmetric=False)
    assert "bits=4, group_size=32, asymmetric" in repr(q)
    before = {name: t.clone() for name, t in q.named_buffers()}
    h = q.to(torch.float16)  # the float buffers converted, the integer ones kept
    assert torch.equal(h.scales, before["scales"].half()) and torch.equal(h.bias, before["bias"].half())
    assert torch.equal(h.qweight, before["qweight"]) and torch.equal(h.zeros, before["zeros"])
    x = torch.randn(2, 64, dtype=torch.float16)
    assert torch.equal(h(x), lq.linear(x, before["qweight"], before["scales"].half(), before["zeros"],
                                       before["bias"].half(), 4, 32))


def test_float64_is_refused_when_converting_not_at_forward():
    # Module.double() / .to(float64) would convert the scales and bias, which linear cannot take:
    # refused at the conversion, with this layer's buffers as they were.
    model = nn.Sequential(lq.QLinear.from_linear(nn.Linear(16, 8), 8))
    for convert in (lambda m: m.double(), lambda m: m.to(torch.float64), lambda m: m.to("cpu", torch.float64)):
        with pytest.raises(ValueError, match="scales and bias must stay float32, float16 or bfloat16 .* not "
                                             "torch.float64"):
            convert(model)
        assert model[0].scales.dtype == torch.float32 and model[0].bias.dtype == torch.float32
    assert model.to("meta")[0].scales.device.type == "meta"


def test_set_weight_and_set_bias_check_their_shapes(gen):
    layer = lq.QLinear(16, 8, bias=False, bits=4, group_size=8, device="meta")
    with pytest.raises(ValueError, match=r"set_weight: weight must be \[out_features, in_features\] = \[8, 16\], "
                                         r"got \[16, 8\]"):
        layer.set_weight(torch.randn(16, 8, generator=gen))
    with pytest.raises(ValueError, match=r"set_bias: the layer was built without a bias"):
        layer.set_bias(torch.zeros(8))
    with pytest.raises(ValueError, match=r"set_bias: bias must be \[out_features\] = \[8\], got \[8, 1\]"):
        lq.QLinear(16, 8, bits=8).set_bias(torch.zeros(8, 1))
    w = torch.randn(8, 16, generator=gen)
    layer.set_weight(w)  # a meta layer gets real buffers, equal to from_linear's
    linear = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    reference = lq.QLinear.from_linear(linear, 4, 8)
    assert layer.qweight.device.type == "cpu"
    assert torch.equal(layer.qweight, reference.qweight) and torch.equal(layer.scales, reference.scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_the_bias_is_a_copy(dtype):
    """from_linear and set_bias keep a bias of the layer's own: training or editing the float model
    afterwards (an optimizer step, bias.zero_()) leaves the quantized layer as it was made."""
    linear = nn.Linear(16, 5).to(dtype)
    q = lq.QLinear.from_linear(linear, bits=8)
    kept = linear.bias.detach().clone()
    with torch.no_grad():
        linear.bias.add_(1.0)
    assert torch.equal(q.bias, kept)
    assert q.bias.untyped_storage().data_ptr() != linear.bias.untyped_storage().data_ptr()
    b = torch.randn(5).to(dtype)
    q.set_bias(b)
    b.zero_()
    assert not torch.equal(q.bias, b)


def test_bad_configuration():
    with pytest.raises(ValueError, match="bits must be 8, 4 or 2"):
        lq.QLinear(16, 8, bits=3)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 4 at 2 bits"):
        lq.QLinear(16, 8, bits=2, group_size=6)
    # The same check before a weight is quantized or a model is changed: linear could not run either.
    with pytest.raises(ValueError, match="quantize_weight: group_size must be a positive multiple of 2 at 4 bits"):
        lq.quantize_weight(torch.randn(8, 16), bits=4, group_size=3)
    with pytest.raises(ValueError, match=r"scales above torch.float16's largest value \(65504\)"):
        lq.quantize_weight(torch.randn(8, 16) * 1e7, bits=8, dtype=torch.float16)  # 1e7 / 127 > 65504
    model = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(ValueError, match="quantize_model: group_size must be a positive multiple of 4 at 2 bits"):
        lq.quantize_model(model, bits=2, group_size=2)
    assert isinstance(model[0], nn.Linear)
    with torch.no_grad():
        model[0].weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="quantize_model: layer '0': linquant: x contains NaN or Inf"):
        lq.quantize_model(model, bits=8)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(in_features=-1), ValueError, "in_features must be >= 0, got -1"),
    (dict(out_features=-3), ValueError, "out_features must be >= 0, got -3"),
    (dict(in_features=8.0), TypeError, "in_features must be an int, got float"),
    (dict(out_features=None), TypeError, "out_features must be an int, got NoneType"),
    (dict(group_size=32.0, bits=4), TypeError, "group_size must be an int or None, got float"),
    (dict(dtype=torch.int32), ValueError, "dtype .* must be float32, float16 or bfloat16, got torch.int32"),
    (dict(dtype=torch.float64), ValueError, "dtype .* must be float32, float16 or bfloat16, got torch.float64"),
    (dict(dtype="float16"), TypeError, "dtype must be a torch.dtype, got str"),
], ids=str)
def test_constructor_arguments_are_checked(kwargs, error, match):
    # Named at construction, not as a tensor factory's "Dimension size must be non-negative" or,
    # for an integer dtype, at the first forward.
    args = dict(in_features=8, out_features=4) | kwargs
    with pytest.raises(error, match="linquant.QLinear: " + match):
        lq.QLinear(**args)


def test_constructor_accepts_empty_and_every_compute_dtype():
    for dtype in DTYPES:
        layer = lq.QLinear(0, 0, bits=4, group_size=8, dtype=dtype)
        assert layer.scales.shape == (0, 0) and layer.scales.dtype == dtype and layer.bias.shape == (0,)


@pytest.mark.parametrize("bits", [4, 2])
def test_in_features_checked(bits, gen):
    # 7 and 8 values pack into the same bytes at 4 (and 2) bits: only the layer can tell them apart.
    layer = lq.QLinear.from_linear(nn.Linear(8, 3), bits=bits)
    with pytest.raises(ValueError, match=r"x must have in_features=8 in its last dim, got shape \[2, 7\]"):
        layer(torch.randn(2, 7, generator=gen))
    assert layer(torch.randn(2, 8, generator=gen)).shape == (2, 3)
    with pytest.raises(torch.jit.Error, match="ValueError: linquant.QLinear: x must have in_features=8"):
        torch.jit.script(layer)(torch.randn(2, 7, generator=gen))
    # Compiled: the ValueError itself, or under fullgraph=True Dynamo's report of it (the message
    # used to be built with str(), which Dynamo cannot trace, and only that failure showed).
    for fullgraph in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=fullgraph, dynamic=True, backend="eager")
        assert compiled(torch.randn(2, 8, generator=gen)).shape == (2, 3)
        with pytest.raises(Exception) as raised:
            compiled(torch.randn(2, 7, generator=gen))
        error = raised.value if not fullgraph else raised.value.__cause__
        assert "linquant.QLinear: x must have in_features=8 in its last dim, got shape" in str(error)
        assert isinstance(raised.value, ValueError) or fullgraph


def test_empty_in_features_with_groups(gen):
    layer = lq.QLinear.from_linear(nn.Linear(0, 3), bits=4, group_size=32)
    assert layer.scales.shape == (3, 0)
    assert torch.equal(layer(torch.randn(2, 0, generator=gen)), layer.bias.expand(2, 3))


@pytest.mark.parametrize("saved_format,layer_format,field", [
    (dict(bits=4), dict(in_features=32, bits=2), "bits = 4, this layer has 2"),  # 8 bytes a row either way
    (dict(bits=4), dict(in_features=15, bits=4), "in_features = 16, this layer has 15"),  # 15 values take 8 too
    (dict(bits=8, group_size=6), dict(bits=8, group_size=7), "group_size = 6, this layer has 7"),  # 3 groups each
], ids=str)
def test_a_state_dict_of_another_format_is_refused(saved_format, layer_format, field, gen):
    # Its buffers have the shapes and dtypes of this layer's: it used to load and compute garbage.
    source = lq.QLinear.from_linear(nn.Linear(16, 4), **saved_format)
    layer = lq.QLinear(**(dict(in_features=16, out_features=4) | layer_format))
    with pytest.raises(ValueError, match=f"linquant.QLinear: the state_dict holds a layer with {field}"):
        layer.load_state_dict(source.state_dict())
    buffer = io.BytesIO()
    torch.save(nn.Sequential(nn.ReLU(), source).state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()))
    with pytest.raises(ValueError, match=f"the state_dict at '1' holds a layer with {field}"):  # kept by torch.save
        nn.Sequential(nn.ReLU(), layer).load_state_dict(saved)
    same = lq.QLinear(16, 4, **saved_format)
    same.load_state_dict(source.state_dict())
    x = torch.randn(2, 16, generator=gen)
    assert torch.equal(same(x), source(x))
    layer.load_state_dict(dict(source.state_dict()))  # a plain dict of tensors carries no format to check


def test_a_state_dict_of_another_embedding_or_experts_format_is_refused():
    table = lq.QEmbedding.from_embedding(nn.Embedding(10, 16), bits=4)
    with pytest.raises(ValueError, match="linquant.QEmbedding: the state_dict holds a layer with bits = 4, this "
                                         "layer has 2"):
        lq.QEmbedding(10, 32, bits=2).load_state_dict(table.state_dict())
    experts = lq.QExpertsWeight.from_weight(torch.randn(3, 4, 16), False, 4, None, True)
    with pytest.raises(ValueError, match="linquant.QExpertsWeight: the state_dict holds a layer with in_features = 16, "
                                         "this layer has 15"):
        lq.QExpertsWeight(3, 15, 4, bits=4).load_state_dict(experts.state_dict())


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")], ids=str)
def test_a_state_dict_with_scales_linear_cannot_use_is_refused(bad, gen):
    # linear takes scales as they are (no check at each call): zero, negative or non-finite ones
    # gave zero, sign-flipped or NaN outputs. Refused at loading, the layer's buffers unchanged,
    # for every quantized module (they share the format's hooks).
    source = lq.QLinear.from_linear(nn.Linear(64, 8), bits=4, group_size=32, symmetric=False)
    state = source.state_dict()
    state["scales"] = state["scales"].clone()
    state["scales"][5, 1] = bad
    layer = lq.QLinear(64, 8, bits=4, group_size=32, symmetric=False)
    with pytest.raises(ValueError, match="linquant.QLinear: the state_dict holds scales that are not finite and positive"):
        layer.load_state_dict(state)
    assert torch.equal(layer.scales, torch.ones(8, 2))
    with pytest.raises(ValueError, match="the state_dict at '1' holds scales that are not finite and positive"):
        nn.Sequential(nn.ReLU(), layer).load_state_dict({"1." + k: v for k, v in state.items()})
    table = lq.QEmbedding.from_embedding(nn.Embedding(10, 16), bits=8)
    state = table.state_dict()
    state["scales"] = -state["scales"]
    with pytest.raises(ValueError, match="linquant.QEmbedding: the state_dict holds scales that are not finite"):
        lq.QEmbedding(10, 16, bits=8).load_state_dict(state)


def test_torchscript(gen):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    lq.quantize_model(model, bits=4, group_size=32, exclude=())
    scripted = torch.jit.script(model)
    x = torch.randn(4, 32, generator=gen)
    assert torch.equal(scripted(x), model(x))


def test_compile_fullgraph_no_graph_breaks(gen):
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64, bias=False), nn.Linear(64, 8))
    lq.quantize_model(model, bits=8, exclude=())
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 32))
    assert explanation.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 32, generator=gen)
    assert torch.equal(compiled(x), model(x))
