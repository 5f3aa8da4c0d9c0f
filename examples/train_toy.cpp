// SPDX-License-Identifier: BSD-3-Clause
// Trains a small MoE (8 SwiGLU experts, DeepSeek-style sigmoid top-2 router with the
// aux-loss-free bias update, Switch aux loss) on a task with a known answer: inputs come
// from 8 clusters and each cluster maps through its own random linear map. Prints loss, aux
// loss and per-expert load; exits 1 unless the loss fell by --min-drop and the final
// max/mean load is under 1.3. With --stats-jsonl, writes one monitoring line per step
// (kmoe::StatsLog; tools/plot_routing.py draws it).
//
// --dtype bf16 / fp16 stores the layer's weights and activations in 16 bits and trains
// fp32 master weights (kmoe::MasterWeights), fp16 with dynamic loss scaling
// (kmoe::DynamicLossScaler); --match-f32 R then also trains the fp32 layer from the same
// start and exits 1 unless the two final losses differ by at most R relative to fp32's.
//
//   train_toy [--steps N] [--print-every N] [--min-drop R] [--stats-jsonl FILE]
//             [--dtype f32|bf16|fp16] [--match-f32 R]
#include <kmoe/kmoe.hpp>
#include <kmoe/mixed_precision.hpp>
#include <kmoe/monitoring/stats_log.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
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

