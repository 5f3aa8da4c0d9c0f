// SPDX-License-Identifier: BSD-3-Clause
// Must NOT compile: float16 storage accumulating in float16. The ctest
// compile_fail_precision_half_accumulation builds this target and passes only if the
// compiler prints kmoe's message naming the combination.
#include <kmoe/precision.hpp>

int main() {
  using HalfEverywhere = kmoe::Precision<kmoe::float16, kmoe::float16>;
  return sizeof(HalfEverywhere::storage_type) == 2 ? 0 : 1;
}
