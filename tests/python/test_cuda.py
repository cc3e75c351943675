"""The CUDA backend agrees with the CPU backend. Skipped without a GPU.

What this suite checks, with the CPU kernels (themselves checked against tests/python/reference.py
by the CPU suites) as the oracle:
- choose_qparams / quantize / dequantize / pack / unpack on CUDA are bit-identical to the CPU
  (`torch.equal` after `.cpu()`): bits 2..8 (pack: 1..8), symmetric and asymmetric, per-tensor,
  per-channel (axis 0, 1, -1 on 2-D and 3-D) and per-group (1, 3, 32, 128, a last dim that is not a
  multiple of the group), fp32 / fp16 / bf16, empty / 1-element / odd / large shapes (per-tensor
  reductions spanning many blocks), non-contiguous views, nonzero (misaligned) storage offsets,
  huge dynamic range, subnormals, constant and all-zero groups, rounding ties, clamping;
- the errors on CUDA are the CPU's ValueErrors, word for word (NaN / Inf, out-of-range pack values
  naming the first bad index, bad arguments), and mixed devices are ValueErrors naming both devices;
- linear on CUDA against the float64 reference (reference.ref_weight) and against the CPU kernel,
  on every CUDA path (the CUDA-core GEMV, the tensor-core kernels, the Hopper GEMM where the build
  and GPU have it, dequantize + cuBLAS; as the thresholds choose and each forced), over bits,
  modes, group sizes, shapes, dtypes, leading dims, bias, empty inputs, non-contiguous x and
  misaligned qweight / scales / zeros / bias (the kernels' aligned fast path and their fallback);
- torch.library.opcheck of every op on CUDA; QLinear and quantize_weight on CUDA; quantize_model on
  tiny random Hugging Face models on CUDA; torch.compile(fullgraph=True) of QLinear on CUDA;
- CUDA specifics: ops on a non-default stream wait for their inputs (and match the default stream),
  ops follow the tensors' device (cuda:1 with two GPUs), CUDA-graph capture and replay of linear
  and of a QEmbedding lookup (dequantize).

scripts/gpu_check.sh runs this suite under compute-sanitizer. Tests that exercise only the kernels
carry none of the words "model", "compile" or "graph" in their names, so the sanitizer run selects
them with `-k "not model and not compile and not graph"`. The suite is meant to take under ~2
minutes on one H100 without the sanitizer.

Random data comes from the `gen` fixture (a fresh seed per test, printed on failure), generated
on the CPU and then copied to the GPU, so both backends see the same values.
"""

import copy
import math
import os
import re

import pytest
import torch
from torch import nn

import hf_models
import linquant as lq
from linquant._ops import built_with_cuda
from conftest import cuda_only
from reference import BF16_GEMM_MIN_ROWS, dot_kernel_weight, extreme_inputs, ref_weight
from test_opcheck import SAMPLES as CPU_OPCHECK_SAMPLES
from test_opcheck import opcheck_quantize_family

pytestmark = cuda_only