// train() holds extended (KOKKOS_LAMBDA) lambdas: nvcc wants their enclosing function
// outside an unnamed namespace.
namespace toy {

struct Outcome {
  double first_loss = 0, loss = 0, imbalance = 0;
};

/// Trains the toy layer stored in Storage; 16-bit storage trains fp32 masters.
template <class Storage>
Outcome train(int steps, int print_every, const char* stats_path) {
  using X = Kokkos::DefaultExecutionSpace;
  using S = Storage;
  using F = float;  // the task's data and the loss are computed in float
  using Router = kmoe::SigmoidBiasRouter<X, S>;
  using Experts = kmoe::SwiGLUExperts<X, S>;
  constexpr bool half = kmoe::is_packed_float_v<S>;

  const int hidden = 16, ffn = 32, experts = 8, clusters = 8, batch = 256;

  kmoe::LayerOptions options;
  options.losses.switch_aux = 1e-2;
  options.time_phases = stats_path != nullptr;
  std::optional<kmoe::StatsLog> stats_log;
  if (stats_path) stats_log.emplace(stats_path, kmoe::StatsLogContext{0, hidden, sizeof(S)});
  kmoe::ExpertLoadWindow load_window(experts, 50);
  kmoe::MoELayer<Router, Experts> layer(Router({hidden, experts, 2, true, 1.0, {}}),
                                        Experts({experts, hidden, ffn}), options);
  // The same start for every storage: each sample is rounded to float, then (16-bit
  // storage) once more to S.
  kmoe::fill_normal(layer.parameters(), 0.2, 1);
  // fp32 masters for 16-bit storage; a float layer is its own master.
  // (A float run names a 16-bit type here only to have a type; it never constructs one.)
  std::optional<kmoe::MasterWeights<X, std::conditional_t<half, S, kmoe::bfloat16>>> masters;
  kmoe::ParameterList<X, F> trained;
  if constexpr (half) {
    masters.emplace(layer.parameters());
    trained = masters->parameters();
  } else {
    trained = layer.parameters();
  }
  kmoe::AdamW<X, F> optimizer(trained, {3e-3, 0.9, 0.999, 1e-8, 0.0});
  // fp16's range needs loss scaling; bf16 has float's range and needs none.
  const bool scaled = std::is_same_v<S, kmoe::float16>;
  kmoe::DynamicLossScaler scaler({65536.0, 2.0, 0.5, 100});

  // The task: cluster centres c_i and maps A_i; x = c_i + 0.1 noise, target = A_i x.
  kmoe::Matrix<F, Kokkos::DefaultHostExecutionSpace> centres("centres", clusters, hidden);
  kmoe::Tensor3<F, Kokkos::DefaultHostExecutionSpace> maps("maps", clusters, hidden, hidden);
  kmoe::fill_normal(centres, 1.0, 2);
  kmoe::fill_normal(maps, 0.4, 3);
  auto x_host = Kokkos::View<S**, Kokkos::LayoutRight, Kokkos::HostSpace>("x", batch, hidden);
  auto target_host =
      Kokkos::View<F**, Kokkos::LayoutRight, Kokkos::HostSpace>("target", batch, hidden);
  kmoe::Matrix<S, X> x("x", batch, hidden), y("y", batch, hidden), grad_y("grad_y", batch, hidden),
      grad_x("grad_x", batch, hidden);
  kmoe::Matrix<F, Kokkos::DefaultHostExecutionSpace> noise("noise", batch, hidden);

  double first_loss = 0, loss = 0, imbalance = 0;
  for (int step = 0; step < steps; ++step) {
    kmoe::fill_normal(noise, 0.1, 100 + step);
    for (int t = 0; t < batch; ++t) {
      const int c = (t * 7 + step) % clusters;
      for (int h = 0; h < hidden; ++h) x_host(t, h) = S(centres(c, h) + noise(t, h));
      for (int o = 0; o < hidden; ++o) {
        F s = 0;
        for (int h = 0; h < hidden; ++h) s += maps(c, o, h) * F(x_host(t, h));
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
        const double d = double(F(y_host(t, h))) - target_host(t, h);
        loss += d * d / (batch * hidden);
        grad_host(t, h) = S(F((scaled ? scaler.scale() : 1.0) * 2 * d / (batch * hidden)));
      }
    Kokkos::deep_copy(grad_y, grad_host);
    layer.zero_gradients();
    if (scaled) layer.set_loss_scale(scaler.scale());
    layer.backward(grad_y, grad_x);
    const bool take_step = !scaled || scaler.unscale(trained, layer.groups().world);
    if (take_step) {
      kmoe::clip_grad_norm(trained, 1.0);
      optimizer.step();
      if constexpr (half) masters->publish();
    }
    layer.apply_bias_update(1e-3);
    if (step == 0) first_loss = loss;
    imbalance = stats.imbalance();
    if (step % print_every == 0 || step == steps - 1) {
      std::printf("step %4d  loss %.5f  aux %.5f  load", step, loss, stats.losses.switch_aux);
      for (auto c : stats.tokens_per_expert) std::printf(" %3lld", static_cast<long long>(c));
      std::printf("  max/mean %.3f\n", imbalance);
    }
  }
  if (scaled)
    std::printf("loss scale %.0f, %lld steps skipped for overflow\n", scaler.scale(),
                scaler.skipped_steps());
  return {first_loss, loss, imbalance};
}
}  // namespace toy

int main(int argc, char** argv) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  const int steps = int(parse(argc, argv, "--steps", 600));
  const int print_every = int(parse(argc, argv, "--print-every", 100));
  const double min_drop = parse(argc, argv, "--min-drop", 10.0);
  const double match = parse(argc, argv, "--match-f32", -1.0);
  const char* stats_path = parse_text(argc, argv, "--stats-jsonl");
  const char* dtype_text = parse_text(argc, argv, "--dtype");
  const std::string dtype = dtype_text ? dtype_text : "f32";
  toy::Outcome run;
  if (dtype == "f32") {
    run = toy::train<float>(steps, print_every, stats_path);
  } else if (dtype == "bf16") {
    run = toy::train<kmoe::bfloat16>(steps, print_every, stats_path);
  } else if (dtype == "fp16") {
    run = toy::train<kmoe::float16>(steps, print_every, stats_path);
  } else {
    std::fprintf(stderr, "train_toy: --dtype = %s: must be f32, bf16 or fp16\n", dtype.c_str());
    return 1;
  }
  const double drop = run.first_loss / run.loss;
  std::printf("%s: loss fell %.1fx (%.5f -> %.5f); final max/mean load %.3f\n", dtype.c_str(), drop,
              run.first_loss, run.loss, run.imbalance);
  bool matched = true;
  if (match >= 0 && dtype != "f32") {
    const toy::Outcome reference = toy::train<float>(steps, print_every, nullptr);
    const double difference = std::abs(run.loss - reference.loss) / reference.loss;
    std::printf("f32: final loss %.5f; %s's differs by %.2f%% (allowed %.2f%%)\n", reference.loss,
                dtype.c_str(), 100 * difference, 100 * match);
    matched = difference <= match;
  }
  return drop >= min_drop && run.imbalance < 1.3 && matched ? 0 : 1;
}
