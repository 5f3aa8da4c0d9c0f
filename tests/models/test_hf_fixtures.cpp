// SPDX-License-Identifier: BSD-3-Clause
// The Hugging Face adapters (kmoe/models/hf.hpp) against the reference fixtures made with
// transformers (tests/fixtures/README.md): forward output, router logits, top-k, input and
// parameter gradients under checkpoint names; and the loaders' errors on broken model dirs.

#include <kmoe/kmoe.hpp>
#include <kmoe/models/hf.hpp>

#include <algorithm>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_exception.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <unistd.h>
#include <vector>

namespace fs = std::filesystem;
namespace models = kmoe::models;
using Catch::Matchers::ContainsSubstring;
using Catch::Matchers::MessageMatches;
using X = Kokkos::DefaultExecutionSpace;

namespace {

const fs::path fixtures = KMOE_FIXTURES_DIR;
constexpr int fixture_layer = 1;

/// max |a - b| / max |b|: the fixtures' tolerance is relative to the reference's scale.
double relative_error(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return scale == 0 ? diff : diff / scale;
}

template <class View>
std::vector<double> to_vector(const View& v) {
  const auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  return std::vector<double>(host.data(), host.data() + host.size());
}

kmoe::Matrix<float, X> read_matrix(const fs::path& file) {
  const kmoe::io::SafetensorsFile f(file.string());
  const auto& shape = f.info("hidden_states").shape;
  kmoe::Matrix<float, X> m("hidden_states", shape.at(0), shape.at(1));
  auto host = Kokkos::create_mirror_view(m);
  f.read_into(std::string("hidden_states"), host.data(), host.size());
  Kokkos::deep_copy(m, host);
  return m;
}

/// Runs `layer` (loaded from `dir`/`model`) forward and backward on the fixture in `dir` and
/// compares with transformers' results; `grads_file` holds the reference gradients under the
/// names of that checkpoint's layout.
template <class Layer>
void check_against_fixture(Layer& layer, const fs::path& dir, const std::string& model = "model",
                           const std::string& grads_file = "grads.safetensors") {
  const std::string model_dir = (dir / model).string();
  const auto block =
      models::read_block(model_dir, fixture_layer, kmoe::io::ShardedCheckpoint(model_dir));
  const auto x = read_matrix(dir / "input.safetensors");
  const auto grad_y = read_matrix(dir / "grad_output.safetensors");
  const int tokens = int(x.extent(0)), hidden = int(x.extent(1));
  kmoe::Matrix<float, X> y("y", tokens, hidden), grad_x("grad_x", tokens, hidden);
  kmoe::RouteContext<X> context;
  context.training = true;
  layer.zero_gradients();
  layer.forward(x, y, context);
  layer.backward(grad_y, grad_x);

  const kmoe::io::SafetensorsFile output((dir / "output.safetensors").string());
  const kmoe::io::SafetensorsFile grads((dir / grads_file).string());
  CHECK(relative_error(to_vector(y), output.read<double>("hidden_states")) < 1e-5);
  CHECK(relative_error(to_vector(layer.routing().logits), output.read<double>("router_logits")) <
        1e-5);

  // Top-k: the same expert set per token, and the same rows once ordered as the fixture is
  // (decreasing weight, ties by index), with the same weights.
  const auto expert =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().expert);
  const auto weight =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().weight);
  const auto ref_index = output.read<std::int64_t>("topk_indices");
  const auto ref_weight = output.read<double>("topk_weights");
  const int k = int(expert.extent(1));
  REQUIRE(ref_index.size() == std::size_t(tokens) * k);
  for (int t = 0; t < tokens; ++t) {
    std::vector<std::pair<double, int>> row;
    for (int j = 0; j < k; ++j) row.push_back({weight(t, j), expert(t, j)});
    std::set<std::int64_t> mine, ref;
    for (const auto& [w, e] : row) mine.insert(e);
    for (int j = 0; j < k; ++j) ref.insert(ref_index[t * k + j]);
    CHECK(mine == ref);
    std::sort(row.begin(), row.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    for (int j = 0; j < k; ++j) {
      CHECK(row[j].second == ref_index[t * k + j]);
      CHECK(std::abs(row[j].first - ref_weight[t * k + j]) <
            1e-5 * std::abs(ref_weight[t * k + j]) + 1e-6);
    }
  }

  CHECK(relative_error(to_vector(grad_x), grads.read<double>("hidden_states")) < 1e-4);
  std::set<std::string> seen;
  models::visit_checkpoint_tensors(layer, block, true,
                                   [&](const std::string& name,
                                       const std::vector<std::int64_t>& shape, const float* data) {
                                     INFO(name);
                                     REQUIRE(grads.contains(name));
                                     CHECK(grads.info(name).shape == shape);
                                     const auto ref = grads.read<double>(name);
                                     const std::vector<double> mine(data, data + ref.size());
                                     CHECK(relative_error(mine, ref) < 1e-4);
                                     seen.insert(name);
                                   });
  // Every gradient in the reference is mapped; only the input gradient is not a parameter.
  for (const auto& name : grads.names())
    if (name != "hidden_states") CHECK(seen.count(name) == 1);
}

