// The message of the c10::Error a call throws ("no error" when it throws none), for the C++ API's
// tests to check what an error says.
#pragma once

#include <c10/util/Exception.h>

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
