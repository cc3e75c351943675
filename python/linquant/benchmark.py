"""Weight-only quantized linear on the CPU: linquant against fp32 / bf16 F.linear, ATen's int8 and
int4 weight-only kernels, and optimum-quanto / torchao / bitsandbytes when they import, all
measured in this run.

Weights are rotated among enough fresh copies to exceed twice the last-level cache, so every call
streams its weight from DRAM, as batch-1 decoding does. For each shape (N = out_features,
K = in_features), batch M, activation dtype and weight format it prints the time, the effective
bandwidth (weight + scale bytes / time), that as a % of the measured DRAM read bandwidth, and the
speed-up over each baseline (baseline time / linquant time; > 1 means linquant is faster).

    python bench/bench_linear.py                       # the README's table (or: linquant bench)
    python bench/bench_linear.py --shapes 4096x4096 --batches 1 --formats w4g128 --json out.json
Peers install in the benchmark's own environment:
    python3 -m venv --system-site-packages .venv-bench && .venv-bench/bin/pip install torchao optimum-quanto \
        bitsandbytes
    .venv-bench/bin/python bench/bench_linear.py
"""

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import linquant as lq
from ._arguments import HelpWithDefaults, positive_int, shape as shape_argument
from ._files import write_json

FORMATS = {  # name: (bits, group_size)
    "w8": (8, None),
    "w4g128": (4, 128),
    "w2g128": (2, 128),
}


def llc_bytes():
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 32 << 20


def read_bandwidth():
    """DRAM read bandwidth: a parallel sum over 1 GiB of fp32, best of 5."""
    big = torch.ones(256 << 20)
    big.sum()
    return big.numel() * 4 / min(_time_once(lambda: big.sum()) for _ in range(5))


def _time_once(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_rotating(make_call, copies, repeat, budget_s=1.0):
    """Median time of one call, each call on the next weight copy; at most ~budget_s per timing
    (slow baselines get fewer samples, never fewer than 3)."""
    calls = [make_call(c) for c in copies]
    first = min(_time_once(c) for c in calls)
    samples = []
    for r in range(max(3, min(repeat, int(budget_s / max(first, 1e-6))))):
        samples.append(_time_once(calls[r % len(calls)]))
    return statistics.median(samples)


def n_copies(bytes_per_copy, llc):
    return max(2, -(-2 * llc // max(bytes_per_copy, 1)))


def peer_modules():
    peers = {}
    try:
        from optimum.quanto import qint4, qint8, quantize, freeze  # noqa: F401
        peers["quanto"] = "optimum-quanto"
    except Exception as e:  # noqa: BLE001 - report any import failure
        peers["quanto"] = f"unavailable ({type(e).__name__}: {str(e)[:80]})"
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_  # noqa: F401
        peers["torchao"] = "torchao"
    except Exception as e:  # noqa: BLE001
        peers["torchao"] = f"unavailable ({type(e).__name__}: {str(e)[:80]})"
    try:
        import bitsandbytes
        peers["bnb"] = f"bitsandbytes {bitsandbytes.__version__}"
    except Exception as e:  # noqa: BLE001
        peers["bnb"] = f"unavailable ({type(e).__name__}: {str(e)[:80]})"
    return peers


def quanto_linear(w, bits, group):
    from optimum.quanto import freeze, qint4, qint8, quantize
    # quanto replaces child modules, so the Linear goes inside a container.
    lin = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype))
    lin[0].weight.data.copy_(w)
    quantize(lin, weights=qint8 if bits == 8 else qint4)
    freeze(lin)
    return lin


def torchao_linear(w, bits, group):
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    lin = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype))
    lin[0].weight.data.copy_(w)
    quantize_(lin, Int8WeightOnlyConfig() if bits == 8 else Int4WeightOnlyConfig(group_size=group))
    return lin


def bnb_linear(w, bits, group):
    """bitsandbytes' 4-bit layer (NF4, blocks of `group` weights: its own format), on the CPU."""
    import bitsandbytes as bnb
    if bits != 4:
        raise ValueError("only its 4-bit layer is compared (LLM.int8() quantizes activations too)")
    lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=w.dtype, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=group)
    return lin.to("cpu")


