"""Independent plain-PyTorch references for the quantize family.

Written from docs/architecture.md's formulas, one float32 tensor operation per step (each
correctly rounded, as the kernels promise), looping over groups instead of sharing the kernels'
[rows, cols] layout, so a layout or rounding mistake in the kernels shows as a mismatch."""

import math

import torch

FLT_MIN = torch.finfo(torch.float32).tiny
ZERO_POINT_LIMIT = 2.0**23


def q_range(bits, symmetric):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def group_slices(k, group_size):
    return [slice(j, min(j + group_size, k)) for j in range(0, k, group_size)]


def _reduce(xf, axis, group_size, fn):
    """min or max of each quantization group, shaped like the scale."""
    if group_size is not None:
        cols = [fn(xf[..., sl], dim=-1, keepdim=True) if sl.stop > sl.start else
                torch.zeros(xf.shape[:-1] + (1,)) for sl in group_slices(xf.shape[-1], group_size)]
        return torch.cat(cols, dim=-1) if cols else xf.new_zeros(xf.shape[:-1] + (0,))
    if axis is not None:
        dims = [d for d in range(xf.dim()) if d != axis % xf.dim()]
        if xf.numel() == 0:
            shape = [xf.shape[d] if d == axis % xf.dim() else 1 for d in range(xf.dim())]
            return xf.new_zeros(shape)
        return fn(xf, dim=dims, keepdim=True) if dims else xf.clone()
    return fn(xf) if xf.numel() else xf.new_zeros(())


def ref_qparams(x, bits, symmetric, axis=None, group_size=None):
    xf = x.float()
    mn = _reduce(xf, axis, group_size, torch.amin)
    mx = _reduce(xf, axis, group_size, torch.amax)
    qmin, qmax = q_range(bits, symmetric)
    if symmetric:
        s = torch.maximum(mn.abs(), mx.abs()) / qmax
    else:  # at least |min| / (2^23 - 2^bits): the zero point stays within 2^23
        s = torch.maximum((mx - mn) / (qmax - qmin), mn.abs() / (ZERO_POINT_LIMIT - (qmax + 1)))
    constant = torch.where(mx == 0, torch.ones_like(mx), mx.abs())
    s = torch.where(mn == mx, constant, s)
    s = torch.clamp(s, min=FLT_MIN)
    z = torch.zeros_like(s) if symmetric else torch.round(qmin - mn / s)
    for end in (mx, mn):  # an end whose grid point overflows gets |end| / k, rounded down
        k = (torch.round(end / s) + z).clamp(qmin, qmax) - z
        fit = end.abs() / k.abs()
        fit = torch.where(fit * k.abs() > end.abs(), torch.nextafter(fit, torch.zeros_like(fit)), fit)
        s = torch.where(torch.isinf(s * k) & torch.isfinite(s), fit, s)
    return s, None if symmetric else z.to(torch.int32)


def broadcast_params(p, x, axis=None, group_size=None):
    """Expand a per-group / per-channel / per-tensor parameter to x's shape."""
    if group_size is not None:
        return p.repeat_interleave(group_size, dim=-1)[..., : x.shape[-1]]
    return p.expand(x.shape) if p.dim() else p


def ref_quantize(x, scale, zero_point, bits, axis=None, group_size=None):
    qmin, qmax = q_range(bits, zero_point is None)
    s = broadcast_params(scale.float(), x, axis, group_size)
    v = torch.round(x.float() / s)
    if zero_point is not None:
        v = v + broadcast_params(zero_point, x, axis, group_size).float()
    return v.clamp(qmin, qmax).to(torch.int8 if zero_point is None else torch.uint8)


def ref_dequantize(q, scale, zero_point, axis=None, group_size=None, dtype=torch.float32):
    s = broadcast_params(scale.float(), q, axis, group_size)
    qi = q.to(torch.int32)
    if zero_point is not None:
        qi = qi - broadcast_params(zero_point.to(torch.int32), q, axis, group_size)
    return (s * qi.float()).to(dtype)


def ref_unpack(packed, bits, size):
    """Values of `bits` bits read LSB-first from each row's bit stream (independent of lq.unpack)."""
    rows = []
    for row in packed.reshape(-1, packed.shape[-1]).tolist():
        stream = [(byte >> k) & 1 for byte in row for k in range(8)]
        rows.append([sum(stream[i * bits + k] << k for k in range(bits)) for i in range(size)])
    return torch.tensor(rows, dtype=torch.int64).reshape(list(packed.shape[:-1]) + [size])