DEV = torch.device("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ---------------------------------------------------------------------------------------------
# helpers


def on_dev(t, device=DEV):
    return None if t is None else t.to(device)


def offset_copy(t, offset, device=DEV):
    """A contiguous copy of `t` on `device` whose data starts `offset` elements into its storage
    (misaligned for vector loads when offset * itemsize is not a multiple of 16)."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=device)
    out = buf[offset:].view(t.shape)
    out.copy_(t)
    assert out.storage_offset() == offset and out.is_contiguous()
    return out


def same(gpu, cpu, what=""):
    """`gpu` (a CUDA result) equals `cpu` bit for bit, with the same dtype and shape."""
    assert isinstance(gpu, torch.Tensor), f"{what}: got {type(gpu)}"
    assert gpu.device.type == DEV.type, f"{what}: result is on {gpu.device}"
    assert gpu.dtype == cpu.dtype, f"{what}: dtype {gpu.dtype} on CUDA, {cpu.dtype} on the CPU"
    assert gpu.shape == cpu.shape, f"{what}: shape {list(gpu.shape)} on CUDA, {list(cpu.shape)} on the CPU"
    assert gpu.is_contiguous() == cpu.is_contiguous(), f"{what}: contiguity differs"
    g = gpu.cpu()
    if not torch.equal(g, cpu):
        bad = (g != cpu).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {bad.shape[0]} of {cpu.numel()} elements differ; first at {list(first)}: "
                             f"cuda {g[first].item()!r} vs cpu {cpu[first].item()!r}")


def first_line(exc):
    return str(exc).splitlines()[0] if str(exc) else ""


def same_error(call, expect=None):
    """call("cpu") and call("cuda") both raise ValueError with the same message (first line);
    `expect`, a regex, must match it too. Returns the message."""
    with pytest.raises(ValueError) as cpu:
        call(torch.device("cpu"))
    with pytest.raises(ValueError) as gpu:
        call(DEV)
    msg = first_line(cpu.value)
    assert first_line(gpu.value) == msg, f"CUDA: {first_line(gpu.value)!r}\nCPU:  {msg!r}"
    if expect is not None:
        assert re.search(expect, msg), (expect, msg)
    return msg


def random_input(shape, dtype, gen):
    # Mixed scales and a shifted mean (asymmetric ranges), as in test_quantize.py.
    x = torch.randn(shape, generator=gen) * torch.rand((), generator=gen) * 10 + torch.randn((), generator=gen)
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# choose_qparams / quantize / dequantize: bit-identical to the CPU


def check_family(x, xg, bits, symmetric, axis, g, clamp=True, what=""):
    """choose_qparams, quantize, dequantize of x (CPU) and xg (the same values on CUDA, in any
    layout) agree bit for bit; with `clamp`, also quantize with scales small enough to clamp and
    dequantize random codes over the whole integer range."""
    what = f"{what} bits={bits} symmetric={symmetric} axis={axis} group_size={g} dtype={x.dtype} shape={list(x.shape)}"
    s0, z0 = lq.choose_qparams(x, bits=bits, symmetric=symmetric, axis=axis, group_size=g)
    s1, z1 = lq.choose_qparams(xg, bits=bits, symmetric=symmetric, axis=axis, group_size=g)
    same(s1, s0, "scale " + what)
    if symmetric:
        assert z0 is None and z1 is None
    else:
        same(z1, z0, "zero_point " + what)
    q0 = lq.quantize(x, s0, z0, bits=bits, axis=axis, group_size=g)
    q1 = lq.quantize(xg, s1, z1, bits=bits, axis=axis, group_size=g)
    same(q1, q0, "quantize " + what)
    for out in DTYPES:
        same(lq.dequantize(q1, s1, z1, axis=axis, group_size=g, dtype=out),
             lq.dequantize(q0, s0, z0, axis=axis, group_size=g, dtype=out), f"dequantize to {out} " + what)
    if not clamp:
        return
    small = s0 * 0.37  # most values now fall outside the range: clamping and more rounding cases
    same(lq.quantize(xg, on_dev(small), z1, bits=bits, axis=axis, group_size=g),
         lq.quantize(x, small, z0, bits=bits, axis=axis, group_size=g), "quantize with clamping " + what)
    gen = torch.Generator().manual_seed(bits * 2 + symmetric)
    if symmetric:
        codes = torch.randint(-128, 128, x.shape, generator=gen, dtype=torch.int8)
    else:
        codes = torch.randint(0, 256, x.shape, generator=gen, dtype=torch.uint8)
    same(lq.dequantize(on_dev(codes), s1, z1, axis=axis, group_size=g, dtype=x.dtype),
         lq.dequantize(codes, s0, z0, axis=axis, group_size=g, dtype=x.dtype), "dequantize of random codes " + what)


GRANULARITIES = {
    (): [(None, None)],
    (1,): [(None, None), (0, None), (-1, None), (None, 1), (None, 3)],
    (7,): [(None, None), (0, None), (None, 3), (None, 32)],
    (9, 33): [(None, None), (0, None), (1, None), (-1, None), (None, 1), (None, 3), (None, 32), (None, 128)],
    (3, 50, 70): [(None, None), (0, None), (1, None), (-1, None), (None, 1), (None, 3), (None, 32), (None, 128)],
    (64, 256): [(None, None), (0, None), (None, 32), (None, 128)],
    (257, 4096): [(None, None), (0, None), (1, None), (None, 3), (None, 32), (None, 128)],
    (1, 100003): [(None, None), (0, None), (-1, None), (None, 3), (None, 128)],
    (0,): [(None, None), (0, None), (None, 4)],
    (0, 8): [(None, None), (0, None), (1, None), (None, 4)],
    (5, 0): [(None, None), (0, None), (1, None), (None, 4)],
    (2, 0, 3): [(None, None), (1, None), (-1, None), (None, 2)],
}
FAMILY_CASES = [(shape, axis, g) for shape, grans in GRANULARITIES.items() for axis, g in grans]


def family_bits(shape):
    # Every bit width on small tensors; three on the large ones (their point is block-spanning work).
    return range(2, 9) if math.prod(shape) <= 50_000 else (2, 5, 8)


@pytest.mark.parametrize("shape,axis,group_size", FAMILY_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_quantize_family_matches_cpu(shape, axis, group_size, dtype, gen):
    x = random_input(shape, dtype, gen)
    xg = on_dev(x)
    for bits in family_bits(shape):
        for symmetric in (True, False):
            check_family(x, xg, bits, symmetric, axis, group_size)


FLAT = 40 * 66 + 1
VIEWS = {
    "offset1": lambda f: f[1:].view(40, 66),
    "transposed": lambda f: f[:-1].view(40, 66).t(),
    "step3": lambda f: f[:-1].view(40, 66)[:, ::3],
    "rows2": lambda f: f[:-1].view(40, 66)[::2],
    "offset_transposed_sliced": lambda f: f[1:].view(40, 66).t()[5:, 1::2],
    "permuted_3d": lambda f: f[1:].view(4, 10, 66).permute(2, 0, 1),
    "offset66": lambda f: f[67:].view(39, 66),
}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_quantize_family_non_contiguous_and_offset_inputs(view, dtype, gen):
    flat = random_input((FLAT,), dtype, gen)
    x, xg = VIEWS[view](flat), VIEWS[view](on_dev(flat))
    assert xg.stride() == x.stride() and xg.storage_offset() == x.storage_offset()
    for axis, g in [(None, None), (0, None), (1, None), (-1, None), (None, 5), (None, 8), (None, 32)]:
        for bits in (2, 4, 8):
            for symmetric in (True, False):
                check_family(x, xg, bits, symmetric, axis, g, what=view)
    # q given as the same kind of view, scale and zero point with transposed strides.
    s, z = lq.choose_qparams(x, bits=4, symmetric=False, group_size=8)
    q = lq.quantize(x, s, z, bits=4, group_size=8)
    qflat = torch.zeros(FLAT, dtype=q.dtype)
    VIEWS[view](qflat).copy_(q)
    qv, qvg = VIEWS[view](qflat), VIEWS[view](on_dev(qflat))
    assert torch.equal(qv, q)
    st, zt = s.mT.contiguous().mT, z.mT.contiguous().mT  # same values, other strides
    same(lq.dequantize(qvg, on_dev(st), on_dev(zt), group_size=8, dtype=dtype),
         lq.dequantize(qv, st, zt, group_size=8, dtype=dtype), f"dequantize of a {view} view")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_quantize_family_extreme_values_match_cpu(dtype, gen):
    inputs = extreme_inputs(dtype, gen)
    assert bool(torch.isfinite(inputs["huge range"]).all())
    # One long row whose extremes sit at the very end and just past a power-of-two boundary.
    long = torch.randn(1, 100003, generator=gen)
    long[0, -1], long[0, 65536], long[0, 4096] = 40.0, -50.0, 45.0
    long = long.to(dtype)
    for name, x in (*inputs.items(), ("long row", long)):
        xg = on_dev(x)
        for bits in (2, 3, 4, 8):
            for symmetric in (True, False):
                for axis, g in [(None, None), (0, None), (-1, None), (None, 1), (None, 5), (None, 16), (None, 64)]:
                    if name == "long row" and (axis == -1 or g == 1) and bits != 8:
                        continue  # 100003 one-element groups: once per mode is enough
                    check_family(x, xg, bits, symmetric, axis, g, clamp=False, what=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_rounding_ties_and_clamping_match_cpu(dtype):
    q = lq.quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 100.0], device=DEV).to(dtype),
                    torch.tensor(1.0, device=DEV), None, bits=8)
    assert q.cpu().tolist() == [0, 2, 2, 0, -2, -2, 3, 100]  # half to even, as on the CPU
    x = ((torch.arange(-600, 600, dtype=torch.float64) + 0.5) * 0.25).to(dtype).reshape(12, 100)
    xg = on_dev(x)
    for scale in (0.25, 0.5, 0.125, 0.0625):
        for bits in (2, 3, 4, 8):
            s = torch.full((12, 1), scale)
            same(lq.quantize(xg, on_dev(s), None, bits=bits, axis=0), lq.quantize(x, s, None, bits=bits, axis=0),
                 f"symmetric ties scale={scale} bits={bits}")
            z = torch.arange(12, dtype=torch.int32).reshape(12, 1) - 3
            same(lq.quantize(xg, on_dev(s), on_dev(z), bits=bits, axis=0), lq.quantize(x, s, z, bits=bits, axis=0),
                 f"asymmetric ties scale={scale} bits={bits}")


def test_parameter_dtypes_match_cpu(gen):
    # Scales in any float dtype and zero points in any integer dtype, as the CPU accepts them.
    x = random_input((6, 70), torch.float32, gen)
    xg = on_dev(x)
    for axis, g in [(None, None), (0, None), (None, 32)]:
        s, z = lq.choose_qparams(x, bits=4, symmetric=False, axis=axis, group_size=g)
        for sdt in DTYPES:
            for zdt in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
                ss, zz = s.to(sdt), z.clamp(0, 127).to(zdt)
                q = lq.quantize(x, ss, zz, bits=4, axis=axis, group_size=g)
                qg = lq.quantize(xg, on_dev(ss), on_dev(zz), bits=4, axis=axis, group_size=g)
                what = f"scale {sdt}, zero_point {zdt}, axis={axis}, group_size={g}"
                same(qg, q, "quantize " + what)
                same(lq.dequantize(qg, on_dev(ss), on_dev(zz), axis=axis, group_size=g, dtype=torch.bfloat16),
                     lq.dequantize(q, ss, zz, axis=axis, group_size=g, dtype=torch.bfloat16), "dequantize " + what)
            same(lq.quantize(xg, on_dev(s.to(sdt)), None, bits=8, axis=axis, group_size=g),
                 lq.quantize(x, s.to(sdt), None, bits=8, axis=axis, group_size=g), f"symmetric, scale {sdt}")


# ---------------------------------------------------------------------------------------------
# pack / unpack: bit-identical to the CPU

PACK_SHAPES = [(1,), (3,), (8,), (9,), (4, 7), (2, 3, 33), (5, 64), (1, 257), (0,), (0, 6), (3, 0), (2, 1, 1),
               (3, 50, 70), (1, 100003), (257, 4104)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", PACK_SHAPES, ids=str)
def test_pack_unpack_match_cpu(bits, shape, gen):
    q = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.uint8)
    qg = on_dev(q)
    p = lq.pack(q, bits)
    pg = lq.pack(qg, bits)
    what = f"bits={bits} shape={list(shape)}"
    same(pg, p, "pack " + what)
    same(lq.unpack(pg, bits, shape[-1]), q, "unpack(pack) " + what)
    # Other integer dtypes holding in-range values pack the same.
    for dt in (torch.int8, torch.int16, torch.int32, torch.int64):
        if dt == torch.int8 and bits == 8:
            continue  # 128..255 do not fit
        same(lq.pack(qg.to(dt), bits), p, f"pack from {dt} " + what)
    # Arbitrary bytes, padding bits included, unpack the same.
    junk = torch.randint(0, 256, p.shape, generator=gen, dtype=torch.uint8)
    same(lq.unpack(on_dev(junk), bits, shape[-1]), lq.unpack(junk, bits, shape[-1]), "unpack of random bytes " + what)


PACK_FLAT = 30 * 41 + 1
PACK_VIEWS = {
    "offset1": lambda f: f[1:].view(30, 41),
    "transposed": lambda f: f[:-1].view(30, 41).t(),
    "step3": lambda f: f[:-1].view(30, 41)[:, ::3],
    "rows2_cols1": lambda f: f[:-1].view(30, 41)[::2, 1:],
    "permuted_3d": lambda f: f[1:].view(5, 6, 41).permute(1, 2, 0),
}


@pytest.mark.parametrize("view", list(PACK_VIEWS))
def test_pack_unpack_non_contiguous_and_offset_match_cpu(view, gen):
    for bits in range(1, 9):
        flat = torch.randint(0, 2**bits, (PACK_FLAT,), generator=gen, dtype=torch.uint8)
        q, qg = PACK_VIEWS[view](flat), PACK_VIEWS[view](on_dev(flat))
        p, pg = lq.pack(q, bits), lq.pack(qg, bits)
        same(pg, p, f"pack of a {view} view, bits={bits}")
        same(lq.unpack(pg, bits, q.shape[-1]), q.contiguous(), f"unpack, {view}, bits={bits}")
        # Packed input as a view: row slices with a stride longer than the row, and an offset.
        raw = torch.randint(0, 256, (PACK_FLAT,), generator=gen, dtype=torch.uint8)
        for pview in (lambda f: f[:-1].view(30, 41)[:, 1:], lambda f: f[1:].view(30, 41),
                      lambda f: f[:-1].view(30, 41).t()):
            pv, pvg = pview(raw), pview(on_dev(raw))
            size = pv.shape[-1] * 8 // bits
            same(lq.unpack(pvg, bits, size), lq.unpack(pv, bits, size), f"unpack of a packed view, bits={bits}")


# ---------------------------------------------------------------------------------------------
# errors: the CPU's ValueErrors, word for word

X48 = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


def _qw48(d):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    qw = lq.quantize_weight(w, 4, 32)
    return on_dev(qw.qweight, d), on_dev(qw.scales, d), on_dev(torch.randn(2, 64), d)


def _scale_with(bad, d):
    s = torch.ones(4, 1)
    s[2] = bad
    return s.to(d)


BAD_CALLS = {
    "choose_qparams_bits9": lambda d: lq.choose_qparams(X48.to(d), bits=9),
    "choose_qparams_bits1": lambda d: lq.choose_qparams(X48.to(d), bits=1),
    "quantize_bits0": lambda d: lq.quantize(X48.to(d), torch.tensor(1.0, device=d), bits=0),
    "choose_qparams_float64": lambda d: lq.choose_qparams(X48.to(d).double()),
    "choose_qparams_int32": lambda d: lq.choose_qparams(X48.to(d).to(torch.int32)),
    "quantize_uint8_input": lambda d: lq.quantize(X48.to(d).to(torch.uint8), torch.tensor(1.0, device=d)),
    "dequantize_float_q": lambda d: lq.dequantize(X48.to(d), torch.tensor(1.0, device=d)),
    "dequantize_float64_out": lambda d: lq.dequantize(X48.to(d).to(torch.int8), torch.tensor(1.0, device=d),
                                                      dtype=torch.float64),
    "choose_qparams_axis2": lambda d: lq.choose_qparams(X48.to(d), axis=2),
    "quantize_axis_minus3": lambda d: lq.quantize(X48.to(d), torch.ones(4, 1, device=d), axis=-3),
    "axis_and_group_size": lambda d: lq.choose_qparams(X48.to(d), axis=0, group_size=4),
    "group_size0": lambda d: lq.choose_qparams(X48.to(d), group_size=0),
    "group_size_on_0dim": lambda d: lq.choose_qparams(torch.tensor(1.0, device=d), group_size=4),
    "scale_numel_axis": lambda d: lq.quantize(X48.to(d), torch.ones(8, device=d), axis=0),
    "scale_numel_group": lambda d: lq.quantize(X48.to(d), torch.ones(4, 2, device=d), group_size=3),
    "dequantize_scale_numel": lambda d: lq.dequantize(X48.to(d).to(torch.int8), torch.ones(2, device=d)),
    "zero_point_numel": lambda d: lq.quantize(X48.to(d), torch.ones(4, 1, device=d),
                                              torch.zeros(3, dtype=torch.int32, device=d), axis=0),
    "zero_point_float": lambda d: lq.quantize(X48.to(d), torch.ones(4, 1, device=d), torch.zeros(4, 1, device=d),
                                              axis=0),
    "scale_zero": lambda d: lq.quantize(X48.to(d), _scale_with(0.0, d), axis=0),
    "scale_negative": lambda d: lq.quantize(X48.to(d), _scale_with(-1.0, d), axis=0),
    "scale_nan": lambda d: lq.quantize(X48.to(d), _scale_with(float("nan"), d), axis=0),
    "dequantize_scale_inf": lambda d: lq.dequantize(X48.to(d).to(torch.int8), _scale_with(float("inf"), d), axis=0),
    "scale_int32": lambda d: lq.quantize(X48.to(d), torch.ones((), dtype=torch.int32, device=d)),
    "scale_overflow": lambda d: lq.choose_qparams(torch.tensor([-3e38, 3e38], device=d), symmetric=False),
    "pack_bits0": lambda d: lq.pack(torch.zeros(4, dtype=torch.uint8, device=d), 0),
    "pack_bits9": lambda d: lq.pack(torch.zeros(4, dtype=torch.uint8, device=d), 9),
    "unpack_bits9": lambda d: lq.unpack(torch.zeros(4, dtype=torch.uint8, device=d), 9, 4),
    "pack_float": lambda d: lq.pack(torch.zeros(4, device=d), 4),
    "pack_0dim": lambda d: lq.pack(torch.tensor(3, dtype=torch.uint8, device=d), 4),
    "unpack_int8": lambda d: lq.unpack(torch.zeros(4, dtype=torch.int8, device=d), 4, 8),
    "unpack_size": lambda d: lq.unpack(torch.zeros(2, 3, dtype=torch.uint8, device=d), 4, 8),
    "linear_K": lambda d: lq.linear(torch.randn(2, 60, device=d), *_qw48(d)[:2], None, None, 4, 32),
    "linear_bits3": lambda d: lq.linear(_qw48(d)[2], *_qw48(d)[:2], None, None, 3, 32),
    "linear_scales_shape": lambda d: lq.linear(_qw48(d)[2], *_qw48(d)[:2], None, None, 4, 16),
    "linear_group33": lambda d: lq.linear(_qw48(d)[2], *_qw48(d)[:2], None, None, 4, 33),
    "linear_qweight_int8": lambda d: lq.linear(_qw48(d)[2], _qw48(d)[0].to(torch.int8), _qw48(d)[1], None, None,
                                               4, 32),
    "linear_8bit_uint8_symmetric": lambda d: lq.linear(_qw48(d)[2], torch.zeros(8, 64, dtype=torch.uint8, device=d),
                                                       torch.ones(8, 1, device=d), None, None, 8, None),
    "linear_x_float64": lambda d: lq.linear(_qw48(d)[2].double(), *_qw48(d)[:2], None, None, 4, 32),
    "linear_zeros_shape": lambda d: lq.linear(_qw48(d)[2], *_qw48(d)[:2], torch.zeros(8, 3, dtype=torch.int32, device=d),
                                              None, 4, 32),
    "linear_bias_size": lambda d: lq.linear(_qw48(d)[2], *_qw48(d)[:2], None, torch.zeros(7, device=d), 4, 32),
    "linear_0dim_x": lambda d: lq.linear(torch.tensor(1.0, device=d), *_qw48(d)[:2], None, None, 4, 32),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_arguments_raise_the_cpu_errors(name):
    same_error(BAD_CALLS[name], expect="^linquant")


NAN_CASES = [((5,), (3,)), ((3, 300), (1, 257)), ((1, 100003), (0, 100002)), ((257, 4096), (200, 4000))]


@pytest.mark.parametrize("shape,index", NAN_CASES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_nan_or_inf_input_raises_like_cpu(shape, index, bad, dtype, gen):
    x = torch.randn(shape, generator=gen).to(dtype)
    x[index] = bad
    for kw in ({}, {"axis": 0}, {"axis": -1}, {"group_size": 32}):
        for symmetric in (True, False):
            same_error(lambda d: lq.choose_qparams(x.to(d), bits=4, symmetric=symmetric, **kw),
                       expect="x contains NaN or Inf")
    same_error(lambda d: lq.quantize(x.to(d), torch.tensor(0.1, device=d)), expect="x contains NaN or Inf")
    s = torch.full(lq._ops.param_shape(list(shape), None, 32), 0.1)
    z = torch.zeros(s.shape, dtype=torch.int32)
    same_error(lambda d: lq.quantize(x.to(d), s.to(d), z.to(d), bits=4, group_size=32), expect="x contains NaN or Inf")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")], ids=["zero", "negative", "nan", "inf"])
def test_bad_scale_values_raise_like_cpu(bad, gen):
    # CUDA's quantize checks the scales in its kernel (one read-back with the NaN check): every
    # group's scale is seen, the scale error comes before the input's, and an empty input (no
    # kernel) is still checked.
    x = torch.randn(6, 300, generator=gen)
    s = torch.full((6, 10), 0.1)
    s[5, 9] = bad  # the last group: 12 elements
    z = torch.zeros(s.shape, dtype=torch.int32)
    expect = "scale must hold finite positive values"
    same_error(lambda d: lq.quantize(x.to(d), s.to(d), group_size=32), expect=expect)
    same_error(lambda d: lq.quantize(x.to(d), s.to(d), z.to(d), bits=4, group_size=32), expect=expect)
    x_nan = x.clone()
    x_nan[0, 0] = float("nan")
    same_error(lambda d: lq.quantize(x_nan.to(d), s.to(d), group_size=32), expect=expect)
    per_channel = torch.ones(6, 1)
    per_channel[3] = bad
    same_error(lambda d: lq.quantize(x.to(d), per_channel.to(d), axis=0), expect=expect)
    same_error(lambda d: lq.quantize(torch.empty(6, 0, device=d), per_channel.to(d), axis=0), expect=expect)
    good = torch.full((6, 10), 0.1)  # and the next call, with good scales, is not failed by the last one's flag
    assert torch.equal(lq.quantize(x.to(DEV), good.to(DEV), group_size=32).cpu(), lq.quantize(x, good, group_size=32))


def _pack_bad(shape, dtype, bad, bits):
    def call(d):
        q = torch.zeros(shape, dtype=dtype)
        for idx, v in bad:
            q[idx] = v
        return lq.pack(q.to(d), bits)
    return call


PACK_BAD = {
    # name: (call, the message the CPU gives: it names the first bad index in row-major order)
    "uint8": (_pack_bad((3, 10), torch.uint8, [((1, 7), 16), ((2, 2), 99)], 4), "q[[1, 7]] = 16 is out of range for 4-bit"),
    "int32": (_pack_bad((3, 10), torch.int32, [((1, 7), 16), ((2, 2), 99)], 4), "q[[1, 7]] = 16 is out of range for 4-bit"),
    "negative_int8": (_pack_bad((4,), torch.int8, [((2,), -1)], 2), "q[[2]] = -1 is out of range for 2-bit"),
    "int64_huge": (_pack_bad((2, 9), torch.int64, [((1, 2), 2**40)], 8), f"q[[1, 2]] = {2**40} is out of range for 8-bit"),
    "bits1": (_pack_bad((5,), torch.uint8, [((4,), 2)], 1), "q[[4]] = 2 is out of range for 1-bit"),
    "3d_last": (_pack_bad((2, 3, 33), torch.uint8, [((1, 2, 32), 8)], 3), "q[[1, 2, 32]] = 8 is out of range for 3-bit"),
    # Bad values in several blocks of a large tensor: the first one is named, not whichever a
    # thread found first.
    "large_uint8": (_pack_bad((300, 1000), torch.uint8, [((299, 0), 200), ((250, 999), 4), ((251, 3), 7)], 2),
                    "q[[250, 999]] = 4 is out of range for 2-bit"),
    "large_int16": (_pack_bad((300, 1000), torch.int16, [((299, 0), -5), ((250, 999), 300)], 5),
                    "q[[250, 999]] = 300 is out of range for 5-bit"),
}


@pytest.mark.parametrize("name", list(PACK_BAD))
def test_pack_out_of_range_names_the_first_bad_index(name):
    call, message = PACK_BAD[name]
    same_error(call, expect=re.escape(message))


def test_mixed_devices_raise_value_error():
    x = torch.randn(4, 8, device=DEV)
    q = x.to(torch.int8)
    s, z = torch.ones((), device=DEV), torch.zeros((), dtype=torch.int32, device=DEV)

    def raises(message):
        return pytest.raises(ValueError, match=re.escape(message))

    with raises("linquant: scale is on cpu but the input is on cuda"):
        lq.quantize(x, torch.ones(()))
    with raises("linquant: zero_point is on cpu but the input is on cuda"):
        lq.quantize(x, s, torch.zeros((), dtype=torch.int32))
    with raises("linquant: scale is on cpu but the input is on cuda"):
        lq.dequantize(q, torch.ones(()))
    with raises("linquant: zero_point is on cpu but the input is on cuda"):
        lq.dequantize(q.to(torch.uint8), s, torch.zeros((), dtype=torch.int32))
    # The other way round (CPU input, CUDA parameters) the dispatcher picks the CUDA kernel,
    # which must refuse the CPU input with a ValueError naming both devices (not crash).
    for call in (lambda: lq.quantize(x.cpu(), s), lambda: lq.quantize(x.cpu(), s, z),
                 lambda: lq.dequantize(q.cpu(), s), lambda: lq.dequantize(q.cpu().to(torch.uint8), s, z)):
        with pytest.raises(ValueError) as err:
            call()
        assert "cpu" in str(err.value) and "cuda" in str(err.value).lower(), str(err.value)

    qw = lq.quantize_weight(torch.randn(8, 64), 4, 32, symmetric=False)
    w = {"qweight": qw.qweight, "scales": qw.scales, "zeros": qw.zeros, "bias": torch.zeros(8)}
    xg = torch.randn(3, 64, device=DEV)
    for name in w:
        args = {k: (v if k == name else v.to(DEV)) for k, v in w.items()}
        with raises(f"linquant: {name} is on cpu but x is on cuda"):
            lq.linear(xg, args["qweight"], args["scales"], args["zeros"], args["bias"], 4, 32)
    with pytest.raises(ValueError) as err:
        lq.linear(xg.cpu(), *(on_dev(v) for v in w.values()), 4, 32)
    assert "cpu" in str(err.value) and "cuda" in str(err.value).lower(), str(err.value)
    torch.cuda.synchronize()  # nothing was left broken on the device


# ---------------------------------------------------------------------------------------------
# linear: against the float64 reference and the CPU kernel, on every CUDA path

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
GEMV_ROWS = 8  # the most rows the fused CUDA-core GEMV takes: fp32 weights, fp32 accumulation (no weight rounding)
# The tensor-core kernels and the GEMM dequantize the weights to the activation dtype before the MMA (fp32
# accumulation). Per operand that costs a relative error of at most the unit roundoff of the
# dtype it is rounded to: 2**-11 for fp16, 2**-8 for bf16; we allow MMA_EPS = eps (twice that) per
# operand and 2 * MMA_EPS per product. fp32 activations may go through TF32, which keeps 10
# explicit mantissa bits: the hardware may truncate both x and the weight to them, each off by up
# to 2**-10, so a product is off by up to ~2 * 2**-10 (a bf16 MMA for fp32 activations would need
# 2**-7 here instead). The tensor cores' fp32 accumulation (which may truncate, so its error can
# grow like K rather than sqrt(K)) is covered by that term too: K * 2**-24 < 2 * 2**-10 for K <= 4104.
MMA_EPS = {torch.float32: 2.0**-10, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
MS = (1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 64, 65, 256, 300)
ODD_GROUP = {8: 3, 4: 6, 2: 4}


def groups_for(bits):
    return (None, 32, 64, 128, 256, ODD_GROUP[bits])


class RefWeight:
    """float64 [N, K] weight of a quantized weight (reference.ref_weight) for any scales: the
    costly part, unpacking q - z, is done once, then multiplied by the scales given (exact in
    float64, as in ref_weight)."""

    def __init__(self, qweight, zeros, bits, group_size, k):
        n = qweight.shape[0]
        groups = 1 if group_size is None else -(-k // group_size)
        self.unit = ref_weight(qweight, torch.ones(n, groups, dtype=torch.float64), zeros, bits, group_size, k)
        self.g = k if group_size is None else group_size
        self.n, self.k = n, k

    def __call__(self, scales):
        s = scales.double().reshape(self.n, -1).repeat_interleave(self.g, dim=1)[:, : self.k]
        return s * self.unit


def ref_for(qw):
    return RefWeight(qw.qweight, qw.zeros, qw.bits, qw.group_size, qw.in_features)


def takes_gemv(m, dtype):
    """Whether CUDA linear surely gives m rows of `dtype` activations to the GEMV: up to the
    threshold in force, and while the GEMV is on, fp32 activations (no tensor-core kernel takes
    them) up to GEMV_ROWS. (It also takes fp16 / bf16 layouts the tensor-core kernels reject;
    those are checked against the looser bound of the other paths.)"""
    gemv_max_m = torch.ops.linquant._cuda_linear_dispatch()[0]
    return m <= gemv_max_m or (gemv_max_m > 0 and dtype == torch.float32 and m <= GEMV_ROWS)


def check_linear(x, qweight, scales, zeros, bias, bits, group_size, w64, gpu_args=None, what=""):
    """linear on CUDA (on copies of the CPU arguments, or on `gpu_args`) against the float64
    reference `w64` and against the CPU kernel, with the error bound of the path the thresholds in
    force choose. Returns the CUDA result."""
    if gpu_args is None:
        gpu_args = tuple(on_dev(t) for t in (x, qweight, scales, zeros, bias))
    y = lq.linear(*gpu_args, bits, group_size)
    n, k = qweight.shape[0], x.shape[-1]
    m = math.prod(x.shape[:-1])
    gemv = takes_gemv(m, x.dtype)
    what = (f"{what} M={m} N={n} K={k} bits={bits} group_size={group_size} symmetric={zeros is None} "
            f"x {x.dtype} scales {scales.dtype} bias={bias is not None} "
            f"path={'GEMV' if gemv else 'GEMM'}")
    assert y.device == gpu_args[0].device, what
    assert y.dtype == x.dtype and tuple(y.shape) == tuple(x.shape[:-1]) + (n,), (y.dtype, y.shape, what)
    y_cpu = lq.linear(x, qweight, scales, zeros, bias, bits, group_size)
    x64 = x.double().reshape(m, k)
    b64 = bias.double() if bias is not None else torch.zeros(n, dtype=torch.float64)
    ref = x64 @ w64.T + b64
    mag = x64.abs() @ w64.abs().T
    fi = torch.finfo(x.dtype)
    # As in test_linear.py: fp32 accumulation over K terms, then rounding to the output dtype (of
    # the sum, and of the sum before the bias in case the epilogue rounds twice), plus half a
    # subnormal step of the output dtype.
    cpu_bound = mag * ((k**0.5 + 4) * 2.0**-23) + (ref.abs() + b64.abs()) * EPS[x.dtype] + fi.smallest_normal * EPS[x.dtype]
    bound = cpu_bound
    if not gemv:
        # The weights (and for fp32 the activations) rounded for the MMA; a weight that lands in
        # the fp16 subnormals is off by up to half a subnormal step.
        bound = cpu_bound + mag * (2 * MMA_EPS[x.dtype]) + x64.abs().sum(1, keepdim=True) * (fi.smallest_normal * MMA_EPS[x.dtype])
    yg = y.cpu().double().reshape(m, n)
    err = (yg - ref).abs()
    if not bool((err <= bound).all()):
        ratio = err / bound
        i = int(ratio.argmax())
        r, c = divmod(i, n) if n else (0, 0)
        raise AssertionError(f"CUDA linear vs float64 reference: error {float(err[r, c]):.3e} at [{r}, {c}] is "
                             f"{float(ratio.max()):.2f}x the bound {float(bound[r, c]):.3e} (ref {float(ref[r, c]):.6e}); "
                             f"{what}. The GEMV path (no weight rounding) is expected for M <= "
                             f"{torch.ops.linquant._cuda_linear_dispatch()[0]}, and while it is on, for fp32 up to M = {GEMV_ROWS}.")
    diff = (yg - y_cpu.double().reshape(m, n)).abs()
    # With bf16 activations the CPU may run its AVX512-BF16 kernel, whose fp32 sums carry an offset,
    # or from BF16_GEMM_MIN_ROWS rows its bf16 GEMM (weights rounded to bf16).
    if x.dtype == torch.bfloat16:
        cpu_bound = cpu_bound + (x64.abs() @ dot_kernel_weight(qweight, scales, zeros, bits, group_size, k).T) * (
            (k**0.5 + 4) * 2.0**-23)
        if m >= BF16_GEMM_MIN_ROWS:
            cpu_bound = cpu_bound + mag * (2 * 2.0**-8)
    both = bound + cpu_bound
    if not bool((diff <= both).all()):
        raise AssertionError(f"CUDA linear vs CPU linear: {float((diff / both).max()):.2f}x the bound; {what}")
    return y


SMALL_SHAPES = [(1, 1), (3, 7), (5, 100), (64, 255), (33, 1024), (1, 520)]


@pytest.mark.parametrize("n,k", SMALL_SHAPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_linear_matches_reference_and_cpu(n, k, bits, symmetric, gen):
    w = torch.randn(n, k, generator=gen) * 0.05 + 0.01
    bias = torch.randn(n, generator=gen)
    for gi, g in enumerate(groups_for(bits)):
        qw = lq.quantize_weight(w, bits, g, symmetric)
        rw = ref_for(qw)
        xs = torch.randn(max(MS), k, generator=gen)
        for mi, m in enumerate(MS):
            dtype = DTYPES[(gi + mi) % 3]  # every (group, M) gets one dtype; every M sees each dtype
            scales = qw.scales.to(dtype)
            b = bias.to(dtype) if mi % 2 else None
            check_linear(xs[:m].to(dtype), qw.qweight, scales, qw.zeros, b, bits, g, rw(scales))


# (gemv_max_m, tc_max_m, mma_max_m, hopper_max_m) that send every batch size a path can take to
# that path (the Hopper GEMM has tests of its own, below).
FORCED_PATHS = {"gemv": (GEMV_ROWS, 0, 0, 0), "tc": (0, 64, 0, 0), "mma": (0, 0, 1 << 30, 0),
                "dense": (0, 0, 0, 0)}


@pytest.mark.parametrize("path", list(FORCED_PATHS))
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_linear_each_path_forced_matches_reference_and_cpu(path, bits, gen):
    # Every path over the batch sizes it can be given (lq.cuda_linear_dispatch), not only those
    # the default thresholds send it: the thresholds are tuning, any setting must stay correct.
    # fp32 activations take the dense path when a tensor-core kernel is asked for.
    n, k = 72, 1024
    w = torch.randn(n, k, generator=gen) * 0.05 + 0.01
    bias = torch.randn(n, generator=gen)
    ms = {"gemv": (1, 3, 8), "tc": (1, 3, 8, 9, 16, 17, 33, 64)}.get(path, (1, 5, 8, 9, 40, 300))
    for gi, g in enumerate((None, 32, 128)):
        for symmetric in (True, False):
            qw = lq.quantize_weight(w, bits, g, symmetric)
            rw = ref_for(qw)
            xs = torch.randn(max(ms), k, generator=gen)
            for mi, m in enumerate(ms):
                dtype = DTYPES[(gi + mi + symmetric) % 3]
                scales = qw.scales.to(dtype)
                with lq.cuda_linear_dispatch(*FORCED_PATHS[path]):
                    check_linear(xs[:m].to(dtype), qw.qweight, scales, qw.zeros, bias.to(dtype) if mi % 2 else None,
                                 bits, g, rw(scales), what=f"forced {path} path")


@pytest.mark.parametrize("path", list(FORCED_PATHS))
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 128), (2, 32)], ids=str)
def test_linear_forced_activations_near_floats_limit_stay_finite(path, bits, group_size, gen):
    # |x| ~ 3e36 (bf16 and fp32): x @ W_hat.T is ~1e37, but the kernels' (q - z) x sums before the
    # scale overflow; the outputs that come out inf or NaN are computed again in the kernel.
    w = torch.randn(40, 1024, generator=gen) * 0.01
    for symmetric in (True, False):
        qw = lq.quantize_weight(w, bits, group_size, symmetric)
        for dtype in (torch.float32, torch.bfloat16):
            scales = qw.scales.to(dtype)
            for m in (1, 4, 13):
                x = (torch.randn(m, 1024, generator=gen).sign() * 3e36).to(dtype)
                with lq.cuda_linear_dispatch(*FORCED_PATHS[path]):
                    y = check_linear(x, qw.qweight, scales, qw.zeros, None, bits, group_size, ref_for(qw)(scales),
                                     what=f"forced {path} path, |x| ~ 3e36")
                assert bool(torch.isfinite(y).all())


@pytest.mark.parametrize("path", list(FORCED_PATHS))
@pytest.mark.parametrize("bits,largest", [(2, 40000.0), (4, 60000.0)], ids=str)
def test_linear_forced_fp16_weights_near_the_fp16_limit_with_k_inside_a_chunk(path, bits, largest, gen):
    # The row's zero padding past K dequantizes to s (0 - z), past fp16's range for symmetric
    # weights this large; the fused tensor-core kernel multiplied that -inf by the zero activations
    # there (NaN in every output of the row) until it set the padding to 0.
    for k in (29, 30, 31, 95, 1023):
        w = (torch.rand(24, k, generator=gen) * 2 - 1) * largest
        w[:, 0] = largest
        for g in (None, 32):
            qw = lq.quantize_weight(w, bits, g, True, dtype=torch.float16)
            for m in {"gemv": (1, 8)}.get(path, (1, 9, 16, 40)):
                x = (torch.randn(m, k, generator=gen) * 1e-4).half()
                with lq.cuda_linear_dispatch(*FORCED_PATHS[path]):
                    y = check_linear(x, qw.qweight, qw.scales, qw.zeros, None, bits, g, ref_for(qw)(qw.scales),
                                     what=f"forced {path} path, max|w| {largest}, K {k}")
                assert bool(torch.isfinite(y).all())


def has_hopper_gemm():
    return (torch.cuda.is_available() and built_with_cuda()
            and torch.ops.linquant._cuda_has_hopper_gemm(0))


hopper_only = pytest.mark.skipif(not has_hopper_gemm(), reason="needs the Hopper GEMM: a build with CUTLASS "
                                 "(sm_90 among the archs) and a compute capability 9.0 GPU")
HOPPER = (0, 0, 0, 1 << 30)  # every M to the Hopper GEMM, where it takes the layout


def ran_hopper_gemm(fn):
    """fn()'s result, and whether the Hopper GEMM ran on the GPU during it: a kernel of CUTLASS's
    mixed-input mainloop (cuBLAS's own kernels on Hopper are CUTLASS kernels too, named otherwise).
    None under compute-sanitizer (scripts/gpu_check.sh sets LINQUANT_TESTS_NO_PROFILER), whose
    instrumentation and the profiler's do not mix."""
    if os.environ.get("LINQUANT_TESTS_NO_PROFILER"):
        return fn(), None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, any("MixedInput" in e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@hopper_only
@pytest.mark.parametrize("n,k", [(8, 64), (200, 320), (1032, 1088)], ids=str)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_linear_hopper_gemm_matches_reference_and_cpu(n, k, bits, symmetric, gen):
    # CUTLASS's mixed-input GEMM on every layout it takes: K a multiple of 128 / bits, N of 8, per
    # channel or groups of whole 64-value K tiles, a last group cut short (K = 320 in groups of
    # 128, 1088 in groups of 256); M from 1 to past two 128-row tiles; fp16 / bf16 activations,
    # scales in fp32 or the activation dtype, with and without bias. A profile checks that the
    # GEMM ran, so a layout silently left to dequantize + cuBLAS fails.
    w = torch.randn(n, k, generator=gen) * 0.05 + 0.01
    bias = torch.randn(n, generator=gen)
    for gi, g in enumerate((None, 64, 128, 256)):
        if g is not None and g > k:
            continue
        qw = lq.quantize_weight(w, bits, g, symmetric)
        rw = ref_for(qw)
        xs = torch.randn(300, k, generator=gen)
        for mi, m in enumerate((1, 7, 65, 129, 300)):
            dtype = (torch.float16, torch.bfloat16)[(gi + mi) % 2]
            scales = qw.scales.to(dtype if mi % 3 else torch.float32)
            b = bias.to(dtype) if mi % 2 else None
            with lq.cuda_linear_dispatch(*HOPPER):
                _, ran = ran_hopper_gemm(lambda: check_linear(xs[:m].to(dtype), qw.qweight, scales, qw.zeros, b, bits, g,
                                                          rw(scales), what="forced Hopper GEMM"))
            assert ran is not False, f"the Hopper GEMM did not run: M={m} N={n} K={k} bits={bits} group={g} {dtype}"


@hopper_only
def test_linear_hopper_gemm_leaves_other_layouts_to_cublas(gen):
    # Layouts TMA or CUTLASS's groups cannot take go to dequantize + cuBLAS, still correct.
    # With fp16, K = 80 (not whole 64-value tiles) too; with bf16 the GEMM takes it.
    cases = {"x offset by one element": (64, 256, 4, 128, True), "K = 200 at 4 bits": (64, 200, 4, None, False),
             "groups of 32": (64, 256, 4, 32, False), "N = 60": (60, 256, 8, 128, False),
             "K = 80 with fp16": (64, 80, 8, None, False)}
    for what, (n, k, bits, g, offset_x) in cases.items():
        w = torch.randn(n, k, generator=gen) * 0.05
        qw = lq.quantize_weight(w, bits, g, symmetric=False)
        x = torch.randn(70, k, generator=gen).half()
        gpu_args = None
        if offset_x:
            flat = on_dev(torch.cat([torch.zeros(1, dtype=x.dtype), x.flatten()]))
            gpu_args = (flat[1:].view(70, k), on_dev(qw.qweight), on_dev(qw.scales), on_dev(qw.zeros), None)
        with lq.cuda_linear_dispatch(*HOPPER):
            _, ran = ran_hopper_gemm(lambda: check_linear(x, qw.qweight, qw.scales, qw.zeros, None, bits, g, ref_for(qw)(qw.scales),
                                                      gpu_args=gpu_args, what=what))
        assert ran is not True, f"the Hopper GEMM ran for {what}"
    with lq.cuda_linear_dispatch(*HOPPER):
        _, ran = ran_hopper_gemm(lambda: check_linear(x.bfloat16(), qw.qweight, qw.scales, qw.zeros, None, bits, g,
                                                      ref_for(qw)(qw.scales), what="K = 80 with bf16"))
    assert ran is not False, "the Hopper GEMM did not run for K = 80 with bf16"


LARGE_SHAPES = {(96, 4096): (None, 128), (4096, 96): (None, 32), (256, 4104): (None, 128)}
LARGE_MS = (1, 3, 8, 9, 64, 300)


@pytest.mark.parametrize("n,k", list(LARGE_SHAPES), ids=str)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_linear_large_shapes_match_reference_and_cpu(n, k, bits, symmetric, gen):
    # K = 4104 at 4 bits packs into 2052-byte rows, at 2 bits 1026: row starts off 16-byte alignment.
    w = torch.randn(n, k, generator=gen) * 0.05 + 0.01
    bias = torch.randn(n, generator=gen)
    groups = LARGE_SHAPES[(n, k)] + ((ODD_GROUP[bits],) if bits == 8 else ())
    for gi, g in enumerate(groups):
        qw = lq.quantize_weight(w, bits, g, symmetric)
        rw = ref_for(qw)
        xs = torch.randn(max(LARGE_MS), k, generator=gen)
        for mi, m in enumerate(LARGE_MS):
            dtype = DTYPES[(gi + mi) % 3]
            scales = qw.scales.to(dtype)
            check_linear(xs[:m].to(dtype), qw.qweight, scales, qw.zeros, bias.to(dtype) if mi % 2 else None,
                         bits, g, rw(scales))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_linear_leading_dims_bias_and_non_contiguous_x(dtype, bits, gen):
    k = 96
    w = torch.randn(24, k, generator=gen).to(dtype)
    qw = lq.quantize_weight(w, bits, 32, symmetric=bits != 4)
    rw = ref_for(qw)(qw.scales)
    bias = torch.randn(24, generator=gen).to(dtype)
    for lead in [(), (1,), (2, 3), (4, 1, 2), (3, 5, 1), (2, 3, 7), (5, 13)]:
        x = torch.randn(*lead, k, generator=gen).to(dtype)
        for b in (bias, None):
            check_linear(x, qw.qweight, qw.scales, qw.zeros, b, bits, 32, rw, what=f"lead={lead}")
    for m in (3, 8, 20, 70):
        base = torch.randn(k, m, generator=gen).to(dtype)
        wide = torch.randn(m, 2 * k + 1, generator=gen).to(dtype)
        flat = torch.randn(m * k + 1, generator=gen).to(dtype)
        views = {"transposed": (lambda t: t.t(), base), "step2": (lambda t: t[:, 1::2], wide),
                 "offset1": (lambda t: t[1:].view(m, k), flat),
                 "3d_permuted": (lambda t: t[:-1].view(k, 1, m).permute(2, 1, 0), flat)}
        for name, (view, src) in views.items():
            x, xg = view(src), view(on_dev(src))
            assert xg.stride() == x.stride() and xg.storage_offset() == x.storage_offset()
            gpu_args = (xg, on_dev(qw.qweight), on_dev(qw.scales), on_dev(qw.zeros), on_dev(bias))
            check_linear(x, qw.qweight, qw.scales, qw.zeros, bias, bits, 32, rw, gpu_args=gpu_args, what=name)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_linear_misaligned_qweight_and_parameters(bits, symmetric, gen):
    # Rows of 128 / 256 / 512 bytes (2 / 4 / 8 bits): with a 16-byte aligned base every row start is aligned (the fast
    # path); a storage offset of 1, 2, 4 or 8 bytes misaligns all of them (the fallback); 16 is
    # aligned again but nonzero. Scales, zeros, bias and x get misaligned storage offsets too.
    n, k = 48, 512
    w = torch.randn(n, k, generator=gen) * 0.05
    for g in (None, 64):
        qw = lq.quantize_weight(w, bits, g, symmetric, dtype=torch.float16)
        rw = ref_for(qw)(qw.scales)
        bias = torch.randn(n, generator=gen).half()
        for offset in (0, 1, 2, 4, 8, 16):
            qg = offset_copy(qw.qweight, offset)
            for m in (1, 4, 8, 9, 64):
                x = torch.randn(m, k, generator=gen).half()
                p_off = offset % 3  # parameters: offsets 0, 1 and 2 elements
                gpu_args = (offset_copy(x, 1 if offset else 0), qg, offset_copy(qw.scales, p_off),
                            None if qw.zeros is None else offset_copy(qw.zeros, p_off), offset_copy(bias, p_off))
                check_linear(x, qw.qweight, qw.scales, qw.zeros, bias, bits, g, rw, gpu_args=gpu_args,
                             what=f"qweight offset {offset} bytes")


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_linear_large_zero_points(bits, gen):
    # Weights far from zero relative to their range: zero points in the thousands, so q - z does
    # not fit the activation dtype's integers (fp16 holds integers exactly only up to 2048).
    w = 1.0 + torch.randn(64, 256, generator=gen) * {8: 1e-2, 4: 1e-3, 2: 1e-4}[bits]
    bias = torch.randn(64, generator=gen)
    for g in (None, 32):
        qw = lq.quantize_weight(w, bits, g, symmetric=False)
        assert int(qw.zeros.abs().max()) > 1000
        rw = ref_for(qw)
        for dtype in DTYPES:
            scales = qw.scales.to(dtype)
            for m in (4, 64):
                check_linear(torch.randn(m, 256, generator=gen).to(dtype), qw.qweight, scales, qw.zeros,
                             bias.to(dtype), bits, g, rw(scales))


def test_linear_parameter_dtypes(gen):
    # Scales, zeros and bias in dtypes other than x's, as the CPU kernel accepts them.
    k = 160
    w = torch.randn(40, k, generator=gen) * 0.05
    for bits in (8, 4, 2):
        qw = lq.quantize_weight(w, bits, 32, symmetric=False)
        rw = ref_for(qw)
        for xdt, sdt, zdt, bdt in [(torch.float16, torch.float32, torch.int64, torch.float32),
                                   (torch.bfloat16, torch.float32, torch.int16, torch.float16),
                                   (torch.float32, torch.bfloat16, torch.int32, torch.bfloat16),
                                   (torch.float32, torch.float16, torch.int64, torch.float16)]:
            scales, zeros = qw.scales.to(sdt), qw.zeros.to(zdt)
            bias = torch.randn(40, generator=gen).to(bdt)
            for m in (2, 33):
                check_linear(torch.randn(m, k, generator=gen).to(xdt), qw.qweight, scales, zeros, bias, bits, 32,
                             rw(scales))


def test_linear_empty_inputs():
    qw = lq.quantize_weight(torch.randn(20, 64), 4, 32)
    bias = torch.randn(20)
    for shape in [(0, 64), (2, 0, 64), (0, 3, 64)]:
        for b in (None, bias):
            x = torch.randn(shape)
            y = lq.linear(on_dev(x), on_dev(qw.qweight), on_dev(qw.scales), None, on_dev(b), 4, 32)
            same(y, lq.linear(x, qw.qweight, qw.scales, None, b, 4, 32), f"empty M, x {list(shape)}")
    # N = 0: an empty weight.
    x = torch.randn(3, 16)
    q0, s0 = torch.zeros(0, 8, dtype=torch.uint8), torch.ones(0, 2)
    same(lq.linear(on_dev(x), on_dev(q0), on_dev(s0), None, None, 4, 8), lq.linear(x, q0, s0, None, None, 4, 8), "N=0")
    # K = 0 (per-channel and grouped): y is the bias, or zeros.
    for group_size in (None, 32):
        qk = lq.quantize_weight(torch.randn(5, 0), 4, group_size)
        for b in (None, torch.randn(5)):
            x = torch.randn(3, 0)
            same(lq.linear(on_dev(x), on_dev(qk.qweight), on_dev(qk.scales), None, on_dev(b), 4, group_size),
                 lq.linear(x, qk.qweight, qk.scales, None, b, 4, group_size), f"K=0, group {group_size}")


# ---------------------------------------------------------------------------------------------
# opcheck on CUDA

# The CPU suite's samples plus a long per-tensor row (many reduction pieces on the GPU).
OPCHECK_SAMPLES = CPU_OPCHECK_SAMPLES + [((1, 100003), 3, False, None, None, torch.float16)]


@pytest.mark.parametrize("shape,bits,symmetric,axis,group_size,dtype", OPCHECK_SAMPLES, ids=str)
def test_opcheck_quantize_family(shape, bits, symmetric, axis, group_size, dtype):
    opcheck_quantize_family(torch.randn(shape).to(dtype).to(DEV), bits, symmetric, axis, group_size, dtype)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_opcheck_pack_unpack(bits):
    q = torch.randint(0, 2**bits, (6, 37), dtype=torch.uint8).to(DEV)
    torch.library.opcheck(torch.ops.linquant.pack.default, (q, bits))
    torch.library.opcheck(torch.ops.linquant.unpack.default, (lq.pack(q, bits), bits, 37))


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (8, 64, False), (4, 32, True),
                                                       (4, 128, False), (2, 64, False), (2, None, True)], ids=str)
def test_opcheck_linear(bits, group_size, symmetric):
    qw = lq.quantize_weight(torch.randn(16, 128), bits, group_size, symmetric)
    for x in (torch.randn(3, 128), torch.randn(2, 2, 128).half(), torch.randn(20, 128).bfloat16(),
              torch.randn(17, 128).half(), torch.randn(2, 128).bfloat16(), torch.randn(4, 128)):
        x = x.to(DEV).requires_grad_(x.shape[0] == 4)  # the last one checks the backward too
        args = (x, on_dev(qw.qweight), on_dev(qw.scales.to(x.dtype)), on_dev(qw.zeros),
                torch.randn(16).to(x.dtype).to(DEV).requires_grad_(x.requires_grad), bits, group_size)
        torch.library.opcheck(torch.ops.linquant.linear.default, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 32, False), (2, 64, True)], ids=str)
