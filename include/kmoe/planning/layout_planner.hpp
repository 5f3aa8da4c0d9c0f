// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file layout_planner.hpp
/// \brief kmoe::planning::plan_layouts: every (TP, EP, DP, rank order, placement) MoELayer
/// can run on a machine, the ones that fit in memory ranked by the LayoutModel's step time
/// under uniform top-k routing, and why (the rule of thumb "TP when experts are few
/// relative to devices, EP when many" as the prior, against the model). kmoe-plan prints it.

#include <kmoe/planning/layout_model.hpp>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace kmoe::planning {

/// \brief One layout's prediction: the worst rank's memory and step time (the step waits
/// for the slowest rank), and that rank's traffic.
struct Candidate {
  ParallelLayout layout;
  /// Placement::round_robin too when it predicts the same (uniform routing gives both
  /// placements the same expert counts per rank).
  bool any_placement = false;
  RankMemory memory;
  RankTraffic traffic;
  double compute_seconds = 0;
  double communication_seconds = 0;
  double step_seconds() const { return compute_seconds + communication_seconds; }
};

/// \brief The ranked feasible layouts, what was excluded and why, and the explanation.
struct Plan {
  std::vector<Candidate> feasible;  ///< fastest first
  /// Layouts left out, by reason ("ffn % TP != 0", "experts < EP", "tokens % (EP x DP) !=
  /// 0", "memory-per-rank"), with how many.
  std::map<std::string, int> excluded;
  double smallest_memory = 0;  ///< the least memory any otherwise valid layout needs
  std::string smallest_memory_layout;
  std::vector<std::string> explanation;
};

inline const char* order_name(RankOrder o) {
  static const char* names[] = {"tp_ep_dp", "ep_tp_dp", "tp_dp_ep", "dp_tp_ep"};
  return names[int(o)];
}

inline std::string describe(const ParallelLayout& l) {
  return "tp=" + std::to_string(l.tp) + " ep=" + std::to_string(l.ep) +
         " dp=" + std::to_string(l.dp) + " " + order_name(l.order);
}

namespace detail {

/// The prediction of `layout` at every rank: the largest memory and step time.
inline Candidate evaluate(const LayoutModel& model, const ParallelLayout& layout,
                          const ExchangeCounts& counts) {
  Candidate c;
  c.layout = layout;
  double worst = -1;
  for (int r = 0; r < layout.world_size(); ++r) {
    const RankMemory memory = model.memory(layout, counts, r);
    if (memory.total() > c.memory.total()) c.memory = memory;
    RankTraffic traffic = model.traffic(layout, counts, r);
    const double compute = model.flops(layout, counts, r) / model.machine().flop_rate;
    const double communication = model.communication_seconds(traffic);
    if (compute + communication > worst) {
      worst = compute + communication;
      c.traffic = std::move(traffic);
      c.compute_seconds = compute;
      c.communication_seconds = communication;
    }
  }
  return c;
}

inline bool same_prediction(const Candidate& a, const Candidate& b) {
  if (a.memory.total() != b.memory.total() || a.step_seconds() != b.step_seconds()) return false;
  for (int t = 0; t < traffic_kinds; ++t)
    if (a.traffic.bytes[t].intra != b.traffic.bytes[t].intra ||
        a.traffic.bytes[t].inter != b.traffic.bytes[t].inter)
      return false;
  return true;
}

/// World rank -> (tp, ep, dp) of every rank: two orders with the same map are one layout.
inline std::vector<int> rank_map(const ParallelLayout& layout) {
  std::vector<int> map;
  for (int r = 0; r < layout.world_size(); ++r) {
    int t, e, d;
    layout.coordinates(r, t, e, d);
    map.insert(map.end(), {t, e, d});
  }
  return map;
}

inline std::string milliseconds(double seconds) {
  char text[32];
  std::snprintf(text, sizeof text, "%.3g ms", seconds * 1e3);
  return text;
}

inline std::string megabytes(double bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f MB", bytes / 1e6);
  return text;
}

/// The largest term by which `a` is slower than `b`, in words.
inline std::string main_difference(const Candidate& a, const Candidate& b) {
  struct Term {
    const char* name;
    double a, b;
  };
  const auto bytes = [](const Candidate& c, Traffic t) { return c.traffic[t].total(); };
  const auto exchange = [&](const Candidate& c) {
    return bytes(c, Traffic::dispatch) + bytes(c, Traffic::combine) +
           bytes(c, Traffic::exchange_metadata);
  };
  const auto inter = [](const Candidate& c) { return c.traffic.total().inter; };
  const Term compute{"compute", a.compute_seconds, b.compute_seconds};
  const Term communication{"communication", a.communication_seconds, b.communication_seconds};
  const bool by_communication = communication.a - communication.b >= compute.a - compute.b;
  const Term& term = by_communication ? communication : compute;
  std::string why =
      std::string(term.name) + " " + milliseconds(term.a) + " against " + milliseconds(term.b);
  if (by_communication)
    why += " (all-to-all " + megabytes(exchange(a)) + " against " + megabytes(exchange(b)) +
           ", TP all-reduce " + megabytes(bytes(a, Traffic::tp_all_reduce)) + " against " +
           megabytes(bytes(b, Traffic::tp_all_reduce)) + ", gradient all-reduce " +
           megabytes(bytes(a, Traffic::gradient_all_reduce)) + " against " +
           megabytes(bytes(b, Traffic::gradient_all_reduce)) + "; between nodes " +
           megabytes(inter(a)) + " against " + megabytes(inter(b)) + ")";
  return why;
}

}  // namespace detail

