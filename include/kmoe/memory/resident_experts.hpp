// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file resident_experts.hpp
/// \brief kmoe::ResidentExperts: an Expert policy whose E experts live in a backing store
/// (memory/host_expert_store.hpp, or a checkpoint read lazily: models/checkpoint_expert_store.hpp)
/// while only K of them are resident in the compute memory space; each forward brings in the
/// experts its tokens chose, evicting others (memory/slot_cache.hpp). docs/memory.md
/// describes the policy, training and the figures.
///
/// The K resident slots are an ordinary Expert policy `Inner` built with K experts (the
/// GEMMs, activations and saved state are Inner's own). A forward maps each chosen expert
/// to its slot, loads the misses from the store (converting the store's type to Scalar),
/// permutes the rows into slot order and runs Inner on them: every segment meets the same
/// rows and the same weights as in the all-resident layer, so the output is bitwise the
/// same. Training (the store must hold master copies: HostExpertStore with gradients)
/// follows ZeRO-Offload: the layer's parameters are the store's host copies, backward adds
/// each slot's gradient into its expert's host gradient, the optimizer steps on the host,
/// and the slots are refilled from the host values at the next forward.

#include <kmoe/detail/detect.hpp>
#include <kmoe/error.hpp>
#include <kmoe/experts/expert_mode.hpp>
#include <kmoe/memory/slot_cache.hpp>
#include <kmoe/parameters.hpp>
#include <kmoe/segments.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace kmoe {

/// \brief How many experts may be resident in the compute memory space: at most `experts`
/// of them and at most `bytes` of expert weights (0: no limit of that kind).
struct ResidencyBudget {
  int experts = 0;
  std::int64_t bytes = 0;

  /// The resident slots this budget allows for experts of `expert_bytes` each out of
  /// `total` (never more than `total`); kmoe::invalid_argument if not even one fits.
  int slots(std::int64_t expert_bytes, int total) const {
    constexpr const char* where = "kmoe::ResidencyBudget";
    require(experts >= 0, where, "experts", experts, "must be 0 (no limit) or positive");
    require(bytes >= 0, where, "bytes", bytes, "must be 0 (no limit) or positive");
    std::int64_t k = total;
    if (experts > 0) k = std::min<std::int64_t>(k, experts);
    if (bytes > 0) k = std::min<std::int64_t>(k, bytes / expert_bytes);
    require(k >= 1, where, "bytes", bytes,
            "holds no expert of " + std::to_string(expert_bytes) + " bytes");
    return int(k);
  }
};

/// \brief What the residency policy did since construction (or reset_stats()).
struct ResidencyStats {
  std::int64_t forwards = 0;
  std::int64_t hits = 0;          ///< chosen experts found resident
  std::int64_t misses = 0;        ///< chosen experts brought in (loads)
  std::int64_t prefetched = 0;    ///< misses served from a prefetch (no wait on the store)
  std::int64_t store_bytes = 0;   ///< bytes read from the store, its own type (prefetch too)
  std::int64_t loaded_bytes = 0;  ///< bytes written into resident slots, compute type
  double load_ms = 0;             ///< time forward spent bringing experts in
  double hit_rate() const {
    return hits + misses == 0 ? 1.0 : double(hits) / double(hits + misses);
  }
};

namespace detail {
template <class Store, class S>
using store_master_of = decltype(std::declval<const Store&>().template master_values<S>(""));

/// to(i, :) = from(source(i), :). Free functions: nvcc rejects KOKKOS_LAMBDA in private members.
template <class X, class S>
void gather_rows(const ConstMatrix<S, X>& from, const Vector<int, X>& source,
                 const Matrix<S, X>& to) {
  const int cols = int(from.extent(1));
  Kokkos::parallel_for(
      "kmoe::ResidentExperts::gather_rows", Kokkos::RangePolicy<X>(0, int(source.extent(0))),
      KOKKOS_LAMBDA(int i) {
        for (int c = 0; c < cols; ++c) to(i, c) = from(source(i), c);
      });
}
/// to(source(i), :) = from(i, :).
template <class X, class S>
void scatter_rows(const ConstMatrix<S, X>& from, const Vector<int, X>& source,
                  const Matrix<S, X>& to) {
  const int cols = int(from.extent(1));
  Kokkos::parallel_for(
      "kmoe::ResidentExperts::scatter_rows", Kokkos::RangePolicy<X>(0, int(source.extent(0))),
      KOKKOS_LAMBDA(int i) {
        for (int c = 0; c < cols; ++c) to(source(i), c) = from(i, c);
      });
}
}  // namespace detail

