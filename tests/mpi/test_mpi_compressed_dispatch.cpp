// SPDX-License-Identifier: BSD-3-Clause
// LayerOptions::exchange_compression (exchange/compressed_payload.hpp) on every layout of
// the world with EP > 1, TP and DP mixed in:
//  (a) the bytes handed to the communicator: the hidden-state part halves, the dispatch's
//      header (counts and links, computed here from the routing by a plain loop) keeps its
//      bytes, and no 4-byte payload is left;
//  (b) bit for bit, the fp32 layer at the same layout whose rows are rounded to the wire
//      format by the test at the points the compressed exchange rounds them: the experts'
//      inputs and output gradients (RoundedExperts), the expert outputs returned and the
//      output gradients sent back (RoundedCombiner), and, with TP = 1, the input gradients
//      returned by the experts (RoundedExperts; with TP > 1 they are rounded after the TP
//      sum, where no policy of the reference can reach, so grad_x is compared within the
//      bound of one rounding per slot). Roundings by io/float16.hpp, not by the library.
//      Variants: the sender-sized dispatch, the pipelined one (inference and training with
//      recompute), the hierarchical route, input-weighted rows (no deduplication), capacity
//      with shared experts;
//  (c) the output and gradients within a documented tolerance of the uncompressed layer;
//  and the refusals: a double layer, ranks that disagree, fp16 values beyond 65504.
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/io/float16.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/planning/counting_communicator.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

using namespace kmoe;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = float;
using Router = SoftmaxTopKRouter<X, S>;
using GLU = SwiGLUExperts<X, S>;

constexpr int hidden = 16, ffn = 12, experts = 8, top_k = 3, tokens = 23;

/// The wire round trip of one value, by io/float16.hpp's reference conversions.
float through_wire(WireCompression format, float value) {
  if (format == WireCompression::bf16)
    return io::bfloat16_bits_to_float(io::to_bfloat16_bits(value));
  return io::half_bits_to_float(io::to_half_bits(value));
}

/// Unit roundoff of the wire format (half a unit in the last place, relative).
double unit_roundoff(WireCompression format) {
  return format == WireCompression::bf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
}

/// out = in through the wire, element by element (host views).
void round_into(WireCompression format, const ConstMatrix<S, X>& in, Matrix<S, X>& out) {
  X().fence();
  detail::ensure_extents(out, "kmoe::test::rounded", in.extent(0), in.extent(1));
  for (std::size_t i = 0; i < in.extent(0); ++i)
    for (std::size_t j = 0; j < in.extent(1); ++j) out(i, j) = through_wire(format, in(i, j));
}
void round_in_place(WireCompression format, const Matrix<S, X>& m) {
  X().fence();
  for (std::size_t i = 0; i < m.extent(0); ++i)
    for (std::size_t j = 0; j < m.extent(1); ++j) m(i, j) = through_wire(format, m(i, j));
}

/// GLU experts whose inputs and output gradients are rounded to the wire (what the
/// compressed dispatch and to_experts deliver) and, with `round_results`, whose outputs
/// and input gradients are too (what the return and from_experts deliver, when no TP sum
/// lies between). format none: the plain experts (the shared experts, never exchanged).
class RoundedExperts {
 public:
  using execution_space = X;
  using scalar_type = S;

  RoundedExperts(GLU inner, WireCompression format, bool round_results)
      : inner_(std::move(inner)), format_(format), round_results_(round_results) {}

