// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file host_expert_store.hpp
/// \brief The backing store of experts kept in host memory (pageable, or pinned on CUDA),
/// each tensor in a storage type of its own (BF16, F16, F32, F64), from which
/// memory/resident_experts.hpp brings the experts a batch chose into compute memory.
///
/// An ExpertStore (the role ResidentExperts reads from) provides:
///  - `int num_experts() const`;
///  - `std::int64_t expert_elements(const std::string& parameter) const`: elements of one
///    expert's slice of the named parameter (e.g. "experts.w_gate": F x H), throwing
///    kmoe::invalid_argument for a parameter it does not hold;
///  - `std::int64_t expert_storage_bytes() const`: bytes one expert occupies in the store;
///  - `template <class S> void read(const std::string& parameter, int expert, S* dst) const`:
///    the expert's slice converted to S into host memory `dst`; thread-safe (a prefetch
///    reads on another thread).
/// Optional (detected), for training with the optimizer step on the store's copies
/// (ZeRO-Offload): `template <class S> S* master_values(name) const` and
/// `master_gradients(name)`, the whole [E, ...] tensors in S, or nullptr when the store
/// cannot hold them (another storage type, no gradients).
/// Shipped: HostExpertStore (here) and models::CheckpointExpertStore (lazy reads of a
/// safetensors checkpoint).

#include <kmoe/detail/checked.hpp>
#include <kmoe/error.hpp>
#include <kmoe/io/float16.hpp>
#include <kmoe/parameters.hpp>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <type_traits>

namespace kmoe {

/// \brief Element type of a stored tensor (the checkpoint's dtype, kept as it is).
enum class StorageType { bf16, f16, f32, f64 };

/// \brief Bytes per element of `type`.
inline std::size_t storage_size(StorageType type) {
  switch (type) {
    case StorageType::bf16:
    case StorageType::f16:
      return 2;
    case StorageType::f32:
      return 4;
    case StorageType::f64:
      return 8;
  }
  return 0;
}

namespace detail {
template <class S>
constexpr bool stores_as(StorageType type) {
  return (std::is_same_v<S, float> && type == StorageType::f32) ||
         (std::is_same_v<S, double> && type == StorageType::f64);
}

/// value rounded to `type` (ties to even), written at `to`.
template <class S>
void store_element(StorageType type, S value, unsigned char* to) {
  switch (type) {
    case StorageType::bf16: {
      const std::uint16_t bits = io::to_bfloat16_bits(value);
      std::memcpy(to, &bits, 2);
      return;
    }
    case StorageType::f16: {
      const std::uint16_t bits = io::to_half_bits(value);
      std::memcpy(to, &bits, 2);
      return;
    }
    case StorageType::f32: {
      const float f = float(value);
      std::memcpy(to, &f, 4);
      return;
    }
    case StorageType::f64: {
      const double d = double(value);
      std::memcpy(to, &d, 8);
      return;
    }
  }
}

/// The element of `type` at `from`, widened exactly to S (narrowing F64 to float rounds).
template <class S>
S load_element(StorageType type, const unsigned char* from) {
  switch (type) {
    case StorageType::bf16: {
      std::uint16_t bits = 0;
      std::memcpy(&bits, from, 2);
      return S(io::bfloat16_bits_to_float(bits));
    }
    case StorageType::f16: {
      std::uint16_t bits = 0;
      std::memcpy(&bits, from, 2);
      return S(io::half_bits_to_float(bits));
    }
    case StorageType::f32: {
      float f = 0;
      std::memcpy(&f, from, 4);
      return S(f);
    }
    case StorageType::f64: {
      double d = 0;
      std::memcpy(&d, from, 8);
      return S(d);
    }
  }
  return S(0);
}
}  // namespace detail

/// \brief Experts' tensors [E, ...] held in host memory `MemorySpace` (Kokkos::HostSpace,
/// or Kokkos::CudaHostPinnedSpace so that a CUDA compute space copies from pinned memory)
/// in one StorageType. With `gradients`, an F32/F64 store also holds a gradient per tensor
/// and exposes both as the master copy an optimizer steps on the host. Copies share the
/// tensors.
template <class MemorySpace = Kokkos::HostSpace>
class HostExpertStore {
  static_assert(Kokkos::SpaceAccessibility<Kokkos::HostSpace, MemorySpace>::accessible,
                "kmoe::HostExpertStore: MemorySpace must be host memory (HostSpace or a pinned "
                "host space)");

 public:
  using memory_space = MemorySpace;

  HostExpertStore(int experts, StorageType type, bool gradients = false)
      : experts_(experts), type_(type), gradients_(gradients) {
    require(experts >= 1, "kmoe::HostExpertStore", "experts", experts, "must be at least 1");
    require(!gradients || type == StorageType::f32 || type == StorageType::f64,
            "kmoe::HostExpertStore", "gradients", "true",
            "needs an F32 or F64 store (the optimizer steps on the stored values)");
  }

