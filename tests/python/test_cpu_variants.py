"""Each CPU instruction-set variant (chosen at run time; LINQUANT_CPU_ISA narrows the choice)
gives the reference's bits. Every variant runs in its own process, since the choice is made once."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SCRIPT = """
import torch, linquant as lq
from reference import linear_bound, ref_qparams, ref_quantize, ref_dequantize, ref_weight, ref_stored_values
from test_pack import ref_pack as lq_ref_pack
g = torch.Generator().manual_seed(SEED)
# linear(x) + b within the float64 reference's bound, ref being qw's float64 weight.
def check(x, b, qw, ref, bits, gs):
    y = lq.linear(x, qw.qweight, qw.scales, qw.zeros, b, bits, gs).double()
    want = x.double() @ ref.T + b.double()
    bound = linear_bound(x.double(), ref, qw.qweight, qw.scales, qw.zeros, bits, gs, x.dtype, want)
    assert bool(((y - want).abs() <= bound).all()), (bits, gs, list(ref.shape), qw.scales.dtype, x.dtype, x.shape[0])
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    x = (torch.randn(9, 203, generator=g) * 3 + 1).to(dtype)
    for bits in (2, 4, 8):
        for sym in (True, False):
            for axis, gs in ((None, None), (0, None), (1, None), (None, 64)):
                s, z = lq.choose_qparams(x, bits, sym, axis, gs)
                rs, rz = ref_qparams(x, bits, sym, axis, gs)
                assert torch.equal(s, rs) and (sym or torch.equal(z, rz))
                q = lq.quantize(x, s, z, bits, axis, gs)
                assert torch.equal(q, ref_quantize(x, rs, rz, bits, axis, gs))
                for od in (torch.float32, torch.float16, torch.bfloat16):
                    assert torch.equal(lq.dequantize(q, s, z, axis, gs, od), ref_dequantize(q, rs, rz, axis, gs, od))
for bits in range(1, 9):
    v = torch.randint(0, 2 ** bits, (5, 203), generator=g, dtype=torch.uint8)
    p = lq.pack(v, bits)
    assert torch.equal(p, lq_ref_pack(v, bits)) and torch.equal(lq.unpack(p, bits, 203), v)
for bits in (8, 4, 2):
    for sym in (True, False):
        for gs in (None, 8, 16, 32):
            # N = 13 and 7: the one-row tiles past the last whole tile; K = 37: a short last group
            # and, below 8 bits, a partly filled last byte. A bias, which every kernel adds itself.
            # Groups of 8 values below 8 bits end inside AVX2's 8-byte loads; AVX2 takes 2-bit
            # groups of 16 two per load.
            for n, k in ((13, 100), (7, 37)):
                w = torch.randn(n, k, generator=g)
                bias = torch.randn(n, generator=g) * 10
                # Scales stored in each dtype: the kernels are compiled per scale dtype.
                for scale_dtype in (torch.float32, torch.float16, torch.bfloat16):
                    qw = lq.quantize_weight(w, bits, gs, sym, dtype=scale_dtype)
                    ref = ref_weight(qw.qweight, qw.scales, qw.zeros, bits, gs, k)
                    # 3 rows: the plain C++ kernel's widest, and AVX2's 2-weight-row tiles; 6 and 40:
                    # the fp32 GEMM over dequantized weights from 4 (plain C++), 8-56 (AVX2, grouped)
                    # or 6-64 (AVX-512's own GEMM) rows on, by layout (gemm_min_rows). fp16
                    # activations take the fp32 kernels; bf16 ones the AVX512-BF16 kernels where the
                    # variant and the CPU have them (the dot kernel, the bf16 GEMM from 12-24 rows),
                    # the fp32 ones elsewhere.
                    for m in (1, 3, 6, 40):
                        x = torch.randn(m, k, generator=g)
                        check(x, bias, qw, ref, bits, gs)
                        check(x.half(), bias, qw, ref, bits, gs)
                    for m in (3, 70):
                        check(torch.randn(m, k, generator=g).bfloat16(), bias.bfloat16(), qw, ref, bits, gs)
