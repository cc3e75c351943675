// A strict JSON (RFC 8259) parser for the files linquant reads from C++: safetensors headers and
// linquant.json. Torch ships none for C++. Strict, because these files come from disk and may be
// damaged: no comments, trailing commas, NaN / Infinity, duplicate object keys, invalid UTF-8,
// lone surrogates, integers beyond int64 or numbers beyond double; nesting deeper than 512 levels
// is refused rather than recursed into (a damaged file must not overflow the stack).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace linquant::json {

class Value {
 public:
  using Array = std::vector<Value>;
  using Object = std::vector<std::pair<std::string, Value>>;  // in file order

  Value() = default;  // null
  explicit Value(bool b) : type_(Type::kBool), bool_(b) {}
  explicit Value(int64_t i) : type_(Type::kInt), int_(i) {}
  explicit Value(double d) : type_(Type::kDouble), double_(d) {}
  explicit Value(std::string s) : type_(Type::kString), string_(std::move(s)) {}
  explicit Value(Array a) : type_(Type::kArray), array_(std::move(a)) {}
  explicit Value(Object o) : type_(Type::kObject), object_(std::move(o)) {}

  bool is_null() const { return type_ == Type::kNull; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_int() const { return type_ == Type::kInt; }  // written without fraction or exponent
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }

  // Each checks the type (an internal error otherwise): callers test is_*() first.
  bool as_bool() const;
  int64_t as_int() const;
  double as_double() const;  // an int or a double
  const std::string& as_string() const;
  const Array& as_array() const;
  const Object& as_object() const;

  // An object's member, or nullptr when absent.
  const Value* find(std::string_view key) const;

  // Compact JSON text, cut to about `max_chars` with "...": for error messages.
  std::string describe(size_t max_chars = 60) const;

 private:
  enum class Type { kNull, kBool, kInt, kDouble, kString, kArray, kObject };
  void dump(std::string& out) const;

  Type type_ = Type::kNull;
  bool bool_ = false;
  int64_t int_ = 0;
  double double_ = 0;
  std::string string_;
  Array array_;
  Object object_;
};

// Parses one JSON value (whitespace around it allowed). Invalid text is a c10::ValueError
// "<what> is not valid JSON: <reason> at line L, column C".
Value parse(std::string_view text, const std::string& what);

}  // namespace linquant::json
