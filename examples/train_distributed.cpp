// SPDX-License-Identifier: BSD-3-Clause
// Distributed training with checkpoints and restart on another layout. Trains 4 SwiGLU
// experts (sigmoid top-2 router with the aux-loss-free bias update, Switch aux loss) on the
// clustered linear task of train_toy over MPI, on the TP x EP x DP layout given on the
// command line, with AdamW, linear warmup + cosine decay, the global gradient clip and
// initialisation keyed by global identity. The global batch of a step is generated from the
// step number alone and each token group takes its rows of it, so the run is the same
// computation on any layout: a run saved on 4 ranks continues on 2.
//
//   mpiexec -n N train_distributed [--ep E] [--dp D] [--tp T] [--steps S] [--warmup W]
//       [--tokens T] [--zero 0|1|2] [--checkpoint-dir DIR [--checkpoint-every K] [--resume]]
//       [--kill-at-step K]
//
// --zero 1 or 2 shards AdamW's state over the data-parallel groups (ZeRO-1/2,
// kmoe::ShardedOptimizer); checkpoints have the same form either way, so a run saved with
// one setting resumes with another.
// EP defaults to N / (TP x DP). --resume continues from the newest complete checkpoint
// under DIR (from step 0 if there is none). --kill-at-step K makes the last rank die with
// std::_Exit right after the forward of step K, as a crashing node would: no checkpoint of
// that step, no MPI_Finalize, the job ends with a nonzero status.
// Rank 0 prints `step <n> loss <loss>` per step (global mean squared error, 9 significant
// digits) and one line per checkpoint saved or resumed.
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/io/checkpoint.hpp>
#include <kmoe/kmoe.hpp>
#include <kmoe/sharded_optimizer.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <map>
#include <string>

namespace {

using X = Kokkos::DefaultHostExecutionSpace;  // MpiCommunicator moves host memory
using S = double;  // the restart on another layout sums in another order: keep that at 1e-16
using Router = kmoe::SigmoidBiasRouter<X, S>;
using Experts = kmoe::SwiGLUExperts<X, S>;
using Layer =
    kmoe::MoELayer<Router, Experts, kmoe::WeightedSumCombiner<X, S>, kmoe::MpiCommunicator>;
using HostMatrix = Kokkos::View<S**, Kokkos::LayoutRight, Kokkos::HostSpace>;

constexpr int hidden = 16, ffn = 32, experts = 4, top_k = 2, clusters = 8;
constexpr double base_learning_rate = 3e-3, max_grad_norm = 1.0, bias_rate = 1e-3;
constexpr std::uint64_t init_seed = 1, centre_seed = 2, map_seed = 3, noise_seed = 100;
constexpr int exit_code_of_killed_rank = 3;

struct Options {
  kmoe::ParallelLayout layout;
  long long steps = 40, warmup = 5, tokens = 256;
  std::string checkpoint_dir;
  long long checkpoint_every = 0;  ///< 0: no checkpoints
  bool resume = false;
  long long kill_at_step = -1;  ///< -1: no fault injected
  long long zero = 0;           ///< 0: unsharded AdamW; 1, 2: ZeRO stage
};

/// Thrown for a bad command line; every rank parses the same arguments, so every rank
/// throws, rank 0 prints, and all exit 1 together.
struct UsageError {
  std::string message;
};

constexpr long long largest_count = 1000000000;  // keeps TP x EP x DP and T x H in range

long long parse_count(const std::string& flag, const char* text, long long minimum) {
  errno = 0;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || value < minimum || value > largest_count)
    throw UsageError{flag + " " + text + ": must be an integer in [" + std::to_string(minimum) +
                     ", " + std::to_string(largest_count) + "]"};
  return value;
}