def ref_weight(qweight, scales, zeros, bits, group_size, k):
    """float64 [N, K] weight of the quantized-weight format (docs/architecture.md)."""
    return ref_stored_weight(ref_stored_values(qweight, bits, k), scales, zeros, bits, group_size, k)


def ref_stored_weight(q, scales, zeros, bits, group_size, k):
    """float64 [N, K] weight of the format's values q [N, K] as stored (int64; sub-byte symmetric
    ones offset by 2^(bits-1)), as ref_stored_values or ref_weight_format give them."""
    if bits < 8 and zeros is None:
        q = q - 2 ** (bits - 1)
    g = k if group_size is None else group_size
    s = scales.double().reshape(q.shape[0], -1).repeat_interleave(g, dim=1)[:, :k]
    z = 0 if zeros is None else zeros.reshape(q.shape[0], -1).to(torch.int64).repeat_interleave(g, dim=1)[:, :k]
    return s * (q - z).double()


def ref_weight_format(w, bits, group_size, symmetric, dtype=None):
    """The quantized-weight format of w [N, K] from its formulas (docs/architecture.md), N >= 1:
    qparams from the float weight, scales rounded to the compute dtype (`dtype`, default w's):
    symmetric ones to nearest and kept at least its smallest subnormal (an fp16 scale may round to
    0); asymmetric ones, when dtype is not fp32, to nearest where the range [-z s, (2^bits - 1 - z) s]
    of the zero point z = round(-min / s) chosen for the rounded scale reaches within half a step
    of the group's max (and |z| <= 2^23 - 2^bits), else up (the next value of dtype), with the zero
    point chosen again; the values quantized with those stored scales, sub-byte symmetric values
    offset by 2^(bits-1). Groups at w's dtype's limit: _ref_within_dtype_max, then values whose
    weight is beyond it step toward z (ref_weight_values). Returns (values [N, K] int64, as stored
    before packing, scales [N, G] in dtype, zeros [N, G] int32 or None)."""
    dtype = dtype or w.dtype
    axis = 0 if group_size is None else None  # per-channel: one [N, 1] scale per output row
    s, z = ref_qparams(w, bits, symmetric, axis, group_size)
    info = torch.finfo(dtype)
    stored = s.to(dtype)
    if symmetric:
        s = torch.clamp(stored, min=info.smallest_normal * info.eps)
    elif dtype != torch.float32:
        mn = _reduce(w.float(), axis, group_size, torch.amin)
        mx = _reduce(w.float(), axis, group_size, torch.amax).double()
        near = stored.double()
        zn = torch.round(-mn / stored.float()).double()
        spans = (near * (2**bits - 1 - zn) >= mx - near / 2) & (zn.abs() <= ZERO_POINT_LIMIT - 2**bits)
        up = torch.nextafter(stored, torch.tensor(math.inf, dtype=dtype))
        s = torch.where(spans | ~torch.isfinite(up), stored, up)
        z = torch.round(-mn / s.float()).to(torch.int32)
    else:
        s = stored
    s, z = _ref_within_dtype_max(w, s, z, bits, axis, group_size)
    q = ref_weight_values(w, s, z, bits, axis, group_size)
    if symmetric and bits < 8:
        q = q + 2 ** (bits - 1)
    return q, s, z


def ref_weight_values(w, s, z, bits, axis, group_size):
    """ref_quantize(w) as int64, each value whose weight s (q - z) lies beyond w's dtype's largest
    value stepped toward z until it does not."""
    q = ref_quantize(w, s, z, bits, axis, group_size).to(torch.int64)
    zq = 0 if z is None else broadcast_params(z, w, axis, group_size).to(torch.int64)
    sq = broadcast_params(s.double(), w, axis, group_size)
    while bool((beyond := (sq * (q - zq)).abs() > torch.finfo(w.dtype).max).any()):
        q = q - torch.sign(q - zq) * beyond
    return q


