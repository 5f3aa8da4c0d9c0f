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

/// Byte offset at which `text` first nests deeper than `limit`, or npos. Brackets inside
/// strings do not count; the scan runs before nlohmann's parser sees the text at all.
inline std::size_t json_depth_violation(std::string_view text, int limit) {
  int depth = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i;  // the escaped character cannot end the string
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit) return i;
    } else if (c == ']' || c == '}') {
      --depth;  // unbalanced text is the parser's to report
    }
  }
  return std::string_view::npos;
}

}  // namespace detail

/// \brief Parses `text`, the content of file `path` (`what` names the reader, e.g.
/// "SafetensorsFile"). Throws kmoe::runtime_error "<what>: <path>: ..." for invalid JSON,
/// nesting deeper than max_json_depth, a key repeated within one object (nlohmann would
/// keep the last silently, so the result would depend on key order), and any other
/// nlohmann error (a number out of range such as 1e400 included). Messages quote at most
/// an excerpt of the input.
inline nlohmann::json parse_json(std::string_view text, const std::string& path, const char* what) {
  const std::string prefix = std::string(what) + ": " + path + ": ";
  const std::size_t too_deep = detail::json_depth_violation(text, max_json_depth);
  if (too_deep != std::string_view::npos)
    throw runtime_error(prefix + "JSON nests deeper than " + std::to_string(max_json_depth) +
                        " levels (at byte " + std::to_string(too_deep) + ")");

  // One set of keys per open object; the callback sees object_start, then each key at the
  // object's depth + 1, then object_end.
  std::vector<std::set<std::string>> open_objects;
  const auto check_keys = [&](int, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using event_t = nlohmann::json::parse_event_t;
    if (event == event_t::object_start) {
      open_objects.emplace_back();
    } else if (event == event_t::object_end) {
      open_objects.pop_back();
    } else if (event == event_t::key) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!open_objects.back().insert(key).second)
        throw runtime_error(prefix + "key \"" + excerpt(key) +
                            "\" appears twice in one JSON object");
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), check_keys);
  } catch (const nlohmann::json::exception& e) {
    throw runtime_error(prefix + "not valid JSON: " + excerpt(std::string_view(e.what()), 4 * max_excerpt_chars));
  }
}

}  // namespace kmoe::io
