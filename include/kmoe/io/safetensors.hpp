// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file safetensors.hpp
/// \brief Reading and writing the safetensors checkpoint format, and Hugging Face model
/// directories whose weights are split across several safetensors shards.
///
/// Format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length
/// N, N bytes of JSON mapping tensor names to {"dtype", "shape", "data_offsets": [begin,
/// end]} plus an optional "__metadata__" string map, then the data section. Offsets count
/// from the first byte after the header; tensors are stored row-major, little-endian.
///
/// Nothing here depends on Kokkos: tensors are read into caller memory (`read_into`) or
/// std::vector, so a layer can fill a Kokkos host view directly. Elements may be float,
/// double, integers, or kmoe::bfloat16 / kmoe::float16 (kmoe/low_precision.hpp, declared
/// here only by name), so a 16-bit layer reads a 16-bit checkpoint without a float copy. Files are read with pread,
/// not mapped, so a file truncated or replaced while open gives an error rather than SIGBUS
/// (kmoe/io/file.hpp); the whole header is validated when a file is opened, so a malformed
/// file is reported up front with its path rather than on some later read.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kmoe/detail/checked.hpp"
#include "kmoe/error.hpp"
#include "kmoe/io/file.hpp"
#include "kmoe/io/float16.hpp"
#include "kmoe/io/json.hpp"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kmoe/io/safetensors.hpp reads little-endian data in place and needs a little-endian host"
#endif

namespace kmoe::detail {
// kmoe::bfloat16 and kmoe::float16 (kmoe/low_precision.hpp, which needs Kokkos): named
// here so that the reader and writer accept them; only a caller holding such values, and
// so having included low_precision.hpp, instantiates the code that uses them.
template <class Format>
class PackedFloat;
struct BFloat16Format;
struct Float16Format;
}  // namespace kmoe::detail

namespace kmoe::io {

/// \brief Element types kmoe reads and writes. Integer types carry routing indices
/// (reference fixtures store top-k expert indices as I64).
enum class DType { F16, BF16, F32, F64, I32, I64 };

/// \brief The safetensors spelling of `dtype` ("F16", "BF16", ...).
inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::F32:
      return "F32";
    case DType::F64:
      return "F64";
    case DType::I32:
      return "I32";
    case DType::I64:
      return "I64";
  }
  return "?";
}

/// \brief Bytes per element of `dtype`.
inline std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F16:
    case DType::BF16:
      return 2;
    case DType::F32:
    case DType::I32:
      return 4;
    case DType::F64:
    case DType::I64:
      return 8;
  }
  return 0;
}

/// \brief True for F16, BF16, F32 and F64.
inline bool is_floating(DType dtype) { return dtype != DType::I32 && dtype != DType::I64; }

/// \brief Where one tensor lives in a safetensors file.
struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;  ///< row-major; empty for a scalar
  std::uint64_t begin = 0;          ///< byte offset of the first element in the data section
  std::uint64_t end = 0;            ///< one past the last byte, relative to the data section

  /// \brief Product of the extents (1 for a scalar); kmoe::invalid_argument if it overflows
  /// (never for a TensorInfo from SafetensorsFile, whose header check bounds it by the file).
  std::uint64_t element_count() const {
    std::int64_t n = 1;
    for (std::int64_t extent : shape)
      n = kmoe::detail::checked_mul(n, extent, "TensorInfo::element_count", "shape");
    return static_cast<std::uint64_t>(n);
  }
};

