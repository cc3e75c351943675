"""A mixture-of-experts layer quantized against the same layer in float: the time of one experts
forward (transformers' MixtralExperts with OLMoE-1B-7B's shapes by default: 64 experts of
2048 -> 1024 -> 2048, 8 per token) for a few token counts, with transformers' own experts
implementations (eager, batched_mm, grouped_mm) on the float weights and linquant's on 8- and
4-bit weights (quantize_model, i.e. QExpertsWeight + the "linquant" implementation). Each call gets
a fresh random routing, so the experts it reads are not the last call's (their weights, 805 MB
in bf16, are far beyond the last-level cache anyway). Prints milliseconds per forward, the GB/s its
experts' weights would take at the float dtype (so the rows compare), and each row's speed-up over
the fastest float implementation in the same run. `--help` lists the options."""

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import best_time  # noqa: E402

import linquant as lq  # noqa: E402
from linquant._arguments import HelpWithDefaults, positive_int  # noqa: E402

FLOAT_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def experts_module(hidden: int, intermediate: int, experts: int, top_k: int, dtype: torch.dtype):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=hidden, intermediate_size=intermediate, num_local_experts=experts,
                           num_experts_per_tok=top_k)
    module = MixtralExperts(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return module.to(dtype).eval()


def with_implementation(module, name: str):
    copy_ = copy.copy(module)  # shares the weights; its own config
    copy_.config = copy.copy(module.config)
    copy_.config._experts_implementation = name
    return copy_


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--hidden", type=positive_int, default=2048)
    parser.add_argument("--intermediate", type=positive_int, default=1024)
    parser.add_argument("--experts", type=positive_int, default=64)
    parser.add_argument("--top-k", type=positive_int, default=8)
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--group-size", type=positive_int, default=128)
    parser.add_argument("--repeat", type=positive_int, default=20, help="timed calls per row (the best is kept)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    module = experts_module(args.hidden, args.intermediate, args.experts, args.top_k, dtype)
    variants = [(f"float {name}", with_implementation(module, name)) for name in FLOAT_IMPLEMENTATIONS]
    variants += [(f"linquant W{bits} g{args.group_size}",
                  lq.quantize_model(copy.deepcopy(module), bits=bits, group_size=args.group_size, symmetric=False))
                 for bits in (8, 4)]
    bytes_per_expert = 3 * args.hidden * args.intermediate * torch.finfo(dtype).bits // 8
    generator = torch.Generator().manual_seed(1)
    print(f"MixtralExperts, {args.experts} experts of {args.hidden} -> {args.intermediate} -> {args.hidden}, top "
          f"{args.top_k}, {args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'tokens':>6} {'implementation':24} {'ms':>8} {'GB/s':>7} {'vs best float':>14}")
    for tokens in args.tokens:
        x = torch.randn(tokens, args.hidden, generator=generator).to(dtype)
        routings = []
        for _ in range(args.repeat + 1):
            scores = torch.rand(tokens, args.experts, generator=generator)
            weights, index = scores.topk(args.top_k, dim=-1)
            routings.append((index, (weights / weights.sum(-1, keepdim=True)).to(dtype)))
        rows = []
        for label, variant in variants:
            calls = iter(routings * 2)
            with torch.no_grad():
                seconds = best_time(lambda: variant(x, *next(calls)), args.repeat)
            touched = sum(len(torch.unique(index)) for index, _ in routings) / len(routings)
            rows.append((label, seconds, touched * bytes_per_expert / seconds / 1e9))
        best_float = min(seconds for label, seconds, _ in rows if label.startswith("float"))
        for label, seconds, gbs in rows:
            print(f"{tokens:6d} {label:24} {seconds * 1e3:8.2f} {gbs:7.1f} {best_float / seconds:13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
