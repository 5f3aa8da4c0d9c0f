// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file stats_log.hpp
/// \brief kmoe::StatsLog: one JSON line per forward pass and layer, the monitoring record
/// tools/plot_routing.py draws (docs/placement.md lists the fields).
///
/// Each rank writes its own file (the communication fields are per rank); a line is
/// flushed as soon as it is written, so a job that dies keeps every step it finished.

#include <kmoe/error.hpp>
#include <kmoe/forward_stats.hpp>
#include <kmoe/monitoring/load_window.hpp>
#include <kmoe/monitoring/peak_memory.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace kmoe {

namespace detail {

/// Appends `"key":` and a value to a JSON object being written into `out`.
class JsonObjectWriter {
 public:
  explicit JsonObjectWriter(std::ostringstream& out) : out_(out) { out_ << '{'; }
  void number(const char* key, double value) {
    this->key(key);
    // JSON has no NaN or infinity; an unmeasured or broken figure reads as null.
    if (std::isfinite(value))
      out_ << value;
    else
      out_ << "null";
  }
  void integer(const char* key, std::int64_t value) {
    this->key(key);
    out_ << value;
  }
  void string(const char* key, const std::string& value) {
    this->key(key);
    out_ << '"';
    for (const char c : value) {
      if (c == '"' || c == '\\') {
        out_ << '\\' << c;
      } else if (static_cast<unsigned char>(c) < 0x20) {
        char escaped[8];
        std::snprintf(escaped, sizeof escaped, "\\u%04x", unsigned(c));
        out_ << escaped;
      } else {
        out_ << c;
      }
    }
    out_ << '"';
  }
  template <class T>
  void integers(const char* key, const std::vector<T>& values) {
    this->key(key);
    out_ << '[';
    for (std::size_t i = 0; i < values.size(); ++i) out_ << (i ? "," : "") << values[i];
    out_ << ']';
  }
  /// Starts a nested object under `key`; the caller closes it with end().
  void begin(const char* key) {
    this->key(key);
    out_ << '{';
    first_ = true;
  }
  void end() {
    out_ << '}';
    first_ = false;
  }

 private:
  void key(const char* name) {
    if (!first_) out_ << ',';
    first_ = false;
    out_ << '"' << name << "\":";
  }
  std::ostringstream& out_;
  bool first_ = true;
};

}  // namespace detail

/// \brief What a StatsLog line needs besides the ForwardStats: who wrote it and the size of
/// an exchanged row (to turn row counts into bytes).
struct StatsLogContext {
  int rank = 0;                 ///< rank of the writing process (MPI world rank)
  int hidden = 0;               ///< H: values per exchanged row
  std::size_t value_bytes = 0;  ///< bytes per value on the wire (sizeof the layer's Scalar)
};

/// \brief Writes one JSON line per (step, layer): load per expert and its spread, drops,
/// capacity padding, dead experts (this step, and over a load window if given), time per
/// phase, payload bytes exchanged with each EP rank, the process's peak resident memory and
/// the layer's bytes by category with the peak per phase (ForwardStats::memory).
class StatsLog {
 public:
  /// Opens (truncates) `path`; kmoe::invalid_argument naming the path if it cannot.
  StatsLog(const std::string& path, const StatsLogContext& context)
      : path_(path), context_(context), out_(path, std::ios::out | std::ios::trunc) {
    if (!out_)
      throw invalid_argument("kmoe::StatsLog", "path", path,
                             std::string("cannot be opened for writing: ") + std::strerror(errno));
    require(context.hidden >= 1, "kmoe::StatsLog", "context.hidden", context.hidden,
            "must be at least 1");
    require(context.value_bytes >= 1, "kmoe::StatsLog", "context.value_bytes", context.value_bytes,
            "must be at least 1");
  }

  const std::string& path() const { return path_; }

