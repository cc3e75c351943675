"""Thin Python wrappers over `torch.ops.linquant.*`, with the fake (shape-only) kernel of each op
beside it so torch.compile and torch.export trace through the ops without running them."""

import contextlib
from typing import Optional, Tuple

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Zero points the kernels take (zero_points_as_int32, csrc/quant_layout.cpp). That int64 ones fit
# in int32 only the kernels can check: it takes the values.
_ZERO_POINT_DTYPES = (torch.int32, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int64)


def param_shape(shape, axis: Optional[int], group_size: Optional[int]) -> list:
    """Shape of the scale / zero-point tensors for a tensor of `shape` (see docs/architecture.md):
    [] per-tensor; `shape` with every dim but `axis` set to 1 per-channel; shape[:-1] + [groups]
    per-group, with groups = ceil(shape[-1] / group_size)."""
    ndim = len(shape)
    if axis is not None and group_size is not None:
        raise ValueError("linquant: axis and group_size are exclusive (groups run along the last dim); "
                         f"got axis={axis} and group_size={group_size}")
    if axis is not None:
        if not -ndim <= axis < ndim:
            raise ValueError(f"linquant: axis {axis} is out of range for x of shape {list(shape)} ({ndim} dims)")
        axis = axis % ndim
        return [shape[d] if d == axis else 1 for d in range(ndim)]
    if group_size is not None:
        if group_size < 1:
            raise ValueError(f"linquant: group_size must be >= 1, got {group_size}")
        if ndim == 0:
            raise ValueError("linquant: group_size needs x with at least one dim, got a 0-dim tensor")
        return list(shape[:-1]) + [(shape[-1] + group_size - 1) // group_size]
    return []


def _check_devices(ref, ref_name: str, **tensors) -> None:
    """Every tensor given (None allowed) is on ref's device, as the real kernels require."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"linquant: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _require_tensor(t, name: str) -> None:
    """For functions whose only tensor argument is `t` (given None, the dispatcher would only say
    that there were no tensor arguments) and for Python-only ones such as metrics."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"linquant: {name} must be a tensor, got {'None' if t is None else type(t).__name__}")


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"linquant: bits must be between 2 and 8, got {bits}")


# The fake kernels make the kernels' dtype and shape checks (csrc/quant_layout.cpp,
# csrc/linear_checks.cpp), so that torch.compile and torch.export reject a bad call while tracing
# rather than when the traced graph first runs.
def _check_dtype(t, name: str, dtypes, expected: str) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"linquant: {name} must be {expected}, got {t.dtype}")


def _check_float(t, name: str) -> None:
    _check_dtype(t, name, _FLOAT_DTYPES, "float32, float16 or bfloat16")


def _check_zero_point_dtype(t, name: str) -> None:
    _check_dtype(t, name, _ZERO_POINT_DTYPES,
                 "an integer tensor (int32, or int8/uint8/int16/uint16/int64 with values that fit in int32)")


def _check_param_shape(t, name: str, want: list) -> None:
    """A scale or zero point as the kernels take it: param_shape, or that shape without its size-1
    dims, or per-tensor (want == []) any one-element tensor."""
    if t is None:
        return
    squeezed = [d for d in want if d != 1]
    if (t.numel() != 1) if not want else list(t.shape) not in (want, squeezed):
        alternative = " (one element)" if not want else f" or {squeezed}" if squeezed != want else ""
        raise ValueError(f"linquant: {name} must have shape {want}{alternative} for this granularity, got shape "
                         f"{list(t.shape)}")


def _check_qparams(x, scale, zero_point, axis, group_size) -> None:
    want = param_shape(x.shape, axis, group_size)
    _check_float(scale, "scale")
    _check_param_shape(scale, "scale", want)
    if zero_point is not None:
        _check_param_shape(zero_point, "zero_point", want)
        _check_zero_point_dtype(zero_point, "zero_point")


