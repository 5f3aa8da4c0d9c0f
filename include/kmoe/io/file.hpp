// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file file.hpp
/// \brief POSIX file access for untrusted paths: opening that never blocks on a FIFO or a
/// device, reads that report a file truncated while open instead of faulting, and outputs
/// replaced atomically so that a failed write leaves the previous file intact.
///
/// Nothing here depends on Kokkos or nlohmann-json.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>

#include "kmoe/error.hpp"

namespace kmoe::io {

namespace detail {

inline const char* file_kind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

inline std::string errno_text(int err) { return std::strerror(err); }

}  // namespace detail

/// \brief A regular file open for reading; closed on destruction. Move-only.
///
/// The file is opened with O_NONBLOCK so that a FIFO or a device named by mistake (or by an
/// attacker) cannot block open(); fstat then requires a regular file, and O_NONBLOCK is
/// cleared again. Data is read with pread (never mapped), so a file truncated after it was
/// opened gives a short read and an error, never SIGBUS.
class RegularFile {
 public:
  /// \brief Opens `path`; throws kmoe::invalid_argument "<where>: invalid path = ..." if it
  /// cannot be opened or is not a regular file.
  RegularFile(const std::string& path, const char* where) : path_(path) {
    if (path.find('\0') != std::string::npos)
      throw invalid_argument(where, "path", path, "contains a NUL character");
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd_ < 0)
      throw invalid_argument(where, "path", path, "cannot open: " + detail::errno_text(errno));
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      const int err = errno;
      close();
      throw invalid_argument(where, "path", path, "cannot stat: " + detail::errno_text(err));
    }
    if (!S_ISREG(st.st_mode)) {
      close();
      throw invalid_argument(where, "path", path,
                             std::string("is ") + detail::file_kind(st.st_mode) +
                                 ", not a regular file");
    }
    const int flags = ::fcntl(fd_, F_GETFL);
    if (flags < 0 || ::fcntl(fd_, F_SETFL, flags & ~O_NONBLOCK) != 0) {
      const int err = errno;
      close();
      throw invalid_argument(where, "path", path,
                             "cannot clear O_NONBLOCK: " + detail::errno_text(err));
    }
    size_ = static_cast<std::uint64_t>(st.st_size);
    identity_ = Identity::of(st);
  }

  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;
  RegularFile(RegularFile&& other) noexcept
      : path_(std::move(other.path_)),
        fd_(std::exchange(other.fd_, -1)),
        size_(other.size_),
        identity_(other.identity_) {}
  RegularFile& operator=(RegularFile&& other) noexcept {
    if (this != &other) {
      close();
      path_ = std::move(other.path_);
      fd_ = std::exchange(other.fd_, -1);
      size_ = other.size_;
      identity_ = other.identity_;
    }
    return *this;
  }
  ~RegularFile() { close(); }

  const std::string& path() const { return path_; }
  /// \brief The size when the file was opened.
  std::uint64_t size() const { return size_; }

  /// \brief Why the file is no longer the one opened, or "" if it still is: its size or
  /// modification time changed (rewritten in place), or its path now names another file or
  /// none (replaced or removed). Lazy readers call it before each read, so that a
  /// checkpoint changed underneath a long run is reported rather than mixed into the
  /// weights. Thread-safe.
  std::string change_since_open() const {
    struct stat now {};
    if (::fstat(fd_, &now) != 0) return "cannot stat: " + detail::errno_text(errno);
    if (std::uint64_t(now.st_size) != size_)
      return "its size changed from " + std::to_string(size_) + " to " +
             std::to_string(now.st_size) + " bytes since it was opened";
    if (Identity::of(now).modified != identity_.modified)
      return "it was modified since it was opened (modification time changed)";
    struct stat named {};
    if (::stat(path_.c_str(), &named) != 0) return "it was removed since it was opened";
    const Identity current = Identity::of(named);
    if (current.device != identity_.device || current.inode != identity_.inode)
      return "the path names another file than the one opened (replaced since it was opened)";
    return "";
  }

  /// \brief Reads exactly `count` bytes at byte `offset` into `dst`; throws
  /// kmoe::runtime_error "<where>: <path>: ..." on a read error or if the file now ends
  /// before offset + count (it was truncated after it was opened). Thread-safe.
  void read_exact(void* dst, std::uint64_t count, std::uint64_t offset,
                  const std::string& where) const {
    auto* out = static_cast<unsigned char*>(dst);
    std::uint64_t done = 0;
    while (done < count) {
      // pread takes at most SSIZE_MAX; Linux transfers at most ~2 GiB per call anyway.
      const std::uint64_t chunk = std::min<std::uint64_t>(count - done, std::uint64_t{1} << 30);
      const ssize_t got = ::pread(fd_, out + done, static_cast<std::size_t>(chunk),
                                  static_cast<off_t>(offset + done));
      if (got < 0) {
        if (errno == EINTR) continue;
        throw runtime_error(where + ": " + path_ + ": read failed at byte " +
                            std::to_string(offset + done) + ": " + detail::errno_text(errno));
      }
      if (got == 0)
        throw runtime_error(where + ": " + path_ + ": file ends at byte " +
                            std::to_string(offset + done) + ", " + std::to_string(count - done) +
                            " bytes short of what was there when it was opened "
                            "(truncated while open?)");
      done += static_cast<std::uint64_t>(got);
    }
  }

 private:
  void close() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  /// What tells a file apart from its replacement or its rewritten self.
  struct Identity {
    std::uint64_t device = 0, inode = 0;
    std::int64_t modified = 0;  ///< modification time, nanoseconds
    static Identity of(const struct stat& st) {
      return {std::uint64_t(st.st_dev), std::uint64_t(st.st_ino),
              std::int64_t(st.st_mtim.tv_sec) * 1'000'000'000 + std::int64_t(st.st_mtim.tv_nsec)};
    }
  };

  std::string path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
  Identity identity_;
};