/// \brief E experts in a backing store `Store`, K = slots.num_experts() of them resident in
/// `Inner` (an Expert policy built with K experts, e.g. SwiGLUExperts({K, H, F})).
///
/// A batch choosing more than K distinct experts raises kmoe::invalid_argument naming the
/// budget and the count needed. Copies share the slots (as Kokkos views do), the slot map,
/// the prefetch staging and the store.
template <class Inner, class Store>
class ResidentExperts {
 public:
  using execution_space = typename Inner::execution_space;
  using scalar_type = typename Inner::scalar_type;
  using X = execution_space;
  using S = scalar_type;

  /// \param slots    [in] the resident slots: an Inner of K experts (its weights are
  ///                 overwritten from the store)
  /// \param store    [in] every expert's tensors, under Inner's parameter names
  /// \param eviction [in] which resident expert a miss replaces
  ResidentExperts(Inner slots, Store store, Eviction eviction = Eviction::lru)
      : slots_(std::move(slots)), store_(std::move(store)) {
    constexpr const char* where = "kmoe::ResidentExperts";
    const int k = slots_.num_experts(), e = store_.num_experts();
    require(k <= e, where, "slots.num_experts()", k,
            "must not exceed the store's " + std::to_string(e) + " experts");
    ParameterList<X, S> list;
    slots_.collect_parameters(list);
    for (const auto& p : list) {
      require(!p.shape.empty() && p.shape[0] == k, where, "parameter", p.name,
              "must stack its experts first, " + std::to_string(k) + " of them");
      SlotTensor t{p.name,  p.value, p.grad,          std::int64_t(p.value.size()) / k,
                   p.shape, p.role,  p.shard.ffn_axis};
      require(store_.expert_elements(p.name) == t.elements, where, "parameter", p.name,
              "has " + std::to_string(t.elements) + " elements per expert, the store " +
                  std::to_string(store_.expert_elements(p.name)));
      expert_bytes_ += t.elements * std::int64_t(sizeof(S));
      tensors_.push_back(std::move(t));
    }
    cache_ = std::make_shared<SlotCache>(k, e, eviction);
    slot_segments_.offsets_host =
        Kokkos::View<int*, Kokkos::HostSpace>("kmoe::ResidentExperts::offsets_host", k + 1);
  }

  int num_experts() const { return store_.num_experts(); }
  int hidden_size() const { return slots_.hidden_size(); }
  /// Resident slots K.
  int slots() const { return cache_->slots(); }
  /// Bytes of one expert's weights in the compute space (Scalar).
  std::int64_t expert_bytes() const { return expert_bytes_; }
  /// \brief Bytes of expert weights resident in the compute space now (filled slots;
  /// never more than slots() x expert_bytes()).
  std::size_t resident_bytes() const { return std::size_t(cache_->resident()) * expert_bytes_; }
  const ResidencyStats& residency_stats() const { return stats_; }
  void reset_stats() { stats_ = {}; }
  const Store& store() const { return store_; }
  const Inner& resident_slots() const { return slots_; }
  const SlotCache& slot_cache() const { return *cache_; }

  /// Tensor parallelism: passed on to the slots (FFNExperts' output bias).
  template <class I = Inner>
  auto apply_output_bias(bool apply) -> decltype(std::declval<I&>().apply_output_bias(apply)) {
    slots_.apply_output_bias(apply);
  }

  /// \brief Hints the experts the next batch will choose (e.g. from its routing, computed
  /// ahead). The next forward, once it has placed its own experts, reads the hinted ones
  /// that are not resident from the store on another thread into host staging while it
  /// computes; the forward after it copies a staged expert it misses instead of waiting on
  /// the store. At most slots() experts are staged; a new hint replaces the previous one.
  void prefetch(const std::vector<int>& experts) {
    for (int e : experts)
      require(e >= 0 && e < num_experts(), "kmoe::ResidentExperts::prefetch", "expert", e,
              "must lie in [0, " + std::to_string(num_experts()) + ")");
    prefetch_->hint = experts;
  }

