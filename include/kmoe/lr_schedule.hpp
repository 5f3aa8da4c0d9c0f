// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file lr_schedule.hpp
/// \brief Learning-rate schedules as small policies: each maps the optimizer's step count
/// to a factor of the base learning rate, so that a restart that restores the step count
/// resumes the schedule where it was. Use: opt.set_learning_rate(base * schedule(opt.steps())).

#include <kmoe/error.hpp>

#include <cmath>

namespace kmoe {

/// \brief Factor 1 at every step.
struct ConstantSchedule {
  double operator()(long long) const { return 1.0; }
};

/// \brief Linear warmup from 0 to 1 over `warmup_steps`, then cosine decay to
/// `min_ratio` at `total_steps` and `min_ratio` after (as transformers'
/// get_cosine_schedule_with_warmup, with Megatron's minimum).
struct WarmupCosineSchedule {
  long long warmup_steps = 0;
  long long total_steps = 1;
  double min_ratio = 0.0;

  WarmupCosineSchedule(long long warmup, long long total, double minimum = 0.0)
      : warmup_steps(warmup), total_steps(total), min_ratio(minimum) {
    constexpr const char* where = "kmoe::WarmupCosineSchedule";
    require(warmup >= 0, where, "warmup_steps", warmup, "must be >= 0");
    require(total > warmup, where, "total_steps", total, "must exceed warmup_steps");
    require(minimum >= 0 && minimum <= 1, where, "min_ratio", minimum, "must lie in [0, 1]");
  }

  double operator()(long long step) const {
    if (step < warmup_steps) return double(step) / double(warmup_steps);
    if (step >= total_steps) return min_ratio;
    const double progress = double(step - warmup_steps) / double(total_steps - warmup_steps);
    const double pi = std::acos(-1.0);
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + std::cos(pi * progress));
  }
};

/// \brief Factor gamma^(step / step_size) (torch.optim.lr_scheduler.StepLR).
struct StepSchedule {
  long long step_size = 1;
  double gamma = 0.1;

  StepSchedule(long long size, double factor) : step_size(size), gamma(factor) {
    require(size >= 1, "kmoe::StepSchedule", "step_size", size, "must be >= 1");
    require(factor > 0 && factor <= 1, "kmoe::StepSchedule", "gamma", factor, "must lie in (0, 1]");
  }

  double operator()(long long step) const { return std::pow(gamma, double(step / step_size)); }
};

}  // namespace kmoe