def _ref_within_dtype_max(w, s, z, bits, axis, group_size):
    """Stored scales one step down (zero points chosen again) where the grid point of a group's min
    or max lies beyond w's dtype's largest value and one step down brings both within it and within
    half a step of them, with the zero point within 2^23 - 2^bits."""
    top = torch.finfo(w.dtype).max
    mn = _reduce(w.float(), axis, group_size, torch.amin)
    mx = _reduce(w.float(), axis, group_size, torch.amax)

    def points(s, z):  # the ends' grid points, float64
        zf = 0 if z is None else z.double()
        return [s.double() * (ref_quantize(end, s, z, bits).double() - zf) for end in (mn, mx)]

    over = torch.zeros(s.shape, dtype=torch.bool)
    for p in points(s, z):
        over |= p.abs() > top
    down = torch.nextafter(s, torch.zeros_like(s))
    zd = None if z is None else torch.round(-mn / down.float()).to(torch.int32)
    take = over
    for p, end in zip(points(down, zd), (mn, mx)):
        take = take & (p.abs() <= top) & ((p - end.double()).abs() <= down.double() / 2)
    if z is not None:
        take = take & (zd.abs() <= ZERO_POINT_LIMIT - 2**bits)
        z = torch.where(take, zd, z)
    return torch.where(take, down, s), z


def ref_stored_values(qweight, bits, k):
    """qweight's values [N, K] as stored (unsigned below 8 bits), int64, unpacked by ref_unpack."""
    return qweight.to(torch.int64) if bits == 8 else ref_unpack(qweight, bits, k)


# From this many rows bf16 activations may take the CPU's bf16 GEMM over weights rounded to bf16
# (csrc/cpu/linear.cpp `bf16_gemm_min_rows`: from 12-24 rows, by layout, on CPUs with AVX512-BF16).
BF16_GEMM_MIN_ROWS = 12


def dot_kernel_weight(qweight, scales, zeros, bits, group_size, k):
    """|s| (c + |z|) per weight, c = 128 below 8 bits, else 0: what the CPU's AVX512-BF16 kernel
    (bf16 activations) accumulates beyond |s (q - z)| before it takes (c + z) sum x back out
    (architecture.md), so fp32 rounding of its sums is relative to that. z is the stored zero
    point: 2^(bits-1) for symmetric sub-byte weights, none for int8."""
    if zeros is None:
        zeros = torch.full_like(scales, 2 ** (bits - 1) if bits < 8 else 0, dtype=torch.int32)
    c = 128 if bits < 8 else 0
    return ref_weight(torch.zeros_like(qweight), scales.abs(), -(c + zeros.to(torch.int64).abs()), bits, group_size, k)


# The layouts whose fp32 and fp16 activations the AVX-512 lookup kernel takes in word lanes
# (tile_lut_lanes in csrc/cpu/linear_kernels_isa.cpp), bits and group size.
LANE_LAYOUTS = {(4, 8), (4, 16), (4, 32), (4, 64), (2, 16), (2, 32)}


def offset_kernel_offset(bits, group_size, k, rows):
    """The offset c of the values q - c that the CPU's word-stream kernels multiply fp32 (and fp16)
    activations by before taking s (z - c) sum x back out (architecture.md), or None where the
    kernel that runs sums s (q - z) itself. With AVX-512, tile_lut_lanes (LANE_LAYOUTS with more
    than one group): c = 2^(bits-1). With AVX2, tile_words: 4-bit values in place (c = 0) and 2-bit
    q - 2, on groups of 1, 2 or 4 words, and below 3 activation rows on groups of a multiple of 8
    words and per channel (the `streams` choice)."""
    isa = torch.ops.linquant._cpu_isa()
    per_channel = group_size is None or k <= group_size
    if isa == "avx512":
        return 2 ** (bits - 1) if (bits, group_size) in LANE_LAYOUTS and not per_channel else None
    if isa != "avx2" or bits == 8:
        return None
    words = 1 if per_channel else group_size * bits / 32
    lanes = not per_channel and words in (1, 2, 4)
    whole = per_channel or words % 8 == 0
    if lanes or (whole and rows <= 2):
        return 0 if bits == 4 else 2
    return None


def offset_kernel_weight(qweight, scales, zeros, bits, group_size, k, rows):
    """|s| (|q - c| + |z - c|) per weight, c = offset_kernel_offset (else 0): what a word-stream
    kernel sums in place of |s (q - z)|, so fp32 rounding of its sums is relative to that. z is the
    stored zero point, 2^(bits-1) for symmetric weights."""
    c = offset_kernel_offset(bits, group_size, k, rows)
    if c is None:
        return 0
    c = torch.full_like(scales, c, dtype=torch.int32)
    z = torch.full_like(c, 2 ** (bits - 1)) if zeros is None else zeros.to(torch.int64)
    return (ref_weight(qweight, scales.abs(), c, bits, group_size, k).abs()
            + ref_weight(torch.zeros_like(qweight), scales.abs(), -(z - c).abs(), bits, group_size, k))


