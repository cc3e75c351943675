// The strict JSON parser (csrc/json.h) that reads safetensors headers and linquant.json: every
// kind of value, and invalid text as a ValueError naming the source, the reason and the place.
#include <gtest/gtest.h>

#include <string>

#include "json.h"
#include "serialization_files.h"

namespace {

using linquant::json::parse;
using linquant::json::Value;
using serialization_test::value_error;

TEST(Json, ParsesEveryKindOfValue) {
  const Value v = parse(R"( {"a": [1, -2, 0, -0, 2.5, -1e-3, 1E2, true, false, null, "s", {}, []],
                              "b": {"nested": {"deeper": [[["x"]]]}}, "c": "" } )",
                        "test");
  ASSERT_TRUE(v.is_object());
  ASSERT_EQ(v.as_object().size(), 3u);
  EXPECT_EQ(v.as_object()[0].first, "a");  // file order kept
  EXPECT_EQ(v.as_object()[2].first, "c");
  const auto& a = v.find("a")->as_array();
  ASSERT_EQ(a.size(), 13u);
  EXPECT_TRUE(a[0].is_int());
  EXPECT_EQ(a[0].as_int(), 1);
  EXPECT_EQ(a[1].as_int(), -2);
  EXPECT_EQ(a[3].as_int(), 0);
  EXPECT_FALSE(a[4].is_int());
  EXPECT_EQ(a[4].as_double(), 2.5);
  EXPECT_EQ(a[5].as_double(), -1e-3);
  EXPECT_FALSE(a[6].is_int());  // an exponent makes a double, as in Python
  EXPECT_EQ(a[6].as_double(), 100.0);
  EXPECT_TRUE(a[7].as_bool());
  EXPECT_FALSE(a[8].as_bool());
  EXPECT_TRUE(a[9].is_null());
  EXPECT_EQ(a[10].as_string(), "s");
  EXPECT_TRUE(a[11].is_object() && a[11].as_object().empty());
  EXPECT_TRUE(a[12].is_array() && a[12].as_array().empty());
  EXPECT_EQ(v.find("b")->find("nested")->find("deeper")->as_array()[0].as_array()[0].as_array()[0].as_string(), "x");
  EXPECT_EQ(v.find("missing"), nullptr);
  EXPECT_EQ(v.find("c")->as_string(), "");
}

TEST(Json, IntegersAreExactInt64) {
  EXPECT_EQ(parse("9223372036854775807", "t").as_int(), INT64_MAX);
  EXPECT_EQ(parse("-9223372036854775808", "t").as_int(), INT64_MIN);
  EXPECT_EQ(parse("9007199254740993", "t").as_int(), 9007199254740993);  // 2^53 + 1: not a double
  EXPECT_NE(value_error([] { parse("9223372036854775808", "t"); }).find("out of the int64 range"), std::string::npos);
  EXPECT_NE(value_error([] { parse("1e999", "t"); }).find("out of the double range"), std::string::npos);
}

TEST(Json, StringEscapesAndUtf8) {
  EXPECT_EQ(parse(R"("\" \\ \/ \b \f \n \r \t")", "t").as_string(), "\" \\ / \b \f \n \r \t");
  EXPECT_EQ(parse(R"("\u0041\u00e9\u20AC")", "t").as_string(), "A\xC3\xA9\xE2\x82\xAC");
  EXPECT_EQ(parse(R"("\ud83d\ude00")", "t").as_string(), "\xF0\x9F\x98\x80");  // a surrogate pair: U+1F600
  EXPECT_EQ(parse("\"\xC3\xA9 \xF0\x9F\x98\x80\"", "t").as_string(), "\xC3\xA9 \xF0\x9F\x98\x80");  // raw UTF-8
  EXPECT_EQ(parse(R"("a\u0000b")", "t").as_string(), std::string("a\0b", 3));
}