/// \brief Plans the layouts of `shape` on `machine` for `tokens` tokens per training step
/// (the global batch: each of the EP x DP token groups routes tokens / (EP x DP)).
inline Plan plan_layouts(const ModelShape& shape, const Machine& machine, long long tokens) {
  const LayoutModel model(shape, machine);
  require(tokens >= 1, "kmoe::planning::plan_layouts", "tokens", tokens, "must be >= 1");
  Plan plan;
  plan.smallest_memory = -1;
  const int n = machine.ranks;
  for (int tp = 1; tp <= n; ++tp) {
    if (n % tp) continue;
    for (int ep = 1; ep <= n / tp; ++ep) {
      if ((n / tp) % ep) continue;
      const int dp = n / tp / ep;
      if (shape.ffn % tp) {
        ++plan.excluded["ffn % TP != 0"];
        continue;
      }
      if (shape.experts < ep) {
        ++plan.excluded["experts < EP"];
        continue;
      }
      if (tokens % (ep * dp)) {
        ++plan.excluded["tokens % (EP x DP) != 0"];
        continue;
      }
      std::vector<std::vector<int>> maps;
      for (RankOrder order :
           {RankOrder::tp_ep_dp, RankOrder::ep_tp_dp, RankOrder::tp_dp_ep, RankOrder::dp_tp_ep}) {
        ParallelLayout layout;
        layout.tp = tp;
        layout.ep = ep;
        layout.dp = dp;
        layout.order = order;
        const auto map = detail::rank_map(layout);
        if (std::find(maps.begin(), maps.end(), map) != maps.end()) continue;
        maps.push_back(map);
        const auto counts = ExchangeCounts::uniform(shape, layout, double(tokens) / (ep * dp));
        Candidate block = detail::evaluate(model, layout, counts);
        layout.placement = Placement::round_robin;
        Candidate round_robin = detail::evaluate(model, layout, counts);
        std::vector<Candidate> both;
        if (detail::same_prediction(block, round_robin)) {
          block.any_placement = true;
          both.push_back(block);
        } else {
          both = {block, round_robin};
        }
        for (auto& c : both) {
          if (plan.smallest_memory < 0 || c.memory.total() < plan.smallest_memory) {
            plan.smallest_memory = c.memory.total();
            plan.smallest_memory_layout = describe(c.layout);
          }
          if (c.memory.total() > machine.memory_per_rank)
            ++plan.excluded["memory-per-rank"];
          else
            plan.feasible.push_back(c);
        }
      }
    }
  }
  std::stable_sort(plan.feasible.begin(), plan.feasible.end(),
                   [](const Candidate& a, const Candidate& b) {
                     if (a.step_seconds() != b.step_seconds())
                       return a.step_seconds() < b.step_seconds();
                     return a.memory.total() < b.memory.total();
                   });
  if (plan.feasible.empty()) return plan;

  // The prior: experts many relative to the devices -> EP over every rank; few -> EP up to
  // E (the largest divisor of N not above it) and TP for the rest.
  const bool many = shape.experts >= n;
  int prior_ep = 1;
  for (int ep = 1; ep <= std::min(n, shape.experts); ++ep)
    if (n % ep == 0) prior_ep = ep;
  const int prior_tp = n / prior_ep;
  plan.explanation.push_back(
      "prior: E = " + std::to_string(shape.experts) + " experts on N = " + std::to_string(n) +
      " ranks: experts are " + (many ? "many" : "few") + " relative to devices, so the rule " +
      (many ? "\"EP when many\" puts every rank into EP (tp=1 ep=" + std::to_string(n) + ")"
            : "\"TP when experts are few\" splits each expert over TP ranks (tp=" +
                  std::to_string(prior_tp) + " ep=" + std::to_string(prior_ep) + ")"));
  const Candidate& best = plan.feasible.front();
  plan.explanation.push_back(
      "model: the fastest is " + describe(best.layout) + ": step " +
      detail::milliseconds(best.step_seconds()) + " = compute " +
      detail::milliseconds(best.compute_seconds) + " + communication " +
      detail::milliseconds(best.communication_seconds) + " (no overlap assumed), " +
      detail::megabytes(best.traffic.total().inter) + " between nodes per rank");
  const Candidate* prior = nullptr;
  for (const auto& c : plan.feasible)
    if (c.layout.tp == prior_tp && c.layout.ep == prior_ep && c.layout.dp == 1) {
      prior = &c;
      break;
    }
  if (!prior) {
    plan.explanation.push_back("the prior's layout tp=" + std::to_string(prior_tp) +
                               " ep=" + std::to_string(prior_ep) +
                               " is not feasible here (see the exclusions)");
  } else if (prior->layout.tp == best.layout.tp && prior->layout.ep == best.layout.ep &&
             prior->layout.dp == best.layout.dp) {
    plan.explanation.push_back("the model agrees with the prior");
  } else {
    plan.explanation.push_back("the model refines the prior: its best prior-shaped layout (" +
                               describe(prior->layout) + ") takes " +
                               detail::milliseconds(prior->step_seconds()) + ", slower by " +
                               detail::milliseconds(prior->step_seconds() - best.step_seconds()) +
                               ": " + detail::main_difference(*prior, best));
  }
  return plan;
}

}  // namespace kmoe::planning
