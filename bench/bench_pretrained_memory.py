"""Peak memory and time of quantizing a Hugging Face checkpoint two ways, each in a fresh process:
`quantize_model(AutoModelForCausalLM.from_pretrained(dir, dtype=float32))`, which holds the
full-precision model, against `lq.quantize_pretrained(dir)`, which reads and quantizes one tensor at
a time. The checkpoint is a random Llama written here tensor by tensor (bf16 shards of 1 GiB,
as save_pretrained lays them out; by default 4 layers of Llama-2-7B's shapes, `--layers 32` for the
whole 6.7B model), or with `--experts N` a Mixtral of N experts per layer, stored one tensor per
expert as Mixtral's checkpoints are (`--experts 64 --top-k 8 --hidden 2048 --intermediate 1024
--layers 16` has OLMoE-1B-7B's shapes), so no download is needed. The first way is skipped when the float32 model would
not fit in the memory available. Peak memory is the process's anonymous
resident memory (RssAnon, sampled every millisecond) above what the process holds after the same
way has run once on a tiny checkpoint (imports and first-use allocations, ~125 MiB, are not the
model's); RssAnon because safetensors maps the file, and those pages, counted in VmHWM, are page
cache the kernel can drop. `--help` lists the options."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from linquant._arguments import HelpWithDefaults, positive_int

WAYS = ("from_pretrained+quantize_model", "quantize_pretrained")


def rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status (this benchmark needs Linux)")


def quantize(way: str, directory: str, bits: int, group_size: int):
    import torch
    import linquant as lq
    from transformers import AutoModelForCausalLM
    if way == WAYS[0]:
        return lq.quantize_model(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), bits=bits,
                                 group_size=group_size, symmetric=False, progress=False)
    return lq.quantize_pretrained(directory, bits=bits, group_size=group_size, symmetric=False, progress=False)


def measure(way: str, directory: str, warmup_directory: str, bits: int, group_size: int) -> dict:
    """Runs one way in this process, once on the tiny checkpoint and then on the measured one, and
    returns the second run's peak RssAnon above the memory held before it, and its time."""
    import linquant as lq

    quantize(way, warmup_directory, bits, group_size)
    peak, done = [rss_anon_kib()], threading.Event()
    base = peak[0]

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_kib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    model = quantize(way, directory, bits, group_size)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_anon_kib())
    return {"way": way, "peak_mib": (peak[0] - base) / 1024, "seconds": seconds,
            "model_mib": lq.footprint(model)["total"] / 2**20}