  /// \brief The store of every parameter of `experts` (an Expert policy, all E experts
  /// resident), each converted to `type`.
  template <class Experts>
  static HostExpertStore from_experts(const Experts& experts, StorageType type,
                                      bool gradients = false) {
    using X = typename Experts::execution_space;
    using S = typename Experts::scalar_type;
    HostExpertStore store(experts.num_experts(), type, gradients);
    ParameterList<X, S> list;
    experts.collect_parameters(list);
    for (const auto& p : list) {
      const auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), p.value);
      store.add(p.name, std::int64_t(p.value.size()) / experts.num_experts(), host.data());
    }
    return store;
  }

  /// \brief Adds tensor `name` of E x `elements_per_expert` values from host memory,
  /// expert after expert, converted to the store's type.
  template <class S>
  void add(const std::string& name, std::int64_t elements_per_expert, const S* values) {
    constexpr const char* where = "kmoe::HostExpertStore::add";
    require(tensors_->count(name) == 0, where, "name", name, "is already stored");
    require(elements_per_expert >= 1, where, "elements_per_expert", elements_per_expert,
            "must be at least 1");
    const std::int64_t elements =
        detail::checked_mul(elements_per_expert, std::int64_t(experts_), where, "elements");
    const std::int64_t bytes =
        detail::checked_mul(elements, std::int64_t(storage_size(type_)), where, "bytes");
    Tensor t;
    t.elements_per_expert = elements_per_expert;
    t.bytes = Bytes(Kokkos::view_alloc(Kokkos::WithoutInitializing, name), std::size_t(bytes));
    detail::require_allocated(t.bytes, where, bytes);
    for (std::int64_t i = 0; i < elements; ++i)
      detail::store_element(type_, values[i], t.bytes.data() + i * storage_size(type_));
    if (gradients_) {
      t.gradient = Bytes(name + ".grad", std::size_t(bytes));  // zeroed
      detail::require_allocated(t.gradient, where, bytes);
    }
    tensors_->emplace(name, std::move(t));
  }

  int num_experts() const { return experts_; }
  StorageType storage_type() const { return type_; }

  std::int64_t expert_elements(const std::string& name) const {
    return tensor(name).elements_per_expert;
  }

  std::int64_t expert_storage_bytes() const {
    std::int64_t bytes = 0;
    for (const auto& entry : *tensors_)
      bytes += entry.second.elements_per_expert * std::int64_t(storage_size(type_));
    return bytes;
  }

  template <class S>
  void read(const std::string& name, int expert, S* dst) const {
    require(expert >= 0 && expert < experts_, "kmoe::HostExpertStore::read", "expert", expert,
            "must lie in [0, " + std::to_string(experts_) + ")");
    const Tensor& t = tensor(name);
    const std::size_t size = storage_size(type_);
    const unsigned char* from = t.bytes.data() + std::size_t(expert) * t.elements_per_expert * size;
    if (detail::stores_as<S>(type_)) {
      std::memcpy(dst, from, std::size_t(t.elements_per_expert) * size);
      return;
    }
    for (std::int64_t i = 0; i < t.elements_per_expert; ++i)
      dst[i] = detail::load_element<S>(type_, from + i * size);
  }

  /// \brief The stored values of `name` as S [E * elements], or nullptr unless the store
  /// holds gradients in S's own type (a master copy an optimizer can step).
  template <class S>
  S* master_values(const std::string& name) const {
    if (!gradients_ || !detail::stores_as<S>(type_)) return nullptr;
    return reinterpret_cast<S*>(tensor(name).bytes.data());
  }
  /// \brief The gradient of `name`'s master copy (see master_values).
  template <class S>
  S* master_gradients(const std::string& name) const {
    if (!gradients_ || !detail::stores_as<S>(type_)) return nullptr;
    return reinterpret_cast<S*>(tensor(name).gradient.data());
  }

 private:
  using Bytes = Kokkos::View<unsigned char*, MemorySpace>;
  struct Tensor {
    std::int64_t elements_per_expert = 0;
    Bytes bytes, gradient;
  };

  const Tensor& tensor(const std::string& name) const {
    const auto it = tensors_->find(name);
    if (it == tensors_->end())
      throw invalid_argument("kmoe::HostExpertStore", "parameter", name, "is not in the store");
    return it->second;
  }

  int experts_ = 0;
  StorageType type_ = StorageType::f32;
  bool gradients_ = false;
  std::shared_ptr<std::map<std::string, Tensor>> tensors_ =
      std::make_shared<std::map<std::string, Tensor>>();
};

}  // namespace kmoe
