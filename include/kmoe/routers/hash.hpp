// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file hash.hpp
/// \brief Hash routing (Roller et al. 2021): token id -> expert splitmix64(id ^ seed) mod E,
/// weight 1, no learned weights. Needs RouteContext::token_ids.

#include <kmoe/detail/math.hpp>
#include <kmoe/parameters.hpp>
#include <kmoe/router.hpp>
#include <kmoe/routers/validation.hpp>
#include <kmoe/routing_plan.hpp>

namespace kmoe {

struct HashConfig {
  int hidden = 0;
  int experts = 0;
  std::uint64_t seed = 0;
};

/// \brief Fixed hash router; it has no parameters and passes no gradient.
template <class ExecSpace, class ScalarOrPrecision>
class HashRouter {
  using Scalar = storage_t<ScalarOrPrecision>;

 public:
  using execution_space = ExecSpace;
  using scalar_type = Scalar;
  using precision_type = precision_of_t<ScalarOrPrecision>;
  using route_type = routing_t<Scalar>;
  static constexpr ProbabilityKind probability_kind = ProbabilityKind::none;

  explicit HashRouter(const HashConfig& config) : config_(config) {
    detail::validate_router_shape("kmoe::HashRouter", config.hidden, config.experts);
  }

  int num_experts() const { return config_.experts; }
  int hidden_size() const { return config_.hidden; }
  int slots_per_token() const { return 1; }

  /// The expert a token id is sent to.
  KOKKOS_INLINE_FUNCTION static int expert_of(std::int64_t token_id, std::uint64_t seed,
                                              int experts) {
    return int(detail::splitmix64(std::uint64_t(token_id) ^ seed) % std::uint64_t(experts));
  }

  void forward(const ConstMatrix<Scalar, ExecSpace>& x, RoutingPlan<ExecSpace, Scalar>& plan,
               const RouteContext<ExecSpace>& context) {
    const int tokens = int(x.extent(0)), experts = config_.experts;
    require(context.token_ids.extent(0) == std::size_t(tokens), "kmoe::HashRouter::forward",
            "token_ids.extent(0)", context.token_ids.extent(0),
            "hash routing needs one token id per row of x");
    plan.resize(tokens, 0, 1, false);
    const auto ids = context.token_ids;
    const auto expert = plan.expert;
    const auto weight = plan.weight;
    const std::uint64_t seed = config_.seed;
    Kokkos::parallel_for(
        "kmoe::HashRouter::forward", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          expert(t, 0) = expert_of(ids(t), seed, experts);
          weight(t, 0) = 1;
        });
  }

  void backward(const ConstMatrix<Scalar, ExecSpace>&, const RoutingPlan<ExecSpace, Scalar>&,
                const ConstMatrix<route_type, ExecSpace>&, const Matrix<route_type, ExecSpace>&,
                const Matrix<Scalar, ExecSpace>&) const {}

  /// The settings every rank must share (MoELayer's configuration check).
  void fingerprint(Fingerprint& f) const { f.integer("seed", std::int64_t(config_.seed)); }

  void collect_parameters(ParameterList<ExecSpace, Scalar>&) const {}

 private:
  HashConfig config_;
};

// The shipped policy meets its role (kmoe/router.hpp) wherever it is included.
static_assert(check_valid_router<HashRouter<Kokkos::DefaultHostExecutionSpace, float>>());

}  // namespace kmoe
