// The ops as a C++ program reaches them: through the dispatcher, with no Python.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

namespace {

TEST(Dispatcher, QuantizeRoundTripThroughRegisteredOps) {
  auto choose = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("linquant::choose_qparams", "")
                    .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, bool,
                                                              std::optional<int64_t>, std::optional<int64_t>)>();
  auto quantize = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("linquant::quantize", "")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                        int64_t, std::optional<int64_t>, std::optional<int64_t>)>();
  auto dequantize = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("linquant::dequantize", "")
                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                          std::optional<int64_t>, std::optional<int64_t>,
                                          std::optional<at::ScalarType>)>();

  // The seeds' 3x3 matrix, symmetric int8 per row.
  const at::Tensor w = at::tensor({191.6f, -13.5f, 728.6f, 92.14f, 295.5f, -184.0f, 0.0f, 684.6f, 245.5f}).view({3, 3});
  auto [scale, zero] = choose.call(w, 8, true, 0, std::nullopt);
  EXPECT_EQ(scale.sizes(), (at::IntArrayRef{3, 1}));
  const at::Tensor q = quantize.call(w, scale, std::nullopt, 8, 0, std::nullopt);
  const at::Tensor expected = at::tensor({33, -2, 127, 40, 127, -79, 0, 127, 46}, at::kChar).view({3, 3});
  EXPECT_TRUE(at::equal(q, expected)) << q;
  const at::Tensor back = dequantize.call(q, scale, std::nullopt, 0, std::nullopt, at::kFloat);
  EXPECT_NEAR((back - w).pow(2).mean().item<float>(), 1.8084f, 1e-3);
}

TEST(Dispatcher, BadBitsRaiseAClearError) {
  auto choose = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("linquant::choose_qparams", "")
                    .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, bool,
                                                              std::optional<int64_t>, std::optional<int64_t>)>();
  try {
    choose.call(at::ones({4}), 9, true, std::nullopt, std::nullopt);
    FAIL() << "bits=9 was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("bits must be between 2 and 8"), std::string::npos) << e.what();
  }
}

}  // namespace
