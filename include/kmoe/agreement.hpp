// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file agreement.hpp
/// \brief How ranks fail together instead of leaving each other blocked in a collective.
///
/// Two regimes (docs/parallel.md, "No hang when one rank fails"):
///  - before a step's first collective, `agree_or_throw` runs the local work (argument
///    checks, routing), then every rank joins `any_error`; if any rank failed, every rank
///    throws and the group stays usable;
///  - once the step's collectives have begun, a failure on one rank (an internal error,
///    bad_alloc, a throwing user policy) cannot be agreed on, since its peers are already
///    inside the next exchange: `abort_on_failure` ends the whole job with the message
///    through the communicator's `abort`, where it has one (MPI_Abort), as MPI does for
///    fatal errors. A communicator without `abort` rethrows.
///
/// Two cross-rank checks ride on the same collectives (docs/parallel.md):
///  - the call sequence: each agreement point of a layer carries a CallSequence (which
///    call this is and how many of each kind this rank has made), max-reduced with the
///    error flag in one all-reduce; ranks at different calls (one skipped a forward, only
///    one called backward) all raise, naming where each rank is, instead of entering
///    mismatched collectives;
///  - replica consistency: `check_replicas_agree` compares a bitwise checksum of each
///    replicated tensor across the ranks that hold it and raises on every rank with its name.

#include <kmoe/detail/detect.hpp>
#include <kmoe/detail/math.hpp>
#include <kmoe/error.hpp>
#include <kmoe/fingerprint.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <exception>
#include <sstream>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>
#if __has_include(<cxxabi.h>)
#include <cstdlib>
#include <cxxabi.h>
#define KMOE_HAS_CXXABI 1
#endif

namespace kmoe {
namespace detail {
template <class C>
using comm_abort = decltype(std::declval<const C&>().abort(std::declval<const std::string&>()));
/// Communicators that name the current step in their diagnostics (MpiCommunicator).
template <class C>
using comm_set_step =
    decltype(std::declval<const C&>().set_step(std::declval<const std::string&>()));

/// "rank 0 has 1.25, ranks 1, 3 have 2": ranks grouped by value, in order of first rank.
inline std::string ranks_with_values(const std::vector<std::string>& value_of_rank,
                                     const char* verb_one, const char* verb_many) {
  std::vector<std::pair<std::string, std::vector<int>>> groups;
  for (int r = 0; r < int(value_of_rank.size()); ++r) {
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const auto& g) { return g.first == value_of_rank[r]; });
    if (it == groups.end())
      groups.push_back({value_of_rank[r], {r}});
    else
      it->second.push_back(r);
  }
  std::string out;
  for (const auto& [value, ranks] : groups) {
    out += out.empty() ? "" : ", ";
    out += ranks.size() == 1 ? "rank " : "ranks ";
    for (std::size_t i = 0; i < ranks.size(); ++i)
      out += (i ? ", " : "") + std::to_string(ranks[i]);
    out += std::string(" ") + (ranks.size() == 1 ? verb_one : verb_many) + " " + value;
  }
  return out;
}

/// The shortest decimal text that reads back as exactly `v` (1.25, not 1.2500000000000000).
inline std::string shortest_display(double v) {
  for (int digits = 1; digits <= 17; ++digits) {
    std::ostringstream os;
    os.precision(digits);
    os << v;
    if (digits == 17 || std::stod(os.str()) == v) return os.str();
  }
  return std::to_string(v);
}

/// A type's readable name (demangled where the ABI offers it).
inline std::string type_display_name(const std::type_info& type) {
#ifdef KMOE_HAS_CXXABI
  int status = 0;
  char* readable = abi::__cxa_demangle(type.name(), nullptr, nullptr, &status);
  if (status == 0 && readable) {
    std::string name(readable);
    std::free(readable);
    return name;
  }
  std::free(readable);
#endif
  return type.name();
}

/// Order-independent hash of the bits of every element with its index: equal on two
/// ranks exactly when the tensors are bitwise equal (up to a 2^-64 collision).
template <class X, class Flat>
std::uint64_t bitwise_checksum(const Flat& values) {
  using T = typename Flat::non_const_value_type;
  static_assert(sizeof(T) <= sizeof(std::uint64_t), "bitwise_checksum: element wider than 64 bits");
  std::uint64_t sum = 0;
  Kokkos::parallel_reduce(
      "kmoe::bitwise_checksum", Kokkos::RangePolicy<X>(0, values.size()),
      KOKKOS_LAMBDA(std::size_t i, std::uint64_t & total) {
        const T value = values(i);
        std::uint64_t bits = 0;
        std::memcpy(&bits, &value, sizeof(T));
        total += splitmix64(bits ^ splitmix64(std::uint64_t(i)));
      },
      sum);
  return sum;
}