/// A scratch copy of a fixture's model directory: `edit` may change config.json, and the
/// checkpoint tensor named `drop` (if any) is left out.
struct BrokenCopy {
  fs::path dir;
  BrokenCopy(const std::string& family, const std::function<void(nlohmann::json&)>& edit,
             const std::string& drop = "") {
    dir = fs::temp_directory_path() / ("kmoe_hf_" + family + "_" + std::to_string(::getpid()) +
                                       "_" + std::to_string(counter()++));
    fs::remove_all(dir);
    fs::create_directories(dir);
    const fs::path source = fixtures / family / "model";
    const kmoe::io::SafetensorsFile weights((source / "model.safetensors").string());
    kmoe::io::SafetensorsWriter writer;
    for (const auto& name : weights.names()) {
      if (name == drop) continue;
      const auto& info = weights.info(name);
      writer.add(name, info.dtype, info.shape, weights.read<double>(name));
    }
    writer.write((dir / "model.safetensors").string());
    std::ifstream in(source / "config.json");
    nlohmann::json config = nlohmann::json::parse(in);
    edit(config);
    std::ofstream(dir / "config.json") << config.dump(2);
  }
  ~BrokenCopy() { fs::remove_all(dir); }
  std::string path() const { return dir.string(); }
  static int& counter() {
    static int n = 0;
    return n;
  }
};

// Float loaders without template commas, which Catch2's assertion macros would split.
void load_mixtral(const std::string& dir, int layer) { models::load_mixtral<X, float>(dir, layer); }
void load_qwen3_moe(const std::string& dir, int layer) {
  models::load_qwen3_moe<X, float>(dir, layer);
}
void load_deepseek_v3(const std::string& dir, int layer) {
  models::load_deepseek_v3<X, float>(dir, layer);
}
void load_topk_softmax_block(const std::string& dir, int layer) {
  models::load_topk_softmax_block<X, float>(dir, layer);
}
void load_clamped_swiglu_block(const std::string& dir, int layer) {
  models::load_clamped_swiglu_block<X, float>(dir, layer);
}

}  // namespace

TEST_CASE("Mixtral adapter reproduces the transformers fixture", "[models][hf][mixtral]") {
  const auto dir = (fixtures / "mixtral" / "model").string();
  CHECK(models::load_model_type(dir) == "mixtral");
  auto layer = models::load_mixtral<X, float>(dir, fixture_layer);
  check_against_fixture(layer, fixtures / "mixtral");
}

TEST_CASE("DeepSeek-V3 adapter reproduces the transformers fixture", "[models][hf][deepseek]") {
  const auto dir = (fixtures / "deepseek_v3" / "model").string();
  CHECK(models::load_model_type(dir) == "deepseek_v3");
  auto layer = models::load_deepseek_v3<X, float>(dir, fixture_layer);
  REQUIRE(layer.shared_experts().has_value());
  check_against_fixture(layer, fixtures / "deepseek_v3");
}

TEST_CASE("Qwen3-MoE adapter reproduces the transformers fixture", "[models][hf][qwen3]") {
  const auto dir = (fixtures / "qwen3_moe" / "model").string();
  CHECK(models::load_model_type(dir) == "qwen3_moe");
  auto layer = models::load_qwen3_moe<X, float>(dir, fixture_layer);
  check_against_fixture(layer, fixtures / "qwen3_moe");
}

