"""Bad input raises a clear ValueError naming the argument; never a crash, garbage or NaN."""

import re

import pytest
import torch

import linquant as lq
from linquant._ops import built_with_cuda


def raises(match):
    return pytest.raises(ValueError, match=match)


X = torch.randn(4, 8)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -3])
def test_bits_out_of_range(bits):
    # The number in the message too: a library linked to its own static C++ runtime (CMakeLists.txt)
    # lost it, or crashed formatting it.
    with raises(f"bits must be between 2 and 8, got {bits}$"):
        lq.choose_qparams(X, bits=bits)
    with raises(f"bits must be between 2 and 8, got {bits}$"):
        lq.quantize(X, torch.tensor(1.0), bits=bits)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8, torch.bool])
def test_wrong_input_dtype(dtype):
    with raises(re.escape("x must be float32, float16 or bfloat16")):
        lq.choose_qparams(X.to(dtype))
    with raises(re.escape("x must be float32, float16 or bfloat16")):
        lq.quantize(X.to(dtype), torch.tensor(1.0))


def test_dequantize_wrong_q_dtype_and_output_dtype():
    with raises("q must be int8"):
        lq.dequantize(X, torch.tensor(1.0))
    with raises("dtype must be float32, float16 or bfloat16"):
        lq.dequantize(X.to(torch.int8), torch.tensor(1.0), dtype=torch.float64)


@pytest.mark.parametrize("axis", [2, -3, 100])
def test_axis_out_of_range(axis):
    with raises(f"axis {axis} is out of range"):
        lq.choose_qparams(X, axis=axis)
    with raises(f"axis {axis} is out of range"):
        lq.quantize(X, torch.ones(4, 1), axis=axis)


def test_axis_and_group_size_are_exclusive():
    with raises("axis and group_size are exclusive"):
        lq.choose_qparams(X, axis=0, group_size=4)


@pytest.mark.parametrize("g", [0, -4])
def test_bad_group_size(g):
    with raises("group_size must be >= 1"):
        lq.choose_qparams(X, group_size=g)
    with raises("at least one dim"):
        lq.choose_qparams(torch.tensor(1.0), group_size=4)


def test_scale_shape_mismatch():
    with raises(re.escape("scale must have shape [4, 1] or [4] for this granularity, got shape [8]")):
        lq.quantize(X, torch.ones(8), axis=0)
    with raises(re.escape("scale must have shape [4, 3] for this granularity, got shape [4, 2]")):
        lq.quantize(X, torch.ones(4, 2), group_size=3)
    with raises(re.escape("scale must have shape [] (one element) for this granularity, got shape [2]")):
        lq.dequantize(X.to(torch.int8), torch.ones(2))


def test_scale_shape_is_checked_not_only_its_element_count():
    # A column of scales for axis=1 of a square matrix, or scales [G, N] for [N, G] (as other
    # formats store them), has the right count and would quantize with every scale misplaced.
    sq = torch.randn(3, 3)
    with raises(re.escape("scale must have shape [1, 3] or [3] for this granularity, got shape [3, 1]")):
        lq.quantize(sq, torch.tensor([[1.0], [2.0], [4.0]]), None, 8, axis=1)
    with raises(re.escape("zero_point must have shape [4, 2] for this granularity, got shape [2, 4]")):
        lq.quantize(X, torch.ones(4, 2), torch.zeros(2, 4, dtype=torch.int32), 8, group_size=4)
    # The shape without its size-1 dims is the same layout, and gives the same bits.
    s = torch.rand(4, 1) + 0.1
    assert torch.equal(lq.quantize(X, s.view(4), None, 8, axis=0), lq.quantize(X, s, None, 8, axis=0))
    assert torch.equal(lq.quantize(X, torch.tensor([0.1]), None, 8), lq.quantize(X, torch.tensor(0.1), None, 8))

    qw = lq.quantize_weight(torch.randn(6, 16), 4, 8, symmetric=False)
    x = torch.randn(3, 16)
    with raises(re.escape("scales must be [6, 2] (out_features x ceil(K / group_size)), got shape [2, 6]")):
        lq.linear(x, qw.qweight, qw.scales.t().contiguous(), qw.zeros, None, 4, 8)
    with raises(re.escape("zeros must be [6, 2] like scales, got shape [2, 6]")):
        lq.linear(x, qw.qweight, qw.scales, qw.zeros.t().contiguous(), None, 4, 8)
    with raises(re.escape("bias must be [out_features] = [6], got shape [6, 1]")):
        lq.linear(x, qw.qweight, qw.scales, qw.zeros, torch.zeros(6, 1), 4, 8)
    pc = lq.quantize_weight(torch.randn(6, 16), 4, None, symmetric=False)  # per-channel: [6] is [6, 1]
    assert torch.equal(lq.linear(x, pc.qweight, pc.scales.view(6), pc.zeros.view(6), None, 4),
                       lq.linear(x, pc.qweight, pc.scales, pc.zeros, None, 4))


