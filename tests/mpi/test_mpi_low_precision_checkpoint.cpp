// SPDX-License-Identifier: BSD-3-Clause
// Mixed-precision training checkpoints its fp32 masters: a bf16 expert-parallel layer trained
// with MasterWeights and AdamW, saved through LayerWithMasters after 2 of 4 steps and
// restored into a fresh layer, holds the saved masters bit for bit (values no bf16 can
// hold: the checkpoint kept fp32) and continues bitwise equal to the uninterrupted run.
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/init.hpp>
#include <kmoe/io/checkpoint.hpp>
#include <kmoe/kmoe.hpp>
#include <kmoe/mixed_precision.hpp>

#include <catch2/catch_test_macros.hpp>

#include <filesystem>
#include <string>
#include <vector>

using namespace kmoe;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using Router = SoftmaxTopKRouter<X, bfloat16>;
using Experts = SwiGLUExperts<X, bfloat16>;
using Layer = MoELayer<Router, Experts, WeightedSumCombiner<X, bfloat16>, MpiCommunicator>;
constexpr int hidden = 8, ffn = 12, experts = 4, tokens = 9;

struct Trainer {
  Layer layer;
  MasterWeights<X, bfloat16> masters;
  AdamW<X, float> optimizer;

  Trainer(const ParallelGroups<MpiCommunicator>& groups, std::uint64_t seed)
      : layer(Router({hidden, experts, 2, true}),
              Experts({experts / groups.ep.size(), hidden, ffn}), LayerOptions{}, std::nullopt,
              groups),
        masters(layer.parameters()),
        optimizer(masters.parameters(), {1e-2, 0.9, 0.999, 1e-8, 0.01}) {
    fill_normal(layer.parameters(), 0.3, seed);
    masters.pull();
  }

  void step(int s, int rank) {
    Matrix<bfloat16, X> x("x", tokens, hidden), y("y", tokens, hidden), g("g", tokens, hidden),
        gx("gx", tokens, hidden);
    fill_normal(x, 1.0, 100 + 10 * s + rank);
    fill_normal(g, 0.1, 200 + 10 * s + rank);
    RouteContext<X> context;
    context.training = true;
    layer.zero_gradients();
    layer.forward(x, y, context);
    layer.backward(g, gx);
    layer.synchronize_gradients();
    optimizer.step();
    masters.publish();
  }

  std::vector<float> master_values() const {
    std::vector<float> all;
    for (const auto& p : masters.parameters())
      for (std::size_t i = 0; i < p.value.size(); ++i) all.push_back(p.value(i));
    return all;
  }
};

}  // namespace

TEST_CASE("mixed-precision training checkpoints and restores its fp32 masters",
          "[mpi][precision][checkpoint]") {
  const MpiCommunicator world = MpiCommunicator::world();
  ParallelLayout layout;
  layout.ep = world.size() <= experts ? world.size() : 1;
  layout.dp = world.size() / layout.ep;
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  const std::string directory =
      (std::filesystem::temp_directory_path() / "kmoe_test_low_precision_checkpoint").string();

  Trainer run(groups, 5);
  run.step(0, world.rank());
  run.step(1, world.rank());
  {
    LayerWithMasters<Layer> view(run.layer, run.masters);
    io::save_checkpoint(directory, view, run.optimizer, {2, {}});
  }
  const std::vector<float> saved = run.master_values();
  // After two AdamW steps the masters are not all bf16 values: a bf16 save would lose them.
  bool finer_than_bf16 = false;
  for (float v : saved) finer_than_bf16 = finer_than_bf16 || float(bfloat16(v)) != v;
  CHECK(finer_than_bf16);
  run.step(2, world.rank());
  run.step(3, world.rank());

  Trainer restored(groups, 99);
  {
    LayerWithMasters<Layer> view(restored.layer, restored.masters);
    const auto progress = io::load_checkpoint(directory, view, restored.optimizer);
    CHECK(progress.step == 2);
  }
  restored.masters.publish();
  CHECK(restored.master_values() == saved);
  CHECK(restored.optimizer.steps() == 2);
  restored.step(2, world.rank());
  restored.step(3, world.rank());
  CHECK(restored.master_values() == run.master_values());
  MPI_Barrier(MPI_COMM_WORLD);
  if (world.rank() == 0) std::filesystem::remove_all(directory);
}
