// SPDX-License-Identifier: BSD-3-Clause
// Lazy checkpoint loading (kmoe/models/hf_resident.hpp): blocks whose routed experts stay in
// the checkpoint, 25% and 50% of them resident, against the all-resident loaders bit for
// bit on the Hugging Face fixtures (per-expert, fused and transposed layouts, shared experts
// with and without an output gate); a checkpoint changed underneath, and a missing shard,
// give errors naming the file. Blocks packed expert by expert as they are read
// (models/hf_weight_only.hpp) against the float blocks packed whole.

#include <kmoe/kmoe.hpp>
#include <kmoe/models/hf.hpp>
#include <kmoe/models/hf_resident.hpp>
#include <kmoe/models/hf_weight_only.hpp>
#include <kmoe/quantized_layer.hpp>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <unistd.h>
#include <vector>

namespace fs = std::filesystem;
namespace models = kmoe::models;
using Catch::Matchers::ContainsSubstring;
using X = Kokkos::DefaultExecutionSpace;
using S = float;

namespace {

const fs::path fixtures = KMOE_FIXTURES_DIR;
constexpr int fixture_layer = 1;

kmoe::Matrix<S, X> read_input(const fs::path& file) {
  const kmoe::io::SafetensorsFile f(file.string());
  const auto& shape = f.info("hidden_states").shape;
  kmoe::Matrix<S, X> m("hidden_states", shape.at(0), shape.at(1));
  auto host = Kokkos::create_mirror_view(m);
  f.read_into(std::string("hidden_states"), host.data(), host.size());
  Kokkos::deep_copy(m, host);
  return m;
}

template <class View>
std::vector<unsigned char> bits_of(const View& v) {
  const auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  std::vector<unsigned char> bits(host.span() * sizeof(S));
  std::memcpy(bits.data(), host.data(), bits.size());
  return bits;
}

/// Feeds the fixture input one token at a time (decode) to both layers: equal outputs, and
/// the resident expert bytes never above the budget.
template <class Full, class Resident>
void check_decode(Full& full, Resident& resident, const fs::path& input, int slots) {
  const auto x = read_input(input);
  const int tokens = int(x.extent(0)), hidden = int(x.extent(1));
  kmoe::Matrix<S, X> y_full("y_full", 1, hidden), y("y", 1, hidden);
  const auto budget = std::size_t(slots) * std::size_t(resident.experts().expert_bytes());
  for (int t = 0; t < tokens; ++t) {
    CAPTURE(t, slots);
    const auto row = Kokkos::subview(x, Kokkos::make_pair(t, t + 1), Kokkos::ALL);
    full.forward(row, y_full);
    resident.forward(row, y);
    CHECK(bits_of(y) == bits_of(y_full));
    CHECK(resident.experts().resident_bytes() <= budget);
  }
  CHECK(resident.experts().slots() == slots);
  CHECK(resident.experts().residency_stats().misses > slots);
}

fs::path scratch(const std::string& name) {
  const fs::path dir =
      fs::temp_directory_path() / ("kmoe_resident_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

}  // namespace

TEST_CASE("blocks with lazily read experts equal the all-resident blocks bit for bit",
          "[models][memory]") {
  using Softmax = kmoe::SoftmaxTopKRouter<X, S>;
  using Sigmoid = kmoe::SigmoidBiasRouter<X, S>;
  using TopK = kmoe::TopKSoftmaxRouter<X, S>;
  using SwiGLU = kmoe::SwiGLUExperts<X, S>;
  for (const int slots : {2, 4}) {
    for (const char* model :
         {"mixtral/model", "hf5/mixtral/model_fused", "qwen3_moe/model", "hf5/qwen2_moe/model"}) {
      CAPTURE(model);
      const fs::path dir = fixtures / model;
      auto full = models::load_softmax_block<X, S>(dir.string(), fixture_layer);
      auto resident =
          models::load_resident_block<Softmax, SwiGLU>(dir.string(), fixture_layer, {slots, 0});
      check_decode(full, resident, dir.parent_path() / "input.safetensors", slots);
    }
  }
  {
    // DeepSeek-V3: 16 experts, top-4, a shared expert; 25% and 50% resident.
    const fs::path dir = fixtures / "deepseek_v3/model";
    for (const int slots : {4, 8}) {
      auto full = models::load_sigmoid_bias_block<X, S>(dir.string(), fixture_layer);
      auto resident =
          models::load_resident_block<Sigmoid, SwiGLU>(dir.string(), fixture_layer, {slots, 0});
      check_decode(full, resident, fixtures / "deepseek_v3/input.safetensors", slots);
    }
  }
  {
    // GPT-OSS: transposed, interleaved gate_up with biases, clamped SwiGLU, top-3 of 8; the
    // budget in bytes (4 experts' worth, 50%).
    const fs::path dir = fixtures / "hf5/gpt_oss/model";
    auto full = models::load_clamped_swiglu_block<X, S>(dir.string(), fixture_layer);
    const std::int64_t bytes = models::load_resident_block<TopK, kmoe::ClampedSwiGLUExperts<X, S>>(
                                   dir.string(), fixture_layer, {1, 0})
                                   .experts()
                                   .expert_bytes();
    auto resident = models::load_resident_block<TopK, kmoe::ClampedSwiGLUExperts<X, S>>(
        dir.string(), fixture_layer, {0, 4 * bytes + bytes / 2});
    check_decode(full, resident, fixtures / "hf5/gpt_oss/input.safetensors", 4);
  }
}

/// The packed weights of two weight-only layers, every byte (values and INT8's scales).
template <class Experts>
std::vector<unsigned char> packed_bits(const Experts& experts) {
  std::vector<unsigned char> bits;
  for (const auto* w : {&experts.w_gate(), &experts.w_up(), &experts.w_down()}) {
    const auto values = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), w->values);
    const auto* v = reinterpret_cast<const unsigned char*>(values.data());
    bits.insert(bits.end(), v, v + values.span() * sizeof(values(0, 0, 0)));
    const auto scales = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), w->scales);
    const auto* s = reinterpret_cast<const unsigned char*>(scales.data());
    bits.insert(bits.end(), s, s + scales.span() * sizeof(float));
  }
  return bits;
}