// Fixtures made with transformers 5.x (tests/fixtures/README.md, hf5/): every family whose
// block kmoe reads, each checkpoint in both layouts transformers writes; the reference
// gradients are named per layout (grads.safetensors per expert, grads_fused.safetensors).
TEST_CASE("transformers 5.x checkpoints of every family, per-expert and fused",
          "[models][hf][hf5]") {
  struct Case {
    const char* family;
    models::BlockRouter router;
  };
  using R = models::BlockRouter;
  const Case cases[] = {{"mixtral", R::softmax_topk},
                        {"minimax", R::softmax_topk},
                        {"qwen3_moe", R::softmax_topk},
                        {"olmoe", R::softmax_topk},
                        {"flex_olmo", R::softmax_topk},
                        {"jamba", R::softmax_topk},
                        {"deepseek_v2", R::softmax_topk},
                        {"deepseek_v2_greedy", R::softmax_topk},
                        {"deepseek_v3", R::sigmoid_bias},
                        {"glm4_moe", R::sigmoid_bias},
                        {"dots1", R::sigmoid_bias},
                        {"granitemoe", R::topk_softmax},
                        {"granitemoeshared", R::topk_softmax},
                        {"qwen3_vl_moe", R::softmax_topk},
                        {"qwen2_moe", R::softmax_topk},
                        {"qwen3_next", R::softmax_topk},
                        {"dbrx", R::softmax_topk},
                        {"hunyuan_v1_moe", R::softmax_topk},
                        {"phimoe", R::sparse_mixer},
                        {"llama4_text", R::sigmoid_bias},
                        {"llama4", R::sigmoid_bias},
                        {"ernie4_5_moe", R::softmax_topk},
                        {"gpt_oss", R::topk_softmax}};
  for (const auto& c : cases) {
    const fs::path dir = fixtures / "hf5" / c.family;
    for (const bool fused : {false, true}) {
      if (fused && !fs::exists(dir / "model_fused")) continue;
      const std::string model = fused ? "model_fused" : "model";
      const std::string model_dir = (dir / model).string();
      INFO(c.family << " " << model);
      const auto block =
          models::read_block(model_dir, fixture_layer, kmoe::io::ShardedCheckpoint(model_dir));
      CHECK(std::string(c.family).rfind(block.model_type, 0) == 0);
      // model/ is each family's own naming (per expert; Granite's input_linear; Qwen3-VL-MoE's
      // transposed tensors), model_fused/ transformers 5.x's fused one.
      CHECK(block.naming == (fused ? 1u : 0u));
      REQUIRE(block.router == c.router);
      const std::string grads = fused ? "grads_fused.safetensors" : "grads.safetensors";
      if (block.expert_kind == models::BlockExperts::clamped_swiglu) {
        auto layer = models::load_clamped_swiglu_block<X, float>(model_dir, fixture_layer);
        CHECK(layer.router().gate().has_bias());
        check_against_fixture(layer, dir, model, grads);
      } else if (c.router == R::softmax_topk) {
        auto layer = models::load_softmax_block<X, float>(model_dir, fixture_layer);
        CHECK(layer.shared_experts().has_value() == (block.shared_ffn > 0));
        check_against_fixture(layer, dir, model, grads);
      } else if (c.router == R::topk_softmax) {
        auto layer = models::load_topk_softmax_block<X, float>(model_dir, fixture_layer);
        CHECK(layer.shared_experts().has_value() == (block.model_type == "granitemoeshared"));
        check_against_fixture(layer, dir, model, grads);
      } else if (c.router == R::sparse_mixer) {
        auto layer = models::load_sparse_mixer_block<X, float>(model_dir, fixture_layer);
        CHECK(layer.router().config().jitter_eps == block.jitter_eps);
        check_against_fixture(layer, dir, model, grads);
      } else {
        auto layer = models::load_sigmoid_bias_block<X, float>(model_dir, fixture_layer);
        REQUIRE(layer.shared_experts().has_value());
        check_against_fixture(layer, dir, model, grads);
      }
    }
  }
}

TEST_CASE("GLM-4-MoE's dense first layer is refused, its MoE layers read", "[models][hf][hf5]") {
  const auto dir = (fixtures / "hf5" / "glm4_moe" / "model").string();
  CHECK_THROWS_MATCHES(models::read_block_config(dir, 0), kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("dense") &&
                                      ContainsSubstring("first_k_dense_replace")));
  CHECK(models::read_block_config(dir, 2).experts == 16);
}