  int num_experts() const { return inner_.num_experts(); }
  int hidden_size() const { return inner_.hidden_size(); }
  void forward(const ConstMatrix<S, X>& x, const Segments<X>& segments, const Matrix<S, X>& y,
               ExpertMode mode) {
    if (format_ == WireCompression::none) return inner_.forward(x, segments, y, mode);
    round_into(format_, x, x_);
    inner_.forward(x_, segments, y, mode);
    if (round_results_) round_in_place(format_, y);
  }
  void backward(const ConstMatrix<S, X>& x, const Segments<X>& segments,
                const ConstMatrix<S, X>& grad_y, const Matrix<S, X>& grad_x) {
    if (format_ == WireCompression::none) return inner_.backward(x, segments, grad_y, grad_x);
    round_into(format_, x, x_);
    round_into(format_, grad_y, grad_y_);
    inner_.backward(x_, segments, grad_y_, grad_x);
    if (round_results_) round_in_place(format_, grad_x);
  }
  void collect_parameters(ParameterList<X, S>& list) const { inner_.collect_parameters(list); }

 private:
  GLU inner_;
  WireCompression format_;
  bool round_results_;
  Matrix<S, X> x_, grad_y_;
};

/// The weighted sum of expert outputs rounded to the wire (what the return delivers, after
/// any TP sum), whose output gradients are rounded (what to_experts delivers). The layer
/// default-constructs its combiner: the format is a template argument.
template <WireCompression format_>
class RoundedCombiner {
 public:
  using execution_space = X;
  using scalar_type = S;
  using route_type = routing_t<S>;

  void combine(const ConstMatrix<S, X>& rows, const ConstMatrix<int, X>& position,
               const ConstMatrix<route_type, X>& weight, const ConstMatrix<S, X>& base,
               const Matrix<S, X>& y) const {
    round_into(format_, rows, rows_);
    inner_.combine(rows_, position, weight, base, y);
  }
  void backward(const ConstMatrix<S, X>& grad_y, const ConstMatrix<S, X>& rows,
                const ConstMatrix<int, X>& position, const ConstMatrix<route_type, X>& weight,
                const Matrix<S, X>& grad_rows, const Matrix<route_type, X>& grad_weight) const {
    round_into(format_, rows, rows_);
    inner_.backward(grad_y, rows_, position, weight, grad_rows, grad_weight);
    round_in_place(format_, grad_rows);
  }

 private:
  WeightedSumCombiner<X, S> inner_;
  mutable Matrix<S, X> rows_;
};

using Layer = MoELayer<Router, GLU, WeightedSumCombiner<X, S>, MpiCommunicator>;
template <WireCompression format>
using Reference = MoELayer<Router, RoundedExperts, RoundedCombiner<format>, MpiCommunicator>;

/// One configuration of the layer beyond the layout.
struct Variant {
  std::string name;
  bool training = true;
  ExpertMode mode = ExpertMode::store;  // recompute: the pipelined forward trains too
  int chunks = 1;
  bool hierarchical = false;
  RoutingWeightPlacement routing_weight = RoutingWeightPlacement::output;
  double capacity_factor = 0.0;
  bool shared = false;
};

LayerOptions options_of(const Variant& v, int world) {
  LayerOptions options;
  options.training_mode = v.mode;
  options.exchange_chunks = v.chunks;
  options.routing_weight = v.routing_weight;
  options.capacity.factor = v.capacity_factor;
  if (v.hierarchical) {
    options.nodes.exchange = ExchangeKind::hierarchical;
    options.nodes.ranks_per_node = world / 2;
  }
  return options;
}

InitConfig init_config() {
  InitConfig init;
  init.router_std = 0.4, init.input_std = 0.3, init.output_std = 0.2;
  return init;
}

template <class L, class E>
std::unique_ptr<L> make(const ParallelGroups<MpiCommunicator>& groups, const Variant& v,
                        LayerOptions options, const std::function<E(GLU, bool)>& wrap) {
  const auto owned = groups.layout.local_experts(experts, groups.ep_rank);
  std::optional<E> shared;
  if (v.shared) shared = wrap(GLU({1, hidden, 10}, "shared_experts"), true);
  auto layer =
      std::make_unique<L>(Router({hidden, experts, top_k}),
                          wrap(GLU({int(owned.size()), hidden, ffn / groups.layout.tp}), false),
                          options, shared, groups);
  initialize(layer->parameters(), init_config(), 7);
  return layer;
}

