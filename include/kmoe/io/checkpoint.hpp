// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file checkpoint.hpp
/// \brief Training checkpoints that survive the end of a job and restart on another
/// parallel layout (docs/training.md, "Checkpoint and restart").
///
/// A checkpoint is a directory: one safetensors file per rank that owns something
/// (`rank-<r>.safetensors`) and `index.json`, written by rank 0 last. Tensors are stored by
/// their *global* identity, one tensor per expert ("experts.w_up.5"), with the F range of a
/// tensor-parallel slice in the name ("experts.w_up.5@f6:12"), so a restart on any layout
/// reads just the slices its ranks hold now. Each replica is written once (by the rank that
/// counts it in the global norm). Optimizer state is stored like its parameter, under
/// PyTorch's names ("router.weight.exp_avg"); a sharded optimizer (ZeRO) gathers its
/// shards into that same form, so a checkpoint does not depend on the sharding either.
///
/// Consistency: every file is staged under a temporary name and renamed when complete; the
/// index appears only after every rank's file did, and is removed first when a directory is
/// overwritten, so a directory without `index.json` is an incomplete checkpoint that
/// `latest_checkpoint` ignores. Loading reads and checks everything on every rank, agrees,
/// and only then writes into the layer and the optimizer: a corrupt, partial or mismatched
/// checkpoint raises on every rank and changes nothing. Saving and loading both run the
/// layer's replica-consistency check (MoELayer::check_replicas).

#include <kmoe/agreement.hpp>
#include <kmoe/detail/detect.hpp>
#include <kmoe/global_clip.hpp>
#include <kmoe/io/file.hpp>
#include <kmoe/io/json.hpp>
#include <kmoe/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

namespace kmoe::io {

/// \brief What a training loop keeps besides weights and optimizer state. kmoe's random
/// numbers (router noise) are counter-based, keyed by the step a caller passes in
/// RouteContext, so `step` is also the RNG position.
struct TrainingProgress {
  long long step = 0;
  std::map<std::string, double> values;  ///< e.g. a loss-scale, the data-loader position
};

namespace detail {
template <class R>
using router_bias_of = decltype(std::declval<const R&>().bias());

template <class O>
using optimizer_gather_state_of = decltype(std::declval<const O&>().gather_state());

/// A sharded optimizer (sharded_optimizer.hpp) holds only its shards of the state: it
/// assembles the whole state, which its state() then lists, for the checkpoint's lifetime
/// (collective: made on every rank at the same point) and frees it afterwards. Other
/// optimizers' state() aliases their storage already.
template <class Optimizer>
class WholeOptimizerState {
 public:
  static constexpr bool sharded = kmoe::detail::is_detected_v<optimizer_gather_state_of, Optimizer>;
  explicit WholeOptimizerState(const Optimizer& optimizer) : optimizer_(optimizer) {
    if constexpr (sharded) optimizer_.gather_state();
  }
  ~WholeOptimizerState() {
    if constexpr (sharded) optimizer_.release_state();
  }
  WholeOptimizerState(const WholeOptimizerState&) = delete;
  WholeOptimizerState& operator=(const WholeOptimizerState&) = delete;

