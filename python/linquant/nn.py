"""QLinear: a drop-in replacement for nn.Linear (and transformers' Conv1D) holding the quantized-
weight format of docs/architecture.md as buffers and running `torch.ops.linquant.linear`."""

import functools
from typing import Optional

import torch
from torch import nn

from ._ops import _FLOAT_DTYPES
from .weights import QuantizedWeight, check_format, check_scales_dtype, dequantize_weight, is_int, quantize_weight


def qweight_spec(out_features: int, in_features: int, bits: int, symmetric: bool):
    """Shape and dtype of the qweight buffer."""
    if bits == 8:
        return (out_features, in_features), torch.int8 if symmetric else torch.uint8
    return (out_features, (in_features * bits + 7) // 8), torch.uint8


# Where a quantized layer's state_dict records its format: the metadata torch keeps beside the
# tensors (state_dict()._metadata, saved by torch.save and handed back per module by
# load_state_dict), since the buffers alone can have the same shapes in two formats (4-bit K = 16
# and 2-bit K = 32 both pack 8 bytes a row) and would load into the other layer as garbage. No
# tensor is added, so save_quantized's files are unchanged (and record the format in linquant.json).
FORMAT_RECORD = "linquant_format"


def _write_format_record(record: dict, module, state_dict, prefix, local_metadata) -> None:
    local_metadata[FORMAT_RECORD] = dict(record)


def _check_format_record(record: dict, module, state_dict, prefix, local_metadata, *_) -> None:
    """Refuses a state_dict recorded from a layer of another format. One without the record (a
    plain dict of tensors, or from before the record) loads as before."""
    saved = local_metadata.get(FORMAT_RECORD, {})
    for key, value in record.items():
        if key in saved and saved[key] != value:
            where = f" at {prefix[:-1]!r}" if prefix else ""
            raise ValueError(f"linquant.{type(module).__name__}: the state_dict{where} holds a layer with {key} = "
                             f"{saved[key]!r}, this layer has {value!r}")


def scales_usable(scales: torch.Tensor) -> bool:
    """Whether every scale is finite and positive (quantize and dequantize refuse others): the linear
    kernels take the scales as they are (checking every scale at each call would add a pass over
    them), and would return NaN, inf, zero or sign-flipped outputs."""
    return not scales.numel() or bool(torch.isfinite(scales).logical_and_(scales > 0).all())


def _check_scales(module, state_dict, prefix, *_) -> None:
    """Refuses a state_dict whose scales are not usable (scales_usable), as load_quantized does."""
    scales = state_dict.get(prefix + "scales")
    if isinstance(scales, torch.Tensor) and scales.device.type != "meta" and not scales_usable(scales):
        where = f" at {prefix[:-1]!r}" if prefix else ""
        raise ValueError(f"linquant.{type(module).__name__}: the state_dict{where} holds scales that are not finite "
                         "and positive")


def init_format(module: nn.Module, sizes: dict, rows: int, cols: int, bits: int, group_size: Optional[int],
                symmetric: bool, device, dtype, stacked: tuple = ()) -> None:
    """A quantized layer's constructor (QLinear, QEmbedding, QExpertsWeight): checks its `sizes`
    (name: value), bits, group size and scales dtype, naming the class, rather than as a
    tensor-factory error (a negative size) or at the first forward (scales the kernels cannot
    take); sets bits, group_size and symmetric; registers the format's buffers for `stacked`
    weights of [rows, cols] (values 0, scales 1); its state_dict records the format (FORMAT_RECORD)."""
    who = f"linquant.{type(module).__name__}"
    for name, value in sizes.items():
        if not is_int(value):
            raise TypeError(f"{who}: {name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{who}: {name} must be >= 0, got {value}")
    check_scales_dtype(dtype, who, "the scales and bias")
    check_format(bits, group_size, who)
    module.bits, module.group_size, module.symmetric = bits, group_size, symmetric
    groups = 1 if group_size is None else -(-cols // group_size)  # none when cols = 0
    shape, qdtype = qweight_spec(rows, cols, bits, symmetric)
    module.register_buffer("qweight", torch.zeros((*stacked, *shape), dtype=qdtype, device=device))
    module.register_buffer("scales", torch.ones((*stacked, rows, groups), dtype=dtype, device=device))
    module.register_buffer("zeros", None if symmetric else
                           torch.zeros((*stacked, rows, groups), dtype=torch.int32, device=device))
    record = {"bits": bits, "group_size": group_size, "symmetric": symmetric, **sizes}
    module.register_state_dict_post_hook(functools.partial(_write_format_record, record))
    module.register_load_state_dict_pre_hook(functools.partial(_check_format_record, record))
    module.register_load_state_dict_pre_hook(_check_scales)


def check_conversion(module: nn.Module, fn) -> None:
    """Module.to / .double() convert every floating-point tensor, here a quantized layer's scales
    (and bias). The kernels compute in float32 at most, so float64 would only fail at the next
    forward: refused before the layer's buffers change, on an empty probe of what `fn` makes of
    its scales."""
    probe = fn(torch.empty(0, dtype=module.scales.dtype, device=module.scales.device))
    if isinstance(probe, torch.Tensor) and probe.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"linquant.{type(module).__name__}: the scales and bias must stay float32, float16 or "
                         f"bfloat16 (the kernels compute in float32 at most), not {probe.dtype}: convert the model "
                         "to one of those, or exclude this layer from quantize_model")


def format_repr(module: nn.Module) -> str:
    """The format part of a quantized layer's repr: bits, granularity, mode, scales dtype."""
    gran = "per-channel" if module.group_size is None else f"group_size={module.group_size}"
    mode = "symmetric" if module.symmetric else "asymmetric"
    return f"bits={module.bits}, {gran}, {mode}, dtype={module.scales.dtype}"


class QuantizedMatrix(nn.Module):
    """What QLinear and QEmbedding share: one [rows, cols] weight in the format's buffers
    (`qweight`, `scales` [rows, G] in the compute dtype, `zeros` [rows, G] int32 or None when
    symmetric), conversions that keep the scales float32/16/bf16, and the dequantized weight.
    Subclasses give `cols` (in_features, embedding_dim) through _cols."""

    zeros: Optional[torch.Tensor]
    group_size: Optional[int]
    __jit_unused_properties__ = ["weight"]

    def _cols(self) -> int:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        check_conversion(self, fn)
        return super()._apply(fn, recurse)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self._cols())

    def dequantize(self) -> torch.Tensor:
        """The float weight [rows, cols] the layer computes with, in the scales' dtype."""
        return dequantize_weight(self.quantized_weight())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float weight, computed on each access (code such as T5's reads
        `layer.weight.dtype` or `.device`); the layer itself never materializes it."""
        return self.dequantize()


class QLinear(QuantizedMatrix):
    """y = x @ W_hat.T + bias with W_hat = scales * (q - zeros), W8A16 / W4A16 / W2A16.

    Buffers: `qweight`, `scales` [out, G] (the compute dtype), `zeros` [out, G] int32 or None
    (symmetric), `bias` [out] or None. `.to(dtype)` converts scales and bias only; the integer
    buffers stay integer. The weights are frozen buffers, but gradients flow to the input."""

    bias: Optional[torch.Tensor]

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8,
                 group_size: Optional[int] = None, symmetric: bool = True, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        init_format(self, {"in_features": in_features, "out_features": out_features}, out_features, in_features,
                    bits, group_size, symmetric, device, dtype)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int = 8, group_size: Optional[int] = None,
                    symmetric: bool = True, transposed: bool = False, method: str = "minmax") -> "QLinear":
        """Quantizes an nn.Linear (or, with transposed=True, a weight stored [in, out] as in
        transformers' Conv1D): per output channel when group_size is None, else per group;
        `method` chooses the scales (quantize_weight's "minmax" or "mse")."""
        weight = linear.weight.detach()
        if transposed:
            weight = weight.t()
        out_features, in_features = weight.shape
        bias = getattr(linear, "bias", None)
        # Built on meta: set_weight and set_bias give it its real buffers, with nothing allocated twice.
        q = cls(in_features, out_features, bias is not None, bits, group_size, symmetric, device="meta",
                dtype=weight.dtype)
        q.set_weight(weight, method)
        if bias is not None:
            q.set_bias(bias)
        return q

    def set_weight(self, weight: torch.Tensor, method: str = "minmax") -> None:
        """Quantizes a float weight [out_features, in_features] into this layer's format, scales in
        its dtype chosen by `method` (quantize_weight's), and takes the result as its buffers
        (replacing them, so a layer built on the meta device gets real ones, on the weight's device)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"linquant.QLinear.set_weight: weight must be [out_features, in_features] = "
                             f"[{self.out_features}, {self.in_features}], got {list(weight.shape)}")
        qw = quantize_weight(weight.detach(), self.bits, self.group_size, self.symmetric, dtype=self.scales.dtype,
                             method=method)
        self.qweight, self.scales = qw.qweight.contiguous(), qw.scales.contiguous()
        if qw.zeros is not None:
            self.zeros = qw.zeros.contiguous()

    def set_bias(self, bias: torch.Tensor) -> None:
        """Takes a copy of `bias` [out_features], in the layer's dtype, as its bias buffer."""
        if self.bias is None:
            raise ValueError("linquant.QLinear.set_bias: the layer was built without a bias (bias=False)")
        if tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"linquant.QLinear.set_bias: bias must be [out_features] = [{self.out_features}], "
                             f"got {list(bias.shape)}")
        self.bias = bias.detach().to(dtype=self.scales.dtype, copy=True)

    def _cols(self) -> int:
        return self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The op sees only packed bytes, so at 4 or 2 bits it cannot tell K = 7 from K = 8: check here.
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            # One f-string: torch.compile cannot trace str() of an int (nor concatenation), and
            # fullgraph=True then reported that instead of this error.
            raise ValueError(f"linquant.QLinear: x must have in_features={self.in_features} in its last dim, "
                             f"got shape {list(x.shape)}")
        if torch.jit.is_scripting():
            return torch.ops.linquant.linear(x, self.qweight, self.scales, self.zeros, self.bias, self.bits,
                                             self.group_size)
        return self._linear(x)

    @torch.jit.unused
    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        # The buffers read from _buffers (which TorchScript cannot): through nn.Module.__getattr__
        # the four cost ~2 us a call, as much as the op's own work on a small layer at batch 1.
        b = self._buffers
        return torch.ops.linquant.linear.default(x, b["qweight"], b["scales"], b["zeros"], b["bias"], self.bits,
                                                 self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                + format_repr(self))