@pytest.mark.parametrize("g", [16, 1000, 2**62, 2**63 - 1])
def test_group_as_long_as_the_row_or_longer_is_per_channel(g):
    # One group per row, however long; (K + g - 1) // g in int64 used to overflow to no groups at
    # all near 2^63, and the ops then ran on empty scales (uninitialized or zero outputs).
    s, z = lq.choose_qparams(X, 4, False, group_size=g)
    rs, rz = lq.choose_qparams(X, 4, False, axis=0)
    assert torch.equal(s, rs) and torch.equal(z, rz)
    q = lq.quantize(X, s, z, 4, group_size=g)
    assert torch.equal(q, lq.quantize(X, rs, rz, 4, axis=0))
    assert torch.equal(lq.dequantize(q, s, z, group_size=g), lq.dequantize(q, rs, rz, axis=0))
    pc = lq.quantize_weight(torch.randn(6, 16), 4, None, symmetric=False)
    x = torch.randn(3, 16)
    assert torch.equal(lq.linear(x, pc.qweight, pc.scales, pc.zeros, None, 4, g - g % 2),  # whole bytes
                       lq.linear(x, pc.qweight, pc.scales, pc.zeros, None, 4))


def test_zero_point_mismatch():
    s = torch.ones(4, 1)
    with raises(re.escape("zero_point must have shape [4, 1] or [4] for this granularity, got shape [3]")):
        lq.quantize(X, s, torch.zeros(3, dtype=torch.int32), axis=0)
    with raises("zero_point must be an integer tensor"):
        lq.quantize(X, s, torch.zeros(4, 1), axis=0)


def test_wide_zero_points_are_range_checked_not_wrapped():
    # int64 zero points are accepted when they fit the kernels' int32; a plain cast would turn
    # 2^40 into 0 and quietly give another result.
    s = torch.full((4, 1), 0.1)
    big = torch.full((4, 1), 1 << 40, dtype=torch.int64)
    with raises(re.escape("zero_point must fit in int32, but its values span [1099511627776, 1099511627776]")):
        lq.quantize(X, s, big, axis=0)
    with raises(re.escape("zero_point must fit in int32, but its values span [-1099511627776, -1099511627776]")):
        lq.dequantize(torch.zeros(4, 8, dtype=torch.uint8), s, -big, axis=0)
    with raises("zero_point must be an integer tensor"):
        lq.quantize(X, s, torch.zeros(4, 1, dtype=torch.uint32), axis=0)
    fits = torch.tensor([[3], [-7], [2**31 - 1], [-(2**31)]])
    assert torch.equal(lq.quantize(X, s, fits, axis=0), lq.quantize(X, s, fits.int(), axis=0))

    qw = lq.quantize_weight(torch.randn(6, 16), 4, 8, symmetric=False)
    x = torch.randn(2, 16)
    with raises("zeros must fit in int32"):
        lq.linear(x, qw.qweight, qw.scales, qw.zeros.long() + (1 << 40), None, 4, 8)
    assert torch.equal(lq.linear(x, qw.qweight, qw.scales, qw.zeros.long(), None, 4, 8),
                       lq.linear(x, qw.qweight, qw.scales, qw.zeros, None, 4, 8))


