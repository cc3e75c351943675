// linquant::read_safetensors (linquant/serialization.h): the safetensors format
// (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of
// JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then
// the data, offsets relative to its start. Held to the rules of the reference implementation, which
// Python's loader uses: the tensors tile the data exactly (no gap, no overlap, nothing after). Two
// more, since neither occurs in a file safetensors writes: tensor entries hold no other fields (one
// could change what the bytes mean), and BOOL bytes are 0 or 1 (others are no bool in torch).
#include "safetensors.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <algorithm>
#include <bit>
#include <filesystem>
#include <fstream>
#include <limits>
#include <tuple>
#include <vector>

#include "json.h"
#include "linquant/serialization.h"

namespace linquant {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; reading it on a big-endian host would need byte swaps");

namespace detail {

void check_load_device(c10::Device device, const std::string& who) {
  TORCH_CHECK_VALUE(device.type() != c10::kMeta, who, ": device 'meta' is not a load target: meta tensors hold no data");
  TORCH_CHECK_VALUE(!device.is_cuda() || at::hasCUDA(), who, ": device '", device.str(),
                    "' needs a CUDA GPU, and torch sees none here");
}

std::string dtype_name(at::ScalarType t) { return std::string(c10::getDtypeNames(t).first); }

}  // namespace detail

namespace {

struct DtypeInfo {
  const char* name;
  at::ScalarType type;
};

// As the safetensors format names them.
constexpr DtypeInfo kDtypes[] = {
    {"F64", at::kDouble},        {"F32", at::kFloat},          {"F16", at::kHalf},     {"BF16", at::kBFloat16},
    {"F8_E4M3", at::kFloat8_e4m3fn}, {"F8_E5M2", at::kFloat8_e5m2}, {"I64", at::kLong}, {"I32", at::kInt},
    {"I16", at::kShort},         {"I8", at::kChar},            {"U64", at::kUInt64},   {"U32", at::kUInt32},
    {"U16", at::kUInt16},        {"U8", at::kByte},            {"BOOL", at::kBool}};

struct Entry {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// One header entry, checked: its dtype, its shape and that data_offsets hold dtype x shape bytes.
Entry parse_entry(const std::string& where, const std::string& name, const json::Value& info) {
  const std::string tensor = where + ": tensor '" + name + "'";
  TORCH_CHECK_VALUE(info.is_object(), tensor, " must be a JSON object, got ", info.describe());
  for (const auto& [key, value] : info.as_object()) {
    TORCH_CHECK_VALUE(key == "dtype" || key == "shape" || key == "data_offsets", tensor, " has an unknown field '",
                      key, "' (expected dtype, shape and data_offsets)");
  }
  const json::Value* dtype = info.find("dtype");
  const json::Value* shape = info.find("shape");
  const json::Value* offsets = info.find("data_offsets");
  TORCH_CHECK_VALUE(dtype && shape && offsets, tensor, " must have dtype, shape and data_offsets, got ",
                    info.describe());
  Entry e{name, at::kByte, {}, 0, 0};
  const auto known = std::find_if(std::begin(kDtypes), std::end(kDtypes), [&](const DtypeInfo& d) {
    return dtype->is_string() && dtype->as_string() == d.name;
  });
  TORCH_CHECK_VALUE(known != std::end(kDtypes), tensor, " has an unknown dtype ", dtype->describe(),
                    " (expected F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U64, U32, U16, U8 or BOOL)");
  e.dtype = known->type;
  TORCH_CHECK_VALUE(shape->is_array(), tensor, ": shape must be an array of sizes, got ", shape->describe());
  // The byte count, without overflow: every size and the running product stay below 2^63.
  uint64_t bytes = c10::elementSize(e.dtype);
  for (const json::Value& size : shape->as_array()) {
    TORCH_CHECK_VALUE(size.is_int() && size.as_int() >= 0, tensor, ": shape must hold sizes >= 0, got ",
                      shape->describe());
    const auto s = static_cast<uint64_t>(size.as_int());
    TORCH_CHECK_VALUE(s == 0 || bytes <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / s, tensor,
                      ": shape ", shape->describe(), " is too large");
    bytes *= s;
    e.shape.push_back(size.as_int());
  }
  const bool pair = offsets->is_array() && offsets->as_array().size() == 2 &&
                    std::all_of(offsets->as_array().begin(), offsets->as_array().end(),
                                [](const json::Value& v) { return v.is_int() && v.as_int() >= 0; });
  TORCH_CHECK_VALUE(pair && offsets->as_array()[0].as_int() <= offsets->as_array()[1].as_int(), tensor,
                    ": data_offsets must be [begin, end] with 0 <= begin <= end, got ", offsets->describe());
  e.begin = static_cast<uint64_t>(offsets->as_array()[0].as_int());
  e.end = static_cast<uint64_t>(offsets->as_array()[1].as_int());
  TORCH_CHECK_VALUE(e.end - e.begin == bytes, tensor, ": data_offsets ", offsets->describe(), " hold ",
                    e.end - e.begin, " bytes, but ", known->name, " ", shape_text(e.shape), " needs ", bytes);
  return e;
}

// "__metadata__": a JSON object of strings.
std::map<std::string, std::string> parse_metadata(const std::string& where, const json::Value& v) {
  TORCH_CHECK_VALUE(v.is_object(), where, ": __metadata__ must be a JSON object of strings, got ", v.describe());
  std::map<std::string, std::string> metadata;
  for (const auto& [key, value] : v.as_object()) {
    TORCH_CHECK_VALUE(value.is_string(), where, ": __metadata__ '", key, "' must be a string, got ", value.describe());
    metadata.emplace(key, value.as_string());
  }
  return metadata;
}

}  // namespace

SafetensorsFile read_safetensors(const std::string& path, c10::Device device) {
  const std::string where = "linquant::read_safetensors: " + path;
  detail::check_load_device(device, "linquant::read_safetensors");
  std::error_code ec;
  TORCH_CHECK_VALUE(std::filesystem::is_regular_file(path, ec), where, ": not found (or not a file)");
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK_VALUE(f.is_open(), where, ": cannot be opened for reading");
  f.seekg(0, std::ios::end);
  const std::streamoff file_size = f.tellg();
  f.seekg(0);
  TORCH_CHECK_VALUE(f && file_size >= 8, where, ": ", file_size,
                    " bytes, too short for a safetensors file (an 8-byte header length comes first)");
  const auto size = static_cast<uint64_t>(file_size);
  unsigned char length_bytes[8];
  f.read(reinterpret_cast<char*>(length_bytes), 8);
  uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | length_bytes[i];
  TORCH_CHECK_VALUE(f && header_length <= size - 8, where, ": the header length says ", header_length,
                    " bytes, but only ", size - 8, " follow it (a truncated file, or not safetensors)");
  std::string header(header_length, '\0');
  f.read(header.data(), static_cast<std::streamsize>(header_length));
  TORCH_CHECK_VALUE(f, where, ": the file ended inside its header (it shrank while being read?)");
  const json::Value root = json::parse(header, where + ": the header");
  TORCH_CHECK_VALUE(root.is_object(), where, ": the header must be a JSON object, got ", root.describe());

  SafetensorsFile out;
  std::vector<Entry> entries;
  for (const auto& [name, info] : root.as_object()) {
    if (name == "__metadata__") {
      out.metadata = parse_metadata(where, info);
    } else {
      entries.push_back(parse_entry(where, name, info));
    }
  }
  // The data is read in file order, so the tensors must tile it: each begins where the one before
  // ends, the first at 0, the last at the end of the file.
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return std::tie(a.begin, a.end) < std::tie(b.begin, b.end); });
  const uint64_t data_size = size - 8 - header_length;
  uint64_t next = 0;
  for (const Entry& e : entries) {
    const std::string tensor = where + ": tensor '" + e.name + "'";
    TORCH_CHECK_VALUE(e.end <= data_size, tensor, ": data_offsets [", e.begin, ", ", e.end,
                      "] end beyond the file's data (", data_size, " bytes): a truncated file?");
    TORCH_CHECK_VALUE(e.begin >= next, tensor, ": data_offsets [", e.begin, ", ", e.end,
                      "] overlap another tensor's (which ends at ", next, ")");
    TORCH_CHECK_VALUE(e.begin == next, tensor, ": data_offsets [", e.begin, ", ", e.end,
                      "] leave a gap after byte ", next, " (tensors must be stored back to back)");
    next = e.end;
  }
  TORCH_CHECK_VALUE(next == data_size, where, ": data beyond the last tensor's end (", data_size - next, " extra bytes)");

  for (const Entry& e : entries) {
    at::Tensor t = at::empty(e.shape, at::TensorOptions(e.dtype));
    if (e.end > e.begin) f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(e.end - e.begin));
    TORCH_CHECK_VALUE(f, where, ": tensor '", e.name, "': the file ended inside its data (it shrank while being read?)");
    if (e.dtype == at::kBool) {
      TORCH_CHECK_VALUE(t.view(at::kByte).le(1).all().item<bool>(), where, ": tensor '", e.name,
                        "' (BOOL) holds bytes other than 0 and 1");
    }
    out.tensors.emplace(e.name, device.is_cpu() ? t : t.to(device));
  }
  return out;
}

}  // namespace linquant
