"""Mixture-of-experts weights (experts.py): transformers' experts modules hold each projection of
all their experts as one 3-D parameter; quantize_model replaces it with a QExpertsWeight and the
module runs linquant's experts implementation. Checked against float64 references: each expert's
weight from reference.py's formulas, run through transformers' own float forwards (the model's
eager loop, or batched_mm_experts_forward for a toy module with every layout flag), on fresh
random inputs and awkward routings; whole models against the same model with reference weights;
save/load bit-identical; exclude; the implementation switched away. quantize_pretrained's
experts: test_pretrained.py."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import linquant as lq
from linquant.experts import QExpertsWeight, experts_modules
from conftest import cuda_only
from reference import linear_bound, ref_stored_weight, ref_weight, ref_weight_format, strided_view

transformers = pytest.importorskip("transformers")
moe = pytest.importorskip("transformers.integrations.moe")

# Relative error of a whole forward (both projections, the activation between them rounded to the
# dtype): twice the worst of 12 seeds over test_experts_match_the_float64_reference's cases (bf16
# 7.4e-3, fp16 9.9e-4), where one expert's down_proj scales 2% off gave bf16 1.0e-2 to 2.3e-2.
DTYPE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def reference_weight(w, bits, group_size, symmetric):
    """float64 [N, K] weight that w's quantized format stands for (reference.py's formulas)."""
    return ref_stored_weight(*ref_weight_format(w, bits, group_size, symmetric), bits, group_size, w.shape[1])


def reference_experts(module, bits, group_size, symmetric):
    """float64 copy of a float experts module whose projections hold each expert's reference weight."""
    ref = copy.deepcopy(module)
    for attr in ("gate_up_proj" if module.has_gate else "up_proj", "down_proj"):
        w = getattr(module, attr).detach()
        per_expert = w.transpose(1, 2) if module.is_transposed else w  # [E, out, in]
        w_hat = torch.stack([reference_weight(per_expert[e], bits, group_size, symmetric)
                             for e in range(w.shape[0])])
        setattr(ref, attr, nn.Parameter(w_hat.transpose(1, 2) if module.is_transposed else w_hat))
    ref.config = copy.copy(module.config)
    ref.config._experts_implementation = "eager"
    return ref.double()


def toy_experts(gen, *, num_experts=5, hidden=40, inter=24, dtype=torch.float32, **flags):
    """A module decorated with transformers' use_experts_implementation, its eager forward
    transformers' batched_mm implementation, with the layout `flags` (has_gate, has_bias,
    is_transposed, has_post_expert_norm) and random weights."""

    @moe.use_experts_implementation(**flags)
    class ToyExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = num_experts
            first = 2 * inter if flags.get("has_gate", True) else inter

            def param(out_features, in_features):
                shape = (num_experts, in_features, out_features) if flags.get("is_transposed") else \
                    (num_experts, out_features, in_features)
                return nn.Parameter(torch.randn(shape, generator=gen) * 0.2)

            setattr(self, "gate_up_proj" if flags.get("has_gate", True) else "up_proj", param(first, hidden))
            self.down_proj = param(hidden, inter)
            if flags.get("has_bias"):
                prefix = "gate_up_proj" if flags.get("has_gate", True) else "up_proj"
                setattr(self, f"{prefix}_bias", nn.Parameter(torch.randn(num_experts, first, generator=gen) * 0.1))
                self.down_proj_bias = nn.Parameter(torch.randn(num_experts, hidden, generator=gen) * 0.1)
            if flags.get("has_post_expert_norm"):
                self.post_expert_norm = nn.LayerNorm(hidden)
            self.act_fn = nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return moe.batched_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    config = transformers.PretrainedConfig()
    config._experts_implementation = "eager"
    return ToyExperts(config).to(dtype)


def routing(gen, tokens, num_experts, top_k, dtype=torch.float32):
    """Random top-k choices (distinct per token) and their weights."""
    scores = torch.rand(tokens, num_experts, generator=gen)
    weights, index = scores.topk(top_k, dim=-1)
    return index, (weights / weights.sum(-1, keepdim=True)).to(dtype)


