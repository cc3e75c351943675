"""quantize_model, footprint and save/load on randomly initialised Hugging Face models (GPT-2 with
Conv1D, Llama, T5) driven through forward, generate() and pipeline()."""

import copy
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import linquant as lq
import hf_models
from reference import ref_stored_weight, ref_weight_format

pytest.importorskip("transformers")

HERE = Path(__file__).resolve().parent


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def reference_weight(w, bits, group_size, symmetric):
    """float64 weight that w's quantized format stands for, from reference.py's formulas."""
    return ref_stored_weight(*ref_weight_format(w, bits, group_size, symmetric), bits, group_size, w.shape[1])


def reference_model(original, quantized, bits, group_size, symmetric):
    """float64 copy of `original` (the model before quantize_model) in which every layer that
    `quantized` holds as a QLinear has reference_weight of its own weight."""
    from transformers.pytorch_utils import Conv1D

    ref = copy.deepcopy(original)
    for name, layer in quantized.named_modules():
        if isinstance(layer, lq.QLinear):
            target = ref.get_submodule(name)
            transposed = isinstance(target, Conv1D)  # GPT-2 stores its weights [in, out]
            w = target.weight.detach()
            w_hat = reference_weight(w.t() if transposed else w, bits, group_size, symmetric)
            target.weight = nn.Parameter(w_hat.t() if transposed else w_hat)
    return ref.double()


@pytest.mark.parametrize("make", [hf_models.gpt2, hf_models.llama, hf_models.t5], ids=["gpt2", "llama", "t5"])
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (2, 32)])
def test_quantize_model_forward_and_generate(make, bits, group_size, gen):
    model = make()
    original = copy.deepcopy(model)  # quantize_model works in place
    ids = torch.randint(3, 500, (2, 12), generator=gen)
    kwargs = {"decoder_input_ids": ids[:, :4]} if "T5" in type(model).__name__ else {}
    n_linear = len(lq.quantizable_layers(model))
    lq.quantize_model(model, bits=bits, group_size=group_size)
    qlayers = [m for m in model.modules() if isinstance(m, lq.QLinear)]
    assert len(qlayers) == n_linear > 0
    assert not isinstance(model.lm_head, lq.QLinear)
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs).logits
        ref = reference_model(original, model, bits, group_size, symmetric=True)(input_ids=ids, **kwargs).logits
    # The same weights, so only fp32 rounding separates them (float64 has none to speak of).
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    if bits == 8:  # close to the fp32 model too; at 4 and 2 bits the distance says little
        with torch.no_grad():
            fp32 = original(input_ids=ids, **kwargs).logits
        assert relative_error(out, fp32) < 0.02
    generated = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] >= 6


def test_a_layer_at_two_places_is_quantized_at_both(tmp_path, gen):
    # One nn.Linear registered twice: named_modules() lists it once, and quantizing only that place
    # left the float layer at the other, a half-quantized model without a word.
    def make():
        shared = nn.Linear(16, 16)
        return nn.Sequential(shared, nn.ReLU(), shared)
    model = lq.quantize_model(make(), bits=4, group_size=8, exclude=[])
    assert isinstance(model[0], lq.QLinear) and model[2] is model[0]
    lq.save_quantized(model, str(tmp_path))
    config = json.loads((tmp_path / "linquant.json").read_text())
    assert sorted(config["modules"]) == ["0", "2"] and config["tied"]["2.qweight"] == "0.qweight"
    loaded = lq.load_quantized(str(tmp_path), make)
    assert isinstance(loaded[0], lq.QLinear) and isinstance(loaded[2], lq.QLinear)
    assert loaded[2].qweight.data_ptr() == loaded[0].qweight.data_ptr()  # stored and loaded once
    x = torch.randn(3, 16, generator=gen)
    assert torch.equal(loaded(x), model(x))


def test_gpt2_conv1d_layers_are_replaced():
    model = hf_models.gpt2()
    names = [n for n, _, transposed in lq.quantizable_layers(model) if transposed]
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.1.mlp.c_proj" in names
    lq.quantize_model(model, bits=8)
    assert isinstance(model.transformer.h[0].attn.c_attn, lq.QLinear)
    assert model.transformer.h[0].attn.c_attn.out_features == 3 * 64


