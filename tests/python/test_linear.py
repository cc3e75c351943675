"""linquant.linear against dequantize-then-matmul in float64 (reference.py's own unpacking), over
bits, modes, group sizes, odd shapes, dtypes, leading dims and bias; errors; opcheck; compile."""

import os
import re
from pathlib import Path

import pytest
import torch

import linquant as lq
from reference import LANE_LAYOUTS, column_major, linear_bound, ref_weight, strided_view

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def cpu_has_avx512_bf16():
    """Whether linquant's CPU kernels take the AVX512-BF16 paths here (not narrowed below avx512)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags and os.environ.get("LINQUANT_CPU_ISA", "avx512") == "avx512"


def check(x, qw, bias, bits, group_size):
    y = lq.linear(x, qw.qweight, qw.scales, qw.zeros, bias, bits, group_size)
    k = x.shape[-1]
    w = ref_weight(qw.qweight, qw.scales, qw.zeros, bits, group_size, k)
    x64 = x.double().reshape(-1, k)
    ref = x64 @ w.T + (bias.double() if bias is not None else 0)
    assert y.dtype == x.dtype and y.shape == tuple(list(x.shape[:-1]) + [qw.qweight.shape[0]])
    bound = linear_bound(x64, w, qw.qweight, qw.scales, qw.zeros, bits, group_size, x.dtype, ref)
    err = (y.double().reshape(ref.shape) - ref).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


SHAPES = [(1, 1), (3, 7), (37, 64), (5, 100), (64, 255), (16, 300), (33, 1024), (1, 520)]


@pytest.mark.parametrize("n,k", SHAPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_float64_reference(n, k, bits, symmetric, gen):
    w = torch.randn(n, k, generator=gen) * 0.05 + 0.01
    bias = torch.randn(n, generator=gen)
    for group_size in (None, 32, 64, 128, 256):
        qw = lq.quantize_weight(w, bits, group_size, symmetric)
        for m in (1, 2, 3, 4, 5, 8, 13):
            check(torch.randn(m, k, generator=gen), qw, bias if m % 2 else None, bits, group_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 64), (4, 128), (4, None), (2, 32)], ids=str)
@pytest.mark.parametrize("symmetric", [True, False])
def test_activations_near_floats_limit_stay_finite(dtype, bits, group_size, symmetric, gen):
    """|x| ~ 3e36 with weights ~0.01: x @ W_hat.T is ~1e37, finite, but the kernels' sums of q x
    before the scale (|q| up to 255) overflow; such calls are computed again through the
    dequantized weights rather than returning inf or NaN."""
    w = torch.randn(40, 256, generator=gen) * 0.01
    qw = lq.quantize_weight(w.to(dtype), bits, group_size, symmetric)
    for m in (1, 4, 13):
        x = (torch.randn(m, 256, generator=gen).sign() * 3e36).to(dtype)
        check(x, qw, None, bits, group_size)
        assert torch.isfinite(lq.linear(x, qw.qweight, qw.scales, qw.zeros, None, bits, group_size)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 32), (4, 128), (4, None), (4, 16), (2, 64), (2, None)],
                         ids=str)
def test_power_of_two_activation_scales_scale_the_output_exactly(dtype, bits, group_size, gen):
    """linear(x 2^e) = linear(x) 2^e bit for bit, for e = -100 and 60: the kernels' sums only
    multiply and add, so no intermediate may underflow to a subnormal or overflow there (the AVX2
    word-stream kernel scales its 4-bit streams up by 2^24 for this: scaled down, activations near
    2^-100 were subnormals and lost bits). Every activation-row tile, symmetric and asymmetric."""
    k = 300
    for symmetric in (True, False):
        qw = lq.quantize_weight(torch.randn(37, k, generator=gen), bits, group_size, symmetric)
        for m in (1, 2, 3, 4, 7):
            x = torch.randn(m, k, generator=gen).to(dtype)
            y = lq.linear(x, qw.qweight, qw.scales, qw.zeros, None, bits, group_size)
            for e in (-100, 60):
                scaled = lq.linear(x * 2.0**e, qw.qweight, qw.scales, qw.zeros, None, bits, group_size)
                assert torch.equal(scaled, y * 2.0**e), (symmetric, m, e)


@pytest.mark.parametrize("bits,largest", [(2, 40000.0), (4, 60000.0)], ids=str)
@pytest.mark.parametrize("group_size", [None, 32], ids=str)
def test_fp16_weights_near_the_fp16_limit_with_k_inside_a_chunk(bits, largest, group_size, gen):
    """Symmetric weights up to `largest` with fp16 scales and activations, K ending inside a
    32-value chunk: the row's zero padding past K dequantizes to s (0 - z), past fp16's range
    (-2 max|w| at 2 bits, -8/7 max|w| at 4), which times the zero activations there must add
    nothing (the CUDA tensor-core kernel's sums became NaN)."""
    for k in (29, 30, 31, 61, 95, 1023):
        w = (torch.rand(24, k, generator=gen) * 2 - 1) * largest
        w[:, 0] = largest
        qw = lq.quantize_weight(w, bits, group_size, True, dtype=torch.float16)
        for m in (1, 9, 40):
            x = (torch.randn(m, k, generator=gen) * 1e-4).half()
            check(x, qw, None, bits, group_size)
            assert torch.isfinite(lq.linear(x, qw.qweight, qw.scales, qw.zeros, None, bits, group_size)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_dtypes_and_leading_dims(dtype, bits, gen):
    w = torch.randn(24, 96, generator=gen).to(dtype)
    qw = lq.quantize_weight(w, bits, 32, symmetric=bits != 4)
    bias = torch.randn(24, generator=gen).to(dtype)
    for lead in [(), (1,), (2, 3), (4, 1, 2)]:
        check(torch.randn(*lead, 96, generator=gen).to(dtype), qw, bias, bits, 32)


@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 32), (8, 128), (4, None), (4, 64), (4, 128), (4, 32),
                                             (4, 16), (2, None), (2, 128), (2, 256), (2, 64), (2, 32)], ids=str)
