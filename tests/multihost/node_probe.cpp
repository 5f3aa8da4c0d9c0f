// SPDX-License-Identifier: BSD-3-Clause
// Checks that MPI finds the hosts of the multi-host test: MPI_COMM_TYPE_SHARED must group
// exactly the `ranks per host` consecutive world ranks of each host (what a hierarchical
// exchange takes for a node). Usage: node_probe <ranks per host>; exit 1 with a message
// naming the rank otherwise.
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const int per_host = argc > 1 ? std::atoi(argv[1]) : 0;
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
  int node_size = 0;
  MPI_Comm_size(node, &node_size);
  std::vector<int> members(node_size);
  MPI_Allgather(&rank, 1, MPI_INT, members.data(), 1, MPI_INT, node);
  bool ok = per_host >= 1 && node_size == per_host;
  for (int i = 0; ok && i < node_size; ++i) ok = members[i] == rank / per_host * per_host + i;
  if (!ok) {
    std::fprintf(stderr,
                 "node_probe: rank %d shares a node with %d ranks (first %d), expected "
                 "ranks %d..%d\n",
                 rank, node_size, members.empty() ? -1 : members[0],
                 per_host >= 1 ? rank / per_host * per_host : -1,
                 per_host >= 1 ? rank / per_host * per_host + per_host - 1 : -1);
  } else if (rank == 0) {
    std::printf("node_probe: %d nodes of %d ranks, as the hosts are\n", size / per_host, per_host);
  }
  MPI_Comm_free(&node);
  int all_ok = 0, mine = ok ? 1 : 0;
  MPI_Allreduce(&mine, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  MPI_Finalize();
  return all_ok ? 0 : 1;
}