Options parse_options(int argc, char** argv, int world_size) {
  Options o;
  long long ep = 0, dp = 1, tp = 1;  // ep 0: what the world leaves
  struct CountFlag {
    const char* name;
    long long* value;
    long long minimum;
  };
  const CountFlag count_flags[] = {{"--ep", &ep, 1},
                                   {"--dp", &dp, 1},
                                   {"--tp", &tp, 1},
                                   {"--steps", &o.steps, 1},
                                   {"--warmup", &o.warmup, 0},
                                   {"--tokens", &o.tokens, 1},
                                   {"--checkpoint-every", &o.checkpoint_every, 1},
                                   {"--kill-at-step", &o.kill_at_step, 0},
                                   {"--zero", &o.zero, 0}};
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--resume") {
      o.resume = true;
      continue;
    }
    if (flag.rfind("--kokkos-", 0) == 0) continue;  // Kokkos' own options
    const auto count = std::find_if(std::begin(count_flags), std::end(count_flags),
                                    [&](const CountFlag& f) { return flag == f.name; });
    if (count == std::end(count_flags) && flag != "--checkpoint-dir")
      throw UsageError{"unknown argument " + flag};
    if (i + 1 >= argc) throw UsageError{flag + " needs a value"};
    const char* value = argv[++i];
    if (count != std::end(count_flags))
      *count->value = parse_count(flag, value, count->minimum);
    else if (*value == '\0')
      throw UsageError{"--checkpoint-dir \"\": must name a directory"};
    else
      o.checkpoint_dir = value;
  }
  const auto layout_text = [&] {
    return "--tp " + std::to_string(tp) + " --ep " + std::to_string(ep) + " --dp " +
           std::to_string(dp);
  };
  if (ep == 0) {
    if (world_size % (tp * dp) != 0)
      throw UsageError{"--tp " + std::to_string(tp) + " --dp " + std::to_string(dp) +
                       ": TP x DP must divide the " + std::to_string(world_size) + " ranks"};
    ep = world_size / (tp * dp);
  }
  if (tp * ep * dp != world_size)
    throw UsageError{layout_text() + ": TP x EP x DP must equal the " + std::to_string(world_size) +
                     " ranks"};
  if (ep > experts)
    throw UsageError{"--ep " + std::to_string(ep) + ": at most " + std::to_string(experts) +
                     " (every EP rank needs an expert)"};
  if (ffn % tp != 0)
    throw UsageError{"--tp " + std::to_string(tp) + ": must divide F = " + std::to_string(ffn)};
  if (o.tokens % (ep * dp) != 0)
    throw UsageError{"--tokens " + std::to_string(o.tokens) + ": must be a multiple of EP x DP = " +
                     std::to_string(ep * dp) + " (equal local batches)"};
  if (o.steps <= o.warmup)
    throw UsageError{"--steps " + std::to_string(o.steps) + ": must exceed --warmup " +
                     std::to_string(o.warmup)};
  if (o.kill_at_step >= o.steps)
    throw UsageError{"--kill-at-step " + std::to_string(o.kill_at_step) +
                     ": must be below --steps " + std::to_string(o.steps)};
  if (o.zero > 2) throw UsageError{"--zero " + std::to_string(o.zero) + ": must be 0, 1 or 2"};
  if ((o.checkpoint_every > 0 || o.resume) && o.checkpoint_dir.empty())
    throw UsageError{std::string(o.resume ? "--resume" : "--checkpoint-every") +
                     " needs --checkpoint-dir"};
  o.layout.tp = int(tp);
  o.layout.ep = int(ep);
  o.layout.dp = int(dp);
  return o;
}

std::string describe(const kmoe::ParallelLayout& l) {
  return "TP" + std::to_string(l.tp) + " EP" + std::to_string(l.ep) + " DP" + std::to_string(l.dp);
}

std::string checkpoint_name(long long step) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%08lld", step);  // zero-padded: listings sort by step
  return name;
}

/// The task: inputs from `clusters` centres plus noise, each cluster mapped by its own
/// linear map. Every rank builds the same global batch of a step from the step number.
struct Task {
  HostMatrix centres{"centres", clusters, hidden};
  Kokkos::View<S***, Kokkos::LayoutRight, Kokkos::HostSpace> maps{"maps", clusters, hidden, hidden};

  Task() {
    kmoe::fill_normal(centres, 1.0, centre_seed);
    kmoe::fill_normal(maps, 0.4, map_seed);
  }

  /// Rows [first, first + x.extent(0)) of the global batch of `step` (of `global_tokens` rows).
  void batch(long long step, long long global_tokens, long long first, const HostMatrix& x,
             const HostMatrix& target) const {
    HostMatrix noise("noise", global_tokens, hidden);
    kmoe::fill_normal(noise, 0.1, noise_seed + std::uint64_t(step));
    for (long long r = 0; r < (long long)x.extent(0); ++r) {
      const long long t = first + r;
      const int c = int((t * 7 + step) % clusters);
      for (int h = 0; h < hidden; ++h) x(r, h) = centres(c, h) + noise(t, h);
      for (int o = 0; o < hidden; ++o) {
        S s = 0;
        for (int h = 0; h < hidden; ++h) s += maps(c, o, h) * x(r, h);
        target(r, o) = s;
      }
    }
  }
};