/// A block packed expert by expert from the checkpoint against the float block packed as a
/// whole (kmoe::weight_only_layer): the same packed bytes and the same outputs, bit for bit.
template <class Element, class Router, class Full>
void check_weight_only(const Full& full, const fs::path& dir) {
  auto whole = kmoe::weight_only_layer<Element>(full);
  auto streamed = models::load_weight_only_block<Element, Router>(dir.string(), fixture_layer);
  CHECK(packed_bits(streamed.experts()) == packed_bits(whole.experts()));
  REQUIRE(bool(streamed.shared_experts()) == bool(whole.shared_experts()));
  if (whole.shared_experts())
    CHECK(packed_bits(*streamed.shared_experts()) == packed_bits(*whole.shared_experts()));
  const auto x = read_input(dir.parent_path() / "input.safetensors");
  kmoe::Matrix<S, X> y_whole("y_whole", x.extent(0), x.extent(1)), y("y", x.extent(0), x.extent(1));
  whole.forward(x, y_whole);
  streamed.forward(x, y);
  CHECK(bits_of(y) == bits_of(y_whole));
}

TEST_CASE("blocks packed expert by expert from the checkpoint equal the float blocks packed "
          "whole",
          "[models][precision]") {
  using Softmax = kmoe::SoftmaxTopKRouter<X, S>;
  using Sigmoid = kmoe::SigmoidBiasRouter<X, S>;
  // Per-expert and fused layouts, a shared expert with an output gate, DeepSeek-V3's
  // sigmoid router with its shared expert.
  for (const char* model : {"mixtral/model", "hf5/mixtral/model_fused", "hf5/qwen2_moe/model"}) {
    CAPTURE(model);
    const auto full = models::load_softmax_block<X, S>((fixtures / model).string(), fixture_layer);
    check_weight_only<std::int8_t, Softmax>(full, fixtures / model);
    check_weight_only<kmoe::bfloat16, Softmax>(full, fixtures / model);
  }
  const fs::path deepseek = fixtures / "deepseek_v3/model";
  const auto full = models::load_sigmoid_bias_block<X, S>(deepseek.string(), fixture_layer);
  check_weight_only<kmoe::float16, Sigmoid>(full, deepseek);
}