def test_linear_gradients_match_the_cpu(bits, group_size, symmetric, dtype):
    gen = torch.Generator().manual_seed(bits)
    qw = lq.quantize_weight(torch.randn(40, 96, generator=gen), bits, group_size, symmetric, dtype=dtype)
    x = torch.randn(3, 96, generator=gen).to(dtype)
    dy = torch.randn(3, 40, generator=gen).to(dtype)
    grads = {}
    for device in ("cpu", DEV):
        xd = x.clone().to(device).requires_grad_()  # x itself stays a plain tensor
        bias = torch.zeros(40, dtype=dtype, device=device, requires_grad=True)
        lq.linear(xd, *(on_dev(t, device) for t in (qw.qweight, qw.scales, qw.zeros)), bias, bits,
                  group_size).backward(dy.to(device))
        grads[str(device)] = (xd.grad.cpu().double(), bias.grad.cpu().double())
    # The same dequantized weight on both; the matmuls differ only in summation order.
    for cpu, gpu in zip(grads["cpu"], grads["cuda"]):
        assert torch.allclose(cpu, gpu, rtol=4 * MMA_EPS[dtype], atol=4 * MMA_EPS[dtype] * cpu.abs().max().item())


def test_linear_under_cuda_autocast_runs_in_fp16():
    # An fp32 quantized layer under CUDA autocast takes x in fp16, as nn.Linear does (and with it
    # the tensor-core kernels, which fp32 activations never reach); CPU autocast leaves it alone.
    gen = torch.Generator().manual_seed(5)
    qw = lq.quantize_weight(torch.randn(64, 256, generator=gen), 4, 128, symmetric=False)
    args = [on_dev(t) for t in (qw.qweight, qw.scales, qw.zeros)]
    x = torch.randn(4, 256, generator=gen).to(DEV)
    with torch.autocast("cuda"):
        y = lq.linear(x, *args, None, 4, 128)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert lq.linear(x, *args, None, 4, 128).dtype == torch.float16
    assert y.dtype == torch.float16
    assert torch.equal(y, lq.linear(x.half(), *args, None, 4, 128))


