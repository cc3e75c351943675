#include "quant_layout.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <sstream>

namespace linquant {
namespace {

std::string shape_str(at::IntArrayRef shape) {
  std::ostringstream os;
  os << shape;
  return os.str();
}

}  // namespace

void check_bits(int64_t bits) {
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 8, "linquant: bits must be between 2 and 8, got ", bits);
}

// A TypeError, as Python raises for a None where a tensor belongs (linquant's Python wrappers too).
void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), "linquant: ", name, " must be a tensor, got None (an undefined tensor)");
}

void check_float_dtype(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  const auto dt = t.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "linquant: ", name,
                    " must be float32, float16 or bfloat16, got ", dt);
}

QuantLayout make_layout(const at::Tensor& x, std::optional<int64_t> axis,
                        std::optional<int64_t> group_size) {
  TORCH_CHECK_VALUE(!(axis.has_value() && group_size.has_value()),
                    "linquant: axis and group_size are exclusive (groups run along the last dim); "
                    "got axis=",
                    *axis, " and group_size=", *group_size);
  QuantLayout l;
  const int64_t dim = x.dim();
  if (axis.has_value()) {
    int64_t a = *axis;
    TORCH_CHECK_VALUE(a >= -dim && a < dim, "linquant: axis ", a, " is out of range for x of shape ",
                      shape_str(x.sizes()), " (", dim, " dims)");
    a = a < 0 ? a + dim : a;
    l.granularity = Granularity::per_channel;
    l.axis = a;
    l.rows = x.size(a);
    l.cols = 1;
    for (int64_t d = 0; d < dim; ++d) l.cols *= d == a ? 1 : x.size(d);
    l.group = l.cols;
    l.groups = 1;
  } else if (group_size.has_value()) {
    const int64_t g = *group_size;
    TORCH_CHECK_VALUE(g >= 1, "linquant: group_size must be >= 1, got ", g);
    TORCH_CHECK_VALUE(dim >= 1, "linquant: group_size needs x with at least one dim, got a 0-dim tensor");
    l.granularity = Granularity::per_group;
    l.rows = 1;
    for (int64_t d = 0; d + 1 < dim; ++d) l.rows *= x.size(d);
    l.cols = x.size(-1);
    // A group as long as the row or longer is the row: stored as the row's length, so that no count
    // overflows (ceil(cols / g) as (cols + g - 1) / g would near INT64_MAX) and no kernel sizes
    // buffers by a group far longer than the data.
    l.group = std::min(g, std::max<int64_t>(l.cols, 1));
    l.groups = l.cols == 0 ? 0 : (l.cols - 1) / l.group + 1;
  } else {
    l.granularity = Granularity::per_tensor;
    l.rows = 1;
    l.cols = x.numel();
    l.group = l.cols;
    l.groups = 1;
  }
  return l;
}

std::vector<int64_t> param_shape(const at::Tensor& x, const QuantLayout& l) {
  switch (l.granularity) {
    case Granularity::per_channel: {
      std::vector<int64_t> shape(x.dim(), 1);
      shape[*l.axis] = l.rows;
      return shape;
    }
    case Granularity::per_group: {
      std::vector<int64_t> shape = x.sizes().vec();
      shape.back() = l.groups;
      return shape;
    }
    default:
      return {};
  }
}

at::Tensor to_rows(const at::Tensor& x, const QuantLayout& l) {
  at::Tensor t = l.axis.has_value() ? x.movedim(*l.axis, 0) : x;
  return t.contiguous().view({l.rows, l.cols});
}

at::Tensor from_rows(const at::Tensor& rows, const at::Tensor& like, const QuantLayout& l) {
  if (!l.axis.has_value()) return rows.view(like.sizes());
  auto moved = like.sizes().vec();
  moved.erase(moved.begin() + *l.axis);
  moved.insert(moved.begin(), l.rows);
  return rows.view(moved).movedim(0, *l.axis).contiguous();
}

namespace {

// The shapes a scale or zero point may have: param_shape, or that shape without its size-1 dims
// (a per-channel [N] for x [N, K] and axis 0), or per-tensor any one-element tensor. The element
// count alone would also take a transposed [G, N] for [N, G], or a column for a row, and quantize
// with the wrong parameters without a word.
void check_param_shape(const at::Tensor& t, const char* name, const at::Tensor& x, const QuantLayout& l) {
  const std::vector<int64_t> want = param_shape(x, l);
  std::vector<int64_t> squeezed;
  for (const int64_t d : want) {
    if (d != 1) squeezed.push_back(d);
  }
  const bool ok = l.granularity == Granularity::per_tensor ? t.numel() == 1
                                                             : t.sizes() == at::IntArrayRef(want) ||
                                                                   t.sizes() == at::IntArrayRef(squeezed);
  TORCH_CHECK_VALUE(ok, "linquant: ", name, " must have shape ", shape_str(want),
                    l.granularity == Granularity::per_tensor ? " (one element)" : "",
                    squeezed.size() != want.size() ? " or " + shape_str(squeezed) : std::string(),
                    " for this granularity, got shape ", shape_str(t.sizes()));
}

}  // namespace