TEST_CASE("a checkpoint changed underneath a lazy read is reported by name", "[models][memory]") {
  using Softmax = kmoe::SoftmaxTopKRouter<X, S>;
  using SwiGLU = kmoe::SwiGLUExperts<X, S>;
  const fs::path dir = scratch("changed");
  fs::copy(fixtures / "mixtral/model", dir);
  const fs::path file = dir / "model.safetensors";
  const auto x = read_input(fixtures / "mixtral/input.safetensors");
  const auto row = Kokkos::subview(x, Kokkos::make_pair(0, 1), Kokkos::ALL);
  kmoe::Matrix<S, X> y("y", 1, x.extent(1));

  SECTION("appended to") {
    auto layer = models::load_resident_block<Softmax, SwiGLU>(dir.string(), fixture_layer, {2, 0});
    layer.forward(row, y);
    std::ofstream(file, std::ios::app | std::ios::binary) << "tail";
    layer.experts().invalidate_resident();  // the next forward reads its experts again
    CHECK_THROWS_WITH(layer.forward(row, y),
                      ContainsSubstring(file.string()) && ContainsSubstring("size changed"));
  }
  SECTION("rewritten in place, same size") {
    auto layer = models::load_resident_block<Softmax, SwiGLU>(dir.string(), fixture_layer, {2, 0});
    layer.forward(row, y);
    fs::last_write_time(file, fs::last_write_time(file) + std::chrono::seconds(5));
    layer.experts().invalidate_resident();
    CHECK_THROWS_WITH(layer.forward(row, y),
                      ContainsSubstring(file.string()) && ContainsSubstring("modified"));
  }
  SECTION("replaced by another file") {
    auto layer = models::load_resident_block<Softmax, SwiGLU>(dir.string(), fixture_layer, {2, 0});
    layer.forward(row, y);
    fs::copy_file(file, dir / "copy.safetensors");
    fs::rename(dir / "copy.safetensors", file);
    layer.experts().invalidate_resident();
    CHECK_THROWS_WITH(layer.forward(row, y),
                      ContainsSubstring(file.string()) && ContainsSubstring("replaced"));
  }
  fs::remove_all(dir);
}

TEST_CASE("a sharded checkpoint reads its experts lazily; a missing shard is named",
          "[models][memory]") {
  using Softmax = kmoe::SoftmaxTopKRouter<X, S>;
  using SwiGLU = kmoe::SwiGLUExperts<X, S>;
  // The Mixtral fixture split into two shards: experts 4..7 of every layer in the second.
  const fs::path dir = scratch("sharded");
  fs::copy_file(fixtures / "mixtral/model/config.json", dir / "config.json");
  const kmoe::io::SafetensorsFile whole((fixtures / "mixtral/model/model.safetensors").string());
  kmoe::io::SafetensorsWriter first, second;
  nlohmann::json map;
  const std::string shard2 = "model-00002-of-00002.safetensors";
  for (const std::string& name : whole.names()) {
    const bool late = name.find("experts.4.") != std::string::npos ||
                      name.find("experts.5.") != std::string::npos ||
                      name.find("experts.6.") != std::string::npos ||
                      name.find("experts.7.") != std::string::npos;
    const auto& info = whole.info(name);
    (late ? second : first).add(name, info.dtype, info.shape, whole.read<float>(name));
    map[name] = late ? shard2 : "model-00001-of-00002.safetensors";
  }
  first.write((dir / "model-00001-of-00002.safetensors").string());
  second.write((dir / shard2).string());
  std::ofstream(dir / "model.safetensors.index.json") << nlohmann::json{{"weight_map", map}};

  auto full = models::load_softmax_block<X, S>(dir.string(), fixture_layer);
  auto resident = models::load_resident_block<Softmax, SwiGLU>(dir.string(), fixture_layer, {2, 0});
  check_decode(full, resident, fixtures / "mixtral/input.safetensors", 2);

  fs::remove(dir / shard2);
  CHECK_THROWS_WITH(
      (models::load_resident_block<Softmax, SwiGLU>(dir.string(), fixture_layer, {2, 0})),
      ContainsSubstring(shard2));
  fs::remove_all(dir);
}
