// The format's float weight from its formulas, shared by the C++ API's tests (QLinear, QEmbedding,
// QExpertsWeight).
#pragma once

#include <ATen/ATen.h>

#include <limits>

// The format's float weight from its formulas (docs/architecture.md), in plain ATen fp32 steps over
// [N, K / group, group] (K a multiple of the group), for the qparams of w * ratio (1: the format's
// own; less: a clipping candidate of ScaleMethod::kMse, the range shrunk toward 0): scales rounded
// to the weight's dtype (asymmetric ones in fp16 / bf16 with the zero point chosen again for the
// rounded scale, and rounded up to the next finite value of the dtype where the range of the scale
// rounded to nearest falls more than half a step short of the group's max, or its zero point is
// past 2^23 - 2^bits), w quantized with those rounded scales, then s * (q - z) in fp32. Independent
// of the library's code. It leaves out the formulas' limits (constant groups, the scale floors,
// zero points far from 0, groups at the dtype's largest value): the tests that use it give it
// randn weights (the limits have tests of their own, here and in tests/python).
inline at::Tensor reference_candidate(const at::Tensor& w, double ratio, int64_t bits, int64_t group, bool symmetric) {
  const int64_t n = w.size(0), k = w.size(1);
  const at::Tensor shrunk = (w * ratio).to(at::kFloat).view({n, k / group, group});
  const at::Tensor mn = shrunk.amin(-1, true), mx = shrunk.amax(-1, true);
  const double qmin = symmetric ? -(1 << (bits - 1)) : 0;
  const double qmax = symmetric ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
  const at::Tensor s32 = symmetric ? at::maximum(mn.abs(), mx.abs()) / qmax : (mx - mn) / (qmax - qmin);
  at::Tensor s = s32.to(w.scalar_type());
  if (!symmetric && w.scalar_type() != at::kFloat) {
    const at::Tensor near = s.to(at::kFloat), zn = at::round(qmin - mn / near);
    const at::Tensor spans = (near.to(at::kDouble) * (qmax - zn.to(at::kDouble)) >= mx.to(at::kDouble) - near.to(at::kDouble) / 2)
                                 .logical_and(zn.abs() <= 8388608.0 - (qmax + 1));
    const at::Tensor up = at::nextafter(s, at::full_like(s, std::numeric_limits<double>::infinity()));
    s = at::where(spans.logical_or(up.isfinite().logical_not()), s, up);
  }
  s = s.to(at::kFloat);
  const at::Tensor z = symmetric ? at::zeros_like(s32) : at::round(qmin - mn / s);
  const at::Tensor q = at::clamp(at::round(w.to(at::kFloat).view({n, k / group, group}) / s) + z, qmin, qmax);
  return (s * (q - z)).view({n, k});
}

// The format's float weight, rounded to the weight's dtype.
inline at::Tensor reference_weight(const at::Tensor& w, int64_t bits, int64_t group, bool symmetric) {
  return reference_candidate(w, 1.0, bits, group, symmetric).to(w.scalar_type());
}