@torch.library.register_fake("linquant::choose_qparams")
def _choose_qparams_fake(x, bits, symmetric, axis=None, group_size=None):
    _check_bits(bits)
    _check_float(x, "x")
    shape = param_shape(x.shape, axis, group_size)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int32)


@torch.library.register_fake("linquant::quantize")
def _quantize_fake(x, scale, zero_point, bits, axis=None, group_size=None):
    _check_bits(bits)
    _check_float(x, "x")
    _check_devices(x, "the input", scale=scale, zero_point=zero_point)
    _check_qparams(x, scale, zero_point, axis, group_size)
    return torch.empty_like(x, dtype=torch.int8 if zero_point is None else torch.uint8,
                            memory_format=torch.contiguous_format)


@torch.library.register_fake("linquant::dequantize")
def _dequantize_fake(q, scale, zero_point, axis=None, group_size=None, dtype=None):
    _check_dtype(q, "q", (torch.int8, torch.uint8), "int8 (symmetric) or uint8 (asymmetric)")
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise ValueError(f"linquant: dtype must be float32, float16 or bfloat16, got {dtype}")
    _check_devices(q, "the input", scale=scale, zero_point=zero_point)
    _check_qparams(q, scale, zero_point, axis, group_size)
    return torch.empty_like(q, dtype=dtype or torch.float32, memory_format=torch.contiguous_format)


def _check_pack_args(t, name: str, bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"linquant: bits must be between 1 and 8 for packing, got {bits}")
    if t.dim() == 0:
        raise ValueError(f"linquant: {name} must have at least one dim, got a 0-dim tensor")


def packed_size(n: int, bits: int) -> int:
    """Bytes that n values of `bits` bits take when packed."""
    return (n * bits + 7) // 8


@torch.library.register_fake("linquant::pack")
def _pack_fake(q, bits):
    _check_pack_args(q, "q", bits)
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"linquant: q must hold integers (uint8, or any integer dtype with values in range), "
                         f"got {q.dtype}")
    return q.new_empty(list(q.shape[:-1]) + [packed_size(q.shape[-1], bits)], dtype=torch.uint8)


@torch.library.register_fake("linquant::unpack")
def _unpack_fake(packed, bits, size):
    _check_pack_args(packed, "packed", bits)
    _check_dtype(packed, "packed", (torch.uint8,), "uint8")
    if size < 0:
        raise ValueError(f"linquant: size must be >= 0, got {size}")
    if packed.shape[-1] != packed_size(size, bits):
        raise ValueError(f"linquant: packed has {packed.shape[-1]} bytes in its last dim, but {size} values of "
                         f"{bits} bits take {packed_size(size, bits)}")
    return packed.new_empty(list(packed.shape[:-1]) + [size], dtype=torch.uint8)


