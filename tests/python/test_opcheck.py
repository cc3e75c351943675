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
                                         "scale must have shape [1, 3] or [3] for this granularity"),
    "quantize int x": (lambda: _LQ.quantize(torch.empty(4, dtype=torch.int32), torch.empty(()), None, 8),
                       "x must be float32"),
    "dequantize float q": (lambda: _LQ.dequantize(torch.empty(4), torch.empty(()), None), "q must be int8"),
    "dequantize float64 dtype": (lambda: _LQ.dequantize(_u8(4), torch.empty(()), None, None, None, torch.float64),
                                 "dtype must be float32, float16 or bfloat16"),
    "dequantize int32 dtype": (lambda: _LQ.dequantize(_u8(4), torch.empty(()), None, None, None, torch.int32),
                               "dtype must be float32, float16 or bfloat16"),
    "unpack negative size": (lambda: _LQ.unpack(_u8(2, 0), 4, -1), "size must be >= 0, got -1"),
    "pack float q": (lambda: _LQ.pack(torch.empty(4), 4), "q must hold integers"),
    "unpack wrong size": (lambda: _LQ.unpack(_u8(2, 3), 4, 8), "packed has 3 bytes in its last dim, but 8 values"),
    "linear K": (lambda: _LQ.linear(torch.empty(2, 20), _u8(6, 8), torch.empty(6, 1), _u8(6, 1), None, 4),
                 "x has in_features K=20"),
    "linear transposed scales": (lambda: _LQ.linear(torch.empty(2, 16), _u8(6, 8), torch.empty(2, 6), None, None, 4, 8),
                                 "scales must be [6, 2]"),
    "linear qweight dtype": (lambda: _LQ.linear(torch.empty(2, 16), _u8(6, 16), torch.empty(6, 1)),
                             "qweight must be int8 (8-bit symmetric) for bits=8 symmetric"),
    "linear 3-D qweight": (lambda: _LQ.linear(torch.empty(2, 16), _u8(1, 6, 8), torch.empty(6, 1), None, None, 4),
                           "qweight must be 2-D [out_features, packed in_features], got 3 dims"),
    "linear 0-dim x": (lambda: _LQ.linear(torch.empty(()), _u8(6, 8), torch.empty(6, 1), None, None, 4),
                       "x must have at least one dim [..., K]"),
    # The kernels stop at the first count past x's rows (so that no sum can wrap around int64).
    "grouped_linear counts past x's rows": (lambda: _LQ.grouped_linear(torch.empty(2, 16), [3, -1], _u8(2, 6, 8),
                                                                       torch.empty(2, 6, 1), None, None, 4),
                                            "counts must sum to x's 2 rows, got more from counts[0] = 3 on"),
    "linear zeros [G, N]": (lambda: _LQ.linear(torch.empty(2, 16), _u8(6, 8), torch.empty(6, 2), _u8(2, 6), None, 4, 8),
                            "zeros must be [6, 2] like scales"),
}
# Group sizes, and zero-point and bias dtypes, that the kernels refuse, in each op: the fake kernels
# took them all (and a group size of 0 was a ZeroDivisionError).
_ZEROS = "zeros must be an integer tensor (int32"
_ZERO_POINT = "zero_point must be an integer tensor (int32"
for _g in (3, 0, -2):
    BAD_CALLS[f"linear group_size {_g}"] = (
        lambda g=_g: _LQ.linear(torch.empty(2, 16), _u8(6, 8), torch.empty(6, 6), None, None, 4, g),
        "group_size must be a positive multiple of 2 at 4 bits (groups start on byte boundaries)")
    BAD_CALLS[f"grouped_linear group_size {_g}"] = (
        lambda g=_g: _LQ.grouped_linear(torch.empty(2, 16), [1, 1], _u8(2, 6, 8), torch.empty(2, 6, 6), None, None,
                                        4, g),
        "group_size must be a positive multiple of 2 at 4 bits (groups start on byte boundaries)")
for _dt in (torch.float32, torch.float16, torch.bool, torch.uint32, torch.uint64):
    BAD_CALLS[f"linear {_dt} zeros"] = (
        lambda dt=_dt: _LQ.linear(torch.empty(2, 16), _u8(6, 8), torch.empty(6, 2), torch.zeros(6, 2, dtype=dt),
                                  None, 4, 8), _ZEROS)
    BAD_CALLS[f"grouped_linear {_dt} zeros"] = (
        lambda dt=_dt: _LQ.grouped_linear(torch.empty(2, 16), [0, 2], _u8(2, 6, 8), torch.empty(2, 6, 2),
                                          torch.zeros(2, 6, 2, dtype=dt), None, 4, 8), _ZEROS)
    BAD_CALLS[f"quantize {_dt} zero_point"] = (
        lambda dt=_dt: _LQ.quantize(torch.empty(4, 8), torch.ones(4, 1), torch.zeros(4, 1, dtype=dt), 8, 0), _ZERO_POINT)
    BAD_CALLS[f"dequantize {_dt} zero_point"] = (
        lambda dt=_dt: _LQ.dequantize(_u8(4, 8), torch.ones(4, 1), torch.zeros(4, 1, dtype=dt), 0), _ZERO_POINT)
for _dt in (torch.int32, torch.float64, torch.uint8):
    BAD_CALLS[f"linear {_dt} bias"] = (
        lambda dt=_dt: _LQ.linear(torch.empty(2, 16), _u8(6, 8), torch.empty(6, 1), None, torch.zeros(6, dtype=dt), 4),
        "bias must be float32, float16 or bfloat16")
    BAD_CALLS[f"grouped_linear {_dt} bias"] = (
        lambda dt=_dt: _LQ.grouped_linear(torch.empty(2, 16), [2, 0], _u8(2, 6, 8), torch.empty(2, 6, 1), None,
                                          torch.zeros(2, 6, dtype=dt), 4), "bias must be float32, float16 or bfloat16")


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_fake_kernels_reject_what_the_kernels_reject(case):
    call, message = BAD_CALLS[case]
    for mode in (contextlib.nullcontext(), FakeTensorMode()):  # the CPU kernel, then the fake kernel
        with mode, pytest.raises(ValueError, match=re.escape(message)):
            call()


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64], ids=str)
def test_pack_takes_wide_unsigned_integers(dtype):
    # The op's range check read them with ATen's min / max, which they lack ("min_all" not
    # implemented for 'UInt16'); the fake kernel and a traced call take them as eager does.
    q = torch.tensor([[1, 2, 3]], dtype=dtype)
    with FakeTensorMode():
        assert _LQ.pack(torch.empty(2, 3, dtype=dtype), 4).shape == (2, 2)
    assert torch.equal(_LQ.pack(q, 4), lq.pack(q.to(torch.uint8), 4))
    assert torch.equal(torch.compile(lq.pack, fullgraph=True, backend="aot_eager")(q, 4), lq.pack(q.to(torch.uint8), 4))