def test_bf16_activations_dot_kernel_layouts(bits, group_size, gen):
    # The layouts the CPU's AVX512-BF16 kernel takes (where the CPU has it; elsewhere the LUT and
    # 8-bit kernels): groups of whole 32-byte loads, one per row, or below 8 bits 2 or 4 per load
    # (16- and 8-byte groups). K ends inside a group and inside a load, N = 13 (4-row tiles for one
    # or two activation rows, pairs for more, then a single row), M covers every activation tile.
    n, k = 13, 4 * 128 + 40
    for symmetric in (True, False):
        qw = lq.quantize_weight(torch.randn(n, k, generator=gen), bits, group_size, symmetric, dtype=torch.bfloat16)
        bias = torch.randn(n, generator=gen).bfloat16()
        for m in (1, 2, 3, 4, 7) if bits < 8 else (8, 9, 10, 11):  # 8-bit: from M = 8
            check(torch.randn(m, k, generator=gen).bfloat16(), qw, bias if m % 2 else None, bits, group_size)


@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 32), (4, 128), (4, 32), (4, 16), (2, 64), (2, None)], ids=str)
@pytest.mark.parametrize("symmetric", [True, False])
def test_bf16_subnormal_activations(bits, group_size, symmetric, gen):
    # bf16 activations below 1.2e-38 against weights ~1e30, mixed with normal ones in the same
    # groups and rows: the AVX512-BF16 dot products read subnormals as zero, and the kernel's
    # group-offset term (128 + z) sum x must read them alike, or it subtracts what the products
    # never added (100-1000x the product, sign flipped). M covers the dot kernel's tiles, the
    # 8-bit dot kernel (from 8 rows) and the bf16 GEMM (from 12-24 rows by layout).
    n, k = 13, 300
    w = torch.randn(n, k, generator=gen) * 1e30
    qw = lq.quantize_weight(w, bits, group_size, symmetric, dtype=torch.bfloat16)
    for m in (1, 2, 4, 8, 9, 33, 65):
        x = torch.randn(m, k, generator=gen) * 1e-39
        x[:, ::7] = torch.randn(m, len(range(0, k, 7)), generator=gen) * 1e-30  # normal ones too
        check(x.bfloat16(), qw, None, bits, group_size)
        x[:, ::7] = 0  # subnormal only
        check(x.bfloat16(), qw, None, bits, group_size)


def check_bf16_gemm(x, qw, bias, bits, group_size):
    """linear of bf16 x on the CPU's bf16 GEMM path against the float64 product with the reference
    weight rounded to fp32 then to bf16 (as the kernel rounds s * (q - z)), within fp32
    accumulation and one rounding of the sum plus the bias to bf16. Returns y and that bf16 weight."""
    k = x.shape[-1]
    w = ref_weight(qw.qweight, qw.scales, qw.zeros, bits, group_size, k).float().bfloat16().double()
    y = lq.linear(x, qw.qweight, qw.scales, qw.zeros, bias, bits, group_size)
    assert y.dtype == torch.bfloat16 and y.shape == (x.shape[0], qw.qweight.shape[0])
    x64 = x.double()
    ref = x64 @ w.T + (bias.double() if bias is not None else 0)
    bound = (x64.abs() @ w.abs().T) * (k**0.5 + 4) * 2.0**-23 + ref.abs() * 2.0**-8 + 1e-30
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), (x.shape[0], float((err / bound).max()))
    return y, w.bfloat16()