  /// \brief Forgets every resident expert and staged prefetch: call it after writing the
  /// store's values directly (backward calls it itself, since an optimizer step follows).
  void invalidate_resident() {
    settle_prefetch(true);
    prefetch_->staged.clear();
    prefetch_->hint.clear();
    cache_->clear();
  }

  void forward(const ConstMatrix<S, X>& x, const Segments<X>& segments, const Matrix<S, X>& y,
               ExpertMode mode) {
    constexpr const char* where = "kmoe::ResidentExperts::forward";
    require(segments.experts() == num_experts(), where, "segments.experts()", segments.experts(),
            "must equal the experts in the store (" + std::to_string(num_experts()) + ")");
    if (mode != ExpertMode::inference) require_trainable(where);
    std::vector<int> chosen;
    for (int e = 0; e < num_experts(); ++e)
      if (segments.end(e) > segments.begin(e)) chosen.push_back(e);
    require(int(chosen.size()) <= slots(), where, "budget",
            std::to_string(slots()) + " resident experts",
            "this batch chose " + std::to_string(chosen.size()) +
                " distinct experts, all of which must be resident at once; raise the budget to "
                "at least " +
                std::to_string(chosen.size()));
    ++stats_.forwards;
    const auto start = std::chrono::steady_clock::now();
    placed_ = cache_->place(chosen);
    settle_prefetch(false);
    for (const auto& p : placed_) {
      if (!p.load) {
        ++stats_.hits;
        continue;
      }
      ++stats_.misses;
      load(p.expert, p.slot);
    }
    stats_.load_ms +=
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    start_prefetch();
    map_rows(segments);
    if (in_place_) {
      slots_.forward(x, slot_segments_, y, mode);
      return;
    }
    const int rows = segments.rows(), hidden = int(x.extent(1));
    detail::ensure_extents(x_slots_, "kmoe::ResidentExperts::x_slots", rows, hidden);
    detail::ensure_extents(y_slots_, "kmoe::ResidentExperts::y_slots", rows, hidden);
    detail::gather_rows<X, S>(x, source_row_, x_slots_);
    slots_.forward(x_slots_, slot_segments_, y_slots_, mode);
    detail::scatter_rows<X, S>(y_slots_, source_row_, y);
  }

  /// \brief Backward of the last (training) forward; the slots' gradients are added into
  /// the store's host gradients of their experts, and every slot is then invalidated (the
  /// optimizer steps on the host copies).
  void backward(const ConstMatrix<S, X>& x, const Segments<X>& segments,
                const ConstMatrix<S, X>& grad_y, const Matrix<S, X>& grad_x) {
    constexpr const char* where = "kmoe::ResidentExperts::backward";
    require_trainable(where);
    require(segments.rows() == slot_segments_.rows(), where, "segments.rows()", segments.rows(),
            "must equal the rows of the last forward");
    if (in_place_) {
      slots_.backward(x, slot_segments_, grad_y, grad_x);
    } else {
      const int rows = segments.rows(), hidden = int(x.extent(1));
      detail::ensure_extents(x_slots_, "kmoe::ResidentExperts::x_slots", rows, hidden);
      detail::ensure_extents(grad_slots_, "kmoe::ResidentExperts::grad_slots", rows, hidden);
      detail::ensure_extents(grad_x_slots_, "kmoe::ResidentExperts::grad_x_slots", rows, hidden);
      detail::gather_rows<X, S>(x, source_row_, x_slots_);
      detail::gather_rows<X, S>(grad_y, source_row_, grad_slots_);
      slots_.backward(x_slots_, slot_segments_, grad_slots_, grad_x_slots_);
      detail::scatter_rows<X, S>(grad_x_slots_, source_row_, grad_x);
    }
    offload_gradients();
    invalidate_resident();
  }

  /// \brief Training stores (master copies in S, host memory the compute space reaches):
  /// the store's [E, ...] host tensors and gradients, so that an optimizer steps on the
  /// host. Other stores expose none (inference only).
  void collect_parameters(ParameterList<X, S>& list) const {
    if constexpr (trainable_store) {
      if (store_.template master_values<S>(tensors_.front().name) == nullptr) return;
      for (const auto& t : tensors_) {
        Parameter<X, S> p;
        p.name = t.name;
        p.shape = t.shape;
        p.shape[0] = num_experts();
        const std::size_t size = std::size_t(t.elements) * std::size_t(num_experts());
        p.value =
            typename Parameter<X, S>::flat_view(store_.template master_values<S>(t.name), size);
        p.grad =
            typename Parameter<X, S>::flat_view(store_.template master_gradients<S>(t.name), size);
        p.role = t.role;
        p.shard.expert_axis = 0;
        p.shard.ffn_axis = t.ffn_axis;
        list.push_back(p);
      }
    }
  }

