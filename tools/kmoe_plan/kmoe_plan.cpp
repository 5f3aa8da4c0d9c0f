// SPDX-License-Identifier: BSD-3-Clause
// kmoe-plan: lists the (TP, EP, DP, rank order, placement) layouts a SwiGLU MoE layer can
// train on, with the memory per rank and the bytes per step on each link class the cost
// model predicts (kmoe/planning/layout_model.hpp), ranked by predicted step time, and why.
//
//   kmoe-plan --hidden 4096 --ffn 14336 --experts 8 --top-k 2 --tokens 65536 --ranks 16
//             --ranks-per-node 8 --memory-per-rank 80 [--shared-experts 0 --shared-ffn 0]
//             [--dtype-bytes 2] [--intra-bw 150] [--inter-bw 25] [--tflops 400] [--top 10]
//
// Memory in GiB, bandwidths in GB/s per rank, compute in TFLOP/s per rank. Bad input exits 1
// naming the flag.
#include <kmoe/planning/layout_planner.hpp>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <stdexcept>
#include <string>

namespace {

using namespace kmoe::planning;

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "kmoe-plan: %s\n", message.c_str());
  std::exit(1);
}

const char* const usage =
    "usage: kmoe-plan --hidden H --ffn F --experts E --top-k K --tokens T --ranks N\n"
    "                 --memory-per-rank GiB [--ranks-per-node R (N)] [--shared-experts S (0)]\n"
    "                 [--shared-ffn FS] [--dtype-bytes 2|4|8 (2)] [--layers L (1)]\n"
    "                 [--intra-bw GB/s (150)]"
    " [--inter-bw GB/s (25)] [--tflops TFLOP/s (400)]\n"
    "                 [--bucket-mb MB (25)]"
    " [--top N (10)]\n";

struct Arguments {
  std::map<std::string, std::string> values;

  Arguments(int argc, char** argv) {
    static const char* known[] = {"--hidden",
                                  "--ffn",
                                  "--experts",
                                  "--top-k",
                                  "--tokens",
                                  "--ranks",
                                  "--memory-per-rank",
                                  "--ranks-per-node",
                                  "--shared-experts",
                                  "--shared-ffn",
                                  "--dtype-bytes",
                                  "--layers",
                                  "--intra-bw",
                                  "--inter-bw",
                                  "--tflops",
                                  "--bucket-mb",
                                  "--top"};
    for (int i = 1; i < argc; i += 2) {
      const std::string flag = argv[i];
      if (flag == "--help" || flag == "-h") {
        std::fputs(usage, stdout);
        std::exit(0);
      }
      bool found = false;
      for (const char* k : known) found = found || flag == k;
      if (!found) fail("unknown argument '" + flag + "'\n" + usage);
      if (i + 1 >= argc) fail(flag + ": needs a value");
      values[flag] = argv[i + 1];
    }
  }

  long long integer(const std::string& flag, long long minimum) const {
    return parse_integer(flag, minimum, nullptr);
  }
  long long integer_or(const std::string& flag, long long minimum, long long fallback) const {
    return parse_integer(flag, minimum, &fallback);
  }
  double positive(const std::string& flag) const { return parse_positive(flag, nullptr); }
  double positive_or(const std::string& flag, double fallback) const {
    return parse_positive(flag, &fallback);
  }

 private:
  long long parse_integer(const std::string& flag, long long minimum,
                          const long long* fallback) const {
    const auto it = values.find(flag);
    if (it == values.end()) {
      if (!fallback) fail(flag + ": required\n" + usage);
      return *fallback;
    }
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(it->second.c_str(), &end, 10);
    if (it->second.empty() || *end || errno)
      fail(flag + ": '" + it->second + "' is not an integer");
    if (v < minimum) fail(flag + ": must be >= " + std::to_string(minimum) + ", got " + it->second);
    return v;
  }
  double parse_positive(const std::string& flag, const double* fallback) const {
    const auto it = values.find(flag);
    if (it == values.end()) {
      if (!fallback) fail(flag + ": required\n" + usage);
      return *fallback;
    }
    char* end = nullptr;
    const double v = std::strtod(it->second.c_str(), &end);
    if (it->second.empty() || *end) fail(flag + ": '" + it->second + "' is not a number");
    if (!(v > 0) || v > 1e30) fail(flag + ": must be > 0, got " + it->second);
    return v;
  }
};

int narrow(const std::string& flag, long long v) {
  if (v > (1 << 30)) fail(flag + ": " + std::to_string(v) + " is too large");
  return int(v);
}

std::string gib(double bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.3f", bytes / double(1ull << 30));
  return text;
}