at::Tensor prepare_scale(const at::Tensor& scale, const at::Tensor& x, const QuantLayout& l, bool check_values) {
  check_defined(scale, "scale");
  TORCH_CHECK_VALUE(scale.device() == x.device(), "linquant: scale is on ", scale.device(),
                    " but the input is on ", x.device());
  check_float_dtype(scale, "scale");
  check_param_shape(scale, "scale", x, l);
  at::Tensor s = scale.to(at::kFloat).contiguous().view({-1});
  if (check_values && s.numel() > 0) {
    TORCH_CHECK_VALUE(!(s <= 0).logical_or_(s.isinf()).logical_or_(s.isnan()).any().item<bool>(), kBadScaleValues);
  }
  return s;
}

void check_zero_point_dtype(const at::Tensor& z, const char* name) {
  switch (z.scalar_type()) {
    case at::kByte:
    case at::kChar:
    case at::kShort:
    case at::kInt:
    case at::kUInt16:
    case at::kLong:
      return;
    default:
      TORCH_CHECK_VALUE(false, "linquant: ", name, " must be an integer tensor (int32, or int8/uint8/int16/uint16/",
                        "int64 with values that fit in int32), got ", z.scalar_type());
  }
}

at::Tensor zero_points_as_int32(const at::Tensor& z, const char* name) {
  check_zero_point_dtype(z, name);
  // int64: a plain cast wraps (2^40 becomes 0) and would quietly give another result: check the
  // range first. The zero points are few (one per group); on a GPU this synchronizes, so the
  // format's int32 never takes this path. Every other accepted dtype's values fit.
  if (z.scalar_type() == at::kLong && z.numel() > 0) {
    const auto [lo, hi] = at::aminmax(z);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK_VALUE(lo_v >= std::numeric_limits<int32_t>::min() && hi_v <= std::numeric_limits<int32_t>::max(),
                      "linquant: ", name, " must fit in int32, but its values span [", lo_v, ", ", hi_v, "]");
  }
  return z.to(at::kInt);
}

at::Tensor prepare_zero_point(const at::Tensor& zero_point, const at::Tensor& x, const QuantLayout& l) {
  check_defined(zero_point, "zero_point");
  TORCH_CHECK_VALUE(zero_point.device() == x.device(), "linquant: zero_point is on ",
                    zero_point.device(), " but the input is on ", x.device());
  check_param_shape(zero_point, "zero_point", x, l);
  return zero_points_as_int32(zero_point, "zero_point").contiguous().view({-1});
}

namespace {

QuantJob make_job(const at::Tensor& in, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                  std::optional<int64_t> axis, std::optional<int64_t> group_size, at::ScalarType out_dtype,
                  bool check_scale_values) {
  QuantJob job;
  job.layout = make_layout(in, axis, group_size);
  const QuantLayout& l = job.layout;
  job.scale = prepare_scale(scale, in, l, check_scale_values);
  if (zero_point.has_value()) job.zero_point = prepare_zero_point(*zero_point, in, l);
  job.rows = to_rows(in, l);
  job.out = at::empty({l.rows, l.cols}, in.options().dtype(out_dtype));
  return job;
}

}  // namespace

QuantJob prepare_quantize(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                          int64_t bits, std::optional<int64_t> axis, std::optional<int64_t> group_size,
                          bool check_scale_values) {
  check_bits(bits);
  check_float_dtype(x, "x");
  return make_job(x, scale, zero_point, axis, group_size, zero_point.has_value() ? at::kByte : at::kChar,
                  check_scale_values);
}

QuantJob prepare_dequantize(const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                            std::optional<int64_t> axis, std::optional<int64_t> group_size,
                            std::optional<at::ScalarType> dtype, bool check_scale_values) {
  check_defined(q, "q");
  TORCH_CHECK_VALUE(q.scalar_type() == at::kChar || q.scalar_type() == at::kByte,
                    "linquant: q must be int8 (symmetric) or uint8 (asymmetric), got ", q.scalar_type());
  const at::ScalarType out_dtype = dtype.value_or(at::kFloat);
  TORCH_CHECK_VALUE(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
                    "linquant: dtype must be float32, float16 or bfloat16, got ", out_dtype);
  return make_job(q, scale, zero_point, axis, group_size, out_dtype, check_scale_values);
}

}  // namespace linquant
