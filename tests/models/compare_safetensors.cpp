// SPDX-License-Identifier: BSD-3-Clause
// compare_safetensors REFERENCE CANDIDATE TOLERANCE: every tensor of REFERENCE must be in
// CANDIDATE with the same shape and max |a - b| <= TOLERANCE * max |reference| (integer
// tensors: equal). Exit 0 when all agree, 1 otherwise, naming each mismatch. Used by the
// kmoe-run test to check the values the tool writes against the HF fixtures.
#include <kmoe/io/safetensors.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: compare_safetensors REFERENCE CANDIDATE TOLERANCE\n");
    return 2;
  }
  try {
    const kmoe::io::SafetensorsFile reference(argv[1]), candidate(argv[2]);
    const double tolerance = std::atof(argv[3]);
    int mismatches = 0;
    for (const auto& name : reference.names()) {
      if (!candidate.contains(name)) {
        std::printf("missing %s\n", name.c_str());
        ++mismatches;
        continue;
      }
      if (candidate.info(name).shape != reference.info(name).shape) {
        std::printf("shape of %s differs\n", name.c_str());
        ++mismatches;
        continue;
      }
      const bool integer = reference.info(name).dtype == kmoe::io::DType::I64;
      const auto read = [&](const kmoe::io::SafetensorsFile& file) {
        if (!integer) return file.read<double>(name);
        const auto values = file.read<std::int64_t>(name);
        return std::vector<double>(values.begin(), values.end());
      };
      const auto want = read(reference), got = read(candidate);
      double scale = 0, error = 0;
      for (std::size_t i = 0; i < want.size(); ++i) {
        scale = std::max(scale, std::abs(want[i]));
        error = std::max(error, std::abs(want[i] - got[i]));
      }
      const bool ok = integer ? error == 0 : error <= tolerance * scale;
      std::printf("%-60s max error %.3g (scale %.3g) %s\n", name.c_str(), error, scale,
                  ok ? "ok" : "MISMATCH");
      mismatches += !ok;
    }
    return mismatches == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "compare_safetensors: %s\n", e.what());
    return 1;
  }
}