  /// Writes the line of forward pass `step` of layer `layer`; `window` (optional) adds the
  /// experts without tokens over its steps.
  void write(std::int64_t step, const std::string& layer, const ForwardStats& stats,
             const ExpertLoadWindow* window = nullptr) {
    std::ostringstream line;
    line.precision(9);
    detail::JsonObjectWriter json(line);
    json.integer("step", step);
    json.string("layer", layer);
    json.integer("rank", context_.rank);
    json.integers("tokens_per_expert", stats.tokens_per_expert);
    const Spread spread = spread_of(stats.tokens_per_expert);
    json.number("load_max_over_mean", spread.max_over_mean);
    json.number("load_min_over_mean", spread.min_over_mean);
    json.integer("assignments", stats.assignments);
    json.integer("dropped", stats.dropped);
    json.integer("capacity", stats.capacity);
    json.number("padding_fraction", padding_fraction(stats));
    json.integers("dead_experts", spread.dead);
    if (window != nullptr) json.integers("dead_experts_window", window->dead_experts());
    json.integers("failed_slots", stats.failed_slots);
    json.integer("rerouted", stats.rerouted);
    json.begin("phase_ms");
    json.number("route", stats.phase_ms.route);
    json.number("dispatch", stats.phase_ms.dispatch);
    json.number("imbalance", stats.phase_ms.imbalance);
    json.number("exchange", stats.phase_ms.exchange);
    json.number("shared", stats.phase_ms.shared);
    json.number("experts", stats.phase_ms.experts);
    json.number("combine", stats.phase_ms.combine);
    json.end();
    json.begin("bytes_per_peer");
    json.integers("dispatch_sent", bytes(stats.dispatch_rows));
    json.integers("dispatch_received", bytes(stats.dispatch_rows_received));
    json.integers("combine_sent", bytes(stats.combine_rows_sent));
    json.integers("combine_received", bytes(stats.combine_rows_received));
    json.end();
    json.integer("peak_resident_bytes", peak_resident_bytes());
    // ForwardStats::memory: bytes by category, -1 where not measured.
    json.begin("memory_bytes");
    json.integer("expert_weights", stats.memory.expert_weights);
    json.integer("activations", stats.memory.activations);
    json.integer("exchange_buffers", stats.memory.exchange_buffers);
    json.integer("optimizer_state", stats.memory.optimizer_state);
    json.end();
    json.begin("peak_bytes");
    json.integer("route", stats.memory.peak.route);
    json.integer("dispatch", stats.memory.peak.dispatch);
    json.integer("exchange", stats.memory.peak.exchange);
    json.integer("shared", stats.memory.peak.shared);
    json.integer("experts", stats.memory.peak.experts);
    json.integer("combine", stats.memory.peak.combine);
    json.end();
    line << "}\n";
    out_ << line.str() << std::flush;
    if (!out_)
      throw runtime_error("kmoe::StatsLog: writing " + path_ + " failed: " + std::strerror(errno));
  }

  /// Share of the capacity-padded dispatch buffer of this rank ([E, capacity] slots, as
  /// GShard and Tutel lay it out) that holds no token; 0 when dropless (kmoe's segments
  /// are then exact).
  static double padding_fraction(const ForwardStats& stats) {
    const double slots = double(stats.tokens_per_expert.size()) * double(stats.capacity);
    if (stats.capacity < 0 || slots <= 0) return 0.0;
    return 1.0 - double(stats.assignments - stats.dropped) / slots;
  }

 private:
  struct Spread {
    double max_over_mean = 0, min_over_mean = 0;
    std::vector<int> dead;
  };
  static Spread spread_of(const std::vector<std::int64_t>& tokens) {
    Spread s;
    if (tokens.empty()) return s;
    double total = 0, largest = 0, smallest = double(tokens.front());
    for (std::size_t e = 0; e < tokens.size(); ++e) {
      total += double(tokens[e]);
      largest = std::max(largest, double(tokens[e]));
      smallest = std::min(smallest, double(tokens[e]));
      if (tokens[e] == 0) s.dead.push_back(int(e));
    }
    const double mean = total / double(tokens.size());
    if (mean > 0) s.max_over_mean = largest / mean, s.min_over_mean = smallest / mean;
    return s;
  }
  std::vector<std::int64_t> bytes(const std::vector<std::int64_t>& rows) const {
    std::vector<std::int64_t> out(rows.size());
    const auto row_bytes = std::int64_t(context_.hidden) * std::int64_t(context_.value_bytes);
    for (std::size_t p = 0; p < rows.size(); ++p) out[p] = rows[p] * row_bytes;
    return out;
  }

  std::string path_;
  StatsLogContext context_;
  std::ofstream out_;
};

}  // namespace kmoe