template <class X, class Flat>
double value_sum(const Flat& values) {
  double sum = 0;
  Kokkos::parallel_reduce(
      "kmoe::value_sum", Kokkos::RangePolicy<X>(0, values.size()),
      KOKKOS_LAMBDA(std::size_t i, double& total) { total += double(values(i)); }, sum);
  return sum;
}
}  // namespace detail

/// \brief Where a rank is in the sequence of a layer's collective calls: the kind of the
/// current call and how many calls of each kind this rank has made, this one included.
/// Every rank of the group must pass the same point to the same agreement.
class CallSequence {
 public:
  enum Call : int {
    construct,
    forward,
    backward,
    synchronize_gradients,
    check_replicas,
    apply_placement,
    kinds
  };

  /// Counts one more call of `call` and returns the point it is.
  const CallSequence& enter(Call call) {
    current_ = call;
    ++made_[call];
    return *this;
  }

  /// The point as numbers, for the all-reduce: the current call, then the count of each kind.
  std::array<std::int64_t, kinds + 1> fields() const {
    std::array<std::int64_t, kinds + 1> f{};
    f[0] = current_;
    for (int k = 0; k < kinds; ++k) f[std::size_t(k + 1)] = made_[k];
    return f;
  }

  /// How many calls of the current kind this rank has made, this one included.
  std::int64_t number() const { return made_[current_]; }

  /// "backward #2 (calls so far: 3 forward, 2 backward)" from fields().
  static std::string describe(const std::int64_t* f) {
    static const char* const names[kinds] = {"construction",   "forward",
                                             "backward",       "synchronize_gradients",
                                             "check_replicas", "apply_placement"};
    const auto name = [](std::int64_t k) {
      return k >= 0 && k < kinds ? names[k] : "an unknown call";
    };
    std::string out =
        std::string(name(f[0])) + " #" + std::to_string(f[f[0] + 1]) + " (calls so far:";
    for (int k = 1; k < kinds; ++k)
      out += std::string(k > 1 ? ", " : " ") + std::to_string(f[k + 1]) + " " + names[k];
    return out + ")";
  }

 private:
  Call current_ = construct;
  std::array<std::int64_t, kinds> made_{};
};

/// \brief Compares a Fingerprint across the ranks of `comm` before their first collective:
/// every rank sees every rank's codes, so they all throw the same kmoe::invalid_argument
/// together, naming each differing field with every rank's value. Reals travel as their
/// exact bits, choices are shown by name, and the names of types are gathered (in a second
/// collective every rank enters, having seen the same difference) only when a type differs.
/// Views are of `MemorySpace`, the one the communicator takes.
template <class MemorySpace, class Communicator>
void check_fingerprints_agree(const Communicator& comm, const Fingerprint& print, const char* where,
                              const std::string& why) {
  using Shown = Fingerprint::Shown;
  const auto& fields = print.fields();
  const int n = int(fields.size());
  const int ranks = comm.size();
  if (ranks == 1) return;
  const auto gather = [&](const std::vector<std::int64_t>& mine) {
    Kokkos::View<std::int64_t*, MemorySpace> send("kmoe::fingerprint", mine.size());
    Kokkos::View<std::int64_t*, MemorySpace> all("kmoe::fingerprints", mine.size() * ranks);
    auto send_host = Kokkos::create_mirror_view(send);
    for (std::size_t i = 0; i < mine.size(); ++i) send_host(i) = mine[i];
    Kokkos::deep_copy(send, send_host);
    comm.all_gather(send, all);
    return Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), all);
  };
  std::vector<std::int64_t> codes(n);
  for (int i = 0; i < n; ++i) codes[i] = fields[i].code;
  const auto all = gather(codes);
  std::vector<int> differing, type_fields;
  bool type_differs = false;
  for (int i = 0; i < n; ++i) {
    if (fields[i].shown == Shown::type) type_fields.push_back(i);
    for (int r = 1; r < ranks; ++r)
      if (all(std::size_t(r) * n + i) != all(i)) {
        differing.push_back(i);
        type_differs = type_differs || fields[i].shown == Shown::type;
        break;
      }
  }
  if (differing.empty()) return;
  // Fixed-size blocks, one per type field: 256 characters per name, the rest cut off.
  constexpr std::size_t name_words = 32;
  const std::size_t types = type_fields.size();
  std::vector<std::string> type_names;  // [rank * types + t]
  if (type_differs) {
    std::vector<std::int64_t> packed(types * name_words, 0);
    for (std::size_t t = 0; t < types; ++t) {
      const std::string name = detail::type_display_name(*fields[type_fields[t]].type);
      std::memcpy(packed.data() + t * name_words, name.data(),
                  std::min(name.size(), name_words * sizeof(std::int64_t) - 1));
    }
    const auto all_names = gather(packed);
    for (int r = 0; r < ranks; ++r)
      for (std::size_t t = 0; t < types; ++t) {
        const char* text = reinterpret_cast<const char*>(all_names.data() +
                                                         (std::size_t(r) * types + t) * name_words);
        type_names.emplace_back(text, strnlen(text, name_words * sizeof(std::int64_t)));
      }
  }
  std::string report;
  for (int i : differing) {
    const Fingerprint::Field& f = fields[i];
    const std::size_t type_index =
        std::size_t(std::find(type_fields.begin(), type_fields.end(), i) - type_fields.begin());
    std::vector<std::string> values(ranks);
    for (int r = 0; r < ranks; ++r) {
      const std::int64_t code = all(std::size_t(r) * n + i);
      if (f.shown == Shown::real) {
        double v = 0;
        std::memcpy(&v, &code, sizeof(v));
        values[r] = detail::shortest_display(v);
      } else if (f.shown == Shown::names) {
        values[r] = code >= 0 && code < std::int64_t(f.names.size()) ? f.names[std::size_t(code)]
                                                                     : std::to_string(code);
      } else if (f.shown == Shown::type) {
        values[r] = type_names[std::size_t(r) * types + type_index];
      } else {
        values[r] = std::to_string(code);
      }
    }
    report += (report.empty() ? "" : "; ") + f.name + ": " +
              detail::ranks_with_values(values, "has", "have");
  }
  throw invalid_argument(where, "configuration across ranks", report, why);
}