def checkpoint_shapes(model_class, config, experts: int) -> dict:
    """The checkpoint's tensor names and shapes: the model's parameters, and for a Mixtral each
    layer's 3-D experts parameters as the per-expert tensors its checkpoints hold (w1 the gate's
    rows, w3 the up projection's, w2 the down projection), under block_sparse_moe."""
    import torch
    with torch.device("meta"):
        params = {name: p.shape for name, p in model_class(config).named_parameters()}
    if not experts:
        return params
    shapes = {}
    for name, shape in params.items():
        layer, _, rest = name.partition(".mlp.")
        if rest == "experts.gate_up_proj":
            for e in range(experts):
                for w in ("w1", "w3"):
                    shapes[f"{layer}.block_sparse_moe.experts.{e}.{w}.weight"] = (shape[1] // 2, shape[2])
        elif rest == "experts.down_proj":
            for e in range(experts):
                shapes[f"{layer}.block_sparse_moe.experts.{e}.w2.weight"] = tuple(shape[1:])
        else:
            shapes[f"{layer}.block_sparse_moe.{rest}" if rest else name] = shape
    return shapes


def write_checkpoint(directory: str, hidden: int, layers: int, vocab: int, intermediate: int, experts: int = 0,
                     top_k: int = 2) -> dict:
    """A Llama (or with `experts`, Mixtral) checkpoint as save_pretrained lays it out (config.json,
    bf16 safetensors shards of about 1 GiB and their index), written tensor by tensor from a meta
    skeleton, so that models larger than memory can be written too. Weights are N(0, 0.02), norms 1."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
    config_class, model_class = (MixtralConfig, MixtralForCausalLM) if experts else (LlamaConfig, LlamaForCausalLM)
    moe = dict(num_local_experts=experts, num_experts_per_tok=top_k) if experts else {}
    config = config_class(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                          num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
                          vocab_size=vocab, tie_word_embeddings=False, dtype="bfloat16", **moe)
    shapes = checkpoint_shapes(model_class, config, experts)
    config.architectures = [model_class.__name__]
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    shards, shard, shard_bytes, weight_map = [], {}, 0, {}

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        shards.append(name)
        weight_map.update({key: name for key in shard})

    for name, shape in shapes.items():
        tensor = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
        shard[name] = tensor.to(torch.bfloat16)
        shard_bytes += shard[name].nbytes
        if shard_bytes >= 2**30:
            flush()
            shard, shard_bytes = {}, 0
    if shard:
        flush()
    params = sum(torch.Size(shape).numel() for shape in shapes.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": params * 2}, "weight_map": weight_map}, f)
    return {"params": params, "fp32_mib": params * 4 / 2**20}


def available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo (this benchmark needs Linux)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--hidden", type=positive_int, default=4096, help="hidden size of the Llama written")
    parser.add_argument("--intermediate", type=positive_int, default=None,
                        help="its MLP size (default: 11008 / 4096 of the hidden size, as in Llama-2-7B)")
    parser.add_argument("--layers", type=positive_int, default=4, help="its number of decoder layers (Llama-2-7B: 32)")
    parser.add_argument("--vocab", type=positive_int, default=32000, help="its vocabulary size")
    parser.add_argument("--experts", type=int, default=0, help="experts per layer: a Mixtral (0: a Llama)")
    parser.add_argument("--top-k", type=positive_int, default=2, help="experts each token goes to (with --experts)")
    parser.add_argument("--bits", type=int, choices=(8, 4, 2), default=4, help="bits of the quantized weights")
    parser.add_argument("--group-size", type=positive_int, default=128, help="group size (asymmetric)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    parser.add_argument("--measure", nargs=3, metavar=("WAY", "DIR", "WARMUP_DIR"), help=argparse.SUPPRESS)  # child
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure, args.bits, args.group_size)))
        return 0
    with tempfile.TemporaryDirectory() as directory, tempfile.TemporaryDirectory() as warmup:
        write_checkpoint(warmup, 64, 1, 256, 128, min(args.experts, 4), min(args.top_k, 2))
        intermediate = args.intermediate or args.hidden * 11008 // 4096
        info = write_checkpoint(directory, args.hidden, args.layers, args.vocab, intermediate, args.experts,
                                args.top_k)
        name = f"Mixtral ({args.experts} experts, top {args.top_k})" if args.experts else "Llama"
        print(f"{name}, {info['params'] / 1e6:.0f}M parameters (bf16 checkpoint; {info['fp32_mib']:.0f} MiB in "
              f"float32), quantized to {args.bits}-bit g{args.group_size} asymmetric, float32 model")
        rows = []
        for way in WAYS:
            if way == WAYS[0] and info["fp32_mib"] > 0.8 * available_mib():
                print(f"{way}: not run, the float32 model needs {info['fp32_mib']:.0f} MiB and this machine has "
                      f"{available_mib():.0f} MiB available")
                continue
            child = [sys.executable, __file__, "--measure", way, directory, warmup, "--bits", str(args.bits),
                     "--group-size", str(args.group_size)]
            out = subprocess.run(child, check=True, capture_output=True, text=True)
            rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), **info})
    print(f"{'way':34} {'peak MiB':>9} {'model MiB':>10} {'seconds':>8}")
    for r in rows:
        print(f"{r['way']:34} {r['peak_mib']:9.0f} {r['model_mib']:10.0f} {r['seconds']:8.1f}")
    if len(rows) == 2:
        print(f"quantize_pretrained's peak is {rows[1]['peak_mib'] / rows[0]['peak_mib']:.2f}x the other's")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