@torch.library.register_fake("linquant::linear")
def _linear_fake(x, qweight, scales, zeros=None, bias=None, bits=8, group_size=None):
    if bits not in (8, 4, 2):
        raise ValueError(f"linquant: linear supports bits 8, 4 and 2, got {bits}")
    _check_float(x, "x")
    if x.dim() == 0:
        raise ValueError("linquant: x must have at least one dim [..., K], got a 0-dim tensor")
    _check_devices(x, "x", qweight=qweight, scales=scales, zeros=zeros, bias=bias)
    symmetric = zeros is None
    want_q = torch.int8 if bits == 8 and symmetric else torch.uint8
    _check_dtype(qweight, "qweight", (want_q,),
                 ("int8 (8-bit symmetric)" if want_q == torch.int8 else "uint8 (packed, or 8-bit asymmetric)")
                 + f" for bits={bits} {'symmetric' if symmetric else 'asymmetric'}")
    if qweight.dim() != 2:
        raise ValueError(f"linquant: qweight must be 2-D [out_features, packed in_features], got {qweight.dim()} dims")
    n, k = qweight.shape[0], x.shape[-1]
    if qweight.shape[1] != packed_size(k, bits):
        raise ValueError(f"linquant: x has in_features K={k}, which at {bits} bits packs into "
                         f"{packed_size(k, bits)} bytes per weight row, but qweight has {qweight.shape[1]}")
    per_byte = 8 // bits
    if group_size is not None and (group_size < 1 or group_size % per_byte):
        raise ValueError(f"linquant: group_size must be a positive multiple of {per_byte} at {bits} bits (groups "
                         f"start on byte boundaries), got {group_size}")
    groups = 1 if group_size is None else -(-k // group_size)
    _check_float(scales, "scales")
    for t, name, what in ((scales, "scales", " (out_features x ceil(K / group_size))"),
                          (zeros, "zeros", " like scales")):
        if t is not None and list(t.shape) not in ([n, groups], [n] if groups == 1 else None):
            raise ValueError(f"linquant: {name} must be [{n}, {groups}]{what}, got shape {list(t.shape)}")
    if zeros is not None:
        _check_zero_point_dtype(zeros, "zeros")
    if bias is not None:
        _check_float(bias, "bias")
        if list(bias.shape) != [n]:
            raise ValueError(f"linquant: bias must be [out_features] = [{n}], got shape {list(bias.shape)}")
    return x.new_empty(list(x.shape[:-1]) + [n])


@torch.library.register_fake("linquant::grouped_linear")
def _grouped_linear_fake(x, counts, qweight, scales, zeros=None, bias=None, bits=8, group_size=None):
    who = "linquant::grouped_linear"
    if x.dim() != 2:
        raise ValueError(f"{who}: x must be [T, K] (each expert's rows in turn), got shape {list(x.shape)}")
    if qweight.dim() != 3 or scales.dim() != 3 or scales.shape[0] != qweight.shape[0]:
        raise ValueError(f"{who}: qweight and scales must be stacked per expert, [E, N, ...], got shapes "
                         f"{list(qweight.shape)} and {list(scales.shape)}")
    experts, n = qweight.shape[0], qweight.shape[1]
    for t, name, dims in ((zeros, "zeros", 3), (bias, "bias", 2)):
        if t is not None and (t.dim() != dims or t.shape[0] != experts or t.shape[1] != n):
            raise ValueError(f"{who}: {name} must be [{experts}, {n}{'' if dims == 2 else ', G'}] (one per expert), "
                             f"got shape {list(t.shape)}")
    if len(counts) != experts:
        raise ValueError(f"{who}: counts must hold one row count per expert ({experts}), got {len(counts)}")
    total = 0
    for e, c in enumerate(counts):  # in the kernels' order, which stops at the first count past x's rows
        if c < 0:
            raise ValueError(f"{who}: counts must be >= 0, got counts[{e}] = {c}")
        if c > x.shape[0] - total:
            raise ValueError(f"{who}: counts must sum to x's {x.shape[0]} rows, got more from counts[{e}] = {c} on "
                             f"(the counts before it add up to {total})")
        total += c
    if total != x.shape[0]:
        raise ValueError(f"{who}: counts must sum to x's {x.shape[0]} rows, got {total}")
    if experts:
        _linear_fake(x, qweight[0], scales[0], None if zeros is None else zeros[0], None if bias is None else bias[0],
                     bits, group_size)
    return x.new_empty(x.shape[0], qweight.shape[1])


def choose_qparams(x: torch.Tensor, bits: int = 8, symmetric: bool = True, axis: Optional[int] = None,
                   group_size: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scale (float32) and zero point (int32, or None when symmetric) for quantizing `x`.

    `axis=None, group_size=None` is per-tensor; `axis=k` gives one scale per index of dim k;
    `group_size=g` gives groups of g consecutive elements along the last dim (a last group that
    is shorter than g is allowed)."""
    _require_tensor(x, "x")
    scale, zero_point = torch.ops.linquant.choose_qparams.default(x, bits, symmetric, axis, group_size)
    return scale, (None if symmetric else zero_point)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor] = None, bits: int = 8,
             axis: Optional[int] = None, group_size: Optional[int] = None) -> torch.Tensor:
    """q = clamp(round(x / scale) + zero_point): int8 in [-2^(b-1), 2^(b-1)-1] when zero_point is
    None (symmetric), uint8 in [0, 2^b-1] otherwise. Rounding is half to even."""
    return torch.ops.linquant.quantize.default(x, scale, zero_point, bits, axis, group_size)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor] = None,
               axis: Optional[int] = None, group_size: Optional[int] = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_hat = scale * (q - zero_point), computed in float32 and returned in `dtype`. The scale's
    values must be finite and positive; on CUDA that check is left out while a CUDA graph is being
    captured, since reading its verdict back would end the capture."""
    return torch.ops.linquant.dequantize.default(q, scale, zero_point, axis, group_size, dtype)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs values in [0, 2^bits) along the last dim into uint8: element i of a row occupies bits
    [i*bits, (i+1)*bits) of the row's little-endian bit stream, so the lowest index sits in the
    lowest bits of its byte (pack([0, 1, 2, 3], 2) == [228]). A last dim that does not fill the
    final byte is padded with zero bits: the packed last dim is ceil(n * bits / 8). bits 1..8.
    q may be of any integer dtype."""
    _require_tensor(q, "q")
    return torch.ops.linquant.pack.default(q, bits)


def unpack(packed: torch.Tensor, bits: int, size: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 values with last dim `size` (the original last dim)."""
    _require_tensor(packed, "packed")
    return torch.ops.linquant.unpack.default(packed, bits, size)


def linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor] = None,
           bias: Optional[torch.Tensor] = None, bits: int = 8, group_size: Optional[int] = None) -> torch.Tensor:
    """y = x @ W_hat.T + bias with W_hat = scales * (q - zeros) from the quantized-weight format
    (see `quantize_weight`); x [..., K] in float32/float16/bfloat16, y [..., N] in x's dtype."""
    return torch.ops.linquant.linear.default(x, qweight, scales, zeros, bias, bits, group_size)


