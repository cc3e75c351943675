"""The `linquant` command. `linquant demo` is the README's main job: the seeds' worked examples and
a quantization-error table over bits, modes and granularities, with no network."""

import argparse
import json
import sys

import torch

from . import choose_qparams, dequantize, metrics, quantize

GRANULARITIES = {
    "per-tensor": {},
    "per-channel": {"axis": 0},
    "group-128": {"group_size": 128},
    "group-32": {"group_size": 32},
}


def _roundtrip(w, bits, symmetric, granularity):
    kw = GRANULARITIES[granularity]
    scale, zp = choose_qparams(w, bits=bits, symmetric=symmetric, **kw)
    q = quantize(w, scale, zp, bits=bits, **kw)
    return dequantize(q, scale, zp, dtype=w.dtype, **kw)


def demo_rows(seed: int = 0):
    """Quantization error of a GPT-2-sized attention weight (768 x 2304, N(0, 0.02) with a few
    outliers as real checkpoints have) for every bits / mode / granularity."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(2304, 768, generator=gen) * 0.02
    outliers = torch.randint(0, w.numel(), (64,), generator=gen)
    w.view(-1)[outliers] *= 20
    rows = []
    for bits in (8, 4, 2):
        for symmetric in (True, False):
            for gran in GRANULARITIES:
                m = metrics(w, _roundtrip(w, bits, symmetric, gran))
                rows.append({"bits": bits, "mode": "symmetric" if symmetric else "asymmetric",
                             "granularity": gran, **m})
    return rows


def seed_examples():
    x = torch.arange(1.0, 10.0).view(3, 3)
    s, z = choose_qparams(x, bits=8, symmetric=False)
    one_to_nine = metrics(x, dequantize(quantize(x, s, z), s, z))["mse"]
    w = torch.tensor([[191.6, -13.5, 728.6], [92.14, 295.5, -184], [0, 684.6, 245.5]])
    s0, _ = choose_qparams(w, symmetric=True, axis=0)
    q0 = quantize(w, s0, axis=0)
    return {"one_to_nine_mse": one_to_nine, "per_channel_q": q0.tolist(),
            "per_channel_scale": s0.flatten().tolist(),
            "per_channel_mse": metrics(w, dequantize(q0, s0, axis=0))["mse"]}


def cmd_demo(args) -> int:
    rows, seeds = demo_rows(), seed_examples()
    if args.json:
        json.dump({"seed_examples": seeds, "gpt2_like_weight": rows}, sys.stdout, indent=1)
        print()
        return 0
    print("Seed examples")
    print(f"  asymmetric int8 of 1..9: MSE {seeds['one_to_nine_mse']:.4e} (seed: 7.6893e-05)")
    print(f"  symmetric int8 per-row of the 3x3 matrix: q = {seeds['per_channel_q']}")
    print(f"    scales {[round(v, 4) for v in seeds['per_channel_scale']]}, "
          f"MSE {seeds['per_channel_mse']:.4f} (seed: 1.8084)")
    print("\nGPT-2-like 2304x768 weight (N(0, 0.02) plus 64 outliers)")
    print(f"  {'bits':>4} {'mode':<10} {'granularity':<12} {'MSE':>10} {'max err':>9} {'SNR dB':>7}")
    for r in rows:
        print(f"  {r['bits']:>4} {r['mode'][:10]:<10} {r['granularity']:<12} {r['mse']:>10.3e} "
              f"{r['max_error']:>9.2e} {r['snr_db']:>7.2f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="linquant", description="Linear quantization of model weights.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="seeds' worked examples and a quantization-error table (no network)")
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