 private:
  const Optimizer& optimizer_;
};

constexpr int checkpoint_format = 1;

inline std::string rank_file(int rank) { return "rank-" + std::to_string(rank) + ".safetensors"; }

template <class S>
constexpr DType dtype_of() {
  return std::is_same_v<S, double> ? DType::F64 : DType::F32;
}

/// One tensor to save or restore: a flat view (device or host) with a parameter's ShardMap.
template <class View>
struct ShardedTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  ShardMap shard;
  View value;
};

/// The slices of a local tensor in global identity: for a tensor with experts on axis 0,
/// one per local expert, named "<name>.<global expert>", plus "@f<b>:<e>" when its F axis
/// is split; otherwise the whole tensor under its name.
struct Slice {
  std::string name;
  std::int64_t local_expert = -1;   ///< -1: the whole tensor
  std::vector<std::int64_t> shape;  ///< the slice's own extents
  int ffn_axis = -1;                ///< axis of F within the slice (-1: none)
  std::int64_t ffn_begin = 0;       ///< F range this slice covers, in global F
  std::int64_t ffn_end = 0;
};

inline std::vector<Slice> slices_of(const std::string& name, const std::vector<std::int64_t>& shape,
                                    const ShardMap& shard) {
  if (shard.expert_axis < 0) return {Slice{name, -1, shape, -1, 0, 0}};
  require(shard.expert_axis == 0, "kmoe::io::save_checkpoint", ("expert_axis of " + name).c_str(),
          shard.expert_axis, "checkpoints store experts stacked on axis 0");
  std::vector<Slice> slices;
  const std::vector<std::int64_t> rest(shape.begin() + 1, shape.end());
  for (std::int64_t l = 0; l < shape[0]; ++l) {
    const std::int64_t global = shard.experts.empty() ? l : shard.experts[std::size_t(l)];
    Slice s{name + "." + std::to_string(global), l, rest, shard.ffn_axis - 1, 0, 0};
    if (shard.ffn_axis > 0) {
      const std::int64_t width = shape[std::size_t(shard.ffn_axis)];
      s.ffn_begin = shard.ffn_rank * width;
      s.ffn_end = s.ffn_begin + width;
      if (shard.ffn_ranks > 1)
        s.name += "@f" + std::to_string(s.ffn_begin) + ":" + std::to_string(s.ffn_end);
    }
    slices.push_back(s);
  }
  return slices;
}

inline std::int64_t product(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (auto e : shape) n *= e;
  return n;
}

inline std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

/// Parses "<base>@f<b>:<e>" into its range; false when `name` is not a slice of `base`.
inline bool parse_ffn_slice(const std::string& name, const std::string& base, std::int64_t& begin,
                            std::int64_t& end) {
  const std::string prefix = base + "@f";
  if (name.compare(0, prefix.size(), prefix) != 0) return false;
  const auto colon = name.find(':', prefix.size());
  if (colon == std::string::npos) return false;
  try {
    std::size_t used = 0;
    begin = std::stoll(name.substr(prefix.size(), colon - prefix.size()), &used);
    const std::string tail = name.substr(colon + 1);
    end = std::stoll(tail, &used);
    return used == tail.size() && begin >= 0 && end > begin;
  } catch (const std::exception&) {
    return false;
  }
}

/// Every tensor of a layer and its optimizer: parameters, optimizer state (sharded like its
/// parameter) and the router's selection bias if it has one (replicated).
template <class Layer, class Optimizer>
auto tensors_of(const Layer& layer, const Optimizer& optimizer) {
  using X = typename Layer::execution_space;
  using S = typename Layer::scalar_type;
  using Flat = Kokkos::View<S*, typename X::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  std::vector<ShardedTensor<Flat>> all;
  const auto parameters = layer.parameters();
  for (const auto& p : parameters) all.push_back({p.name, p.shape, p.shard, p.value});
  for (const auto& state : optimizer.state()) {
    const auto owner = std::find_if(parameters.begin(), parameters.end(),
                                    [&](const auto& p) { return p.name == state.parameter; });
    require(owner != parameters.end(), "kmoe::io::checkpoint", "optimizer state", state.name,
            "belongs to no parameter of the layer");
    all.push_back(
        {state.name, owner->shape, owner->shard, Flat(state.value.data(), state.value.size())});
  }
  return all;
}

/// Every rank's `text`, on every rank (lengths first, then the bytes packed into int64
/// values, the element type every communicator moves).
template <class X, class Communicator>
std::vector<std::string> gather_strings(Communicator& world, const std::string& text) {
  const int ranks = world.size();
  Vector<std::int64_t, X> length("kmoe::io::length", 1),
      lengths("kmoe::io::lengths", std::size_t(ranks));
  auto one = Kokkos::create_mirror_view(length);
  one(0) = std::int64_t(text.size());
  Kokkos::deep_copy(length, one);
  world.all_gather(length, lengths);
  auto all = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), lengths);
  std::int64_t longest = 0;
  for (int r = 0; r < ranks; ++r) longest = std::max(longest, all(r));
  Vector<std::int64_t, X> mine("kmoe::io::text", std::size_t(longest)),
      every("kmoe::io::texts", std::size_t(longest) * std::size_t(ranks));
  auto mine_host = Kokkos::create_mirror_view(mine);
  for (std::int64_t i = 0; i < longest; ++i)
    mine_host(i) = i < std::int64_t(text.size())
                       ? std::int64_t(static_cast<unsigned char>(text[std::size_t(i)]))
                       : 0;
  Kokkos::deep_copy(mine, mine_host);
  if (longest > 0) world.all_gather(mine, every);
  auto every_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), every);
  std::vector<std::string> out(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r)
    for (std::int64_t i = 0; i < all(r); ++i)
      out[std::size_t(r)] += char(every_host(r * longest + i));
  return out;
}

