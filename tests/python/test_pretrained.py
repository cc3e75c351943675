"""quantize_pretrained: a Hugging Face checkpoint quantized tensor by tensor equals, tensor for tensor,
from_pretrained followed by quantize_model (the independent reference: the whole float model in
memory), for Conv1D and Linear models, tied and untied heads, sharded checkpoints, head and base
classes, float32 and bf16, and architectures whose checkpoints transformers renames, ties, leaves
tensors out of or keeps partly in float32; with less memory; and damaged checkpoints, and those
transformers merges tensors of while loading, are named."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import hf_models
import linquant as lq

transformers = pytest.importorskip("transformers")
from transformers import AutoModel, AutoModelForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def bert(head):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=512, max_position_embeddings=64)
    return getattr(transformers, head)(cfg).eval()


def perturbed(model, gen):
    """The model with fresh random weights (its initialisation is seeded: every run would see the
    same numbers otherwise), biases included."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def save(model, directory, shard=None, dtype=None):
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    return directory


def assert_same_state(reference, got):
    ref, new = reference.state_dict(), got.state_dict()
    assert ref.keys() == new.keys()
    for key in ref:
        assert ref[key].dtype == new[key].dtype, key
        assert torch.equal(ref[key], new[key]), key
    qlinears = lambda m: [n for n, mod in m.named_modules() if isinstance(mod, lq.QLinear)]  # noqa: E731
    assert qlinears(reference) == qlinears(got) and qlinears(got)


FORMATS = [(8, None, True), (4, 16, False), (2, 32, True)]


