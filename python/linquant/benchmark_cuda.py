"""Weight-only quantized linear on a CUDA GPU (H100): torch.ops.linquant.linear against F.linear (cuBLAS)
with a dense weight of the same shape in the activation dtype (fp16 by default), ATen's tinygemm
(`torch._weight_int4pack_mm`, W4 rows) and `torch._weight_int8pack_mm` (W8 rows).

For each shape (N x K = out_features x in_features), batch M and format it prints one markdown row:
the median time of one call, the effective bandwidth (bytes of qweight + scales + zeros +
activations + output, each read or written once, per second), that as a % of a device-to-device
copy measured in the same run (copy bytes count read + written), the speed-up over each baseline
(baseline time / linquant time: > 1 means linquant is faster), the issue's target where one applies
(PASS/MISS), and the max relative error against F.linear on the dequantized weight, so a fast but
wrong kernel cannot look good.

Every timed op, baselines included, rotates over enough copies of its weight buffers to exceed
4x the L2 cache (50 MB on H100), so each call streams its weight from HBM as decoding does. Times
are CUDA-event times of single calls queued behind a spin kernel (the GPU never waits for Python
to launch the next call), after a warm-up; the median of the samples is the row's number.

    python bench/bench_linear_cuda.py                  # all shapes, fp16 activations
    python bench/bench_linear_cuda.py --quick --dtype bf16 --json out.json
    linquant bench-cuda --quick                        # the same through the command line
    python bench/bench_linear_cuda.py --paths --quick  # each CUDA path forced at each M: where the
                                                       # dispatch thresholds belong on this GPU
Exit status: 0 ok, 1 a linquant result was wrong (or linquant has no CUDA kernel), 2 no CUDA GPU.
"""

import argparse
import json
import math
import signal
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ._arguments import HelpWithDefaults, non_negative_int, positive_int, shape
from ._files import write_json

# name: (bits, group_size, symmetric). W2 uses group 128 like the CPU benchmark
# (python/linquant/benchmark.py); w2g64 is the alternative, run with --formats w2g64.
FORMATS = {
    "w8": (8, None, True),        # W8A16, symmetric per-channel
    "w4g128": (4, 128, False),    # W4A16, asymmetric, groups of 128
    "w2g128": (2, 128, False),    # W2A16, asymmetric, groups of 128
    "w2g64": (2, 64, False),      # W2A16, asymmetric, groups of 64
}
SHAPES = ["4096x4096", "8192x8192", "8192x28672", "28672x8192"]
BATCHES = [1, 4, 16, 32, 64, 256]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TARGET_SHAPE = (8192, 8192)   # the issue states its targets on this layer
# --paths: each CUDA path with the (gemv_max_m, tc_max_m, mma_max_m, hopper_max_m) for
# lq.cuda_linear_dispatch that forces it and the most activation rows it takes (None: any), and the
# batches swept. "hopper" runs where the build and GPU have it (_cuda_has_hopper_gemm).
PATHS = {"gemv": ((8, 0, 0, 0), 8), "tc": ((0, 64, 0, 0), 64), "mma": ((0, 0, 1 << 30, 0), None),
         "hopper": ((0, 0, 0, 1 << 30), None), "dense": ((0, 0, 0, 0), None)}
PATH_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
BATCH_PER_SLEEP = 50          # calls queued behind one spin kernel (stays well below the launch queue depth)
TIME_BUDGET_S = 0.3           # at most ~this much GPU time per timed op (slow ops get fewer samples)


# ---------------------------------------------------------------- pure helpers (run on the CPU too)

def target_speedup(fmt, n, k, m):
    """Speed-up over cuBLAS that the issue asks for at this row, or None where it sets none: on the
    8192x8192 layer, W8A16 >= 1.8x at M = 1; W4A16 g128 >= 3.0x up to M = 16, >= 1.5x at M = 64,
    >= 0.9x from M = 256; W2A16 >= 5x at M = 1."""
    if (n, k) != TARGET_SHAPE:
        return None
    bits = FORMATS[fmt][0]
    if bits == 8:
        return 1.8 if m == 1 else None
    if bits == 4:
        if m <= 16:
            return 3.0
        if m == 64:
            return 1.5
        return 0.9 if m >= 256 else None
    return 5.0 if m == 1 else None