template <class Groups>
bool owns(const ShardMap& shard, const Groups& groups) {
  Parameter<Kokkos::DefaultHostExecutionSpace, float> probe;
  probe.shard = shard;
  return kmoe::detail::counts_toward_global_norm(probe, groups);
}
}  // namespace detail

/// \brief Saves the layer's weights, the optimizer's state and step, the router's selection
/// bias and pending counts, the layout and `progress` into `directory` (created if needed;
/// an existing checkpoint there is replaced). Collective over the layer's world group.
template <class Layer, class Optimizer>
void save_checkpoint(const std::string& directory, Layer& layer, const Optimizer& optimizer,
                     const TrainingProgress& progress = {}) {
  constexpr const char* where = "kmoe::io::save_checkpoint";
  using S = typename Layer::scalar_type;
  namespace fs = std::filesystem;
  const auto& groups = layer.groups();
  auto world = groups.world;
  const int rank = world.rank();
  // Each replica is written once, by one rank: they must all be equal for that to be the
  // model every rank trained (raises on every rank naming the tensor otherwise).
  layer.check_replicas();
  const detail::WholeOptimizerState<Optimizer> whole_state(optimizer);
  // Rank 0 prepares the directory and withdraws any previous index before a shard changes.
  agree_or_throw(world, where, [&] {
    if (rank != 0) return;
    std::error_code ec;
    fs::create_directories(directory, ec);
    if (ec)
      throw runtime_error(std::string(where) + ": cannot create " + directory + ": " +
                          ec.message());
    fs::remove(fs::path(directory) / "index.json", ec);
    if (ec)
      throw runtime_error(std::string(where) + ": cannot replace " + directory + "/index.json");
  });
  std::vector<std::string> written;
  agree_or_throw(world, where, [&] {
    SafetensorsWriter writer;
    for (const auto& t : detail::tensors_of(layer, optimizer)) {
      if (!detail::owns(t.shard, groups)) continue;
      auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), t.value);
      for (const auto& slice : detail::slices_of(t.name, t.shape, t.shard)) {
        const std::int64_t count = detail::product(slice.shape);
        const S* data = host.data() + (slice.local_expert < 0 ? 0 : slice.local_expert * count);
        writer.add(slice.name, detail::dtype_of<S>(), slice.shape, data);
        written.push_back(slice.name);
      }
    }
    using RouterType = std::decay_t<decltype(layer.router())>;
    if constexpr (kmoe::detail::is_detected_v<detail::router_bias_of, RouterType>) {
      // An empty bias() is none (a SoftmaxTopKRouter without selection_bias).
      if (rank == 0 && layer.router().bias().size() > 0) {
        auto bias = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.router().bias());
        writer.add("router.selection_bias",
                   detail::dtype_of<typename std::decay_t<decltype(bias)>::value_type>(),
                   {std::int64_t(bias.size())}, bias.data());
        written.push_back("router.selection_bias");
      }
    }
    if (!written.empty()) writer.write((fs::path(directory) / detail::rank_file(rank)).string());
  });
  // Every rank's names reach rank 0 for the index; the index is written last.
  std::string names;
  for (const auto& n : written) names += n + "\n";
  const std::vector<std::string> per_rank =
      detail::gather_strings<typename Layer::execution_space>(world, names);
  agree_or_throw(world, where, [&] {
    if (rank != 0) return;
    nlohmann::ordered_json index;
    index["format"] = detail::checkpoint_format;
    index["kind"] = "kmoe training checkpoint";
    index["layout"] = {{"tp", groups.layout.tp},
                       {"ep", groups.layout.ep},
                       {"dp", groups.layout.dp},
                       {"order", int(groups.layout.order)},
                       {"placement", int(groups.layout.placement)}};
    index["scalar"] = dtype_name(detail::dtype_of<S>());
    index["optimizer_steps"] = optimizer.steps();
    index["step"] = progress.step;
    index["values"] = progress.values;
    index["pending_bias_counts"] = layer.pending_bias_counts();
    nlohmann::ordered_json shapes = nlohmann::ordered_json::object();
    for (const auto& t : detail::tensors_of(layer, optimizer))
      shapes[t.name] = t.shard.global_shape(t.shape);
    index["global_shapes"] = shapes;
    nlohmann::ordered_json map = nlohmann::ordered_json::object();
    for (int r = 0; r < world.size(); ++r) {
      std::size_t at = 0;
      const auto& text = per_rank[std::size_t(r)];
      while (at < text.size()) {
        const auto end = text.find('\n', at);
        map[text.substr(at, end - at)] = detail::rank_file(r);
        at = end + 1;
      }
    }
    index["weight_map"] = map;
    const std::string text = index.dump(1);
    StagedFile out((fs::path(directory) / "index.json").string(), where);
    out.write(text.data(), text.size());
    out.commit();
  });
}