# ---------------------------------------------------------------------------------------------
# QLinear and quantize_weight on CUDA


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_quantize_weight_on_cuda_matches_cpu(bits, symmetric, dtype, gen):
    w = (torch.randn(48, 200, generator=gen) * 0.05).to(dtype)
    wg = on_dev(w)
    for g in (None, 32, 128, ODD_GROUP[bits]):
        qc = lq.quantize_weight(w, bits, g, symmetric)
        qg = lq.quantize_weight(wg, bits, g, symmetric)
        what = f"bits={bits} group_size={g} symmetric={symmetric} dtype={dtype}"
        same(qg.qweight, qc.qweight, "qweight " + what)
        same(qg.scales, qc.scales, "scales " + what)
        if symmetric:
            assert qg.zeros is None
        else:
            same(qg.zeros, qc.zeros, "zeros " + what)
        assert (qg.bits, qg.group_size, qg.in_features) == (qc.bits, qc.group_size, qc.in_features)
        for out in (None, torch.float32):
            same(lq.dequantize_weight(qg, out), lq.dequantize_weight(qc, out), "dequantize_weight " + what)


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (8, 32, False), (4, 128, True),
                                                       (4, 32, False), (2, 64, True), (2, None, False)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_qlinear_on_cuda_matches_cpu(bits, group_size, symmetric, dtype, gen):
    lin = nn.Linear(200, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 200, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(48, generator=gen))
    lin = lin.to(dtype)
    q = lq.QLinear.from_linear(lin, bits, group_size, symmetric)
    qc = copy.deepcopy(q).cuda() if bits == 8 else copy.deepcopy(q).to("cuda")
    for name, buf in q.named_buffers():
        moved = dict(qc.named_buffers())[name]
        same(moved, buf, f"buffer {name} after .cuda()")
    assert q.qweight.device.type == "cpu"  # the original stayed put
    # Quantizing on the GPU gives the same buffers bit for bit.
    qd = lq.QLinear.from_linear(copy.deepcopy(lin).to(DEV), bits, group_size, symmetric)
    for name, buf in q.named_buffers():
        same(dict(qd.named_buffers())[name], buf, f"buffer {name} of from_linear on CUDA")
    same(qc.dequantize(), q.dequantize(), "QLinear.dequantize")
    w64 = ref_weight(q.qweight, q.scales, q.zeros, bits, group_size, 200)
    for shape in [(1, 200), (4, 200), (3, 5, 200), (2, 40, 200)]:
        x = torch.randn(shape, generator=gen).to(dtype)
        xg = on_dev(x)
        y = check_linear(x, q.qweight, q.scales, q.zeros, q.bias, bits, group_size, w64,
                         gpu_args=(xg, qc.qweight, qc.scales, qc.zeros, qc.bias), what="QLinear")
        with torch.no_grad():
            yc, yq = qc(xg), q(x)
        torch.testing.assert_close(yc, y, msg="QLinear.forward on CUDA is torch.ops.linquant.linear")
        assert yc.device.type == "cuda" and yq.device.type == "cpu" and yc.dtype == yq.dtype == dtype


