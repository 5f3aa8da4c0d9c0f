// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file json.hpp
/// \brief Parsing untrusted JSON (safetensors headers, config.json, index files) with
/// bounded nesting, no duplicate keys, and every error as a kmoe::runtime_error naming the
/// file; and short excerpts of untrusted text for error messages.

#include <cstddef>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "kmoe/error.hpp"

namespace kmoe::io {

/// \brief Deepest nesting of arrays and objects accepted. The files kmoe reads nest at most
/// 3 levels; the bound keeps every recursive walk of a parsed value (nlohmann's dump(), its
/// destructor in older releases, comparisons) far from the stack limit.
inline constexpr int max_json_depth = 64;

/// \brief Longest excerpt of untrusted text quoted in an error message.
inline constexpr std::size_t max_excerpt_chars = 96;

/// \brief `text`, cut to `limit` characters with "... (N bytes)" appended when longer.
inline std::string excerpt(std::string_view text, std::size_t limit = max_excerpt_chars) {
  if (text.size() <= limit) return std::string(text);
  return std::string(text.substr(0, limit)) + "... (" + std::to_string(text.size()) + " bytes)";
}

/// \brief A JSON value as text for an error message, cut like excerpt().
inline std::string json_excerpt(const nlohmann::json& value) {
  return excerpt(value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
}

namespace detail {

/// A SAX pass over the text before it is parsed into a value: refuses nesting deeper than
/// max_json_depth and a key repeated within one object, and turns nlohmann's parse errors
/// into kmoe::runtime_error. nlohmann's own DOM parser with a callback would do the same
/// checks in quadratic time (it rescans the parent object at every end of a child).
class StrictJsonChecker : public nlohmann::json::json_sax_t {
 public:
  explicit StrictJsonChecker(std::string prefix) : prefix_(std::move(prefix)) {}

  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    open();
    keys_.emplace_back();
    return true;
  }
  bool key(string_t& key) override {
    if (!keys_.back().insert(key).second)
      throw runtime_error(prefix_ + "key \"" + excerpt(key) +
                          "\" appears twice in one JSON object");
    return true;
  }
  bool end_object() override {
    keys_.pop_back();
    --depth_;
    return true;
  }
  bool start_array(std::size_t) override {
    open();
    return true;
  }
  bool end_array() override {
    --depth_;
    return true;
  }
  bool parse_error(std::size_t position, const std::string&,
                   const nlohmann::json::exception& e) override {
    throw runtime_error(prefix_ + "not valid JSON at byte " + std::to_string(position) + ": " +
                        excerpt(std::string_view(e.what()), 4 * max_excerpt_chars));
  }

 private:
  void open() {
    if (++depth_ > max_json_depth)
      throw runtime_error(prefix_ + "JSON nests deeper than " + std::to_string(max_json_depth) +
                          " levels");
  }

  std::string prefix_;
  int depth_ = 0;
  std::vector<std::set<std::string>> keys_;  // one set per open object
};

}  // namespace detail

/// \brief Parses `text`, the content of file `path` (`what` names the reader, e.g.
/// "SafetensorsFile"). Throws kmoe::runtime_error "<what>: <path>: ..." for invalid JSON,
/// nesting deeper than max_json_depth, a key repeated within one object (nlohmann would
/// keep the last silently, so the result would depend on key order), and any other
/// nlohmann error (a number out of range such as 1e400 included). Messages quote at most
/// an excerpt of the input.
inline nlohmann::json parse_json(std::string_view text, const std::string& path, const char* what) {
  const std::string prefix = std::string(what) + ": " + path + ": ";
  detail::StrictJsonChecker checker(prefix);
  nlohmann::json::sax_parse(text.begin(), text.end(), &checker);
  try {
    return nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    throw runtime_error(
        prefix + "not valid JSON: " + excerpt(std::string_view(e.what()), 4 * max_excerpt_chars));
  }
}

}  // namespace kmoe::io