namespace detail {
/// The saved pieces of one slice base name: the whole slice, or F ranges of it.
struct SavedPiece {
  std::string name;
  std::string file;
  std::int64_t ffn_begin = 0, ffn_end = -1;  ///< -1: the whole F axis
};

/// Copies the part of `piece` (a slice of extents `piece_shape`, covering F [pb, pe)) that
/// falls in the target slice (extents `shape`, covering F [tb, te)) into `target`; returns
/// how many F columns it filled.
template <class S>
std::int64_t copy_overlap(const std::vector<S>& piece, const std::vector<std::int64_t>& piece_shape,
                          std::int64_t pb, std::int64_t pe, S* target,
                          const std::vector<std::int64_t>& shape, int ffn_axis, std::int64_t tb,
                          std::int64_t te) {
  const std::int64_t lo = std::max(pb, tb), hi = std::min(pe, te);
  if (lo >= hi) return 0;
  const int rank = int(shape.size());
  const std::int64_t n = product(shape);
  std::vector<std::int64_t> c(static_cast<std::size_t>(rank));
  for (std::int64_t i = 0; i < n; ++i) {
    std::int64_t rest = i;
    for (int a = rank - 1; a >= 0; --a) {
      c[std::size_t(a)] = rest % shape[std::size_t(a)];
      rest /= shape[std::size_t(a)];
    }
    if (ffn_axis >= 0) {
      const std::int64_t f = tb + c[std::size_t(ffn_axis)];
      if (f < lo || f >= hi) continue;
      c[std::size_t(ffn_axis)] = f - pb;
    }
    std::int64_t j = 0;
    for (int a = 0; a < rank; ++a) j = j * piece_shape[std::size_t(a)] + c[std::size_t(a)];
    target[i] = piece[std::size_t(j)];
  }
  return hi - lo;
}
}  // namespace detail

