// SPDX-License-Identifier: BSD-3-Clause
// Hostile files against kmoe/io: each case crashed, hung or silently picked a value before
// the readers were hardened (issue 12) and must now raise a kmoe error naming the file.

#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

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
#include <string>
#include <thread>
#include <vector>

#include "kmoe/error.hpp"
#include "kmoe/io/json.hpp"
#include "kmoe/io/safetensors.hpp"

namespace fs = std::filesystem;
using Catch::Matchers::ContainsSubstring;
using Catch::Matchers::MessageMatches;
using kmoe::io::DType;
using kmoe::io::SafetensorsFile;
using kmoe::io::SafetensorsWriter;
using kmoe::io::ShardedCheckpoint;

namespace {

class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() /
            ("kmoe-io-hazards-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }
  std::size_t entries() const {
    return std::size_t(std::distance(fs::directory_iterator(path_), fs::directory_iterator()));
  }

 private:
  fs::path path_;
};

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string le64(std::uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[std::size_t(i)] = static_cast<char>(value >> (8 * i));
  return bytes;
}

std::string raw_file(const std::string& header, std::size_t data_bytes) {
  return le64(header.size()) + header + std::string(data_bytes, '\0');
}

std::string nested(int levels, const std::string& leaf) {
  return std::string(std::size_t(levels), '[') + leaf + std::string(std::size_t(levels), ']');
}

/// Runs `open` on a detached thread and reports the exception it threw, or "blocked" if it
/// has not returned within five seconds: a reader blocked in open() on a FIFO cannot be
/// interrupted, so the thread is left behind and dies with the test process.
std::string outcome_within_seconds(std::function<void()> open) {
  auto result = std::make_shared<std::promise<std::string>>();
  auto done = result->get_future();
  std::thread([open = std::move(open), result] {
    try {
      open();
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

}  // namespace

TEST_CASE("JSON nested 80000 levels deep is refused, not dumped recursively",
          "[io][hostile][json]") {
  TempDir dir;
  const std::string path = dir.file("deep.safetensors");
  // The old reader parsed this and then overflowed the stack in dump() for its message.
  write_bytes(path, raw_file(R"({"t":{"dtype":"F32","shape":)" + nested(80000, "1") +
                                 R"(,"data_offsets":[0,4]}})",
                             4));
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring(path) &&
                                      ContainsSubstring("deeper than 64 levels")));
  // The bound itself: 64 levels parse, 65 do not.
  CHECK_NOTHROW(kmoe::io::parse_json(nested(63, "[]"), "x.json", "test"));
  CHECK_THROWS_MATCHES(kmoe::io::parse_json(nested(64, "[]"), "x.json", "test"),
                       kmoe::runtime_error, MessageMatches(ContainsSubstring("x.json")));

  std::ofstream(dir.file("model.safetensors.index.json"))
      << R"({"weight_map":{"a":)" << nested(80000, "\"a.safetensors\"") << "}}";
  CHECK_THROWS_MATCHES(ShardedCheckpoint(dir.str()), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("model.safetensors.index.json") &&
                                      ContainsSubstring("deeper")));
}

TEST_CASE("error messages quote at most an excerpt of untrusted text", "[io][hostile][json]") {
  TempDir dir;
  const std::string path = dir.file("long.safetensors");
  const std::string dtype(1'000'000, 'X');
  write_bytes(
      path, raw_file(R"({"t":{"dtype":")" + dtype + R"(","shape":[1],"data_offsets":[0,4]}})", 4));
  try {
    SafetensorsFile file(path);
    FAIL("an unknown dtype was accepted");
  } catch (const kmoe::runtime_error& e) {
    CHECK_THAT(e.what(),
               ContainsSubstring("unsupported dtype") && ContainsSubstring("1000000 bytes"));
    CHECK(std::string(e.what()).size() < 1000);
  }
}

TEST_CASE("a number out of range names the file instead of escaping from nlohmann",
          "[io][hostile][json]") {
  TempDir dir;
  const std::string path = dir.file("big-number.safetensors");
  write_bytes(path, raw_file(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,1e400]}})", 4));
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring(path) && ContainsSubstring("JSON")));
  std::ofstream(dir.file("model.safetensors.index.json"))
      << R"({"metadata":{"total_size":1e400},"weight_map":{}})";
  CHECK_THROWS_MATCHES(ShardedCheckpoint(dir.str()), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("model.safetensors.index.json")));
}