def gemm_probe(n, k, bits, group_size, signed):
    """A weight whose product tells the bf16 GEMM path from the register kernels: in each row,
    w[k1] = s * 3 and w[k2] = s * 2 (k1, k2 in the last group), 0 elsewhere, s = 1 + 2^-7. With
    x = +1 at k1 and -1 at k2, the register kernels take s (3 - 2) = 1.0078125 exactly, while the
    GEMM path's weights are rounded to bf16 first: 3.03125 - 2.015625 = 1.015625. int8 symmetric
    (signed) weights have no zero points; the others are asymmetric with zero points 0."""
    g = k if group_size is None else group_size
    k1, k2 = (k - 1) // g * g, k - 1
    q = torch.zeros(n, k, dtype=torch.int64)
    q[:, k1], q[:, k2] = 3, 2
    groups = -(-k // g)
    scales = torch.full((n, groups), 1 + 2.0**-7)
    if bits == 8:
        qweight = q.to(torch.int8 if signed else torch.uint8)
    else:
        qweight = lq.pack(q, bits)
    zeros = None if signed else torch.zeros(n, groups, dtype=torch.int32)
    return qweight, scales, zeros, k1, k2


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the bf16 GEMM path needs a CPU with AVX512-BF16")
@pytest.mark.parametrize("bits,group_size,min_rows", [(8, None, 16), (8, 32, 12), (4, None, 24), (4, 128, 16),
                                                      (2, None, 24), (2, 128, 16), (4, 32, 12), (4, 16, 16),
                                                      (2, 64, 16), (2, 32, 16), (2, 16, 24)], ids=str)
def test_bf16_activations_gemm_path(bits, group_size, min_rows, gen):
    # From min_rows rows, by layout (csrc/cpu/linear.cpp `bf16_gemm_min_rows`), bf16 activations
    # take the bf16 GEMM over weight panels dequantized to bf16: gemm_probe tells it from the
    # register kernels on each side of min_rows. One-hot rows read back every dequantized value
    # of a random weight exactly; random rows, with and without bias, meet check_bf16_gemm.
    # K ends inside a group, N is odd; the bias is bf16 or fp32.
    n, k = 37, 300
    for signed in ((True, False) if bits == 8 else (False,)):
        qweight, scales, zeros, k1, k2 = gemm_probe(n, k, bits, group_size, signed)
        for m, expected in ((min_rows - 1, 1.0078125), (min_rows, 1.015625)):
            x = torch.zeros(m, k, dtype=torch.bfloat16)
            x[:, k1], x[:, k2] = 1, -1
            y = lq.linear(x, qweight, scales, zeros, None, bits, group_size)
            assert bool((y == expected).all()), (m, y.unique())
    for symmetric in (True, False):
        qw = lq.quantize_weight(torch.randn(n, k, generator=gen), bits, group_size, symmetric)
        y, w = check_bf16_gemm(torch.eye(k, dtype=torch.bfloat16), qw, None, bits, group_size)
        assert torch.equal(y, w.T)
        for m, bias in ((min_rows, None), (min_rows + 1, torch.randn(n, generator=gen).bfloat16()),
                        (130, torch.randn(n, generator=gen))):
            check_bf16_gemm(torch.randn(m, k, generator=gen).bfloat16(), qw, bias, bits, group_size)


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the bf16 GEMM path needs a CPU with AVX512-BF16")
def test_bf16_activations_gemm_path_blocks(gen):
    # The bf16 GEMM's blocking: panels of 64 weight rows (N = 1, a 1-row tail of 129, 37 < 64),
    # register tiles of 12, 8, 8 or 6 weight rows for 1-4 vectors of 16 activation rows (M = 16,
    # 20, 41, 47 and 64 take each; 66 = 64 + 2 two blocks of rows; every tile's remainder of rows
    # among N = 37, 64, 100, 129, 700), pairs of K 512 at a time (K = 9001: eight full passes, a
    # short one, an odd last value; 1030 one pass and 3 pairs), activations transposed 16 pairs at a
    # time (K = 300, 1030, 4097: a part block), one panel per thread or many.
    for n, k, m in ((1, 300, 64), (129, 9001, 41), (700, 64, 47), (64, 4097, 66), (37, 1030, 16), (100, 333, 20)):
        for bits, group_size in ((4, 128), (8, None), (2, 32)):
            qw = lq.quantize_weight(torch.randn(n, k, generator=gen), bits, group_size, symmetric=False)
            check_bf16_gemm(torch.randn(m, k, generator=gen).bfloat16(), qw, torch.randn(n, generator=gen),
                            bits, group_size)


def fp32_gemm_is_linquants():
    """Whether the fp32 GEMM path is linquant's own (gemm_f32, the AVX-512 kernels'), not ATen's."""
    return torch.ops.linquant._cpu_isa() == "avx512"


@pytest.mark.skipif(not fp32_gemm_is_linquants(), reason="linquant's fp32 GEMM runs with the AVX-512 kernels")
@pytest.mark.parametrize("group_size,min_rows", [(None, 32), (128, 28), (64, 28), (32, 16)], ids=str)
def test_fp32_activations_gemm_path(group_size, min_rows, gen):
    # From min_rows rows, by layout (gemm_min_rows in csrc/cpu/linear_kernels_isa.cpp), fp32
    # activations take the fp32 GEMM over dequantized weights. At 8 bits a probe tells it from the
    # register kernel: with scale s = 1 + 2^-23, q = 3 at k = 0 and 2 at k = 16 (one lane of tile8's
    # sums) and x = 1, -1 there, tile8 scales the lane's sum of (q - z) x once, s (3 - 2) = 1 + 2^-23,
    # while the GEMM adds the dequantized weights rounded to fp32: fl(3 s) - fl(2 s) = 1 + 2^-22.
    # Then random rows meet the float64 reference's bound on both sides of the threshold; K ends
    # inside a group, N is odd.
    n, k = 37, 300
    groups = 1 if group_size is None else -(-k // group_size)
    q = torch.zeros(n, k, dtype=torch.int64)
    q[:, 0], q[:, 16] = 3, 2
    scales = torch.full((n, groups), 1 + 2.0**-23)
    for signed in (True, False):
        qweight = q.to(torch.int8 if signed else torch.uint8)
        zeros = None if signed else torch.zeros(n, groups, dtype=torch.int32)
        for m, expected in ((min_rows - 1, 1 + 2.0**-23), (min_rows, 1 + 2.0**-22)):
            x = torch.zeros(m, k)
            x[:, 0], x[:, 16] = 1, -1
            y = lq.linear(x, qweight, scales, zeros, None, 8, group_size)
            assert bool((y == expected).all()), (m, y.unique())
        qw = lq.quantize_weight(torch.randn(n, k, generator=gen), 8, group_size, signed)
        for m in (min_rows - 1, min_rows, 130):
            check(torch.randn(m, k, generator=gen), qw, torch.randn(n, generator=gen), 8, group_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fp32_activations_gemm_path_blocks(dtype, gen):
    # The fp32 GEMM's blocking (AVX-512: gemm_f32, as the bf16 GEMM's; ATen's elsewhere): panels of
    # 64 weight rows (N = 1, a 1-row tail of 129, 37 < 64), register tiles of 12, 8, 8 or 6 weight
    # rows for 1-4 vectors of 16 activation rows (M = 16, 20, 41, 47, 64; 66 = 64 + 2), 512 values
    # of K at a time (K = 9001: 17 full passes and a short one; 1030: two and 6 values), activations
    # transposed 16 values at a time (K = 300, 333, 4097: a part block). Layouts whose threshold is
    # at most 16 rows there (4-bit g48, 8-bit g32, 2-bit g8), fp16 activations converted to fp32.
    for n, k, m in ((1, 300, 64), (129, 9001, 41), (700, 64, 47), (64, 4097, 66), (37, 1030, 16), (100, 333, 20)):
        for bits, group_size in ((4, 48), (8, 32), (2, 8)):
            qw = lq.quantize_weight(torch.randn(n, k, generator=gen), bits, group_size, symmetric=False)
            check(torch.randn(m, k, generator=gen).to(dtype), qw, torch.randn(n, generator=gen), bits, group_size)


def test_non_contiguous_and_empty(gen):
    w = torch.randn(20, 64, generator=gen)
    qw = lq.quantize_weight(w, 4, 32)
    x = torch.randn(64, 9, generator=gen).t()
    assert not x.is_contiguous()
    check(x, qw, None, 4, 32)
    assert lq.linear(torch.randn(0, 64), qw.qweight, qw.scales, None, None, 4, 32).shape == (0, 20)


@pytest.mark.parametrize("view", [strided_view, column_major], ids=["strided", "column_major"])
@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (8, 32, False), (4, None, False),
                                                       (4, 32, True), (2, 64, False)], ids=str)
def test_non_contiguous_weight_tensors(view, bits, group_size, symmetric, gen):
    # qweight, scales, zeros and bias as views with other strides (as slices or transposes of
    # stored tensors may come), over the register-tiled kernel's and the GEMM path's row counts,
    # for each activation dtype: the reference reads them by index.
    n, k = 13, 100
    qw = lq.quantize_weight(torch.randn(n, k, generator=gen), bits, group_size, symmetric)
    nc = qw._replace(qweight=view(qw.qweight), scales=view(qw.scales),
                     zeros=None if qw.zeros is None else view(qw.zeros))
    bias = strided_view(torch.randn(n, generator=gen))
    assert not nc.qweight.is_contiguous() and not bias.is_contiguous()
    assert not nc.scales.is_contiguous() or group_size is None  # a [13, 1] column stays contiguous transposed
    for dtype in DTYPES:
        for m in (1, 5, 130):
            x = torch.randn(m, k, generator=gen).to(dtype)
            check(x, nc, bias, bits, group_size)


# Row counts on both sides of every instruction set's switch from the register kernels to the fp32
# GEMM over dequantized weights (gemm_min_rows in csrc/cpu/linear_kernels_isa.cpp: it depends on
# the bits and the group's length, from 6 to 64 rows with AVX-512, from 1 to 512 elsewhere).
SWITCH_ROWS = [1, 2, 5, 6, 7, 8, 11, 12, 15, 16, 27, 28, 31, 32, 47, 48, 63, 64, 127, 128, 255, 256, 511, 512]


@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 8), (8, 16), (8, 32), (8, 64), (8, 128), (4, None), (4, 8),
                                             (4, 16), (4, 32), (4, 64), (4, 128), (2, None), (2, 16), (2, 32), (2, 64),
                                             (2, 128)], ids=str)