namespace detail {

/// Largest header accepted; the reference implementation uses the same bound so that a
/// corrupt length cannot make us parse gigabytes of tensor data as JSON.
inline constexpr std::uint64_t max_header_bytes = 100'000'000;

/// Largest model.safetensors.index.json accepted (DeepSeek-V3's, the largest released, is
/// under 9 MB).
inline constexpr std::uint64_t max_index_bytes = 100'000'000;

/// Bytes converted per pread in read_into: large enough to amortise the call, small enough
/// that the staging buffer stays in cache.
inline constexpr std::size_t read_chunk_bytes = std::size_t{1} << 20;

inline bool parse_dtype(const std::string& text, DType& dtype) {
  static const std::pair<const char*, DType> table[] = {{"F16", DType::F16}, {"BF16", DType::BF16},
                                                        {"F32", DType::F32}, {"F64", DType::F64},
                                                        {"I32", DType::I32}, {"I64", DType::I64}};
  for (const auto& [spelling, value] : table) {
    if (text == spelling) {
      dtype = value;
      return true;
    }
  }
  return false;
}

template <class T>
constexpr bool is_float_element = std::is_same_v<T, float> || std::is_same_v<T, double>;

template <class T>
constexpr bool is_int_element = std::is_integral_v<T> && !std::is_same_v<T, bool>;

/// kmoe::bfloat16 and kmoe::float16: read and written as their bit patterns.
template <class T>
constexpr bool is_bfloat16_element =
    std::is_same_v<T, kmoe::detail::PackedFloat<kmoe::detail::BFloat16Format>>;
template <class T>
constexpr bool is_float16_element =
    std::is_same_v<T, kmoe::detail::PackedFloat<kmoe::detail::Float16Format>>;
template <class T>
constexpr bool is_half_element = is_bfloat16_element<T> || is_float16_element<T>;

/// Any floating element type: read from F16/BF16/F32/F64, written to them.
template <class T>
constexpr bool is_floating_element = is_float_element<T> || is_half_element<T>;

/// The file dtype whose elements are T's own bytes, if any (read with no conversion).
template <class T>
constexpr bool has_own_dtype = is_half_element<T> || is_float_element<T>;
template <class T>
constexpr DType own_dtype() {
  if constexpr (is_bfloat16_element<T>) return DType::BF16;
  if constexpr (is_float16_element<T>) return DType::F16;
  if constexpr (std::is_same_v<T, double>) return DType::F64;
  return DType::F32;
}

/// What T is called in an error message about a value it cannot hold.
template <class T>
const char* element_type_name() {
  if constexpr (is_bfloat16_element<T>) return "bfloat16";
  if constexpr (is_float16_element<T>) return "float16 (largest finite value 65504)";
  return "the requested integer type";
}

/// Sets `result` to the 16-bit T nearest to `value` (to nearest, ties to even); returns
/// false if a finite `value` lies beyond T's range (the result is then infinite). A float rounds with T's own conversion; a double
/// rounds once with io/float16.hpp's (converting it to float first could round twice).
template <class T, class Source>
bool narrow_to(Source value, T& result) {
  if constexpr (std::is_same_v<Source, double>) {
    result = T::from_bits(is_bfloat16_element<T> ? to_bfloat16_bits(value) : to_half_bits(value));
  } else {
    result = T(value);
  }
  return !(std::isfinite(value) && !std::isfinite(float(result)));
}

/// Range check for I32/I64 <-> integer T; `value` already widened to int64.
template <class T>
bool fits(std::int64_t value) {
  if constexpr (std::is_signed_v<T>) {
    return value >= static_cast<std::int64_t>(std::numeric_limits<T>::min()) &&
           value <= static_cast<std::int64_t>(std::numeric_limits<T>::max());
  } else {
    return value >= 0 &&
           static_cast<std::uint64_t>(value) <= std::uint64_t{std::numeric_limits<T>::max()};
  }
}

template <class S>
S load(const unsigned char* bytes) {
  S value;
  std::memcpy(&value, bytes, sizeof value);
  return value;
}

/// Converts `count` elements of `dtype` at `src` (possibly unaligned) into `dst`.
/// Returns the index of the first value that does not fit T (an integer out of range, a
/// finite value beyond a 16-bit T's range), or `count` on success.
template <class T>
std::size_t convert_from(DType dtype, const unsigned char* src, T* dst, std::size_t count) {
  const std::size_t size = dtype_size(dtype);
  for (std::size_t i = 0; i < count; ++i) {
    const unsigned char* p = src + i * size;
    if constexpr (is_half_element<T>) {
      // The other 16-bit format widens to float exactly, so every path rounds once.
      bool fits = true;
      if (dtype == DType::F16)
        fits = narrow_to(half_bits_to_float(load<std::uint16_t>(p)), dst[i]);
      else if (dtype == DType::BF16)
        fits = narrow_to(bfloat16_bits_to_float(load<std::uint16_t>(p)), dst[i]);
      else if (dtype == DType::F32)
        fits = narrow_to(load<float>(p), dst[i]);
      else if (dtype == DType::F64)
        fits = narrow_to(load<double>(p), dst[i]);
      if (!fits) return i;
    } else if constexpr (is_float_element<T>) {
      switch (dtype) {
        case DType::F16:
          dst[i] = static_cast<T>(half_bits_to_float(load<std::uint16_t>(p)));
          break;
        case DType::BF16:
          dst[i] = static_cast<T>(bfloat16_bits_to_float(load<std::uint16_t>(p)));
          break;
        case DType::F32:
          dst[i] = static_cast<T>(load<float>(p));
          break;
        case DType::F64:
          dst[i] = static_cast<T>(load<double>(p));
          break;
        case DType::I32:
        case DType::I64:
          break;  // rejected by the caller
      }
    } else {
      const std::int64_t value =
          dtype == DType::I32 ? std::int64_t{load<std::int32_t>(p)} : load<std::int64_t>(p);
      if (!fits<T>(value)) return i;
      dst[i] = static_cast<T>(value);
    }
  }
  return count;
}

/// A name from a file, quoted and cut to an excerpt for an error message.
inline std::string quoted(const std::string& text) { return "'" + excerpt(text) + "'"; }

}  // namespace detail

