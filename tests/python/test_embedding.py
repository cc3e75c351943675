"""QEmbedding and quantize_model(embeddings=True): a table's looked-up rows against the float64
reference formulas, on fresh random tables and awkward ids and shapes; the format QLinear holds;
a tied lm_head sharing the quantized table (one copy, kept through save/load); language models
against their reference; what is left alone and the errors."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import linquant as lq
from conftest import cuda_only
from reference import ref_stored_weight, ref_weight_format

transformers = pytest.importorskip("transformers")


def reference_table(w, bits, group_size, symmetric):
    """float64 [V, D] table that w's quantized format stands for (reference.py's formulas)."""
    return ref_stored_weight(*ref_weight_format(w, bits, group_size, symmetric), bits, group_size, w.shape[1])


FORMATS = [(8, None, True), (8, 32, False), (4, 16, False), (4, None, True), (2, 8, True), (2, 32, False)]


@pytest.mark.parametrize("bits,group_size,symmetric", FORMATS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lookups_match_the_float64_reference(gen, bits, group_size, symmetric, dtype):
    table = (torch.randn(37, 40, generator=gen) * 0.3).to(dtype)  # D = 40: not a multiple of 16 or 32
    emb = nn.Embedding(37, 40, padding_idx=0)
    emb.weight = nn.Parameter(table)
    q = lq.QEmbedding.from_embedding(emb, bits, group_size, symmetric)
    expected = reference_table(table, bits, group_size, symmetric)
    for ids in [torch.tensor(5), torch.tensor([36]), torch.randint(0, 37, (3, 7), generator=gen),
                torch.randint(0, 37, (2, 3, 4), generator=gen, dtype=torch.int32),
                torch.randint(0, 37, (5, 8), generator=gen)[:, ::2], torch.zeros(0, 3, dtype=torch.long)]:
        out = q(ids)
        assert out.dtype == dtype and out.shape == (*ids.shape, 40)
        assert torch.equal(out, expected[ids.long()].to(dtype)), ids  # s * (q - z) rounded once
    assert torch.equal(q.weight, expected.to(dtype))
    assert q.padding_idx == 0 and "37, 40, padding_idx=0" in repr(q)


def test_the_table_is_a_qlinears_format(gen):
    w = torch.randn(50, 72, generator=gen)
    emb, linear = nn.Embedding(50, 72), nn.Linear(72, 50, bias=False)
    emb.weight, linear.weight = nn.Parameter(w), nn.Parameter(w.clone())
    q, ql = lq.QEmbedding.from_embedding(emb, 4, 16, False), lq.QLinear.from_linear(linear, 4, 16, False)
    for attr in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(q, attr), getattr(ql, attr))


def test_bad_input_is_named(gen):
    q = lq.QEmbedding.from_embedding(nn.Embedding(10, 16), 8)
    with pytest.raises(TypeError, match="ids must be int64 or int32 indices, got torch.float32"):
        q(torch.zeros(2))
    with pytest.raises(IndexError, match=r"ids must be in \[0, 10\), got values from -1 to 3"):
        q(torch.tensor([3, -1]))
    with pytest.raises(IndexError, match=r"ids must be in \[0, 10\), got values from 0 to 10"):
        q(torch.tensor([[0], [10]]))
    with pytest.raises(ValueError, match="max_norm rewrites its rows"):
        lq.QEmbedding.from_embedding(nn.Embedding(10, 16, max_norm=1.0), 8)
    with pytest.raises(ValueError, match=r"weight must be \[num_embeddings, embedding_dim\] = \[10, 16\], got \[10, 8\]"):
        q.set_weight(torch.zeros(10, 8))
    with pytest.raises(ValueError, match="multiple of 2 at 4 bits"):
        lq.QEmbedding(10, 16, bits=4, group_size=3)
    with pytest.raises(TypeError, match="linquant.QEmbedding: padding_idx must be an int or None, got float"):
        lq.QEmbedding(10, 16, padding_idx=1.0)
    with pytest.raises(ValueError, match="scales and bias must stay float32, float16 or bfloat16"):
        q.double()
    assert q.to(torch.bfloat16).scales.dtype == torch.bfloat16 and q.qweight.dtype == torch.int8


@pytest.mark.parametrize("padding_idx", [0, 9, -1, -10, None])
def test_padding_idx_is_normalized_as_nn_embedding_does(padding_idx):
    assert lq.QEmbedding(10, 16, padding_idx=padding_idx).padding_idx == nn.Embedding(10, 16, padding_idx).padding_idx


@pytest.mark.parametrize("padding_idx", [10, 20, -11])
def test_padding_idx_outside_the_table_is_refused_as_nn_embedding_refuses_it(padding_idx):
    with pytest.raises(AssertionError):
        nn.Embedding(10, 16, padding_idx)
    with pytest.raises(ValueError, match=f"linquant.QEmbedding: padding_idx must be within num_embeddings = 10, "
                                         f"got {padding_idx}"):
        lq.QEmbedding(10, 16, padding_idx=padding_idx)


def tied_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def reference_model(model, bits, group_size, symmetric):
    """float64 copy whose embedding and linear layers hold their reference weights (the tied head
    the embedding's, so both)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(reference_table(module.weight.detach(), bits, group_size, symmetric))
    return ref.double()


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 32, False)], ids=str)
def test_a_tied_head_shares_the_quantized_table(gen, bits, group_size, symmetric):
    model = tied_llama()
    ref = reference_model(model, bits, group_size, symmetric)
    before = lq.footprint(model)["total"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tie is kept: no warning
        lq.quantize_model(model, bits, group_size, symmetric, exclude=[], embeddings=True)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, lq.QEmbedding) and isinstance(head, lq.QLinear)
    assert head.qweight is emb.qweight and head.scales is emb.scales and head.zeros is emb.zeros
    # One table: 300 x 64 values plus scales (and zero points), counted once.
    table = emb.qweight.numel() + emb.scales.numel() * 4 + (0 if symmetric else emb.zeros.numel() * 4)
    layers = sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, lq.QLinear) and m is not head
                 for t in m.state_dict().values())
    floats = sum(t.numel() * t.element_size() for m in model.modules() if not isinstance(m, (lq.QLinear, lq.QEmbedding))
                 for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])  # norms, rotary tables
    assert lq.footprint(model)["total"] == table + layers + floats < before
    ids = torch.randint(0, 300, (2, 11), generator=gen)
    with torch.no_grad():
        out, expected = model(ids).logits, ref(ids).logits
    assert float((out.double() - expected).norm() / expected.norm()) < 1e-5


