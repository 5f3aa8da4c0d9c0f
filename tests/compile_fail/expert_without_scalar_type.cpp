// SPDX-License-Identifier: BSD-3-Clause
// Must NOT compile: an expert policy that forgot its scalar_type.
#include <kmoe/kmoe.hpp>

using X = Kokkos::DefaultHostExecutionSpace;

struct ExpertWithoutScalar {
  using execution_space = X;
  int num_experts() const { return 4; }
  int hidden_size() const { return 8; }
};

static_assert(kmoe::check_valid_expert<ExpertWithoutScalar>());

int main() { return 0; }