_QW = lq.quantize_weight(torch.randn(6, 16), 4, 8, symmetric=False)
_NONE_ARGUMENT = {  # the call with one tensor argument None, and that argument's name
    "choose_qparams": ("x", lambda: lq.choose_qparams(None)),
    "quantize x": ("x", lambda: lq.quantize(None, torch.tensor(1.0))),
    "quantize scale": ("scale", lambda: lq.quantize(X, None)),
    "dequantize": ("q", lambda: lq.dequantize(None, torch.tensor(1.0))),
    "dequantize scale": ("scale", lambda: lq.dequantize(X.to(torch.int8), None)),
    "pack": ("q", lambda: lq.pack(None, 4)),
    "unpack": ("packed", lambda: lq.unpack(None, 4, 3)),
    "linear x": ("x", lambda: lq.linear(None, _QW.qweight, _QW.scales, _QW.zeros, None, 4, 8)),
    "linear qweight": ("qweight", lambda: lq.linear(torch.randn(2, 16), None, _QW.scales, _QW.zeros, None, 4, 8)),
    "linear scales": ("scales", lambda: lq.linear(torch.randn(2, 16), _QW.qweight, None, _QW.zeros, None, 4, 8)),
    "metrics": ("x_hat", lambda: lq.metrics(X, None)),
}


@pytest.mark.parametrize("case", sorted(_NONE_ARGUMENT))
def test_none_for_a_tensor_names_the_argument(case):
    name, call = _NONE_ARGUMENT[case]
    with pytest.raises(TypeError, match=f"linquant: {name} must be a tensor, got None"):
        call()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale_values(bad):
    s = torch.ones(4, 1)
    s[2] = bad
    with raises("scale must hold finite positive values"):
        lq.quantize(X, s, axis=0)
    with raises("scale must hold finite positive values"):
        lq.dequantize(X.to(torch.int8), s, axis=0)


def test_scale_dtype():
    with raises("scale must be float32, float16 or bfloat16"):
        lq.quantize(X, torch.ones((), dtype=torch.int32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_or_inf_input(bad, dtype):
    x = torch.randn(3, 300).to(dtype)
    x[1, 257] = bad
    for kw in ({}, {"axis": 0}, {"group_size": 32}):
        with raises("x contains NaN or Inf"):
            lq.choose_qparams(x, **kw)
    with raises("x contains NaN or Inf"):
        lq.quantize(x, torch.tensor(0.1))


def test_range_overflowing_a_float32_scale():
    x = torch.tensor([-3e38, 3e38])
    with raises("overflows a float32 scale"):
        lq.choose_qparams(x, symmetric=False)


def test_mismatched_devices():
    # Without a GPU the meta device stands in for "another device": the dispatcher then routes to
    # the fake kernel, which checks devices as the real kernels do (test_cuda.py covers CUDA).
    with raises("scale is on meta but the input is on cpu"):
        lq.quantize(X, torch.ones((), device="meta"))
    with raises("zero_point is on meta but the input is on cpu"):
        lq.dequantize(X.to(torch.uint8), torch.ones(()), torch.zeros((), dtype=torch.int32, device="meta"))


def test_metrics_shape_mismatch():
    with raises("x has shape"):
        lq.metrics(X, X[:2])


@pytest.mark.skipif(built_with_cuda(), reason="built with the CUDA kernels")
def test_cuda_linear_dispatch_without_the_cuda_kernels_says_so():
    with pytest.raises(RuntimeError, match="this build has no CUDA kernels"), lq.cuda_linear_dispatch(gemv_max_m=2):
        pass


@pytest.mark.skipif(not built_with_cuda(), reason="built without the CUDA kernels")
def test_cuda_linear_dispatch_checks_and_restores():
    # Needs no GPU: the thresholds are host state of a CUDA build.
    op = torch.ops.linquant._cuda_linear_dispatch
    before = op()
    assert before == [1, 8, 64, 0]  # the defaults (cuda/linear.cu): the Hopper GEMM off until measured
    with lq.cuda_linear_dispatch(gemv_max_m=2):
        assert op() == [2, 8, 64, 0]
        with lq.cuda_linear_dispatch(tc_max_m=16, mma_max_m=0, hopper_max_m=512):
            assert op() == [2, 16, 0, 512]
        assert op() == [2, 8, 64, 0]
    assert op() == before
    with raises(re.escape("gemv_max_m must be at most 8")), lq.cuda_linear_dispatch(gemv_max_m=9):
        pass
    with raises(re.escape("tc_max_m must be at most 64")), lq.cuda_linear_dispatch(tc_max_m=65):
        pass
    with pytest.raises(KeyError), lq.cuda_linear_dispatch(0, 0, 0):  # restored when the block raises too
        raise KeyError("inside")
    assert op() == before


@pytest.mark.skipif(not built_with_cuda(), reason="built without the CUDA kernels")
def test_cuda_has_hopper_gemm_checks_the_device_index():
    op = torch.ops.linquant._cuda_has_hopper_gemm
    count = torch.cuda.device_count()
    for bad in (-1, count):
        with raises(re.escape(f"device must be a CUDA device index in [0, {count}); got {bad}")):
            op(bad)
    for device in range(count):  # where the GPU is not compute capability 9.0, never
        major_minor = torch.cuda.get_device_capability(device)
        assert not op(device) or major_minor == (9, 0)


@pytest.mark.parametrize("size,bits,take", [(2**61, 8, 2**61), (2**63 - 1, 1, 2**60), (2**63 - 1, 8, 2**63 - 1)])
def test_unpack_size_past_int64_is_a_clear_error(size, bits, take):
    # size * bits would overflow int64: the byte count is computed per 8-value unit instead.
    with raises(re.escape(f"packed has 0 bytes in its last dim, but {size} values of {bits} bits take {take}")):
        lq.unpack(torch.empty(1, 0, dtype=torch.uint8), bits, size)


@pytest.mark.parametrize("name,x,x_hat", [
    ("x", torch.tensor([1 + 1j]), torch.tensor([1.0])),  # the float64 cast would drop 1j: an MSE of 0
    ("x_hat", torch.tensor([1.0]), torch.tensor([1 + 0j])),
    ("x_hat", torch.tensor([1.0, 2.0]), torch.tensor([1, 2], dtype=torch.uint8)),  # codes, not a reconstruction
])
def test_metrics_take_real_floating_point_tensors(name, x, x_hat):
    with raises(f"linquant.metrics: {name} must be a real floating-point tensor"):
        lq.metrics(x, x_hat)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without a GPU")
def test_loading_onto_cuda_without_a_gpu_says_so(tmp_path):
    lq.save_quantized(lq.quantize_model(torch.nn.Sequential(torch.nn.Linear(8, 4)), bits=8, exclude=[]), str(tmp_path))
    with raises(re.escape("device 'cuda' needs a CUDA GPU, and torch sees none here")):
        lq.load_quantized(str(tmp_path), lambda: torch.nn.Sequential(torch.nn.Linear(8, 4)), device="cuda")


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": "4"}, "bits must be an int (8, 4 or 2), got str '4'"),
    ({"bits": 4.0}, "bits must be an int (8, 4 or 2), got float 4.0"),
    ({"bits": 4, "group_size": 32.0}, "group_size must be an int or None, got float 32.0"),
])
def test_format_arguments_of_the_wrong_type_are_named(kwargs, match):
    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    with pytest.raises(TypeError, match=re.escape(f"linquant.quantize_model: {match}")):
        lq.quantize_model(model, exclude=[], **kwargs)


