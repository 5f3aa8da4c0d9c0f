// SPDX-License-Identifier: BSD-3-Clause
// A user-written router passed to kmoe::MoELayer as a template parameter: softmax with a
// temperature, top-1 (Switch-style) with weight p_e. kmoe::GatedRouter holds the learned
// gate (logits = x W^T), the sizes and the parameters; this class writes the two kernels.
#include <kmoe/kmoe.hpp>

#include <cmath>
#include <cstdio>

template <class X, class S>
class TemperatureTop1Router : public kmoe::GatedRouter<X, S> {
 public:
  static constexpr kmoe::ProbabilityKind probability_kind = kmoe::ProbabilityKind::softmax;
  TemperatureTop1Router(int hidden, int experts, double tau)
      : kmoe::GatedRouter<X, S>("TemperatureTop1Router", hidden, experts, 1), tau_(tau) {}

  void forward(const kmoe::ConstMatrix<S, X>& x, kmoe::RoutingPlan<X, S>& plan,
               const kmoe::RouteContext<X>&) {
    this->gate_forward(x, plan);
    kmoe::scale_logits<X>("TemperatureTop1Router::tau", plan.logits, 1.0 / tau_);  // l / tau
    const int experts = this->num_experts();
    // A RoutingPlan is four views: the kernels capture it by value.
    Kokkos::parallel_for(
        Kokkos::RangePolicy<X>(0, x.extent(0)), KOKKOS_LAMBDA(int t) {
          kmoe::softmax_row(t, experts, plan.logits, plan.probs);
          plan.expert(t, 0) = kmoe::argmax_row(t, experts, plan.probs);  // ties: lower index
          plan.weight(t, 0) = plan.probs(t, plan.expert(t, 0));
        });
  }

  // w = p_best: the softmax backward of dL/dw on the chosen expert, then / tau for the raw
  // logits (the balance losses' share already in grad_logits is also with respect to l / tau).
  void backward(const kmoe::ConstMatrix<S, X>& x, const kmoe::RoutingPlan<X, S>& plan,
                const kmoe::ConstMatrix<S, X>& grad_weight, const kmoe::Matrix<S, X>& grad_logits,
                const kmoe::Matrix<S, X>& grad_x) const {
    Kokkos::parallel_for(
        Kokkos::RangePolicy<X>(0, x.extent(0)),
        KOKKOS_LAMBDA(int t) { kmoe::softmax_backward_chosen(t, plan, grad_weight, grad_logits); });
    kmoe::scale_logits<X>("TemperatureTop1Router::tau_backward", grad_logits, 1.0 / tau_);
    this->gate_backward(x, grad_logits, grad_x);
  }

 private:
  double tau_;
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