@pytest.mark.parametrize("make", [hf_models.gpt2, hf_models.llama, tied_llama], ids=["gpt2", "llama", "tied-llama"])
@pytest.mark.parametrize("bits,group_size,symmetric", FORMATS, ids=["w8", "w4g16a", "w2g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("exclude", [["lm_head"], None], ids=["keep-head", "all"])
def test_equals_from_pretrained_then_quantize_model(tmp_path, gen, make, bits, group_size, symmetric, dtype, exclude):
    # Sharded, and stored in bf16 for half the cases (the tensors are cast to the dtype asked for).
    shard = "40KB" if bits == 4 else None
    directory = save(perturbed(make(), gen), tmp_path, shard, torch.bfloat16 if dtype == torch.float32 else None)
    options = dict(bits=bits, group_size=group_size, symmetric=symmetric, exclude=exclude)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied head's warning: checked below
        reference = lq.quantize_model(AutoModelForCausalLM.from_pretrained(directory, dtype=dtype), **options)
        got = lq.quantize_pretrained(directory, dtype=dtype, **options)
    assert_same_state(reference, got)
    assert not got.training
    ids = torch.randint(0, 512, (2, 7), generator=gen)
    assert torch.equal(reference(ids).logits, got(ids).logits)
    head_tied = exclude is not None and make is not hf_models.llama
    assert (got.lm_head.weight is got.get_input_embeddings().weight) == head_tied
    assert got.generation_config.eos_token_id == reference.generation_config.eos_token_id


@pytest.mark.parametrize("make", [hf_models.gpt2, tied_llama], ids=["gpt2", "tied-llama"])
@pytest.mark.parametrize("exclude", [["lm_head"], None], ids=["keep-head", "all"])
@pytest.mark.parametrize("embeddings", [True, 8], ids=["same-format", "8-bit-tables"])
def test_embeddings_quantized_as_read_equal_quantize_models(tmp_path, gen, make, exclude, embeddings):
    # The head, quantized too, shares the embedding's table (in the table's format), as
    # quantize_model's tied_head.
    directory = save(perturbed(make(), gen), tmp_path, "40KB", torch.bfloat16)
    options = dict(bits=4, group_size=16, symmetric=False, exclude=exclude, embeddings=embeddings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float head's broken tie: quantize_model's warning
        reference = lq.quantize_model(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), **options)
        got = lq.quantize_pretrained(directory, **options)
    assert_same_state(reference, got)
    assert isinstance(got.get_input_embeddings(), lq.QEmbedding)
    assert (getattr(got.lm_head, "qweight", None) is got.get_input_embeddings().qweight) == (exclude is None)
    assert got.get_input_embeddings().bits == (8 if embeddings == 8 else 4)
    assert lq.footprint(got)["total"] == lq.footprint(reference)["total"]
    ids = torch.randint(0, 512, (2, 7), generator=gen)
    assert torch.equal(reference(ids).logits, got(ids).logits)


def test_mse_scales_equal_quantize_models(tmp_path, gen):
    directory = save(perturbed(hf_models.gpt2(), gen), tmp_path)
    options = dict(bits=2, group_size=16, symmetric=False, method="mse")
    reference = lq.quantize_model(AutoModelForCausalLM.from_pretrained(directory), **options)
    got = lq.quantize_pretrained(directory, **options)
    assert_same_state(reference, got)
    minmax = lq.quantize_pretrained(directory, bits=2, group_size=16, symmetric=False)
    assert not torch.equal(got.transformer.h[0].mlp.c_fc.scales, minmax.transformer.h[0].mlp.c_fc.scales)


@pytest.mark.parametrize("exclude", [["lm_head"], None], ids=["keep-head", "all"])
@pytest.mark.parametrize("embeddings", [False, True], ids=["float-embeddings", "quantized-embeddings"])
def test_an_encoder_decoder_with_embeddings_shared_three_ways(tmp_path, gen, exclude, embeddings):
    # T5: `shared` is the encoder's and the decoder's embedding (and the head's, when tied); its
    # embeddings quantized, one QEmbedding at the three places, the head sharing its table.
    from transformers import T5ForConditionalGeneration
    directory = save(perturbed(hf_models.t5(), gen), tmp_path)
    options = dict(bits=4, group_size=16, exclude=exclude, embeddings=embeddings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lq.quantize_model(T5ForConditionalGeneration.from_pretrained(directory), **options)
        got = lq.quantize_pretrained(directory, **options)
    assert_same_state(reference, got)
    if embeddings:
        assert got.encoder.embed_tokens is got.shared is got.decoder.embed_tokens
        assert isinstance(got.shared, lq.QEmbedding)
        assert (getattr(got.lm_head, "qweight", None) is got.shared.qweight) == (not exclude)
    else:
        assert got.encoder.embed_tokens.weight is got.shared.weight is got.decoder.embed_tokens.weight
    ids = torch.randint(0, 512, (2, 6), generator=gen)
    assert torch.equal(reference(input_ids=ids, decoder_input_ids=ids).logits,
                       got(input_ids=ids, decoder_input_ids=ids).logits)


def test_auto_dtype_is_the_checkpoints(tmp_path):
    directory = save(hf_models.llama(), tmp_path, dtype=torch.bfloat16)  # config.json records bfloat16
    reference = lq.quantize_model(AutoModelForCausalLM.from_pretrained(directory, dtype="auto"), bits=4,
                                  group_size=32)
    got = lq.quantize_pretrained(directory, bits=4, group_size=32, dtype="auto")
    assert got.model.layers[0].mlp.up_proj.scales.dtype == torch.bfloat16 == got.model.norm.weight.dtype
    assert_same_state(reference, got)
    with pytest.raises(ValueError, match="dtype must be float32, float16, bfloat16 or 'auto', got torch.int8"):
        lq.quantize_pretrained(directory, bits=4, dtype=torch.int8)


def test_a_tied_head_quantized_warns_as_quantize_model_does(tmp_path):
    directory = save(tied_llama(), tmp_path)
    with pytest.warns(UserWarning, match="quantize_pretrained: layer 'lm_head' shares its weight"):
        model = lq.quantize_pretrained(directory, bits=8, exclude=None)
    assert isinstance(model.lm_head, lq.QLinear)


def test_an_encoder_base_model_from_a_head_checkpoint(tmp_path, gen):
    # BertForSequenceClassification's tensors are named "bert.encoder...": AutoModel (BertModel)
    # takes them without the prefix and leaves the head ("classifier...") out, naming it.
    directory = save(perturbed(bert("BertForSequenceClassification"), gen), tmp_path)
    reference = lq.quantize_model(AutoModel.from_pretrained(directory), bits=4, group_size=16)
    with pytest.warns(UserWarning, match=r"2 checkpoint tensors have no place in the model and were skipped "
                                         r"\(classifier\.bias, classifier\.weight\)"):
        got = lq.quantize_pretrained(directory, bits=4, group_size=16, model_class=AutoModel)
    assert type(got).__name__ == "BertModel"
    assert_same_state(reference, got)
    ids = torch.randint(0, 512, (2, 9), generator=gen)
    assert torch.equal(reference(ids).last_hidden_state, got(ids).last_hidden_state)


def test_weights_the_checkpoint_lacks_are_named_not_made_up(tmp_path):
    # BertForMaskedLM has no pooler: from_pretrained would initialise BertModel's at random.
    directory = save(bert("BertForMaskedLM"), tmp_path)
    with pytest.raises(lq.CheckpointMismatch, match=r"no tensor for 2 of the model's weights \(pooler\.dense, "
                                                    r"pooler\.dense\.bias\)"):
        lq.quantize_pretrained(directory, bits=8, model_class=AutoModel)


def test_a_head_model_from_a_base_checkpoint(tmp_path, gen):
    # GPT2Model's tensors lack the "transformer." prefix GPT2LMHeadModel gives them; its head is tied.
    base = perturbed(hf_models.gpt2(), gen).transformer
    directory = save(base, tmp_path)
    from transformers import GPT2LMHeadModel
    reference = lq.quantize_model(GPT2LMHeadModel.from_pretrained(directory), bits=8)
    got = lq.quantize_pretrained(directory, bits=8, model_class=GPT2LMHeadModel)
    assert_same_state(reference, got)
    assert got.lm_head.weight is got.transformer.wte.weight


def test_device_and_layers_on_it(tmp_path):
    directory = save(hf_models.llama(), tmp_path)
    model = lq.quantize_pretrained(directory, bits=4, group_size=32, device="cpu")
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}
    assert all(b.device.type == "cpu" for b in model.buffers())


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_damaged_checkpoints_are_named(tmp_path):
    llama = hf_models.llama()
    directory = save(llama, tmp_path / "ok")

    def damaged(name, edit=None, config_edit=None):
        target = tmp_path / name
        target.mkdir()
        for file in os.listdir(directory):
            (target / file).write_bytes(Path(directory, file).read_bytes())
        if edit:
            _rewrite(str(target / "model.safetensors"), edit)
        if config_edit:
            cfg = json.loads((target / "config.json").read_text())
            config_edit(cfg)
            (target / "config.json").write_text(json.dumps(cfg))
        return target

    missing = damaged("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(lq.CheckpointMismatch, match=r"no tensor for 1 of the model's weights "
                                                    r"\(model\.layers\.1\.mlp\.up_proj\)"):
        lq.quantize_pretrained(missing, bits=4, group_size=32)
    norm = damaged("norm", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(lq.CheckpointMismatch, match=r"model\.norm\.weight"):
        lq.quantize_pretrained(norm, bits=8)
    shape = damaged("shape", config_edit=lambda c: c.update(intermediate_size=192))
    with pytest.raises(lq.CheckpointMismatch, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' is \[64, 128\] in the "
                                                    r"checkpoint but \[64, 192\] in the model"):
        lq.quantize_pretrained(shape, bits=8)
    nan = damaged("nan", lambda t: t["model.layers.0.self_attn.q_proj.weight"].view(-1)[3:4].fill_(float("nan")))
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj'"):
        lq.quantize_pretrained(nan, bits=8)
    norm_shape = damaged("norm_shape", lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(lq.CheckpointMismatch, match=r"'model\.norm\.weight' is \[65\] in the checkpoint but \[64\]"):
        lq.quantize_pretrained(norm_shape, bits=8)

    with pytest.raises(ValueError, match="bits must be 8, 4 or 2, got 3"):
        lq.quantize_pretrained(directory, bits=3)
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        lq.quantize_pretrained(tmp_path, bits=8)

    pickled = tmp_path / "pickled"  # an older checkpoint format
    pickled.mkdir()
    (pickled / "config.json").write_text(Path(directory, "config.json").read_text())
    torch.save(llama.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(lq.CheckpointMismatch, match="holds no safetensors weights"):
        lq.quantize_pretrained(pickled, bits=8)

    sharded = save(llama, tmp_path / "sharded", shard="40KB")
    first_shard = sorted(f for f in os.listdir(sharded) if f.startswith("model-"))[0]
    os.remove(os.path.join(sharded, first_shard))
    with pytest.raises(FileNotFoundError, match="names shards that are not in"):
        lq.quantize_pretrained(sharded, bits=8)
    Path(sharded, "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ValueError, match="is not a safetensors index"):
        lq.quantize_pretrained(sharded, bits=8)


def test_less_memory_than_loading_the_float_model(tmp_path):
    # The benchmark, small: a Llama of 68M parameters, each way in its own process.
    bench = ROOT / "bench" / "bench_pretrained_memory.py"
    out = subprocess.run([sys.executable, str(bench), "--hidden", "1024", "--intermediate", "2816", "--layers", "4",
                          "--vocab", "8000", "--json", tmp_path / "rows.json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    full, streamed = rows
    assert full["model_mib"] == pytest.approx(streamed["model_mib"])
    # The float model alone is 259 MiB, the quantized one 90 MiB (its float32 embedding and head
    # are most of it). Measured: 293 and 148 MiB.
    assert full["peak_mib"] > full["fp32_mib"] * 0.9, rows
    assert streamed["peak_mib"] < streamed["model_mib"] + 0.35 * full["fp32_mib"], rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_read_and_quantized_on_the_gpu_as_on_the_cpu(tmp_path, gen):
    directory = save(perturbed(hf_models.gpt2(), gen), tmp_path)  # Conv1D: transposed on the GPU
    on_cpu = lq.quantize_pretrained(directory, bits=4, group_size=32, symmetric=False)
    on_gpu = lq.quantize_pretrained(directory, bits=4, group_size=32, symmetric=False, device="cuda")
    assert {t.device.type for t in on_gpu.state_dict().values()} == {"cuda"}
    assert all(b.device.type == "cuda" for b in on_gpu.buffers())
    assert_same_state(on_cpu, on_gpu.cpu())


def _config(name):
    """Tiny configs of architectures whose checkpoints take different paths through quantize_pretrained."""
    t = transformers
    tokens = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    decoder = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   vocab_size=512, max_position_embeddings=64, **tokens)
    return {
        # transformers renames its head while loading: embed_out -> lm_head
        "gpt-neox": lambda: t.GPTNeoXConfig(**decoder),
        # saved as encoder.layer.N.attention.attention.query..., renamed to layers.N.attention.q_proj...
        "vit": lambda: t.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=112,
                                   image_size=16, patch_size=4),
        # the quantized decoder's bias is cls.predictions.bias (tied), its weight the word embedding
        "bert-mlm": lambda: t.BertConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=512, max_position_embeddings=64),
        # sinusoidal position tables save_pretrained leaves out (from_pretrained computes them)
        "marian": lambda: t.MarianConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                         decoder_attention_heads=4, encoder_ffn_dim=112, decoder_ffn_dim=112,
                                         vocab_size=512, max_position_embeddings=64, decoder_start_token_id=2,
                                         **tokens),
        # float16 keeps the feed-forward output `wo` in float32 (_keep_in_fp32_modules): its scales too
        "t5": lambda: t.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=512,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
        # float16 keeps its norms in float32; experts stored whole (3-D), as the model holds them
        "gpt-oss": lambda: t.GptOssConfig(**{**decoder, "max_position_embeddings": 128}, num_key_value_heads=2,
                                          head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                          sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
        # experts stored one Linear each, stacked (gate and up concatenated) into 3-D parameters
        # while loading: each quantized into its rows
        "mixtral": lambda: t.MixtralConfig(**decoder, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2),
    }[name]()


ARCHITECTURES = [  # name, auto class, dtype, shard size
    ("gpt-neox", "AutoModelForCausalLM", torch.float32, "40KB"),
    ("vit", "AutoModel", torch.bfloat16, None),
    ("bert-mlm", "AutoModelForMaskedLM", torch.float32, None),
    ("marian", "AutoModelForSeq2SeqLM", torch.float32, "40KB"),
    ("t5", "AutoModelForSeq2SeqLM", torch.float16, None),
    ("gpt-oss", "AutoModelForCausalLM", torch.float16, None),
    ("mixtral", "AutoModelForCausalLM", torch.bfloat16, "40KB"),
]


def _inputs(name, gen, dtype):
    ids = torch.randint(3, 512, (2, 7), generator=gen)
    if name == "vit":
        return dict(pixel_values=torch.randn(2, 3, 16, 16, generator=gen).to(dtype))
    if name in ("marian", "t5"):
        return dict(input_ids=ids, decoder_input_ids=ids[:, :5])
    return dict(input_ids=ids)


@pytest.mark.parametrize("name,auto,dtype,shard", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_architectures_equal_from_pretrained_then_quantize_model(tmp_path, gen, name, auto, dtype, shard):
    auto = getattr(transformers, auto)
    torch.manual_seed(0)
    directory = save(perturbed(auto.from_config(_config(name)).eval(), gen), tmp_path, shard)
    options = dict(bits=4, group_size=16, symmetric=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BERT's tied decoder: quantize_model's warning
        reference = lq.quantize_model(auto.from_pretrained(directory, dtype=dtype), **options)
        got = lq.quantize_pretrained(directory, dtype=dtype, model_class=auto, **options)
    assert_same_state(reference, got)
    inputs = _inputs(name, gen, dtype)
    with torch.no_grad():
        out, expected = got(**inputs), reference(**inputs)
    key = "last_hidden_state" if name == "vit" else "logits"
    assert torch.equal(out[key], expected[key])
    if dtype == torch.float16 and name == "t5":
        assert got.encoder.block[0].layer[1].DenseReluDense.wo.scales.dtype == torch.float32
        assert got.encoder.block[0].layer[0].SelfAttention.q.scales.dtype == torch.float16


def test_tensors_transformers_merges_into_float_parameters_are_refused_before_quantizing(tmp_path, monkeypatch):
    # Mixtral's experts are stored one Linear each and fused into 3-D parameters by from_pretrained:
    # kept in float (excluded), they would have to be merged here.
    directory = save(AutoModelForCausalLM.from_config(_config("mixtral")), tmp_path)
    calls = []
    monkeypatch.setattr(lq.QLinear, "set_weight", lambda *args, **kwargs: calls.append(args))
    message = (r"transformers converts 24 of the checkpoint's tensors in .* merging or splitting them into the "
               r"model's parameters \(model\.layers\.\d\.block_sparse_moe\.experts\.\d\.w\d\.weight -> "
               r"model\.layers\.\d\.mlp\.experts\.(gate_up|down)_proj, .*load it with from_pretrained and "
               r"quantize it with quantize_model")
    with pytest.raises(lq.CheckpointMismatch, match=message):
        lq.quantize_pretrained(directory, bits=4, group_size=16, exclude=["lm_head", "experts"])
    assert not calls


@pytest.mark.parametrize("damage,message", [
    ("missing", r"the checkpoint's 3 tensors for 'model\.layers\.0\.mlp\.experts\.gate_up_proj' "
                r"\(model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight, \.\.\.\) are \[\(128, 64\)\]; "
                r"the model's 4 experts take one \[rows, 64\] each"),
    ("rows", r"the checkpoint's tensors for 'model\.layers\.0\.mlp\.experts\.gate_up_proj' give each expert 136 "
             r"rows; the model's have 256"),
])
def test_per_expert_tensors_that_do_not_fill_the_experts_are_named(tmp_path, damage, message):
    directory = save(AutoModelForCausalLM.from_config(_config("mixtral")), tmp_path)

    def edit(tensors):
        if damage == "missing":
            del tensors["model.layers.0.block_sparse_moe.experts.3.w1.weight"]
        else:  # every expert's up projection 120 rows short
            for e in range(4):
                key = f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight"
                tensors[key] = tensors[key][:8].contiguous()

    _edited(directory, edit)
    with pytest.raises(lq.CheckpointMismatch, match=message):
        lq.quantize_pretrained(directory, bits=4, group_size=16)


def _edited(directory, edit):
    _rewrite(str(Path(directory, "model.safetensors")), edit)
    return directory


@pytest.mark.parametrize("case", ["head-differs", "head-only", "decoder-bias-differs", "decoder-bias-only"])
def test_tied_parameters_are_tied_as_from_pretrained_ties_them(tmp_path, gen, case):
    # from_pretrained ties the names of a tied parameter to whichever the checkpoint holds, and
    # unties those it holds with other values.
    if case.startswith("head"):  # lm_head's weight is the token embedding
        model, auto, layer = tied_llama(), AutoModelForCausalLM, "lm_head"
        tied, first = "lm_head.weight", "model.embed_tokens.weight"
    else:  # the MLM decoder's bias is cls.predictions.bias
        model, auto, layer = bert("BertForMaskedLM"), transformers.AutoModelForMaskedLM, "cls.predictions.decoder"
        tied, first = "cls.predictions.decoder.bias", "cls.predictions.bias"
    directory = save(perturbed(model, gen), tmp_path)

    def edit(tensors):
        if case.endswith("differs"):
            tensors[tied] = tensors[first] + torch.randn(tensors[first].shape, generator=gen)
        else:
            tensors[tied] = tensors.pop(first)

    _edited(directory, edit)
    ids = torch.randint(0, 512, (2, 7), generator=gen)
    # The layer kept in float, and quantized; for the head, the embedding quantized too (the head
    # then shares its table, unless the checkpoint holds them with different values).
    for exclude, embeddings in [([layer], False), (None, False)] + [(None, True)] * case.startswith("head"):
        options = dict(bits=4, group_size=16, exclude=exclude, embeddings=embeddings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = lq.quantize_model(auto.from_pretrained(directory), **options)
            got = lq.quantize_pretrained(directory, model_class=auto, **options)
        assert_same_state(reference, got)
        assert torch.equal(reference(ids).logits, got(ids).logits)
        if embeddings:
            shared = got.lm_head.qweight is got.model.embed_tokens.qweight
            assert shared == (case == "head-only") == (reference.lm_head.qweight is reference.model.embed_tokens.qweight)


def test_declared_missing_weights_initialised_at_random_are_named(tmp_path, monkeypatch):
    # Marian's position tables, declared missing, are computed (test above); a declared weight that
    # from_pretrained would initialise at random is still missing.
    from transformers import BertModel
    directory = save(bert("BertForMaskedLM"), tmp_path)  # no pooler
    monkeypatch.setattr(BertModel, "_keys_to_ignore_on_load_missing", [r"pooler\.dense"])
    with pytest.raises(lq.CheckpointMismatch, match=r"no tensor for 2 of the model's weights \(pooler\.dense\.weight, "
                                                    r"pooler\.dense\.bias\), which from_pretrained would initialise"):
        lq.quantize_pretrained(directory, bits=8, model_class=AutoModel, exclude=["pooler.dense"])