TEST_CASE("ERNIE-4.5-MoE: dense first layer, selection bias and norm_min in both layouts",
          "[models][hf][hf5]") {
  const fs::path dir = fixtures / "hf5" / "ernie4_5_moe";
  CHECK_THROWS_MATCHES(
      models::read_block_config((dir / "model").string(), 0), kmoe::invalid_argument,
      MessageMatches(ContainsSubstring("dense") && ContainsSubstring("moe_layer_start_index")));
  for (const char* model : {"model", "model_fused"}) {
    INFO(model);
    const std::string model_dir = (dir / model).string();
    const auto block = models::read_block(model_dir, 1);
    CHECK(block.selection_bias_name() ==
          (std::string(model) == "model"
               ? "model.layers.1.mlp.moe_statics.e_score_correction_bias"
               : "model.layers.1.mlp.gate.moe_statics.e_score_correction_bias"));
    CHECK(block.norm_min == 1e-12);
    CHECK(block.shared_ffn == 2 * block.ffn);
    auto layer = models::load_softmax_block<X, float>(model_dir, 1);
    CHECK(layer.router().config().selection_bias);
    CHECK(layer.router().config().norm_min == 1e-12);
    // The bias read is the checkpoint's (float32 there), not the zeros it starts at.
    const auto bias =
        Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.router().bias());
    const kmoe::io::SafetensorsFile file((fs::path(model_dir) / "model.safetensors").string());
    REQUIRE(file.info(block.selection_bias_name()).dtype == kmoe::io::DType::F32);
    std::vector<float> stored(bias.size());
    file.read_into(block.selection_bias_name(), stored.data(), stored.size());
    bool nonzero = false;
    for (std::size_t e = 0; e < stored.size(); ++e) {
      CHECK(bias(e) == stored[e]);
      nonzero = nonzero || stored[e] != 0;
    }
    CHECK(nonzero);
  }
}