@torch.no_grad()
def reference_forward(ref, x, index, weights):
    return moe.batched_mm_experts_forward(ref, x.double(), index, weights.double())


FLAGS = [dict(), dict(has_bias=True, is_transposed=True), dict(has_gate=False),
         dict(has_gate=False, has_bias=True, has_post_expert_norm=True), dict(is_transposed=True)]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(f) or "default")
@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 16, False), (2, 8, True), (4, 32, True)],
                         ids=["w8", "w4g16a", "w2g8", "w4g32"])  # 32: K = 40 and 24 are not multiples of it
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_experts_match_the_float64_reference(gen, flags, bits, group_size, symmetric, dtype):
    module = toy_experts(gen, dtype=dtype, **flags)
    ref = reference_experts(module, bits, group_size, symmetric)
    lq.quantize_model(module, bits=bits, group_size=group_size, symmetric=symmetric)
    assert all(isinstance(getattr(module, a), QExpertsWeight)
               for a in ("gate_up_proj" if module.has_gate else "up_proj", "down_proj"))
    for tokens, top_k in [(1, 1), (7, 2), (33, 3)]:
        x = torch.randn(tokens, 40, generator=gen).to(dtype)
        index, weights = routing(gen, tokens, 5, top_k, dtype)
        out = module(x, index, weights)
        expected = reference_forward(ref, x, index, weights)
        assert out.dtype == dtype and out.shape == x.shape
        err = float((out.detach().double() - expected).norm() / expected.norm())
        assert err < DTYPE_TOLERANCE[dtype], (tokens, top_k, err)


def test_each_experts_slice_is_a_qlinears_format(gen):
    """Expert e's buffers are exactly QLinear.from_linear's for the weight [out, in] of expert e."""
    module = toy_experts(gen, is_transposed=True, has_bias=True)
    weights = {a: getattr(module, a).detach().clone() for a in ("gate_up_proj", "down_proj")}
    lq.quantize_model(module, bits=4, group_size=16, symmetric=False)
    for attr, w in weights.items():
        q = getattr(module, attr)
        for e in range(5):
            linear = nn.Linear(w.shape[1], w.shape[2], bias=False)
            linear.weight = nn.Parameter(w[e].t())
            single = lq.QLinear.from_linear(linear, bits=4, group_size=16, symmetric=False)
            assert torch.equal(q.qweight[e], single.qweight) and torch.equal(q.scales[e], single.scales)
            assert torch.equal(q.zeros[e], single.zeros)
        assert q.dequantize().shape == (5, w.shape[2], w.shape[1])


@pytest.mark.parametrize("bits,group_size,symmetric,bias,dtype", [
    (8, None, True, False, torch.float32), (4, 16, False, True, torch.bfloat16), (2, 8, False, False, torch.float16)],
    ids=str)