/// \brief A read-only safetensors file whose header has been validated.
///
/// Opening requires a regular file (a FIFO or a device is refused without blocking),
/// checks the header length against the file size, parses the JSON header (nesting bounded,
/// duplicate names refused) and checks every tensor entry (known dtype, non-negative shape,
/// begin <= end, offsets inside the data section, byte count == elements * itemsize, no two
/// tensors overlapping). Data problems throw kmoe::runtime_error, including a file that
/// was truncated after it was opened; bad arguments (a path that cannot be opened or is not
/// a regular file, an unknown tensor name, a wrong element count) throw
/// kmoe::invalid_argument. Every message names the file. Gaps between tensors are
/// tolerated. Move-only; reads are thread-safe.
class SafetensorsFile {
 public:
  /// \brief Opens `path` and validates its header.
  explicit SafetensorsFile(std::string path)
      : path_(std::move(path)), file_(path_, "SafetensorsFile") {
    parse_header();
  }

  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  SafetensorsFile(SafetensorsFile&&) noexcept = default;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept = default;

  /// \brief The path the file was opened with.
  const std::string& path() const { return path_; }

  /// \brief The optional "__metadata__" string map (empty if absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// \brief Whether the file holds a tensor called `name`.
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  /// \brief The tensor called `name`; throws kmoe::invalid_argument naming it and the file
  /// if there is none.
  const TensorInfo& info(const std::string& name) const {
    const auto it = tensors_.find(name);
    if (it == tensors_.end()) {
      throw invalid_argument("SafetensorsFile::info", "name", name, "no such tensor in " + path_);
    }
    return it->second;
  }