def test_both_sides_of_the_gemm_switch(bits, group_size, gen):
    w = torch.randn(40, 200, generator=gen)
    bias = torch.randn(40, generator=gen)
    x = torch.randn(max(SWITCH_ROWS), 200, generator=gen)
    for symmetric in (True, False):
        qw = lq.quantize_weight(w, bits, group_size, symmetric)
        for m in SWITCH_ROWS:
            check(x[:m], qw, bias, bits, group_size)


@pytest.mark.parametrize("bits,group_size", sorted(LANE_LAYOUTS), ids=str)
@pytest.mark.parametrize("symmetric", [True, False])
def test_word_lane_layouts(bits, group_size, symmetric, gen):
    # 4-bit groups of 8-64 values and 2-bit of 16 and 32 (AVX-512: tile_lut_lanes, 2-16 groups per
    # 64-byte load, every group's values looked up in one table of q - c and each word's sums
    # scaled by its group's scale; the zero points through each row's group sums; AVX2's
    # tile_words alike, 4-bit values in place with c = 0, under test_cpu_variants): K of two
    # groups, over several loads ending inside a word, a load and a group, and 1000; every
    # activation-row tile (1-4 rows, and 7 = 4 + 3); fp32 / fp16 / bf16 scales; fp32 and fp16
    # activations. Small weights with one outlier per group put most q at z (asymmetric), where
    # |q - c| is largest against |q - z|, and activations of mean 3 keep the sums from cancelling:
    # there the kernel's rounding exceeds a bound on |s (q - z)| alone (2.9x at 4-bit g64, K = 128).
    n = 13
    for k in (2 * group_size, 3 * 512 // bits + group_size // 2 + 3, 1000):
        w = torch.randn(n, k, generator=gen) * 0.01
        w[:, ::group_size] = 1.0
        for scale_dtype in DTYPES:
            qw = lq.quantize_weight(w, bits, group_size, symmetric, dtype=scale_dtype)
            for m in (1, 2, 3, 4, 7):
                for dtype in (torch.float32, torch.float16):
                    x = torch.randn(m, k, generator=gen) + 3
                    check(x.to(dtype), qw, torch.randn(n, generator=gen), bits, group_size)


def test_gemm_path_tiles(gen):
    # fp32 activations from 512 rows take the GEMM on every instruction set (gemm_min_rows). ATen's
    # (without AVX-512) dequantizes 512 weight rows at a time (at most 16 MiB of them): 1025 rows
    # make two whole tiles and a one-row tail; with K = 9000, 16 MiB holds 466 fp32 rows, so 467
    # make two tiles. linquant's (AVX-512) takes 64-row panels: 1025 = 16 panels and a 1-row one.
    for n, k in ((1025, 300), (467, 9000)):
        qw = lq.quantize_weight(torch.randn(n, k, generator=gen), 4, 128, symmetric=False)
        check(torch.randn(512, k, generator=gen), qw, torch.randn(n, generator=gen), 4, 128)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 128, False), (2, 32, True)], ids=str)
