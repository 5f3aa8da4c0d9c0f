// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file fingerprint.hpp
/// \brief The settings that every rank of a parallel layer must share, as a list of named
/// codes: MoELayer compares them across ranks before its first collective and reports each
/// differing one with every rank's value. A Router or Expert adds its own settings with an
/// optional member `void fingerprint(kmoe::Fingerprint& f) const` (detected), so the layer
/// never needs to know a policy's configuration fields. The comparison itself is
/// check_fingerprints_agree (agreement.hpp).

#include <cstdint>
#include <cstring>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

namespace kmoe {

class Fingerprint {
 public:
  /// How a code is shown in the mismatch report.
  enum class Shown { integer, real, names, type };
  struct Field {
    std::string name;
    std::int64_t code = 0;
    Shown shown = Shown::integer;
    std::vector<std::string> names = {};   ///< Shown::names: the meaning of each code
    const std::type_info* type = nullptr;  ///< Shown::type: the type, for its name
  };

  void integer(const std::string& name, std::int64_t value) { fields_.push_back({name, value}); }
  /// Compared bit for bit (a 1-ulp difference is a difference), shown as the shortest
  /// decimal that reads back to it.
  void real(const std::string& name, double value) {
    std::int64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(bits));
    fields_.push_back({name, bits, Shown::real});
  }
  void flag(const std::string& name, bool value) { choice(name, value ? 1 : 0, {"false", "true"}); }
  void choice(const std::string& name, int code, std::vector<std::string> names) {
    fields_.push_back({name, code, Shown::names, std::move(names)});
  }
  /// A type, compared by its hash; its name is gathered only when it differs.
  void type(const std::string& name, const std::type_info& t) {
    fields_.push_back(
        {name, std::int64_t(t.hash_code() & 0x7fffffffffffffff), Shown::type, {}, &t});
  }

  /// Adds the fields of `part`, each name prefixed (e.g. "router.").
  void append(const std::string& prefix, const Fingerprint& part) {
    for (Field f : part.fields_) {
      f.name = prefix + f.name;
      fields_.push_back(std::move(f));
    }
  }

  const std::vector<Field>& fields() const { return fields_; }

 private:
  std::vector<Field> fields_;
};

namespace detail {
/// Detects a policy's optional `void fingerprint(Fingerprint&) const`.
template <class P>
using fingerprint_of = decltype(std::declval<const P&>().fingerprint(std::declval<Fingerprint&>()));
}  // namespace detail

}  // namespace kmoe
