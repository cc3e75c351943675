"""Perplexity (linquant.builtin.ids_perplexity, behind `linquant eval --text`): within the model's
context, the model's own loss; beyond it, half-overlapping windows of the context, against a
reference that predicts every token on its own forward, from the text its window gives it."""

import math

import pytest
import torch

import hf_models
from linquant import builtin

pytest.importorskip("transformers")


def reference_perplexity(model, ids: torch.Tensor, window: int) -> float:
    """Token t >= 1 predicted by one forward over ids[begin:t], in float64: begin = 0 within the
    first window, else the start of the first window (starting every window // 2 tokens) that
    reaches past t."""
    stride, nll = window // 2, 0.0
    for t in range(1, ids.shape[1]):
        begin = 0 if t < window else ((t - window) // stride + 1) * stride
        logits = model(ids[:, begin:t]).logits[0, -1].double()
        nll -= float(torch.log_softmax(logits, -1)[ids[0, t]])
    return math.exp(nll / (ids.shape[1] - 1))


@pytest.mark.parametrize("tokens,window", [(100, 32), (65, 32), (64, 32), (33, 32), (40, 7), (20, 2)])
@torch.no_grad()
def test_long_texts_are_scored_in_half_overlapping_windows(tokens, window):
    model = hf_models.llama()
    ids = torch.randint(3, 512, (1, tokens), generator=torch.Generator().manual_seed(tokens + window))
    got = builtin.ids_perplexity(model, ids, window)
    assert got == pytest.approx(reference_perplexity(model, ids, window), rel=1e-5)


@torch.no_grad()
def test_a_text_within_the_context_is_the_models_own_loss_and_the_context_is_the_default_window():
    model = hf_models.llama()  # max_position_embeddings = 128
    ids = torch.randint(3, 512, (1, 128), generator=torch.Generator().manual_seed(0))
    assert builtin.ids_perplexity(model, ids) == float(torch.exp(model(ids, labels=ids).loss))
    longer = torch.randint(3, 512, (1, 300), generator=torch.Generator().manual_seed(1))
    assert builtin.ids_perplexity(model, longer) == builtin.ids_perplexity(model, longer, 128)
    assert builtin.ids_perplexity(model, longer) == pytest.approx(reference_perplexity(model, longer, 128), rel=1e-5)


def test_too_short_a_text_or_window_is_an_error_not_nan():
    model = hf_models.llama()
    with pytest.raises(ValueError, match="perplexity needs a text of at least 2 tokens, got 1"):
        builtin.ids_perplexity(model, torch.tensor([[5]]))
    with pytest.raises(ValueError, match="perplexity needs a window of at least 2 tokens, got 1"):
        builtin.ids_perplexity(model, torch.tensor([[5, 6, 7]]), 1)
