"""Error metrics of a reconstruction x_hat of x, computed in float64."""

import math

import torch

from ._ops import _require_tensor


def metrics(x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    """mse, max_error (max |x - x_hat|), mean_error (mean |x - x_hat|) and snr_db
    (10 log10(sum x^2 / sum (x - x_hat)^2); inf for an exact reconstruction)."""
    for t, name in ((x, "x"), (x_hat, "x_hat")):
        _require_tensor(t, name)
        # A complex input would lose its imaginary part in the float64 cast (an MSE of 0 for 1+1j
        # against 1); integer ones are quantized values, not a reconstruction: dequantize them first.
        if not t.is_floating_point():
            raise ValueError(f"linquant.metrics: {name} must be a real floating-point tensor (float16, bfloat16, "
                             f"float32 or float64), got {t.dtype}")
    if x.shape != x_hat.shape:
        raise ValueError(f"linquant.metrics: x has shape {list(x.shape)} but x_hat has {list(x_hat.shape)}")
    if x.numel() == 0:
        raise ValueError("linquant.metrics: x is empty")
    x64 = x.detach().to(torch.float64)
    err = x64 - x_hat.detach().to(device=x.device, dtype=torch.float64)
    noise = err.square().sum().item()
    signal = x64.square().sum().item()
    if noise == 0.0:
        snr = math.inf
    elif signal == 0.0:
        snr = -math.inf
    else:
        snr = 10.0 * math.log10(signal / noise)
    return {
        "mse": err.square().mean().item(),
        "max_error": err.abs().max().item(),
        "mean_error": err.abs().mean().item(),
        "snr_db": snr,
    }