/// One step's results on this rank: output, input gradient, every parameter's gradient
/// (synchronised over the ranks that hold it).
struct Step {
  std::vector<float> y, grad_x;
  std::vector<std::vector<float>> grads;
  std::vector<std::string> names;
};

template <class L>
Step run(L& layer, const ParallelGroups<MpiCommunicator>& groups, const Variant& v,
         float scale = 1.0f) {
  const int token_group = groups.ep_rank + groups.layout.ep * groups.dp_rank;
  Matrix<S, X> x("x", tokens, hidden), grad_y("grad_y", tokens, hidden);
  Matrix<S, X> y("y", tokens, hidden), grad_x("grad_x", tokens, hidden);
  fill_normal(x, scale, 100 + token_group);
  fill_normal(grad_y, 0.1, 200 + token_group);
  RouteContext<X> context;
  context.training = v.training;
  layer.forward(x, y, context);
  Step step;
  step.y.assign(y.data(), y.data() + y.size());
  if (!v.training) return step;
  layer.backward(grad_y, grad_x);
  layer.synchronize_gradients();
  step.grad_x.assign(grad_x.data(), grad_x.data() + grad_x.size());
  for (const auto& p : layer.parameters()) {
    step.grads.emplace_back(p.grad.data(), p.grad.data() + p.grad.size());
    step.names.push_back(p.name);
  }
  return step;
}

std::size_t differing(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  std::size_t n = 0;
  for (std::size_t i = 0; i < a.size(); ++i) n += a[i] != b[i];
  return n;
}

/// max |a - b| / max |b|.
double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double error = 0, scale = 1e-30;
  for (std::size_t i = 0; i < a.size(); ++i) {
    error = std::max(error, std::abs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return error / scale;
}

std::vector<ParallelLayout> layouts_with_expert_parallelism(int world) {
  std::vector<ParallelLayout> all;
  for (auto [tp, ep, dp, order] :
       {std::array<int, 4>{1, 2, 1, 0}, {1, 4, 1, 0}, {1, 2, 2, 0}, {2, 2, 1, 0}, {2, 2, 1, 1}}) {
    ParallelLayout l;
    l.tp = tp, l.ep = ep, l.dp = dp;
    l.order = order == 0 ? RankOrder::tp_ep_dp : RankOrder::ep_tp_dp;
    if (l.world_size() == world) all.push_back(l);
  }
  return all;
}

std::vector<Variant> variants() {
  std::vector<Variant> all;
  all.push_back({"sender-sized dispatch"});
  Variant v;
  v = {"pipelined inference"};
  v.training = false, v.chunks = 2;
  all.push_back(v);
  v = {"pipelined training (recompute)"};
  v.mode = ExpertMode::recompute, v.chunks = 2;
  all.push_back(v);
  v = {"hierarchical route"};
  v.hierarchical = true;
  all.push_back(v);
  v = {"input-weighted rows"};
  v.routing_weight = RoutingWeightPlacement::input;
  all.push_back(v);
  v = {"capacity, shared experts"};
  v.capacity_factor = 1.0, v.shared = true;
  all.push_back(v);
  return all;
}

/// (b) for one layout, variant and format.
template <WireCompression format>
void check_against_rounded_reference(const ParallelGroups<MpiCommunicator>& groups,
                                     const Variant& v) {
  const ParallelLayout& layout = groups.layout;
  const int world = groups.world.size();
  const auto reference = make<Reference<format>, RoundedExperts>(
      groups, v, options_of(v, world), [&](GLU inner, bool shared) {
        return RoundedExperts(std::move(inner), shared ? WireCompression::none : format,
                              layout.tp == 1);
      });
  LayerOptions options = options_of(v, world);
  options.exchange_compression = format;
  const auto compressed =
      make<Layer, GLU>(groups, v, options, [](GLU inner, bool) { return inner; });
  const Step want = run(*reference, groups, v), got = run(*compressed, groups, v);
  CHECK(differing(got.y, want.y) == 0);
  if (!v.training) return;
  // With TP > 1 the input gradients the experts return are rounded after the TP sum, where
  // the reference cannot round them: grad_x, and with input-weighted rows the router's
  // gradient (from grad_weight = <returned row, x>), take one rounding per kept slot,
  // |error| <= u |g_s| each, |g_s| within twice their largest value for this small layer.
  const double after_tp_sum = 2 * top_k * unit_roundoff(format);
  const bool input_weighted = v.routing_weight == RoutingWeightPlacement::input;
  for (std::size_t p = 0; p < want.grads.size(); ++p) {
    CAPTURE(want.names[p]);
    if (layout.tp > 1 && input_weighted && want.names[p].rfind("router", 0) == 0)
      CHECK(relative_error(got.grads[p], want.grads[p]) <= after_tp_sum);
    else
      CHECK(differing(got.grads[p], want.grads[p]) == 0);
  }
  if (layout.tp == 1)
    CHECK(differing(got.grad_x, want.grad_x) == 0);
  else
    CHECK(relative_error(got.grad_x, want.grad_x) <= after_tp_sum);
}

}  // namespace

