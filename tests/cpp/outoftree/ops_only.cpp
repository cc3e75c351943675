// Calls the ops through the dispatcher only (linquant/ops.h is header-only): no symbol of the
// library is used, so only the target's --no-as-needed keeps it linked and its ops registered.
#include <ATen/ATen.h>
#include <linquant/ops.h>

#include <iostream>

int main() {
  const at::Tensor packed = linquant::pack(at::arange(4, at::kByte), 2);
  const bool ok = packed.item<int64_t>() == 228;  // 0 | 1 << 2 | 2 << 4 | 3 << 6
  std::cout << (ok ? "ops-only consumer ok" : "ops-only consumer MISMATCH") << std::endl;
  return ok ? 0 : 1;
}
