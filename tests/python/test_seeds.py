"""The seeds' worked examples (../shared/seeds), reproduced through linquant."""

import torch

import linquant as lq

SEED_MATRIX = torch.tensor([[191.6, -13.5, 728.6], [92.14, 295.5, -184], [0, 684.6, 245.5]])


def test_linear_q_with_eval_one_to_nine():
    # Seed 001 `linear_q_with_eval` on 1..9: scale 8/255 (0.0314), quantization error 7.6893e-05.
    x = torch.arange(1.0, 10.0).view(3, 3)
    scale, zp = lq.choose_qparams(x, bits=8, symmetric=False)
    assert abs(scale.item() - 0.0314) < 1e-4
    # The seed's signed range gives z = -160; the unsigned range shifts the grid by 128.
    assert zp.item() == -160 + 128
    q = lq.quantize(x, scale, zp)
    assert q.flatten().tolist() == [v + 128 for v in [-128, -96, -64, -33, -1, 31, 63, 95, 127]]
    xh = lq.dequantize(q, scale, zp)
    expected = torch.tensor([[1.0039, 2.0078, 3.0118], [3.9843, 4.9882, 5.9922], [6.9961, 8.0000, 9.0039]])
    assert torch.allclose(xh, expected, atol=1e-4)
    assert abs(lq.metrics(x, xh)["mse"] - 7.6893e-05) < 1e-8


def test_symmetric_per_channel_3x3():
    # Seed 001 `linear_q_symmetric_per_channel`, along rows and along columns.
    s0, z0 = lq.choose_qparams(SEED_MATRIX, bits=8, symmetric=True, axis=0)
    assert z0 is None and s0.shape == (3, 1)
    assert torch.allclose(s0.flatten(), torch.tensor([5.7370, 2.3268, 5.3906]), atol=1e-4)
    q0 = lq.quantize(SEED_MATRIX, s0, axis=0)
    assert q0.tolist() == [[33, -2, 127], [40, 127, -79], [0, 127, 46]]
    xh0 = lq.dequantize(q0, s0, axis=0)
    expected0 = torch.tensor([[189.3213, -11.4740, 728.6000], [93.0709, 295.5000, -183.8150],
                              [0.0000, 684.6000, 247.9653]])
    assert torch.allclose(xh0, expected0, atol=1e-3)
    assert abs(lq.metrics(SEED_MATRIX, xh0)["mse"] - 1.8084) < 1e-4

    s1, _ = lq.choose_qparams(SEED_MATRIX, bits=8, symmetric=True, axis=1)
    assert s1.shape == (1, 3)
    assert torch.allclose(s1.flatten(), torch.tensor([1.5087, 5.3906, 5.7370]), atol=1e-4)
    assert lq.quantize(SEED_MATRIX, s1, axis=1).tolist() == [[127, -3, 127], [61, 55, -32], [0, 127, 43]]


def test_absmax_3x3_example():
    # Seed 000 `absmax_quantize` on its printed 3x3 weights.
    w = torch.tensor([[0.7168, -2.2098, 0.1761], [-1.6349, -0.7506, -0.8688], [1.7245, 0.1274, -0.3302]])
    scale, _ = lq.choose_qparams(w, bits=8, symmetric=True)
    assert lq.quantize(w, scale).tolist() == [[41, -127, 10], [-94, -43, -50], [99, 7, -19]]


def test_absmax_on_gpt2_like_weights(gen):
    # Seed 000 quantizes GPT-2's c_attn weight (768 x 2304) with absmax: scale = 127 / max|W|,
    # q = round(scale * W). linquant divides by s = max|W| / 127 instead of multiplying by its
    # reciprocal (so every backend agrees to the bit); the two differ at most by one step on
    # rare near-ties, and reconstruct with the same error.
    w = torch.randn(768, 2304, generator=gen) * 0.02
    w.view(-1)[torch.randint(0, w.numel(), (32,), generator=gen)] *= 25
    seed_scale = 127 / w.abs().max()
    seed_q = torch.round(seed_scale * w)
    seed_xh = seed_q / seed_scale
    scale, _ = lq.choose_qparams(w, bits=8, symmetric=True)
    q = lq.quantize(w, scale)
    diff = (q.float() - seed_q).abs()
    assert float(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-4
    ours = lq.metrics(w, lq.dequantize(q, scale))
    seeds = lq.metrics(w, seed_xh)
    assert abs(ours["mse"] - seeds["mse"]) / seeds["mse"] < 1e-3
    assert ours["max_error"] <= float(scale) / 2 * (1 + 1e-6)