TEST_CASE("ERNIE-4.5-MoE's layer placement and settings are read as transformers reads them",
          "[models][hf][hf5]") {
  const fs::path source = fixtures / "hf5" / "ernie4_5_moe" / "model" / "config.json";
  const fs::path dir = fs::temp_directory_path() / ("kmoe_ernie_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  // What read_block_config says of `layer` (config.json only) with `edit` applied.
  const auto read = [&](int layer, const std::function<void(nlohmann::json&)>& edit) {
    std::ifstream in(source);
    nlohmann::json config = nlohmann::json::parse(in);
    edit(config);
    std::ofstream(dir / "config.json") << config.dump(2);
    try {
      const auto b = models::read_block_config(dir.string(), layer);
      return "MoE top-" + std::to_string(b.top_k) + " of " + std::to_string(b.experts) +
             ", shared " + std::to_string(b.shared_ffn);
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
  };
  const auto set = [](const char* field, nlohmann::json value) {
    return [=](nlohmann::json& c) { c[field] = value; };
  };
  // -1 (what released configs say) is the last layer; transformers writes it resolved.
  CHECK(read(1, set("moe_layer_end_index", -1)) == "MoE top-2 of 8, shared 32");
  CHECK_THAT(read(1, set("moe_layer_end_index", 0)),
             ContainsSubstring("dense") && ContainsSubstring("\"moe_layer_end_index\" = 0"));
  CHECK_THAT(read(0, set("moe_layer_start_index", 0)), ContainsSubstring("MoE top-2"));
  CHECK_THAT(read(0, set("moe_layer_interval", 2)),
             ContainsSubstring("dense") && ContainsSubstring("\"moe_layer_interval\" = 2"));
  CHECK_THAT(read(1, set("moe_layer_interval", 2)), ContainsSubstring("MoE top-2"));
  // Absent fields take transformers' defaults: start 1, end -1, interval 1, 2 shared experts.
  CHECK(read(1, [](nlohmann::json& c) {
          for (const char* f :
               {"moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval",
                "moe_num_shared_experts", "moe_norm_min", "use_bias"})
            c.erase(f);
        }) == "MoE top-2 of 8, shared 32");
  CHECK(read(1, set("moe_num_shared_experts", 0)) == "MoE top-2 of 8, shared 0");
  // transformers' attribute aliases, and disagreement between the two names.
  CHECK(read(1, [](nlohmann::json& c) {
          c["num_experts"] = c["moe_num_experts"], c["num_experts_per_tok"] = c["moe_k"];
          c.erase("moe_num_experts"), c.erase("moe_k");
        }) == "MoE top-2 of 8, shared 32");
  CHECK_THAT(read(1, set("num_experts", 4)), ContainsSubstring("disagree"));
  CHECK_THAT(read(1, set("moe_k", 9)), ContainsSubstring("\"moe_k\" = 9 must be in [1, 8]"));
  CHECK_THAT(read(1, set("moe_norm_min", -1)),
             ContainsSubstring("\"moe_norm_min\"") && ContainsSubstring("finite number >= 0"));
  CHECK_THAT(read(1, set("use_bias", true)), ContainsSubstring("\"use_bias\" = true"));
  fs::remove_all(dir);
}

TEST_CASE("GPT-OSS: interleaved gate/up columns, biases, swiglu fields, MXFP4 refused",
          "[models][hf][hf5][gpt_oss]") {
  const std::string family = "hf5/gpt_oss";
  const auto dir = (fixtures / family / "model").string();
  const auto block = models::read_block_config(dir, 1);
  CHECK(block.expert_kind == models::BlockExperts::clamped_swiglu);
  CHECK(block.swiglu_alpha == 1.702);
  CHECK(block.swiglu_limit == 1.0);
  CHECK(block.has_router_bias());
  CHECK(block.has_expert_bias());
  const auto names = models::checkpoint_tensors(block);
  // router weight + 3 projections x 8 experts + router bias + 3 biases x 8 experts.
  REQUIRE(names.size() == 1 + 3 * 8 + 1 + 3 * 8);
  const auto find = [&](const std::string& parameter, int expert) {
    const auto it = std::find_if(names.begin(), names.end(), [&](const auto& t) {
      return t.parameter == parameter && t.expert == expert;
    });
    REQUIRE(it != names.end());
    return *it;
  };
  // Expert 2's up projection: the odd columns of gate_up_proj[2] [H = 64, 2F = 32].
  const auto up = find("experts.w_up", 2);
  CHECK(up.checkpoint == "model.layers.1.mlp.experts.gate_up_proj");
  CHECK(up.offset == 2 * 64 * 32);
  CHECK(up.first_column == 1);
  CHECK(up.column_stride == 2);
  CHECK(up.region_index(3, 5) == 5 * 32 + 1 + 3 * 2);  // w_up[2][f = 3][h = 5]
  const auto b_gate = find("experts.b_gate", 4);
  CHECK(b_gate.checkpoint == "model.layers.1.mlp.experts.gate_up_proj_bias");
  CHECK(b_gate.offset == 4 * 32);
  CHECK(b_gate.region_index(7, 0) == 14);  // b_gate[4][f = 7]: column 2f
  CHECK(find("experts.b_down", 1).checkpoint == "model.layers.1.mlp.experts.down_proj_bias");
  CHECK(find("router.bias", -1).checkpoint == "model.layers.1.mlp.router.bias");

  SECTION("swiglu_alpha and swiglu_limit default as in transformers, and are checked") {
    BrokenCopy defaults(family, [](nlohmann::json& c) {
      c.erase("swiglu_alpha");
      c.erase("swiglu_limit");
    });
    const auto b = models::read_block_config(defaults.path(), 1);
    CHECK(b.swiglu_alpha == 1.702);
    CHECK(b.swiglu_limit == 7.0);
    BrokenCopy negative(family, [](nlohmann::json& c) { c["swiglu_limit"] = -1.0; });
    CHECK_THROWS_MATCHES(models::read_block_config(negative.path(), 1), kmoe::runtime_error,
                         MessageMatches(ContainsSubstring("\"swiglu_limit\"") &&
                                        ContainsSubstring("config.json")));
  }
  SECTION("a released (MXFP4) checkpoint is refused by its quantization_config") {
    BrokenCopy quantised(family, [](nlohmann::json& c) {
      c["quantization_config"] = {{"quant_method", "mxfp4"}};
    });
    CHECK_THROWS_MATCHES(models::read_block_config(quantised.path(), 1), kmoe::runtime_error,
                         MessageMatches(ContainsSubstring("\"quantization_config\"") &&
                                        ContainsSubstring("mxfp4") &&
                                        ContainsSubstring("dequantise")));
  }
  SECTION("the SwiGLU loaders send it to load_clamped_swiglu_block") {
    CHECK_THROWS_MATCHES(load_topk_softmax_block(dir, 1), kmoe::invalid_argument,
                         MessageMatches(ContainsSubstring("load_clamped_swiglu_block")));
  }
  SECTION("a missing expert bias is named") {
    BrokenCopy dropped(
        family, [](nlohmann::json&) {}, "model.layers.1.mlp.experts.down_proj_bias");
    CHECK_THROWS_MATCHES(load_clamped_swiglu_block(dropped.path(), 1), kmoe::runtime_error,
                         MessageMatches(ContainsSubstring("experts.down_proj_bias")));
  }
}

TEST_CASE("Checkpoint names cover every parameter slice", "[models][hf]") {
  const auto block = models::read_block_config((fixtures / "deepseek_v3" / "model").string(), 1);
  const auto names = models::checkpoint_tensors(block);
  // gate + 3 projections x 16 experts + 3 shared projections.
  REQUIRE(names.size() == 1 + 3 * 16 + 3);
  CHECK(names[0].parameter == "router.weight");
  CHECK(names[0].checkpoint == "model.layers.1.mlp.gate.weight");
  const auto it = std::find_if(names.begin(), names.end(), [](const auto& t) {
    return t.parameter == "experts.w_down" && t.expert == 5;
  });
  REQUIRE(it != names.end());
  CHECK(it->checkpoint == "model.layers.1.mlp.experts.5.down_proj.weight");
  CHECK(names.back().checkpoint == "model.layers.1.mlp.shared_experts.down_proj.weight");
}

TEST_CASE("Loaders reject broken model directories with clear messages", "[models][hf][errors]") {
  SECTION("unknown model_type") {
    BrokenCopy copy("mixtral", [](nlohmann::json& c) { c["model_type"] = "llama"; });
    CHECK_THROWS_MATCHES(models::read_block_config(copy.path(), 1), kmoe::runtime_error,
                         MessageMatches(ContainsSubstring("\"model_type\" = \"llama\"") &&
                                        ContainsSubstring("config.json")));
  }
  SECTION("Qwen3-MoE expert count under transformers 5.x's key") {
    BrokenCopy renamed("qwen3_moe", [](nlohmann::json& c) {
      c["num_local_experts"] = c["num_experts"];
      c.erase("num_experts");
    });
    CHECK(models::read_block_config(renamed.path(), 1).experts == 8);
    BrokenCopy disagree("qwen3_moe", [](nlohmann::json& c) { c["num_local_experts"] = 4; });
    CHECK_THROWS_MATCHES(models::read_block_config(disagree.path(), 1), kmoe::runtime_error,
                         MessageMatches(ContainsSubstring("\"num_experts\" = 8") &&
                                        ContainsSubstring("\"num_local_experts\" = 4") &&
                                        ContainsSubstring("disagree")));
    BrokenCopy neither("qwen3_moe", [](nlohmann::json& c) { c.erase("num_experts"); });
    CHECK_THROWS_MATCHES(
        models::read_block_config(neither.path(), 1), kmoe::runtime_error,
        MessageMatches(
            ContainsSubstring("missing field \"num_experts\" or \"num_local_experts\"") &&
            ContainsSubstring("config.json")));
  }
  SECTION("an unknown model_type names the supported ones") {
    BrokenCopy copy("qwen3_moe", [](nlohmann::json& c) { c["model_type"] = "qwen3_omni_moe"; });
    CHECK_THROWS_MATCHES(models::read_block_config(copy.path(), 1), kmoe::runtime_error,
                         MessageMatches(ContainsSubstring("\"model_type\" = \"qwen3_omni_moe\"") &&
                                        ContainsSubstring("gpt_oss") &&
                                        ContainsSubstring("phimoe")));
  }
  SECTION("missing config field") {
    BrokenCopy copy("mixtral", [](nlohmann::json& c) { c.erase("num_experts_per_tok"); });
    CHECK_THROWS_MATCHES(
        load_mixtral(copy.path(), 1), kmoe::runtime_error,
        MessageMatches(ContainsSubstring("missing field \"num_experts_per_tok\"") &&
                       ContainsSubstring(copy.path())));
  }
  SECTION("mistyped config field") {
    BrokenCopy copy("qwen3_moe", [](nlohmann::json& c) { c["norm_topk_prob"] = "yes"; });
    CHECK_THROWS_MATCHES(load_qwen3_moe(copy.path(), 1), kmoe::runtime_error,
                         MessageMatches(ContainsSubstring("\"norm_topk_prob\"") &&
                                        ContainsSubstring("true or false")));
  }
  SECTION("hidden_act other than silu") {
    BrokenCopy copy("qwen3_moe", [](nlohmann::json& c) { c["hidden_act"] = "gelu"; });
    CHECK_THROWS_MATCHES(load_qwen3_moe(copy.path(), 1), kmoe::runtime_error,
                         MessageMatches(ContainsSubstring("\"hidden_act\" = \"gelu\"") &&
                                        ContainsSubstring("silu")));
  }
  SECTION("DeepSeek-V3 dense layer") {
    BrokenCopy copy("deepseek_v3", [](nlohmann::json& c) { c["first_k_dense_replace"] = 1; });
    CHECK_THROWS_MATCHES(load_deepseek_v3(copy.path(), 0), kmoe::invalid_argument,
                         MessageMatches(ContainsSubstring("invalid layer = 0") &&
                                        ContainsSubstring("dense") &&
                                        ContainsSubstring("first_k_dense_replace")));
    // Layer 1 is still an MoE block.
    CHECK_NOTHROW(load_deepseek_v3(copy.path(), 1));
  }
  SECTION("DeepSeek-V3 selection bias missing") {
    const std::string name = "model.layers.1.mlp.gate.e_score_correction_bias";
    BrokenCopy copy(
        "deepseek_v3", [](nlohmann::json&) {}, name);
    CHECK_THROWS_MATCHES(load_deepseek_v3(copy.path(), 1), kmoe::runtime_error,
                         MessageMatches(ContainsSubstring("no tensor \"" + name + "\"")));
  }
  SECTION("DeepSeek-V3 scoring other than sigmoid") {
    BrokenCopy copy("deepseek_v3", [](nlohmann::json& c) { c["scoring_func"] = "softmax"; });
    CHECK_THROWS_MATCHES(load_deepseek_v3(copy.path(), 1), kmoe::runtime_error,
                         MessageMatches(ContainsSubstring("\"scoring_func\" = \"softmax\"")));
  }
  SECTION("layer out of range") {
    CHECK_THROWS_MATCHES(load_mixtral((fixtures / "mixtral" / "model").string(), 2),
                         kmoe::invalid_argument,
                         MessageMatches(ContainsSubstring("invalid layer = 2") &&
                                        ContainsSubstring("num_hidden_layers")));
  }
  SECTION("loader of another family") {
    CHECK_THROWS_MATCHES(load_qwen3_moe((fixtures / "mixtral" / "model").string(), 1),
                         kmoe::invalid_argument,
                         MessageMatches(ContainsSubstring("model_type \"mixtral\"")));
  }
  SECTION("missing tensor") {
    const std::string name = "model.layers.1.block_sparse_moe.experts.5.w3.weight";
    BrokenCopy copy(
        "mixtral", [](nlohmann::json&) {}, name);
    CHECK_THROWS_MATCHES(load_mixtral(copy.path(), 1), kmoe::runtime_error,
                         MessageMatches(ContainsSubstring("no tensor \"" + name + "\"") &&
                                        ContainsSubstring(copy.path())));
  }
  SECTION("tensor shape disagrees with config.json") {
    BrokenCopy copy("qwen3_moe", [](nlohmann::json& c) { c["moe_intermediate_size"] = 40; });
    CHECK_THROWS_MATCHES(load_qwen3_moe(copy.path(), 1), kmoe::runtime_error,
                         MessageMatches(ContainsSubstring("has shape [48, 64]") &&
                                        ContainsSubstring("[40, 64]")));
  }
}

TEST_CASE("Llama 4: MoE layers by moe_layers or the interleave step, weights on the inputs",
          "[models][hf][hf5][llama4]") {
  const auto dir = (fixtures / "hf5" / "llama4_text" / "model").string();
  CHECK_THROWS_MATCHES(models::read_block_config(dir, 0), kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("dense") &&
                                      ContainsSubstring("not listed in \"moe_layers\"")));
  const auto block = models::read_block_config(dir, 1);
  CHECK(block.weight_on_input);
  CHECK(block.router == models::BlockRouter::sigmoid_bias);
  CHECK(!block.normalize);
  CHECK_FALSE(block.has_selection_bias());
  CHECK(!models::read_block_config((fixtures / "hf5" / "deepseek_v3" / "model").string(), 1)
             .weight_on_input);
  // The family decides where the weights go, whatever the options say.
  kmoe::LayerOptions options;
  options.routing_weight = kmoe::RoutingWeightPlacement::output;
  auto layer = models::load_sigmoid_bias_block<X, float>(dir, 1, options);
  CHECK(layer.options().routing_weight == kmoe::RoutingWeightPlacement::input);

  BrokenCopy stepped("hf5/llama4_text", [](nlohmann::json& c) {
    c.erase("moe_layers");
    c["interleave_moe_layer_step"] = 2;
  });
  CHECK(models::read_block_config(stepped.path(), 1).experts == 8);
  CHECK_THROWS_MATCHES(models::read_block_config(stepped.path(), 0), kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("\"interleave_moe_layer_step\" = 2")));
  BrokenCopy every("hf5/llama4_text", [](nlohmann::json& c) {
    c.erase("moe_layers");
    c.erase("interleave_moe_layer_step");
  });
  CHECK(models::read_block_config(every.path(), 0).experts == 8);

  BrokenCopy multimodal("hf5/llama4",
                        [](nlohmann::json& c) { c["text_config"].erase("num_local_experts"); });
  CHECK_THROWS_MATCHES(
      models::read_block_config(multimodal.path(), 1), kmoe::runtime_error,
      MessageMatches(ContainsSubstring("missing field \"text_config.num_local_experts\"")));
}

