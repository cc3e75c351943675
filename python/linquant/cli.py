"""The `linquant` command. `linquant demo` is the README's main job: the seeds' worked examples, a
quantization-error table over bits, modes and granularities, the real all-MiniLM-L6-v2 in fp32,
bf16 and 8/4/2 bits (footprint, embedding agreement, speed) and the real SmolLM2-135M-Instruct
(perplexity, greedy generation side by side), both from PyPI packages, no network.
`linquant export` writes a quantized encoder as TorchScript for the C++ program linquant-run."""

import argparse
import copy
import json
import os
import sys
import warnings
from typing import Dict

import torch

from . import builtin, choose_qparams, dequantize, footprint, metrics, quantize, quantize_model, save_quantized
from ._arguments import HelpWithDefaults, device as device_argument, positive_int
from ._files import atomic_write, check_directory_target, make_directory
from .evaluate import (BUILTIN, ModelError, agreement, hf_model_class, layer_errors, load_model, load_quantized_dir,
                       portable_spec, report, timed_greedy)
from .model import DEFAULT_EXCLUDE, scheme_name
from .embedding import QEmbedding
from .experts import QExpertsWeight
from .nn import QLinear
from .pretrained import CheckpointMismatch, build_skeleton, quantize_pretrained
from .serialization import read_config
from .weights import METHODS, check_format

GRANULARITIES = {
    "per-tensor": {},
    "per-channel": {"axis": 0},
    "group-128": {"group_size": 128},
    "group-32": {"group_size": 32},
}

# (label, bits, group_size, symmetric) of the real-model table.
MODEL_CONFIGS = [("int8 per-channel", 8, None, True), ("int4 g128 asym", 4, 128, False),
                 ("int4 g32 asym", 4, 32, False), ("int2 g16 asym", 2, 16, False)]


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


def _progress(items, desc):
    """A progress bar on stderr over the demo's model variants (each takes a few seconds)."""
    try:
        from tqdm.auto import tqdm
        return tqdm(items, desc=desc, unit="model")
    except ImportError:
        return items


def minilm_rows():
    """all-MiniLM-L6-v2 through bf16, every MODEL_CONFIGS entry, the first two on the bf16 model,
    and the first two with the embeddings quantized to 8 bits (their 11.7M of the model's 22.7M
    parameters): footprint, linear-layer bytes, cosine of the sentence embeddings to fp32, time per
    forward of the built-in sentences."""
    model, tok = builtin.load_minilm()
    ref = agreement("encoder", model, tok)

    def linear_bytes(m):
        return sum(t.numel() * t.element_size() for mod in m.modules()
                   if isinstance(mod, (torch.nn.Linear, QLinear)) for t in mod.state_dict().values())

    rows = [{"model": "fp32", "bytes": footprint(model)["total"], "linear_bytes": linear_bytes(model),
             "cosine_mean": 1.0, "cosine_min": 1.0, "forward_ms": ref["forward_ms"]}]
    variants = [("bf16", lambda m: m.to(torch.bfloat16))]
    variants += [(label, lambda m, b=b, g=g, s=s: quantize_model(m, bits=b, group_size=g, symmetric=s, progress=False))
                 for label, b, g, s in MODEL_CONFIGS]
    # The first two formats again on the bf16 model: its 224-row batch takes the bf16 GEMM path.
    variants += [(f"{label} (bf16)", lambda m, b=b, g=g, s=s: quantize_model(m.to(torch.bfloat16), bits=b, group_size=g,
                                                                             symmetric=s, progress=False))
                 for label, b, g, s in MODEL_CONFIGS[:2]]
    # The linear layers as above, then (a second call: what the first left in float) the embeddings.
    variants += [(f"{label}, int8 embeddings",
                  lambda m, b=b, g=g, s=s: quantize_model(quantize_model(m, bits=b, group_size=g, symmetric=s,
                                                                         progress=False),
                                                          bits=8, exclude=[], embeddings=True, progress=False))
                 for label, b, g, s in MODEL_CONFIGS[:2]]
    for label, convert in _progress(variants, "MiniLM"):
        m, _ = builtin.load_minilm()
        convert(m)
        out = agreement("encoder", m, tok, ref)
        rows.append({"model": label, "bytes": footprint(m)["total"], "linear_bytes": linear_bytes(m),
                     "cosine_mean": out["cosine_mean"], "cosine_min": out["cosine_min"],
                     "forward_ms": out["forward_ms"]})
        if "embeddings" not in label:  # the SNR plot's rows: one point per linear layer
            rows[-1]["layer_snr_db"] = {r["layer"]: r["snr_db"] for r in layer_errors(model, m)}
    return rows


