"""Throughput of linquant's CPU pack / unpack on a 4096x14336 weight at 4 and 2 bits, against the
machine's copy bandwidth and the seeds' loop packer (seed 001 `pack_weights`, run on a small
tensor and scaled per value), all measured in this run.

    python bench/bench_pack.py [--rows 4096] [--cols 14336] [--repeat 10]
"""

import argparse
import platform

import torch

import linquant as lq
from timing import best_time


def seeds_pack_weights(uint8tensor, bits):
    """Seed 001's pack_weights without its prints: two Python loops, 1-D, length a multiple of 8/bits."""
    num_values = uint8tensor.shape[0] * bits // 8
    packed = torch.zeros(num_values, dtype=torch.uint8)
    idx = 0
    for i in range(num_values):
        for j in range(8 // bits):
            packed[i] |= uint8tensor[idx] << (j * bits)
            idx += 1
    return packed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=14336)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    src = torch.empty(args.rows * args.cols * 2, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / best_time(lambda: dst.copy_(src), args.repeat)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"measured copy bandwidth (read + write): {bw / 1e9:.1f} GB/s")
    print(f"{args.rows}x{args.cols} uint8 values; GB/s counts bytes read + written")
    print(f"{'':28} {'time ms':>9} {'GB/s':>7} {'% bw':>6} {'seeds loop / this':>18}")
    for bits in (4, 2):
        q = torch.randint(0, 2**bits, (args.rows, args.cols), dtype=torch.uint8)
        p = lq.pack(q, bits)
        small = q.view(-1)[:4096].contiguous()
        t_seed = best_time(lambda: seeds_pack_weights(small, bits), 1) * q.numel() / small.numel()
        # unpack returns a fresh tensor as large as the values: at full size the allocator hands
        # back new pages every call and first-touch page faults dominate. The "warm" row unpacks
        # 1/16 of the rows (output recycled by malloc) and scales the time: the kernel itself.
        part = p[: args.rows // 16]
        for name, fn, scale in ((f"pack {bits}-bit", lambda: lq.pack(q, bits), 1),
                                (f"unpack {bits}-bit", lambda: lq.unpack(p, bits, args.cols), 1),
                                (f"unpack {bits}-bit, warm output", lambda: lq.unpack(part, bits, args.cols), 16)):
            t = best_time(fn, args.repeat) * scale
            rate = (q.numel() + p.numel()) / t
            print(f"{name:28} {t * 1e3:9.2f} {rate / 1e9:7.1f} {100 * rate / bw:5.0f}% {t_seed / t:17.0f}x")
        print(f"{'seeds loop pack ' + str(bits) + '-bit (scaled)':28} {t_seed * 1e3:9.0f}")


if __name__ == "__main__":
    main()