/// What a checkpoint records of its run besides the model: the layout it was saved on, and
/// the settings that the resumed run must share to be the same run.
std::map<std::string, double> run_values(const Options& o) {
  return {{"tokens", double(o.tokens)}, {"steps", double(o.steps)},  {"warmup", double(o.warmup)},
          {"tp", double(o.layout.tp)},  {"ep", double(o.layout.ep)}, {"dp", double(o.layout.dp)}};
}

/// Another global batch or schedule would make the resumed run a different run.
void check_same_run(const kmoe::io::TrainingProgress& progress, const Options& o,
                    const std::string& checkpoint) {
  const auto mine = run_values(o);
  for (const char* key : {"tokens", "steps", "warmup"}) {
    const auto saved = progress.values.find(key);
    if (saved == progress.values.end() || saved->second != mine.at(key))
      throw UsageError{"--" + std::string(key) + " " + std::to_string((long long)mine.at(key)) +
                       ": the checkpoint " + checkpoint + " was written by a run with --" + key +
                       " " +
                       (saved == progress.values.end() ? std::string("(not recorded)")
                                                       : std::to_string((long long)saved->second))};
  }
}

using Sharded = kmoe::ShardedOptimizer<kmoe::AdamW<X, S>, kmoe::MpiCommunicator>;

/// Averaged, clipped gradients for the optimizer: the layer's all-reduce and the global
/// clip, or the sharded optimizer's own (ZeRO-2: a reduce-scatter; the clip from shards).
void reduce_and_clip(Layer& layer, kmoe::AdamW<X, S>&) {
  layer.synchronize_gradients();
  kmoe::clip_grad_norm(layer, max_grad_norm);
}
void reduce_and_clip(Layer& layer, Sharded& optimizer) {
  optimizer.reduce_gradients(layer);
  optimizer.clip_grad_norm(max_grad_norm);
}

template <class Optimizer>
int train_with(const Options& o, Layer& layer, Optimizer& optimizer);

int train(const Options& o) {
  const auto world = kmoe::MpiCommunicator::world();
  const auto groups = kmoe::ParallelGroups<kmoe::MpiCommunicator>::create(world, o.layout);
  const int owned = int(o.layout.local_experts(experts, groups.ep_rank).size());

  kmoe::LayerOptions options;
  options.losses.switch_aux = 1e-2;
  // Each group of gradients starts its bucketed all-reduce inside backward as soon as it
  // exists; synchronize_gradients() then waits (one sync per backward, as here). ZeRO-2
  // reduce-scatters instead, after backward.
  options.gradient_sync.overlap = o.zero != 2;
  Layer layer(Router({hidden, experts, top_k, true, 1.0, {}}),
              Experts({owned, hidden, ffn / o.layout.tp}), options, std::nullopt, groups);
  // Keyed by each element's global identity: every layout starts from the same model.
  kmoe::InitConfig init;
  init.router_std = init.input_std = init.output_std = 0.2;
  kmoe::initialize(layer.parameters(), init, init_seed);
  const kmoe::AdamW<X, S>::Config config{base_learning_rate, 0.9, 0.999, 1e-8, 0.01};
  if (o.zero == 0) {
    kmoe::AdamW<X, S> optimizer(layer.parameters(), config);
    return train_with(o, layer, optimizer);
  }
  Sharded optimizer(layer, config, {o.zero == 1 ? kmoe::ZeroStage::one : kmoe::ZeroStage::two});
  return train_with(o, layer, optimizer);
}

