"""The quantized-weight format of docs/architecture.md, from and back to a float weight."""

from typing import NamedTuple, Optional

import torch

from ._ops import _FLOAT_DTYPES, choose_qparams, dequantize, pack, quantize, unpack


class QuantizedWeight(NamedTuple):
    qweight: torch.Tensor           # int8 [N, K] | uint8 [N, K] (8-bit asym) | uint8 [N, ceil(K*bits/8)]
    scales: torch.Tensor            # [N, G] in the compute dtype
    zeros: Optional[torch.Tensor]   # int32 [N, G], None when symmetric
    bits: int
    group_size: Optional[int]       # None: per-channel
    in_features: int


def is_int(value) -> bool:
    """An int, and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_format(bits: int, group_size: Optional[int], who: str) -> None:
    """bits and group_size the format can hold: a sub-byte group starts on a byte boundary, so it
    is a multiple of the values per byte (what `linear` requires)."""
    # Types first: bits="4" would read "got 4" below, and 4.0 would pass the range check.
    if not is_int(bits):
        raise TypeError(f"{who}: bits must be an int (8, 4 or 2), got {type(bits).__name__} {bits!r}")
    if group_size is not None and not is_int(group_size):
        raise TypeError(f"{who}: group_size must be an int or None, got {type(group_size).__name__} {group_size!r}")
    if bits not in (8, 4, 2):
        raise ValueError(f"{who}: bits must be 8, 4 or 2, got {bits}")
    if group_size is not None and (group_size < 1 or group_size % (8 // bits)):
        raise ValueError(f"{who}: group_size must be a positive multiple of {8 // bits} at {bits} bits "
                         f"(groups start on byte boundaries), got {group_size}")


def check_scales_dtype(dtype, who: str, holds: str, none_ok: bool = False) -> None:
    """A format's float dtype, for `holds` (what it is the dtype of), naming `who`: a TypeError for
    anything but a torch.dtype (or None where `none_ok`), a ValueError for one the kernels do not
    take (torch.finfo or the kernels would otherwise fail later, unclearly)."""
    if none_ok and dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{who}: dtype must be a torch.dtype{' or None' if none_ok else ''}, "
                        f"got {type(dtype).__name__}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{who}: dtype (of {holds}) must be float32, float16 or bfloat16, got {dtype}")


def smallest_subnormal(dtype: torch.dtype) -> float:
    """The smallest positive value of a float dtype: 2^-24 in fp16, 2^-133 in bf16."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def _granularity(group_size):
    return {"axis": 0} if group_size is None else {"group_size": group_size}


# How quantize_weight chooses each row's or group's scale and zero point: "minmax" spans its range
# (absmax when symmetric); "mse" tries that range shrunk by each of MSE_RATIOS (clipping the
# outliers, as the seeds' calibration demo clips at a percentile) and keeps, per group, the one
# whose quantized values come back with the least squared error.
METHODS = ("minmax", "mse")
MSE_RATIOS = tuple(1 - i / 40 for i in range(21))  # 1, 0.975, ..., 0.5; 1 is minmax

# choose_qparams keeps zero points within +-2^23, where q - z is exact in fp32 (the kernels').
ZERO_POINT_LIMIT = 2**23