def test_qlinear_to_cuda_then_dtype(gen):
    q = lq.QLinear.from_linear(nn.Linear(64, 32), 4, 32, symmetric=False)
    h = copy.deepcopy(q).to("cuda", torch.float16)
    assert h.scales.dtype == torch.float16 and h.bias.dtype == torch.float16 and h.scales.is_cuda
    assert h.qweight.dtype == torch.uint8 and h.zeros.dtype == torch.int32 and h.qweight.is_cuda
    x = torch.randn(2, 64, generator=gen).half()
    w64 = ref_weight(h.qweight.cpu(), h.scales.cpu(), h.zeros.cpu(), 4, 32, 64)
    check_linear(x, h.qweight.cpu(), h.scales.cpu(), h.zeros.cpu(), h.bias.cpu(), 4, 32, w64,
                 gpu_args=(on_dev(x), h.qweight, h.scales, h.zeros, h.bias))
    assert h(on_dev(x)).dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# quantize_model on tiny Hugging Face models, on CUDA


def relative_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("make,bits,group_size,symmetric,dtype,tol", [
    (hf_models.llama, 4, 32, False, torch.float32, 1e-2),
    (hf_models.llama, 8, None, True, torch.float32, 1e-2),
    (hf_models.gpt2, 8, None, True, torch.float32, 1e-2),
    (hf_models.gpt2, 2, 32, False, torch.float32, 1e-2),
    (hf_models.llama, 4, 64, True, torch.bfloat16, 5e-2),
], ids=["llama-w4g32", "llama-w8", "gpt2-w8", "gpt2-w2g32", "llama-w4g64-bf16"])
def test_quantize_model_on_cuda_matches_cpu(make, bits, group_size, symmetric, dtype, tol, gen):
    pytest.importorskip("transformers")
    model = make().to(dtype)
    ids = torch.randint(3, 500, (2, 12), generator=gen)
    kw = dict(bits=bits, group_size=group_size, symmetric=symmetric)
    cpu_q = lq.quantize_model(copy.deepcopy(model), **kw)
    # Quantized on the GPU: the same state, bit for bit.
    gpu_direct = lq.quantize_model(copy.deepcopy(model).to(DEV), **kw)
    sd_cpu, sd_gpu = cpu_q.state_dict(), gpu_direct.state_dict()
    assert sd_cpu.keys() == sd_gpu.keys()
    for name, t in sd_cpu.items():
        same(sd_gpu[name], t, name)
    # Quantized on the CPU, then moved: logits close to the CPU's (M = 24 rows: the GEMM path).
    gpu_q = copy.deepcopy(cpu_q).to(DEV)
    assert all(m.qweight.is_cuda for m in gpu_q.modules() if isinstance(m, lq.QLinear))
    with torch.no_grad():
        ref = cpu_q(input_ids=ids).logits
        out = gpu_q(input_ids=on_dev(ids)).logits
        out_direct = gpu_direct(input_ids=on_dev(ids)).logits
    assert out.is_cuda and out.dtype == ref.dtype
    err = relative_error(out.cpu(), ref)
    assert err < tol, f"CUDA vs CPU logits: relative error {err:.2e}"
    assert relative_error(out_direct.cpu(), ref) < tol
    # Generation: the prompt through the GEMM path, each new token through the GEMV path (M = 2).
    with torch.no_grad():
        out_ids = gpu_q.generate(on_dev(ids[:, :5]), max_new_tokens=6, do_sample=False)
    assert out_ids.is_cuda and out_ids.shape[0] == 2 and out_ids.shape[1] >= 6


