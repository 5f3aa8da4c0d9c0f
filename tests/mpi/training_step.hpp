// SPDX-License-Identifier: BSD-3-Clause
#pragma once
// One training step of an MPI test's layer on this rank's tokens: the inputs and output
// gradients are seeded by the rank's token group, so ranks that share a token group (TP)
// see the same tokens and every other rank its own.
#include <kmoe/init.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/router.hpp>
#include <kmoe/types.hpp>

namespace kmoe::test {

/// Zeroes the gradients, runs forward and backward on `tokens` tokens of width `hidden`;
/// synchronises the gradients across ranks if `synchronise`.
template <class Layer, class Groups>
void training_step(Layer& layer, const Groups& groups, int tokens, int hidden, bool synchronise) {
  using X = typename Layer::execution_space;
  using S = typename Layer::scalar_type;
  const int token_group = groups.ep_rank + groups.layout.ep * groups.dp_rank;
  Matrix<S, X> x("x", tokens, hidden), grad_y("grad_y", tokens, hidden);
  fill_normal(x, 1.0, 100 + token_group);
  fill_normal(grad_y, 0.1, 200 + token_group);
  RouteContext<X> training;
  training.training = true;
  Matrix<S, X> y("y", tokens, hidden), grad_x("grad_x", tokens, hidden);
  layer.zero_gradients();
  layer.forward(x, y, training);
  layer.backward(grad_y, grad_x);
  if (synchronise) layer.synchronize_gradients();
}

}  // namespace kmoe::test