TEST_CASE("duplicate tensor names are refused naming the tensor and the file",
          "[io][hostile][duplicates]") {
  TempDir dir;
  const std::string path = dir.file("twice.safetensors");
  // Two entries for "w" with different data: the old reader kept whichever came last.
  const std::string header = R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                             R"("w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})";
  std::string file = raw_file(header, 0);
  const float one = 1.0f, two = 2.0f;
  file.append(reinterpret_cast<const char*>(&one), 4)
      .append(reinterpret_cast<const char*>(&two), 4);
  write_bytes(path, file);
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring(path) && ContainsSubstring("\"w\"") &&
                                      ContainsSubstring("twice")));

  std::ofstream(dir.file("model.safetensors.index.json"))
      << R"({"weight_map":{"a":"one.safetensors","a":"two.safetensors"}})";
  CHECK_THROWS_MATCHES(ShardedCheckpoint(dir.str()), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("\"a\"") && ContainsSubstring("twice")));
}

TEST_CASE("a safetensors header must start with '{'", "[io][hostile][json]") {
  TempDir dir;
  const std::string path = dir.file("bom.safetensors");
  // nlohmann skips a byte-order mark; the reference implementation refuses it.
  write_bytes(path, raw_file("\xEF\xBB\xBF{}", 0));
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("start with '{'")));
}

TEST_CASE("a file truncated after it was opened raises instead of SIGBUS",
          "[io][hostile][truncation]") {
  TempDir dir;
  const std::string path = dir.file("shrinking.safetensors");
  SafetensorsWriter writer;
  writer.add("w", DType::F32, {1 << 18}, std::vector<float>(1 << 18, 1.5f));
  writer.write(path);
  const SafetensorsFile file(path);
  REQUIRE(::truncate(path.c_str(), 4096) == 0);
  // The mapped reader touched pages past the new end of file here and died of SIGBUS.
  CHECK_THROWS_MATCHES(file.read<float>("w"), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring(path) && ContainsSubstring("truncated")));
}

TEST_CASE("a FIFO or a device is refused without blocking", "[io][hostile][special]") {
  TempDir dir;
  const std::string fifo = dir.file("model.safetensors");
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  // open() on a FIFO with no writer blocked the old reader forever.
  const std::string direct = outcome_within_seconds([fifo] { SafetensorsFile file(fifo); });
  CHECK_THAT(direct, ContainsSubstring("invalid_argument") && ContainsSubstring(fifo) &&
                         ContainsSubstring("a FIFO"));
  const std::string through_directory =
      outcome_within_seconds([&dir] { ShardedCheckpoint checkpoint(dir.str()); });
  CHECK_THAT(through_directory, ContainsSubstring("a FIFO"));
  CHECK_THAT(outcome_within_seconds([] { SafetensorsFile file("/dev/zero"); }),
             ContainsSubstring("a character device"));

  // An index that is itself a FIFO, and one whose shard is a link to a FIFO.
  TempDir sharded;
  const std::string index = sharded.file("model.safetensors.index.json");
  REQUIRE(::mkfifo(index.c_str(), 0600) == 0);
  CHECK_THAT(outcome_within_seconds([&sharded] { ShardedCheckpoint checkpoint(sharded.str()); }),
             ContainsSubstring("runtime_error") && ContainsSubstring("a FIFO"));
  fs::remove(index);
  std::ofstream(index) << R"({"weight_map":{"a":"link.safetensors"}})";
  fs::create_symlink(fifo, sharded.file("link.safetensors"));
  const ShardedCheckpoint checkpoint(sharded.str());
  CHECK_THAT(outcome_within_seconds([&checkpoint] { checkpoint.read<float>("a"); }),
             ContainsSubstring("runtime_error") && ContainsSubstring("link.safetensors") &&
                 ContainsSubstring("a FIFO"));
}