def check_method(method: str, who: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{who}: method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")


def _by_group(t: torch.Tensor, group_size: int, fill: float = 0.0) -> torch.Tensor:
    """t [N, K] as [N, G, group_size], the last group padded with `fill`."""
    n, k = t.shape
    groups = -(-k // group_size)
    return torch.nn.functional.pad(t, (0, groups * group_size - k), value=fill).reshape(n, groups, group_size)


def _group_range(w: torch.Tensor, gran: dict):
    """Each row's (per-channel) or group's minimum and maximum of w in fp32, [N] or [N, G] each;
    0 and 0 for an empty one, as choose_qparams counts it."""
    w = w.float()
    if "group_size" not in gran:
        return (w.amin(1), w.amax(1)) if w.shape[1] else (w.new_zeros(w.shape[0]), w.new_zeros(w.shape[0]))
    g = gran["group_size"]
    return _by_group(w, g, float("inf")).amin(-1), _by_group(w, g, float("-inf")).amax(-1)


def _spanning_asymmetric(w: torch.Tensor, stored: torch.Tensor, bits: int, gran: dict):
    """Asymmetric scales as stored in a dtype that cannot hold them all exactly, with zero points
    chosen for the stored scales (choose_qparams' formula, round(-min / s)): a scale rounded to
    nearest is kept where its range [-z s, (2^bits - 1 - z) s] still reaches within half a step of
    the group's max (and z is within the kernels' exact range), else rounded up, which always
    spans. So every weight comes back within half a stored step. With the fp32 scale's zero point
    (before), an 8-bit group of N(1, 0.1) weights with its scale rounded to bf16 came back up to
    2.7 steps off; rounding every scale up instead would cost SmolLM2's weights 0.5% more MSE at
    8 bits, where keeping the nearest where it spans costs 0.1%."""
    mn, mx = (t.reshape(stored.shape) for t in _group_range(w, gran))
    z = torch.round(-mn / stored.float())
    s64 = stored.double()
    spans = (s64 * ((1 << bits) - 1 - z.double()) >= mx.double() - 0.5 * s64) & (z.abs() <= ZERO_POINT_LIMIT - (1 << bits))
    up = torch.nextafter(stored, torch.full_like(stored, float("inf")))
    stored = torch.where(spans | ~torch.isfinite(up), stored, up)
    return stored, torch.round(-mn / stored.float()).to(torch.int32)


def _q_range(bits: int, symmetric: bool):
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def _codes_within(stored: torch.Tensor, zp, bits: int, top: float):
    """Per group, the least and the greatest value q whose weight s (q - z) is within +-top, and
    whether any group's grid reaches past it (else no weight can)."""
    reach = torch.floor(top / stored.double())  # steps from z
    z = 0 if zp is None else zp.double()
    qmin, qmax = _q_range(bits, zp is None)
    lo, hi = (z - reach).clamp(min=qmin), (z + reach).clamp(max=qmax)
    return lo, hi, bool(((lo > qmin) | (hi < qmax)).any())


def _end_points(mn: torch.Tensor, mx: torch.Tensor, stored: torch.Tensor, zp, bits: int) -> torch.Tensor:
    """Per group, the grid points s (q - z) that its min and its max quantize to, [2, ...] in float64
    (exact: s (q - z) fits it)."""
    s = stored.float()
    z = torch.zeros_like(s) if zp is None else zp.float()
    qmin, qmax = _q_range(bits, zp is None)
    return torch.stack([s.double() * ((torch.round(end / s) + z).clamp(qmin, qmax) - z).double() for end in (mn, mx)])


def _within_dtype_max(w: torch.Tensor, stored: torch.Tensor, zp, bits: int, gran: dict):
    """Stored scales (and zero points) with the scale one step down where the one chosen puts the
    grid point of the group's min or max beyond w's dtype's largest value, and one step down
    (its zero point chosen again, within the kernels' exact range) brings both within it and
    within half a step of them. A scale rounded up to its stored dtype does that to groups that
    reach the limit: fp16 weights at 65504 store the 8-bit symmetric scale 65504 / 127 = 515.8 as
    516, and 127 x 516 = 65532 came back inf (4-bit asymmetric: 15 x 4432); 515.5 spans. Groups
    one step down does not serve keep the scale, and _values_within_dtype keeps their values
    within the limit."""
    top = torch.finfo(w.dtype).max
    if not _codes_within(stored, zp, bits, top)[2]:
        return stored, zp
    mn, mx = (t.reshape(stored.shape) for t in _group_range(w, gran))
    over = (_end_points(mn, mx, stored, zp, bits).abs() > top).any(0)
    down = torch.nextafter(stored, torch.zeros_like(stored))
    zd = None if zp is None else torch.round(-mn / down.float()).to(torch.int32)
    points = _end_points(mn, mx, down, zd, bits)
    spans = (points - torch.stack([mn, mx]).double()).abs() <= down.double() / 2
    take = over & ((points.abs() <= top) & spans).all(0)
    if zp is not None:
        take &= zd.abs() <= ZERO_POINT_LIMIT - (1 << bits)
        zp = torch.where(take, zd, zp)
    return torch.where(take, down, stored), zp


def _stored_qparams(w: torch.Tensor, bits: int, symmetric: bool, gran: dict, dtype: torch.dtype):
    """choose_qparams' scale and zero point, the scale as stored in `dtype`. A scale that rounds to
    0 there becomes its smallest subnormal. Not its smallest normal: fp16's (6.1e-5) would give
    every group with max|w| under 127 * 6.1e-5 = 7.8e-3 a coarser scale than it needs at 8 bits,
    where the subnormals keep it. Asymmetric scales in fp16 / bf16: _spanning_asymmetric; groups
    at w's dtype's limit: _within_dtype_max. (A symmetric scale rounded down clips its largest
    weight by at most qmax * 2^-8 of a step (bf16), under half of one.)"""
    scale, zp = choose_qparams(w, bits=bits, symmetric=symmetric, **gran)
    stored = scale.to(dtype)
    if zp is not None and dtype != torch.float32:
        stored, zp = _spanning_asymmetric(w, stored, bits, gran)
    stored, zp = _within_dtype_max(w, stored, zp, bits, gran)
    return stored.clamp_min(smallest_subnormal(dtype)), zp


def _values_within_dtype(w: torch.Tensor, scale: torch.Tensor, zp, bits: int, gran: dict) -> torch.Tensor:
    """quantize(w), each group's values kept to those whose weight s (q - z) is within w's dtype's
    largest value. A scale rounded up to its stored dtype can put the grid point of a group's end
    just past it, and that weight came back inf in w's dtype: fp16 weights at 65504 store the 8-bit
    symmetric scale 65504 / 127 = 515.8 as 516, and 127 x 516 = 65532 (_within_dtype_max lowers most
    such scales). A weight whose grid point is still beyond it takes the one a step in, within a
    step of it."""
    q = quantize(w, scale, zp, bits=bits, **gran)
    lo, hi, reaches = _codes_within(scale, zp, bits, torch.finfo(w.dtype).max)
    if not reaches:
        return q
    if "group_size" in gran:
        lo, hi = (t.repeat_interleave(gran["group_size"], 1)[:, :w.shape[1]] for t in (lo, hi))
    return torch.clamp(q.to(torch.int32), lo.to(torch.int32), hi.to(torch.int32)).to(q.dtype)


def _group_errors(w: torch.Tensor, scale: torch.Tensor, zp, bits: int, gran: dict) -> torch.Tensor:
    """Each group's (or row's) sum of squared errors after quantizing w (summed in float64, so that
    near-equal candidates compare alike whatever the order of the sum), shaped like scale."""
    err = (dequantize(_values_within_dtype(w, scale, zp, bits, gran), scale, zp, **gran) - w).square()
    if "group_size" in gran:
        err = _by_group(err, gran["group_size"])
    return err.sum(-1, dtype=torch.float64).reshape(scale.shape)


def _mse_qparams(w: torch.Tensor, best_scale: torch.Tensor, best_zp, bits: int, symmetric: bool, gran: dict,
                 dtype: torch.dtype):
    """Per group, the stored scale and zero point of the MSE_RATIOS candidate (minmax's, given,
    and choose_qparams on w * ratio: the range shrunk toward 0) with the least squared error; ties
    keep the larger range, so a group that gains nothing from clipping keeps minmax's."""
    best_err = _group_errors(w, best_scale, best_zp, bits, gran)
    for ratio in MSE_RATIOS[1:]:
        scale, zp = _stored_qparams(w * ratio, bits, symmetric, gran, dtype)
        err = _group_errors(w, scale, zp, bits, gran)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zp is not None:
            best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def quantize_weight(weight: torch.Tensor, bits: int = 8, group_size: Optional[int] = None,
                    symmetric: bool = True, dtype: Optional[torch.dtype] = None,
                    method: str = "minmax") -> QuantizedWeight:
    """Quantizes a linear weight [N, K] per output channel (group_size None) or per group of
    `group_size` input features. Scales are stored in `dtype` (default: the weight's dtype) and the
    values are quantized with the stored scales, so dequantization is self-consistent. `method`
    chooses the scales and zero points (METHODS): "minmax" spans each group's range; "mse" searches
    21 clipping ratios per group for the least squared error (21 times the work; 10-40% less
    weight MSE at 4 and 2 bits on MiniLM)."""
    who = "linquant.quantize_weight"
    if weight.dim() != 2:
        raise ValueError(f"linquant: weight must be 2-D [out_features, in_features], got shape {list(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{who}: weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.device.type == "meta":  # its scales would be meta too, and checking them needs values
        raise ValueError(f"{who}: cannot quantize a weight on the meta device: it holds no values (quantize the model "
                         "built with its weights). A model built on meta is a skeleton to load into: "
                         "lq.load_quantized(path, model_or_factory) for a save_quantized directory, "
                         "lq.quantize_pretrained(path, ...) for a Hugging Face checkpoint (quantized as it is read)")
    check_format(bits, group_size, who)
    check_method(method, who)
    check_scales_dtype(dtype, who, "the scales", none_ok=True)
    dtype = dtype or weight.dtype
    w = weight.detach()
    gran = _granularity(group_size)
    scale, zp = _stored_qparams(w, bits, symmetric, gran, dtype)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{who}: the weight's range needs scales above {dtype}'s largest value "
                         f"({torch.finfo(dtype).max:g}); store the scales in "
                         f"{'float32 or bfloat16' if dtype == torch.float16 else 'float32'} (dtype=...)")
    if method == "mse":
        scale, zp = _mse_qparams(w, scale, zp, bits, symmetric, gran, dtype)
    q = _values_within_dtype(w, scale, zp, bits, gran)
    if bits < 8:
        if symmetric:  # signed values are stored offset by 2^(bits-1)
            q = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
        q = pack(q, bits)
    n, k = weight.shape
    groups = 1 if group_size is None else -(-k // group_size)  # explicit: N = 0 leaves -1 ambiguous
    return QuantizedWeight(q, scale.reshape(n, groups), None if zp is None else zp.reshape(n, groups), bits,
                           group_size, k)


def dequantize_weight(qw: QuantizedWeight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The float weight [N, K] that a QuantizedWeight stands for."""
    q = qw.qweight
    if qw.bits < 8:
        q = unpack(q, qw.bits, qw.in_features)
        if qw.zeros is None:
            q = (q.to(torch.int16) - (1 << (qw.bits - 1))).to(torch.int8)
    gran = _granularity(qw.group_size)
    scales = qw.scales if qw.group_size is not None else qw.scales.reshape(-1, 1)
    return dequantize(q, scales, qw.zeros, dtype=dtype or qw.scales.dtype, **gran)
