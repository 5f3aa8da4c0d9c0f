// SPDX-License-Identifier: BSD-3-Clause
// libFuzzer target: the input is model.safetensors.index.json of a directory that also
// holds two valid shards (a.safetensors: "a" [2] F32; b.safetensors: "b" [1] I64) and a
// FIFO (fifo.safetensors), so that names in the index can hit real files, missing ones,
// the FIFO, the directory itself and paths outside it. Every tensor the index lists is
// read; the values of the real shards must come back exactly.

#include <sys/stat.h>

#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_support.hpp"
#include "kmoe/io/safetensors.hpp"

namespace {

const std::filesystem::path& model_dir() {
  static const std::filesystem::path dir = [] {
    const auto d = kmoe_fuzz::scratch() / "model";
    std::filesystem::create_directories(d);
    kmoe::io::SafetensorsWriter a, b;
    a.add("a", kmoe::io::DType::F32, {2}, std::vector<float>{1.5f, -2.0f});
    a.write((d / "a.safetensors").string());
    b.add("b", kmoe::io::DType::I64, {1}, std::vector<std::int64_t>{42});
    b.write((d / "b.safetensors").string());
    ::mkfifo((d / "fifo.safetensors").c_str(), 0600);
    return d;
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto& dir = model_dir();
  kmoe_fuzz::write_file(dir / "model.safetensors.index.json", data, size);
  kmoe_fuzz::expect_kmoe_errors_only([&] {
    const kmoe::io::ShardedCheckpoint checkpoint(dir.string());
    for (const std::string& name : checkpoint.names()) {
      kmoe_fuzz::expect_kmoe_errors_only([&] {
        if (kmoe::io::is_floating(checkpoint.info(name).dtype)) {
          const auto values = checkpoint.read<double>(name);
          kmoe_fuzz::require(name != "a" || values == std::vector<double>{1.5, -2.0},
                             "tensor a read wrong");
        } else {
          const auto values = checkpoint.read<std::int64_t>(name);
          kmoe_fuzz::require(name != "b" || values == std::vector<std::int64_t>{42},
                             "tensor b read wrong");
        }
      });
    }
  });
  return 0;
}