TEST_CASE("index paths: traversal is refused, links are followed to regular files only",
          "[io][hostile][index]") {
  TempDir outside;
  SafetensorsWriter writer;
  writer.add("a", DType::F32, {1}, std::vector<float>{7});
  writer.write(outside.file("real.safetensors"));

  TempDir dir;
  const std::string index = dir.file("model.safetensors.index.json");
  for (const std::string& shard : std::vector<std::string>{
           "../real.safetensors", "sub/../../real.safetensors", outside.file("real.safetensors")}) {
    std::ofstream(index) << R"({"weight_map":{"a":")" << shard << R"("}})";
    CHECK_THROWS_MATCHES(ShardedCheckpoint(dir.str()), kmoe::runtime_error,
                         MessageMatches(ContainsSubstring("model.safetensors.index.json") &&
                                        ContainsSubstring("not a relative file path")));
  }
  // A link inside the directory is followed wherever it points, as the Hugging Face hub
  // cache needs (snapshots/<rev>/*.safetensors link to ../../blobs/<hash>)...
  std::ofstream(index) << R"({"weight_map":{"a":"link.safetensors","b":"zero.safetensors"}})";
  fs::create_symlink(outside.file("real.safetensors"), dir.file("link.safetensors"));
  // ...but must end at a regular file.
  fs::create_symlink("/dev/zero", dir.file("zero.safetensors"));
  const ShardedCheckpoint checkpoint(dir.str());
  CHECK(checkpoint.read<float>("a") == std::vector<float>{7});
  CHECK_THROWS_MATCHES(checkpoint.read<float>("b"), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("zero.safetensors") &&
                                      ContainsSubstring("a character device")));
}

TEST_CASE("a failed write leaves the previous file intact and no temporary behind",
          "[io][hostile][atomic-write]") {
  TempDir dir;
  const std::string path = dir.file("out.safetensors");
  SafetensorsWriter small;
  small.add("w", DType::F32, {1}, std::vector<float>{1});
  small.write(path);
  const std::string previous = read_bytes(path);

  // A file-size limit below the new file's size makes write() fail with EFBIG part-way.
  SafetensorsWriter large;
  large.add("w", DType::F32, {1 << 20}, std::vector<float>(1 << 20, 2.0f));
  struct rlimit saved {};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &saved) == 0);
  const auto old_handler = ::signal(SIGXFSZ, SIG_IGN);
  struct rlimit limit = saved;
  limit.rlim_cur = 1 << 16;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &limit) == 0);
  std::string failure;
  try {
    large.write(path);
  } catch (const kmoe::runtime_error& e) {
    failure = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &saved);
  ::signal(SIGXFSZ, old_handler);
  CHECK_THAT(failure, ContainsSubstring(path) && ContainsSubstring("unchanged"));
  CHECK(read_bytes(path) == previous);
  CHECK(dir.entries() == 1);

  // A destination that is a device is refused rather than replaced by rename.
  CHECK_THROWS_MATCHES(small.write("/dev/null"), kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("not a regular file")));
}

TEST_CASE("staged outputs replace their destinations only on commit", "[io][atomic-write]") {
  TempDir dir;
  const std::string path = dir.file("out.safetensors");
  write_bytes(path, "previous");
  SafetensorsWriter writer;
  writer.add("w", DType::F64, {2}, std::vector<double>{3, 4});
  {
    kmoe::io::StagedFile staged = writer.stage(path);
    CHECK(read_bytes(path) == "previous");
  }  // dropped uncommitted: discarded
  CHECK(read_bytes(path) == "previous");
  CHECK(dir.entries() == 1);
  kmoe::io::StagedFile staged = writer.stage(path);
  staged.commit();
  CHECK(SafetensorsFile(path).read<double>("w") == std::vector<double>{3, 4});
  CHECK(dir.entries() == 1);
}
