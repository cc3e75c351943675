// What an error says, for the C++ API's tests: the message of the c10::Error a call throws ("no
// error" when it throws none), and whether it throws a given type saying a given thing.
#pragma once

#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <string>

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "no error";
}

// Success when f throws E (a c10::Error type) with `expected` in its message; otherwise what it
// threw, or that it threw nothing. EXPECT_TRUE(throws<c10::ValueError>([&] { ... }, "bits must")).
template <typename E, typename F>
::testing::AssertionResult throws(F&& f, const std::string& expected) {
  try {
    f();
  } catch (const E& e) {
    const std::string message = e.what_without_backtrace();
    if (message.find(expected) != std::string::npos) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "the error says \"" << message << "\", not \"" << expected << "\"";
  } catch (const c10::Error& e) {
    return ::testing::AssertionFailure() << "another error type: " << e.what_without_backtrace();
  }
  return ::testing::AssertionFailure() << "no error";
}