def linear_bound(x64, w, qweight, scales, zeros, bits, group_size, dtype, ref):
    """Bound on |linear(x) - ref| for x (float64 copy x64 [M, K]) in `dtype` over the float64
    weight w [N, K] of (qweight, scales, zeros), ref = x64 @ w.T + bias: fp32 accumulation over K
    terms (of the larger weights the bf16 dot kernel and the word-stream kernels sum), rounding to the output dtype and, from
    BF16_GEMM_MIN_ROWS bf16 rows, the bf16 GEMM path's weights and sum rounded to bf16. bf16
    subnormal activations may count as zero (AVX512-BF16's dot products flush them, in the dot kernel
    and the GEMM)."""
    k = x64.shape[-1]
    w_acc = w.abs() + (dot_kernel_weight(qweight, scales, zeros, bits, group_size, k) if dtype == torch.bfloat16
                       else offset_kernel_weight(qweight, scales, zeros, bits, group_size, k, x64.shape[0]))
    bound = (x64.abs() @ w_acc.T) * (k ** 0.5 + 4) * 2.0**-23 + ref.abs() * torch.finfo(dtype).eps + 1e-30
    if dtype == torch.bfloat16:
        subnormal = torch.where(x64.abs() < torch.finfo(torch.bfloat16).tiny, x64, 0).abs()
        bound += (subnormal @ w.abs().T) * (1 + 2.0**-7)
    if dtype == torch.bfloat16 and x64.shape[0] >= BF16_GEMM_MIN_ROWS:
        bound += (x64.abs() @ w.abs().T) * 2 * 2.0**-8
    return bound


def strided_view(t):
    """t's values in a non-contiguous view (dims of size > 1 permitting): every other element of
    a tensor twice as large, so the last dim has stride 2 and the view starts at offset 0."""
    return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]


def column_major(t):
    """t's values with the last two dims' strides swapped (a transposed copy transposed back)."""
    return t.mT.contiguous().mT


def extreme_inputs(dtype, gen):
    """Inputs that reach the formulas' limits (test_quantize.py checks the CPU against the formulas
    above, test_cuda.py the GPU against the CPU): a huge dynamic range down into the subnormals;
    constant and nearly constant rows (all zero, +-constant, one nonzero, subnormal only, a narrow
    range far from zero whose zero points would exceed 2^23 steps at the range's scale, the largest safe values); a
    non-constant subnormal row, whose scale falls below FLT_MIN."""
    lo, hi = {torch.float32: (-44.0, 37.0), torch.float16: (-7.5, 4.5), torch.bfloat16: (-40.0, 37.0)}[dtype]
    exps = torch.rand(9, 70, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    signs = torch.randint(0, 2, (9, 70), generator=gen).double() * 2 - 1
    huge = (signs * 10.0**exps).to(dtype)
    big = 1e30 if dtype != torch.float16 else 3e4
    tiny = {torch.float32: 3e-42, torch.float16: 1e-7, torch.bfloat16: 3e-40}[dtype]
    rows = torch.zeros(10, 64, dtype=torch.float64)
    rows[1] = 1.0
    rows[2] = -2.5
    rows[3, ::2], rows[3, 1::2] = 0.1, -0.1
    rows[4, 17] = 3.0
    rows[5] = tiny
    rows[6] = 1000.0 + torch.randn(64, generator=gen, dtype=torch.float64) * 1e-3
    rows[7] = big
    rows[8, ::2], rows[8, 1::2] = big, -big
    rows[9] = torch.randn(64, generator=gen, dtype=torch.float64) * tiny
    return {"huge range": huge, "constant rows": rows.to(dtype), **largest_values(dtype, gen)}


def largest_values(dtype, gen):
    """Rows reaching the dtype's largest value (where a scale rounded up puts the grid point of the
    range's end past it): each row's values within 2^-e of it, e = 1..23 by row, a quarter of them
    0, one at the largest value itself; positive, and negative (one sign each: an asymmetric range
    of both would overflow fp32)."""
    top = torch.finfo(dtype).max
    e = torch.arange(1, 24, dtype=torch.float64).reshape(-1, 1)
    x = top * (1 - torch.rand(23, 40, generator=gen, dtype=torch.float64) * 2.0**-e)
    x[:, ::4] = 0
    x[:, 1] = top
    x = x.to(dtype)
    return {"largest values": x, "largest negative values": -x}
