// SPDX-License-Identifier: BSD-3-Clause
// Trains a small MoE (8 SwiGLU experts, DeepSeek-style sigmoid top-2 router with the
// aux-loss-free bias update, Switch aux loss) on a task with a known answer: inputs come
// from 8 clusters and each cluster maps through its own random linear map. Prints loss, aux
// loss and per-expert load; exits 1 unless the loss fell by --min-drop and the final
// max/mean load is under 1.3. With --stats-jsonl, writes one monitoring line per step
// (kmoe::StatsLog; tools/plot_routing.py draws it).
//
//   train_toy [--steps N] [--print-every N] [--min-drop R] [--stats-jsonl FILE]
#include <kmoe/kmoe.hpp>
#include <kmoe/monitoring/stats_log.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace {
double parse(int argc, char** argv, const char* flag, double fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], flag) == 0) return std::atof(argv[i + 1]);
  return fallback;
}
const char* parse_text(int argc, char** argv, const char* flag) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], flag) == 0) return argv[i + 1];
  return nullptr;
}
}  // namespace

int main(int argc, char** argv) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  using X = Kokkos::DefaultExecutionSpace;
  using S = float;
  using Router = kmoe::SigmoidBiasRouter<X, S>;
  using Experts = kmoe::SwiGLUExperts<X, S>;
  const int steps = int(parse(argc, argv, "--steps", 600));
  const int print_every = int(parse(argc, argv, "--print-every", 100));
  const double min_drop = parse(argc, argv, "--min-drop", 10.0);
  const char* stats_path = parse_text(argc, argv, "--stats-jsonl");
  const int hidden = 16, ffn = 32, experts = 8, clusters = 8, batch = 256;

  kmoe::LayerOptions options;
  options.losses.switch_aux = 1e-2;
  options.time_phases = stats_path != nullptr;
  std::optional<kmoe::StatsLog> stats_log;
  if (stats_path) stats_log.emplace(stats_path, kmoe::StatsLogContext{0, hidden, sizeof(S)});
  kmoe::ExpertLoadWindow load_window(experts, 50);
  kmoe::MoELayer<Router, Experts> layer(Router({hidden, experts, 2, true, 1.0, {}}),
                                        Experts({experts, hidden, ffn}), options);
  kmoe::fill_normal(layer.parameters(), 0.2, 1);
  kmoe::AdamW<X, S> optimizer(layer.parameters(), {3e-3, 0.9, 0.999, 1e-8, 0.0});

  // The task: cluster centres c_i and maps A_i; x = c_i + 0.1 noise, target = A_i x.
  kmoe::Matrix<S, Kokkos::DefaultHostExecutionSpace> centres("centres", clusters, hidden);
  kmoe::Tensor3<S, Kokkos::DefaultHostExecutionSpace> maps("maps", clusters, hidden, hidden);
  kmoe::fill_normal(centres, 1.0, 2);
  kmoe::fill_normal(maps, 0.4, 3);
  auto x_host = Kokkos::View<S**, Kokkos::LayoutRight, Kokkos::HostSpace>("x", batch, hidden);
  auto target_host =
      Kokkos::View<S**, Kokkos::LayoutRight, Kokkos::HostSpace>("target", batch, hidden);
  kmoe::Matrix<S, X> x("x", batch, hidden), y("y", batch, hidden), grad_y("grad_y", batch, hidden),
      grad_x("grad_x", batch, hidden);
  kmoe::Matrix<S, Kokkos::DefaultHostExecutionSpace> noise("noise", batch, hidden);

  double first_loss = 0, loss = 0, imbalance = 0;
  for (int step = 0; step < steps; ++step) {
    kmoe::fill_normal(noise, 0.1, 100 + step);
    for (int t = 0; t < batch; ++t) {
      const int c = (t * 7 + step) % clusters;
      for (int h = 0; h < hidden; ++h) x_host(t, h) = centres(c, h) + noise(t, h);
      for (int o = 0; o < hidden; ++o) {
        S s = 0;
        for (int h = 0; h < hidden; ++h) s += maps(c, o, h) * x_host(t, h);
        target_host(t, o) = s;
      }
    }
    Kokkos::deep_copy(x, x_host);
    kmoe::RouteContext<X> context;
    context.training = true;
    const auto stats = layer.forward(x, y, context);
    if (stats_log) {
      load_window.record(stats.tokens_per_expert);
      stats_log->write(step, "moe", stats, &load_window);
    }
    auto y_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y);
    auto grad_host = Kokkos::create_mirror_view(grad_y);
    loss = 0;
    for (int t = 0; t < batch; ++t)
      for (int h = 0; h < hidden; ++h) {
        const double d = double(y_host(t, h)) - target_host(t, h);
        loss += d * d / (batch * hidden);
        grad_host(t, h) = S(2 * d / (batch * hidden));
      }
    Kokkos::deep_copy(grad_y, grad_host);
    layer.zero_gradients();
    layer.backward(grad_y, grad_x);
    kmoe::clip_grad_norm(layer.parameters(), 1.0);
    optimizer.step();
    layer.apply_bias_update(1e-3);
    if (step == 0) first_loss = loss;
    imbalance = stats.imbalance();
    if (step % print_every == 0 || step == steps - 1) {
      std::printf("step %4d  loss %.5f  aux %.5f  load", step, loss, stats.losses.switch_aux);
      for (auto c : stats.tokens_per_expert) std::printf(" %3lld", static_cast<long long>(c));
      std::printf("  max/mean %.3f\n", imbalance);
    }
  }
  const double drop = first_loss / loss;
  std::printf("loss fell %.1fx (%.5f -> %.5f); final max/mean load %.3f\n", drop, first_loss, loss,
              imbalance);
  return drop >= min_drop && imbalance < 1.3 ? 0 : 1;
}
