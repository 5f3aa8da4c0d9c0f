// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file error.hpp
/// \brief The one way kmoe reports bad input: an exception naming the parameter and its value.

#include <sstream>
#include <stdexcept>
#include <string>

namespace kmoe {

/// \brief Thrown for any invalid argument; what() reads
/// "<where>: invalid <parameter> = <value>: <why>".
class invalid_argument : public std::invalid_argument {
 public:
  invalid_argument(std::string where, std::string parameter, std::string value, std::string why)
      : std::invalid_argument(where + ": invalid " + parameter + " = " + value + ": " + why),
        parameter_(std::move(parameter)),
        value_(std::move(value)) {}
  const std::string& parameter() const noexcept { return parameter_; }
  const std::string& value() const noexcept { return value_; }

 private:
  std::string parameter_;
  std::string value_;
};

/// \brief Thrown when data (not arguments) is unusable, e.g. non-finite router logits
/// or a malformed checkpoint file.
class runtime_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class T>
std::string to_display(const T& value) {
  std::ostringstream os;
  os << value;
  return os.str();
}
}  // namespace detail

/// \brief Throws kmoe::invalid_argument unless `condition` holds.
template <class T>
void require(bool condition, const char* where, const char* parameter, const T& value,
             const std::string& why) {
  if (!condition) throw invalid_argument(where, parameter, detail::to_display(value), why);
}

}  // namespace kmoe