def test_threads_split_large_weights(dtype, bits, group_size, symmetric, gen):
    """The register kernels split a product among threads by its estimated work (weight bytes and
    multiply-adds) and run small ones on the calling thread. 1030 rows (not a whole number of 4-row
    blocks per share) of 1100 values, split among 2 and 3 threads: every row equals the one-thread
    result and the float64 reference's bound; so does grouped_linear, whose experts' rows are split
    by the same shares, and each expert's rows equal that expert's linear. Row counts the register
    kernels take on every instruction set: the plain C++ copy leaves 4 rows or more to ATen's GEMM
    (gemm_min_rows), whose bits may depend on the thread count (MKL's at 5 x 1100 x 1030 do)."""
    n, k = 1030, 1100
    qw = lq.quantize_weight((torch.randn(n, k, generator=gen) * 0.05).to(dtype), bits, group_size, symmetric)
    experts = lq.QExpertsWeight.from_weight((torch.randn(3, n, k, generator=gen) * 0.05).to(dtype), False, bits,
                                            group_size, symmetric)
    rows = (1, 2, 3) if torch.ops.linquant._cpu_isa() == "baseline" else (1, 5, 13)
    xs = [torch.randn(m, k, generator=gen).to(dtype) for m in rows]
    counts = [1, 0, rows[-1] - 1]
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(([lq.linear(x, qw.qweight, qw.scales, qw.zeros, None, bits, group_size) for x in xs],
                             experts.grouped_linear(xs[-1], counts)))
    finally:
        torch.set_num_threads(before)
    for ys, grouped in results[1:]:
        assert all(torch.equal(y, y1) for y, y1 in zip(ys, results[0][0]))
        assert torch.equal(grouped, results[0][1])
    grouped = results[0][1]
    assert torch.equal(grouped[:1], experts.linear(xs[-1][:1], 0))
    assert torch.equal(grouped[1:], experts.linear(xs[-1][1:], 2))
    for x in xs:
        check(x, qw, None, bits, group_size)