  /// \brief All tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> result;
    result.reserve(tensors_.size());
    for (const auto& entry : tensors_) result.push_back(entry.first);
    return result;
  }

  /// \brief Copies tensor `name` into `dst`, which must hold exactly `count` elements.
  ///
  /// Floating tensors (F16/BF16/F32/F64) convert to T = float, double, kmoe::bfloat16 or
  /// kmoe::float16; I32/I64 tensors to any integer T, with a kmoe::runtime_error if a value
  /// does not fit. A tensor whose dtype is T's own (BF16 into kmoe::bfloat16, F16 into
  /// kmoe::float16, F32 into float, F64 into double) is copied bit for bit. Into a 16-bit T,
  /// every other floating dtype rounds once to nearest, ties to even: F16/BF16/F32 with T's
  /// own conversion from float (the 16-bit dtypes widen to float exactly), F64 in one step
  /// from the double (io/float16.hpp; through float it could round twice); a finite value
  /// beyond T's range (float16: 65520 and above) is a kmoe::runtime_error naming it.
  template <class T>
  void read_into(const std::string& name, T* dst, std::size_t count) const {
    const std::uint64_t elements = info(name).element_count();
    if (count != elements) {
      throw invalid_argument("SafetensorsFile::read_into", "count", std::to_string(count),
                             "tensor " + detail::quoted(name) + " in " + path_ + " has " +
                                 std::to_string(elements) + " elements");
    }
    read_range_into(name, 0, dst, count);
  }

  /// \brief Copies elements [first, first + count) of tensor `name` (in its row-major
  /// order) into `dst`, converting as read_into does; reads only those bytes, so one
  /// expert's slice of a fused [E, ...] tensor costs its own size.
  template <class T>
  void read_range_into(const std::string& name, std::uint64_t first_element, T* dst,
                       std::size_t count) const {
    static_assert(detail::is_floating_element<T> || detail::is_int_element<T>,
                  "read_into: T must be float, double, kmoe::bfloat16, kmoe::float16 or an "
                  "integer type");
    const TensorInfo& tensor = info(name);
    const std::uint64_t elements = tensor.element_count();
    if (first_element > elements || count > elements - first_element) {
      throw invalid_argument("SafetensorsFile::read_range_into", "count", std::to_string(count),
                             "elements [" + std::to_string(first_element) + ", +" +
                                 std::to_string(count) + ") of tensor " + detail::quoted(name) +
                                 " in " + path_ + ", which has " + std::to_string(elements) +
                                 " elements");
    }
    if (detail::is_floating_element<T> != is_floating(tensor.dtype)) {
      throw invalid_argument(
          "SafetensorsFile::read_into", "name", name,
          std::string("tensor in ") + path_ + " has dtype " + dtype_name(tensor.dtype) +
              ", which cannot be read as " +
              (detail::is_floating_element<T> ? "a floating-point" : "an integer") + " type");
    }
    if (count == 0) return;
    if (dst == nullptr) {
      throw invalid_argument("SafetensorsFile::read_into", "dst", "nullptr",
                             "destination for " + detail::quoted(name) + " is null");
    }
    const std::size_t size = dtype_size(tensor.dtype);
    const std::uint64_t offset = data_offset_ + tensor.begin + first_element * size;
    if constexpr (detail::has_own_dtype<T>) {
      if (tensor.dtype == detail::own_dtype<T>()) {  // T's own bytes: no staging
        file_.read_exact(dst, count * size, offset,
                         "SafetensorsFile: tensor " + detail::quoted(name));
        return;
      }
    }
    const std::size_t chunk_elements = detail::read_chunk_bytes / size;
    std::vector<unsigned char> staging(std::min(count, chunk_elements) * size);
    for (std::size_t first = 0; first < count; first += chunk_elements) {
      const std::size_t n = std::min(chunk_elements, count - first);
      file_.read_exact(staging.data(), n * size, offset + first * size,
                       "SafetensorsFile: tensor " + detail::quoted(name));
      const std::size_t bad = detail::convert_from(tensor.dtype, staging.data(), dst + first, n);
      if (bad != n) {
        throw runtime_error("SafetensorsFile: " + path_ + ": tensor " + detail::quoted(name) +
                            ": element " + std::to_string(first_element + first + bad) +
                            " does not fit " + detail::element_type_name<T>());
      }
    }
  }

  /// \brief Tensor `name` as a new vector of T (see read_into for the conversions).
  template <class T>
  std::vector<T> read(const std::string& name) const {
    std::vector<T> result(static_cast<std::size_t>(info(name).element_count()));
    read_into(name, result.data(), result.size());
    return result;
  }

  /// \brief Throws kmoe::runtime_error naming the file if it is no longer the file whose
  /// header was validated (RegularFile::change_since_open): a lazy reader calls it before
  /// each read, since offsets from the old header would read another file's bytes.
  void require_unchanged() const {
    const std::string change = file_.change_since_open();
    if (!change.empty()) fail(change + "; reopen the checkpoint");
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw runtime_error("SafetensorsFile: " + path_ + ": " + why);
  }

  void parse_header() {
    const std::uint64_t size = file_.size();
    if (size < 8) {
      fail("file is " + std::to_string(size) +
           " bytes, too short for the 8-byte header length (truncated file?)");
    }
    unsigned char length[8];
    file_.read_exact(length, 8, 0, "SafetensorsFile");
    std::uint64_t header_bytes = 0;
    for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | length[i];
    if (header_bytes > size - 8 || header_bytes > detail::max_header_bytes) {
      fail("header length " + std::to_string(header_bytes) + " exceeds " +
           (header_bytes > size - 8
                ? "the " + std::to_string(size - 8) + " bytes after the length field"
                : "the limit of " + std::to_string(detail::max_header_bytes) + " bytes"));
    }
    std::string text(static_cast<std::size_t>(header_bytes), '\0');
    file_.read_exact(text.data(), text.size(), 8, "SafetensorsFile");
    // As in the reference implementation, the header starts with '{' (nlohmann would also
    // skip a byte-order mark and leading whitespace).
    if (text.empty() || text[0] != '{')
      fail("header is not a JSON object: it does not start with '{'");
    // Duplicate tensor names are refused here: nlohmann would keep the last one silently.
    const nlohmann::json header = parse_json(text, path_, "SafetensorsFile");
    if (!header.is_object()) fail("header is not a JSON object");
    data_offset_ = 8 + header_bytes;
    const std::uint64_t data_bytes = size - data_offset_;

    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        parse_metadata(entry);
        continue;
      }
      tensors_.emplace(name, parse_tensor(name, entry, data_bytes));
    }
    check_overlaps();
  }

  void parse_metadata(const nlohmann::json& entry) {
    if (!entry.is_object()) fail("__metadata__ is not a JSON object");
    for (const auto& [key, value] : entry.items()) {
      if (!value.is_string())
        fail("__metadata__ value for " + detail::quoted(key) + " is " + json_excerpt(value) +
             ", not a string");
      metadata_.emplace(key, value.get<std::string>());
    }
  }

  TensorInfo parse_tensor(const std::string& name, const nlohmann::json& entry,
                          std::uint64_t data_bytes) const {
    const std::string where = "tensor " + detail::quoted(name) + ": ";
    if (!entry.is_object()) fail(where + "entry is not a JSON object");
    const auto dtype = entry.find("dtype");
    const auto shape = entry.find("shape");
    const auto offsets = entry.find("data_offsets");
    if (dtype == entry.end() || !dtype->is_string()) fail(where + "missing string \"dtype\"");
    if (shape == entry.end() || !shape->is_array()) fail(where + "missing array \"shape\"");
    if (offsets == entry.end() || !offsets->is_array() || offsets->size() != 2 ||
        !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
      fail(where + "\"data_offsets\" must be two non-negative integers [begin, end]");
    }

    TensorInfo info;
    info.name = name;
    const std::string dtype_text = dtype->get<std::string>();
    if (!detail::parse_dtype(dtype_text, info.dtype)) {
      fail(where + "unsupported dtype " + detail::quoted(dtype_text) +
           " (kmoe reads F16, BF16, F32, F64, I32, I64)");
    }

    // Overflow-checked so that absurd extents are reported instead of wrapping around; a
    // zero extent makes the tensor empty however large the others are, so the product is
    // taken over the non-zero extents only.
    std::int64_t bytes = static_cast<std::int64_t>(dtype_size(info.dtype));
    bool empty = false;
    for (const auto& extent : *shape) {
      if (!extent.is_number_unsigned() ||
          extent.get<std::uint64_t>() >
              static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
        fail(where + "shape " + json_excerpt(*shape) +
             " has an extent that is not an integer in [0, 2^63)");
      }
      const auto value = static_cast<std::int64_t>(extent.get<std::uint64_t>());
      info.shape.push_back(value);
      if (value == 0) {
        empty = true;
        continue;
      }
      try {
        bytes = kmoe::detail::checked_mul(bytes, value, "SafetensorsFile", "shape");
      } catch (const invalid_argument&) {
        // Keep scanning: a later zero extent makes the tensor empty and valid.
        bytes = std::numeric_limits<std::int64_t>::max();
      }
    }
    if (empty) bytes = 0;
    if (bytes == std::numeric_limits<std::int64_t>::max())
      fail(where + "shape " + json_excerpt(*shape) + " is too large");

    info.begin = (*offsets)[0].get<std::uint64_t>();
    info.end = (*offsets)[1].get<std::uint64_t>();
    const std::string range =
        "data_offsets [" + std::to_string(info.begin) + ", " + std::to_string(info.end) + "]";
    if (info.begin > info.end) fail(where + range + " has begin > end");
    if (info.end > data_bytes) {
      fail(where + range + " out of range of the " + std::to_string(data_bytes) +
           "-byte data section");
    }
    if (info.end - info.begin != static_cast<std::uint64_t>(bytes)) {
      fail(where + range + " spans " + std::to_string(info.end - info.begin) + " bytes but shape " +
           json_excerpt(*shape) + " of " + dtype_text + " needs " + std::to_string(bytes));
    }
    return info;
  }

  void check_overlaps() const {
    std::vector<const TensorInfo*> sorted;
    for (const auto& entry : tensors_) {
      if (entry.second.begin != entry.second.end) sorted.push_back(&entry.second);
    }
    std::sort(sorted.begin(), sorted.end(),
              [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
    for (std::size_t i = 1; i < sorted.size(); ++i) {
      if (sorted[i]->begin < sorted[i - 1]->end) {
        fail("tensors " + detail::quoted(sorted[i - 1]->name) + " and " +
             detail::quoted(sorted[i]->name) + " overlap in the data section");
      }
    }
  }

  std::string path_;
  RegularFile file_;
  std::uint64_t data_offset_ = 0;  // first byte after the header
  std::map<std::string, std::string> metadata_;
  std::map<std::string, TensorInfo> tensors_;
};

/// \brief Builds a safetensors file in memory and writes it out.
///
/// Data is converted to the requested dtype when added (round to nearest even for F16/BF16
/// and F32-from-double; I32 from wider integers is range-checked). kmoe::bfloat16 and
/// kmoe::float16 data keep their exact bits in their own dtype (BF16, F16), widen exactly
/// to F32/F64, and round once (through the exact float) to the other 16-bit dtype. The layout follows the
/// reference implementation: tensors ordered by decreasing element size, then name, so each
/// is aligned to its element size; header padded with spaces to a multiple of 8 bytes.
class SafetensorsWriter {
 public:
  /// \brief Adds tensor `name` of the given dtype and row-major `shape`, copying
  /// product(shape) elements from `data`. Floating T (float, double, kmoe::bfloat16,
  /// kmoe::float16) goes to F16/BF16/F32/F64, integer T to I32/I64.
  template <class T>
  void add(const std::string& name, DType dtype, const std::vector<std::int64_t>& shape,
           const T* data) {
    static_assert(detail::is_floating_element<T> || detail::is_int_element<T>,
                  "add: T must be float, double, kmoe::bfloat16, kmoe::float16 or an integer "
                  "type");
    constexpr const char* where = "SafetensorsWriter::add";
    if (name.empty() || name == "__metadata__") {
      throw invalid_argument(where, "name", detail::quoted(name), "reserved or empty tensor name");
    }
    if (std::any_of(entries_.begin(), entries_.end(),
                    [&](const Entry& e) { return e.info.name == name; })) {
      throw invalid_argument(where, "name", name, "tensor already added");
    }
    if (detail::is_floating_element<T> != is_floating(dtype)) {
      throw invalid_argument(where, "dtype", dtype_name(dtype),
                             "tensor " + detail::quoted(name) + " is given " +
                                 (detail::is_floating_element<T> ? "floating-point" : "integer") +
                                 " data");
    }
    Entry entry;
    entry.info.name = name;
    entry.info.dtype = dtype;
    for (std::int64_t extent : shape) {
      if (extent < 0) {
        throw invalid_argument(where, "shape", std::to_string(extent),
                               "negative extent for tensor " + detail::quoted(name));
      }
    }
    entry.info.shape = shape;
    const std::uint64_t count = entry.info.element_count();
    if (count > 0 && data == nullptr) {
      throw invalid_argument(where, "data", "nullptr",
                             "no data for tensor " + detail::quoted(name));
    }
    const std::size_t size = dtype_size(dtype);
    entry.bytes.resize(static_cast<std::size_t>(kmoe::detail::checked_mul(
        static_cast<std::int64_t>(count), static_cast<std::int64_t>(size), where, "bytes")));
    for (std::size_t i = 0; i < count; ++i) store(entry, i * size, data[i]);
    entries_.push_back(std::move(entry));
  }

  /// \brief add() with a size check: `data` must hold exactly product(shape) elements.
  template <class T>
  void add(const std::string& name, DType dtype, const std::vector<std::int64_t>& shape,
           const std::vector<T>& data) {
    std::int64_t count = 1;
    for (std::int64_t extent : shape)
      count = kmoe::detail::checked_mul(count, std::max<std::int64_t>(extent, 0),
                                        "SafetensorsWriter::add", "shape");
    if (data.size() != static_cast<std::uint64_t>(count)) {
      throw invalid_argument("SafetensorsWriter::add", "data.size()", std::to_string(data.size()),
                             "tensor " + detail::quoted(name) + " has " + std::to_string(count) +
                                 " elements");
    }
    add(name, dtype, shape, data.data());
  }

  /// \brief Sets a "__metadata__" entry.
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  /// \brief Writes all added tensors to `path`, replacing any existing file atomically: on
  /// any failure the previous file is left as it was (see StagedFile).
  void write(const std::string& path) const { stage(path).commit(); }

  /// \brief Writes all added tensors to a temporary file next to `path`; the returned
  /// StagedFile's commit() puts it in place, and destroying it uncommitted discards it. Lets
  /// a caller replace several outputs only once all of them have been written.
  StagedFile stage(const std::string& path) const {
    std::vector<const Entry*> order;
    for (const Entry& e : entries_) order.push_back(&e);
    std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
      const std::size_t sa = dtype_size(a->info.dtype);
      const std::size_t sb = dtype_size(b->info.dtype);
      return sa != sb ? sa > sb : a->info.name < b->info.name;
    });

    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const Entry* e : order) {
      const auto end = static_cast<std::uint64_t>(kmoe::detail::checked_add(
          static_cast<std::int64_t>(offset), static_cast<std::int64_t>(e->bytes.size()),
          "SafetensorsWriter::write", "data_offsets"));
      header[e->info.name] = {{"dtype", dtype_name(e->info.dtype)},
                              {"shape", e->info.shape},
                              {"data_offsets", {offset, end}}};
      offset = end;
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');

    StagedFile out(path, "SafetensorsWriter::write");
    unsigned char length[8];
    for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>(text.size() >> (8 * i));
    out.write(length, 8);
    out.write(text.data(), text.size());
    for (const Entry* e : order) out.write(e->bytes.data(), e->bytes.size());
    return out;
  }

 private:
  struct Entry {
    TensorInfo info;
    std::vector<unsigned char> bytes;
  };

  template <class S>
  static void put(Entry& entry, std::size_t at, S value) {
    std::memcpy(entry.bytes.data() + at, &value, sizeof value);
  }

  template <class T>
  static void store(Entry& entry, std::size_t at, T value) {
    if constexpr (detail::is_half_element<T>) {
      if (entry.info.dtype == detail::own_dtype<T>())
        put(entry, at, value.bits());
      else
        store(entry, at, float(value));  // exact; the other 16-bit dtype rounds once
    } else if constexpr (detail::is_float_element<T>) {
      switch (entry.info.dtype) {
        case DType::F16:
          put(entry, at, to_half_bits(value));
          break;
        case DType::BF16:
          put(entry, at, to_bfloat16_bits(value));
          break;
        case DType::F32:
          put(entry, at, static_cast<float>(value));
          break;
        case DType::F64:
          put(entry, at, static_cast<double>(value));
          break;
        case DType::I32:
        case DType::I64:
          break;  // rejected in add()
      }
    } else {
      if constexpr (std::is_unsigned_v<T> && sizeof(T) >= sizeof(std::int64_t)) {
        if (value > static_cast<T>(std::numeric_limits<std::int64_t>::max())) {
          throw invalid_argument("SafetensorsWriter::add", "data", std::to_string(value),
                                 "does not fit in I64 for tensor " +
                                     detail::quoted(entry.info.name));
        }
      }
      const auto wide = static_cast<std::int64_t>(value);
      if (entry.info.dtype == DType::I64) {
        put(entry, at, wide);
      } else {
        if (!detail::fits<std::int32_t>(wide)) {
          throw invalid_argument("SafetensorsWriter::add", "data", std::to_string(wide),
                                 "does not fit in I32 for tensor " +
                                     detail::quoted(entry.info.name));
        }
        put(entry, at, static_cast<std::int32_t>(wide));
      }
    }
  }

  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

