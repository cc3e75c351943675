"""linquant: linear quantization of neural-network weights on the PyTorch dispatcher.

    import linquant as lq
    scale, zp = lq.choose_qparams(w, bits=4, symmetric=False, group_size=128)
    q = lq.quantize(w, scale, zp, bits=4, group_size=128)
    w_hat = lq.dequantize(q, scale, zp, group_size=128)
    lq.metrics(w, w_hat)
"""

from ._library import library_path, load_library

load_library()

from ._ops import choose_qparams, dequantize, linear, pack, packed_size, quantize, unpack  # noqa: E402
from .metrics import metrics  # noqa: E402
from .weights import QuantizedWeight, dequantize_weight, quantize_weight  # noqa: E402

__version__ = "0.1.0"
__all__ = ["choose_qparams", "quantize", "dequantize", "pack", "unpack", "packed_size", "linear",
           "quantize_weight", "dequantize_weight", "QuantizedWeight", "metrics", "library_path"]