def test_load_quantized_model_onto_cuda(tmp_path, gen):
    pytest.importorskip("transformers")
    model = lq.quantize_model(hf_models.llama(), bits=4, group_size=32, symmetric=False)
    lq.save_quantized(model, str(tmp_path))
    loaded = lq.load_quantized(str(tmp_path), hf_models.llama, device=DEV)
    assert all(t.device.type == "cuda" for t in list(loaded.parameters()) + list(loaded.buffers()))
    ids = torch.randint(3, 500, (2, 12), generator=gen)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = loaded(input_ids=on_dev(ids)).logits
    assert relative_error(out.cpu(), ref) < 1e-2


# ---------------------------------------------------------------------------------------------
# torch.compile of QLinear on CUDA


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_qlinear_fullgraph_on_cuda(backend, gen):
    if backend == "inductor":
        pytest.importorskip("triton")
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96, bias=False), nn.Linear(96, 32))
    lq.quantize_model(model, bits=4, group_size=32, symmetric=False, exclude=())
    model = model.to(DEV)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 64, device=DEV))
    assert explanation.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for m in (1, 5, 17):
        x = on_dev(torch.randn(m, 64, generator=gen))
        with torch.no_grad():
            y, ref = compiled(x), model(x)
        assert y.is_cuda and y.shape == ref.shape
        if backend == "aot_eager":
            assert torch.equal(y, ref), m
        else:  # the linear ops run as the same extern kernels; only ReLU is generated
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# streams, devices, CUDA graphs

