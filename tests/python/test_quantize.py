"""choose_qparams / quantize / dequantize against the independent reference (reference.py),
bit for bit, on fresh random inputs across dtypes, shapes, bits and granularities; metrics against
their float64 formulas."""

import math

import pytest
import torch

import linquant as lq
from reference import (FLT_MIN, ZERO_POINT_LIMIT, column_major, extreme_inputs, largest_values, q_range,
                       ref_dequantize, ref_qparams, ref_quantize, strided_view)

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
    # Mixed scales and a shifted mean (asymmetric ranges); test_rounding_ties_with_zero_points plants ties.
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
        check_within_half_a_step(x, xh, scale, g)


def check_within_half_a_step(x, xh, scale, g):
    """Every reconstructed value xh within s/2 of x, plus the fp32 rounding of x / s and of
    (q - z) * s: half an ulp of |x| and of |xh| (so 2^-24 of each, doubled for margin)."""
    s = scale.double()
    s = s.repeat_interleave(g, dim=-1)[..., :x.shape[-1]] if g else s
    err = (x.double() - xh.double()).abs()
    bound = s / 2 + (x.double().abs() + xh.double().abs()) * 2.0**-23
    assert bool((err <= bound).all()), float((err / s).max())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype, gen):
    base = torch.randn(40, 66, generator=gen).to(dtype)
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


NON_CONTIGUOUS_VIEWS = {"strided": strided_view, "column_major": column_major}


