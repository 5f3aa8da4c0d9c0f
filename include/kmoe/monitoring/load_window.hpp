// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file load_window.hpp
/// \brief kmoe::ExpertLoadWindow: tokens per expert over the last N forward passes, the
/// record that dead-expert detection (and a placement policy) reads.
///
/// ForwardStats::tokens_per_expert is already summed over the ranks that route distinct
/// tokens, so every rank that records the same steps holds the same window.

#include <kmoe/error.hpp>
#include <kmoe/forward_stats.hpp>

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

namespace kmoe {

class ExpertLoadWindow {
 public:
  /// \param experts global expert count
  /// \param steps   forward passes kept (the oldest is forgotten when a new one arrives)
  ExpertLoadWindow(int experts, int steps) : experts_(experts), steps_(steps) {
    require(experts >= 1, "kmoe::ExpertLoadWindow", "experts", experts, "must be at least 1");
    require(steps >= 1, "kmoe::ExpertLoadWindow", "steps", steps, "must be at least 1");
    totals_.assign(std::size_t(experts), 0);
  }

  /// Adds one forward pass's tokens per expert (ForwardStats::tokens_per_expert).
  void record(const std::vector<std::int64_t>& tokens_per_expert) {
    require(int(tokens_per_expert.size()) == experts_, "kmoe::ExpertLoadWindow::record",
            "tokens_per_expert.size()", tokens_per_expert.size(),
            "must equal the window's expert count " + std::to_string(experts_));
    if (int(history_.size()) == steps_) {
      for (int e = 0; e < experts_; ++e) totals_[e] -= history_.front()[e];
      history_.pop_front();
    }
    history_.push_back(tokens_per_expert);
    for (int e = 0; e < experts_; ++e) totals_[e] += tokens_per_expert[e];
  }

  int experts() const { return experts_; }
  /// Forward passes currently held (at most the window's length).
  int recorded_steps() const { return int(history_.size()); }
  /// Tokens routed to each expert over the held passes.
  const std::vector<std::int64_t>& totals() const { return totals_; }
  /// Experts no token was routed to over the held passes (none before the first record).
  std::vector<int> dead_experts() const {
    std::vector<int> dead;
    if (history_.empty()) return dead;
    for (int e = 0; e < experts_; ++e)
      if (totals_[e] == 0) dead.push_back(e);
    return dead;
  }

 private:
  int experts_, steps_;
  std::deque<std::vector<std::int64_t>> history_;
  std::vector<std::int64_t> totals_;
};

}  // namespace kmoe
