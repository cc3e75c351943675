"""End to end: `linquant export` in Python, `linquant-run` (C++, no Python) on the same inputs, equal
outputs; and the program's errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linquant.export import export_encoder

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("LINQUANT_RUN", ROOT / "build" / "linquant-run"))

pytestmark = pytest.mark.skipif(not BINARY.exists(), reason=f"{BINARY} not built (cmake --build build)")


def run(*args):
    return subprocess.run([str(BINARY), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 32, False), (2, 16, True)])
def test_cpp_outputs_equal_python(tmp_path, bits, group_size, symmetric):
    paths = export_encoder("tiny-bert", str(tmp_path), bits=bits, group_size=group_size, symmetric=symmetric)
    out = run(paths["model"], paths["inputs"], "--out", tmp_path / "cpp.pt", "--runs", 3, "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "time per run:" in out.stdout and not (tmp_path / "cpp.pt.tmp").exists()
    cpp, expected = torch.load(tmp_path / "cpp.pt"), torch.load(paths["expected"])
    assert cpp.shape == expected.shape == (2, 16, 64)
    assert torch.allclose(cpp, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", ["llama", "gpt2", "gpt2-embeddings"])
def test_a_saved_model_exported_from_its_directory_runs_in_cpp(tmp_path, make):
    # The user's own model: quantized and saved in Python, `linquant export --from`, run by
    # linquant-run; the save's format (here mixed: 4-bit g16 asymmetric, lm_head 8-bit) is kept.
    # gpt2-embeddings: its token and position embeddings quantized too, the tied head sharing the table.
    import hf_models
    import linquant as lq

    model = getattr(hf_models, make.split("-")[0])()
    lq.quantize_model(model, bits=4, group_size=16, symmetric=False, progress=False,
                      **(dict(exclude=[], embeddings=True) if make == "gpt2-embeddings" else dict(exclude=["lm_head"])))
    if make == "gpt2-embeddings":
        assert model.lm_head.qweight is model.transformer.wte.qweight
    if make == "llama":
        lq.quantize_model(model, bits=8, exclude=[], progress=False)  # what exclude left: lm_head
    lq.save_quantized(model, str(tmp_path / "saved"))
    out = subprocess.run([sys.executable, "-m", "linquant", "export", "--from", str(tmp_path / "saved"), "--out",
                          str(tmp_path / "exp")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "loss_type" not in out.stderr and "Warning" not in out.stderr, out.stderr  # the known noise is hidden
    out = run(tmp_path / "exp" / "model.pt", tmp_path / "exp" / "inputs.pt", "--out", tmp_path / "cpp.pt")
    assert out.returncode == 0, out.stderr
    cpp, expected = torch.load(tmp_path / "cpp.pt"), torch.load(tmp_path / "exp" / "expected.pt")
    assert cpp.shape == expected.shape == (2, 16, 512)  # logits
    assert torch.allclose(cpp, expected, rtol=1e-5, atol=1e-5)
    # And what Python computes from the save itself, for those inputs.
    ids, mask = torch.load(tmp_path / "exp" / "inputs.pt")
    with torch.no_grad():
        direct = lq.load_quantized(str(tmp_path / "saved"))(input_ids=ids, attention_mask=mask, use_cache=False)
    assert torch.allclose(cpp, direct.logits, rtol=1e-5, atol=1e-5)


def test_export_from_refuses_what_it_cannot_trace(tmp_path):
    import hf_models
    import linquant as lq

    lq.save_quantized(lq.quantize_model(hf_models.t5(), bits=8, progress=False), str(tmp_path / "t5"))
    out = subprocess.run([sys.executable, "-m", "linquant", "export", "--from", str(tmp_path / "t5"), "--out",
                          str(tmp_path / "exp")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "encoder-decoder" in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "linquant", "export", "--from", str(tmp_path / "t5"), "--bits", "4",
                          "--out", str(tmp_path / "exp")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "drop --bits" in out.stderr, out.stderr
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        num_local_experts=2, num_experts_per_tok=1)
    lq.save_quantized(lq.quantize_model(transformers.MixtralForCausalLM(config), bits=8, progress=False),
                      str(tmp_path / "mixtral"))
    out = subprocess.run([sys.executable, "-m", "linquant", "export", "--from", str(tmp_path / "mixtral"), "--out",
                          str(tmp_path / "exp")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "holds a mixture of experts (1 experts modules, the first " \
        "'model.layers.0.mlp.experts'), whose routing a trace records" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "exp" / "model.pt").exists()


def test_export_takes_the_device_from_the_inputs(tmp_path):
    # The trace records the device of the models' mask code (torch.arange(..., device=...)) as a
    # constant, the CPU it ran on; export replaces each with the inputs' device, so linquant-run
    # --device cuda does not mix CPU and CUDA tensors.
    import linquant  # noqa: F401 - registers linquant::linear for torch.jit.load

    model = torch.jit.load(export_encoder("tiny-bert", str(tmp_path), bits=4, group_size=32)["model"])
    fixed, followed = [], 0
    for name, module in model.named_modules():
        if module._c._has_method("forward"):
            fixed += [name for n in module.graph.findAllNodes("prim::Constant")
                      if n.output().type().kind() == "DeviceObjType"]
            followed += len(module.graph.findAllNodes("prim::device"))
    assert not fixed, f"device constants left in {fixed}"
    assert followed > 0, "expected the mask code's devices to come from the inputs"


def test_cli_export(tmp_path):
    out = subprocess.run([sys.executable, "-m", "linquant", "export", "--bits", "8", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path)) == ["expected.pt", "inputs.pt", "model.pt"]


def test_errors(tmp_path):
    paths = export_encoder("tiny-bert", str(tmp_path), bits=8)
    # A model written by an incompatible version.
    module = torch.jit.load(paths["model"])
    future = tmp_path / "future.pt"
    torch.jit.save(module, str(future), _extra_files={"linquant.json": json.dumps({"format_version": 99})})
    out = run(future, paths["inputs"])
    assert out.returncode == 1 and "format_version 99;" in out.stderr
    torch.jit.save(module, str(future), _extra_files={"linquant.json": '{"format_version": 99999999999}'})
    out = run(future, paths["inputs"])
    assert out.returncode == 1 and "format_version 99999999999;" in out.stderr
    torch.jit.save(module, str(future), _extra_files={"linquant.json": '{"format_version": 1,}'})
    out = run(future, paths["inputs"])
    assert out.returncode == 1 and "future.pt's linquant.json is not valid JSON" in out.stderr, out.stderr
    # The record in other JSON spellings: compact, pretty-printed; versions that are no whole number.
    for meta, ok in [('{"format_version":1}', True), ('{\n  "format_version" : 1\n}', True),
                     ('{"format_version": "one"}', False), ('{"format_version": 1.5}', False),
                     ('{"format_version": 1e0}', False)]:
        other = tmp_path / "other.pt"
        torch.jit.save(module, str(other), _extra_files={"linquant.json": meta})
        out = run(other, paths["inputs"], "--out", tmp_path / "y.pt")
        if ok:
            assert out.returncode == 0, (meta, out.stderr)
        else:
            assert out.returncode == 1 and "format_version is not a whole number" in out.stderr, (meta, out.stderr)
    # Not exported by linquant at all.
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(plain))
    out = run(plain, paths["inputs"])
    assert out.returncode == 1 and "not exported by `linquant export`" in out.stderr
    # Inputs of the wrong shape.
    bad = tmp_path / "bad.pt"
    torch.save([torch.zeros(2, 16, 3, dtype=torch.long), torch.ones(2, 16, dtype=torch.long)], bad)
    out = run(paths["model"], bad)
    assert out.returncode == 1 and out.stderr.startswith("linquant-run:")
    # Missing file, bad usage.
    out = run(tmp_path / "missing.pt", paths["inputs"])
    assert out.returncode == 1 and "linquant-run:" in out.stderr
    assert run(paths["model"]).returncode == 2
    out = run(paths["model"], paths["inputs"], "--device", "gpu0")
    assert out.returncode == 2 and "--device must be cpu, cuda or cuda:N, got 'gpu0'" in out.stderr
    for runs in ("0", "-1", "ten", "3x", ""):  # each used to run once, silently
        out = run(paths["model"], paths["inputs"], "--runs", runs)
        assert out.returncode == 2 and f"--runs must be a whole number from 1 to 1000000, got '{runs}'" in out.stderr
    if not torch.cuda.is_available():
        out = run(paths["model"], paths["inputs"], "--device", "cuda")
        assert out.returncode == 1 and "no CUDA device is available" in out.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_cpp_on_cuda_matches_python_on_cpu(tmp_path, bits, group_size):
    paths = export_encoder("tiny-bert", str(tmp_path), bits=bits, group_size=group_size, symmetric=False)
    out = run(paths["model"], paths["inputs"], "--out", tmp_path / "cuda.pt", "--runs", 3, "--device", "cuda")
    assert out.returncode == 0, out.stderr
    assert "cuda" in out.stdout
    cuda, expected = torch.load(tmp_path / "cuda.pt"), torch.load(paths["expected"])
    assert cuda.device.type == "cpu" and torch.allclose(cuda, expected, rtol=1e-4, atol=1e-4)