def test_grouped_linear_is_each_experts_linear(gen, bits, group_size, symmetric, bias, dtype):
    """torch.ops.linquant.grouped_linear: each expert's rows through linear with its slice, bit for
    bit (experts no row chooses, one taking them all, none at all), gradients to x as the
    per-expert calls give them, opcheck, and its errors."""
    w = torch.randn(4, 24, 48, generator=gen).to(dtype)
    q = lq.QExpertsWeight.from_weight(w, False, bits, group_size, symmetric)
    b = torch.randn(4, 24, generator=gen).to(dtype) if bias else None
    for counts in ([3, 0, 5, 1], [0, 9, 0, 0], [0, 0, 0, 0]):
        x = torch.randn(sum(counts), 48, generator=gen).to(dtype).requires_grad_()
        y = q.grouped_linear(x, counts, b)
        parts, start = [], 0
        for e, c in enumerate(counts):
            parts.append(q.linear(x[start:start + c], e, None if b is None else b[e]))
            start += c
        expected = torch.cat(parts)
        assert y.shape == (sum(counts), 24) and y.dtype == dtype and torch.equal(y, expected), counts
        if sum(counts):
            grad = torch.randn(y.shape, generator=gen).to(dtype)
            (got,) = torch.autograd.grad(y, x, grad)
            (want,) = torch.autograd.grad(expected, x, grad)
            assert torch.equal(got, want), counts
    x = torch.randn(9, 48, generator=gen).to(dtype)
    args = (x, [3, 0, 5, 1], q.qweight, q.scales, q.zeros, b, bits, group_size)
    torch.library.opcheck(torch.ops.linquant.grouped_linear.default, args)
    for bad, match in [((x, [3, 0, 5], *args[2:]), r"counts must hold one row count per expert \(4\), got 3"),
                       ((x, [3, 0, -1, 7], *args[2:]), r"counts must be >= 0, got counts\[2\] = -1"),
                       ((x, [3, 0, 5, 2], *args[2:]),
                        r"counts must sum to x's 9 rows, got more from counts\[3\] = 2 on \(the counts before it add up to 8\)"),
                       ((x[None], *args[1:]), r"x must be \[T, K\]"),
                       ((*args[:2], q.qweight[0], *args[3:]), r"qweight and scales must be stacked per expert"),
                       ((*args[:5], torch.zeros(3, 24).to(dtype), *args[6:]), r"bias must be \[4, 24\]"),
                       # Each expert's N, named as grouped_linear's (not linear's [out_features]).
                       ((*args[:5], torch.zeros(4, 25).to(dtype), *args[6:]),
                        r"bias must be \[4, 24\] \(one per expert\), got shape \[4, 25\]")]:
        with pytest.raises(ValueError, match="linquant::grouped_linear: " + match):
            torch.ops.linquant.grouped_linear(*bad)


