// Argument checks and the granularity layout shared by every backend of the quantize family.
//
// Every granularity is reduced to one picture: the input seen as a contiguous [rows, cols] matrix
// whose rows are split into groups of `group` consecutive elements (the last one may be shorter),
// each group owning one scale / zero point, stored row-major as [rows, groups]:
//   per-tensor        rows = 1,         cols = numel,       group = cols
//   per-channel (a)   rows = size(a),   cols = numel/rows,  group = cols   (axis a moved to front)
//   per-group (g)     rows = numel/K,   cols = K (last dim), group = g
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <optional>
#include <vector>

namespace linquant {

enum class Granularity { per_tensor, per_channel, per_group };

struct QuantLayout {
  Granularity granularity = Granularity::per_tensor;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t group = 0;
  int64_t groups = 0;           // groups per row: ceil(cols / group)
  std::optional<int64_t> axis;  // per-channel only: the axis, normalized to >= 0

  int64_t num_params() const { return rows * groups; }
};

void check_bits(int64_t bits);
void check_defined(const at::Tensor& t, const char* name);  // a None / undefined tensor is named
void check_float_dtype(const at::Tensor& t, const char* name);

// Validates axis / group_size against the input's shape and returns the layout.
QuantLayout make_layout(const at::Tensor& x, std::optional<int64_t> axis,
                        std::optional<int64_t> group_size);

// Shape of the scale / zero-point tensors: [] per-tensor, x's shape with every dim but `axis` set
// to 1 per-channel, x.shape[:-1] + [groups] per-group.
std::vector<int64_t> param_shape(const at::Tensor& x, const QuantLayout& layout);

// x as the contiguous [rows, cols] matrix of the layout, and back.
at::Tensor to_rows(const at::Tensor& x, const QuantLayout& layout);
at::Tensor from_rows(const at::Tensor& rows, const at::Tensor& like, const QuantLayout& layout);

// Checks scale / zero_point against x and the layout (device, dtype, shape, values) and
// returns them as contiguous fp32 / int32 vectors of layout.num_params() elements. The scale's
// values (finite, positive) are checked unless check_values is false: on a GPU that check reads its
// verdict back to the host, which a CUDA-graph capture forbids.
at::Tensor prepare_scale(const at::Tensor& scale, const at::Tensor& x, const QuantLayout& layout,
                         bool check_values = true);
// The error prepare_scale raises for scales that are not all finite and positive (CUDA's quantize
// raises it too, from its kernel's flag).
inline constexpr const char* kBadScaleValues = "linquant: scale must hold finite positive values";
at::Tensor prepare_zero_point(const at::Tensor& zero_point, const at::Tensor& x,
                              const QuantLayout& layout);

// Zero points as the kernels' int32, from int32, int8 / uint8 / int16 / uint16 (every value fits)
// or int64 (values that do not fit are an error); other dtypes are an error naming `name`.
at::Tensor zero_points_as_int32(const at::Tensor& z, const char* name);
// The dtype check alone, for checks that run before the kernels convert (linear's, also when x is
// empty and nothing is converted).
void check_zero_point_dtype(const at::Tensor& z, const char* name);

// The validated arguments of quantize / dequantize as every backend's kernel sees them: the layout,
// the input as its [rows, cols] matrix, fp32 scales, int32 zero points (undefined when symmetric)
// and the [rows, cols] output, allocated on the input's device. Callers check the device first.
struct QuantJob {
  QuantLayout layout;
  at::Tensor rows, scale, zero_point, out;
  bool symmetric() const { return !zero_point.defined(); }
};

// quantize: x float32/float16/bfloat16; out int8 when symmetric (no zero point), else uint8.
// check_scale_values: see prepare_scale (CUDA's quantize kernel checks them itself).
QuantJob prepare_quantize(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                          int64_t bits, std::optional<int64_t> axis, std::optional<int64_t> group_size,
                          bool check_scale_values = true);

// dequantize: q int8/uint8; out in dtype (float32 when None). check_scale_values: see prepare_scale.
QuantJob prepare_dequantize(const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                            std::optional<int64_t> axis, std::optional<int64_t> group_size,
                            std::optional<at::ScalarType> dtype, bool check_scale_values = true);

}  // namespace linquant
