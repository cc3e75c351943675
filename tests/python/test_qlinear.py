"""QLinear: from_linear against the float64 reference, dequantize, repr, .to(), TorchScript,
torch.compile(fullgraph) on a quantized model."""

import pytest
import torch
from torch import nn

import linquant as lq
from reference import ref_weight


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (8, 32, False), (4, 128, True),
                                                       (4, 32, False), (2, 64, True), (2, None, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_linear_matches_reference(bits, group_size, symmetric, dtype, gen):
    lin = nn.Linear(200, 48, dtype=dtype)
    q = lq.QLinear.from_linear(lin, bits, group_size, symmetric)
    assert q.qweight.dtype == (torch.int8 if bits == 8 and symmetric else torch.uint8)
    assert q.scales.dtype == dtype and q.bias.dtype == dtype
    w = ref_weight(q.qweight, q.scales, q.zeros, bits, group_size, 200)
    assert torch.equal(q.dequantize().double(), w.to(dtype).double())
    x = torch.randn(3, 5, 200, generator=gen).to(dtype)
    ref = x.double() @ w.T + lin.bias.double()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(q(x).double(), ref, rtol=tol, atol=tol)
    # The quantization error itself is what the bits allow: half a step, plus the rounding of the
    # scales (stored in the layer's dtype, so the extreme value may clip) and of the output.
    eps = 2.0**-24 if dtype == torch.float32 else 2.0**-8
    err = (q.dequantize().float() - lin.weight.detach().float()).abs().max()
    smax, wmax = float(q.scales.float().max()), float(lin.weight.detach().float().abs().max())
    assert float(err) <= smax * 0.5 + (smax * 2 ** (bits - 1) + wmax) * eps * 2


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
    h = q.to(torch.float16)
    assert h.scales.dtype == torch.float16 and h.bias.dtype == torch.float16
    assert h.qweight.dtype == torch.uint8 and h.zeros.dtype == torch.int32
    assert h(torch.randn(2, 64, dtype=torch.float16)).dtype == torch.float16


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


@pytest.mark.parametrize("bits", [4, 2])
def test_in_features_checked(bits, gen):
    # 7 and 8 values pack into the same bytes at 4 (and 2) bits: only the layer can tell them apart.
    layer = lq.QLinear.from_linear(nn.Linear(8, 3), bits=bits)
    with pytest.raises(ValueError, match=r"x must have in_features=8 in its last dim, got shape \[2, 7\]"):
        layer(torch.randn(2, 7, generator=gen))
    assert layer(torch.randn(2, 8, generator=gen)).shape == (2, 3)
    with pytest.raises(torch.jit.Error, match="ValueError: linquant.QLinear: x must have in_features=8"):
        torch.jit.script(layer)(torch.randn(2, 7, generator=gen))


def test_empty_in_features_with_groups(gen):
    layer = lq.QLinear.from_linear(nn.Linear(0, 3), bits=4, group_size=32)
    assert layer.scales.shape == (3, 0)
    assert torch.equal(layer(torch.randn(2, 0, generator=gen)), layer.bias.expand(2, 3))


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