# Rows per expert on both sides of every CPU path's threshold (csrc/cpu/linear.cpp). bf16: 1 and 7
# rows take the dot kernel (8 bits: tile8; w2g16a: the register tiles), 8 the dot kernel (8 bits
# from 8 rows), 24 the bf16 GEMM (w8 from 20, w8g32a from 16, w4g32a from 12, w4g16 from 20, w2g16a
# from 24) but for w4 (from 32), 33, 70 and 130 the GEMM. With fp32
# and fp16 activations, 24, 33, 70 and 130 rows of the 2-bit g16 weights and 33, 70 and 130 of the
# 4-bit g16 ones take the fp32 GEMM (from 16 and 32 rows on AVX-512), the other weights' rows the
# register kernels (to 255 rows or more: csrc/cpu/linear_kernels_isa.cpp).
PATH_COUNTS = [1, 0, 7, 8, 24, 33, 70, 130]


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (8, 32, False), (4, 32, False), (4, None, True),
                                                       (2, 16, False), (4, 16, True)],
                         ids=["w8", "w8g32a", "w4g32a", "w4", "w2g16a", "w4g16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_grouped_linear_takes_each_experts_path(gen, bits, group_size, symmetric, dtype):
    """Experts whose rows take different CPU paths in one call: each gets the product linear gives
    its rows, bit for bit, within the float64 reference's bound; from a non-contiguous x (K = 67:
    not a multiple of any group), and with one expert's activations near float's limit (its
    register kernels overflow and its product is computed again through the dequantized weight)."""
    experts, n, k = len(PATH_COUNTS), 36, 67
    w = torch.randn(experts, n, k, generator=gen)
    q = QExpertsWeight.from_weight(w.to(dtype), False, bits, group_size, symmetric)
    b = torch.randn(experts, n, generator=gen).to(dtype)
    x = strided_view(torch.randn(sum(PATH_COUNTS), k, generator=gen).to(dtype))
    x[1:8] *= 1e36 if dtype != torch.float16 else 1  # expert 2's 7 rows (fp16 cannot hold them)
    y = q.grouped_linear(x, PATH_COUNTS, b)
    start = 0
    for e, c in enumerate(PATH_COUNTS):
        rows = x[start:start + c]
        got = y[start:start + c]
        assert torch.equal(got, q.linear(rows, e, b[e])), (e, c)
        assert bool(torch.isfinite(got).all()), (e, c)
        w64 = ref_weight(q.qweight[e], q.scales[e], None if q.zeros is None else q.zeros[e], bits, group_size, k)
        x64 = rows.double()
        ref = x64 @ w64.T + b[e].double()
        bound = linear_bound(x64, w64, q.qweight[e], q.scales[e], None if q.zeros is None else q.zeros[e], bits,
                             group_size, dtype, ref) + ref.abs() * torch.finfo(dtype).eps  # + bias rounding
        assert bool(((got.double() - ref).abs() <= bound).all()), (e, c)
        start += c


def test_grouped_linear_under_autocast(gen):
    """Under torch.autocast, grouped_linear runs in the autocast dtype as linear does (x cast)."""
    q = QExpertsWeight.from_weight(torch.randn(3, 16, 40, generator=gen), False, 4, 8, False)
    x, counts = torch.randn(6, 40, generator=gen), [2, 0, 4]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q.grouped_linear(x, counts)
    assert y.dtype == torch.bfloat16 and torch.equal(y, q.grouped_linear(x.bfloat16(), counts))


def test_awkward_routings(gen):
    """No tokens; one expert taking every token; experts no token chooses; the expert-parallel
    sentinel index (num_experts) contributing nothing; a non-contiguous input."""
    module = toy_experts(gen)
    ref = reference_experts(module, 4, 8, False)
    lq.quantize_model(module, bits=4, group_size=8, symmetric=False)
    empty = module(torch.randn(0, 40), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert empty.shape == (0, 40)
    x = torch.randn(6, 80, generator=gen)[:, ::2]
    assert not x.is_contiguous()
    for index in [torch.full((6, 1), 3), torch.tensor([[0, 4]] * 6), torch.tensor([[1, 5], [5, 2], [0, 1]] * 2)]:
        weights = torch.rand(index.shape, generator=gen)
        out = module(x, index, weights)
        kept = index < 5  # the sentinel's pairs, weighted 0, are what the reference adds for them
        expected = reference_forward(ref, x, index.clamp(max=4), weights * kept)
        assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-6), index


def test_gradients_reach_the_input(gen):
    module = toy_experts(gen, has_bias=True)
    ref = reference_experts(module, 8, None, True)
    lq.quantize_model(module, bits=8)
    x = torch.randn(9, 40, generator=gen, requires_grad=True)
    index, weights = routing(gen, 9, 5, 2)
    module(x, index, weights).square().sum().backward()
    x64 = x.detach().double().requires_grad_()
    moe.batched_mm_experts_forward(ref, x64, index, weights.double()).square().sum().backward()
    # fp32 sums of terms up to ~|grad| = 30: relative to the whole gradient, not element by element
    assert float((x.grad.double() - x64.grad).norm() / x64.grad.norm()) < 1e-5


def tiny(name):
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if name == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=4, **common)
    elif name == "qwen3-moe":
        config = transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=40, head_dim=16, **common)
    else:  # gpt-oss: transposed weights with biases, interleaved gate and up, its own clamped gate
        config = transformers.GptOssConfig(num_local_experts=4, head_dim=16, sliding_window=8,
                                           layer_types=["sliding_attention", "full_attention"], **common)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe", "gpt-oss"])