 private:
  using flat_view = typename Parameter<X, S>::flat_view;
  struct SlotTensor {
    std::string name;
    flat_view value, grad;      ///< the slots' [K * elements] weights and gradients
    std::int64_t elements = 0;  ///< per expert
    std::vector<std::int64_t> shape;
    ParameterRole role = ParameterRole::other;
    int ffn_axis = -1;
  };
  struct Prefetch {
    std::vector<int> hint;     ///< the next batch's experts, read from the next forward on
    std::vector<int> experts;  ///< being read by `pending`
    std::future<std::map<int, std::vector<S>>> pending;
    std::map<int, std::vector<S>> staged;
    ~Prefetch() {
      if (pending.valid()) pending.wait();  // the reader holds copies only; let it finish
    }
  };

  static constexpr bool host_compute =
      Kokkos::SpaceAccessibility<Kokkos::HostSpace, typename X::memory_space>::accessible;
  static constexpr bool trainable_store =
      host_compute && detail::is_detected_v<detail::store_master_of, Store, S>;

  void require_trainable(const char* where) const {
    bool ok = false;
    if constexpr (trainable_store) ok = store_.template master_values<S>(tensors_.front().name);
    require(ok, where, "mode", "training",
            "needs a store holding master copies the optimizer steps on (HostExpertStore with "
            "gradients, in the scalar type, on a host execution space); this store serves "
            "inference only");
    require(tensors_.front().grad.size() != 0, where, "mode", "training",
            "needs slots built with gradient buffers (ExpertShape::gradients)");
  }

  /// Reads the hinted experts that are not resident (nor staged) on another thread; the
  /// caller's batch computes meanwhile.
  void start_prefetch() {
    auto& state = *prefetch_;
    if (state.hint.empty()) return;
    settle_prefetch(true);
    const std::vector<int> hint = std::move(state.hint);
    state.hint.clear();
    // Staged experts the hint no longer names are dropped: staging holds one hint's worth.
    for (auto it = state.staged.begin(); it != state.staged.end();)
      it = std::find(hint.begin(), hint.end(), it->first) == hint.end() ? state.staged.erase(it)
                                                                        : std::next(it);
    std::vector<int> wanted;
    for (int e : hint)
      if (cache_->slot_of(e) < 0 && state.staged.count(e) == 0 &&
          std::find(wanted.begin(), wanted.end(), e) == wanted.end() &&
          int(wanted.size() + state.staged.size()) < slots())
        wanted.push_back(e);
    if (wanted.empty()) return;
    std::vector<std::pair<std::string, std::int64_t>> layout;
    for (const auto& t : tensors_) layout.emplace_back(t.name, t.elements);
    const Store store = store_;
    const std::int64_t total = expert_bytes_ / std::int64_t(sizeof(S));
    state.experts = wanted;
    state.pending = std::async(std::launch::async, [store, layout, wanted, total] {
      std::map<int, std::vector<S>> staged;
      for (int e : wanted) {
        std::vector<S> values(std::size_t(total), S(0));
        std::size_t offset = 0;
        for (const auto& [name, elements] : layout) {
          store.read(name, e, values.data() + offset);
          offset += std::size_t(elements);
        }
        staged.emplace(e, std::move(values));
      }
      return staged;
    });
    stats_.store_bytes += std::int64_t(wanted.size()) * store_.expert_storage_bytes();
  }

  /// Moves a finished prefetch into staging; with `wait`, or when a miss of this batch is
  /// still being read, waits for it (its errors, e.g. a changed checkpoint, surface here).
  void settle_prefetch(bool wait) {
    auto& state = *prefetch_;
    if (!state.pending.valid()) return;
    bool needed = wait;
    for (const auto& p : placed_)
      needed = needed || (p.load && std::find(state.experts.begin(), state.experts.end(),
                                              p.expert) != state.experts.end());
    if (!needed && state.pending.wait_for(std::chrono::seconds(0)) != std::future_status::ready)
      return;
    auto staged = state.pending.get();
    state.experts.clear();
    for (auto& [e, values] : staged) state.staged[e] = std::move(values);
  }