def test_tables_in_a_format_of_their_own(gen):
    # embeddings=8: the table and the head tied to it at 8 bits per channel beside 4-bit layers, as
    # quantizing twice gives them (layers first, then what is left in float: the table and head).
    model = lq.quantize_model(tied_llama(), bits=4, group_size=32, symmetric=False, exclude=[], embeddings=8)
    twice = lq.quantize_model(tied_llama(), bits=4, group_size=32, symmetric=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the first call's float head, tied: its warning
        twice = lq.quantize_model(twice, bits=8, exclude=[], embeddings=True)
    emb, head = model.model.embed_tokens, model.lm_head
    assert (emb.bits, emb.group_size, emb.symmetric) == (head.bits, head.group_size, head.symmetric) == (8, None, True)
    assert head.qweight is emb.qweight and head.scales is emb.scales
    layer = model.model.layers[0].mlp.up_proj
    assert (layer.bits, layer.group_size, layer.symmetric) == (4, 32, False)
    assert model.state_dict().keys() == twice.state_dict().keys()
    assert all(torch.equal(t, twice.state_dict()[k]) for k, t in model.state_dict().items())
    ids = torch.randint(0, 300, (2, 9), generator=gen)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twice(ids).logits)
    for bad in (3, "8", 8.0, None):
        with pytest.raises(ValueError, match=r"embeddings must be True, False or the tables' bits \(8, 4 or 2\), got"):
            lq.quantize_model(tied_llama(), bits=4, embeddings=bad)