def test_a_moe_model_runs_quantized_as_its_reference_and_shrinks(gen, name):
    model = tiny(name)
    ids = torch.randint(3, 128, (2, 13), generator=gen)
    ref = copy.deepcopy(model)
    before = lq.footprint(model)["total"]
    lq.quantize_model(model, bits=4, group_size=32, symmetric=False)
    experts = [m for _, m in experts_modules(model)]
    assert len(experts) == 2 and all(isinstance(m.down_proj, QExpertsWeight) for m in experts)
    for (_, r), (_, m) in zip(experts_modules(ref), experts_modules(model)):  # the model's own eager loop
        r64 = reference_experts(r, 4, 32, False)
        x = torch.randn(11, 64, generator=gen)
        index, weights = routing(gen, 11, 4, 2)
        expected = type(r64).forward.__wrapped__(r64, x.double(), index, weights.double())
        assert torch.allclose(m(x, index, weights).double(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert model.generate(ids[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 7)
    # Per expert and output row: K / 2 bytes of values, a float32 scale and an int32 zero point per
    # group of 32 (a last partial group too); gpt-oss's biases stay float.
    expected_bytes = 0
    for _, m in experts_modules(ref):
        for attr in ("gate_up_proj", "down_proj"):
            w = getattr(m, attr)
            num_experts, out_features, in_features = w.shape[0], *w.shape[1:][::-1 if m.is_transposed else 1]
            expected_bytes += num_experts * out_features * ((in_features + 1) // 2 + 8 * -(-in_features // 32))
        expected_bytes += sum(p.numel() * 4 for n, p in m.named_parameters() if n.endswith("_bias"))
    assert sum(t.numel() * t.element_size() for m in experts for t in m.state_dict().values()) == expected_bytes
    assert lq.footprint(model)["total"] < before


@pytest.mark.parametrize("name", ["mixtral", "gpt-oss"])
def test_save_load_round_trip_is_identical(tmp_path, gen, name):
    model = lq.quantize_model(tiny(name), bits=2, group_size=16)
    ids = torch.randint(3, 128, (1, 9), generator=gen)
    lq.save_quantized(model, str(tmp_path / "q"))
    config = json.loads((tmp_path / "q" / "linquant.json").read_text())
    assert config["experts"]["model.layers.1.mlp.experts.down_proj"] == {
        "num_experts": 4, "in_features": 96, "out_features": 64, "bits": 2,
        "group_size": 16, "symmetric": True, "dtype": "float32"}
    for loaded in (lq.load_quantized(str(tmp_path / "q")),
                   lq.load_quantized(str(tmp_path / "q"), lambda: type(model)(model.config))):
        assert isinstance(loaded.model.layers[0].mlp.experts.gate_up_proj, QExpertsWeight)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["experts"]["model.layers.0.mlp.experts.gate_up_proj"].update(num_experts=-1),
     r"experts projection 'model.layers.0.mlp.experts.gate_up_proj' has an invalid 'num_experts'"),
    (lambda c: c["experts"]["model.layers.0.mlp.experts.down_proj"].pop("bits"),
     r"experts projection 'model.layers.0.mlp.experts.down_proj' has a missing or invalid 'bits'"),
    (lambda c: c["experts"].update({"model.layers.0.mlp.experts.w9": c["experts"].pop(
        "model.layers.0.mlp.experts.down_proj")}),
     r"the model has no experts projection 'model.layers.0.mlp.experts.w9'"),
    (lambda c: c["experts"]["model.layers.0.mlp.experts.down_proj"].update(num_experts=5),
     r"'model.layers.0.mlp.experts.down_proj.qweight' is \[4, 64, 24\] in the file but \[5, 64, 24\] in the model"),
])
def test_a_damaged_experts_entry_is_named(tmp_path, edit, match):
    lq.save_quantized(lq.quantize_model(tiny("mixtral"), bits=2, group_size=16), str(tmp_path / "q"))
    config = json.loads((tmp_path / "q" / "linquant.json").read_text())
    edit(config)
    (tmp_path / "q" / "linquant.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        lq.load_quantized(str(tmp_path / "q"))


def test_exclude_keeps_experts_or_projections_in_float(gen):
    model = lq.quantize_model(tiny("mixtral"), bits=4, group_size=32, exclude=["lm_head", "experts"])
    assert all(isinstance(m.gate_up_proj, nn.Parameter) for _, m in experts_modules(model))
    # A projection's last component: the experts' down_proj stays float, their gate_up_proj not; the
    # module then runs linquant's loop with one float projection.
    model = tiny("mixtral")
    float_experts = copy.deepcopy(model.model.layers[0].mlp.experts)
    lq.quantize_model(model, bits=8, exclude=["lm_head", "down_proj"])
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, QExpertsWeight) and isinstance(experts.down_proj, nn.Parameter)
    ref = copy.deepcopy(float_experts)
    ref.gate_up_proj = nn.Parameter(reference_experts(float_experts, 8, None, True).gate_up_proj.float())
    ref = ref.double()
    x = torch.randn(5, 64, generator=gen)
    index, weights = routing(gen, 5, 4, 2)
    expected = type(ref).forward.__wrapped__(ref, x.double(), index, weights.double())
    assert torch.allclose(experts(x, index, weights).double(), expected, rtol=1e-5, atol=1e-5)
    # A predicate gets the projection's name and the experts module.
    model = lq.quantize_model(tiny("mixtral"), bits=8,
                              exclude=lambda name, m: name == "model.layers.1.mlp.experts.gate_up_proj")
    assert isinstance(model.model.layers[1].mlp.experts.gate_up_proj, nn.Parameter)
    assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, QExpertsWeight)