@pytest.mark.parametrize("exclude,shown", [(5, "int 5"), (["lm_head", 5], "list ['lm_head', 5]"), (b"0", "bytes b'0'")])
def test_exclude_of_the_wrong_type_is_named(exclude, shown):
    # Used to fail deep inside: "'int' object is not iterable", or fnmatch's "expected str".
    model = torch.nn.Sequential(torch.nn.Linear(16, 4))
    with pytest.raises(TypeError, match=re.escape(f"linquant.quantize_model: exclude must be a name or glob pattern "
                                                  f"(str), an iterable of them, a predicate (name, module) -> bool, "
                                                  f"or None; got {shown}")):
        lq.quantize_model(model, bits=4, exclude=exclude)
    assert isinstance(model[0], torch.nn.Linear)


def test_an_exclude_generator_is_read_once_for_all_layers():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4), torch.nn.Linear(4, 4))
    lq.quantize_model(model, bits=8, exclude=(name for name in ["0", "2"]))
    assert [type(m).__name__ for m in model] == ["Linear", "QLinear", "Linear"]


@pytest.mark.parametrize("transposed,layout", [(False, "out_features, in_features"),
                                               (True, "in_features, out_features")])
def test_experts_weight_must_be_3d(transposed, layout):
    with raises(re.escape(f"linquant.QExpertsWeight.from_weight: weight must be 3-D, [num_experts, {layout}], got "
                          "shape [5, 16]")):
        lq.QExpertsWeight.from_weight(torch.randn(5, 16), transposed, 4, 8, False)


