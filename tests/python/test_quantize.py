"""choose_qparams / quantize / dequantize against the independent reference (reference.py),
bit for bit, on fresh random inputs across dtypes, shapes, bits and granularities."""

import pytest
import torch

import linquant as lq
from reference import q_range, ref_dequantize, ref_qparams, ref_quantize

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(), (1,), (7,), (3, 5), (4, 33), (2, 3, 67), (5, 256), (0,), (0, 5), (5, 0)]
BITS = [2, 3, 4, 8]


def granularities(shape):
    """(axis, group_size) pairs that make sense for a tensor of `shape`."""
    out = [(None, None)]
    for axis in range(-len(shape), len(shape)):
        out.append((axis, None))
    if shape:
        out += [(None, 1), (None, 16), (None, 32), (None, 128)]
    return out


CASES = [(shape, axis, g) for shape in SHAPES for axis, g in granularities(shape)]


def random_input(shape, dtype, gen):
    # Mixed scales, a shifted mean (asymmetric ranges) and a few exact ties (k + 0.5 steps).
    x = torch.randn(shape, generator=gen) * torch.rand((), generator=gen) * 10 + torch.randn((), generator=gen)
    return x.to(dtype)


def check_roundtrip(x, bits, symmetric, axis, g):
    scale, zp = lq.choose_qparams(x, bits=bits, symmetric=symmetric, axis=axis, group_size=g)
    rs, rz = ref_qparams(x, bits, symmetric, axis, g)
    assert scale.dtype == torch.float32 and scale.shape == rs.shape
    assert torch.equal(scale, rs), (scale, rs)
    if symmetric:
        assert zp is None
    else:
        assert zp.dtype == torch.int32 and torch.equal(zp, rz)
    q = lq.quantize(x, scale, zp, bits=bits, axis=axis, group_size=g)
    rq = ref_quantize(x, rs, rz, bits, axis, g)
    assert q.dtype == rq.dtype and q.shape == x.shape
    assert torch.equal(q, rq)
    qmin, qmax = q_range(bits, symmetric)
    if q.numel():
        assert int(q.min()) >= qmin and int(q.max()) <= qmax
    for out_dtype in DTYPES:
        xh = lq.dequantize(q, scale, zp, axis=axis, group_size=g, dtype=out_dtype)
        assert xh.dtype == out_dtype and xh.shape == x.shape
        assert torch.equal(xh, ref_dequantize(q, rs, rz, axis, g, out_dtype))
    return scale, zp, q


@pytest.mark.parametrize("shape,axis,group_size", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_bit_for_bit(shape, axis, group_size, dtype, gen):
    x = random_input(shape, dtype, gen)
    for bits in BITS:
        for symmetric in (True, False):
            check_roundtrip(x, bits, symmetric, axis, group_size)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_is_within_half_a_step_in_float64(bits, symmetric, gen):
    # Independent of the reference: every reconstructed value lies within s/2 of the original
    # (the range of each group is covered, so nothing clips).
    x = torch.randn(6, 200, generator=gen, dtype=torch.float64).float()
    for axis, g in [(None, None), (0, None), (None, 64)]:
        scale, zp = lq.choose_qparams(x, bits=bits, symmetric=symmetric, axis=axis, group_size=g)
        xh = lq.dequantize(lq.quantize(x, scale, zp, bits=bits, axis=axis, group_size=g), scale, zp,
                           axis=axis, group_size=g)
        s = scale.double()
        s = s.repeat_interleave(g, dim=-1)[..., :200] if g else s
        err = (x.double() - xh.double()).abs()
        assert bool((err <= s / 2 * (1 + 1e-6)).all()), float((err / s).max())


def test_non_contiguous_inputs(gen):
    base = torch.randn(40, 66, generator=gen)
    for x in (base.t(), base[:, ::3], base[::2], base.t()[5:, 1::2]):
        assert not x.is_contiguous()
        for axis, g in [(None, None), (0, None), (1, None), (None, 8), (None, 5)]:
            check_roundtrip(x, 4, False, axis, g)
            check_roundtrip(x, 8, True, axis, g)


@pytest.mark.parametrize("value", [0.0, 1.0, -2.5, 0.1, 3e-30, 1e30])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_constant_groups_round_trip_exactly(value, bits, symmetric):
    x = torch.full((4, 64), value)
    x[1] = -value
    x[2] = 0
    for axis, g in [(None, None), (0, None), (None, 16), (None, 64)]:
        scale, zp = lq.choose_qparams(x, bits=bits, symmetric=symmetric, axis=axis, group_size=g)
        assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
        q = lq.quantize(x, scale, zp, bits=bits, axis=axis, group_size=g)
        xh = lq.dequantize(q, scale, zp, axis=axis, group_size=g)
        if axis is None and g is None and value != 0:
            continue  # the whole tensor is not constant
        assert torch.equal(xh, x), (axis, g)


def test_large_tensor_spans_many_pieces(gen):
    # Larger than the kernels' 64K-element pieces, so per-tensor and per-channel work is split
    # across threads and partial minima / maxima are combined.
    x = torch.randn(3, 150001, generator=gen)
    x[2, 149999] = 40.0
    for axis, g in [(None, None), (0, None), (None, 4096)]:
        check_roundtrip(x, 8, False, axis, g)
        check_roundtrip(x, 4, True, axis, g)


def test_rounds_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 100.0])
    q = lq.quantize(x, torch.tensor(1.0), None, bits=8)
    assert q.tolist() == [0, 2, 2, 0, -2, -2, 3, 100]