# Zero points on both sides of 2^30, where q - z stops being taken in int32 lanes (and at the
# int32 limits): the same bits as the difference taken exactly, rounded once to fp32.
LIMITS = (-(2**31), -(2**30) - 1, -(2**30), 2**30, 2**30 + 1, 2**31 - 1)
for z in LIMITS:
    for q in (torch.arange(256).to(torch.uint8), torch.arange(-128, 128).to(torch.int8)):
        want = torch.tensor(0.3) * (q.double() - z).float()
        assert torch.equal(lq.dequantize(q, torch.tensor(0.3), torch.tensor(z, dtype=torch.int32)), want), z
for bits in (8, 4, 2):
    qw = lq.quantize_weight(torch.randn(12, 67, generator=g), bits, 16, symmetric=False)
    zeros = torch.tensor(LIMITS, dtype=torch.int32).repeat(12 * 5)[: qw.zeros.numel()].reshape(qw.zeros.shape)
    scales = torch.rand(qw.scales.shape, generator=g) * 2.0**-30
    q = ref_stored_values(qw.qweight, bits, 67)
    s = scales.repeat_interleave(16, dim=1)[:, :67]
    w = (s * (q.double() - zeros.repeat_interleave(16, dim=1)[:, :67]).float()).double()
    for m in (1, 6, 40):
        x = torch.randn(m, 67, generator=g)
        y = lq.linear(x, qw.qweight, scales, zeros, None, bits, 16).double()
        assert bool(((y - x.double() @ w.T).abs() <= x.double().abs() @ w.abs().T * 2.0**-20).all()), (bits, m)
print("ok", torch.ops.linquant._cpu_isa())
"""
ISAS = ["baseline", "avx2", "avx512"]  # in order: each narrows the next


def run_python(code, isa=None, timeout=60):
    env = dict(os.environ, PYTHONPATH=str(HERE))
    env.pop("LINQUANT_CPU_ISA", None)
    if isa is not None:
        env["LINQUANT_CPU_ISA"] = isa
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def best_isa():
    out = run_python("import linquant, torch; print(torch.ops.linquant._cpu_isa())")
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


@pytest.mark.parametrize("isa", ISAS)
def test_isa_variant_matches_reference(isa, best_isa, gen):
    out = run_python(SCRIPT.replace("SEED", str(gen.initial_seed())), isa, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # The variant asked for ran (the CPU's best where it asked for more): without this, an override
    # that was ignored would test the best variant three times.
    ran = ISAS[min(ISAS.index(isa), ISAS.index(best_isa))]
    assert out.stdout.split() == ["ok", ran]


def test_misspelt_isa_is_an_error():
    out = run_python("import torch, linquant as lq; lq.quantize(torch.ones(3), torch.tensor(1.0), None, 8)", "avx-512")
    assert out.returncode != 0 and "LINQUANT_CPU_ISA must be baseline, avx2 or avx512 (or unset), got 'avx-512'" in out.stderr


@pytest.mark.parametrize("module", ["test_linear.py", "test_experts.py"])
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_narrower_kernels_pass_the_linear_tests(isa, module, best_isa):
    """The plain C++ kernels (other architectures' only ones) and the AVX2 kernels (word streams and
    byte streams), with ATen's GEMM path after them, through the linear ops' whole test modules: on
    a CPU with AVX-512 the other tests run the AVX-512 kernels only. reference.py's bound follows
    the variant that runs (linear_bound)."""
    if ISAS.index(best_isa) < ISAS.index(isa):
        pytest.skip(f"the CPU has no {isa}")
    env = dict(os.environ, LINQUANT_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(HERE / module)],
                         env=env, cwd=HERE, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