# (label, dtype, bits, group_size, symmetric, bits of the token embedding and its tied head, or None:
# left in float) of the causal-LM table: the fp32 model, and the same in bf16 (CPU decoding with bf16
# activations takes the AVX512-BF16 kernels where the CPU has them).
LM_CONFIGS = [("fp32", torch.float32, None, None, None, None),
              ("int8 per-channel", torch.float32, 8, None, True, None),
              ("int4 g128 asym", torch.float32, 4, 128, False, None),
              ("int4 g128 asym, int8 embedding", torch.float32, 4, 128, False, 8),
              ("bf16", torch.bfloat16, None, None, None, None),
              ("int8 per-channel (bf16)", torch.bfloat16, 8, None, True, None),
              ("int4 g128 asym (bf16)", torch.bfloat16, 4, 128, False, None),
              ("int4 g128 asym, int8 embedding (bf16)", torch.bfloat16, 4, 128, False, 8)]


def smollm2_rows():
    """SmolLM2-135M-Instruct in every LM_CONFIGS entry: footprint, perplexity of the built-in text,
    greedy continuation of builtin.GREEDY_PROMPT, time per generated token."""
    model, tok = builtin.load_smollm2()
    rows = []
    for label, dtype, bits, group, sym, table_bits in _progress(LM_CONFIGS, "SmolLM2"):
        m = model if dtype == torch.float32 and bits is None else copy.deepcopy(model).to(dtype)
        if bits is not None:
            m = quantize_model(m, bits=bits, group_size=group, symmetric=sym, progress=False)
        if table_bits is not None:  # what the first call left in float: the embedding and its tied head, shared
            m = quantize_model(m, bits=table_bits, exclude=[], embeddings=True, progress=False)
        text, ms_per_token = timed_greedy(m, tok)
        rows.append({"model": label, "bytes": footprint(m)["total"], "perplexity": builtin.perplexity(m, tok),
                     "greedy": text, "ms_per_token": ms_per_token})
    return rows


def _optional(fn):
    """fn() or, when its model package is missing, ([], the reason)."""
    try:
        return fn(), None
    except ImportError as e:
        return [], str(e)