SLEEP_CYCLES = 20_000_000  # ~10 ms of GPU time: the inputs arrive on the side stream only after it


def op_cases(gen):
    """(name, fn, CPU inputs) for each op, with fn taking the inputs on one device."""
    x = torch.randn(64, 300, generator=gen) * 3 + 1
    s, z = lq.choose_qparams(x, 4, False, group_size=32)
    q = lq.quantize(x, s, z, 4, group_size=32)
    p = lq.pack(q, 4)
    qw = lq.quantize_weight(torch.randn(96, 300, generator=gen) * 0.05, 4, 32, symmetric=False, dtype=torch.float16)
    xs = torch.randn(64, 300, generator=gen).half()
    bias = torch.randn(96, generator=gen).half()
    ops = torch.ops.linquant

    def linear(x_, w_, s_, z_, b_):
        return ops.linear(x_, w_, s_, z_, b_, 4, 32)

    return [
        ("choose_qparams", lambda x_: ops.choose_qparams(x_, 4, False, None, 32), (x,)),
        ("choose_qparams_per_tensor", lambda x_: ops.choose_qparams(x_, 8, True, None, None), (x,)),
        ("quantize", lambda x_, s_, z_: ops.quantize(x_, s_, z_, 4, None, 32), (x, s, z)),
        ("dequantize", lambda q_, s_, z_: ops.dequantize(q_, s_, z_, None, 32, torch.float16), (q, s, z)),
        ("pack", lambda q_: ops.pack(q_, 4), (q,)),
        ("unpack", lambda p_: ops.unpack(p_, 4, 300), (p,)),
        ("linear_gemv", linear, (xs[:4], qw.qweight, qw.scales, qw.zeros, bias)),
        ("linear_gemm", linear, (xs, qw.qweight, qw.scales, qw.zeros, bias)),
    ]


