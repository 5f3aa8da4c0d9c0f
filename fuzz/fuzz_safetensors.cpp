// SPDX-License-Identifier: BSD-3-Clause
// libFuzzer target: the input is a whole safetensors file. Every tensor the header check
// accepts is read in full; a file that opens must survive a write/read round trip with the
// same names, shapes and values.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_support.hpp"
#include "kmoe/io/safetensors.hpp"

using kmoe::io::DType;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto path = kmoe_fuzz::scratch() / "input.safetensors";
  const auto copy = kmoe_fuzz::scratch() / "copy.safetensors";
  kmoe_fuzz::write_file(path, data, size);
  kmoe_fuzz::expect_kmoe_errors_only([&] {
    const kmoe::io::SafetensorsFile file(path.string());
    kmoe::io::SafetensorsWriter writer;
    for (const auto& [key, value] : file.metadata()) writer.set_metadata(key, value);
    for (const std::string& name : file.names()) {
      const auto& info = file.info(name);
      // The header check bounds every tensor by the file's own bytes.
      kmoe_fuzz::require(info.element_count() * kmoe::io::dtype_size(info.dtype) <= size,
                         "a tensor larger than the file");
      if (kmoe::io::is_floating(info.dtype)) {
        writer.add(name, info.dtype, info.shape, file.read<double>(name));
      } else {
        writer.add(name, info.dtype, info.shape, file.read<std::int64_t>(name));
      }
    }
    if (file.names().empty()) return;
    writer.write(copy.string());
    const kmoe::io::SafetensorsFile again(copy.string());
    kmoe_fuzz::require(again.names() == file.names(), "names changed by a round trip");
    for (const std::string& name : file.names()) {
      kmoe_fuzz::require(again.info(name).shape == file.info(name).shape &&
                             again.info(name).dtype == file.info(name).dtype,
                         "a shape or dtype changed by a round trip");
      if (kmoe::io::is_floating(file.info(name).dtype)) {
        const auto a = file.read<double>(name), b = again.read<double>(name);
        for (std::size_t i = 0; i < a.size(); ++i)
          kmoe_fuzz::require(std::memcmp(&a[i], &b[i], sizeof(double)) == 0 ||
                                 (std::isnan(a[i]) && std::isnan(b[i])),
                             "a value changed by a round trip");
      } else {
        kmoe_fuzz::require(file.read<std::int64_t>(name) == again.read<std::int64_t>(name),
                           "an integer changed by a round trip");
      }
    }
  });
  return 0;
}
