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

#include <kmoe/detail/detect.hpp>
#include <kmoe/error.hpp>

#include <exception>
#include <string>
#include <utility>

namespace kmoe {
namespace detail {
template <class C>
using comm_abort = decltype(std::declval<const C&>().abort(std::declval<const std::string&>()));
}  // namespace detail

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