@pytest.mark.parametrize("view", list(NON_CONTIGUOUS_VIEWS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_parameters_and_codes(view, dtype, gen):
    # scale, zero_point and q as views with the same values and other strides: the kernels must
    # read them by index, not assume a dense layout.
    as_view = NON_CONTIGUOUS_VIEWS[view]
    x = random_input((12, 40), dtype, gen)
    for axis, g in [(0, None), (1, None), (None, 8), (None, 7)]:
        for bits, symmetric in [(4, False), (8, True), (3, False)]:
            scale, zp = lq.choose_qparams(x, bits=bits, symmetric=symmetric, axis=axis, group_size=g)
            s = as_view(scale)
            z = None if zp is None else as_view(zp)
            if view == "strided":  # column_major keeps a [12, 1] or [1, 40] parameter contiguous
                assert not s.is_contiguous()
            q = lq.quantize(x, s, z, bits=bits, axis=axis, group_size=g)
            rq = ref_quantize(x, scale, zp, bits, axis, g)
            assert torch.equal(q, rq)
            qv = as_view(rq)
            assert not qv.is_contiguous()
            for out_dtype in DTYPES:
                assert torch.equal(lq.dequantize(qv, s, z, axis=axis, group_size=g, dtype=out_dtype),
                                   ref_dequantize(rq, scale, zp, axis, g, out_dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_values_match_reference(dtype, gen):
    scales, zero_points = [], []
    for name, x in extreme_inputs(dtype, gen).items():
        assert bool(torch.isfinite(x).all()), name
        for bits in (2, 3, 4, 8):
            for symmetric in (True, False):
                for axis, g in [(None, None), (0, None), (-1, None), (None, 1), (None, 5), (None, 16), (None, 64)]:
                    scale, zp, _ = check_roundtrip(x, bits, symmetric, axis, g)
                    scales.append(scale.flatten())
                    zero_points += [] if zp is None else [zp.flatten()]
    # The limits were reached, so the comparisons above covered them: the scale floor where the
    # dtype has values below FLT_MIN, the scale raised to keep the zero point within 2^23 where
    # fp32 resolves 1000 +- 1e-3.
    if dtype != torch.float16:
        assert bool((torch.cat(scales) == FLT_MIN).any())
    if dtype == torch.float32:
        assert bool((torch.cat(zero_points).abs() > ZERO_POINT_LIMIT - 2**9).any())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ranges_reaching_the_largest_value_come_back_finite(dtype, gen):
    # A range's end within half a step of float32's largest value: the scale, rounded up, put that
    # end's grid point past it (choose_qparams([FLT_MAX, 1]) came back [inf, 0] at 8 bits). The
    # end now gets |end| / k rounded down, k its steps from the zero point: every value comes back
    # finite and within half a step (test_extreme_values_match_reference compares these inputs
    # with the reference bit for bit). (In float32: quantize_weight keeps a weight's grid within its
    # own dtype, test_qlinear.py.)
    top = torch.tensor(torch.finfo(torch.float32).max)
    scale, _ = lq.choose_qparams(torch.stack([top, torch.tensor(1.0)]), bits=8, symmetric=True)
    assert torch.isinf((top / 127) * 127)  # top / 127 rounds up in fp32
    assert torch.equal(scale, torch.nextafter(top / 127, torch.tensor(0.0)))
    for x in largest_values(dtype, gen).values():
        for bits in BITS:
            for symmetric in (True, False):
                for axis, g in [(None, None), (0, None), (None, 7), (None, 16)]:
                    scale, zp = lq.choose_qparams(x, bits=bits, symmetric=symmetric, axis=axis, group_size=g)
                    q = lq.quantize(x, scale, zp, bits=bits, axis=axis, group_size=g)
                    xh = lq.dequantize(q, scale, zp, axis=axis, group_size=g)
                    assert bool(xh.isfinite().all())
                    check_within_half_a_step(x, xh, scale, g)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group_size", [None, 16, 128], ids=str)
def test_narrow_ranges_far_from_zero_keep_fp32_resolution(bits, group_size, gen):
    # Rows 1e4 + [0, 3e-3] (and their negatives, and 1e30-scale ones): at the range's own scale the
    # zero point would be ~1e8 steps from 0, beyond the 2^23 that keeps q - z exact in fp32. The
    # scale grows until it fits rather than clamping the zero point, which put every value at the
    # range's far end (1e4 came back as 1638.4): the error stays within a few fp32 ulps of |w|.
    base = torch.tensor([1e4, -1e4, 3.5e30, -2.5e-20]).repeat_interleave(3).reshape(-1, 1)
    w = base * (1 + torch.rand(base.shape[0], 200, generator=gen, dtype=torch.float64) * 3e-7)
    w = w.float()
    qw = lq.quantize_weight(w, bits, group_size, symmetric=False)
    assert int(qw.zeros.abs().max()) < ZERO_POINT_LIMIT
    err = (lq.dequantize_weight(qw).double() - w.double()).abs()
    assert bool((err <= w.double().abs() * 2.0**-21).all()), float((err / w.double().abs()).max())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rounding_ties_with_zero_points(dtype):
    # x / s lands exactly halfway between integers, and half to even must happen before adding
    # the zero point (z odd and even, negative and positive), then the clamp.
    x = ((torch.arange(-600, 600, dtype=torch.float64) + 0.5) * 0.25).to(dtype).reshape(12, 100)
    z = torch.arange(12, dtype=torch.int32).reshape(12, 1) - 3
    for scale in (0.25, 0.5, 0.125, 0.0625):
        s = torch.full((12, 1), scale)
        for bits in (2, 3, 4, 8):
            for zp in (None, z):
                q = lq.quantize(x, s, zp, bits=bits, axis=0)
                assert torch.equal(q, ref_quantize(x, s, zp, bits, axis=0)), (scale, bits, zp is None)
                assert torch.equal(lq.dequantize(q, s, zp, axis=0, dtype=dtype),
                                   ref_dequantize(q, s, zp, 0, None, dtype))


ZERO_POINT_DTYPES = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]


def test_parameter_dtypes(gen):
    # Scales in any float dtype and zero points in any integer dtype, read as their values.
    x = random_input((6, 70), torch.float32, gen)
    for axis, g in [(None, None), (0, None), (None, 32)]:
        scale, zp = lq.choose_qparams(x, bits=4, symmetric=False, axis=axis, group_size=g)
        for sdt in DTYPES:
            s = scale.to(sdt)
            for zdt in ZERO_POINT_DTYPES:
                info = torch.iinfo(zdt)
                z = zp.clamp(max(info.min, -300), min(info.max, 300)).to(zdt)  # negative where it fits
                q = lq.quantize(x, s, z, bits=4, axis=axis, group_size=g)
                assert torch.equal(q, ref_quantize(x, s, z, 4, axis, g)), (sdt, zdt)
                assert torch.equal(lq.dequantize(q, s, z, axis=axis, group_size=g, dtype=torch.bfloat16),
                                   ref_dequantize(q, s, z, axis, g, torch.bfloat16)), (sdt, zdt)
            q = lq.quantize(x, s, None, bits=8, axis=axis, group_size=g)
            assert torch.equal(q, ref_quantize(x, s, None, 8, axis, g)), sdt
            assert torch.equal(lq.dequantize(q, s, None, axis=axis, group_size=g), ref_dequantize(q, s, None, axis, g))


def test_dequantize_zero_points_at_the_int32_limits():
    # q - z for z = -2^31 does not fit in int32; computed wide it is 2^31 + q, rounded once to fp32,
    # then scaled. Within 2^30 of 0 the kernels take it in int32 lanes, to the same bits.
    for z in (-(2**31), -(2**30) - 1, -(2**30), -7, 2**30, 2**30 + 1, 2**31 - 1):
        for q in (torch.arange(256).to(torch.uint8), torch.arange(-128, 128).to(torch.int8)):
            out = lq.dequantize(q, torch.tensor(0.3), torch.tensor(z, dtype=torch.int32))
            assert torch.equal(out, torch.tensor(0.3) * (q.double() - z).float()), z


def test_no_gradients(gen):
    # Neither op has a gradient; without an autograd kernel torch marked their outputs as
    # requiring grad and backward left scale.grad None (a learned scale would never move).
    w = torch.nn.Parameter(torch.randn(6, 40, generator=gen))
    for group_size in (None, 16):
        scale, zp = lq.choose_qparams(w, bits=4, symmetric=False, group_size=group_size)
        assert not scale.requires_grad and not zp.requires_grad
        assert torch.equal(scale, lq.choose_qparams(w.detach(), bits=4, symmetric=False, group_size=group_size)[0])
        q = lq.quantize(w, scale, zp, bits=4, group_size=group_size)
        learned = scale.clone().requires_grad_()
        with pytest.raises(NotImplementedError, match="dequantize has no gradient for scale"):
            lq.dequantize(q, learned, zp, group_size=group_size)
        with torch.no_grad():
            assert torch.equal(lq.dequantize(q, learned, zp, group_size=group_size),
                               lq.dequantize(q, scale, zp, group_size=group_size))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_metrics_match_their_formulas(dtype, gen):
    """mse, max_error, mean_error and snr_db of a reconstruction (x on a grid of step 1/4, and x
    off by one in a few elements) against float64 formulas written out here; inf and -inf where
    there is no error or no signal."""
    x = random_input((6, 45), dtype, gen)
    for x_hat in ((x * 4).round() / 4, x + (torch.rand(6, 45, generator=gen) < 0.1).to(dtype)):
        got = lq.metrics(x, x_hat)
        e = [float(a) - float(b) for a, b in zip(x.flatten().tolist(), x_hat.flatten().tolist())]
        signal, noise = sum(float(v) ** 2 for v in x.flatten().tolist()), sum(d * d for d in e)
        want = {"mse": noise / len(e), "max_error": max(abs(d) for d in e),
                "mean_error": sum(abs(d) for d in e) / len(e), "snr_db": 10 * math.log10(signal / noise)}
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-12), name
    assert lq.metrics(x.clone(), x) == {"mse": 0.0, "max_error": 0.0, "mean_error": 0.0, "snr_db": math.inf}
    assert lq.metrics(torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype))["snr_db"] == -math.inf
    with pytest.raises(ValueError, match="linquant.metrics: x is empty"):
        lq.metrics(torch.empty(0, dtype=dtype), torch.empty(0, dtype=dtype))