def as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def test_ops_on_a_side_stream_wait_for_their_inputs(gen):
    for name, fn, inputs in op_cases(gen):
        ins = [on_dev(t) for t in inputs]
        expected = as_tuple(fn(*ins))
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # The inputs are written on the side stream after a delay: a kernel launched on any
            # other stream reads the zeros (or a check sees them) and the result differs.
            late = [torch.zeros_like(t) for t in ins]
            torch.cuda._sleep(SLEEP_CYCLES)
            for dst, src in zip(late, ins):
                dst.copy_(src)
            got = as_tuple(fn(*late))
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert torch.equal(g, e), f"{name} on a side stream differs from the default stream"


def test_ops_follow_the_tensor_device_cuda1(gen):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev1 = torch.device("cuda:1")
    for name, fn, inputs in op_cases(gen):
        expected = as_tuple(fn(*[on_dev(t, torch.device("cuda:0")) for t in inputs]))
        with torch.cuda.device(0):  # the current device is not the tensors' device
            got = as_tuple(fn(*[on_dev(t, dev1) for t in inputs]))
        torch.cuda.synchronize(dev1)
        for g, e in zip(got, expected):
            assert g.device == dev1, f"{name}: result on {g.device}"
            assert torch.equal(g.cpu(), e.cpu()), f"{name} on cuda:1 differs from cuda:0"
    # And mixing cuda:0 with cuda:1 is a ValueError naming both.
    x = torch.randn(4, 8, device="cuda:0")
    with pytest.raises(ValueError, match=re.escape("scale is on cuda:1 but the input is on cuda:0")):
        lq.quantize(x, torch.ones((), device=dev1))


def test_linear_split_k_repeats_exactly_across_calls_and_streams(gen):
    # Split-K launches share one ticket buffer per stream, which every launch must leave at zero:
    # calls of two shapes (GEMV and tensor-core splits over different tile counts), repeated and
    # moved to a side stream, give the bits of the first call each time.
    cases = []
    for n, k, m, dtype in ((64, 8192, 1, torch.float16), (256, 4096, 16, torch.bfloat16)):
        qw = lq.quantize_weight(torch.randn(n, k, generator=gen) * 0.05, 4, 128, False, dtype=dtype)
        w = (on_dev(qw.qweight), on_dev(qw.scales), on_dev(qw.zeros), None)
        cases.append((on_dev(torch.randn(m, k, generator=gen).to(dtype)), w))
    first = [lq.linear(x, *w, 4, 128) for x, w in cases]
    side = torch.cuda.Stream()
    for stream in (torch.cuda.current_stream(), side, torch.cuda.current_stream()):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                again = [lq.linear(x, *w, 4, 128) for x, w in cases]
        torch.cuda.current_stream().wait_stream(stream)
        for i, (a, b) in enumerate(zip(again, first)):
            assert torch.equal(a, b), f"split-K linear call {i} differs when repeated (stale tickets?)"


def capture(fn, what):
    """Warms fn up on a side stream, as torch.cuda.graphs' documentation asks, then captures it in a
    CUDA graph; returns the graph and fn's output (the static buffer each replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except Exception as e:  # noqa: BLE001 - reported with the hint below
        pytest.fail(f"CUDA-graph capture of {what} failed: {type(e).__name__}: {e}\nWhile capturing, the op must "
                    f"not synchronize with the host (.item(), .cpu(), cudaStreamSynchronize), call cudaMalloc "
                    f"directly, or launch on a stream other than the current one.", pytrace=False)
    return graph, out


GRAPH_CASES = [(4, 128, False, torch.float16, 1), (4, 128, False, torch.float16, 64), (8, None, True, torch.bfloat16, 17),
               (2, 64, True, torch.float32, 4), (2, 32, False, torch.bfloat16, 300)]


@pytest.mark.parametrize("bits,group_size,symmetric,dtype,m", GRAPH_CASES, ids=str)
def test_graph_capture_of_linear_replays(bits, group_size, symmetric, dtype, m, gen):
    k, n = 256, 192
    qw = lq.quantize_weight(torch.randn(n, k, generator=gen) * 0.05, bits, group_size, symmetric, dtype=dtype)
    w = (on_dev(qw.qweight), on_dev(qw.scales), on_dev(qw.zeros), on_dev(torch.randn(n, generator=gen).to(dtype)))

    def run(x):
        return lq.linear(x, *w, bits, group_size)

    x1 = on_dev(torch.randn(m, k, generator=gen).to(dtype))
    x2 = on_dev(torch.randn(m, k, generator=gen).to(dtype))
    eager1, eager2 = run(x1), run(x2)
    static_x = x1.clone()
    graph, static_y = capture(lambda: run(static_x), f"linquant.linear (M={m}, bits={bits}, {dtype})")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, eager1), (f"CUDA-graph replay of linear differs from eager (M={m}); the kernels are "
                                           f"expected to be deterministic")
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, eager2), f"CUDA-graph replay with new input in the static buffer is stale (M={m})"
    assert torch.equal(run(x1), eager1), "eager linear after graph capture differs"


@pytest.mark.parametrize("bits,group_size,symmetric,dtype", [(8, None, True, torch.float16), (4, 32, False, torch.bfloat16),
                                                             (2, 64, True, torch.float32)], ids=str)
def test_graph_capture_of_qembedding_lookup_replays(bits, group_size, symmetric, dtype, gen):
    # A decoding step captured whole (torch.compile's "reduce-overhead", HF's static cache) looks up
    # its token in a QEmbedding: dequantize must not read the scales' check back to the host then.
    table = torch.randn(50, 96, generator=gen).to(dtype)
    on_cpu = lq.QEmbedding.from_embedding(nn.Embedding.from_pretrained(table), bits, group_size, symmetric)
    layer = copy.deepcopy(on_cpu).to(DEV)
    ids1, ids2 = (torch.randint(0, 50, (2, 5), generator=gen) for _ in range(2))
    eager1, eager2 = layer(on_dev(ids1)), layer(on_dev(ids2))
    assert torch.equal(eager1.cpu(), on_cpu(ids1)), "a QEmbedding lookup on CUDA differs from the CPU's"
    static_ids = on_dev(ids1)
    graph, static_out = capture(lambda: layer(static_ids), f"a QEmbedding lookup ({bits} bits, {dtype})")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager1), "CUDA-graph replay of the QEmbedding lookup differs from eager"
    static_ids.copy_(ids2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager2), "CUDA-graph replay with new ids in the static buffer is stale"
    with pytest.raises(ValueError, match="scale must hold finite positive values"):  # eager calls still check
        lq.dequantize(on_dev(torch.ones(2, 4, dtype=torch.int8)), on_dev(torch.tensor([[1.0], [0.0]])), axis=0)


def test_eval_runs_on_the_gpu_as_on_the_cpu(tmp_path):
    # `linquant eval --device cuda`: both models on the GPU, inputs moved there, GPU time waited
    # for; the same report as on the CPU (the kernels sum in another order).
    import json
    import subprocess
    import sys
    hf_models.llama().save_pretrained(tmp_path / "llama")
    hf_models.word_tokenizer().save_pretrained(tmp_path / "llama")
    reports = {}
    for device in ("cpu", "cuda"):
        out = subprocess.run([sys.executable, "-m", "linquant", "eval", str(tmp_path / "llama"), "--bits", "4",
                              "--group-size", "32", "--asymmetric", "--device", device, "--json"],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        reports[device] = json.loads(out.stdout)
    for name, cpu in reports["cpu"]["models"].items():
        gpu = reports["cuda"]["models"][name]
        assert gpu["perplexity"] == pytest.approx(cpu["perplexity"], rel=1e-3), name
        assert gpu["bytes"] == cpu["bytes"] and gpu["decode_ms_per_token"] > 0, name
    for cpu, gpu in zip(reports["cpu"]["layers"], reports["cuda"]["layers"]):
        assert gpu["layer"] == cpu["layer"] and gpu["snr_db"] == pytest.approx(cpu["snr_db"], abs=1e-3)