std::string mb(double bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f", bytes / 1e6);
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  const Arguments args(argc, argv);
  ModelShape shape;
  shape.hidden = narrow("--hidden", args.integer("--hidden", 1));
  shape.ffn = narrow("--ffn", args.integer("--ffn", 1));
  shape.experts = narrow("--experts", args.integer("--experts", 1));
  shape.top_k = narrow("--top-k", args.integer("--top-k", 1));
  if (shape.top_k > shape.experts)
    fail("--top-k: " + std::to_string(shape.top_k) + " exceeds --experts " +
         std::to_string(shape.experts));
  shape.shared_experts = narrow("--shared-experts", args.integer_or("--shared-experts", 0, 0));
  shape.shared_ffn = narrow("--shared-ffn", args.integer_or("--shared-ffn", 0, 0));
  if (shape.shared_experts > 0 && shape.shared_ffn < 1)
    fail("--shared-ffn: must be >= 1 with --shared-experts " +
         std::to_string(shape.shared_experts));
  shape.dtype_bytes = narrow("--dtype-bytes", args.integer_or("--dtype-bytes", 1, 2));
  if (shape.dtype_bytes != 2 && shape.dtype_bytes != 4 && shape.dtype_bytes != 8)
    fail("--dtype-bytes: must be 2, 4 or 8, got " + std::to_string(shape.dtype_bytes));
  shape.layers = narrow("--layers", args.integer_or("--layers", 1, 1));
  shape.bucket_bytes = (long long)(args.positive_or("--bucket-mb", 25.0) * (1 << 20));
  const long long tokens = args.integer("--tokens", 1);

  Machine machine;
  machine.ranks = narrow("--ranks", args.integer("--ranks", 1));
  machine.ranks_per_node =
      narrow("--ranks-per-node", args.integer_or("--ranks-per-node", 1, machine.ranks));
  if (machine.ranks % machine.ranks_per_node)
    fail("--ranks: " + std::to_string(machine.ranks) + " is not a multiple of --ranks-per-node " +
         std::to_string(machine.ranks_per_node));
  if (machine.ranks > 4096) fail("--ranks: at most 4096, got " + std::to_string(machine.ranks));
  machine.memory_per_rank = args.positive("--memory-per-rank") * double(1ull << 30);
  machine.intra_node_bandwidth = args.positive_or("--intra-bw", 150.0) * 1e9;
  machine.inter_node_bandwidth = args.positive_or("--inter-bw", 25.0) * 1e9;
  machine.flop_rate = args.positive_or("--tflops", 400.0) * 1e12;
  const long long top = args.integer_or("--top", 1, 10);

  Plan plan;
  try {
    plan = plan_layouts(shape, machine, tokens);
  } catch (const std::exception& e) {
    fail(e.what());
  }
  if (plan.feasible.empty()) {
    // Each reason names the flag it comes from.
    std::string reasons;
    for (const auto& [reason, count] : plan.excluded)
      reasons += (reasons.empty() ? "" : ", ") + std::to_string(count) + " by --" + reason;
    if (plan.excluded.count("memory-per-rank") && plan.smallest_memory > 0)
      fail("--memory-per-rank: " + gib(machine.memory_per_rank) +
           " GiB is less than any layout needs (the least: " + gib(plan.smallest_memory) +
           " GiB, " + plan.smallest_memory_layout + "); layouts excluded: " + reasons);
    fail("no layout of --ranks " + std::to_string(machine.ranks) + " is valid: excluded " +
         reasons);
  }

  std::printf(
      "kmoe-plan: %d layer(s) of H=%d F=%d E=%d top-%d, shared %d x %d, %d-byte elements, %lld tokens "
      "per step; %d ranks (%d per node), %s GiB per rank, %.0f / %.0f GB/s within / "
      "between nodes, %.0f TFLOP/s per rank\n",
      shape.layers, shape.hidden, shape.ffn, shape.experts, shape.top_k, shape.shared_experts,
      shape.shared_ffn, shape.dtype_bytes, tokens, machine.ranks, machine.ranks_per_node,
      gib(machine.memory_per_rank).c_str(), machine.intra_node_bandwidth / 1e9,
      machine.inter_node_bandwidth / 1e9, machine.flop_rate / 1e12);
  std::printf("uniform top-k routing; a training step (forward, backward, gradient all-reduce, "
              "AdamW); per rank, the worst rank shown\n\n");
  int shown = 0;
  for (const auto& c : plan.feasible) {
    if (shown == top) break;
    ++shown;
    const auto& t = c.traffic;
    const auto link = [&](std::initializer_list<Traffic> kinds) {
      LinkBytes sum;
      for (Traffic kind : kinds) sum += t[kind];
      return mb(sum.intra) + " / " + mb(sum.inter);
    };
    std::printf("%2d. %-26s placement %-22s step %9.3f ms (compute %.3f, communication %.3f)\n",
                shown, describe(c.layout).c_str(),
                c.any_placement
                    ? "block or round_robin"
                    : (c.layout.placement == kmoe::Placement::block ? "block" : "round_robin"),
                c.step_seconds() * 1e3, c.compute_seconds * 1e3, c.communication_seconds * 1e3);
    std::printf("    memory %s GiB = weights %s + gradients %s + optimizer %s + activations %s\n",
                gib(c.memory.total()).c_str(), gib(c.memory.weights).c_str(),
                gib(c.memory.gradients).c_str(), gib(c.memory.optimizer).c_str(),
                gib(c.memory.activations).c_str());
    std::printf("    MB within / between nodes: dispatch+combine %s, metadata %s, TP all-reduce "
                "%s, gradient all-reduce %s\n",
                link({Traffic::dispatch, Traffic::combine}).c_str(),
                link({Traffic::exchange_metadata}).c_str(), link({Traffic::tp_all_reduce}).c_str(),
                link({Traffic::gradient_all_reduce}).c_str());
  }
  if (int(plan.feasible.size()) > shown)
    std::printf("(%zu more feasible layouts; --top to show them)\n", plan.feasible.size() - shown);
  if (!plan.excluded.empty()) {
    std::printf("excluded:");
    for (const auto& [reason, count] : plan.excluded)
      std::printf(" %d by --%s;", count, reason.c_str());
    std::printf("\n");
  }
  std::printf("\n");
  for (const auto& line : plan.explanation) std::printf("%s\n", line.c_str());
  return 0;
}