def test_quantize_weight_dtype_is_checked():
    # Used to be torch.finfo's "requires a floating point input type".
    for dtype in (torch.int32, torch.float64, torch.bool):
        with raises(re.escape(f"linquant.quantize_weight: dtype (of the scales) must be float32, float16 or bfloat16, "
                              f"got {dtype}")):
            lq.quantize_weight(torch.randn(4, 16), 4, 8, dtype=dtype)
    with pytest.raises(TypeError, match="linquant.quantize_weight: dtype must be a torch.dtype or None, got str"):
        lq.quantize_weight(torch.randn(4, 16), 4, 8, dtype="float16")
    # The weight's own dtype, named as such (choose_qparams' message named its argument x).
    for dtype in (torch.float64, torch.int64):
        with raises(re.escape(f"linquant.quantize_weight: weight must be float32, float16 or bfloat16, got {dtype}")):
            lq.quantize_weight(torch.ones(4, 16, dtype=dtype), 4, 8)


def test_scales_beyond_their_dtype_are_refused():
    # fp32 weights whose scales overflow the dtype asked for: the advice names a dtype that holds
    # them (it named bfloat16 to a caller already storing bf16 scales).
    for w, bits, dtype, advice in ((torch.tensor([[1e7, -1.0]]), 8, torch.float16, "float32 or bfloat16"),
                                   (torch.tensor([[torch.finfo(torch.float32).max, 1.0]]), 2, torch.bfloat16,
                                    "float32")):
        with raises(re.escape(f"linquant.quantize_weight: the weight's range needs scales above {dtype}'s largest "
                              f"value ({torch.finfo(dtype).max:g}); store the scales in {advice} (dtype=...)")):
            lq.quantize_weight(w, bits, None, symmetric=True, dtype=dtype)


def test_expert_indices_are_checked():
    qx = lq.QExpertsWeight.from_weight(torch.randn(3, 4, 16), False, 4, 8, False)
    before = [t.clone() for t in (qx.qweight, qx.scales, qx.zeros)]
    x = torch.randn(2, 16)
    for expert in (3, -1):  # -1 used to run the last expert, silently
        with pytest.raises(IndexError, match=re.escape(f"QExpertsWeight.linear: expert must be in [0, 3), "
                                                       f"got {expert}")):
            qx.linear(x, expert)
        with pytest.raises(IndexError, match=re.escape(f"QExpertsWeight.set_rows: expert must be in [0, 3), "
                                                       f"got {expert}")):
            qx.set_rows(expert, 0, torch.randn(2, 16))
        with pytest.raises(IndexError, match=re.escape("QExpertsWeight.quantized_weight: expert must be in [0, 3)")):
            qx.quantized_weight(expert)
    with pytest.raises(TypeError, match="QExpertsWeight.linear: expert must be an int, got float"):
        qx.linear(x, 1.0)
    with raises(re.escape("QExpertsWeight.set_rows: start must be >= 0, got -2")):  # the slice used to wrap around
        qx.set_rows(0, -2, torch.randn(2, 16))
    with raises(re.escape("weight must be [rows, in_features = 16] with rows within the 4 output rows from 3")):
        qx.set_rows(0, 3, torch.randn(2, 16))
    assert all(torch.equal(a, b) for a, b in zip(before, (qx.qweight, qx.scales, qx.zeros)))
    assert torch.equal(qx.linear(x, 2), lq.linear(x, qx.qweight[2], qx.scales[2], qx.zeros[2], None, 4, 8))


def test_quantizing_a_meta_model_says_how_meta_skeletons_are_used():
    # Used to be "Tensor.item() cannot be called on meta tensors" from inside quantize_weight.
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(16, 4))
    message = ("cannot quantize a weight on the meta device: it holds no values (quantize the model built with its "
               "weights). A model built on meta is a skeleton to load into: lq.load_quantized")
    with raises("linquant.quantize_model: layer '0': linquant.quantize_weight: " + re.escape(message)):
        lq.quantize_model(model, bits=4)
    with raises(re.escape(message)):
        lq.QLinear.from_linear(model[0], 4)
    with raises(re.escape(message)):
        lq.QExpertsWeight.from_weight(torch.empty(2, 4, 16, device="meta"), False, 4, None, True)
    assert isinstance(model[0], torch.nn.Linear)
