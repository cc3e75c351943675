"""Renders a bench_linear.py --json file as the README's markdown tables.

    python bench/table.py bench/results_linear_cpu.json [--batches 1 4 16 64]
"""

import argparse
import json


def fmt(v):
    return f"{v:.2f}x" if v else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64])
    args = ap.parse_args()
    with open(args.path) as f:
        data = json.load(f)
    env = data["env"]
    print(f"{env['machine']}, {env['threads']} threads, torch {env['torch']}, LLC {env['llc_MiB']} MiB, "
          f"measured DRAM read bandwidth {env['read_GBps']:.1f} GB/s\n")
    print("| N x K | M | act | format | time µs | GB/s | % bw | vs fp32 | vs bf16 | vs ATen int8 | vs ATen int4 "
          "| vs quanto | vs torchao |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in data["rows"]:
        if r["M"] not in args.batches:
            continue
        print(f"| {r['N']}x{r['K']} | {r['M']} | {r['act']} | {r['format']} | {r['time_us']:.0f} | {r['GBps']:.1f} "
              f"| {r['pct_bw']:.0f}% | {fmt(r.get('vs_fp32'))} | {fmt(r.get('vs_bf16'))} | {fmt(r.get('vs_int8mm'))} "
              f"| {fmt(r.get('vs_int4mm'))} | {fmt(r.get('vs_quanto'))} | {fmt(r.get('vs_torchao'))} |")


if __name__ == "__main__":
    main()