namespace {

/// The block of `model_dir` loaded in 16 bits (`Half`: kmoe::bfloat16 or kmoe::float16) by
/// load_inference_block holds, parameter by parameter, the float loader's values rounded
/// once to nearest even by io/float16.hpp (for a BF16 checkpoint into bf16: the file's own
/// bits, the float values being exactly the file's); the selection bias stays float, equal;
/// the experts hold no gradient buffers.
template <class Half, template <class, class> class Router>
void check_sixteen_bit_load(const std::string& model_dir, bool file_bits) {
  auto half = models::load_inference_block<Router<X, Half>>(model_dir, fixture_layer);
  auto full = models::load_inference_block<Router<X, float>>(model_dir, fixture_layer);
  const auto half_params = half.parameters();
  const auto full_params = full.parameters();
  REQUIRE(half_params.size() == full_params.size());
  for (std::size_t i = 0; i < half_params.size(); ++i) {
    const auto& p = half_params[i];
    INFO(p.name);
    REQUIRE(p.name == full_params[i].name);
    const auto got = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), p.value);
    const auto want =
        Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), full_params[i].value);
    REQUIRE(got.size() == want.size());
    std::size_t wrong = 0, inexact = 0;
    for (std::size_t j = 0; j < got.size(); ++j) {
      const std::uint16_t reference = std::is_same_v<Half, kmoe::bfloat16>
                                          ? kmoe::io::to_bfloat16_bits(want(j))
                                          : kmoe::io::to_half_bits(want(j));
      wrong += got(j).bits() != reference;
      inexact += float(got(j)) != want(j);
    }
    CHECK(wrong == 0);
    if (file_bits) CHECK(inexact == 0);
    // The router's gradient (E x H) and a shared expert's output gate's (H; experts/glu.hpp
    // keeps it whatever ExpertShape::gradients says) are small; the experts' are absent.
    if (p.name.rfind("router", 0) != 0 && p.name != "shared.w_output_gate")
      CHECK(p.grad.size() == 0);
  }
  if constexpr (kmoe::detail::is_detected_v<models::detail::selection_bias_of, Router<X, Half>>) {
    const auto got = to_vector(half.router().bias());
    CHECK(got == to_vector(full.router().bias()));
    static_assert(
        std::is_same_v<typename std::decay_t<decltype(half.router().bias())>::value_type, float>);
  }
}

}  // namespace