/// \brief A Hugging Face model directory: either a single `model.safetensors` or shards
/// listed by `model.safetensors.index.json` ("weight_map": tensor name -> shard file).
///
/// Shards are opened (and validated) the first time one of their tensors is asked for. All
/// members are safe to call concurrently.
///
/// Shard names in the index must be relative paths without ".." components (no absolute
/// path, no NUL), so that the index alone cannot point outside the directory. Symbolic
/// links inside the directory are followed wherever they lead: the Hugging Face hub cache
/// stores every file of a snapshot as a link into ../../blobs, so the directory's own
/// links are trusted as much as the directory itself. Whatever a name or link resolves to
/// must be a regular file (a FIFO, device or directory is refused without blocking).
class ShardedCheckpoint {
 public:
  /// \brief Opens the checkpoint in `directory`.
  explicit ShardedCheckpoint(std::string directory) : directory_(std::move(directory)) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (!fs::is_directory(directory_, ec)) {
      throw invalid_argument("ShardedCheckpoint", "directory", directory_, "not a directory");
    }
    const fs::path index = fs::path(directory_) / "model.safetensors.index.json";
    const fs::path single = fs::path(directory_) / "model.safetensors";
    if (fs::exists(index, ec)) {
      read_index(index.string());
    } else if (fs::exists(single, ec)) {
      auto file = std::make_unique<SafetensorsFile>(single.string());
      for (const std::string& name : file->names()) weight_map_.emplace(name, "model.safetensors");
      shards_.emplace("model.safetensors", std::move(file));
    } else {
      throw invalid_argument("ShardedCheckpoint", "directory", directory_,
                             "contains neither model.safetensors.index.json nor model.safetensors");
    }
  }

  /// \brief The directory the checkpoint was opened from.
  const std::string& directory() const { return directory_; }

  /// \brief Whether the checkpoint holds a tensor called `name`.
  bool contains(const std::string& name) const { return weight_map_.count(name) != 0; }

  /// \brief All tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> result;
    result.reserve(weight_map_.size());
    for (const auto& entry : weight_map_) result.push_back(entry.first);
    return result;
  }

  /// \brief The tensor called `name`; throws kmoe::invalid_argument naming it and the
  /// directory if there is none.
  const TensorInfo& info(const std::string& name) const { return file_for(name).info(name); }

  /// \brief The path of the file holding tensor `name` (opening its shard if needed).
  const std::string& path_of(const std::string& name) const { return file_for(name).path(); }

  /// \brief Copies tensor `name` into `dst` (see SafetensorsFile::read_into).
  template <class T>
  void read_into(const std::string& name, T* dst, std::size_t count) const {
    file_for(name).read_into(name, dst, count);
  }

  /// \brief Copies elements [first_element, first_element + count) of tensor `name` into
  /// `dst` (see SafetensorsFile::read_range_into).
  template <class T>
  void read_range_into(const std::string& name, std::uint64_t first_element, T* dst,
                       std::size_t count) const {
    file_for(name).read_range_into(name, first_element, dst, count);
  }

  /// \brief Tensor `name` as a new vector of T (see SafetensorsFile::read_into).
  template <class T>
  std::vector<T> read(const std::string& name) const {
    return file_for(name).template read<T>(name);
  }

  /// \brief Throws kmoe::runtime_error naming the shard of tensor `name` if that file
  /// changed since it was opened (SafetensorsFile::require_unchanged).
  void require_unchanged(const std::string& name) const { file_for(name).require_unchanged(); }

 private:
  void read_index(const std::string& index_path) {
    std::string text;
    try {
      text = read_small_file(index_path, detail::max_index_bytes, "ShardedCheckpoint");
    } catch (const invalid_argument& e) {
      // The index's name is fixed by the format, so an unreadable one is bad data.
      throw runtime_error(std::string("ShardedCheckpoint: ") + e.what());
    }
    const nlohmann::json index = parse_json(text, index_path, "ShardedCheckpoint");
    const auto map = index.is_object() ? index.find("weight_map") : index.end();
    if (map == index.end() || !map->is_object()) {
      throw runtime_error("ShardedCheckpoint: " + index_path + ": no \"weight_map\" object");
    }
    for (const auto& [name, shard] : map->items()) {
      if (!shard.is_string() || !is_plain_relative(shard.get<std::string>())) {
        throw runtime_error("ShardedCheckpoint: " + index_path + ": tensor " +
                            detail::quoted(name) + " maps to " + json_excerpt(shard) +
                            ", which is not a relative file path inside the directory "
                            "(absolute paths and \"..\" are refused)");
      }
      weight_map_.emplace(name, shard.get<std::string>());
    }
  }

  // Shard names come from a file; keep them from reaching outside the checkpoint directory.
  static bool is_plain_relative(const std::string& shard) {
    const std::filesystem::path p(shard);
    if (shard.empty() || p.is_absolute() || shard.find('\0') != std::string::npos) return false;
    return std::none_of(p.begin(), p.end(),
                        [](const std::filesystem::path& part) { return part == ".."; });
  }

  const SafetensorsFile& file_for(const std::string& name) const {
    const auto it = weight_map_.find(name);
    if (it == weight_map_.end()) {
      throw invalid_argument("ShardedCheckpoint", "name", name,
                             "no such tensor in checkpoint directory " + directory_);
    }
    std::lock_guard<std::mutex> lock(mutex_);
    auto& shard = shards_[it->second];
    if (!shard) {
      const std::string shard_path = (std::filesystem::path(directory_) / it->second).string();
      try {
        shard = std::make_unique<SafetensorsFile>(shard_path);
      } catch (const invalid_argument& e) {
        // The path came from the index, not the caller: a missing shard is bad data.
        throw runtime_error("ShardedCheckpoint: " + directory_ + ": index maps tensor " +
                            detail::quoted(name) +
                            " to a shard that cannot be opened: " + e.what());
      }
    }
    if (!shard->contains(name)) {
      throw runtime_error("ShardedCheckpoint: " + directory_ + ": index maps tensor " +
                          detail::quoted(name) + " to " + shard->path() +
                          ", which does not contain it");
    }
    return *shard;
  }

  std::string directory_;
  std::map<std::string, std::string> weight_map_;  // tensor name -> shard file name
  mutable std::mutex mutex_;
  mutable std::map<std::string, std::unique_ptr<SafetensorsFile>> shards_;
};

}  // namespace kmoe::io
