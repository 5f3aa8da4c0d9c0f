// SPDX-License-Identifier: BSD-3-Clause
// Hostile config.json files against the Hugging Face loaders (kmoe/models): sizes whose
// products overflow, claims the checkpoint does not back, deep nesting, numbers out of
// range, duplicate keys and FIFOs. Each crashed, allocated gigabytes, hung or silently
// changed the model before the loaders were hardened (issue 12).

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <kmoe/kmoe.hpp>
#include <kmoe/models/hf.hpp>

#include <algorithm>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_exception.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

namespace fs = std::filesystem;
namespace models = kmoe::models;
using Catch::Matchers::ContainsSubstring;
using Catch::Matchers::MessageMatches;
using X = Kokkos::DefaultExecutionSpace;

namespace {

const fs::path fixtures = KMOE_FIXTURES_DIR;

/// A scratch copy of a fixture's model directory whose config.json text is `edit`ed.
struct ModelCopy {
  fs::path dir;
  ModelCopy(const std::string& family, const std::function<std::string(std::string)>& edit) {
    static int counter = 0;
    std::string tag = family;  // "hf5/phimoe" names one scratch directory, not two
    std::replace(tag.begin(), tag.end(), '/', '_');
    dir = fs::temp_directory_path() /
          ("kmoe_cfg_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(dir);
    fs::create_directories(dir);
    const fs::path source = fixtures / family / "model";
    fs::copy_file(source / "model.safetensors", dir / "model.safetensors");
    std::ifstream in(source / "config.json");
    const std::string text((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(dir / "config.json") << edit(text);
  }
  ModelCopy(const ModelCopy&) = delete;
  ModelCopy& operator=(const ModelCopy&) = delete;
  ~ModelCopy() { fs::remove_all(dir); }
  std::string path() const { return dir.string(); }
};

/// `text` with the value of `"field": <number>` replaced by `value`.
std::string set_field(std::string text, const std::string& field, const std::string& value) {
  const std::string key = "\"" + field + "\": ";
  const std::size_t at = text.find(key);
  REQUIRE(at != std::string::npos);
  const std::size_t begin = at + key.size();
  const std::size_t end = text.find_first_of(",\n}", begin);
  return text.replace(begin, end - begin, value);
}

std::function<std::string(std::string)> with(const std::string& field, const std::string& value) {
  return [=](std::string text) { return set_field(std::move(text), field, value); };
}

long peak_rss_kib() {
  struct rusage usage {};
  ::getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

/// The exception `load` threw as "<type>: <what>", "no exception", or "blocked" if it did
/// not return within five seconds (the thread stays blocked in open() until exit).
std::string outcome_within_seconds(std::function<void()> load) {
  auto result = std::make_shared<std::promise<std::string>>();
  auto done = result->get_future();
  std::thread([load = std::move(load), result] {
    try {
      load();
      result->set_value("no exception");
    } catch (const kmoe::invalid_argument& e) {
      result->set_value(std::string("invalid_argument: ") + e.what());
    } catch (const kmoe::runtime_error& e) {
      result->set_value(std::string("runtime_error: ") + e.what());
    } catch (const std::exception& e) {
      result->set_value(std::string("other exception: ") + e.what());
    }
  }).detach();
  if (done.wait_for(std::chrono::seconds(5)) != std::future_status::ready) return "blocked";
  return done.get();
}

void load_mixtral(const std::string& dir) { models::load_mixtral<X, float>(dir, 1); }
void load_deepseek_v3(const std::string& dir) { models::load_deepseek_v3<X, float>(dir, 1); }

/// A sparse model.safetensors whose header describes every tensor of Mixtral layer 1 at
/// hidden size H and FFN width F in BF16: terabytes on paper, a few kilobytes on disk.
void write_sparse_mixtral_checkpoint(const fs::path& dir, std::int64_t H, std::int64_t F) {
  nlohmann::ordered_json header;
  std::uint64_t offset = 0;
  const auto add = [&](const std::string& name, std::int64_t rows, std::int64_t cols) {
    const std::uint64_t bytes = std::uint64_t(rows) * std::uint64_t(cols) * 2;
    header[name] = {
        {"dtype", "BF16"}, {"shape", {rows, cols}}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  };
  const std::string prefix = "model.layers.1.block_sparse_moe.";
  add(prefix + "gate.weight", 8, H);
  for (int e = 0; e < 8; ++e) {
    add(prefix + "experts." + std::to_string(e) + ".w1.weight", F, H);
    add(prefix + "experts." + std::to_string(e) + ".w3.weight", F, H);
    add(prefix + "experts." + std::to_string(e) + ".w2.weight", H, F);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const fs::path file = dir / "model.safetensors";
  {
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    for (int i = 0; i < 8; ++i) out.put(char(text.size() >> (8 * i)));
    out << text;
  }
  fs::resize_file(file, 8 + text.size() + offset);
}

}  // namespace

TEST_CASE("hidden_size x intermediate_size of 2^32 is refused before any allocation",
          "[models][hostile][sizes]") {
  // The checkpoint backs the claim (sparse), so only the size check stands between the
  // config and an [8, 65536, 65536] view, which Kokkos 3.4 sizes at 0 bytes and
  // load_weights then wrote 2^32 elements into.
  ModelCopy copy("mixtral", [](std::string text) {
    return set_field(set_field(std::move(text), "hidden_size", "65536"), "intermediate_size",
                     "65536");
  });
  write_sparse_mixtral_checkpoint(copy.dir, 65536, 65536);
  CHECK_THROWS_MATCHES(load_mixtral(copy.path()), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("config.json") &&
                                      ContainsSubstring("hidden_size x intermediate_size") &&
                                      ContainsSubstring("65536 x 65536")));
  // One below the limit of an int per matrix passes the config check and fails only on the
  // checkpoint's shapes: the bound is the product, not either field.
  ModelCopy below("mixtral", [](std::string text) {
    return set_field(set_field(std::move(text), "hidden_size", "65536"), "intermediate_size",
                     "32767");
  });
  CHECK_NOTHROW(models::read_block_config(below.path(), 1));
  CHECK_THROWS_MATCHES(load_mixtral(below.path()), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("has shape")));
}

TEST_CASE("20000 claimed experts fail on the checkpoint's shapes without allocating them",
          "[models][hostile][sizes]") {
  ModelCopy copy("mixtral", with("num_local_experts", "20000"));
  const long before = peak_rss_kib();
  // The old loader built the 20000-expert layer (1.5 GB of zeroed weights) and only then
  // compared the first tensor's shape.
  CHECK_THROWS_MATCHES(load_mixtral(copy.path()), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("gate.weight") &&
                                      ContainsSubstring("has shape [8, 64]") &&
                                      ContainsSubstring("[20000, 64]")));
  CHECK(peak_rss_kib() - before < 100 * 1024);
}

TEST_CASE("n_shared_experts x moe_intermediate_size overflowing an int is refused",
          "[models][hostile][sizes]") {
  // 2^27 x 32 = 2^32 wrapped to 0 in int: the shared expert was silently dropped, exit 0.
  ModelCopy wraps("deepseek_v3", with("n_shared_experts", "134217728"));
  CHECK_THROWS_MATCHES(
      load_deepseek_v3(wraps.path()), kmoe::runtime_error,
      MessageMatches(ContainsSubstring("config.json") &&
                     ContainsSubstring("n_shared_experts x moe_intermediate_size")));
  // 2^26 x 32 = 2^31 wrapped negative.
  ModelCopy negative("deepseek_v3", with("n_shared_experts", "67108864"));
  CHECK_THROWS_MATCHES(
      models::read_block_config(negative.path(), 1), kmoe::runtime_error,
      MessageMatches(ContainsSubstring("n_shared_experts x moe_intermediate_size")));
}

TEST_CASE("config values are checked against each other before loading",
          "[models][hostile][ranges]") {
  const auto message_for = [](const std::string& family, const std::string& field,
                              const std::string& value) {
    ModelCopy copy(family, with(field, value));
    try {
      models::read_block_config(copy.path(), 1);
    } catch (const kmoe::runtime_error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  CHECK_THAT(message_for("mixtral", "num_experts_per_tok", "9"),
             ContainsSubstring("\"num_experts_per_tok\" = 9 must be in [1, 8]"));
  CHECK_THAT(message_for("deepseek_v3", "n_group", "3"),
             ContainsSubstring("divide n_routed_experts"));
  CHECK_THAT(message_for("deepseek_v3", "topk_group", "5"),
             ContainsSubstring("\"topk_group\" = 5"));
  CHECK_THAT(message_for("deepseek_v3", "routed_scaling_factor", "-2.5"),
             ContainsSubstring("finite number > 0"));
  CHECK_THAT(message_for("mixtral", "hidden_size", "18446744073709551615"),
             ContainsSubstring("below 2^63"));
  // Phi-MoE: sparsemixer routes to exactly two experts whatever the field says in
  // transformers, so another value is refused, as are one expert and a negative eps.
  CHECK_THAT(message_for("hf5/phimoe", "num_experts_per_tok", "3"),
             ContainsSubstring("\"num_experts_per_tok\" = 3 is not supported") &&
                 ContainsSubstring("exactly 2"));
  CHECK_THAT(message_for("hf5/phimoe", "num_local_experts", "1"),
             ContainsSubstring("\"num_local_experts\" = 1 must be in [2, "));
  CHECK_THAT(message_for("hf5/phimoe", "router_jitter_noise", "-0.1"),
             ContainsSubstring("\"router_jitter_noise\" = -0.1 must be a finite number >= 0"));
  CHECK(message_for("hf5/phimoe", "router_jitter_noise", "0") == "accepted");
  ModelCopy released_eps("hf5/phimoe", with("router_jitter_noise", "null"));
  CHECK(models::read_block_config(released_eps.path(), 1).jitter_eps == 0.01);
}

TEST_CASE("config.json hazards raise naming the file: depth, numbers, duplicates, FIFOs",
          "[models][hostile][json]") {
  // 80,000 levels: the old message for the mistyped field dumped it recursively.
  const std::string deep = std::string(80000, '[') + "64" + std::string(80000, ']');
  ModelCopy nested("mixtral", with("hidden_size", deep));
  CHECK_THROWS_MATCHES(models::read_block_config(nested.path(), 1), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("config.json") &&
                                      ContainsSubstring("deeper")));
  // nlohmann::out_of_range escaped without the file name.
  ModelCopy huge("mixtral", with("rope_theta", "1e400"));
  CHECK_THROWS_MATCHES(models::read_block_config(huge.path(), 1), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("config.json") &&
                                      ContainsSubstring("JSON")));
  // The second hidden_size silently won.
  ModelCopy twice("mixtral", [](std::string text) {
    return text.replace(text.rfind('}'), 1, ", \"hidden_size\": 32}");
  });
  CHECK_THROWS_MATCHES(models::read_block_config(twice.path(), 1), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("\"hidden_size\" appears twice")));
  // open() on a FIFO blocked forever.
  ModelCopy fifo("mixtral", [](std::string text) { return text; });
  fs::remove(fifo.dir / "config.json");
  REQUIRE(::mkfifo((fifo.dir / "config.json").c_str(), 0600) == 0);
  const std::string dir = fifo.path();
  CHECK_THAT(outcome_within_seconds([dir] { models::read_block_config(dir, 1); }),
             ContainsSubstring("config.json") && ContainsSubstring("a FIFO"));
}