TEST_CASE("compressed dispatch and return: bit for bit the fp32 layer rounded at the same "
          "points, on every layout with EP > 1",
          "[mpi][compressed]") {
  const auto world = MpiCommunicator::world();
  for (const auto& layout : layouts_with_expert_parallelism(world.size())) {
    const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
    for (const auto& v : variants()) {
      CAPTURE(layout.tp, layout.ep, layout.dp, int(layout.order), v.name);
      check_against_rounded_reference<WireCompression::bf16>(groups, v);
      if (v.name == "sender-sized dispatch")
        check_against_rounded_reference<WireCompression::fp16>(groups, v);
    }
  }
}

namespace {

using Counting = CountingCommunicator<MpiCommunicator, X::memory_space>;
using CountedLayer = MoELayer<Router, GLU, WeightedSumCombiner<X, S>, Counting>;

/// All-to-all-v bytes of `element_bytes`-byte elements to each world rank.
std::map<int, std::int64_t> exchanged_bytes(const CommunicationLedger& ledger,
                                            std::size_t element_bytes) {
  std::map<int, std::int64_t> to;
  for (const auto& [key, entry] : ledger.entries())
    if (key.kind == CollectiveKind::all_to_all_v && key.element_bytes == element_bytes)
      for (const auto& [rank, bytes] : entry.bytes_to_world_rank) to[rank] += bytes;
  return to;
}

}  // namespace