def raises(match):
    return pytest.raises(ValueError, match=match)


def test_bad_input():
    w = torch.randn(8, 64)
    qw = lq.quantize_weight(w, 4, 32)
    x = torch.randn(2, 64)
    with raises("x has in_features K=60, which at 4 bits packs into 30 bytes per weight row, but qweight has 32"):
        lq.linear(torch.randn(2, 60), qw.qweight, qw.scales, None, None, 4, 32)
    with raises("linear supports bits 8, 4 and 2, got 3"):
        lq.linear(x, qw.qweight, qw.scales, None, None, 3, 32)
    with raises(re.escape("scales must be [8, 4] (out_features x ceil(K / group_size))")):
        lq.linear(x, qw.qweight, qw.scales, None, None, 4, 16)
    with raises("group_size must be a positive multiple of 2 at 4 bits"):
        lq.linear(x, qw.qweight, qw.scales, None, None, 4, 33)
    with raises("qweight must be uint8"):
        lq.linear(x, qw.qweight.to(torch.int8), qw.scales, None, None, 4, 32)
    with raises("qweight must be int8"):
        lq.linear(x, torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 1), None, None, 8, None)
    with raises("x must be float32, float16 or bfloat16"):
        lq.linear(x.double(), qw.qweight, qw.scales, None, None, 4, 32)
    with raises("zeros must be"):
        lq.linear(x, qw.qweight, qw.scales, torch.zeros(8, 3, dtype=torch.int32), None, 4, 32)
    with raises(re.escape("bias must be [out_features] = [8], got shape [7]")):
        lq.linear(x, qw.qweight, qw.scales, None, torch.zeros(7), 4, 32)
    with raises("scales is on meta but x is on cpu"):
        lq.linear(x, qw.qweight, qw.scales.to("meta"), None, None, 4, 32)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_sizes_near_int64_max(bits):
    # An expanded x can have K near INT64_MAX: K * bits wrapped, at 8 and 4 bits to a row of 0
    # bytes that passed the shape check, at 2 bits to a negative one in the message.
    qw = lq.quantize_weight(torch.randn(3, 16), bits, None, symmetric=False)
    per_byte = 8 // bits
    with raises(f"x has in_features K={2**62}, which at {bits} bits packs into {2**62 // per_byte} bytes per weight "
                f"row, but qweight has {qw.qweight.shape[1]}"):
        lq.linear(torch.zeros(1, 1).expand(1, 2**62), qw.qweight, qw.scales, qw.zeros, None, bits, None)
    # grouped_linear's counts summing past INT64_MAX wrapped to a total that matched x's rows.
    qx = lq.quantize_weight(torch.randn(3, 16), bits, None, symmetric=False)
    stacked = [t.unsqueeze(0).expand(3, *t.shape) for t in (qx.qweight, qx.scales, qx.zeros)]
    with raises(re.escape("counts must sum to x's 3 rows, got more from counts[0] = 9223372036854775807 on (the "
                          "counts before it add up to 0)")):
        torch.ops.linquant.grouped_linear(torch.randn(3, 16), [2**63 - 1, 2**63 - 1, 5], *stacked, None, bits, None)


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (8, 64, False), (4, 32, True), (2, 64, False)])
def test_opcheck(bits, group_size, symmetric):
    qw = lq.quantize_weight(torch.randn(16, 128), bits, group_size, symmetric)
    for x in (torch.randn(3, 128), torch.randn(2, 2, 128).bfloat16(), torch.randn(5, 128, requires_grad=True)):
        scales = qw.scales.to(x.dtype)
        bias = torch.randn(16).to(x.dtype).requires_grad_(x.requires_grad)
        torch.library.opcheck(torch.ops.linquant.linear.default,
                              (x, qw.qweight, scales, qw.zeros, bias, bits, group_size))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (8, 32, False), (4, None, False),
                                                       (4, 32, True), (2, 64, False), (2, None, True)], ids=str)