def write_plots(out_dir: str, model_rows, lm_rows) -> list:
    """PNG plots: per-layer weight SNR of MiniLM at each format, and accuracy against bytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    make_directory(out_dir, "out_dir")
    paths = []
    quantized = [r for r in model_rows if r.get("layer_snr_db")]
    if quantized:
        fig, ax = plt.subplots(figsize=(11, 4.5))
        for r in quantized:
            # A format's bf16 twin has nearly its SNRs: dashed, hollow markers, so neither hides the other.
            twin = "(bf16)" in r["model"]
            ax.plot(list(r["layer_snr_db"].values()), label=r["model"], marker="o" if twin else ".",
                    linestyle="--" if twin else "-", markerfacecolor="none" if twin else None)
        ax.set_xlabel("linear layer (model order)")
        ax.set_ylabel("weight SNR (dB)")
        ax.set_title("all-MiniLM-L6-v2: per-layer weight SNR after quantization")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        paths.append(os.path.join(out_dir, "layer_snr.png"))
        fig.tight_layout()
        atomic_write(paths[-1], lambda tmp: fig.savefig(tmp, dpi=110))
        plt.close(fig)
    panels = [p for p in (("MiniLM: embedding cosine to fp32", model_rows, "cosine_mean", "linear_bytes"),
                          ("SmolLM2: perplexity (lower is better)", lm_rows, "perplexity", "bytes")) if p[1]]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, (title, rows, key, size_key) in zip(axes[0], panels):
            xs, ys = [r[size_key] / 1e6 for r in rows], [r[key] for r in rows]
            ax.plot(xs, ys, "o")
            for i, (r, x, y) in enumerate(zip(rows, xs, ys)):
                # Neighbouring formats (a format and its bf16 twin) sit close: stagger their labels.
                ax.annotate(r["model"], (x, y), textcoords="offset points", xytext=(4, (4, -11, 15)[i % 3]), fontsize=8)
            ax.margins(x=0.08, y=0.15)  # room for the labels of the outermost points
            ax.set_xlabel(("linear-layer" if size_key == "linear_bytes" else "model") + " size (MB)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        paths.append(os.path.join(out_dir, "accuracy_vs_bytes.png"))
        fig.tight_layout()
        atomic_write(paths[-1], lambda tmp: fig.savefig(tmp, dpi=110))
        plt.close(fig)
    return paths


def cmd_demo(args) -> int:
    rows, seeds = demo_rows(), seed_examples()
    model_rows, model_error = _optional(minilm_rows)
    lm_rows, lm_error = _optional(smollm2_rows)
    plots = write_plots(args.out, model_rows, lm_rows) if args.out else []
    if args.json:
        json.dump({"seed_examples": seeds, "gpt2_like_weight": rows, "minilm": model_rows,
                   "minilm_error": model_error, "smollm2": lm_rows, "smollm2_error": lm_error, "plots": plots},
                  sys.stdout, indent=1)
        print()
        return 0
    print("Seed examples (the worked examples of the notebooks linquant grew from; their numbers in parentheses)")
    print(f"  asymmetric int8 of 1..9: MSE {seeds['one_to_nine_mse']:.4e} (seed: 7.6893e-05)")
    print(f"  symmetric int8 per-row of the 3x3 matrix: q = {seeds['per_channel_q']}")
    print(f"    scales {[round(v, 4) for v in seeds['per_channel_scale']]}, "
          f"MSE {seeds['per_channel_mse']:.4f} (seed: 1.8084)")
    print("\nGPT-2-like 2304x768 weight (N(0, 0.02) plus 64 outliers)")
    print(f"  {'bits':>4} {'mode':<10} {'granularity':<12} {'MSE':>10} {'max err':>9} {'SNR dB':>7}")
    for r in rows:
        print(f"  {r['bits']:>4} {r['mode'][:10]:<10} {r['granularity']:<12} {r['mse']:>10.3e} "
              f"{r['max_error']:>9.2e} {r['snr_db']:>7.2f}")
    print(f"\nall-MiniLM-L6-v2 (real checkpoint), {len(builtin.SENTENCES)} sentences, embeddings vs fp32")
    if model_error:
        print(f"  skipped: {model_error}")
    else:
        w = _name_width(model_rows)
        print(f"  {'model':<{w}} {'total MB':>9} {'linear MB':>10} {'cos mean':>9} {'cos min':>8} {'fwd ms':>7}")
        for r in model_rows:
            print(f"  {r['model']:<{w}} {r['bytes'] / 1e6:9.1f} {r['linear_bytes'] / 1e6:10.1f} "
                  f"{r['cosine_mean']:9.5f} {r['cosine_min']:8.5f} {r['forward_ms']:7.1f}")
    print(f"\nSmolLM2-135M-Instruct (real checkpoint, from its Q4_1 GGUF): perplexity of a built-in text, "
          f"greedy continuation of {builtin.GREEDY_PROMPT!r}")
    if lm_error:
        print(f"  skipped: {lm_error}")
    w = _name_width(lm_rows)
    for r in lm_rows:
        print(f"  {r['model']:<{w}} {r['bytes'] / 1e6:7.1f} MB  perplexity {r['perplexity']:7.3f}  "
              f"{r['ms_per_token']:6.1f} ms/token  {r['greedy']!r}")
    for path in plots:
        print(f"plot: {path}")
    return 0


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def read_quantized(spec: str, dtype, **options):
    """(model, kind) of a Hugging Face directory with safetensors weights, quantized while it is read
    (quantize_pretrained: peak memory near the quantized size, not the float model's), or None
    for anything else (built-in names, GGUF files) and, said on stderr, for checkpoints it cannot
    map (those transformers converts while loading): the caller loads those whole."""
    if spec in BUILTIN or not os.path.isdir(spec):
        return None
    model_class, kind = hf_model_class(spec)
    try:
        return quantize_pretrained(spec, model_class=model_class, dtype=dtype, **options), kind
    except CheckpointMismatch as e:
        print(f"{e}\nlinquant: loading the whole model instead", file=sys.stderr)
        return None


def quantized_source(spec: str, dtype, **options):
    """(quantized model, kind, the float model's bytes in `dtype`) for `linquant quantize`:
    read_quantized's, or the model loaded whole (no tokenizer needed), then quantized."""
    read = read_quantized(spec, dtype, **options)
    if read is not None:
        model, kind = read
        return model, kind, footprint(build_skeleton(spec, type(model), dtype))["total"]
    model, _, kind = load_model(spec, dtype, tokenizer=False)
    before = footprint(model)["total"]
    return quantize_model(model, **options), kind, before


def embeddings_option(args):
    """quantize_model's `embeddings`: --embedding-bits B, else whether --embeddings was given."""
    return args.embedding_bits or args.embeddings


def cmd_quantize(args) -> int:
    model, kind, before = quantized_source(args.model, DTYPES[args.dtype], bits=args.bits,
                                           group_size=args.group_size, symmetric=not args.asymmetric,
                                           exclude=args.exclude, progress=True, method=args.method,
                                           embeddings=embeddings_option(args))
    # What each quantized module became, by scheme: --embedding-bits gives the tables (and a head
    # tied to one) another scheme than the layers'.
    schemes: Dict[str, Dict[str, int]] = {}
    for what, kind_of in (("layers", QLinear), ("experts projections", QExpertsWeight), ("embeddings", QEmbedding)):
        for m in model.modules():
            if isinstance(m, kind_of):
                counts = schemes.setdefault(scheme_name(m.bits, m.group_size, m.symmetric, args.method), {})
                counts[what] = counts.get(what, 0) + 1
    # An absolute path (built-in names as they are), so `linquant eval` finds the source from any
    # working directory; a path relative to --out would break when only --out moves.
    save_quantized(model, args.out, metadata={"source": portable_spec(args.model), "kind": kind,
                                              "method": args.method})
    # The scheme in full: symmetric is the default, and nothing else in the output would say which ran.
    scheme = scheme_name(args.bits, args.group_size, not args.asymmetric, args.method)
    total = {what: sum(c.get(what, 0) for c in schemes.values())
             for what in ("layers", "experts projections", "embeddings")}
    result = {"out": args.out, "layers": total["layers"], "experts_projections": total["experts projections"],
              "embeddings": total["embeddings"], "scheme": scheme, "schemes": schemes,
              "bytes_before": before, "bytes_after": footprint(model)["total"]}
    if args.json:
        print(json.dumps(result))
    else:
        quantized = ", ".join(f"{', '.join(f'{n} {what}' for what, n in counts.items())} "
                              f"{'quantized ' if i == 0 else ''}to {name}"
                              for i, (name, counts) in enumerate(sorted(schemes.items(), key=lambda s: s[0] != scheme))
                              ) or "nothing quantized"
        print(f"{args.model} ({kind}): {quantized}; "
              f"{before / 1e6:.1f} MB -> {result['bytes_after'] / 1e6:.1f} MB; saved to {args.out}")
    return 0


def read_text(path: str) -> str:
    """A text file for eval's --text, read as UTF-8 (an error naming the file otherwise)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def check_device(dev: torch.device) -> None:
    """A GPU this machine has, said before any model loads."""
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {dev}: torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {dev}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def cmd_eval(args) -> int:
    check_device(args.device)
    text = None if args.text is None else read_text(args.text)
    method = args.method
    dtype = DTYPES[args.dtype]
    if os.path.isdir(args.target) and os.path.isfile(os.path.join(args.target, "linquant.json")):
        fp_model, tok, kind, q_model = load_quantized_dir(args.target, args.device, dtype)
        method = read_config(args.target)["metadata"].get("method", "minmax")  # saves before methods: minmax
    else:
        fp_model, tok, kind = load_model(args.target, dtype)
        fp_model = fp_model.to(args.device)
        options = dict(bits=args.bits, group_size=args.group_size, symmetric=not args.asymmetric,
                       exclude=args.exclude, progress=True, method=method, embeddings=embeddings_option(args))
        # Read again and quantized tensor by tensor where it can be: a quantized deep copy would
        # hold the float model twice.
        read = read_quantized(args.target, dtype, device=args.device, **options)
        q_model = read[0] if read is not None else quantize_model(copy.deepcopy(fp_model), **options)
    if args.max_tokens is not None and kind != "causal-lm":
        raise ValueError(f"--max-tokens limits a causal LM's perplexity text; {args.target} is an {kind}")
    rep = report(fp_model, q_model, tok, kind, method, text, args.max_tokens)
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    on = "" if args.text is None else f", on {args.text}"
    print(f"{args.target} ({kind}), quantized {rep['scheme']}{on}")
    for name, r in rep["models"].items():
        print(f"  {name:<10} {r['bytes'] / 1e6:8.1f} MB  {_speed(kind, r)}  {_quality(kind, r)}")
    snrs = [r["snr_db"] for r in rep["layers"]]
    worst = min(rep["layers"], key=lambda r: r["snr_db"])
    print(f"  weights: {len(snrs)} layers, SNR {min(snrs):.1f}..{max(snrs):.1f} dB (mean {sum(snrs) / len(snrs):.1f}); "
          f"worst {worst['layer']} (MSE {worst['mse']:.3e})")
    return 0


def _name_width(rows: list) -> int:
    """The width of a table's model column: its longest name, so the numbers line up."""
    return max([len("model")] + [len(r["model"]) for r in rows])


def _speed(kind: str, row: dict) -> str:
    """What eval timed, by name: a forward over the whole input is compute-bound at this many tokens
    (prefill), where quantized weights can be slower; decoding one token at a time is where they pay off."""
    if kind == "causal-lm":
        return (f"prefill {row['forward_ms']:7.1f} ms ({row['forward_tokens']} tokens)  "
                f"decode {row['decode_ms_per_token']:6.1f} ms/token")
    return f"forward {row['forward_ms']:7.1f} ms ({row['forward_tokens']} tokens)"


def _quality(kind: str, row: dict) -> str:
    if kind == "causal-lm":
        return f"perplexity {row['perplexity']:.3f} ({row['perplexity_tokens']} tokens)  greedy {row['greedy']!r}"
    return f"cosine {row.get('cosine_mean', 1.0):.5f} (min {row.get('cosine_min', 1.0):.5f})"


def cmd_bench(args) -> int:
    from .benchmark import run
    run(args)
    return 0


def cmd_bench_cuda(args) -> int:
    from .benchmark_cuda import run
    return run(args)


def cmd_export(args) -> int:
    from .export import export_encoder, export_saved, find_linquant_run
    if args.saved:
        paths = export_saved(args.saved, args.out)
    else:
        paths = export_encoder(args.model, args.out, bits=args.bits, group_size=args.group_size,
                               symmetric=not args.asymmetric)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    program = find_linquant_run()
    if program:
        print(f"run it from C++: {program} {paths['model']} {paths['inputs']}")
    else:
        print("run it from C++ with linquant-run MODEL INPUTS; linquant-run was not found ($LINQUANT_RUN, PATH, "
              "the checkout's build/): it comes from the C++ build of the linquant repository (`cmake --build "
              "build` makes build/linquant-run, `cmake --install build --prefix P` installs P/bin/linquant-run)")
    return 0


def _one_line_warnings(command: str, python_showwarning):
    """showwarning that prints linquant's own warnings (their messages start with "linquant"), such as
    an --exclude that matches no layer, as one line like the command's errors, and others as Python does."""
    def show(message, category, filename, lineno, file=None, line=None):
        if str(message).startswith("linquant"):
            print(f"linquant {command}: warning: {message}", file=sys.stderr)
        else:
            python_showwarning(message, category, filename, lineno, file, line)
    return show


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="linquant", description="Linear quantization of model weights.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_command(name, **kwargs):
        return sub.add_parser(name, formatter_class=HelpWithDefaults, **kwargs)

    demo = add_command("demo", help="seeds' worked examples, an error table, the real MiniLM and SmolLM2 "
                                    "(no network)")
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    demo.add_argument("--out", help="also write PNG plots (per-layer SNR, accuracy vs bytes) to this folder")
    demo.set_defaults(func=cmd_demo)

    def quant_options(p, required_bits):
        p.add_argument("--bits", type=int, choices=[8, 4, 2], default=None if required_bits else 8,
                       required=required_bits, help="bits per weight")
        p.add_argument("--group-size", type=int, default=None,
                       help="weights per scale along in_features (default: one scale per output channel)")
        p.add_argument("--asymmetric", action="store_true",
                       help="zero-point (asymmetric) quantization (default: symmetric)")
        p.add_argument("--exclude", nargs="*", default=list(DEFAULT_EXCLUDE),
                       help="module names or glob patterns (a layer's full name or its last component) to keep in "
                            f"full precision (default: {' '.join(DEFAULT_EXCLUDE)}; patterns given replace it)")
        p.add_argument("--method", choices=list(METHODS), default="minmax",
                       help="how scales and zero points are chosen: minmax spans each group's range; mse searches "
                            "21 clipping ratios per group for the least squared error (21 times the work, "
                            "10-40%% less weight error at 4 and 2 bits)")
        p.add_argument("--embeddings", action="store_true",
                       help="quantize the embeddings (nn.Embedding) too, in the same format; a head tied to one "
                            "shares its quantized table when the head is quantized too (--exclude with no pattern)")
        p.add_argument("--embedding-bits", type=int, choices=[8, 4, 2],
                       help="quantize the embeddings to this many bits per channel, symmetric, whatever the layers' "
                            "format (implies --embeddings): e.g. 8 for a small language model's table and tied head "
                            "beside 4-bit layers")
        p.add_argument("--json", action="store_true", help="print the result as JSON")

    models = "a local Hugging Face model directory, a .gguf file, or a built-in name (minilm, smollm2)"
    q = add_command("quantize", help="quantize a model and save it (safetensors + linquant.json)")
    q.add_argument("model", help=models)
    quant_options(q, required_bits=True)
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="the model's float dtype: scales, biases and the layers kept in float (bfloat16 takes "
                        "the CPU's AVX512-BF16 kernels where it has them; auto: the dtype a Hugging Face "
                        "directory's config.json records)")
    q.set_defaults(func=cmd_quantize)
    e = add_command("eval", help="report footprint, weight error, output agreement and speed")
    e.add_argument("target", help="a `linquant quantize` output directory, or " + models +
                                  " (then quantized in memory with the options below)")
    quant_options(e, required_bits=False)
    e.add_argument("--text", metavar="FILE",
                   help="a UTF-8 text file to evaluate on instead of the built-in one: a causal LM's perplexity over "
                        "the whole text (a text longer than its context in half-overlapping windows of the context), "
                        "an encoder's embeddings of its non-empty lines")
    e.add_argument("--device", type=device_argument, default=torch.device("cpu"),
                   help="where the models run: cpu, cuda or cuda:N (both models on it at once)")
    e.add_argument("--max-tokens", type=positive_int, metavar="N",
                   help="a causal LM's perplexity over the text's first N tokens only (default: all of them)")
    e.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="the float model's dtype, and the quantized model's scales and activations when it is "
                        "quantized here (bfloat16 holds the float model in half the memory of float32; auto: the "
                        "dtype a Hugging Face directory's config.json records)")
    e.set_defaults(func=cmd_eval)
    b = add_command("bench", help="the CPU linear-kernel benchmark tables (bench/bench_linear.py)")
    from .benchmark import add_arguments
    add_arguments(b)
    b.set_defaults(func=cmd_bench)
    bc = add_command("bench-cuda", help="the CUDA linear-kernel benchmark table against cuBLAS fp16, tinygemm "
                                           "and int8 (bench/bench_linear_cuda.py); exit 2 without a GPU")
    from .benchmark_cuda import add_arguments as add_cuda_arguments
    add_cuda_arguments(bc)
    bc.set_defaults(func=cmd_bench_cuda)
    export = add_command("export", help="save a quantized model as TorchScript for linquant-run (C++): a built-in "
                                         "encoder quantized here, or a model saved by `linquant quantize`")
    # --model and --bits default to None, so that --from can tell them given; their defaults are
    # filled in after parsing.
    export.add_argument("--model", choices=["tiny-bert", "minilm"],
                        help="tiny-bert: small random-init BERT; minilm: the built-in all-MiniLM-L6-v2 "
                             "(default: tiny-bert)")
    export.add_argument("--from", dest="saved", metavar="DIR",
                        help="instead of --model: a directory written by `linquant quantize` (or lq.save_quantized) "
                             "of a Hugging Face encoder or decoder-only language model, exported as it was quantized")
    export.add_argument("--bits", type=int, choices=[8, 4, 2], help="bits per weight (default: 8)")
    export.add_argument("--group-size", type=int, default=None, help="values per group (default: per channel)")
    export.add_argument("--asymmetric", action="store_true", help="zero-point quantization (default: symmetric)")
    export.add_argument("--out", required=True, help="output directory")
    export.set_defaults(func=cmd_export)
    args = parser.parse_args(argv)
    if args.command == "export":
        given = [flag for flag, value in (("--model", args.model), ("--bits", args.bits),
                                          ("--group-size", args.group_size), ("--asymmetric", args.asymmetric))
                 if value not in (None, False)]
        if args.saved and given:  # the save holds its model and format
            parser.exit(2, f"linquant export: --from takes the model and its format from the save; "
                           f"drop {', '.join(given)}\n")
        args.model, args.bits = args.model or "tiny-bert", args.bits or 8
    if hasattr(args, "group_size"):  # a bad format is a usage error before any model is loaded
        try:
            check_format(args.bits, args.group_size, f"linquant {args.command}")
        except ValueError as e:
            parser.exit(2, f"{e}\n")
    try:
        with warnings.catch_warnings():  # restores Python's showwarning when main returns
            warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
            if getattr(args, "out", None) is not None:  # every --out is a directory: say so before any model loads
                check_directory_target(args.out, "--out")
            return args.func(args)
    except (ModelError, OSError, ValueError, ImportError) as e:
        print(f"linquant {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