TEST_CASE("compressed dispatch and return: the hidden-state bytes handed to the communicator "
          "halve, the header's stay",
          "[mpi][compressed]") {
  const auto world = MpiCommunicator::world();
  for (const auto& layout : layouts_with_expert_parallelism(world.size())) {
    CAPTURE(layout.tp, layout.ep, layout.dp, int(layout.order));
    auto ledger = std::make_shared<CommunicationLedger>();
    const auto groups = ParallelGroups<Counting>::create(Counting(world, ledger), layout);
    const auto owned = layout.local_experts(experts, groups.ep_rank);
    std::map<int, std::int64_t> sent[2];  // [compressed]: bytes to each world rank
    Matrix<int, X> expert_of("expert", tokens, top_k), position("position", tokens, top_k);
    for (int compressed = 0; compressed < 2; ++compressed) {
      LayerOptions options;
      options.exchange_compression = compressed ? WireCompression::bf16 : WireCompression::none;
      CountedLayer layer(Router({hidden, experts, top_k}),
                         GLU({int(owned.size()), hidden, ffn / layout.tp}), options, std::nullopt,
                         groups);
      initialize(layer.parameters(), init_config(), 7);
      const int token_group = groups.ep_rank + layout.ep * groups.dp_rank;
      Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden), grad("grad", tokens, hidden);
      fill_normal(x, 1.0, 100 + token_group);
      RouteContext<X> training;
      training.training = true;
      ledger->reset();
      layer.forward(x, y, training);
      layer.backward(y, grad);
      sent[compressed] = exchanged_bytes(*ledger, compressed ? sizeof(bfloat16) : sizeof(S));
      if (compressed) CHECK(exchanged_bytes(*ledger, sizeof(S)).empty());
      Kokkos::deep_copy(expert_of, layer.routing().expert);
      Kokkos::deep_copy(position, layer.positions());
    }
    // The header to each EP peer, by a plain loop over the routing: one value per expert of
    // the peer (its count) and one per kept assignment sent there (its link), whole rows.
    std::vector<int> owner(experts);
    std::vector<std::int64_t> header(layout.ep, 0), links(layout.ep, 0);
    for (int r = 0; r < layout.ep; ++r)
      for (int e : layout.local_experts(experts, r)) owner[e] = r, ++header[r];
    for (int t = 0; t < tokens; ++t)
      for (int s = 0; s < top_k; ++s)
        if (position(t, s) >= 0) ++links[owner[expert_of(t, s)]];
    Kokkos::View<int*, X::memory_space> mine("mine", 1), world_rank("world_rank", layout.ep);
    mine(0) = world.rank();
    groups.ep.inner().all_gather(mine, world_rank);
    std::size_t peers = 0;
    for (int r = 0; r < layout.ep; ++r) {
      if (r == groups.ep_rank) continue;
      ++peers;
      const std::int64_t header_bytes =
          std::int64_t(sizeof(S)) * ((header[r] + links[r] + hidden - 1) / hidden * hidden);
      const std::int64_t plain = sent[0][world_rank(r)], wire = sent[1][world_rank(r)];
      CAPTURE(r, header_bytes, plain, wire);
      CHECK(plain > 2 * header_bytes);
      CHECK(wire == header_bytes + (plain - header_bytes) / 2);
    }
    CHECK(sent[1].size() == peers);
  }
}

TEST_CASE("compressed dispatch and return: output and gradients within the wire format's "
          "tolerance of the uncompressed layer",
          "[mpi][compressed]") {
  const auto world = MpiCommunicator::world();
  const Variant v{"sender-sized dispatch"};
  for (const auto& layout : layouts_with_expert_parallelism(world.size())) {
    const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
    for (const auto format : {WireCompression::bf16, WireCompression::fp16}) {
      CAPTURE(layout.tp, layout.ep, layout.dp, int(layout.order), wire_compression_name(format));
      const auto plain_layer = make<Layer, GLU>(groups, v, options_of(v, world.size()),
                                                [](GLU inner, bool) { return inner; });
      LayerOptions options = options_of(v, world.size());
      options.exchange_compression = format;
      const auto compressed_layer =
          make<Layer, GLU>(groups, v, options, [](GLU inner, bool) { return inner; });
      const Step want = run(*plain_layer, groups, v), got = run(*compressed_layer, groups, v);
      const double u = unit_roundoff(format);
      const double y_error = relative_error(got.y, want.y);
      const double x_error = relative_error(got.grad_x, want.grad_x);
      double grad_error = 0;
      for (std::size_t p = 0; p < want.grads.size(); ++p)
        grad_error = std::max(grad_error, relative_error(got.grads[p], want.grads[p]));
      CAPTURE(y_error / u, x_error / u, grad_error / u);
      CHECK(y_error > 0);  // the rows were rounded
      CHECK(y_error <= 4 * u);
      CHECK(x_error <= 4 * u);
      CHECK(grad_error <= 8 * u);
    }
  }
}

