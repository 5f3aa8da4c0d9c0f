// SPDX-License-Identifier: BSD-3-Clause
// libFuzzer target: the input is config.json. read_block_config must either raise a kmoe
// error or return a block whose sizes the loaders can allocate: top_k within the experts,
// groups dividing the experts, every checkpoint matrix within max_matrix_elements, and a
// checkpoint name for every parameter slice.

#include <cstdint>
#include <string>

#include "fuzz_support.hpp"
#include "kmoe/models/config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto dir = kmoe_fuzz::scratch() / "config";
  std::filesystem::create_directories(dir);
  kmoe_fuzz::write_file(dir / "config.json", data, size);
  for (int layer = 0; layer < 3; ++layer) {
    kmoe_fuzz::expect_kmoe_errors_only([&] {
      const auto b = kmoe::models::read_block_config(dir.string(), layer);
      using kmoe::models::max_matrix_elements;
      kmoe_fuzz::require(b.hidden >= 1 && b.ffn >= 1 && b.experts >= 1, "a size below 1");
      kmoe_fuzz::require(b.top_k >= 1 && b.top_k <= b.experts, "top_k outside [1, experts]");
      kmoe_fuzz::require(b.n_group >= 1 && b.experts % b.n_group == 0 && b.topk_group >= 1 &&
                             b.topk_group <= b.n_group,
                         "groups that do not divide the experts");
      kmoe_fuzz::require(std::int64_t(b.hidden) * b.ffn <= max_matrix_elements &&
                             std::int64_t(b.hidden) * b.experts <= max_matrix_elements &&
                             std::int64_t(b.hidden) * b.shared_ffn <= max_matrix_elements &&
                             b.shared_ffn >= 0,
                         "a matrix larger than max_matrix_elements");
      // Listing the names is linear in the experts; bound the work per input.
      if (b.experts <= 4096) {
        const auto tensors = kmoe::models::checkpoint_tensors(b);
        const std::size_t shared_tensors =
            b.shared_ffn > 0 ? 3 + (b.shared_gate.empty() ? 0 : 1) : 0;
        const std::size_t bias_tensors =
            (b.has_router_bias() ? 1 : 0) + (b.has_expert_bias() ? 3 * std::size_t(b.experts) : 0);
        kmoe_fuzz::require(tensors.size() ==
                               1 + 3 * std::size_t(b.experts) + shared_tensors + bias_tensors,
                           "a parameter slice without a checkpoint name");
      }
    });
  }
  return 0;
}
