"""quantize_model, footprint and save/load on randomly initialised Hugging Face models (GPT-2 with
Conv1D, Llama, T5) driven through forward, generate() and pipeline()."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import linquant as lq
import hf_models

pytest.importorskip("transformers")

HERE = Path(__file__).resolve().parent


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("make", [hf_models.gpt2, hf_models.llama, hf_models.t5], ids=["gpt2", "llama", "t5"])
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (2, 32)])
def test_quantize_model_forward_and_generate(make, bits, group_size):
    model = make()
    ids = torch.randint(3, 500, (2, 12))
    kwargs = {"decoder_input_ids": ids[:, :4]} if "T5" in type(model).__name__ else {}
    with torch.no_grad():
        ref = model(input_ids=ids, **kwargs).logits
    n_linear = len(lq.quantizable_layers(model))
    lq.quantize_model(model, bits=bits, group_size=group_size)
    qlayers = [m for m in model.modules() if isinstance(m, lq.QLinear)]
    assert len(qlayers) == n_linear > 0
    assert not isinstance(model.lm_head, lq.QLinear)
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs).logits
    assert relative_error(out, ref) < {8: 0.02, 4: 0.3, 2: 1.5}[bits]
    gen = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
    assert gen.shape[0] == 2 and gen.shape[1] >= 6


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


def test_exclude_names_patterns_and_predicate():
    model = hf_models.llama()
    lq.quantize_model(model, bits=8, exclude=["lm_head", "*.mlp.*"])
    assert not isinstance(model.model.layers[0].mlp.up_proj, lq.QLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, lq.QLinear)
    model = hf_models.llama()
    lq.quantize_model(model, bits=8, exclude=lambda name, m: m.out_features > 100)
    assert not isinstance(model.model.layers[0].mlp.up_proj, lq.QLinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, lq.QLinear)


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
def test_save_load_round_trip_is_identical(tmp_path, make, bits, group_size, symmetric):
    model = lq.quantize_model(make(), bits=bits, group_size=group_size, symmetric=symmetric)
    lq.save_quantized(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["linquant.json", "model.safetensors"]
    loaded = lq.load_quantized(str(tmp_path), lambda: type(model)(model.config))
    ids = torch.randint(3, 500, (1, 9))
    kwargs = {"decoder_input_ids": ids[:, :3]} if "T5" in type(model).__name__ else {}
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, **kwargs).logits, model(input_ids=ids, **kwargs).logits)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert all(b.device.type == "cpu" for b in loaded.buffers())


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


def _damaged_copy(src, dst, edit_config=None, edit_tensors=None):
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    if edit_config:
        config = json.loads((dst / "linquant.json").read_text())
        edit_config(config)
        (dst / "linquant.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "model.safetensors")
    return str(dst)


@pytest.mark.parametrize("damage,match", [
    ({"edit_config": lambda c: c["modules"]["0"].pop("bits")}, r"module '0' has a missing or invalid 'bits'"),
    ({"edit_config": lambda c: c["modules"]["2"].update(dtype="float128")}, "'float128', which is not a torch dtype"),
    ({"edit_config": lambda c: c.update(modules=[])}, "'modules' and 'tied' must be JSON objects"),
    ({"edit_config": lambda c: c.update(tied={"2.bias": "9.bias"})}, "tied to '9.bias', which the file does not hold"),
    ({"edit_tensors": lambda t: t.update({"0.qweight": t["0.qweight"].int()})},
     "'0.qweight' is torch.int32 in the file but the model expects torch.uint8"),
    ({"edit_tensors": lambda t: t.update({"2.bias": t["2.bias"].int()})}, "'2.bias' is torch.int32 in the file"),
    ({"edit_tensors": lambda t: t["2.scales"].view(-1)[3:4].fill_(float("nan"))},
     "the scales of '2' hold values that are not finite and positive"),
    ({"edit_tensors": lambda t: t["0.scales"].view(-1)[0:1].fill_(0.0)}, "the scales of '0' hold values"),
], ids=["missing-key", "dtype-name", "modules-list", "tied-source", "qweight-dtype", "bias-dtype", "nan-scale",
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


def test_a_bare_linear_is_quantized_saved_and_loaded(tmp_path):
    layer = lq.quantize_model(nn.Linear(16, 8), bits=4, group_size=8)  # no parent to put it in
    assert isinstance(layer, lq.QLinear)
    lq.save_quantized(layer, str(tmp_path))
    loaded = lq.load_quantized(str(tmp_path), lambda: nn.Linear(16, 8))
    x = torch.randn(3, 16)
    assert isinstance(loaded, lq.QLinear) and torch.equal(loaded(x), layer(x))


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
