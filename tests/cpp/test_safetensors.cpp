// linquant::read_safetensors on files this test writes itself: every dtype back as written, and
// every kind of damage (including every truncation and byte corruptions) as a ValueError naming
// the file, never a crash.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <gtest/gtest.h>

#include <string>

#include "linquant/serialization.h"
#include "serialization_files.h"

namespace {

using namespace serialization_test;

std::vector<std::pair<std::string, at::Tensor>> every_dtype() {
  at::manual_seed(0);
  return {{"f64", at::randn({2, 3}, at::kDouble)},
          {"f32", at::randn({4})},
          {"f16", at::randn({2, 2}).to(at::kHalf)},
          {"bf16", at::randn({3}).to(at::kBFloat16)},
          {"i64", at::tensor({INT64_MIN, int64_t{0}, INT64_MAX})},
          {"i32", at::tensor({-7, 1 << 30}, at::kInt)},
          {"i16", at::tensor({-300, 300}, at::kShort)},
          {"i8", at::arange(-128, 128, at::kChar).view({16, 16})},
          {"u8", at::arange(0, 256, at::kShort).to(at::kByte)},
          {"u16", at::tensor({0, 65535}, at::kInt).to(at::kUInt16)},
          {"bool", at::tensor({1, 0, 1}, at::kByte).to(at::kBool)},
          {"scalar", at::tensor(3.5)},
          {"empty", at::empty({0, 5})}};
}

TEST(Safetensors, ReadsEveryDtypeBackAsWritten) {
  ScratchDir dir;
  const auto file = dir.path() / "all.safetensors";
  write_bytes(file, safetensors_of(every_dtype(), {{"format", "pt"}, {"k", "v"}}));
  const linquant::SafetensorsFile read = linquant::read_safetensors(file.string());
  ASSERT_EQ(read.tensors.size(), every_dtype().size());
  for (const auto& [name, want] : every_dtype()) {
    const at::Tensor& got = read.tensors.at(name);
    EXPECT_EQ(got.scalar_type(), want.scalar_type()) << name;
    EXPECT_EQ(got.sizes(), want.sizes()) << name;
    EXPECT_TRUE(got.device().is_cpu()) << name;
    // Compared as bytes: uint16 has few kernels on the CPU.
    EXPECT_TRUE(at::equal(got.flatten().view(at::kByte), want.flatten().view(at::kByte))) << name;
  }
  EXPECT_EQ(read.metadata, (std::map<std::string, std::string>{{"format", "pt"}, {"k", "v"}}));
}

TEST(Safetensors, HeaderPaddingEscapedNamesAndEmptyFiles) {
  ScratchDir dir;
  const auto file = dir.path() / "x.safetensors";
  // Writers pad the header with spaces to 8 bytes; names are any JSON string.
  write_bytes(file, safetensors_bytes(R"({"caf\u00e9.w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}})"
                                      "      ",
                                      "\x01\x02"));
  const auto read = linquant::read_safetensors(file.string());
  EXPECT_TRUE(at::equal(read.tensors.at("caf\xC3\xA9.w"), at::tensor({1, 2}, at::kByte)));
  EXPECT_TRUE(read.metadata.empty());
  write_bytes(file, safetensors_bytes("{}", ""));
  EXPECT_TRUE(linquant::read_safetensors(file.string()).tensors.empty());
}

TEST(Safetensors, Devices) {
  ScratchDir dir;
  const auto file = dir.path() / "x.safetensors";
  write_bytes(file, safetensors_of({{"w", at::arange(6, at::kFloat)}}));
  EXPECT_NE(value_error([&] { linquant::read_safetensors(file.string(), c10::Device("meta")); })
                .find("device 'meta' is not a load target"),
            std::string::npos);
  if (at::hasCUDA()) {
    const auto read = linquant::read_safetensors(file.string(), c10::Device("cuda"));
    EXPECT_TRUE(read.tensors.at("w").is_cuda());
    EXPECT_TRUE(at::equal(read.tensors.at("w").cpu(), at::arange(6, at::kFloat)));
  } else {
    EXPECT_NE(value_error([&] { linquant::read_safetensors(file.string(), c10::Device("cuda")); })
                  .find("needs a CUDA GPU, and torch sees none here"),
              std::string::npos);
  }
}

// A header of two tensors: a F32 [2] and a U8 [3] (11 bytes of data), with `a` and `b` the entries.
std::string header(const std::string& a = R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})",
                   const std::string& b = R"({"dtype": "U8", "shape": [3], "data_offsets": [8, 11]})") {
  return R"({"a": )" + a + R"(, "b": )" + b + "}";
}
const std::string kData(11, '\x01');