def test_gradients_for_x_and_bias(bits, group_size, symmetric, dtype, gen):
    # The weights are frozen (a LoRA or a prompt trained through a quantized model); before the
    # backward was registered, x got no gradient at all, with only a warning.
    n, k = 24, 100  # K not a multiple of the group
    qw = lq.quantize_weight(torch.randn(n, k, generator=gen), bits, group_size, symmetric, dtype=dtype)
    x = torch.randn(2, 3, k, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(n, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(2, 3, n, generator=gen).to(dtype)
    lq.linear(x, qw.qweight, qw.scales, qw.zeros, bias, bits, group_size).backward(dy)

    w = ref_weight(qw.qweight, qw.scales, qw.zeros, bits, group_size, k)
    dy64 = dy.double().reshape(-1, n)
    ref_dx = (dy64 @ w).reshape(x.shape)
    # dy @ W_hat with W_hat rounded to dtype, fp32 (or dtype) accumulation, output rounding.
    bound = (dy64.abs() @ w.abs()).reshape(x.shape) * (2 * EPS[dtype] + n * 2.0**-23) + 1e-30
    assert x.grad.dtype == dtype and bool(((x.grad.double() - ref_dx).abs() <= bound).all())
    ref_db = dy64.sum(0)
    assert bias.grad.dtype == dtype
    assert bool(((bias.grad.double() - ref_db).abs() <= dy64.abs().sum(0) * (EPS[dtype] * 8)).all())


def test_no_gradient_for_scales(gen):
    qw = lq.quantize_weight(torch.randn(8, 32, generator=gen), 4, 16)
    y = lq.linear(torch.randn(2, 32, generator=gen), qw.qweight, qw.scales.requires_grad_(), None, None, 4, 16)
    with pytest.raises(NotImplementedError, match="no gradient for scales"):
        y.sum().backward()


def test_compile_fullgraph():
    qw = lq.quantize_weight(torch.randn(32, 128), 4, 64)

    def f(x):
        return torch.relu(lq.linear(x, qw.qweight, qw.scales, None, None, 4, 64)) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for m in (1, 5):
        x = torch.randn(m, 128)
        assert torch.equal(compiled(x), f(x))


def test_compile_backward_matches_eager(gen):
    # The backward is a C++ autograd kernel: AOTAutograd traces it into the compiled graph too.
    qw = lq.quantize_weight(torch.randn(24, 96, generator=gen), 4, 32, symmetric=False)
    bias = torch.randn(24, generator=gen)

    def f(x, b):
        return torch.relu(lq.linear(x, qw.qweight, qw.scales, qw.zeros, b, 4, 32)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 96, generator=gen)
    grads = []
    for fn in (f, compiled):
        xi, bi = x.clone().requires_grad_(), bias.clone().requires_grad_()
        fn(xi, bi).backward()
        grads.append((xi.grad, bi.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_runs_in_the_autocast_dtype(dtype, gen):
    # As nn.Linear under torch.autocast: x is cast, y comes out in the autocast dtype, equal to
    # the call on the cast x; gradients reach the fp32 x through the cast. Scales stay fp32.
    qw = lq.quantize_weight(torch.randn(16, 64, generator=gen), 4, 32, symmetric=False)
    bias = torch.randn(16, generator=gen)
    x = torch.randn(3, 64, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = lq.linear(x, qw.qweight, qw.scales, qw.zeros, bias, 4, 32)
    assert y.dtype == dtype
    assert torch.equal(y, lq.linear(x.detach().to(dtype), qw.qweight, qw.scales, qw.zeros, bias, 4, 32))
    y.float().sum().backward()
    x_cast = x.detach().clone().requires_grad_()
    lq.linear(x_cast.to(dtype), qw.qweight, qw.scales, qw.zeros, bias, 4, 32).float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, x_cast.grad)
    assert lq.linear(x, qw.qweight, qw.scales, qw.zeros, bias, 4, 32).dtype == torch.float32  # autocast off


def test_autocast_in_a_quantized_model(gen):
    # A quantized fp32 model under CPU autocast runs its QLinear layers in bf16, like nn.Linear:
    # the same bits as each layer called on bf16 activations.
    torch.manual_seed(0)
    model = lq.quantize_model(torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8)),
                              bits=8)
    x = torch.randn(2, 32, generator=gen)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, model[2](torch.relu(model[0](x.bfloat16()))))


@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_empty_weights_from_quantize_weight(group_size, symmetric, gen):
    # K = 0: y is the bias; N = 0: y has no columns. quantize_weight's scales fit linear in both.
    bias = torch.randn(5, generator=gen)
    qk = lq.quantize_weight(torch.randn(5, 0), 4, group_size, symmetric)
    y = lq.linear(torch.randn(3, 0), qk.qweight, qk.scales, qk.zeros, bias, 4, group_size)
    assert torch.equal(y, bias.expand(3, 5))
    qn = lq.quantize_weight(torch.randn(0, 8), 4, group_size, symmetric)
    assert qn.scales.shape == (0, 1 if group_size is None else 2)
    assert lq.linear(torch.randn(3, 8), qn.qweight, qn.scales, qn.zeros, None, 4, group_size).shape == (3, 0)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("m", [1, 5, 130])
def test_zero_points_at_the_int32_limits(bits, m, gen):
    # q - z for z near INT32_MIN / INT32_MAX does not fit in int32 lanes: the kernels take it in
    # fp32 (the GEMM path's dequantization in int64), so the sign stays and only fp32 rounds it.
    # Each group its own zero point (both sides of +-2^30 and the limits) and scale: a wrapped
    # difference, or another group's zero point or scale, is off by the weight's size. fp32 cannot
    # hold q beside z here (|q - z| ~ 2^31 keeps 24 bits), so the stored values go unseen.
    qw = lq.quantize_weight(torch.randn(24, 64, generator=gen), bits, 16, symmetric=False)
    limits = torch.tensor([-(2**31), 2**31 - 1, -(2**30) - 1, 2**30, -(2**30), 2**30 + 1, 2**31 - 2], dtype=torch.int32)
    zeros = limits[torch.randint(0, 7, qw.zeros.shape, generator=gen)]
    scales = (torch.rand(qw.scales.shape, generator=gen) + 0.5) * 2.0**-31
    x = torch.randn(m, 64, generator=gen)
    w = ref_weight(qw.qweight, scales, zeros, bits, 16, 64)
    got = lq.linear(x, qw.qweight, scales, zeros, None, bits, 16).double()
    assert bool(((got - x.double() @ w.T).abs() <= (x.double().abs() @ w.abs().T) * 2.0**-20).all())


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 100, 256])
def test_a_group_as_long_as_k_or_longer_is_per_channel(bits, symmetric, k, gen):
    """A group_size of K or more (to 2^63 - 1, as the granularity rules allow) is one group per
    row: the same product as per-channel, bit for bit. Such a group is stored as the row's length,
    so no kernel does arithmetic on the huge value (kept as given, 2^62 at 4 bits would be 0 words
    to the lookup-table kernel, which then returned the bias alone)."""
    w = torch.randn(9, k, generator=gen)
    qw = lq.quantize_weight(w, bits, None, symmetric)  # scales [9, 1]: one group per row
    bias = torch.randn(9, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 5):
            x = torch.randn(m, k, generator=gen).to(dtype)
            check(x, qw, bias, bits, None)
            per_channel = lq.linear(x, qw.qweight, qw.scales, qw.zeros, bias, bits, None)
            for g in (k + (-k) % 8, 1024, 2**20, 2**62, 2**63 - 8):
                assert torch.equal(lq.linear(x, qw.qweight, qw.scales, qw.zeros, bias, bits, g), per_channel), g
