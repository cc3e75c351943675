"""Renders bench_linear.py --json files as the README's markdown tables. Given several runs of the
same benchmark (this VM's timings vary by up to ~50% between runs), each row is taken whole from
the run with the median linquant time for that row, so its ratios stay those of one run.

    python bench/table.py bench/results_linear_cpu.json [--batches 1 4 16 64]
    python bench/table.py run1.json run2.json run3.json --json bench/results_linear_cpu.json
"""

import argparse
import json

from linquant._files import write_json  # atomic, like every file the library writes

KEY = ("N", "K", "M", "act", "format")


def fmt(v):
    return f"{v:.2f}x" if v else "-"


def median_runs(runs):
    """One row per benchmark case: the row of the run whose linquant time is the median."""
    cases = {}
    for run in runs:
        for r in run["rows"]:
            cases.setdefault(tuple(r[k] for k in KEY), []).append(r)
    rows = []
    for candidates in cases.values():
        if len(candidates) != len(runs):
            raise SystemExit(f"table.py: the runs do not hold the same cases ({len(candidates)} of {len(runs)})")
        rows.append(sorted(candidates, key=lambda r: r["time_us"])[len(candidates) // 2])
    env = dict(runs[0]["env"])
    if len(runs) > 1:
        # "% bw" against one bandwidth, the runs' median: each run measured its own, and they differ.
        bandwidths = [run["env"]["read_GBps"] for run in runs]
        median = sorted(bandwidths)[len(runs) // 2]
        env.update(runs=len(runs), read_GBps=median, read_GBps_range=[min(bandwidths), max(bandwidths)])
        rows = [dict(r, pct_bw=100.0 * r["GBps"] / median) for r in rows]
    return {"env": env, "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", metavar="path")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--json", help="write the rows shown (of several runs, the median ones) to this file")
    args = ap.parse_args()
    runs = []
    for path in args.paths:
        with open(path) as f:
            runs.append(json.load(f))
    data = median_runs(runs)
    if args.json:
        write_json(args.json, data)
    env = data["env"]
    bandwidth = f"{env['read_GBps']:.1f} GB/s"
    if "runs" in env:
        low, high = env["read_GBps_range"]
        bandwidth = (f"{env['read_GBps']:.1f} GB/s (the median of {env['runs']} runs, {low:.1f}-{high:.1f}; each row: "
                     "the run with the median linquant time)")
    print(f"{env['machine']}, {env['threads']} threads, torch {env['torch']}, LLC {env['llc_MiB']} MiB, "
          f"measured DRAM read bandwidth {bandwidth}\n")
    print("| N x K | M | act | format | time µs | GB/s | % bw | vs fp32 | vs bf16 | vs ATen int8 | vs ATen int4 "
          "| vs quanto | vs torchao | vs bnb |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in data["rows"]:
        if r["M"] not in args.batches:
            continue
        print(f"| {r['N']}x{r['K']} | {r['M']} | {r['act']} | {r['format']} | {r['time_us']:.0f} | {r['GBps']:.1f} "
              f"| {r['pct_bw']:.0f}% | {fmt(r.get('vs_fp32'))} | {fmt(r.get('vs_bf16'))} | {fmt(r.get('vs_int8mm'))} "
              f"| {fmt(r.get('vs_int4mm'))} | {fmt(r.get('vs_quanto'))} | {fmt(r.get('vs_torchao'))} "
              f"| {fmt(r.get('vs_bnb'))} |")


if __name__ == "__main__":
    main()