def aten_int4_pack(w, group):
    """torch._weight_int4pack_mm_for_cpu's operands (asymmetric, 4-bit, groups along K)."""
    n, k = w.shape
    wg = w.float().view(n, k // group, group)
    mn, mx = wg.amin(-1), wg.amax(-1)
    scale = ((mx - mn) / 15).clamp_min(1e-8)
    q = torch.round((wg - mn[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    zero = mn + scale * 8  # ATen's int4 dequant: (q - 8) * scale + zero
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def run(args):
    torch.manual_seed(0)
    llc = llc_bytes()
    bw = read_bandwidth()
    peers = peer_modules()
    env = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "llc_MiB": llc >> 20, "read_GBps": bw / 1e9, "peers": peers,
           "cpu_isa": os.environ.get("LINQUANT_CPU_ISA", "auto")}
    print(f"# {env['machine']}, {env['threads']} threads, torch {env['torch']}, LLC {env['llc_MiB']} MiB, "
          f"DRAM read bandwidth {bw / 1e9:.1f} GB/s")
    for name, status in peers.items():
        print(f"# {name}: {status}")
    rows = []
    header = (f"{'N x K':>12} {'M':>3} {'act':>5} {'format':>7} {'time us':>9} {'GB/s':>6} {'%bw':>5} "
              f"{'vs fp32':>8} {'vs bf16':>8} {'vs int8mm':>9} {'vs int4mm':>9} {'vs quanto':>9} {'vs torchao':>10} "
              f"{'vs bnb':>7}")
    print(header)
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        # Every operand is built once per shape; each timing rotates over enough copies to
        # exceed twice the LLC.
        fp32 = [torch.randn(n, k) * 0.02 for _ in range(n_copies(n * k * 4, llc))]
        bf16 = [w.to(torch.bfloat16) for w in fp32[: n_copies(n * k * 2, llc)]]
        for fmt in args.formats:
            bits, group = FORMATS[fmt]
            sources = fp32[: n_copies(n * k * bits // 8, llc)]
            qws = [lq.quantize_weight(w, bits, group, symmetric=True) for w in sources]
            wbytes = qws[0].qweight.numel() + qws[0].scales.numel() * 4
            aten = None
            if bits == 8:
                aten = ("int8mm", [(q.qweight, q.scales.view(-1).bfloat16()) for q in qws],
                        lambda x, p: torch._weight_int8pack_mm(x, p[0], p[1]))
            elif bits == 4:
                aten = ("int4mm", [aten_int4_pack(w, group) for w in sources],
                        lambda x, p: torch._weight_int4pack_mm_for_cpu(x, p[0], group, p[1]))
            for act in args.acts:
                dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[act]
                qws_dt = [q._replace(scales=q.scales.to(dt)) for q in qws]
                peer_mods = {}
                for peer, make, peer_bits in (("quanto", quanto_linear, (8, 4)), ("torchao", torchao_linear, (8, 4)),
                                              ("bnb", bnb_linear, (4,))):
                    if not peers[peer].startswith("unavailable") and bits in peer_bits:
                        try:
                            peer_mods[peer] = [make(w.to(dt), bits, group) for w in sources]
                        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
                            print(f"# {peer} cannot quantize {fmt}/{act}: {type(e).__name__}: {str(e)[:100]}")
                for m in args.batches:
                    x = torch.randn(m, k, dtype=dt)
                    xf, xb = x.float(), x.bfloat16()
                    t = time_rotating(lambda q: (lambda: lq.linear(x, q.qweight, q.scales, None, None, bits, group)),
                                      qws_dt, args.repeat)
                    base = {"fp32": time_rotating(lambda w: (lambda: F.linear(xf, w)), fp32, args.repeat),
                            "bf16": time_rotating(lambda w: (lambda: F.linear(xb, w)), bf16, args.repeat)}
                    if aten is not None:
                        base[aten[0]] = time_rotating(lambda p: (lambda: aten[2](xb, p)), aten[1], args.repeat)
                    with torch.no_grad():
                        for peer, mods in peer_mods.items():
                            base[peer] = time_rotating(lambda mod: (lambda: mod(x)), mods, args.repeat)
                    row = {"N": n, "K": k, "M": m, "act": act, "format": fmt, "time_us": t * 1e6,
                           "GBps": wbytes / t / 1e9, "pct_bw": 100 * wbytes / t / bw,
                           **{f"vs_{b}": v / t for b, v in base.items()}}
                    rows.append(row)

                    def ratio(key):
                        v = row.get(f"vs_{key}")
                        return f"{v:.2f}x" if v else "-"
                    print(f"{shape:>12} {m:>3} {act:>5} {fmt:>7} {row['time_us']:9.0f} {row['GBps']:6.1f} "
                          f"{row['pct_bw']:4.0f}% {ratio('fp32'):>8} {ratio('bf16'):>8} {ratio('int8mm'):>9} "
                          f"{ratio('int4mm'):>9} {ratio('quanto'):>9} {ratio('torchao'):>10} {ratio('bnb'):>7}",
                          flush=True)
    if args.json:
        write_json(args.json, {"env": env, "rows": rows})


def add_arguments(ap):
    ap.add_argument("--shapes", nargs="+", type=shape_argument, default=["4096x4096", "4096x14336", "14336x4096"],
                    help="N x K (out_features x in_features)")
    ap.add_argument("--batches", nargs="+", type=positive_int, default=[1, 4, 16, 64],
                    help="activation rows M (batch x tokens)")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS),
                    help="weight formats: bits and group size (g), e.g. w4g128")
    ap.add_argument("--acts", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="activation (and scale) dtypes")
    ap.add_argument("--repeat", type=positive_int, default=15, help="timed calls per op (the median is kept)")
    ap.add_argument("--json", help="also write the rows to this JSON file")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=HelpWithDefaults)
    add_arguments(ap)
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