def test_a_float_head_keeps_its_weight_and_says_so():
    model = tied_llama()
    with pytest.warns(UserWarning, match=r"embedding 'model.embed_tokens' shares its weight with 'lm_head' \(tied "
                                         r"weights\), which stays in float"):
        lq.quantize_model(model, bits=8, embeddings=True)  # lm_head excluded by default
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, lq.QEmbedding)


def test_embeddings_are_left_alone_unless_asked_and_when_excluded():
    model = lq.quantize_model(tied_llama(), bits=8)
    assert type(model.model.embed_tokens) is nn.Embedding
    model = lq.quantize_model(tied_llama(), bits=8, exclude=["lm_head", "embed_tokens"], embeddings=True)
    assert type(model.model.embed_tokens) is nn.Embedding

    class Scaled(nn.Embedding):  # as Gemma's: its forward is not a lookup alone
        def forward(self, ids):
            return super().forward(ids) * 8.0

    net = nn.Sequential(Scaled(10, 16), nn.Embedding(10, 16, max_norm=1.0))
    with pytest.warns(UserWarning, match="nothing to quantize"):
        lq.quantize_model(net, bits=8, exclude=None, embeddings=True)
    assert type(net[0]) is Scaled and type(net[1]) is nn.Embedding


def test_save_load_keeps_one_shared_table(tmp_path, gen):
    model = lq.quantize_model(tied_llama(), bits=4, group_size=16, exclude=[], embeddings=True)
    lq.save_quantized(model, str(tmp_path / "q"))
    config = json.loads((tmp_path / "q" / "linquant.json").read_text())
    assert config["embeddings"] == {"model.embed_tokens": {"num_embeddings": 300, "embedding_dim": 64,
                                                           "padding_idx": None, "bits": 4, "group_size": 16,
                                                           "symmetric": True, "dtype": "float32"}}
    assert config["tied"] == {"lm_head.qweight": "model.embed_tokens.qweight",
                              "lm_head.scales": "model.embed_tokens.scales"}
    loaded = lq.load_quantized(str(tmp_path / "q"))
    assert loaded.lm_head.qweight is loaded.model.embed_tokens.qweight
    assert lq.footprint(loaded)["total"] == lq.footprint(model)["total"]
    ids = torch.randint(0, 300, (1, 9), generator=gen)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    config["embeddings"]["model.embed_tokens"]["embedding_dim"] = "64"
    (tmp_path / "q" / "linquant.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="embedding 'model.embed_tokens' has a missing or invalid 'embedding_dim'"):
        lq.load_quantized(str(tmp_path / "q"))


def test_a_bare_embedding_is_quantized_saved_and_loaded(tmp_path, gen):
    q = lq.quantize_model(nn.Embedding(20, 24), bits=2, group_size=8, embeddings=True)
    assert isinstance(q, lq.QEmbedding)
    lq.save_quantized(q, str(tmp_path / "q"))
    loaded = lq.load_quantized(str(tmp_path / "q"), lambda: nn.Embedding(20, 24))
    ids = torch.randint(0, 20, (6,), generator=gen)
    assert torch.equal(loaded(ids), q(ids))


def test_compiled_fullgraph_and_traced(gen):
    q = lq.QEmbedding.from_embedding(nn.Embedding(50, 24), 4, 8, False)
    ids = torch.randint(0, 50, (3, 4), generator=gen)
    assert torch.equal(torch.compile(q, fullgraph=True)(ids), q(ids))
    traced = torch.jit.trace(q, (ids,))
    other = torch.randint(0, 50, (5, 2), generator=gen)
    assert torch.equal(traced(other), q(other))


@cuda_only
def test_lookups_on_the_gpu_as_on_the_cpu(gen):
    q = lq.QEmbedding.from_embedding(nn.Embedding(64, 40).to(torch.bfloat16), 4, 16, False)
    ids = torch.randint(0, 64, (3, 5), generator=gen)
    assert torch.equal(q.cuda()(ids.cuda()).cpu(), q.cpu()(ids))
