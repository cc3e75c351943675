"""Every op passes torch.library.opcheck, and traces under torch.compile(fullgraph) and export."""

import contextlib
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

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



def _u8(*shape):
    return torch.empty(shape, dtype=torch.uint8)


# Calls the kernels reject, and the start of their error: the fake kernels must reject them too, or
# torch.compile / torch.export would trace them and fail only when the graph first runs.
_LQ = torch.ops.linquant
BAD_CALLS = {
    "choose_qparams int x": (lambda: _LQ.choose_qparams(torch.empty(4, dtype=torch.int32), 8, True), "x must be float32"),
    "quantize column scale for axis 1": (lambda: _LQ.quantize(torch.empty(3, 3), torch.empty(3, 1), None, 8, 1),
                                         "scale must have shape [1, 3]"),
    "quantize int x": (lambda: _LQ.quantize(torch.empty(4, dtype=torch.int32), torch.empty(()), None, 8),
                       "x must be float32"),
    "dequantize float q": (lambda: _LQ.dequantize(torch.empty(4), torch.empty(()), None), "q must be int8"),
    "pack float q": (lambda: _LQ.pack(torch.empty(4), 4), "q must hold integers"),
    "unpack wrong size": (lambda: _LQ.unpack(_u8(2, 3), 4, 8), "packed has 3 bytes in its last dim, but 8 values"),
    "linear K": (lambda: _LQ.linear(torch.empty(2, 20), _u8(6, 8), torch.empty(6, 1), _u8(6, 1), None, 4),
                 "x has in_features K=20"),
    "linear transposed scales": (lambda: _LQ.linear(torch.empty(2, 16), _u8(6, 8), torch.empty(2, 6), None, None, 4, 8),
                                 "scales must be [6, 2]"),
    "linear qweight dtype": (lambda: _LQ.linear(torch.empty(2, 16), _u8(6, 16), torch.empty(6, 1)),
                             "qweight must be int8 (8-bit symmetric)"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_fake_kernels_reject_what_the_kernels_reject(case):
    call, message = BAD_CALLS[case]
    for mode in (contextlib.nullcontext(), FakeTensorMode()):  # the CPU kernel, then the fake kernel
        with mode, pytest.raises(ValueError, match=re.escape(message)):
            call()