TEST(Safetensors, DamagedFilesAreValueErrorsNamingFileAndTensor) {
  ScratchDir dir;
  const auto file = dir.path() / "damaged.safetensors";
  const std::string valid = safetensors_bytes(header(), kData);
  std::string too_long = valid;
  too_long[0] = static_cast<char>(0xE8), too_long[1] = 0x03;  // 1000
  std::string huge = valid;
  huge[7] = static_cast<char>(0x80);  // 2^63 + the real length
  const std::pair<std::string, const char*> cases[] = {
      {"", "0 bytes, too short for a safetensors file"},
      {std::string("\x05\0\0\0", 4), "4 bytes, too short"},
      {too_long, "the header length says 1000 bytes, but only"},
      {huge, "bytes, but only"},
      {safetensors_bytes("", ""), "the header is not valid JSON: unexpected end"},
      {safetensors_bytes("{oops", ""), "the header is not valid JSON"},
      {safetensors_bytes("[]", ""), "the header must be a JSON object, got []"},
      {safetensors_bytes(header(R"({"dtype": "F33", "shape": [2], "data_offsets": [0, 8]})"), kData),
       "tensor 'a' has an unknown dtype \"F33\" (expected F64"},
      {safetensors_bytes(header(R"({"dtype": 4, "shape": [2], "data_offsets": [0, 8]})"), kData),
       "tensor 'a' has an unknown dtype 4"},
      {safetensors_bytes(header(R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 7]})"), kData),
       "tensor 'a': data_offsets [0, 7] hold 7 bytes, but F32 [2] needs 8"},
      {safetensors_bytes(header(), kData.substr(0, 10)),
       "tensor 'b': data_offsets [8, 11] end beyond the file's data (10 bytes): a truncated file?"},
      {safetensors_bytes(header(R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})",
                                R"({"dtype": "U8", "shape": [3], "data_offsets": [6, 9]})"),
                         kData),
       "tensor 'b': data_offsets [6, 9] overlap another tensor's (which ends at 8)"},
      {safetensors_bytes(header(R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})",
                                R"({"dtype": "U8", "shape": [3], "data_offsets": [9, 12]})"),
                         kData + "x"),
       "tensor 'b': data_offsets [9, 12] leave a gap after byte 8"},
      {safetensors_bytes(header(), kData + "xy"), "data beyond the last tensor's end (2 extra bytes)"},
      {safetensors_bytes(header(R"({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]})"), kData),
       "tensor 'a': shape must hold sizes >= 0, got [-2]"},
      {safetensors_bytes(header(R"({"dtype": "F32", "shape": 2, "data_offsets": [0, 8]})"), kData),
       "tensor 'a': shape must be an array of sizes, got 2"},
      {safetensors_bytes(header(R"({"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 8]})"),
                         kData),
       "is too large"},
      {safetensors_bytes(header(R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]})"), kData),
       "data_offsets must be [begin, end] with 0 <= begin <= end, got [0, 8, 9]"},
      {safetensors_bytes(header(R"({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]})"), kData),
       "data_offsets must be [begin, end]"},
      {safetensors_bytes(header(R"({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]})"), kData),
       "data_offsets must be [begin, end]"},
      {safetensors_bytes(header(R"({"dtype": "F32", "shape": [2]})"), kData),
       "tensor 'a' must have dtype, shape and data_offsets"},
      {safetensors_bytes(header(R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1})"), kData),
       "tensor 'a' has an unknown field 'x'"},
      {safetensors_bytes(header("[]"), kData), "tensor 'a' must be a JSON object, got []"},
      {safetensors_bytes(R"({"__metadata__": [], "a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}})", ""),
       "__metadata__ must be a JSON object of strings"},
      {safetensors_bytes(R"({"__metadata__": {"n": 1}})", ""), "__metadata__ 'n' must be a string, got 1"},
      {safetensors_bytes(R"({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}})", std::string("\x01\x02", 2)),
       "tensor 'a' (BOOL) holds bytes other than 0 and 1"},
      {safetensors_bytes(R"({"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},)"
                         R"( "a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}})",
                         ""),
       "duplicate key \"a\""},
  };
  for (const auto& [bytes, expected] : cases) {
    write_bytes(file, bytes);
    const std::string message = value_error([&] { linquant::read_safetensors(file.string()); });
    EXPECT_EQ(message.rfind("linquant::read_safetensors: " + file.string() + ": ", 0), 0u) << message;
    EXPECT_NE(message.find(expected), std::string::npos) << expected << " -> " << message;
  }
}

TEST(Safetensors, MissingFileOrADirectory) {
  ScratchDir dir;
  for (const auto& path : {dir.path() / "absent.safetensors", dir.path()}) {
    EXPECT_NE(value_error([&] { linquant::read_safetensors(path.string()); }).find(": not found (or not a file)"),
              std::string::npos);
  }
}

TEST(Safetensors, EveryTruncationIsAValueError) {
  ScratchDir dir;
  const auto file = dir.path() / "cut.safetensors";
  const std::string bytes = safetensors_of(every_dtype(), {{"format", "pt"}});
  for (size_t size = 0; size < bytes.size(); ++size) {
    write_bytes(file, bytes.substr(0, size));
    const std::string message = value_error([&] { linquant::read_safetensors(file.string()); });
    EXPECT_EQ(message.rfind("linquant::read_safetensors: ", 0), 0u) << size << " bytes: " << message;
  }
}

TEST(Safetensors, CorruptedBytesLoadOrRaiseValueErrors) {
  // Any byte of the length field or the header changed to a few telling values: the file loads or
  // is refused with a ValueError, nothing else (no crash, no other exception, no huge allocation).
  ScratchDir dir;
  const auto file = dir.path() / "corrupt.safetensors";
  const std::string bytes = safetensors_of({{"w", at::arange(12, at::kFloat).view({3, 4})},
                                            {"b", at::tensor({1, 0}, at::kByte).to(at::kBool)},
                                            {"q", at::arange(6, at::kChar)}},
                                           {{"format", "pt"}});
  int refused = 0;
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (const char c : {'\0', '\xFF', '"', '9', ' ', '[', '\x80'}) {
      std::string damaged = bytes;
      damaged[i] = c;
      write_bytes(file, damaged);
      const std::string message = value_error([&] { linquant::read_safetensors(file.string()); });
      if (message == "no error") continue;
      ++refused;
      EXPECT_EQ(message.rfind("linquant::read_safetensors: ", 0), 0u) << "byte " << i << ": " << message;
    }
  }
  EXPECT_GT(refused, 100);
}

}  // namespace
