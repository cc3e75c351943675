"""linquant: linear quantization of neural-network weights on the PyTorch dispatcher.

    import linquant as lq
    scale, zp = lq.choose_qparams(w, bits=4, symmetric=False, group_size=128)
    q = lq.quantize(w, scale, zp, bits=4, group_size=128)
    w_hat = lq.dequantize(q, scale, zp, group_size=128)
    lq.metrics(w, w_hat)

    lq.quantize_model(model, bits=4, group_size=128, exclude=["lm_head"])   # nn.Linear -> QLinear,
                                                                            # MoE experts -> QExpertsWeight
    lq.save_quantized(model, "out/"); model = lq.load_quantized("out/", make_model)
    model = lq.quantize_pretrained("llama-dir/", bits=4, group_size=128)  # read and quantized tensor by tensor
"""

from ._library import library_path, load_library

load_library()

from ._ops import (choose_qparams, cuda_linear_dispatch, dequantize, linear, pack, packed_size,  # noqa: E402
                   quantize, unpack)
from .metrics import metrics  # noqa: E402
from .weights import QuantizedWeight, dequantize_weight, quantize_weight  # noqa: E402
from .nn import QLinear  # noqa: E402
from .experts import QExpertsWeight  # noqa: E402
from .embedding import QEmbedding  # noqa: E402
from .model import footprint, quantizable_layers, quantize_model  # noqa: E402
from .serialization import load_quantized, save_quantized  # noqa: E402
from .pretrained import CheckpointMismatch, quantize_pretrained  # noqa: E402

__version__ = "0.1.0"
__all__ = ["choose_qparams", "quantize", "dequantize", "pack", "unpack", "packed_size", "linear",
           "quantize_weight", "dequantize_weight", "QuantizedWeight", "QLinear", "QExpertsWeight", "QEmbedding", "quantize_model",
           "quantizable_layers", "quantize_pretrained", "CheckpointMismatch", "footprint", "save_quantized",
           "load_quantized", "metrics", "library_path", "cuda_linear_dispatch"]