TEST(Json, InvalidTextIsAValueErrorNamingSourceAndReason) {
  const std::pair<std::string, const char*> cases[] = {
      {"", "unexpected end"},
      {"   ", "unexpected end"},
      {"{", "expected a string key"},
      {"[1,]", "unexpected character ']'"},
      {"{\"a\": 1,}", "expected a string key"},
      {"{\"a\" 1}", "expected ':'"},
      {"{1: 2}", "expected a string key"},
      {"[1 2]", "expected ',' or ']'"},
      {"{\"a\": 1 \"b\": 2}", "expected ',' or '}'"},
      {"01", "leading zero"},
      {"1.", "digit after '.'"},
      {".5", "unexpected character '.'"},
      {"+1", "unexpected character '+'"},
      {"-", "expected a digit"},
      {"1e", "digit in the exponent"},
      {"1e+", "digit in the exponent"},
      {"NaN", "unexpected character 'N'"},
      {"Infinity", "unexpected character 'I'"},
      {"-Infinity", "expected a digit"},
      {"tru", "invalid literal"},
      {"nul", "invalid literal"},
      {"True", "unexpected character 'T'"},
      {"'a'", "unexpected character '''"},
      {"\"abc", "unterminated string"},
      {"\"abc\\", "unterminated string"},
      {"\"a\\x\"", "invalid escape"},
      {"\"\\u12\"", "4 hex digits"},
      {"\"\\u12G4\"", "4 hex digits"},
      {"\"\\ud800\"", "without its low surrogate"},
      {"\"\\ud800\\u0041\"", "without its low surrogate"},
      {"\"\\udc00\"", "lone low surrogate"},
      {"\"a\tb\"", "control character"},
      {"\"\x01\"", "control character"},
      {"\"\xFF\"", "invalid UTF-8 byte"},
      {"\"\x80\"", "invalid UTF-8 byte"},
      {"\"\xC0\xAF\"", "invalid UTF-8 byte"},       // overlong '/'
      {"\"\xE0\x80\xAF\"", "invalid UTF-8 sequence"},  // overlong '/' in 3 bytes
      {"\"\xED\xA0\x80\"", "invalid UTF-8 sequence"},  // an encoded surrogate
      {"\"\xF4\x90\x80\x80\"", "invalid UTF-8 sequence"},  // above U+10FFFF
      {"\"\xE2\x82\"", "invalid UTF-8 sequence"},      // cut short by the quote
      {"\"\xE2\x82", "truncated UTF-8 sequence"},
      {"{\"a\": 1, \"a\": 2}", "duplicate key \"a\""},
      {"[1] 2", "unexpected text after the value"},
      {"{} {}", "unexpected text after the value"},
      {"/* c */ 1", "unexpected character '/'"},
      {"\xEF\xBB\xBF{}", "unexpected character"},  // a byte-order mark
      {std::string(600, '[') + std::string(600, ']'), "nesting deeper than 512"},
      {std::string(100000, '['), "nesting deeper than 512"},
      {[] {
         std::string deep;
         for (int i = 0; i < 600; ++i) deep += "{\"a\": ";
         return deep;
       }(),
       "nesting deeper than 512"},
  };
  for (const auto& [text, reason] : cases) {
    const std::string message = value_error([&] { parse(text, "the source"); });
    EXPECT_EQ(message.rfind("the source is not valid JSON: ", 0), 0u) << text.substr(0, 40) << " -> " << message;
    EXPECT_NE(message.find(reason), std::string::npos) << text.substr(0, 40) << " -> " << message;
  }
}

TEST(Json, ErrorsSayWhere) {
  const std::string message = value_error([] { parse("{\n  \"a\": [1,\n   2,, 3]}", "f.json"); });
  EXPECT_NE(message.find("at line 3, column 6"), std::string::npos) << message;
  EXPECT_NE(value_error([] { parse("{\"k\": 1, \"k\": 2}", "f"); }).find("line 1, column 10"), std::string::npos);
}

TEST(Json, DeepButAllowedNestingParses) {
  const Value v = parse(std::string(500, '[') + std::string(500, ']'), "t");
  EXPECT_TRUE(v.is_array());
}

TEST(Json, DescribeIsCompactAndCut) {
  EXPECT_EQ(parse(R"({"a": [1, 2.5, "x\"y"], "b": null, "c": true})", "t").describe(),
            R"({"a": [1, 2.5, "x\"y"], "b": null, "c": true})");
  EXPECT_EQ(parse(R"("a\nb")", "t").describe(), R"("a\u000ab")");
  EXPECT_EQ(parse("[4.0, 1e20, -0.5]", "t").describe(), "[4.0, 1e+20, -0.5]");
  EXPECT_EQ(parse("[1, 1, 1, 1, 1, 1]", "t").describe(10), "[1, 1, 1, ...");
}

}  // namespace