/// \brief Restores what save_checkpoint wrote into `layer` and `optimizer`, on whatever
/// layout they have now (each rank reads the slices it holds); returns the saved progress.
/// Collective over the layer's world group. Raises kmoe::runtime_error naming the file and
/// tensor on every rank for a missing, truncated or mismatched checkpoint, and then has
/// changed nothing.
template <class Layer, class Optimizer>
TrainingProgress load_checkpoint(const std::string& directory, Layer& layer, Optimizer& optimizer) {
  constexpr const char* where = "kmoe::io::load_checkpoint";
  using S = typename Layer::scalar_type;
  namespace fs = std::filesystem;
  auto world = layer.groups().world;
  const detail::WholeOptimizerState<Optimizer> whole_state(optimizer);
  const auto tensors = detail::tensors_of(layer, optimizer);
  std::vector<std::vector<S>> staged(tensors.size());
  std::vector<double> bias;
  std::vector<std::int64_t> counts;
  long long optimizer_steps = 0;
  TrainingProgress progress;
  agree_or_throw(world, where, [&] {
    const std::string index_path = (fs::path(directory) / "index.json").string();
    std::error_code missing;
    if (!fs::exists(fs::symlink_status(index_path, missing)))
      throw runtime_error(std::string(where) + ": " + index_path +
                          ": does not exist (no complete checkpoint in " + directory + ")");
    // The index is untrusted input like any file: bounded size, regular file, strict JSON.
    const nlohmann::json index = parse_json(
        read_small_file(index_path, io::detail::max_index_bytes, where), index_path, where);
    const auto field = [&](const char* name) -> const nlohmann::json& {
      if (!index.is_object() || !index.contains(name))
        throw runtime_error(std::string(where) + ": " + index_path + ": missing field \"" + name +
                            "\"");
      return index[name];
    };
    try {
      if (field("format").template get<int>() != detail::checkpoint_format)
        throw runtime_error(std::string(where) + ": " + index_path + ": format " +
                            json_excerpt(field("format")) + " is not " +
                            std::to_string(detail::checkpoint_format));
      optimizer_steps = field("optimizer_steps").template get<long long>();
      progress.step = field("step").template get<long long>();
      progress.values = field("values").template get<std::map<std::string, double>>();
      counts = field("pending_bias_counts").template get<std::vector<std::int64_t>>();
    } catch (const nlohmann::json::exception& e) {
      throw runtime_error(std::string(where) + ": " + index_path + ": " + e.what());
    }
    const auto& shapes = field("global_shapes");
    const auto& weight_map = field("weight_map");
    if (!shapes.is_object() || !weight_map.is_object())
      throw runtime_error(std::string(where) + ": " + index_path +
                          ": global_shapes and weight_map must be objects");
    require(counts.size() == layer.pending_bias_counts().size(), where, "pending_bias_counts",
            counts.size(),
            "must have one count per expert (" +
                std::to_string(layer.pending_bias_counts().size()) + ")");
    // Saved pieces by slice base name.
    std::map<std::string, std::vector<detail::SavedPiece>> pieces;
    for (auto it = weight_map.begin(); it != weight_map.end(); ++it) {
      if (!it.value().is_string())
        throw runtime_error(std::string(where) + ": " + index_path + ": weight_map entry " +
                            it.key() + " is not a file name");
      const std::string file = it.value().template get<std::string>();
      if (file.find('/') != std::string::npos || file == "." || file == "..")
        throw runtime_error(std::string(where) + ": " + index_path + ": weight_map file " + file +
                            " is not a plain file name inside the checkpoint");
      const std::string& name = it.key();
      const auto at = name.rfind("@f");
      detail::SavedPiece piece{name, file, 0, -1};
      std::string base = name;
      if (at != std::string::npos &&
          detail::parse_ffn_slice(name, name.substr(0, at), piece.ffn_begin, piece.ffn_end))
        base = name.substr(0, at);
      pieces[base].push_back(piece);
    }
    std::map<std::string, SafetensorsFile> files;
    const auto open = [&](const std::string& file) -> const SafetensorsFile& {
      auto found = files.find(file);
      if (found == files.end())
        found = files.emplace(file, SafetensorsFile((fs::path(directory) / file).string())).first;
      return found->second;
    };
    for (std::size_t t = 0; t < tensors.size(); ++t) {
      const auto& tensor = tensors[t];
      const auto global = tensor.shard.global_shape(tensor.shape);
      if (!shapes.contains(tensor.name))
        throw runtime_error(std::string(where) + ": " + index_path + ": no tensor " + tensor.name +
                            " in the checkpoint");
      std::vector<std::int64_t> saved_global;
      try {
        saved_global = shapes[tensor.name].template get<std::vector<std::int64_t>>();
      } catch (const nlohmann::json::exception& e) {
        throw runtime_error(std::string(where) + ": " + index_path + ": global_shapes of " +
                            tensor.name + ": " + e.what());
      }
      if (saved_global != global)
        throw runtime_error(std::string(where) + ": " + index_path + ": tensor " + tensor.name +
                            " has shape " + detail::shape_text(saved_global) +
                            " in the checkpoint but " + detail::shape_text(global) +
                            " in this model");
      staged[t].assign(std::size_t(detail::product(tensor.shape)), S(0));
      for (const auto& slice : detail::slices_of(tensor.name, tensor.shape, tensor.shard)) {
        const std::string base =
            slice.name.substr(0, std::min(slice.name.size(), slice.name.rfind("@f")));
        const auto found = pieces.find(base);
        if (found == pieces.end())
          throw runtime_error(std::string(where) + ": " + index_path + ": no tensor " + base +
                              " in the checkpoint's weight map");
        const std::int64_t count = detail::product(slice.shape);
        S* target = staged[t].data() + (slice.local_expert < 0 ? 0 : slice.local_expert * count);
        const std::int64_t global_f =
            slice.ffn_axis >= 0 ? global[std::size_t(slice.ffn_axis + 1)] : 0;
        const std::int64_t tb = slice.ffn_axis >= 0 ? slice.ffn_begin : 0;
        const std::int64_t te = slice.ffn_axis >= 0 ? slice.ffn_end : 0;
        std::int64_t covered = 0;
        for (const auto& piece : found->second) {
          const auto& file = open(piece.file);
          const auto& info = file.info(piece.name);
          const std::int64_t pb = piece.ffn_end < 0 ? 0 : piece.ffn_begin;
          const std::int64_t pe = piece.ffn_end < 0 ? global_f : piece.ffn_end;
          std::vector<std::int64_t> expected = slice.shape;
          if (slice.ffn_axis >= 0) expected[std::size_t(slice.ffn_axis)] = pe - pb;
          std::vector<std::int64_t> stored(info.shape.begin(), info.shape.end());
          if (stored != expected)
            throw runtime_error(std::string(where) + ": " + file.path() + ": tensor " + piece.name +
                                " has shape " + detail::shape_text(stored) + ", expected " +
                                detail::shape_text(expected));
          const auto values = file.template read<S>(piece.name);
          if (slice.ffn_axis < 0) {
            std::copy(values.begin(), values.end(), target);
            covered = 1;
          } else {
            covered += detail::copy_overlap(values, stored, pb, pe, target, slice.shape,
                                            slice.ffn_axis, tb, te);
          }
        }
        const std::int64_t needed = slice.ffn_axis >= 0 ? te - tb : 1;
        if (covered != needed)
          throw runtime_error(std::string(where) + ": " + index_path + ": the pieces of " + base +
                              " cover " + std::to_string(covered) + " of the " +
                              std::to_string(needed) + " F columns this rank needs");
      }
    }
    using RouterType = std::decay_t<decltype(layer.router())>;
    if constexpr (kmoe::detail::is_detected_v<detail::router_bias_of, RouterType>) {
      const auto found = pieces.find("router.selection_bias");
      if (layer.router().bias().size() == 0) {
        if (found != pieces.end())
          throw runtime_error(std::string(where) + ": " + index_path +
                              ": router.selection_bias saved, but this router has none");
      } else if (found == pieces.end()) {
        throw runtime_error(std::string(where) + ": " + index_path +
                            ": no router.selection_bias for this router");
      } else {
        const auto& file = open(found->second.front().file);
        const auto values = file.template read<double>("router.selection_bias");
        require(values.size() == std::size_t(layer.num_experts()), where,
                "router.selection_bias size", values.size(), "must equal the number of experts");
        bias = values;
      }
    }
  });
  // Everything read and checked on every rank: only now does anything change.
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    Kokkos::View<const S*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> host(
        staged[t].data(), staged[t].size());
    Kokkos::deep_copy(tensors[t].value, host);
  }
  if constexpr (detail::WholeOptimizerState<Optimizer>::sharded) optimizer.scatter_state();
  using RouterType = std::decay_t<decltype(layer.router())>;
  if constexpr (kmoe::detail::is_detected_v<detail::router_bias_of, RouterType>) {
    const auto view = layer.router().bias();
    auto host = Kokkos::create_mirror_view(view);
    for (std::size_t e = 0; e < bias.size(); ++e)
      host(e) = typename std::decay_t<decltype(host)>::value_type(bias[e]);
    Kokkos::deep_copy(view, host);
  }
  optimizer.set_steps(optimizer_steps);
  layer.set_pending_bias_counts(counts);
  // Every rank read its replicas from the same saved slice; a difference now means a file
  // changed between the ranks' reads.
  layer.check_replicas();
  return progress;
}

/// \brief The newest complete checkpoint under `root`: the subdirectory with an index.json
/// and the highest "step" in it; empty if there is none (an interrupted save has no index).
inline std::string latest_checkpoint(const std::string& root) {
  namespace fs = std::filesystem;
  std::string best;
  long long best_step = -1;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return best;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    const std::string index_path = (entry.path() / "index.json").string();
    if (!fs::exists(fs::symlink_status(index_path, ec))) continue;
    try {
      constexpr const char* where = "kmoe::io::latest_checkpoint";
      const auto index = parse_json(read_small_file(index_path, io::detail::max_index_bytes, where),
                                    index_path, where);
      const long long step = index.at("step").get<long long>();
      if (step > best_step) best_step = step, best = entry.path().string();
    } catch (const std::exception&) {
      continue;  // not a readable index: an interrupted save or a file that is not ours
    }
  }
  return best;
}

}  // namespace kmoe::io