def test_an_experts_pattern_does_not_warn_as_unmatched():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lq.quantize_model(tiny("mixtral"), bits=8, exclude=["lm_head", "*.experts"])
    with pytest.warns(UserWarning, match="exclude pattern 'expert' matches no"):
        lq.quantize_model(tiny("mixtral"), bits=8, exclude=["lm_head", "expert"])


def test_switching_the_implementation_away_is_named(gen):
    model = lq.quantize_model(tiny("mixtral"), bits=8)
    assert model.config._experts_implementation == "linquant"
    model.set_experts_implementation("batched_mm")
    with pytest.raises(TypeError, match="run only through the experts implementation 'linquant'"):
        model(torch.randint(3, 128, (1, 4), generator=gen))


def test_a_router_subclassing_linear_is_left_alone(gen):
    """Phi-MoE's router is an nn.Linear subclass returning top-k choices: QLinear would break it.
    A subclass whose forward still computes x W^T + b (Falcon's FalconLinear) is quantized."""

    class Router(nn.Linear):
        def forward(self, x):
            return super().forward(x).topk(2, dim=-1)

    class Rewritten(nn.Linear):
        def forward(self, x):
            return x @ self.weight.T + self.bias

    model = nn.Sequential(Router(16, 4), Rewritten(16, 8), nn.Linear(8, 8))
    lq.quantize_model(model, bits=8, exclude=None)
    assert type(model[0]) is Router and isinstance(model[1], lq.QLinear) and isinstance(model[2], lq.QLinear)
    phimoe = transformers.AutoModelForCausalLM.from_config(transformers.PhimoeConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, num_local_experts=4, num_experts_per_tok=2)).eval()
    lq.quantize_model(phimoe, bits=8)
    assert not isinstance(phimoe.model.layers[0].mlp.router, lq.QLinear)
    assert isinstance(phimoe.model.layers[0].mlp.experts.gate_up_proj, QExpertsWeight)
    with torch.no_grad():
        assert torch.isfinite(phimoe(torch.randint(3, 128, (1, 6), generator=gen)).logits).all()


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_experts_on_the_gpu_as_on_the_cpu(gen, dtype):
    module = toy_experts(gen, dtype=dtype, has_bias=True, is_transposed=True)
    ref = reference_experts(module, 4, 16, False)
    lq.quantize_model(module, bits=4, group_size=16, symmetric=False)
    x = torch.randn(17, 40, generator=gen).to(dtype)
    index, weights = routing(gen, 17, 5, 2, dtype)
    cpu = module(x, index, weights)
    gpu = module.cuda()(x.cuda(), index.cuda(), weights.cuda())
    expected = reference_forward(ref, x, index, weights)
    assert gpu.device.type == "cuda" and gpu.dtype == dtype
    for out in (cpu, gpu):
        assert float((out.detach().double().cpu() - expected).norm() / expected.norm()) < DTYPE_TOLERANCE[dtype]
