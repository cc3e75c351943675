"""Throughput of linquant's CPU quantize kernels on a 4096x4096 fp32 weight, per group of 128,
against the machine's measured copy bandwidth, a vectorized pure-PyTorch quantizer and the seeds'
per-channel Python loop, all measured in this run.

    python bench/bench_quantize.py [--size 4096] [--group-size 128] [--repeat 20]
"""

import argparse
import platform

import torch

import linquant as lq
from timing import best_time


def torch_group_quantize(w, bits, g):
    """Vectorized pure-PyTorch symmetric per-group quantize (the best one can do without a kernel)."""
    qmax = 2 ** (bits - 1) - 1
    wg = w.view(w.shape[0], -1, g)
    scale = wg.abs().amax(dim=-1, keepdim=True) / qmax
    return torch.clamp(torch.round(wg / scale), -qmax - 1, qmax).to(torch.int8).view_as(w), scale


def seeds_per_channel_loop(w):
    """Seed 001's linear_q_symmetric_per_channel: one Python iteration per row."""
    scale = torch.zeros(w.shape[0])
    for i in range(w.shape[0]):
        scale[i] = w[i].abs().max().item() / 127
    q = torch.clamp(torch.round(w / scale.view(-1, 1)), -128, 127).to(torch.int8)
    return q, scale


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    n, g, bits = args.size, args.group_size, args.bits
    w = torch.randn(n, n)
    src = torch.randn(n * n * 2)  # 128 MiB: well beyond the last-level cache
    dst = torch.empty_like(src)
    copy_t = best_time(lambda: dst.copy_(src), args.repeat)
    bw = 2 * src.numel() * 4 / copy_t

    scale, _ = lq.choose_qparams(w, bits=bits, group_size=g)
    wbytes = w.numel() * 4
    rows = []

    def add(name, t, nbytes):
        rows.append((name, t, nbytes / t))

    add("linquant quantize (given scales)", best_time(lambda: lq.quantize(w, scale, bits=bits, group_size=g),
                                                       args.repeat), wbytes + w.numel())
    add("linquant choose_qparams", best_time(lambda: lq.choose_qparams(w, bits=bits, group_size=g), args.repeat),
        wbytes)
    add("linquant choose_qparams + quantize",
        best_time(lambda: lq.quantize(w, *lq.choose_qparams(w, bits=bits, group_size=g), bits=bits, group_size=g),
                  args.repeat), 2 * wbytes + w.numel())
    t_torch = best_time(lambda: torch_group_quantize(w, bits, g), max(3, args.repeat // 4))
    add("pure PyTorch, vectorized (same job)", t_torch, 2 * wbytes + w.numel())
    t_seed = best_time(lambda: seeds_per_channel_loop(w), 2)
    add("seeds' per-channel Python loop (int8)", t_seed, 2 * wbytes + w.numel())

    ours = rows[2][1]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"measured copy bandwidth (read + write): {bw / 1e9:.1f} GB/s")
    print(f"{n}x{n} fp32, {bits}-bit symmetric, group {g}")
    print(f"{'':40} {'time ms':>9} {'GB/s':>7} {'% bw':>6} {'vs linquant':>11}")
    for name, t, rate in rows:
        print(f"{name:40} {t * 1e3:9.2f} {rate / 1e9:7.1f} {100 * rate / bw:5.0f}% {t / ours:10.1f}x")


if __name__ == "__main__":
    main()