template <class Optimizer>
int train_with(const Options& o, Layer& layer, Optimizer& optimizer) {
  const auto& groups = layer.groups();
  const auto& world = groups.world;
  const int rank = world.rank();
  const kmoe::WarmupCosineSchedule schedule(o.warmup, o.steps, 0.1);

  if (rank == 0)
    std::printf("train_distributed: %d ranks, %s, H=%d F=%d E=%d top-%d, %lld tokens per step, "
                "%lld steps, optimizer state %s\n",
                world.size(), describe(o.layout).c_str(), hidden, ffn, experts, top_k, o.tokens,
                o.steps,
                o.zero == 0   ? "unsharded"
                : o.zero == 1 ? "ZeRO-1"
                              : "ZeRO-2");

  long long first_step = 0;
  if (o.resume) {
    const std::string latest = kmoe::io::latest_checkpoint(o.checkpoint_dir);
    if (latest.empty()) {
      if (rank == 0)
        std::printf("resume: no complete checkpoint under %s, starting at step 0\n",
                    o.checkpoint_dir.c_str());
    } else {
      const auto progress = kmoe::io::load_checkpoint(latest, layer, optimizer);
      check_same_run(progress, o, latest);
      first_step = progress.step;
      kmoe::ParallelLayout saved;
      saved.tp = int(progress.values.at("tp"));
      saved.ep = int(progress.values.at("ep"));
      saved.dp = int(progress.values.at("dp"));
      if (rank == 0)
        std::printf("resumed from %s at step %lld (saved on %s, continuing on %s; "
                    "schedule step %lld, lr %.6g)\n",
                    latest.c_str(), first_step, describe(saved).c_str(), describe(o.layout).c_str(),
                    optimizer.steps(), base_learning_rate * schedule(optimizer.steps()));
    }
  }
  std::fflush(stdout);

  // This rank's token group takes its contiguous rows of every global batch.
  const long long token_groups = o.layout.ep * o.layout.dp;
  const long long local_tokens = o.tokens / token_groups;
  const long long first_row = (groups.ep_rank + o.layout.ep * groups.dp_rank) * local_tokens;
  const Task task;
  HostMatrix x_host("x", local_tokens, hidden), target("target", local_tokens, hidden);
  kmoe::Matrix<S, X> x("x", local_tokens, hidden), y("y", local_tokens, hidden),
      grad_y("grad_y", local_tokens, hidden), grad_x("grad_x", local_tokens, hidden);

  for (long long step = first_step; step < o.steps; ++step) {
    task.batch(step, o.tokens, first_row, x_host, target);
    Kokkos::deep_copy(x, x_host);
    kmoe::RouteContext<X> context;
    context.training = true;
    context.token_offset = first_row;
    context.step = std::uint64_t(step);
    layer.forward(x, y, context);
    if (step == o.kill_at_step && rank == world.size() - 1) {
      std::fprintf(stderr,
                   "train_distributed: rank %d dies at step %lld (--kill-at-step) after the "
                   "forward\n",
                   rank, step);
      std::_Exit(exit_code_of_killed_rank);  // no unwinding, no MPI_Finalize: a crash
    }
    // Each rank's loss is the mean over its own tokens (what synchronize_gradients()
    // averages); the printed loss is the global batch's.
    auto y_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y);
    auto grad_host = Kokkos::create_mirror_view(grad_y);
    double squared_error = 0;
    for (long long t = 0; t < local_tokens; ++t)
      for (int h = 0; h < hidden; ++h) {
        const double d = y_host(t, h) - target(t, h);
        squared_error += d * d;
        grad_host(t, h) = 2 * d / double(local_tokens * hidden);
      }
    Kokkos::deep_copy(grad_y, grad_host);
    double global_error = 0;
    MPI_Allreduce(&squared_error, &global_error, 1, MPI_DOUBLE, MPI_SUM, groups.tokens.native());

    layer.zero_gradients();
    layer.backward(grad_y, grad_x);
    reduce_and_clip(layer, optimizer);
    optimizer.set_learning_rate(base_learning_rate * schedule(optimizer.steps()));
    optimizer.step();
    layer.apply_bias_update(bias_rate);
    if (rank == 0)
      std::printf("step %lld loss %.9g\n", step, global_error / double(o.tokens * hidden));

    const long long done = step + 1;
    if (o.checkpoint_every > 0 && done % o.checkpoint_every == 0) {
      const std::string directory = o.checkpoint_dir + "/" + checkpoint_name(done);
      kmoe::io::save_checkpoint(directory, layer, optimizer, {done, run_values(o)});
      if (rank == 0) std::printf("checkpoint step %lld saved to %s\n", done, directory.c_str());
    }
    std::fflush(stdout);  // a killed job loses only the lines of the step it died in
  }
  return 0;
}

}  // namespace

int main(int argc, char* argv[]) {
  MPI_Init(&argc, &argv);
  int status = 0;
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    int rank = 0, world_size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    try {
      status = train(parse_options(argc, argv, world_size));
    } catch (const UsageError& e) {
      if (rank == 0) std::fprintf(stderr, "train_distributed: %s\n", e.message.c_str());
      status = 1;
    } catch (const std::exception& e) {
      // Not necessarily raised on every rank: end the job rather than leave peers waiting.
      std::fprintf(stderr, "train_distributed: rank %d: %s\n", rank, e.what());
      MPI_Abort(MPI_COMM_WORLD, 2);
    }
  }
  MPI_Finalize();
  return status;
}