TEST_CASE("compressed dispatch and return: refused for double layers and when ranks disagree, "
          "fp16 overflow raises",
          "[mpi][compressed]") {
  const auto world = MpiCommunicator::world();
  ParallelLayout layout;
  layout.ep = world.size();
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  const auto owned = layout.local_experts(experts, groups.ep_rank);
  SECTION("a double layer") {
    using Double = MoELayer<SoftmaxTopKRouter<X, double>, SwiGLUExperts<X, double>,
                            WeightedSumCombiner<X, double>, MpiCommunicator>;
    LayerOptions options;
    options.exchange_compression = WireCompression::bf16;
    CHECK_THROWS_WITH(Double(SoftmaxTopKRouter<X, double>({hidden, experts, top_k}),
                             SwiGLUExperts<X, double>({int(owned.size()), hidden, ffn}), options,
                             std::nullopt, groups),
                      Catch::Matchers::ContainsSubstring("options.exchange_compression") &&
                          Catch::Matchers::ContainsSubstring("double"));
  }
  SECTION("ranks that disagree") {
    LayerOptions options;
    options.exchange_compression =
        world.rank() == 1 ? WireCompression::bf16 : WireCompression::none;
    const std::string rest = world.size() == 2 ? "rank 0 has " : "ranks 0, 2, 3 have ";
    CHECK_THROWS_WITH(Layer(Router({hidden, experts, top_k}), GLU({int(owned.size()), hidden, ffn}),
                            options, std::nullopt, groups),
                      Catch::Matchers::ContainsSubstring("exchange_compression: " + rest +
                                                         "none, rank 1 has bf16"));
  }
  SECTION("fp16 values beyond 65504") {
    const Variant v{"sender-sized dispatch"};
    LayerOptions options;
    options.exchange_compression = WireCompression::fp16;
    const auto layer = make<Layer, GLU>(groups, v, options, [](GLU inner, bool) { return inner; });
    CHECK_THROWS_WITH(run(*layer, groups, v, 1e5f), Catch::Matchers::ContainsSubstring("65504"));
    // Within range the next step runs.
    CHECK_NOTHROW(run(*layer, groups, v));
  }
}

TEST_CASE("compressed dispatch and return: a Precision whose communication type is bf16 is the "
          "option, bit for bit",
          "[mpi][compressed][precision]") {
  using Wire = Precision<float, float, float, bfloat16>;
  using WireLayer = MoELayer<SoftmaxTopKRouter<X, Wire>, SwiGLUExperts<X, Wire>,
                             WeightedSumCombiner<X, Wire>, MpiCommunicator>;
  const auto world = MpiCommunicator::world();
  ParallelLayout layout;
  layout.ep = world.size();
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  const auto owned = layout.local_experts(experts, groups.ep_rank);
  const Variant v{"sender-sized dispatch"};
  LayerOptions options;
  options.exchange_compression = WireCompression::bf16;
  const auto by_option =
      make<Layer, GLU>(groups, v, options, [](GLU inner, bool) { return inner; });
  WireLayer by_precision(SoftmaxTopKRouter<X, Wire>({hidden, experts, top_k}),
                         SwiGLUExperts<X, Wire>({int(owned.size()), hidden, ffn}), {}, std::nullopt,
                         groups);
  CHECK(by_precision.options().exchange_compression == WireCompression::bf16);
  initialize(by_precision.parameters(), init_config(), 7);
  const Step want = run(*by_option, groups, v), got = run(by_precision, groups, v);
  CHECK(differing(got.y, want.y) == 0);
  CHECK(differing(got.grad_x, want.grad_x) == 0);
  for (std::size_t p = 0; p < want.grads.size(); ++p) {
    CAPTURE(want.names[p]);
    CHECK(differing(got.grads[p], want.grads[p]) == 0);
  }
  // An option naming another format contradicts the Precision.
  options.exchange_compression = WireCompression::fp16;
  CHECK_THROWS_WITH(WireLayer(SoftmaxTopKRouter<X, Wire>({hidden, experts, top_k}),
                              SwiGLUExperts<X, Wire>({int(owned.size()), hidden, ffn}), options,
                              std::nullopt, groups),
                    Catch::Matchers::ContainsSubstring("options.exchange_compression") &&
                        Catch::Matchers::ContainsSubstring("fp16"));
}