def reference_linear(x, w_deq):
    """F.linear in fp32 on the dequantized weight: the exact math the kernel approximates."""
    return F.linear(x.float(), w_deq.float())


def max_rel_error(y, ref):
    """max |y - ref| / max |ref|, in float64. Relative to the output's scale, since an elementwise
    relative error is meaningless where ref crosses zero."""
    y, ref = y.double(), ref.double()
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def error_tolerance(dtype):
    """A few roundings of the output dtype; garbage or a lost group scores ~1."""
    return 4 * torch.finfo(dtype).eps


def tensor_bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def n_copies(bytes_per_copy, l2_bytes):
    """Copies to rotate over so that consecutive uses of one buffer are > 4x L2 apart."""
    return max(2, math.ceil(4 * l2_bytes / max(bytes_per_copy, 1)))


def fmt_ratio(v):
    return "-" if v is None else ("n/a" if v == "n/a" else f"{v:.2f}x")


def fmt_target(row):
    if row.get("target") is None:
        return "-"
    return f"≥{row['target']:.1f}x {'PASS' if row['target_met'] else 'MISS'}"


TABLE_HEADER = ("| N x K | M | format | act | time µs | TB/s | % copy bw | vs cuBLAS | vs tinygemm | vs int8mm "
                "| target | max rel err |\n"
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def table_row(r):
    head = f"| {r['N']}x{r['K']} | {r['M']} | {r['format']} | {r['act']} "
    if "error" in r:  # the kernel raised: say so in the time column
        return head + f"| error: {r['error'].replace('|', '/')} |" + " - |" * 7 + " WRONG |"
    err = f"{r['max_rel_err']:.1e}" + ("" if r["err_ok"] else " WRONG")
    return head + (f"| {r['time_us']:.1f} | {r['TBps']:.2f} | {r['pct_copy']:.0f}% | {fmt_ratio(r.get('vs_cublas'))} "
                   f"| {fmt_ratio(r.get('vs_tinygemm'))} | {fmt_ratio(r.get('vs_int8mm'))} | {fmt_target(r)} | {err} |")


def markdown_table(rows):
    return "\n".join([TABLE_HEADER] + [table_row(r) for r in rows])


def summary(rows):
    """Targets met and wrong results, as comment lines under the table."""
    targeted = [r for r in rows if r.get("target") is not None]
    lines = [f"# targets met: {sum(bool(r['target_met']) for r in targeted)}/{len(targeted)}"]
    lines += [f"#   MISS {r['N']}x{r['K']} M={r['M']} {r['format']}: {r['vs_cublas']:.2f}x < {r['target']}x"
              for r in targeted if not r["target_met"]]
    wrong = [r for r in rows if not r["err_ok"]]
    lines.append(f"# wrong or failed rows: {len(wrong)}")
    lines += [f"#   {r['N']}x{r['K']} M={r['M']} {r['format']}: "
              + (r["error"] if "error" in r else f"max rel err {r['max_rel_err']:.2e}") for r in wrong]
    return "\n".join(lines)


PATHS_HEADER = ("| N x K | format | act | M | cuBLAS µs | gemv µs | tc µs | mma µs | hopper µs | dense µs "
                "| fastest | default path |\n"
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def default_path(m, dispatch):
    """The path thresholds (gemv_max_m, tc_max_m, mma_max_m, hopper_max_m) give M (fp16 / bf16
    activations, a layout the kernels take, a GPU with the Hopper GEMM)."""
    return next((name for name, limit in zip(("gemv", "tc", "mma", "hopper"), dispatch) if m <= limit), "dense")


def paths_taking(m, skip=()):
    """(path, dispatch that forces it) for every path that can run M activation rows."""
    return [(path, forced) for path, (forced, most) in PATHS.items()
            if (most is None or m <= most) and path not in skip]


def fastest_path(r):
    """The path a --paths row timed fastest, or None when none ran."""
    return min(r["us"], key=r["us"].get) if r["us"] else None


def paths_row(r):
    cells = [f"{r['us'][p]:.1f}" if p in r["us"] else r.get("errors", {}).get(p, "-") for p in PATHS]
    return (f"| {r['N']}x{r['K']} | {r['format']} | {r['act']} | {r['M']} | {r['cublas_us']:.1f} | "
            + " | ".join(cells) + f" | {fastest_path(r) or '-'} | {r['default_path']} |")


def suggested_thresholds(rows):
    """Per (shape, format) of a --paths sweep: the fastest path at each M, and the dispatch
    thresholds (gemv_max_m, tc_max_m, mma_max_m, hopper_max_m) that give each M its fastest path,
    taken in dispatch order (GEMV, then tc, then mma, then hopper, then dense) for as long as the
    fastest paths follow that order; a path that never wins gets 0 (tc, hopper) or the previous
    threshold."""
    by_layer = {}
    for r in rows:
        if fastest_path(r):
            by_layer.setdefault((f"{r['N']}x{r['K']}", r["format"]), []).append((r["M"], fastest_path(r)))
    out = []
    for (layer, fmt), wins in by_layer.items():
        wins.sort()
        limits, i = {}, 0
        for path in ("gemv", "tc", "mma", "hopper"):
            while i < len(wins) and wins[i][1] == path:
                limits[path] = wins[i][0]
                i += 1
        gemv = limits.get("gemv", 0)
        tc = limits.get("tc", 0)
        mma = limits.get("mma", max(gemv, tc))
        hopper = limits.get("hopper", 0)
        out.append((layer, fmt, wins, (gemv, tc, mma, hopper), all(p == "dense" for _, p in wins[i:])))
    return out


def thresholds_summary(rows):
    lines = []
    for layer, fmt, wins, (gemv, tc, mma, hopper), ordered in suggested_thresholds(rows):
        lines.append(f"# {layer} {fmt}: fastest by M: " + ", ".join(f"{m} {p}" for m, p in wins))
        lines.append(f"#   -> gemv_max_m={gemv}, tc_max_m={tc}, mma_max_m={mma}, hopper_max_m={hopper}"
                     + ("" if ordered else " (the fastest paths do not follow the dispatch order past here)"))
    return "\n".join(lines)


# ---------------------------------------------------------------- timing

class GpuTimer:
    """Median CUDA-event time of one call. Each batch of calls is queued behind torch.cuda._sleep,
    so the GPU runs them back to back and an event pair measures the call, not Python's launch
    latency (a 4096x4096 W4 call takes a few µs, less than launching it from Python)."""

    def __init__(self, iters, warmup):
        self.iters, self.warmup = iters, warmup
        # Clock cycles per second of the spin kernel; the second, longer run sees boosted clocks.
        for cycles in (1_000_000, 50_000_000):
            s, e = self._events(2)
            s.record()
            torch.cuda._sleep(cycles)
            e.record()
            e.synchronize()
            self.cycles_per_s = cycles / (s.elapsed_time(e) * 1e-3)

    @staticmethod
    def _events(n):
        return [torch.cuda.Event(enable_timing=True) for _ in range(n)]

    def __call__(self, calls):
        """calls: zero-argument callables, one per weight copy, used in rotation."""
        for i in range(self.warmup):
            calls[i % len(calls)]()
        torch.cuda.synchronize()
        # One probe batch gives the GPU and the CPU (launch) time of a call.
        probe = max(len(calls), 10)
        s, e = self._events(2)
        t0 = time.perf_counter()
        s.record()
        for i in range(probe):
            calls[i % len(calls)]()
        e.record()
        cpu_s = (time.perf_counter() - t0) / probe
        e.synchronize()
        gpu_s = s.elapsed_time(e) * 1e-3 / probe
        iters = max(10, min(self.iters, int(TIME_BUDGET_S / max(gpu_s, 1e-6))))
        samples, i = [], 0
        while len(samples) < iters:
            batch = min(BATCH_PER_SLEEP, iters - len(samples))
            starts, ends = self._events(batch), self._events(batch)
            # Long enough to cover queuing the batch, with a margin (two events cost about one
            # more launch); a spin that ends early would put launch gaps into the samples.
            torch.cuda._sleep(int(self.cycles_per_s * (batch * (3 * cpu_s + 20e-6) + 2e-3)))
            for b in range(batch):
                starts[b].record()
                calls[i % len(calls)]()
                ends[b].record()
                i += 1
            torch.cuda.synchronize()
            samples += [a.elapsed_time(z) * 1e-3 for a, z in zip(starts, ends)]
        return statistics.median(samples)


def copy_bandwidth(timer, l2_bytes):
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
    n = max(1 << 30, 8 * l2_bytes)
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = timer([lambda: dst.copy_(src)])
    return 2 * n / t


# ---------------------------------------------------------------- operands and baselines

def to_cuda(qw):
    return qw._replace(qweight=qw.qweight.cuda(), scales=qw.scales.cuda(),
                       zeros=None if qw.zeros is None else qw.zeros.cuda())


def clone_qw(qw):
    return qw._replace(qweight=qw.qweight.clone(), scales=qw.scales.clone(),
                       zeros=None if qw.zeros is None else qw.zeros.clone())


def tinygemm_operands(qw):
    """tinygemm's operands for the same 4-bit values as qw (a CUDA QuantizedWeight).

    As PyTorch's own test (test_linalg.py, _int4_mm), gpt-fast and torchao build them on CUDA:
    _convert_weight_to_int4pack takes uint8 [N, K/2] with element 2j in the HIGH nibble of byte j
    (linquant stores it in the low nibble, so each byte's nibbles swap), inner_k_tiles = 8;
    scales_and_zeros is bf16 [K/g, N, 2] of (scale, zero), and tinygemm dequantizes
    (q - 8) * scale + zero, which is linquant's s * (q - z) with zero = s * (8 - z)."""
    p = qw.qweight
    wpack = torch._convert_weight_to_int4pack(((p & 15) << 4) | (p >> 4), 8)
    s = qw.scales.float()
    z = qw.zeros.float() if qw.zeros is not None else torch.full_like(s, 8.0)  # symmetric: stored offset by 8
    sz = torch.stack([s, s * (8 - z)], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return wpack, sz


def build_tinygemm(qw, group, x, w_deq, l2):
    """Rotating tinygemm operands and the max rel error of one call (bf16 activations)."""
    wp, sz = tinygemm_operands(qw)
    xb = x.bfloat16()
    err = max_rel_error(torch._weight_int4pack_mm(xb, wp, group, sz), reference_linear(xb, w_deq))
    return [(wp, sz)] + [(wp.clone(), sz.clone()) for _ in range(n_copies(tensor_bytes(wp, sz), l2) - 1)], err


def build_int8mm(qws, x, w_deq):
    """_weight_int8pack_mm reads linquant's symmetric 8-bit format as it is: int8 [N, K], scales [N]."""
    y = torch._weight_int8pack_mm(x, qws[0].qweight, qws[0].scales.view(-1))
    return qws, max_rel_error(y, reference_linear(x, w_deq))


def checked_baseline(name, tol, build, *build_args):
    """(operands, None) for a baseline that runs and is right, else (None, reason): a missing op, an
    op that fails, or one whose result is wrong (a call-convention mismatch) is 'n/a', not a number."""
    try:
        ops, err = build(*build_args)
    except Exception as e:  # noqa: BLE001 - any failure of an optional baseline is reported, not fatal
        return None, f"{name}: {one_line(e)}"
    if not err <= tol:
        return None, f"{name}: wrong result (max rel err {err:.2e} > {tol:.0e}), call convention mismatch?"
    return ops, None


def one_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


# ---------------------------------------------------------------- the benchmark

def time_row(lq, timer, x, qws, w_deq, fmt, n, k, cublas_s, tg, i8, copy_bw, act, notes):
    """One row: linquant's time, bandwidth, error, and the baselines' ratios."""
    bits, group, sym = FORMATS[fmt]
    m, q0 = x.shape[0], qws[0]
    row = {"N": n, "K": k, "M": m, "format": fmt, "bits": bits, "group_size": group, "symmetric": sym, "act": act}
    try:
        err = max_rel_error(lq.linear(x, q0.qweight, q0.scales, q0.zeros, None, bits, group),
                            reference_linear(x, w_deq))
        t = timer([lambda q=q: lq.linear(x, q.qweight, q.scales, q.zeros, None, bits, group) for q in qws])
    except Exception as e:  # noqa: BLE001 - a failing kernel is a failed row, and the others still run
        return {**row, "error": one_line(e), "err_ok": False, "target": None, "target_met": None}
    moved = tensor_bytes(q0.qweight, q0.scales, q0.zeros, x) + m * n * x.element_size()
    tol = error_tolerance(x.dtype)
    row.update(time_us=t * 1e6, bytes=moved, TBps=moved / t / 1e12, pct_copy=100 * moved / t / copy_bw,
               max_rel_err=err, err_ok=err <= tol, cublas_us=cublas_s * 1e6, vs_cublas=cublas_s / t)
    # The optional baselines: a ratio, or "n/a" with the reason in notes.
    optional = []
    if bits == 4:
        xb = x.bfloat16()  # tinygemm's only activation dtype on CUDA
        optional.append(("tinygemm", tg, [lambda p=p: torch._weight_int4pack_mm(xb, p[0], group, p[1]) for p in tg or []]))
    if bits == 8 and sym:
        optional.append(("int8mm", i8, [lambda q=q: torch._weight_int8pack_mm(x, q.qweight, q.scales.view(-1))
                                        for q in i8 or []]))
    for key, ops, calls in optional:
        row[f"vs_{key}"] = "n/a"
        if ops:
            try:
                t_b = timer(calls)
                row.update({f"{key}_us": t_b * 1e6, f"vs_{key}": t_b / t})
            except Exception as e:  # noqa: BLE001 - a baseline that fails here is n/a, not fatal
                notes.append(f"{n}x{k} {fmt} M={m}: {key}: {one_line(e)}")
    row["target"] = target_speedup(fmt, n, k, m)
    row["target_met"] = None if row["target"] is None else row["vs_cublas"] >= row["target"]
    return row


def shape_operands(timer, args, n, k, l2):
    """The fp32 master weight of an N x K layer (on the CPU), activations for each batch, and
    cuBLAS's time at each batch on a dense copy in the activation dtype."""
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(n * 100003 + k)
    master = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    dense = [master.to(dtype) for _ in range(n_copies(n * k * 2, l2))]
    # Quantized and dequantized on the CPU, whose kernels are the trusted reference: a bug in the CUDA
    # quantize kernels must not be able to shift what the CUDA linear is checked against.
    master_cpu = master.cpu()
    del master
    xs = {m: torch.randn(m, k, device="cuda", dtype=dtype, generator=gen) for m in args.batches}
    cublas = {m: timer([lambda w=w, x=xs[m]: F.linear(x, w) for w in dense]) for m in args.batches}
    del dense
    torch.cuda.empty_cache()
    return master_cpu, xs, cublas


def format_operands(lq, master_cpu, fmt, dtype, l2):
    """The master quantized in `fmt` on the GPU, rotating copies of it, and its fp32 dequantized
    weight (the reference)."""
    bits, group, sym = FORMATS[fmt]
    qw_cpu = lq.quantize_weight(master_cpu, bits, group, symmetric=sym, dtype=dtype)
    w_deq = lq.dequantize_weight(qw_cpu, torch.float32).cuda()
    qw0 = to_cuda(qw_cpu)
    qws = [qw0] + [clone_qw(qw0) for _ in range(n_copies(tensor_bytes(qw0.qweight, qw0.scales, qw0.zeros), l2) - 1)]
    return qw0, qws, w_deq


def run_shape(lq, timer, args, n, k, l2, copy_bw, notes):
    rows, dtype = [], DTYPES[args.dtype]
    master_cpu, xs, cublas = shape_operands(timer, args, n, k, l2)
    for fmt in args.formats:
        bits, group, sym = FORMATS[fmt]
        qw0, qws, w_deq = format_operands(lq, master_cpu, fmt, dtype, l2)
        # Baselines on the same quantized values, each checked once against the same reference.
        x0, tg, i8 = xs[args.batches[0]], None, None
        if bits == 4:
            tg, reason = checked_baseline("tinygemm", error_tolerance(torch.bfloat16),
                                          build_tinygemm, qw0, group, x0, w_deq, l2)
            notes += [f"{n}x{k} {fmt}: {reason}"] if reason else []
        if bits == 8 and sym:
            i8, reason = checked_baseline("_weight_int8pack_mm", error_tolerance(dtype),
                                          build_int8mm, qws, x0, w_deq)
            notes += [f"{n}x{k} {fmt}: {reason}"] if reason else []
        for m in args.batches:
            row = time_row(lq, timer, xs[m], qws, w_deq, fmt, n, k, cublas[m], tg, i8, copy_bw, args.dtype, notes)
            rows.append(row)
            print(table_row(row), flush=True)
        qws = qw0 = w_deq = tg = i8 = None  # free this format's buffers before the next one
        torch.cuda.empty_cache()
    return rows


def run_paths(lq, timer, args, n, k, l2):
    """--paths: every CUDA path of linquant.linear forced (lq.cuda_linear_dispatch) at each batch it
    can take, beside cuBLAS, each result checked like the main table's; a wrong path shows as
    WRONG instead of a time."""
    rows, dtype = [], DTYPES[args.dtype]
    dispatch = torch.ops.linquant._cuda_linear_dispatch()  # the thresholds in force
    skip = set(args.skip_path)
    if not torch.ops.linquant._cuda_has_hopper_gemm(torch.cuda.current_device()):
        skip.add("hopper")  # its cells show "-"
    master_cpu, xs, cublas = shape_operands(timer, args, n, k, l2)
    for fmt in args.formats:
        bits, group, _ = FORMATS[fmt]
        qw0, qws, w_deq = format_operands(lq, master_cpu, fmt, dtype, l2)
        for m in args.batches:
            x = xs[m]
            row = {"N": n, "K": k, "M": m, "format": fmt, "act": args.dtype, "cublas_us": cublas[m] * 1e6,
                   "us": {}, "errors": {}, "default_path": default_path(m, dispatch)}
            for path, forced in paths_taking(m, skip):
                with lq.cuda_linear_dispatch(*forced):
                    try:
                        err = max_rel_error(lq.linear(x, qw0.qweight, qw0.scales, qw0.zeros, None, bits, group),
                                            reference_linear(x, w_deq))
                        if not err <= error_tolerance(dtype):
                            row["errors"][path] = f"WRONG ({err:.1e})"
                            continue
                        row["us"][path] = 1e6 * timer([lambda q=q, x=x, b=bits, g=group: lq.linear(
                            x, q.qweight, q.scales, q.zeros, None, b, g) for q in qws])
                    except Exception as e:  # noqa: BLE001 - a failing path is reported in its cell
                        row["errors"][path] = f"error: {one_line(e)}".replace("|", "/")
            rows.append(row)
            print(paths_row(row), flush=True)
        qws = qw0 = w_deq = None
        torch.cuda.empty_cache()
    return rows


def probe_linquant(lq):
    """None if linquant.linear runs on CUDA, else why not."""
    try:
        qw = to_cuda(lq.quantize_weight(torch.randn(16, 256), 4, 128, symmetric=False, dtype=torch.float16))
        x = torch.randn(2, 256, device="cuda", dtype=torch.float16)
        lq.linear(x, qw.qweight, qw.scales, qw.zeros, None, 4, 128)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001
        return one_line(e)


def add_arguments(ap):
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="activation (and scale) dtype")
    ap.add_argument("--quick", action="store_true", help="only the 8192x8192 layer")
    ap.add_argument("--shapes", nargs="+", type=shape, default=SHAPES, help="N x K (out_features x in_features)")
    ap.add_argument("--batches", nargs="+", type=positive_int,
                    help=f"activation rows M (default {' '.join(map(str, BATCHES))}; with --paths "
                    f"{' '.join(map(str, PATH_BATCHES))})")
    ap.add_argument("--formats", nargs="+", default=["w8", "w4g128", "w2g128"], choices=list(FORMATS),
                    help="weight formats: bits and group size (g), e.g. w4g128")
    ap.add_argument("--iters", type=positive_int, default=200, help="timed calls per op (fewer for slow ops)")
    ap.add_argument("--warmup", type=non_negative_int, default=10, help="untimed calls first")
    ap.add_argument("--json", help="also write every row and the environment to this file")
    ap.add_argument("--paths", action="store_true", help="time each CUDA path (GEMV, tensor-core kernels, "
                    "Hopper GEMM, dequantize + cuBLAS) forced at each batch, to place the dispatch thresholds")
    ap.add_argument("--skip-path", action="append", default=[], choices=list(PATHS),
                    help="with --paths, leave this path out (repeatable); scripts/gpu_check.sh leaves out "
                    "the Hopper GEMM when its tests failed")
    ap.add_argument("--table", metavar="JSON", help="only print the markdown table of an earlier --json file "
                    "(needs no GPU)")


def render(path):
    """The README table from a --json file."""
    with open(path) as f:
        data = json.load(f)
    env = data["env"]
    print(f"{env['device']}, torch {env['torch']} (CUDA {env['cuda']}), activations {env['act']}, "
          f"device-to-device copy {env['copy_TBps']:.2f} TB/s (bytes read + written)\n")
    if "paths" in data:  # a --paths run
        print("\n".join([PATHS_HEADER] + [paths_row(r) for r in data["paths"]]))
        print("\n" + thresholds_summary(data["paths"]))
        return 0
    print(markdown_table(data["rows"]))
    print(summary(data["rows"]))
    return 0


def run(args) -> int:
    """The benchmark for parsed arguments (see add_arguments); the exit status."""
    if args.quick:
        args.shapes = ["8192x8192"]
    if args.batches is None:
        args.batches = PATH_BATCHES if args.paths else BATCHES
    if args.table:
        return render(args.table)
    if not torch.cuda.is_available():
        print("the CUDA benchmark needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    import linquant as lq
    reason = probe_linquant(lq)
    if reason:
        print(f"linquant.linear does not run on CUDA in this build: {reason}", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 0) or 50 << 20
    timer = GpuTimer(args.iters, args.warmup)
    copy_bw = copy_bandwidth(timer, l2)
    env = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "l2_bytes": l2, "copy_TBps": copy_bw / 1e12, "copy_bytes": "read + written", "act": args.dtype,
           "iters": args.iters, "library": lq.library_path()}
    print(f"# {env['device']}, torch {env['torch']} (CUDA {env['cuda']}), L2 {l2 >> 20} MiB, "
          f"device-to-device copy {env['copy_TBps']:.2f} TB/s (bytes read + written)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # `timeout`: leave through the finally blocks
    if args.paths:
        return run_paths_table(lq, timer, args, l2, env)
    print(f"# activations {args.dtype}; 'vs X' = X's time / linquant's time (> 1: linquant faster); tinygemm "
          f"runs with bf16 activations (its only CUDA dtype); max rel err = max|y - ref| / max|ref| against "
          f"fp32 F.linear on the dequantized weight\n")
    print(TABLE_HEADER, flush=True)
    rows, notes, done = [], [], False  # on SIGTERM the finally below still writes the rows so far
    try:
        for shape in args.shapes:
            n, k = (int(v) for v in shape.split("x"))
            rows += run_shape(lq, timer, args, n, k, l2, copy_bw, notes)
        done = True
    finally:  # a crash (or a CUDA error) part-way still leaves the rows measured so far
        for note in dict.fromkeys(notes):  # in order, without repeats
            print(f"# n/a: {note}")
        print(summary(rows), flush=True)
        if args.json:
            write_json(args.json, {"env": env, "rows": rows, "notes": list(dict.fromkeys(notes)), "complete": done})
    return 0 if all(r["err_ok"] for r in rows) else 1


def run_paths_table(lq, timer, args, l2, env) -> int:
    gemv_max_m, tc_max_m, mma_max_m, hopper_max_m = torch.ops.linquant._cuda_linear_dispatch()
    print(f"# activations {args.dtype}; each path forced with lq.cuda_linear_dispatch; times are medians; "
          f"thresholds in force: gemv for M <= {gemv_max_m}, tc for M <= {tc_max_m}, mma for M <= {mma_max_m}, "
          f"hopper for M <= {hopper_max_m}\n")
    print(PATHS_HEADER, flush=True)
    rows, done = [], False
    try:
        for shape in args.shapes:
            n, k = (int(v) for v in shape.split("x"))
            rows += run_paths(lq, timer, args, n, k, l2)
        done = True
    finally:
        if args.json:
            write_json(args.json, {"env": env, "paths": rows, "complete": done})
    print("\n" + thresholds_summary(rows))
    return 1 if any(r["errors"] for r in rows) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=HelpWithDefaults)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