  /// Brings expert `e` into `slot`: from the prefetch staging if it is there, else from the
  /// store, converted to S.
  void load(int e, int slot) {
    auto& staged = prefetch_->staged;
    const auto hit = staged.find(e);
    const bool from_staging = hit != staged.end();
    if (from_staging) ++stats_.prefetched;
    std::size_t offset = 0;
    for (const auto& t : tensors_) {
      const std::size_t n = std::size_t(t.elements);
      const auto slice = Kokkos::subview(t.value, std::make_pair(std::size_t(slot) * n,
                                                                 std::size_t(slot + 1) * n));
      if constexpr (host_compute) {
        if (from_staging)
          std::memcpy(slice.data(), hit->second.data() + offset, n * sizeof(S));
        else
          store_.read(t.name, e, slice.data());
      } else {
        host_staging_.resize(n);
        if (from_staging)
          std::memcpy(host_staging_.data(), hit->second.data() + offset, n * sizeof(S));
        else
          store_.read(t.name, e, host_staging_.data());
        Kokkos::deep_copy(
            slice,
            Kokkos::View<const S*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>(
                host_staging_.data(), n));
      }
      offset += n;
    }
    if (from_staging)
      staged.erase(hit);
    else
      stats_.store_bytes += store_.expert_storage_bytes();
    stats_.loaded_bytes += expert_bytes_;
  }

  /// The slot segments (slot s: the rows of the expert it holds, if chosen) and the source
  /// row of each slot-ordered row; in place when the order is the segments' own.
  void map_rows(const Segments<X>& segments) {
    const int k = slots();
    std::vector<int> expert_of_slot(std::size_t(k), -1);
    for (const auto& p : placed_) expert_of_slot[std::size_t(p.slot)] = p.expert;
    auto& offsets = slot_segments_.offsets_host;
    offsets(0) = 0;
    in_place_ = true;
    int last_expert = -1;
    std::vector<int> source;
    source.reserve(std::size_t(segments.rows()));
    for (int s = 0; s < k; ++s) {
      const int e = expert_of_slot[std::size_t(s)];
      const int rows = e < 0 ? 0 : segments.end(e) - segments.begin(e);
      offsets(s + 1) = offsets(s) + rows;
      if (rows == 0) continue;
      in_place_ = in_place_ && e > last_expert;
      last_expert = e;
      for (int r = segments.begin(e); r < segments.end(e); ++r) source.push_back(r);
    }
    slot_segments_.sync_from_host();
    if (in_place_) return;
    detail::ensure_extents(source_row_, "kmoe::ResidentExperts::source_row", source.size());
    Kokkos::deep_copy(
        source_row_,
        Kokkos::View<const int*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>(
            source.data(), source.size()));
  }

  /// master_grad[e] += slot_grad[slot of e] for each expert of the last forward; the slot
  /// gradients are then zeroed for the next backward.
  void offload_gradients() {
    if constexpr (trainable_store) {
      for (const auto& t : tensors_) {
        S* master = store_.template master_gradients<S>(t.name);
        const std::size_t n = std::size_t(t.elements);
        for (const auto& p : placed_) {
          const S* slot = t.grad.data() + std::size_t(p.slot) * n;
          S* to = master + std::size_t(p.expert) * n;
          for (std::size_t i = 0; i < n; ++i) to[i] += slot[i];
        }
        Kokkos::deep_copy(t.grad, S(0));
      }
    }
  }

  Inner slots_;
  Store store_;
  std::vector<SlotTensor> tensors_;
  std::int64_t expert_bytes_ = 0;
  std::shared_ptr<SlotCache> cache_;  ///< shared by copies, as the slots are
  ResidencyStats stats_;
  std::shared_ptr<Prefetch> prefetch_ = std::make_shared<Prefetch>();
  std::vector<S> host_staging_;  ///< device compute spaces: one tensor slice on its way in
  // The last forward's placement, kept for backward.
  std::vector<SlotCache::Placement> placed_;
  Segments<X> slot_segments_;
  bool in_place_ = true;
  Vector<int, X> source_row_;
  Matrix<S, X> x_slots_, y_slots_, grad_slots_, grad_x_slots_;
};

}  // namespace kmoe
