// Files the serialization tests write themselves: a scratch directory, raw bytes, safetensors
// files built by hand from tensors (independent of the reader), and the message of a ValueError.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace serialization_test {

namespace fs = std::filesystem;

// A fresh directory under the system's temporary one, removed with everything in it.
class ScratchDir {
 public:
  ScratchDir() {
    std::string name = (fs::temp_directory_path() / "linquant_test_XXXXXX").string();
    EXPECT_NE(mkdtemp(name.data()), nullptr);
    path_ = name;
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

inline void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good()) << path;
}

inline std::string read_bytes(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// The 8-byte little-endian header length, the header, the data.
inline std::string safetensors_bytes(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((uint64_t{header.size()} >> (8 * i)) & 0xFF);
  return out + header + data;
}

inline const char* safetensors_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return "F64";
    case at::kFloat: return "F32";
    case at::kHalf: return "F16";
    case at::kBFloat16: return "BF16";
    case at::kLong: return "I64";
    case at::kInt: return "I32";
    case at::kShort: return "I16";
    case at::kChar: return "I8";
    case at::kByte: return "U8";
    case at::kUInt16: return "U16";
    case at::kBool: return "BOOL";
    default: ADD_FAILURE() << "no safetensors name for " << t; return "?";
  }
}

// A safetensors file of these tensors (names plain ASCII), in this order, with this metadata.
inline std::string safetensors_of(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata = {}) {
  std::string header = "{", data;
  if (!metadata.empty()) {
    header += "\"__metadata__\": {";
    for (const auto& [k, v] : metadata) header += (header.back() == '{' ? "\"" : ", \"") + k + "\": \"" + v + "\"";
    header += "}";
  }
  for (const auto& [name, tensor] : tensors) {
    const at::Tensor t = tensor.contiguous();
    header += std::string(header.size() > 1 ? ", " : "") + "\"" + name + "\": {\"dtype\": \"" +
              safetensors_dtype(t.scalar_type()) + "\", \"shape\": [";
    for (int64_t d = 0; d < t.dim(); ++d) header += (d ? ", " : "") + std::to_string(t.size(d));
    const size_t begin = data.size();
    data.append(static_cast<const char*>(t.data_ptr()), t.nbytes());
    header += "], \"data_offsets\": [" + std::to_string(begin) + ", " + std::to_string(data.size()) + "]}";
  }
  return safetensors_bytes(header + "}", data);
}

// The message of the c10::ValueError that `f` throws, or a description of what happened instead.
inline std::string value_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::ValueError& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return std::string("not a ValueError: ") + e.what();
  }
  return "no error";
}

}  // namespace serialization_test
