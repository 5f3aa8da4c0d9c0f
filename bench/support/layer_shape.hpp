// SPDX-License-Identifier: BSD-3-Clause
#pragma once
// The layer shape the MPI training benchmarks share (--ep --tokens --hidden --ffn --experts
// --repeats), read and checked once for all of them.
#include <kmoe/communicators/mpi.hpp>

#include <cstdio>

#include "flags.hpp"

namespace kmoe::bench {

struct LayerShape {
  int ep = 1, tokens = 256, hidden = 256, ffn = 512, experts = 8, repeats = 20;
};

/// Reads the shape flags over `shape`'s defaults. False where --ep does not divide the ranks
/// and the experts (rank 0 says so, naming the program and the values).
inline bool read_layer_shape(int argc, char** argv, const MpiCommunicator& world,
                             LayerShape& shape) {
  shape.ep = integer_flag(argc, argv, "--ep", shape.ep);
  shape.tokens = integer_flag(argc, argv, "--tokens", shape.tokens);
  shape.hidden = integer_flag(argc, argv, "--hidden", shape.hidden);
  shape.ffn = integer_flag(argc, argv, "--ffn", shape.ffn);
  shape.experts = integer_flag(argc, argv, "--experts", shape.experts);
  shape.repeats = integer_flag(argc, argv, "--repeats", shape.repeats);
  if (world.size() % shape.ep == 0 && shape.experts % shape.ep == 0) return true;
  if (world.rank() == 0)
    std::fprintf(stderr, "%s: --ep %d must divide the %d ranks and the %d experts\n", argv[0],
                 shape.ep, world.size(), shape.experts);
  return false;
}

}  // namespace kmoe::bench
