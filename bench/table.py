"""Renders bench_linear.py --json files as the README's markdown tables. Given several runs of the
same benchmark (this VM's timings vary by up to ~50% between runs), each row is taken whole from
the run with the median linquant time for that row, so its ratios stay those of one run.

    python bench/table.py bench/results_linear_cpu.json [--batches 1 4 16 64]
    python bench/table.py run1.json run2.json run3.json --json bench/results_linear_cpu.json
    python bench/table.py bench/results_linear_cpu.json --glance 1,4 16,64,256
"""

import argparse
import json
import re

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


# The at-a-glance table's columns after "format | act | M": (heading, the row keys it may show: a
# format's rows hold one of them).
GLANCE_COLUMNS = (
    ("% of read bw", ("pct_bw",)),
    ("vs fp32 F.linear", ("vs_fp32",)),
    ("vs bf16 F.linear", ("vs_bf16",)),
    ("vs ATen int8 / int4", ("vs_int8mm", "vs_int4mm")),
    ("vs quanto", ("vs_quanto",)),
    ("vs torchao / bnb", ("vs_torchao", "vs_bnb")),
)
PEER_NAMES = {"vs_torchao": "torchao", "vs_bnb": "bnb"}


def format_name(fmt):
    """'w4g128' -> 'W4A16 g128', 'w8' -> 'W8A16'."""
    bits, group = re.fullmatch(r"w(\d)(?:g(\d+))?", fmt).groups()
    return f"W{bits}A16" + (f" g{group}" if group else "")


def span(values, unit):
    """'lo-hi' over the shapes, with fewer decimals the larger the figures ('1.14-1.53', '5.8-8.9', '22-40')."""
    lo, hi = min(values), max(values)
    digits = 0 if unit == "%" or hi >= 20 else 1 if hi >= 2 else 2
    a, b = f"{lo:.{digits}f}", f"{hi:.{digits}f}"
    return (a if a == b else f"{a}-{b}") + unit


def glance_cell(rows, fmt, act, group, keys):
    """One column's cell: for each batch of the group its range over the shapes, ' / ' between; the
    first of the column's keys that the format's rows hold, a peer named."""
    key = next((k for k in keys if any(r.get(k) for r in rows if r["format"] == fmt)), None)
    if key is None:
        return "-"
    parts = []
    for m in group:
        values = [r[key] for r in rows if (r["format"], r["act"], r["M"]) == (fmt, act, m) and r.get(key)]
        parts.append(span(values, "%" if key == "pct_bw" else "x") if values else "-")
    if set(parts) == {"-"}:
        return "-"
    cell = " / ".join(parts)
    return f"{PEER_NAMES[key]} {cell}" if key in PEER_NAMES else cell


def glance_rows(rows, groups):
    """The README's at-a-glance table: one line per format, activation dtype and group of batches."""
    lines = []
    for fmt in dict.fromkeys(r["format"] for r in rows):
        for act in dict.fromkeys(r["act"] for r in rows if r["format"] == fmt):
            for group in groups:
                cells = [glance_cell(rows, fmt, act, group, keys) for _, keys in GLANCE_COLUMNS]
                batches = " / ".join(str(m) for m in group)
                lines.append(f"| {format_name(fmt)} | {act} | {batches} | " + " | ".join(cells) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", metavar="path")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--json", help="write the rows shown (of several runs, the median ones) to this file")
    ap.add_argument("--glance", nargs="+", metavar="M,M",
                    help="print the at-a-glance table instead: ranges over the shapes, one line per group of batches")
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
    if args.glance:
        groups = [[int(m) for m in g.split(",")] for g in args.glance]
        print("| format | act | M | " + " | ".join(h for h, _ in GLANCE_COLUMNS) + " |")
        print("| --- " * (3 + len(GLANCE_COLUMNS)) + "|")
        print("\n".join(glance_rows(data["rows"], groups)))
        return
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
