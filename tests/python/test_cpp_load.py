"""End to end: a model quantized and saved in Python (`lq.save_quantized`) is loaded by C++
(`linquant::load_quantized` + `load_into`, in tests/cpp/load_check.cpp, which builds the same
model) and run there on the same token ids: the same output. A Hugging Face mixture of experts
with quantized experts and embeddings loads there too, every quantized module holding Python's
weights. Damaged directories are refused by the C++ reader with its message, as Python's
load_quantized refuses them."""

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


def quantized_model(table: bool = False) -> nn.Sequential:
    """`table`: the embedding 0 quantized too (8-bit), and the head 6 tied to it a QLinear over its table."""
    torch.manual_seed(0)
    model = float_model()
    with torch.no_grad():  # not LayerNorm's initial ones and zeros, so that loading them shows
        model[5].weight.uniform_(0.5, 1.5)
        model[5].bias.uniform_(-0.5, 0.5)
    model[1] = lq.QLinear.from_linear(model[1], bits=4, group_size=16, symmetric=False)  # fp32 scales
    model[3] = lq.QLinear.from_linear(model[3].to(torch.bfloat16), bits=8)  # per-channel, bf16, no bias
    model[4] = lq.QLinear.from_linear(model[4].to(torch.bfloat16), bits=2, group_size=16)  # bf16 scales and bias
    if table:
        lq.quantize_model(model, bits=8, exclude=[], embeddings=True)
    return model.eval()


def run(*args):
    return subprocess.run([str(BINARY), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("table", [False, True], ids=["float-table", "quantized-table"])
def test_cpp_runs_what_python_saved(tmp_path, table):
    model = quantized_model(table)
    lq.save_quantized(model, str(tmp_path / "saved"))
    config = json.loads((tmp_path / "saved" / "linquant.json").read_text())
    layers = {"1": (4, 16, False, True, "float32"), "3": (8, None, True, False, "bfloat16"),
              "4": (2, 16, True, True, "bfloat16")}
    if table:
        layers["6"] = (8, None, True, False, "float32")
        assert config["tied"] == {f"6.{k}": f"0.{k}" for k in ("qweight", "scales")}
        assert config["embeddings"] == {"0": {"num_embeddings": 50, "embedding_dim": 32, "padding_idx": None, "bits": 8,
                                              "group_size": None, "symmetric": True, "dtype": "float32"}}
    else:
        assert config["tied"] == {"6.weight": "0.weight"}
    assert {name: (s["bits"], s["group_size"], s["symmetric"], s["bias"], s["dtype"])
            for name, s in config["modules"].items()} == layers
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    out = run(tmp_path / "saved", tmp_path / "ids.pt", tmp_path / "out.pt")
    assert out.returncode == 0, out.stderr
    # The C++ model holds the file's formats (its modules print them as Python's do).
    printed = ["in_features=32, out_features=64, bias=true, bits=4, group_size=16, asymmetric, dtype=Float",
               "in_features=64, out_features=48, bias=false, bits=8, per-channel, symmetric, dtype=BFloat16",
               "in_features=48, out_features=32, bias=true, bits=2, group_size=16, symmetric, dtype=BFloat16"]
    if table:
        printed += ["linquant::QEmbedding(50, 32, bits=8, per-channel, symmetric, dtype=Float)",
                    "in_features=32, out_features=50, bias=false, bits=8, per-channel, symmetric, dtype=Float"]
    for layer in printed:
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


@pytest.mark.parametrize("damage,message,python_message", [
    (_other_save, "linquant::load_quantized: model.safetensors and linquant.json in {dir} come from different saves",
     "come from different saves"),
    (_truncated, "linquant::read_safetensors: {dir}/model.safetensors: tensor ", "cannot read .*model.safetensors"),
    (_nan_scale, "linquant::load_quantized: the scales of '1' hold values that are not finite and positive",
     "the scales of '1' hold values that are not finite and positive"),
    (_bits_3, "linquant::load_quantized: {dir}/linquant.json: module '4': bits must be 8, 4 or 2, got 3",
     "module '4': bits must be 8, 4 or 2, got 3"),
])
def test_cpp_refuses_damaged_directories_as_python_does(tmp_path, damage, message, python_message):
    saved = tmp_path / "saved"
    lq.save_quantized(quantized_model(), str(saved))
    damage(saved)
    torch.save(torch.zeros(1, 2, dtype=torch.long), tmp_path / "ids.pt")
    out = run(saved, tmp_path / "ids.pt", tmp_path / "out.pt")
    assert out.returncode == 1, (out.returncode, out.stderr)  # an error, not a crash
    assert out.stderr.startswith("linquant_load_check: " + message.format(dir=saved)), out.stderr
    assert not (tmp_path / "out.pt").exists()
    with pytest.raises(ValueError, match=python_message):
        lq.load_quantized(str(saved), float_model)


@pytest.mark.parametrize("symmetric", [True, False])
def test_cpp_reads_quantized_experts_embeddings_and_layers(tmp_path, symmetric):
    """A Mixtral with its experts projections (QExpertsWeight), embedding (QEmbedding) and layers
    quantized: C++ loads every one of them holding exactly Python's weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                        num_local_experts=3, num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(config).to(torch.bfloat16)
    lq.quantize_model(model, bits=4, group_size=16, symmetric=symmetric, embeddings=True)
    lq.save_quantized(model, str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "linquant.json").read_text())
    assert len(saved["experts"]) == 4 and list(saved["embeddings"]) == ["model.embed_tokens"]
    out = subprocess.run([str(BINARY), "--dequantized", str(tmp_path / "saved"), str(tmp_path / "weights.pt")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # A typed C++ dict pickles with a type tag, which only the full unpickler restores (our own file).
    weights = torch.load(tmp_path / "weights.pt", weights_only=False)
    names = [*saved["modules"], *saved["embeddings"], *saved["experts"]]
    assert sorted(weights) == sorted(names)
    for name in names:
        mine = model.get_submodule(name).dequantize()
        assert weights[name].dtype == mine.dtype == torch.bfloat16, name
        assert torch.equal(weights[name], mine), name
    experts = model.get_submodule("model.layers.1.mlp.experts.down_proj")
    assert weights["model.layers.1.mlp.experts.down_proj"].shape == (3, 32, 48)
    assert not torch.equal(weights["model.layers.1.mlp.experts.down_proj"][0], experts.dequantize()[1])


def test_cpp_refuses_a_name_listed_twice(tmp_path):
    """A module listed both as a layer and as an embedding is refused, not loaded one way."""
    saved = tmp_path / "saved"
    lq.save_quantized(quantized_model(table=True), str(saved))
    config = json.loads((saved / "linquant.json").read_text())
    config["modules"]["0"] = dict(config["modules"]["6"])
    (saved / "linquant.json").write_text(json.dumps(config))
    out = subprocess.run([str(BINARY), "--dequantized", str(saved), str(tmp_path / "weights.pt")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "linquant.json lists '0' twice (among modules, embeddings and experts)" in out.stderr, out.stderr
    with pytest.raises(ValueError, match="linquant.json lists '0' twice"):
        lq.load_quantized(str(saved), float_model)
