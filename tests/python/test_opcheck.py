"""Every op passes torch.library.opcheck, and traces under torch.compile(fullgraph) and export."""

import pytest
import torch

import linquant as lq

SAMPLES = [
    # (x shape, bits, symmetric, axis, group_size, dtype)
    ((16, 64), 8, True, None, None, torch.float32),
    ((16, 64), 4, False, 0, None, torch.float16),
    ((3, 16, 70), 4, True, None, 32, torch.bfloat16),
    ((5, 33), 2, False, -1, None, torch.float32),
    ((0, 8), 8, False, None, 4, torch.float32),
]


def opcheck_quantize_family(x, bits, symmetric, axis, group_size, dtype):
    """opcheck of choose_qparams, quantize and dequantize on x (on x's device)."""
    scale, zp = torch.ops.linquant.choose_qparams(x, bits, symmetric, axis, group_size)
    zp = None if symmetric else zp
    q = torch.ops.linquant.quantize(x, scale, zp, bits, axis, group_size)
    torch.library.opcheck(torch.ops.linquant.choose_qparams.default, (x, bits, symmetric, axis, group_size))
    torch.library.opcheck(torch.ops.linquant.quantize.default, (x, scale, zp, bits, axis, group_size))
    torch.library.opcheck(torch.ops.linquant.dequantize.default, (q, scale, zp, axis, group_size, dtype))


@pytest.mark.parametrize("shape,bits,symmetric,axis,group_size,dtype", SAMPLES)
def test_opcheck_every_op(shape, bits, symmetric, axis, group_size, dtype):
    opcheck_quantize_family(torch.randn(shape).to(dtype), bits, symmetric, axis, group_size, dtype)


def _fake_quantize(x):
    scale, zp = lq.choose_qparams(x, bits=4, symmetric=False, group_size=32)
    q = lq.quantize(x, scale, zp, bits=4, group_size=32)
    return lq.dequantize(q, scale, zp, group_size=32, dtype=x.dtype)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    compiled = torch.compile(_fake_quantize, fullgraph=True, backend="aot_eager")
    for shape in [(8, 96), (5, 70)]:
        x = torch.randn(shape)
        assert torch.equal(compiled(x), _fake_quantize(x))


class FakeQuant(torch.nn.Module):
    def forward(self, x):
        return _fake_quantize(x)


def test_torch_export():
    x = torch.randn(8, 64)
    ep = torch.export.export(FakeQuant(), (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"linquant.choose_qparams.default", "linquant.quantize.default",
            "linquant.dequantize.default"} <= targets
    assert torch.equal(ep.module()(x), _fake_quantize(x))