/// \brief The whole content of the regular file `path`, at most `max_bytes` long; errors as
/// RegularFile's, plus kmoe::runtime_error if the file is larger (a JSON file that size is
/// not a config or an index, and a huge sparse file must not be read into memory).
inline std::string read_small_file(const std::string& path, std::uint64_t max_bytes,
                                   const char* where) {
  const RegularFile file(path, where);
  if (file.size() > max_bytes)
    throw runtime_error(std::string(where) + ": " + path + ": file is " +
                        std::to_string(file.size()) + " bytes, more than the limit of " +
                        std::to_string(max_bytes));
  std::string text(static_cast<std::size_t>(file.size()), '\0');
  file.read_exact(text.data(), text.size(), 0, where);
  return text;
}

/// \brief An output file written under a temporary name in the destination's directory and
/// renamed over the destination by commit(), so that the destination is either the previous
/// file or the complete new one, never a truncated mix. Destroying an uncommitted
/// StagedFile removes the temporary file. Move-only.
///
/// A destination that is a symbolic link is resolved first, so the link's target is
/// replaced (as writing through the link would) rather than the link itself. A destination
/// that exists but is not a regular file (a device, a FIFO, a directory) is refused: rename
/// would replace the device node itself.
class StagedFile {
 public:
  StagedFile(const std::string& destination, const char* where) : where_(where) {
    namespace fs = std::filesystem;
    if (destination.empty() || destination.find('\0') != std::string::npos)
      throw invalid_argument(where, "path", destination, "is empty or contains a NUL character");
    std::error_code ec;
    fs::path target(destination);
    if (fs::is_symlink(fs::symlink_status(target, ec))) {
      target = fs::weakly_canonical(target, ec);
      if (ec)
        throw invalid_argument(where, "path", destination,
                               "cannot resolve the symbolic link: " + ec.message());
    }
    struct stat st {};
    if (::stat(target.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
      throw invalid_argument(where, "path", destination,
                             std::string("is ") + detail::file_kind(st.st_mode) +
                                 ", not a regular file; refusing to replace it");
    destination_ = target.string();
    static std::atomic<unsigned> counter{0};
    const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
    // A short name of its own, so that a destination name near NAME_MAX still works.
    const fs::path directory = fs::path(destination_).parent_path();
    for (int attempt = 0; attempt < 100 && fd_ < 0; ++attempt) {
      temporary_ =
          (directory / (".kmoe-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) +
                        "-" + std::to_string(stamp % 1000000007) + ".tmp"))
              .string();
      fd_ = ::open(temporary_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd_ < 0 && errno != EEXIST) break;
    }
    if (fd_ < 0)
      throw invalid_argument(where, "path", destination,
                             "cannot create a temporary file " + temporary_ +
                                 " next to it: " + detail::errno_text(errno));
  }

  StagedFile(const StagedFile&) = delete;
  StagedFile& operator=(const StagedFile&) = delete;
  StagedFile(StagedFile&& other) noexcept
      : where_(other.where_),
        destination_(std::move(other.destination_)),
        temporary_(std::move(other.temporary_)),
        fd_(std::exchange(other.fd_, -1)) {}
  StagedFile& operator=(StagedFile&&) = delete;
  ~StagedFile() { discard(); }

  /// \brief The path that commit() replaces (a symbolic link resolved).
  const std::string& destination() const { return destination_; }

  /// \brief Appends `count` bytes; throws kmoe::runtime_error naming the destination.
  void write(const void* data, std::size_t count) {
    const auto* bytes = static_cast<const unsigned char*>(data);
    while (count > 0) {
      const ssize_t put = ::write(fd_, bytes, count);
      if (put < 0) {
        if (errno == EINTR) continue;
        fail("write failed: " + detail::errno_text(errno));
      }
      bytes += put;
      count -= static_cast<std::size_t>(put);
    }
  }

  /// \brief Flushes the data to disk and renames the temporary file over the destination.
  void commit() {
    if (::fsync(fd_) != 0) fail("fsync failed: " + detail::errno_text(errno));
    const int fd = std::exchange(fd_, -1);
    if (::close(fd) != 0) fail("close failed: " + detail::errno_text(errno));
    if (::rename(temporary_.c_str(), destination_.c_str()) != 0)
      fail("cannot rename " + temporary_ + " to it: " + detail::errno_text(errno));
    temporary_.clear();
  }

 private:
  [[noreturn]] void fail(const std::string& why) {
    const std::string message = std::string(where_) + ": " + destination_ + ": " + why +
                                " (the previous file, if any, is unchanged)";
    discard();
    throw runtime_error(message);
  }

  void discard() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    if (!temporary_.empty()) ::unlink(temporary_.c_str());
    temporary_.clear();
  }

  const char* where_;
  std::string destination_;
  std::string temporary_;
  int fd_ = -1;
};

}  // namespace kmoe::io
