"""End to end: a model quantized and saved in Python (`lq.save_quantized`) is loaded by C++
(`linquant::load_quantized` + `load_into`, in tests/cpp/load_check.cpp, which builds the same
model) and run there on the same token ids: the same output. Damaged directories are refused by
the C++ reader with its message, as Python's load_quantized refuses them."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import linquant as lq

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("LINQUANT_LOAD_CHECK", ROOT / "build" / "tests" / "cpp" / "linquant_load_check"))

pytestmark = pytest.mark.skipif(not BINARY.exists(), reason=f"{BINARY} not built (cmake --build build)")


def float_model() -> nn.Sequential:
    """The model of load_check.cpp before quantization: 6's weight is the embedding's."""
    model = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48, bias=False),
                          nn.Linear(48, 32), nn.LayerNorm(32), nn.Linear(32, 50, bias=False))
    model[6].weight = model[0].weight
    return model


def quantized_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = float_model()
    with torch.no_grad():  # not LayerNorm's initial ones and zeros, so that loading them shows
        model[5].weight.uniform_(0.5, 1.5)
        model[5].bias.uniform_(-0.5, 0.5)
    model[1] = lq.QLinear.from_linear(model[1], bits=4, group_size=16, symmetric=False)  # fp32 scales
    model[3] = lq.QLinear.from_linear(model[3].to(torch.bfloat16), bits=8)  # per-channel, bf16, no bias
    model[4] = lq.QLinear.from_linear(model[4].to(torch.bfloat16), bits=2, group_size=16)  # bf16 scales and bias
    return model.eval()


def run(*args):
    return subprocess.run([str(BINARY), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cpp_runs_what_python_saved(tmp_path):
    model = quantized_model()
    lq.save_quantized(model, str(tmp_path / "saved"))
    config = json.loads((tmp_path / "saved" / "linquant.json").read_text())
    assert config["tied"] == {"6.weight": "0.weight"}
    assert {name: (s["bits"], s["group_size"], s["symmetric"], s["bias"], s["dtype"])
            for name, s in config["modules"].items()} == {"1": (4, 16, False, True, "float32"),
                                                          "3": (8, None, True, False, "bfloat16"),
                                                          "4": (2, 16, True, True, "bfloat16")}
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    out = run(tmp_path / "saved", tmp_path / "ids.pt", tmp_path / "out.pt")
    assert out.returncode == 0, out.stderr
    # The C++ model holds the file's formats (its QLinear prints them as Python's does).
    for layer in ("in_features=32, out_features=64, bias=true, bits=4, group_size=16, asymmetric, dtype=Float",
                  "in_features=64, out_features=48, bias=false, bits=8, per-channel, symmetric, dtype=BFloat16",
                  "in_features=48, out_features=32, bias=true, bits=2, group_size=16, symmetric, dtype=BFloat16"):
        assert layer in out.stdout, out.stdout
    cpp = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = model(ids)
    assert cpp.shape == expected.shape == (3, 7, 50) and cpp.dtype == expected.dtype
    assert torch.allclose(cpp, expected, rtol=1e-5, atol=1e-5)


def _other_save(path: Path) -> None:
    """linquant.json of another save of the same model: its save id differs."""
    lq.save_quantized(quantized_model(), str(path.parent / "other"))
    (path / "linquant.json").write_bytes((path.parent / "other" / "linquant.json").read_bytes())


def _truncated(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])


def _nan_scale(path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = str(path / "model.safetensors")
    with safe_open(weights, framework="pt") as f:
        metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    tensors["1.scales"][3, 1] = float("nan")
    save_file(tensors, weights, metadata=metadata)


def _bits_3(path: Path) -> None:
    config = json.loads((path / "linquant.json").read_text())
    config["modules"]["4"]["bits"] = 3
    (path / "linquant.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage,message", [
    (_other_save, "linquant::load_quantized: model.safetensors and linquant.json in {dir} come from different saves"),
    (_truncated, "linquant::read_safetensors: {dir}/model.safetensors: tensor "),
    (_nan_scale, "linquant::load_quantized: the scales of '1' hold values that are not finite and positive"),
    (_bits_3, "linquant::load_quantized: {dir}/linquant.json: module '4': bits must be 8, 4 or 2, got 3"),
])
def test_cpp_refuses_damaged_directories_as_python_does(tmp_path, damage, message):
    saved = tmp_path / "saved"
    lq.save_quantized(quantized_model(), str(saved))
    damage(saved)
    torch.save(torch.zeros(1, 2, dtype=torch.long), tmp_path / "ids.pt")
    out = run(saved, tmp_path / "ids.pt", tmp_path / "out.pt")
    assert out.returncode == 1, (out.returncode, out.stderr)  # an error, not a crash
    assert out.stderr.startswith("linquant_load_check: " + message.format(dir=saved)), out.stderr
    assert not (tmp_path / "out.pt").exists()
    with pytest.raises(ValueError):
        lq.load_quantized(str(saved), float_model)


@pytest.mark.parametrize("kind", ["experts", "embeddings"])
def test_cpp_refuses_quantized_experts_and_embeddings_by_name(tmp_path, kind):
    """Mixture-of-experts projections (QExpertsWeight) and embeddings (QEmbedding) have no C++
    module: refused, not loaded as plain tensors."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                        num_local_experts=2, num_experts_per_tok=1)
    model = transformers.MixtralForCausalLM(config)
    if kind == "experts":
        lq.quantize_model(model, bits=4, group_size=16)
        first = "2 quantized experts projections (the first 'model.layers.0.mlp.experts.gate_up_proj')"
    else:
        lq.quantize_model(model, bits=4, group_size=16, exclude=["lm_head", "experts"], embeddings=True)
        first = "1 quantized embeddings (the first 'model.embed_tokens')"
    lq.save_quantized(model, str(tmp_path / "saved"))
    torch.save(torch.zeros(1, 2, dtype=torch.long), tmp_path / "ids.pt")
    out = run(tmp_path / "saved", tmp_path / "ids.pt", tmp_path / "out.pt")
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert out.stderr.startswith(f"linquant_load_check: linquant::load_quantized: {tmp_path / 'saved'}/linquant.json: "
                                 f"holds {first}, which the C++ API does not run"), out.stderr