/// \brief Runs `phase` on every rank of `comm`; if it threw anywhere, every rank throws:
/// the failing ranks their own exception, the others a kmoe::runtime_error naming `where`.
template <class Communicator, class Phase>
void agree_or_throw(Communicator& comm, const char* where, const Phase& phase) {
  std::exception_ptr failure;
  try {
    phase();
  } catch (...) {
    failure = std::current_exception();
  }
  const bool any = comm.any_error(failure != nullptr);
  if (failure) std::rethrow_exception(failure);
  if (any)
    throw runtime_error(std::string(where) +
                        ": another rank failed in the same step; see its error");
}

/// \brief agree_or_throw that also checks the call sequence: the error flag and `point`
/// travel in one max-reduction (of each field and its negation, so one reduction yields the
/// largest and the smallest). If the ranks' points differ, every rank throws a
/// kmoe::runtime_error naming each rank's call (gathered in a second collective that every
/// rank enters, having seen the same maxima), in place of any local error, which is then a
/// symptom of the mismatch. Views are of `MemorySpace`, the one the communicator takes.
template <class MemorySpace, class Communicator, class Phase>
void agree_or_throw(Communicator& comm, const char* where, const CallSequence& point,
                    const Phase& phase) {
  if constexpr (detail::is_detected_v<detail::comm_set_step, Communicator>)
    comm.set_step(std::string(where) + " #" + std::to_string(point.number()));
  std::exception_ptr failure;
  try {
    phase();
  } catch (...) {
    failure = std::current_exception();
  }
  if (comm.size() == 1) {
    if (failure) std::rethrow_exception(failure);
    return;
  }
  const auto fields = point.fields();
  const std::size_t n = fields.size();
  Kokkos::View<std::int64_t*, MemorySpace> reduced("kmoe::agreement", 1 + 2 * n);
  auto host = Kokkos::create_mirror_view(reduced);
  host(0) = failure ? 1 : 0;
  for (std::size_t i = 0; i < n; ++i) {
    host(1 + i) = fields[i];
    host(1 + n + i) = -fields[i];
  }
  Kokkos::deep_copy(reduced, host);
  comm.all_reduce_max(reduced);
  Kokkos::deep_copy(host, reduced);
  bool same = true;
  for (std::size_t i = 0; i < n; ++i) same = same && host(1 + i) == -host(1 + n + i);
  if (!same) {
    Kokkos::View<std::int64_t*, MemorySpace> mine("kmoe::agreement::point", n);
    Kokkos::View<std::int64_t*, MemorySpace> all("kmoe::agreement::points",
                                                 n * std::size_t(comm.size()));
    auto mine_host = Kokkos::create_mirror_view(mine);
    for (std::size_t i = 0; i < n; ++i) mine_host(i) = fields[i];
    Kokkos::deep_copy(mine, mine_host);
    comm.all_gather(mine, all);
    auto all_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), all);
    std::vector<std::string> where_is(std::size_t(comm.size()));
    for (int r = 0; r < comm.size(); ++r)
      where_is[std::size_t(r)] = CallSequence::describe(all_host.data() + std::size_t(r) * n);
    throw runtime_error(std::string(where) + ": the ranks are at different calls of the layer: " +
                        detail::ranks_with_values(where_is, "is in", "are in") +
                        "; every rank must make the same calls in the same order (a rank "
                        "skipped a call, or made one that the others did not)");
  }
  if (failure) std::rethrow_exception(failure);
  if (host(0) != 0)
    throw runtime_error(std::string(where) +
                        ": another rank failed in the same step; see its error");
}

