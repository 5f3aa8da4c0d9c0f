// SPDX-License-Identifier: BSD-3-Clause
// A user-written router passed to kmoe::MoELayer as a template parameter: softmax with a
// temperature, top-1 (Switch-style) with weight p_e. It reuses kmoe::LinearGate for the
// learned projection and implements the Router interface of kmoe/router.hpp itself.
#include <kmoe/kmoe.hpp>

#include <cstdio>

template <class ExecSpace, class Scalar>
class TemperatureTop1Router {
 public:
  using execution_space = ExecSpace;
  using scalar_type = Scalar;
  static constexpr kmoe::ProbabilityKind probability_kind = kmoe::ProbabilityKind::softmax;

  TemperatureTop1Router(int hidden, int experts, Scalar temperature)
      : gate_("router", hidden, experts), temperature_(temperature) {}

  int num_experts() const { return gate_.experts(); }
  int hidden_size() const { return gate_.hidden(); }
  int slots_per_token() const { return 1; }
  const kmoe::LinearGate<ExecSpace, Scalar>& gate() const { return gate_; }

  void forward(const kmoe::ConstMatrix<Scalar, ExecSpace>& x, kmoe::RoutingPlan<ExecSpace, Scalar>& plan,
               const kmoe::RouteContext<ExecSpace>&) {
    const int experts = num_experts();
    plan.resize(x.extent(0), experts, 1, /*with_logits=*/true);
    gate_.forward(x, plan.logits);
    const auto logits = plan.logits, probs = plan.probs, weight = plan.weight;
    const auto expert = plan.expert;
    const Scalar tau = temperature_;
    Kokkos::parallel_for(
        "TemperatureTop1Router::forward", Kokkos::RangePolicy<ExecSpace>(0, x.extent(0)),
        KOKKOS_LAMBDA(int t) {
          Scalar max_logit = logits(t, 0), sum = 0;
          for (int e = 1; e < experts; ++e) max_logit = logits(t, e) > max_logit ? logits(t, e) : max_logit;
          for (int e = 0; e < experts; ++e) sum += (probs(t, e) = kmoe::detail::exp((logits(t, e) - max_logit) / tau));
          int best = 0;  // strict '>' keeps the lower index on ties, as docs/semantics.md section 1 asks
          for (int e = 0; e < experts; ++e) {
            probs(t, e) /= sum;
            if (probs(t, e) > probs(t, best)) best = e;
          }
          expert(t, 0) = best;
          weight(t, 0) = probs(t, best);
        });
  }

  void backward(const kmoe::ConstMatrix<Scalar, ExecSpace>& x, const kmoe::RoutingPlan<ExecSpace, Scalar>& plan,
                const kmoe::ConstMatrix<Scalar, ExecSpace>& grad_weight,
                const kmoe::Matrix<Scalar, ExecSpace>& grad_logits,
                const kmoe::Matrix<Scalar, ExecSpace>& grad_x) const {
    const auto probs = plan.probs;
    const auto expert = plan.expert;
    const int experts = num_experts();
    const Scalar tau = temperature_;
    // w = p_best with p = softmax(l / tau): dL/dl_e = g p_best (delta_e,best - p_e) / tau.
    Kokkos::parallel_for(
        "TemperatureTop1Router::backward", Kokkos::RangePolicy<ExecSpace>(0, x.extent(0)),
        KOKKOS_LAMBDA(int t) {
          const int best = expert(t, 0);
          const Scalar g = grad_weight(t, 0) * probs(t, best) / tau;
          for (int e = 0; e < experts; ++e) grad_logits(t, e) += g * ((e == best) - probs(t, e));
        });
    gate_.backward(x, grad_logits, grad_x);
  }

  void collect_parameters(kmoe::ParameterList<ExecSpace, Scalar>& list) const {
    gate_.collect_parameters(list);
  }

 private:
  kmoe::LinearGate<ExecSpace, Scalar> gate_;
  Scalar temperature_;
};

int main(int argc, char** argv) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  using X = Kokkos::DefaultExecutionSpace;
  using Router = TemperatureTop1Router<X, double>;
  static_assert(kmoe::check_valid_router<Router>());
  using Experts = kmoe::SwiGLUExperts<X, double>;

  kmoe::MoELayer<Router, Experts> layer(Router(32, 4, 0.5), Experts({4, 32, 48}));
  kmoe::fill_normal(layer.parameters(), 0.2, 1);
  kmoe::Matrix<double, X> x("x", 64, 32), y("y", 64, 32), grad_x("grad_x", 64, 32);
  kmoe::fill_normal(x, 1.0, 2);
  kmoe::RouteContext<X> context;
  context.training = true;
  const auto stats = layer.forward(x, y, context);
  layer.backward(y, grad_x);  // gradient of 0.5 * |y|^2
  std::printf("custom router: tokens per expert");
  for (auto c : stats.tokens_per_expert) std::printf(" %lld", static_cast<long long>(c));
  std::printf(", imbalance %.3f\n", stats.imbalance());
  for (const auto& p : layer.parameters()) {
    auto g = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), p.grad);
    double norm = 0;
    for (std::size_t i = 0; i < g.size(); ++i) norm += g(i) * g(i);
    std::printf("  %-16s |grad| = %.6g\n", p.name.c_str(), std::sqrt(norm));
  }
  return 0;
}