TEST_CASE("BF16 checkpoints load into bf16 and fp16 layers without a float copy",
          "[models][hf][hf5][low_precision]") {
  for (const char* model : {"model", "model_fused"}) {
    INFO(model);
    for (const char* family : {"mixtral", "qwen3_moe", "qwen2_moe"}) {
      INFO(family);
      const std::string dir = (fixtures / "hf5" / family / model).string();
      check_sixteen_bit_load<kmoe::bfloat16, kmoe::SoftmaxTopKRouter>(dir, true);
      check_sixteen_bit_load<kmoe::float16, kmoe::SoftmaxTopKRouter>(dir, false);
    }
    const std::string deepseek = (fixtures / "hf5" / "deepseek_v3" / model).string();
    check_sixteen_bit_load<kmoe::bfloat16, kmoe::SigmoidBiasRouter>(deepseek, true);
    check_sixteen_bit_load<kmoe::float16, kmoe::SigmoidBiasRouter>(deepseek, false);
    const std::string granite = (fixtures / "hf5" / "granitemoeshared" / model).string();
    check_sixteen_bit_load<kmoe::bfloat16, kmoe::TopKSoftmaxRouter>(granite, true);
    const std::string phi = (fixtures / "hf5" / "phimoe" / model).string();
    check_sixteen_bit_load<kmoe::bfloat16, kmoe::SparseMixerRouter>(phi, true);
  }
  // The named loaders build the same 16-bit block with fp32 gradient buffers, for training.
  const std::string mixtral = (fixtures / "hf5" / "mixtral" / "model").string();
  auto trainable = models::load_mixtral<X, kmoe::bfloat16>(mixtral, fixture_layer);
  auto inference = models::load_inference_block<kmoe::SoftmaxTopKRouter<X, kmoe::bfloat16>>(
      mixtral, fixture_layer);
  const auto trainable_params = trainable.parameters();
  const auto inference_params = inference.parameters();
  REQUIRE(trainable_params.size() == inference_params.size());
  for (std::size_t i = 0; i < trainable_params.size(); ++i) {
    INFO(trainable_params[i].name);
    const auto a =
        Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), trainable_params[i].value);
    const auto b =
        Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), inference_params[i].value);
    std::size_t differ = 0;
    for (std::size_t j = 0; j < a.size(); ++j) differ += a(j).bits() != b(j).bits();
    CHECK(differ == 0);
    CHECK(trainable_params[i].grad.size() == a.size());
  }
  // The block's router must be the one asked for.
  CHECK_THROWS_MATCHES((models::load_inference_block<kmoe::SigmoidBiasRouter<X, kmoe::bfloat16>>(
                           (fixtures / "hf5" / "mixtral" / "model").string(), fixture_layer)),
                       kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("load_inference_block") &&
                                      ContainsSubstring("router")));
}