/// \brief One replicated tensor, for check_replicas_agree.
template <class Flat>
struct ReplicatedTensor {
  std::string name;
  Flat values;
};

/// \brief Compares every tensor of `tensors` across the ranks of `comm`, which must all
/// hold replicas of the same tensors in the same order; if any differs, every rank throws
/// a kmoe::runtime_error naming it, the group, and each rank's value sum (the checksums
/// say whether the tensors are bitwise equal; the sums help to see how they differ).
/// `rank_name` is this rank's number in the layer's world group, used in the message.
template <class X, class Communicator, class Flat>
void check_replicas_agree(const Communicator& comm, const char* where, const char* group,
                          const std::vector<ReplicatedTensor<Flat>>& tensors, int rank_name) {
  if (comm.size() == 1 || tensors.empty()) return;
  const std::size_t n = tensors.size(), per_rank = 1 + 2 * n;
  Kokkos::View<std::int64_t*, typename X::memory_space> mine("kmoe::replicas", per_rank);
  Kokkos::View<std::int64_t*, typename X::memory_space> all("kmoe::replicas::all",
                                                            per_rank * std::size_t(comm.size()));
  auto mine_host = Kokkos::create_mirror_view(mine);
  mine_host(0) = rank_name;
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint64_t checksum = detail::bitwise_checksum<X>(tensors[i].values);
    const double sum = detail::value_sum<X>(tensors[i].values);
    std::int64_t as_int = 0;
    std::memcpy(&as_int, &checksum, sizeof(as_int));
    mine_host(1 + i) = as_int;
    std::memcpy(&as_int, &sum, sizeof(as_int));
    mine_host(1 + n + i) = as_int;
  }
  Kokkos::deep_copy(mine, mine_host);
  comm.all_gather(mine, all);
  auto all_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), all);
  std::string differing;
  for (std::size_t i = 0; i < n; ++i) {
    bool same = true;
    for (int r = 1; r < comm.size(); ++r)
      same = same && all_host(std::size_t(r) * per_rank + 1 + i) == all_host(1 + i);
    if (same) continue;
    std::string values;
    for (int r = 0; r < comm.size(); ++r) {
      double sum = 0;
      const std::int64_t bits = all_host(std::size_t(r) * per_rank + 1 + n + i);
      std::memcpy(&sum, &bits, sizeof(sum));
      values += std::string(r ? ", " : "") + "rank " +
                std::to_string(all_host(std::size_t(r) * per_rank)) + " sums to " +
                detail::to_display(sum);
    }
    differing +=
        (differing.empty() ? "" : "; ") + std::string("'") + tensors[i].name + "' (" + values + ")";
  }
  if (!differing.empty())
    throw runtime_error(std::string(where) + ": replicated parameters differ across the " +
                        std::to_string(comm.size()) + " ranks of the " + group +
                        " group that hold them: " + differing +
                        "; every replica must start equal (same initialization or checkpoint) "
                        "and take the same updates (synchronize_gradients before each step)");
}

/// \brief Runs `phase`; on a group of several ranks whose communicator can abort, an
/// exception ends the job with "where: what()" instead of leaving the peers blocked.
template <class Communicator, class Phase>
void abort_on_failure(const Communicator& comm, const char* where, const Phase& phase) {
  if constexpr (detail::is_detected_v<detail::comm_abort, Communicator>) {
    if (comm.size() > 1) {
      try {
        phase();
      } catch (const std::exception& e) {
        comm.abort(std::string(where) + ": " + e.what());
      } catch (...) {
        comm.abort(std::string(where) + ": unknown exception");
      }
      return;
    }
  }
  phase();
}

}  // namespace kmoe
