"""Model loading by name or path, and the evaluation report of `linquant eval`: footprint fp32 vs
bf16 vs quantized, per-layer weight error, output agreement (embedding cosine for encoders;
perplexity and greedy generation for causal LMs), time of a forward over the whole input and,
for causal LMs, greedy decoding time per token."""

import os
import time
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import builtin
from .metrics import metrics
from .embedding import QEmbedding
from .experts import QExpertsWeight
from .model import footprint, quantizable_layers, quantizable_projections, scheme_name
from .nn import QLinear
from .serialization import CONFIG_NAME, load_quantized, read_config

BUILTIN = {"minilm": "encoder", "smollm2": "causal-lm"}


class ModelError(ValueError):
    """A model spec that cannot be loaded (missing path, not a model, unknown name)."""


def load_model(spec: str, dtype=torch.float32, tokenizer: bool = True) -> Tuple[nn.Module, object, str]:
    """(model in eval mode, its tokenizer or None without `tokenizer`, kind) for a built-in name
    (minilm, smollm2), a local Hugging Face model directory, or a GGUF file; kind is "encoder" or
    "causal-lm". `dtype` (float32 by default; "auto" is the dtype a directory's config.json
    records) is given to from_pretrained, which keeps a model's float32 modules as they are."""
    if spec in BUILTIN:
        model, tok = builtin.load_minilm() if spec == "minilm" else builtin.load_smollm2()
        return (model if dtype in (torch.float32, "auto") else model.to(dtype)), tok, BUILTIN[spec]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if os.path.isfile(spec) and spec.endswith(".gguf"):
        directory, name = os.path.split(os.path.abspath(spec))
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
        return model.eval(), AutoTokenizer.from_pretrained(directory, gguf_file=name) if tokenizer else None, \
            "causal-lm"
    model_class, kind = hf_model_class(spec)
    model = model_class.from_pretrained(spec, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(spec) if tokenizer else None, kind


def hf_model_class(spec: str):
    """(Auto class, kind) for a local Hugging Face model directory: AutoModelForCausalLM for the
    causal LMs config.json names (any class AutoModelForCausalLM maps to), AutoModel (the base
    model: an encoder's embeddings) otherwise."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    if not os.path.exists(spec):
        raise ModelError(f"{spec}: no such file or directory (expected a model directory, a .gguf file, "
                         f"or one of {', '.join(BUILTIN)})")
    if not os.path.isfile(os.path.join(spec, "config.json")):
        raise ModelError(f"{spec}: not a Hugging Face model directory (no config.json)")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    config = AutoConfig.from_pretrained(spec)
    # The causal-LM classes AutoModelForCausalLM maps to: GPT-2's is GPT2LMHeadModel, which a test on
    # the "ForCausalLM" suffix alone took for an encoder.
    causal_classes = {name for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
                      for name in ([value] if isinstance(value, str) else value)}
    causal = any(a in causal_classes or a.endswith("ForCausalLM") for a in (config.architectures or []))
    return (AutoModelForCausalLM, "causal-lm") if causal else (AutoModel, "encoder")


def portable_spec(spec: str) -> str:
    """`spec` as it loads from any working directory: built-in names as they are, paths made
    absolute (what `linquant quantize` records for `linquant eval`)."""
    return spec if spec in BUILTIN else os.path.abspath(spec)


def load_quantized_dir(path: str, device=None, dtype=torch.float32):
    """A `linquant quantize` output directory: (source model in `dtype`, tokenizer, kind, quantized
    model), both on `device` (default CPU); the quantized model is built from the source's config
    with parameters on meta and read straight onto the device."""
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise ModelError(f"{path}: not a linquant output directory (no {CONFIG_NAME})")
    source = read_config(path).get("metadata", {}).get("source")
    if not isinstance(source, str):
        raise ModelError(f"{path}: {CONFIG_NAME} records no source model (metadata 'source' is {source!r}); "
                         "evaluate it through the Python API")
    base, tokenizer, kind = load_model(source, dtype)
    quantized = load_quantized(path, lambda: type(base)(base.config), device=device)
    return base.to(device or "cpu"), tokenizer, kind, quantized


def layer_errors(fp_model: nn.Module, q_model: nn.Module) -> List[Dict[str, float]]:
    """MSE, max error and SNR of every QLinear's dequantized weight, every QExpertsWeight's (all
    its experts together) and every QEmbedding's table, against the fp32 original."""
    originals = {name: (m.weight, transposed) for name, m, transposed in quantizable_layers(fp_model, exclude=None)}
    originals.update({name: (m.weight, False) for name, m in fp_model.named_modules() if isinstance(m, nn.Embedding)})
    originals.update({name: (getattr(m, attr), m.is_transposed)
                      for name, m, attr in quantizable_projections(fp_model, exclude=None)})
    rows = []
    for name, q in q_model.named_modules():
        if isinstance(q, (QLinear, QExpertsWeight, QEmbedding)) and name in originals:
            weight, transposed = originals[name]
            w = weight.detach().float()
            rows.append({"layer": name, **metrics(w.transpose(-1, -2) if transposed else w, q.dequantize().float())})
    return rows


def schemes(model: nn.Module, method: str = "minmax") -> str:
    """The quantization schemes of a model's QLinears in words ("4-bit g128 asymmetric"), joined
    when they differ; `method` is how their scales were chosen, which the layers do not record."""
    names = {scheme_name(m.bits, m.group_size, m.symmetric, method) for m in model.modules()
             if isinstance(m, (QLinear, QExpertsWeight, QEmbedding))}
    return ", ".join(sorted(names)) or "none"


def _synchronize(model: nn.Module) -> None:
    """Waits for the model's GPU work, so that host clocks time it (nothing to wait for on the CPU)."""
    device = builtin.device_of(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_greedy(model: nn.Module, tokenizer, new_tokens: int = 16) -> Tuple[str, float]:
    """Greedy continuation of builtin.GREEDY_PROMPT and its time per generated token in ms. At
    batch 1 each decoded token reads every weight once, so this is where smaller weights pay off
    (a forward over many tokens is compute-bound instead)."""
    _synchronize(model)
    start = time.perf_counter()
    ids = builtin.greedy_ids(model, tokenizer, builtin.GREEDY_PROMPT, new_tokens=new_tokens)
    elapsed = time.perf_counter() - start  # greedy_ids' copy to the host waited for the GPU
    # Per token generated: fewer than asked when the model ends its text first.
    return tokenizer.decode(ids, skip_special_tokens=True), elapsed / max(len(ids), 1) * 1e3


def _time_ms(model: nn.Module, fn, repeat: int = 3) -> float:
    fn()
    _synchronize(model)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    _synchronize(model)
    return (time.perf_counter() - start) / repeat * 1e3


@torch.no_grad()
def agreement(kind: str, model: nn.Module, tokenizer, reference: Optional[dict] = None, text: Optional[str] = None,
              max_tokens: Optional[int] = None) -> dict:
    """Output quality and speed: embeddings' cosine to the reference (encoders) or perplexity and
    greedy text (causal LMs); the time of one forward over the input ("forward_ms", over
    "forward_tokens" tokens: for a causal LM, the prefill of its text, at most its context) and,
    for causal LMs, greedy decoding time per token ("decode_ms_per_token"). The input is the
    built-in one, or `text`: a causal LM's perplexity is taken over it (its first `max_tokens`
    tokens when given; "perplexity_tokens" counts them), an encoder embeds its non-empty lines."""
    if kind == "encoder":
        sentences = builtin.SENTENCES if text is None else [line for line in text.splitlines() if line.strip()]
        if not sentences:
            raise ValueError("linquant: the text has no non-empty line to embed")
        emb = builtin.sentence_embeddings(model, tokenizer, sentences)
        batch = tokenizer(sentences, padding=True, return_tensors="pt").to(builtin.device_of(model))
        out = {"embeddings": emb, "forward_ms": _time_ms(model, lambda: model(**batch)),
               "forward_tokens": batch["input_ids"].numel()}
        if reference is not None:
            cos = (emb * reference["embeddings"]).sum(-1)
            out.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))
        return out
    text = builtin.PERPLEXITY_TEXT if text is None else text
    all_ids = builtin.token_ids(tokenizer, text, max_tokens)
    ids = all_ids[:, :builtin.context_length(model)].to(builtin.device_of(model))  # no forward beyond the context
    perplexity = builtin.ids_perplexity(model, all_ids)
    greedy, decode_ms = timed_greedy(model, tokenizer)  # after perplexity's forward, so not timing a cold start
    return {"perplexity": perplexity, "perplexity_tokens": all_ids.shape[1], "greedy": greedy,
            "forward_ms": _time_ms(model, lambda: model(ids)), "forward_tokens": ids.numel(),
            "decode_ms_per_token": decode_ms}


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's first floating-point parameter (its dtype, for a model in one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def report(fp_model: nn.Module, q_model: nn.Module, tokenizer, kind: str, method: str = "minmax",
           text: Optional[str] = None, max_tokens: Optional[int] = None) -> dict:
    """The `linquant eval` report for a quantized model (its scales chosen by `method`) and its
    float original, on the built-in input or `text` (agreement's). Rows are named by dtype: the
    original's ("fp32", or "bf16" / "fp16" for a model read in that dtype, which a model too large
    for memory in fp32 needs), and for an fp32 original a "bf16" row, which converts `fp_model` in
    place, last: a bf16 copy beside it would hold the float model one and a half times."""
    ref = agreement(kind, fp_model, tokenizer, text=text, max_tokens=max_tokens)
    layers = layer_errors(fp_model, q_model)
    quantized = {"bytes": footprint(q_model)["total"], **agreement(kind, q_model, tokenizer, ref, text, max_tokens)}
    reference_dtype = float_dtype(fp_model)
    rows = {DTYPE_NAMES.get(reference_dtype, str(reference_dtype)): {"bytes": footprint(fp_model)["total"], **ref}}
    if reference_dtype == torch.float32:
        bf16 = fp_model.to(torch.bfloat16)
        rows["bf16"] = {"bytes": footprint(bf16)["total"], **agreement(kind, bf16, tokenizer, ref, text, max_tokens)}
    rows["quantized"] = quantized
    for r in rows.values():
        r.pop("embeddings", None)
    return {"kind": kind, "scheme": schemes(q_model, method), "models": rows, "layers": layers}