def built_with_cuda() -> bool:
    """Whether the loaded op library has the CUDA kernels (built with LINQUANT_CUDA), GPU or not.
    The op's schema alone says nothing: every build defines it."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("linquant::linear", "CUDA")


@contextlib.contextmanager
def cuda_linear_dispatch(gemv_max_m: Optional[int] = None, tc_max_m: Optional[int] = None,
                         mma_max_m: Optional[int] = None, hopper_max_m: Optional[int] = None):
    """Within the block, CUDA `linear` takes the GEMV for M <= gemv_max_m (at most 8), the
    register-dequantizing tensor-core kernels for M <= tc_max_m (at most 64: activations in
    registers up to 16 rows, staged in shared memory beyond), the shared-memory
    tensor-core kernel for M <= mma_max_m, the Hopper (wgmma) GEMM for M <= hopper_max_m where the
    build and GPU have it (`torch.ops.linquant._cuda_has_hopper_gemm(device)`), and dequantize +
    cuBLAS beyond (None keeps a threshold; the defaults are 1, 8, 64, measured on an H100, and 0:
    the Hopper GEMM is off until measured). Unless gemv_max_m is 0, the GEMV also takes up to 8
    rows that no tensor-core kernel takes (fp32 activations, layouts they reject).
    The setting is process-wide, not per thread. For measuring the paths on a GPU
    (bench/bench_linear_cuda.py --paths) and for testing each of them."""
    if not built_with_cuda():
        raise RuntimeError("linquant: this build has no CUDA kernels (built without LINQUANT_CUDA)")
    previous = torch.ops.linquant._cuda_linear_dispatch(
        *(-1 if v is None else v for v in (gemv_max_m, tc_max_m, mma_max_m, hopper_max_m)))
    try:
        yield
    finally:
        torch.ops.linquant._cuda_linear_dispatch(*previous)