def test_pipeline_text_generation():
    from transformers import pipeline
    model = lq.quantize_model(hf_models.gpt2(), bits=8)
    tok = hf_models.word_tokenizer()
    generate = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    out = generate("w5 w6 w7", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("w5 w6 w7")


def test_decode_time_is_per_token_generated(monkeypatch):
    # A model that ends its text before the 16 tokens asked for: its time is per token it made.
    from types import SimpleNamespace

    from linquant import builtin, evaluate
    model, tok = hf_models.gpt2(), hf_models.word_tokenizer()
    first = int(builtin.greedy_ids(model, tok, builtin.GREEDY_PROMPT, new_tokens=1)[0])
    model.generation_config.eos_token_id = first  # its text ends at its first token
    clock = iter([10.0, 12.0])  # generation takes 2 s
    monkeypatch.setattr(evaluate, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    text, ms_per_token = evaluate.timed_greedy(model, tok, new_tokens=16)
    assert ms_per_token == 2000.0


def test_exclude_names_patterns_and_predicate():
    model = hf_models.llama()
    lq.quantize_model(model, bits=8, exclude=["lm_head", "*.mlp.*"])
    assert not isinstance(model.model.layers[0].mlp.up_proj, lq.QLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, lq.QLinear)
    model = hf_models.llama()
    lq.quantize_model(model, bits=8, exclude=lambda name, m: m.out_features > 100)
    assert not isinstance(model.model.layers[0].mlp.up_proj, lq.QLinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, lq.QLinear)


def test_an_exclude_pattern_that_matches_no_layer_warns():
    # exclude replaces the default, so a typo used to quantize the tied lm_head without a word.
    with pytest.warns(UserWarning, match=r"exclude pattern 'lm_haed' matches no nn.Linear or Conv1D layer and no "
                                         r"experts projection, so it keeps nothing in full precision "
                                         r".*replaces the default \['lm_head'\]"):
        lq.quantize_model(hf_models.llama(), bits=8, exclude=["lm_haed"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lq.quantize_model(hf_models.llama(), bits=8, exclude=["lm_head", "*.mlp.*", "q_proj"])
        # The default's lm_head is absent by design from models without a head.
        lq.quantize_model(nn.Sequential(nn.Linear(16, 8)), bits=8)


def test_quantizing_a_tied_layer_warns_naming_it():
    model = hf_models.gpt2()  # lm_head's weight is the token embedding's
    with pytest.warns(UserWarning, match="layer 'lm_head' shares its weight with 'transformer.wte' .*breaks the tie"):
        lq.quantize_model(model, bits=8, exclude=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lq.quantize_model(hf_models.gpt2(), bits=8)  # lm_head kept by the default
        shared = nn.Linear(16, 16)  # one module at two places is not a tie: it stays one QLinear
        lq.quantize_model(nn.Sequential(shared, nn.ReLU(), shared), bits=8, exclude=[])


def test_the_summary_names_the_scheme(capsys):
    lq.quantize_model(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 8)), bits=4, group_size=8, symmetric=False,
                      verbose=True)
    assert capsys.readouterr().out == "linquant: replaced 2 layers with 4-bit g8 asymmetric QLinear\n"
    assert lq.model.scheme_name(8, None, True) == "8-bit per-channel symmetric"


def test_nothing_to_replace_says_so():
    with pytest.warns(UserWarning, match="nothing to quantize"):
        lq.quantize_model(nn.Sequential(nn.ReLU()), bits=8)


def test_footprint_agrees_with_transformers_and_shrinks():
    model = hf_models.llama(width=128)
    fp = lq.footprint(model)["total"]
    assert fp == model.get_memory_footprint()
    linear_bytes = sum(m.weight.numel() * 4 for _, m, _ in lq.quantizable_layers(model))
    for bits, ratio in ((8, 0.25), (4, 0.125)):
        m = lq.quantize_model(hf_models.llama(width=128), bits=bits, group_size=None if bits == 8 else 64)
        q = lq.footprint(m)
        assert q["total"] == m.get_memory_footprint()
        qbytes = sum(t.numel() * t.element_size() for mod in m.modules() if isinstance(mod, lq.QLinear)
                     for t in (mod.qweight, mod.scales))
        assert qbytes < linear_bytes * ratio * 1.15, (bits, qbytes / linear_bytes)
        assert fp - q["total"] == pytest.approx(linear_bytes - qbytes, rel=0.02)


@pytest.mark.parametrize("make,bits,group_size,symmetric", [(hf_models.gpt2, 8, None, True),
                                                            (hf_models.llama, 4, 32, False),
                                                            (hf_models.t5, 2, 64, True)], ids=["gpt2", "llama", "t5"])
def test_save_load_round_trip_is_identical(tmp_path, make, bits, group_size, symmetric, gen):
    model = lq.quantize_model(make(), bits=bits, group_size=group_size, symmetric=symmetric)
    lq.save_quantized(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["linquant.json", "model.safetensors"]
    ids = torch.randint(3, 500, (1, 9), generator=gen)
    kwargs = {"decoder_input_ids": ids[:, :3]} if "T5" in type(model).__name__ else {}
    with torch.no_grad():
        want = model(input_ids=ids, **kwargs).logits
    # From a factory, and from the class and config the save records (no factory at all).
    for loaded in (lq.load_quantized(str(tmp_path), lambda: type(model)(model.config)),
                   lq.load_quantized(str(tmp_path))):
        assert type(loaded) is type(model) and loaded.config.to_dict() == model.config.to_dict()
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids, **kwargs).logits, want)
        assert all(p.device.type == "cpu" for p in loaded.parameters())
        assert all(b.device.type == "cpu" for b in loaded.buffers())


def test_load_without_a_factory_needs_a_hugging_face_save(tmp_path):
    lq.save_quantized(lq.quantize_model(_small(), bits=8, exclude=[]), str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="holds no Hugging Face model description .* pass model_or_factory"):
        lq.load_quantized(str(tmp_path / "plain"))
    lq.save_quantized(lq.quantize_model(hf_models.llama(), bits=8), str(tmp_path / "hf"))
    for edit, match in [(lambda c: c["transformers"].update({"class": "NoSuchModel"}), "has no model class 'NoSuchModel'"),
                        (lambda c: c["transformers"]["config"].update(model_type="no-such-type"),
                         "does not know model_type 'no-such-type'"),
                        (lambda c: c["transformers"].pop("config"), "'transformers' must be an object with a 'class'")]:
        damaged = _damaged_copy(tmp_path / "hf", tmp_path / f"damaged{len(os.listdir(tmp_path))}", edit_config=edit)
        with pytest.raises(ValueError, match=match):
            lq.load_quantized(damaged)


def test_load_errors(tmp_path):
    model = lq.quantize_model(hf_models.llama(), bits=8)
    lq.save_quantized(model, str(tmp_path))
    with pytest.raises(ValueError, match="the model has no module 'model.layers.0.self_attn.q_proj'"):
        lq.load_quantized(str(tmp_path), hf_models.gpt2)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        lq.load_quantized(str(tmp_path), lambda: hf_models.llama())
    with pytest.raises(FileNotFoundError, match="not a save_quantized directory"):
        lq.load_quantized(str(tmp_path / "nowhere"), hf_models.llama)
    bigger = lq.quantize_model(hf_models.llama(layers=3), bits=8)
    lq.save_quantized(bigger, str(tmp_path / "big"))
    with pytest.raises(ValueError, match="model.layers.2"):
        lq.load_quantized(str(tmp_path / "big"), hf_models.llama)


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _rewrite_weights(directory, edit_tensors=None, edit_metadata=None):
    """Rewrites directory/model.safetensors with its tensors and header metadata edited in place."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    path = directory / "model.safetensors"
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    save_file(tensors, path, metadata=metadata)


def _rewrite_config(directory, edit_config):
    config = json.loads((directory / "linquant.json").read_text())
    edit_config(config)
    (directory / "linquant.json").write_text(json.dumps(config))


def _damaged_copy(src, dst, edit_config=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if edit_config:
        _rewrite_config(dst, edit_config)
    if edit_tensors:
        _rewrite_weights(dst, edit_tensors)
    return str(dst)


@pytest.mark.parametrize("damage,match", [
    ({"edit_config": lambda c: c["modules"]["0"].pop("bits")}, r"module '0' has a missing or invalid 'bits'"),
    ({"edit_config": lambda c: c["modules"]["2"].update(dtype="float128")},
     r"module '2' has an invalid 'dtype' \(expected one of float32, float16, bfloat16, got 'float128'\)"),
    ({"edit_config": lambda c: c["modules"]["2"].update(dtype="qint8")}, "invalid 'dtype'.*got 'qint8'"),
    ({"edit_config": lambda c: c["modules"]["0"].update(in_features=10**30)},
     rf"module '0' has an invalid 'in_features' \(expected an integer from 0 to 2147483647, got {10**30}\)"),
    ({"edit_config": lambda c: c["modules"]["0"].update(in_features=-1)}, "invalid 'in_features'.*got -1"),
    ({"edit_config": lambda c: c["modules"]["2"].update(out_features=-4)}, "invalid 'out_features'.*got -4"),
    ({"edit_config": lambda c: c["modules"]["0"].update(in_features=1e30)},
     r"missing or invalid 'in_features' \(expected int, got 1e\+30\)"),
    ({"edit_config": lambda c: c["modules"]["0"].update(bits=3)}, "module '0': bits must be 8, 4 or 2, got 3"),
    ({"edit_config": lambda c: c["modules"]["0"].update(group_size=0)}, "module '0': group_size must be a positive"),
    ({"edit_config": lambda c: c.update(tied={"a": ["x"]})}, r"'tied' maps 'a' to \['x'\]; expected the name"),
    ({"edit_config": lambda c: c.update(metadata=["source"])}, r"'metadata' must be a JSON object, got \['source'\]"),
    ({"edit_config": lambda c: c.update(save_id=7)}, "'save_id' must be a string, got 7"),
    ({"edit_config": lambda c: c.update(modules=[])}, "'modules' and 'tied' must be JSON objects"),
    ({"edit_config": lambda c: c.update(tied={"2.bias": "9.bias"})}, "tied to '9.bias', which the file does not hold"),
    ({"edit_config": lambda c: c.update(embeddings={"2": {**c["modules"]["2"], "num_embeddings": 8,
                                                          "embedding_dim": 16, "padding_idx": None}})},
     r"linquant.json lists '2' twice \(among modules, embeddings and experts\)"),
    ({"edit_tensors": lambda t: t.update({"0.qweight": t["0.qweight"].int()})},
     "'0.qweight' is torch.int32 in the file but the model expects torch.uint8"),
    ({"edit_tensors": lambda t: t.update({"2.bias": t["2.bias"].int()})}, "'2.bias' is torch.int32 in the file"),
    # Float dtypes the format does not allow there, which used to load and fail at the first forward.
    ({"edit_tensors": lambda t: t.update({"2.scales": t["2.scales"].double()})},
     "'2.scales' is torch.float64 in the file but the layer's format needs float32"),
    ({"edit_tensors": lambda t: t.update({"0.scales": t["0.scales"].half()})},
     "'0.scales' is torch.float16 in the file but the layer's format needs float32"),
    ({"edit_tensors": lambda t: t.update({"2.bias": t["2.bias"].double()})},
     r"'2.bias' is torch.float64 in the file but the layer's format needs float32, float16 or bfloat16"),
    ({"edit_config": lambda c: c.update(embeddings={"table": {**c["modules"]["2"], "num_embeddings": 8,
                                                              "embedding_dim": 16, "padding_idx": 8}})},
     r"embedding 'table' has an invalid 'padding_idx' \(expected null or an integer from 0 to num_embeddings - 1 = 7, "
     r"got 8\)"),
    ({"edit_tensors": lambda t: t["2.scales"].view(-1)[3:4].fill_(float("nan"))},
     "the scales of '2' hold values that are not finite and positive"),
    ({"edit_tensors": lambda t: t["0.scales"].view(-1)[0:1].fill_(0.0)}, "the scales of '0' hold values"),
], ids=["missing-key", "dtype-name", "quantized-dtype", "huge-in", "negative-in", "negative-out", "float-in",
        "bits", "group-size", "tied-list", "metadata-list", "save-id-int", "modules-list", "tied-source", "listed-twice",
        "qweight-dtype", "bias-dtype", "scales-float64", "scales-float16", "bias-float64", "padding-idx", "nan-scale",
        "zero-scale"])
def test_a_damaged_save_is_named_at_load(tmp_path, damage, match):
    # Each of these used to load (failing or giving NaN at the first forward) or fail with a bare
    # KeyError / AttributeError from inside the loader.
    lq.save_quantized(lq.quantize_model(_small(), bits=4, group_size=8, symmetric=False, exclude=[]),
                      str(tmp_path / "ok"))
    damaged = _damaged_copy(tmp_path / "ok", tmp_path / "damaged", **damage)
    with pytest.raises(ValueError, match=match):
        lq.load_quantized(damaged, _small)
    (tmp_path / "ok" / "linquant.json").write_text("{not json")
    with pytest.raises(ValueError, match="linquant.json is not valid JSON"):
        lq.load_quantized(str(tmp_path / "ok"), _small)


def test_a_config_nested_too_deeply_is_named_at_load(tmp_path):
    # json's parser recurses once per level: this used to be a RecursionError.
    lq.save_quantized(lq.quantize_model(_small(), bits=8, exclude=[]), str(tmp_path))
    (tmp_path / "linquant.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="linquant.json is not a linquant config: its JSON nests too deeply"):
        lq.load_quantized(str(tmp_path), _small)


def test_a_bias_in_another_float_dtype_than_the_scales_loads(tmp_path):
    # linear takes any of the three (and the C++ loader accepts it too): not a damaged file.
    lq.save_quantized(lq.quantize_model(_small(), bits=4, group_size=8, exclude=[]), str(tmp_path / "ok"))
    damaged = _damaged_copy(tmp_path / "ok", tmp_path / "half", edit_tensors=lambda t: t.update(
        {"2.bias": t["2.bias"].half()}))
    model = lq.load_quantized(damaged, _small)
    ok = lq.load_quantized(str(tmp_path / "ok"), _small)
    x = torch.randn(3, 16)
    assert model[2].bias.dtype == torch.float16 and torch.equal(model[2].bias, ok[2].bias.half())
    l2 = ok[2]
    want = lq.linear(ok[1](ok[0](x)), l2.qweight, l2.scales, l2.zeros, l2.bias.half(), 4, 8)
    assert want.dtype == torch.float32 and torch.equal(model(x), want)


def test_a_bare_linear_is_quantized_saved_and_loaded(tmp_path):
    layer = lq.quantize_model(nn.Linear(16, 8), bits=4, group_size=8)  # no parent to put it in
    assert isinstance(layer, lq.QLinear)
    lq.save_quantized(layer, str(tmp_path))
    loaded = lq.load_quantized(str(tmp_path), lambda: nn.Linear(16, 8))
    x = torch.randn(3, 16)
    assert isinstance(loaded, lq.QLinear) and torch.equal(loaded(x), layer(x))


def _odd_model(dtype, gen):
    """Layers of odd K (37, then 5) down to N = 1, weights drawn from gen, in dtype."""
    model = nn.Sequential(nn.Linear(37, 5), nn.ReLU(), nn.Linear(5, 1, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / 4)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (8, 5, False), (4, 6, False), (2, 8, True)],
                         ids=["w8", "w8-g5-asym", "w4-g6-asym", "w2-g8"])  # 6 and 8 divide neither 37 nor 5
@pytest.mark.parametrize("given", ["factory", "instance"])
def test_save_load_odd_shapes_and_half_dtypes(tmp_path, gen, dtype, bits, group_size, symmetric, given):
    model = lq.quantize_model(_odd_model(dtype, gen), bits=bits, group_size=group_size, symmetric=symmetric, exclude=[])
    lq.save_quantized(model, str(tmp_path))
    # An instance keeps its modules but has every tensor replaced: its own weights are other draws.
    loaded = lq.load_quantized(str(tmp_path), (lambda: _odd_model(dtype, gen)) if given == "factory"
                               else _odd_model(dtype, gen))
    saved, back = model.state_dict(), loaded.state_dict()
    assert sorted(back) == sorted(saved)
    for key, t in saved.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key
    assert isinstance(loaded[0], lq.QLinear) and loaded[2].out_features == 1 and not loaded.training
    x = torch.randn(3, 37, generator=gen).to(dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _save_small(path, bias_shift=0.0, **metadata):
    """Saves _small() quantized, its first bias shifted so that saves told apart by it differ."""
    model = lq.quantize_model(_small(), bits=4, group_size=8, exclude=[])
    with torch.no_grad():
        model[0].bias.add_(bias_shift)
    lq.save_quantized(model, str(path), metadata=metadata)
    return model


def _outputs_equal(a, b):
    x = torch.arange(32.0).view(2, 16) / 7
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_a_save_that_fails_leaves_the_previous_pair(tmp_path):
    # The metadata used to fail in json after model.safetensors was replaced: b's weights with a's config.
    a = _save_small(tmp_path / "d", source="model-A")
    with pytest.raises(ValueError, match="metadata must hold only JSON values .*object is not JSON serializable"):
        lq.save_quantized(_save_small(tmp_path / "b", 1.0), str(tmp_path / "d"), metadata={"x": object()})
    with pytest.raises(ValueError, match="metadata must hold only JSON values"):
        lq.save_quantized(a, str(tmp_path / "d"), metadata={"loss": float("nan")})
    with pytest.raises(ValueError, match="metadata must be a dict .*got list"):
        lq.save_quantized(a, str(tmp_path / "d"), metadata=["model-A"])
    assert sorted(os.listdir(tmp_path / "d")) == ["linquant.json", "model.safetensors"]
    assert json.loads((tmp_path / "d" / "linquant.json").read_text())["metadata"] == {"source": "model-A"}
    assert _outputs_equal(lq.load_quantized(str(tmp_path / "d"), _small), a)
    with pytest.raises(ValueError, match="metadata must hold only JSON values"):
        lq.save_quantized(a, str(tmp_path / "new"), metadata={"x": object()})
    assert not (tmp_path / "new").exists()  # used to hold a lone model.safetensors
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="path must be a directory, but .* is an existing file"):
        lq.save_quantized(a, str(tmp_path / "file"))


def test_a_pair_from_two_saves_is_refused(tmp_path, monkeypatch):
    import linquant.serialization as serialization

    _save_small(tmp_path / "d", source="model-A")

    def crash(path, text):
        raise KeyboardInterrupt  # the process dies between the two renames

    with monkeypatch.context() as m:
        m.setattr(serialization, "write_text", crash)
        with pytest.raises(KeyboardInterrupt):
            _save_small(tmp_path / "d", 1.0, source="model-B")
    with pytest.raises(ValueError, match="model.safetensors and linquant.json in .* come from different saves"):
        lq.load_quantized(str(tmp_path / "d"), _small)
    # Files copied from two complete saves, either way round.
    b = _save_small(tmp_path / "b", 1.0, source="model-B")
    _save_small(tmp_path / "a", source="model-A")
    shutil.copy(tmp_path / "b" / "linquant.json", tmp_path / "a" / "linquant.json")
    with pytest.raises(ValueError, match="come from different saves"):
        lq.load_quantized(str(tmp_path / "a"), _small)
    shutil.copy(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    assert _outputs_equal(lq.load_quantized(str(tmp_path / "a"), _small), b)  # the whole pair of b


def test_files_from_before_save_ids_still_load(tmp_path):
    model = _save_small(tmp_path, source="model-A")
    _rewrite_weights(tmp_path, edit_metadata=lambda m: m.pop("linquant_save_id"))
    with pytest.raises(ValueError, match="come from different saves"):  # only one of the two has an id
        lq.load_quantized(str(tmp_path), _small)
    _rewrite_config(tmp_path, lambda c: c.pop("save_id"))
    assert _outputs_equal(lq.load_quantized(str(tmp_path), _small), model)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        lq.load_quantized(str(tmp_path), _small)


def test_load_arguments_are_checked(tmp_path):
    _save_small(tmp_path)
    with pytest.raises(ValueError, match="device 'meta' is not a load target"):
        lq.load_quantized(str(tmp_path), _small, device="meta")
    with pytest.raises(ValueError, match="device 'cdua' is not a torch device"):
        lq.load_quantized(str(tmp_path), _small, device="cdua")
    with pytest.raises(TypeError, match="model_or_factory must be an nn.Module or a callable that builds one, got int"):
        lq.load_quantized(str(tmp_path), 42)
    with pytest.raises(TypeError, match="model_or_factory returned NoneType, expected an nn.Module"):
        lq.load_quantized(str(tmp_path), lambda: None)


PEAK_SCRIPT = """
import sys, torch, linquant as lq
sys.path.insert(0, sys.argv[2])
import hf_models

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

hf_models.llama(layers=1, width=64, vocab=256)  # imports and first-use allocations, not measured
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
model = lq.load_quantized(sys.argv[1], lambda: hf_models.llama(layers=4, width=512, vocab=256))
print(status("VmHWM:") - before)
"""


def test_load_peak_memory_stays_near_quantized_size(tmp_path):
    model = hf_models.llama(layers=4, width=512, vocab=256)
    fp32_bytes = lq.footprint(model)["total"]
    lq.quantize_model(model, bits=4, group_size=64)
    q_bytes = lq.footprint(model)["total"]
    lq.save_quantized(model, str(tmp_path))
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), str(HERE)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grown = int(out.stdout.split()[-1])
    print(f"fp32 {fp32_bytes / 1e6:.1f} MB, quantized {q_bytes / 1e6:.1f} MB, peak growth on load {grown / 1e6:.1f} MB")
    assert grown < q_bytes * 2 + 8e6 < fp32_bytes
