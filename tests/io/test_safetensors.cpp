// SPDX-License-Identifier: BSD-3-Clause
// Tests for kmoe/io/safetensors.hpp and kmoe/io/float16.hpp.

#include <unistd.h>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_exception.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "kmoe/error.hpp"
#include "kmoe/io/float16.hpp"
#include "kmoe/io/safetensors.hpp"
#include "kmoe/low_precision.hpp"

namespace fs = std::filesystem;
using Catch::Matchers::ContainsSubstring;
using Catch::Matchers::MessageMatches;
using kmoe::io::DType;
using kmoe::io::SafetensorsFile;
using kmoe::io::SafetensorsWriter;
using kmoe::io::ShardedCheckpoint;

namespace {

// A fresh directory per test case, removed afterwards; the pid keeps parallel test
// processes apart.
class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() /
            ("kmoe-io-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(std::uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i)
    bytes[static_cast<std::size_t>(i)] = static_cast<char>(value >> (8 * i));
  return bytes;
}

// A hand-made file: `header` as the JSON text, `data_bytes` zero bytes of data.
std::string raw_file(const std::string& header, std::size_t data_bytes) {
  return le64(header.size()) + header + std::string(data_bytes, '\0');
}

// A hand-made file holding one tensor `name` of 16-bit `dtype` with the given bit patterns.
std::string sixteen_bit_file(const std::string& name, const char* dtype,
                             const std::vector<std::uint16_t>& bits) {
  std::string header = "{\"" + name + "\": {\"dtype\": \"" + dtype + "\", \"shape\": [" +
                       std::to_string(bits.size()) + "], \"data_offsets\": [0, " +
                       std::to_string(2 * bits.size()) + "]}}";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string data(2 * bits.size(), '\0');
  for (std::size_t i = 0; i < bits.size(); ++i) {
    data[2 * i] = static_cast<char>(bits[i] & 0xff);
    data[2 * i + 1] = static_cast<char>(bits[i] >> 8);
  }
  return le64(header.size()) + header + data;
}

template <class T>
std::vector<std::uint16_t> bits_of(const std::vector<T>& values) {
  std::vector<std::uint16_t> bits;
  for (const T& v : values) bits.push_back(v.bits());
  return bits;
}

float pow2f(int e) { return std::ldexp(1.0f, e); }
double pow2(int e) { return std::ldexp(1.0, e); }

}  // namespace

TEST_CASE("half conversion matches known bit patterns", "[io][float16]") {
  using kmoe::io::half_bits_to_float;
  using kmoe::io::to_half_bits;

  CHECK(to_half_bits(1.0f) == 0x3c00);
  CHECK(to_half_bits(-2.5f) == 0xc100);
  CHECK(to_half_bits(65504.0f) == 0x7bff);
  CHECK(to_half_bits(pow2f(-14)) == 0x0400);  // smallest normal
  CHECK(to_half_bits(pow2f(-24)) == 0x0001);  // smallest subnormal
  CHECK(to_half_bits(1023.0f * pow2f(-24)) == 0x03ff);
  CHECK(to_half_bits(0.0f) == 0x0000);
  CHECK(to_half_bits(-0.0f) == 0x8000);
  CHECK(to_half_bits(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(to_half_bits(-std::numeric_limits<float>::infinity()) == 0xfc00);
  const std::uint16_t nan = to_half_bits(std::numeric_limits<float>::quiet_NaN());
  CHECK((nan & 0x7c00) == 0x7c00);
  CHECK((nan & 0x03ff) != 0);

  CHECK(half_bits_to_float(0x3c00) == 1.0f);
  CHECK(half_bits_to_float(0xc100) == -2.5f);
  CHECK(half_bits_to_float(0x7bff) == 65504.0f);
  CHECK(half_bits_to_float(0x0001) == pow2f(-24));
  CHECK(half_bits_to_float(0x03ff) == 1023.0f * pow2f(-24));
  CHECK(half_bits_to_float(0x0400) == pow2f(-14));
  CHECK(std::signbit(half_bits_to_float(0x8000)));
  CHECK(half_bits_to_float(0x8000) == 0.0f);
  CHECK(half_bits_to_float(0x7c00) == std::numeric_limits<float>::infinity());
  CHECK(half_bits_to_float(0xfc00) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(half_bits_to_float(0x7e00)));
  CHECK(std::isnan(half_bits_to_float(0x7c01)));
}

TEST_CASE("half conversion rounds to nearest, ties to even", "[io][float16]") {
  using kmoe::io::to_half_bits;

  // Near 1 the half spacing is 2^-10.
  CHECK(to_half_bits(1.0f + pow2f(-11)) == 0x3c00);               // tie, down to even
  CHECK(to_half_bits(1.0f + 3 * pow2f(-11)) == 0x3c02);           // tie, up to even
  CHECK(to_half_bits(1.0f + pow2f(-11) + pow2f(-20)) == 0x3c01);  // just above the tie
  CHECK(to_half_bits(1.0f + pow2f(-11) - pow2f(-20)) == 0x3c00);  // just below the tie

  // Overflow: 65520 is halfway between 65504 and 2^16 and ties to the even side, infinity.
  CHECK(to_half_bits(65519.0f) == 0x7bff);
  CHECK(to_half_bits(65520.0f) == 0x7c00);
  CHECK(to_half_bits(1e10f) == 0x7c00);
  CHECK(to_half_bits(-1e10f) == 0xfc00);

  // Subnormal range, quantum 2^-24.
  CHECK(to_half_bits(pow2f(-25)) == 0x0000);            // tie, down to zero
  CHECK(to_half_bits(1.5f * pow2f(-25)) == 0x0001);     // above the tie
  CHECK(to_half_bits(3.0f * pow2f(-25)) == 0x0002);     // tie, up to even
  CHECK(to_half_bits(-pow2f(-26)) == 0x8000);           // underflow keeps the sign
  CHECK(to_half_bits(2047.0f * pow2f(-25)) == 0x0400);  // rounds up into the normals
  CHECK(to_half_bits(std::numeric_limits<float>::denorm_min()) == 0x0000);

  // A double is rounded once: through float, 1 + 2^-11 + 2^-40 would become the tie
  // 1 + 2^-11 and then round down to 1.
  CHECK(to_half_bits(1.0 + pow2(-11) + pow2(-40)) == 0x3c01);
  CHECK(to_half_bits(1.0 + pow2(-11)) == 0x3c00);
  CHECK(to_half_bits(pow2(-24)) == 0x0001);
  CHECK(to_half_bits(1e300) == 0x7c00);
  CHECK(to_half_bits(1e-300) == 0x0000);
}

TEST_CASE("bfloat16 conversion matches known bit patterns and rounding", "[io][float16]") {
  using kmoe::io::bfloat16_bits_to_float;
  using kmoe::io::to_bfloat16_bits;

  CHECK(to_bfloat16_bits(1.0f) == 0x3f80);
  CHECK(to_bfloat16_bits(-2.5f) == 0xc020);
  CHECK(to_bfloat16_bits(65504.0f) == 0x4780);     // 65504 needs 11 bits: rounds to 65536
  CHECK(to_bfloat16_bits(pow2f(-133)) == 0x0001);  // smallest bfloat16 subnormal
  CHECK(to_bfloat16_bits(std::numeric_limits<float>::denorm_min()) == 0x0000);
  CHECK(to_bfloat16_bits(std::numeric_limits<float>::max()) == 0x7f80);  // rounds to inf
  CHECK(to_bfloat16_bits(std::numeric_limits<float>::infinity()) == 0x7f80);
  CHECK(to_bfloat16_bits(-std::numeric_limits<float>::infinity()) == 0xff80);
  CHECK(to_bfloat16_bits(std::numeric_limits<float>::quiet_NaN()) == 0x7fc0);
  CHECK(to_bfloat16_bits(1.0f + pow2f(-8)) == 0x3f80);      // tie, down to even
  CHECK(to_bfloat16_bits(1.0f + 3 * pow2f(-8)) == 0x3f82);  // tie, up to even
  CHECK(to_bfloat16_bits(1.0f + pow2f(-8) + pow2f(-20)) == 0x3f81);
  CHECK(to_bfloat16_bits(1.0 + pow2(-8) + pow2(-40)) == 0x3f81);  // double: one rounding

  CHECK(bfloat16_bits_to_float(0x3f80) == 1.0f);
  CHECK(bfloat16_bits_to_float(0xc020) == -2.5f);
  CHECK(bfloat16_bits_to_float(0x0001) == pow2f(-133));
  CHECK(bfloat16_bits_to_float(0x7f7f) == 0x1.fep127f);
  CHECK(bfloat16_bits_to_float(0xff80) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(bfloat16_bits_to_float(0x7fc0)));
}

TEST_CASE("every 16-bit pattern survives a round trip through float", "[io][float16]") {
  using namespace kmoe::io;
  for (std::uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto h = static_cast<std::uint16_t>(bits);
    const float as_half = half_bits_to_float(h);
    const float as_bf16 = bfloat16_bits_to_float(h);
    if (std::isnan(as_half)) {
      CHECK(std::isnan(half_bits_to_float(to_half_bits(as_half))));
    } else if (to_half_bits(as_half) != h || to_half_bits(static_cast<double>(as_half)) != h) {
      FAIL("half pattern " << bits << " does not round-trip");
    }
    if (std::isnan(as_bf16)) {
      CHECK(std::isnan(bfloat16_bits_to_float(to_bfloat16_bits(as_bf16))));
    } else if (to_bfloat16_bits(as_bf16) != h ||
               to_bfloat16_bits(static_cast<double>(as_bf16)) != h) {
      FAIL("bfloat16 pattern " << bits << " does not round-trip");
    }
  }
}

TEST_CASE("writer and reader round-trip every dtype", "[io][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("all.safetensors");

  // Values exactly representable in every floating dtype (at most 8 significant bits), so
  // each read must be exact.
  const std::vector<float> small{1.0f, -2.5f, 0.0f, 0.15625f, -120.5f, 3.0f};
  const std::vector<double> wide{1.0, -2.5, 0.1, 1e300, -1e-300, 42.0};
  const std::vector<std::int32_t> i32{
      0, -1, 7, std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max(),
      3};
  const std::vector<std::int64_t> i64{0,
                                      -1,
                                      std::int64_t{1} << 40,
                                      std::numeric_limits<std::int64_t>::min(),
                                      std::numeric_limits<std::int64_t>::max(),
                                      5};
  {
    SafetensorsWriter writer;
    writer.add("f16", DType::F16, {2, 3}, small);
    writer.add("bf16", DType::BF16, {3, 2}, small);
    writer.add("f32", DType::F32, {6}, small.data());
    writer.add("f64", DType::F64, {1, 6}, wide);
    writer.add("i32", DType::I32, {6}, i32);
    writer.add("i64", DType::I64, {2, 3}, i64);
    writer.add("scalar", DType::F32, {}, std::vector<float>{7.5f});
    writer.add("empty", DType::F16, {0, 4}, static_cast<const float*>(nullptr));
    writer.set_metadata("format", "pt");
    writer.write(path);
  }

  SafetensorsFile file(path);
  CHECK(file.path() == path);
  CHECK(file.names() ==
        std::vector<std::string>{"bf16", "empty", "f16", "f32", "f64", "i32", "i64", "scalar"});
  CHECK(file.metadata().at("format") == "pt");
  CHECK(file.contains("f16"));
  CHECK_FALSE(file.contains("f17"));

  CHECK(file.info("f16").dtype == DType::F16);
  CHECK(file.info("f16").shape == std::vector<std::int64_t>{2, 3});
  CHECK(file.info("bf16").dtype == DType::BF16);
  CHECK(file.info("f64").shape == std::vector<std::int64_t>{1, 6});
  CHECK(file.info("i64").dtype == DType::I64);
  CHECK(file.info("scalar").shape.empty());
  CHECK(file.info("scalar").element_count() == 1);
  CHECK(file.info("empty").element_count() == 0);

  CHECK(file.read<float>("f16") == small);
  CHECK(file.read<float>("bf16") == small);
  CHECK(file.read<float>("f32") == small);
  CHECK(file.read<double>("f64") == wide);
  CHECK(file.read<std::int32_t>("i32") == i32);
  CHECK(file.read<std::int64_t>("i64") == i64);
  CHECK(file.read<float>("scalar") == std::vector<float>{7.5f});
  CHECK(file.read<double>("empty").empty());

  // Widening conversions on read.
  const std::vector<double> small_as_double(small.begin(), small.end());
  CHECK(file.read<double>("f16") == small_as_double);
  CHECK(file.read<std::int64_t>("i32") == std::vector<std::int64_t>(i32.begin(), i32.end()));

  std::vector<float> buffer(6);
  file.read_into("bf16", buffer.data(), buffer.size());
  CHECK(buffer == small);

  // Layout of the reference implementation: header length a multiple of 8 and every
  // tensor aligned to its element size.
  std::ifstream in(path, std::ios::binary);
  unsigned char length[8];
  in.read(reinterpret_cast<char*>(length), 8);
  std::uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | length[i];
  CHECK(header_bytes % 8 == 0);
  for (const std::string& name : file.names()) {
    CHECK(file.info(name).begin % kmoe::io::dtype_size(file.info(name).dtype) == 0);
  }
}

TEST_CASE("writer converts to narrower dtypes with rounding", "[io][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("narrow.safetensors");
  SafetensorsWriter writer;
  writer.add("f16", DType::F16, {3}, std::vector<double>{1.0 + pow2(-11) + pow2(-40), 1e6, 0.1});
  writer.add("f32", DType::F32, {1}, std::vector<double>{0.1});
  writer.add("i32", DType::I32, {2}, std::vector<std::int64_t>{-5, 9});
  writer.write(path);

  SafetensorsFile file(path);
  const auto f16 = file.read<double>("f16");
  CHECK(f16[0] == 1.0 + pow2(-10));
  CHECK(std::isinf(f16[1]));
  CHECK(f16[2] == static_cast<double>(kmoe::io::half_bits_to_float(0x2e66)));
  CHECK(file.read<double>("f32")[0] == static_cast<double>(0.1f));
  CHECK(file.read<std::int32_t>("i32") == std::vector<std::int32_t>{-5, 9});
}

TEST_CASE("writer rejects bad arguments", "[io][safetensors]") {
  SafetensorsWriter writer;
  writer.add("a", DType::F32, {1}, std::vector<float>{1.0f});
  CHECK_THROWS_MATCHES(writer.add("a", DType::F32, {1}, std::vector<float>{1.0f}),
                       kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("a") && ContainsSubstring("already")));
  CHECK_THROWS_MATCHES(writer.add("b", DType::F32, {2, 2}, std::vector<float>{1.0f}),
                       kmoe::invalid_argument, MessageMatches(ContainsSubstring("'b'")));
  CHECK_THROWS_MATCHES(writer.add("c", DType::I64, {1}, std::vector<float>{1.0f}),
                       kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("'c'") && ContainsSubstring("I64")));
  CHECK_THROWS_MATCHES(
      writer.add("d", DType::I32, {1}, std::vector<std::int64_t>{std::int64_t{1} << 40}),
      kmoe::invalid_argument, MessageMatches(ContainsSubstring("'d'") && ContainsSubstring("I32")));
  CHECK_THROWS_AS(writer.add("__metadata__", DType::F32, {1}, std::vector<float>{1.0f}),
                  kmoe::invalid_argument);
  CHECK_THROWS_MATCHES(writer.write("/nonexistent-kmoe-dir/out.safetensors"),
                       kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("/nonexistent-kmoe-dir/out.safetensors")));
}

TEST_CASE("reading checks the element count and the element type", "[io][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("types.safetensors");
  SafetensorsWriter writer;
  writer.add("weights", DType::F32, {2, 2}, std::vector<float>{1, 2, 3, 4});
  writer.add("indices", DType::I64, {3}, std::vector<std::int64_t>{0, 300, -1});
  writer.write(path);
  SafetensorsFile file(path);

  std::vector<float> three(3);
  CHECK_THROWS_MATCHES(file.read_into("weights", three.data(), three.size()),
                       kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("count") &&
                                      ContainsSubstring("'weights'") && ContainsSubstring(path)));
  CHECK_THROWS_MATCHES(file.read<std::int64_t>("weights"), kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("weights") && ContainsSubstring("F32")));
  CHECK_THROWS_MATCHES(file.read<float>("indices"), kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("indices") && ContainsSubstring("I64")));
  // 300 does not fit an 8-bit integer and -1 no unsigned one: the data, not the call, is wrong.
  CHECK_THROWS_MATCHES(file.read<std::int8_t>("indices"), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("'indices'") && ContainsSubstring(path)));
  CHECK_THROWS_AS(file.read<std::uint32_t>("indices"), kmoe::runtime_error);
  CHECK(file.read<std::int16_t>("indices") == std::vector<std::int16_t>{0, 300, -1});
}

TEST_CASE("missing tensor is reported with its name and the file", "[io][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("one.safetensors");
  SafetensorsWriter writer;
  writer.add("present", DType::F32, {1}, std::vector<float>{1.0f});
  writer.write(path);
  SafetensorsFile file(path);
  CHECK_THROWS_MATCHES(file.info("absent"), kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("absent") && ContainsSubstring(path)));
  CHECK_THROWS_MATCHES(file.read<float>("absent"), kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("absent") && ContainsSubstring(path)));
}

TEST_CASE("missing file is reported with its path", "[io][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("does-not-exist.safetensors");
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring(path)));
  CHECK_THROWS_MATCHES(SafetensorsFile(dir.str()), kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring(dir.str()) &&
                                      ContainsSubstring("not a regular file")));
}

TEST_CASE("malformed: file shorter than the 8-byte length", "[io][safetensors][malformed]") {
  TempDir dir;
  const std::string path = dir.file("short.safetensors");
  write_bytes(path, std::string(5, '\x01'));
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring(path) && ContainsSubstring("5 bytes")));
  write_bytes(path, "");
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring(path) && ContainsSubstring("0 bytes")));
}

TEST_CASE("malformed: header length beyond the end of the file", "[io][safetensors][malformed]") {
  TempDir dir;
  const std::string path = dir.file("long.safetensors");
  write_bytes(path, le64(1000) + "{}");
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring(path) &&
                                      ContainsSubstring("header length 1000")));
  // Absurd lengths (here 2^63) must not overflow the size check.
  write_bytes(path, le64(std::uint64_t{1} << 63) + "{}");
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("header length")));
}

TEST_CASE("malformed: header is not JSON", "[io][safetensors][malformed]") {
  TempDir dir;
  const std::string path = dir.file("notjson.safetensors");
  write_bytes(path, raw_file("{\"a\": {\"dtype\": \"F32\",", 0));
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring(path) && ContainsSubstring("JSON")));
  write_bytes(path, raw_file("[1, 2]", 0));
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("not a JSON object")));
}

TEST_CASE("malformed: data offsets out of range", "[io][safetensors][malformed]") {
  TempDir dir;
  const std::string path = dir.file("range.safetensors");
  write_bytes(path,
              raw_file(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})", 16));
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring(path) && ContainsSubstring("'w'") &&
                                      ContainsSubstring("out of range")));
}

TEST_CASE("malformed: data offsets with begin after end", "[io][safetensors][malformed]") {
  TempDir dir;
  const std::string path = dir.file("reversed.safetensors");
  write_bytes(path,
              raw_file(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})", 16));
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("'w'") &&
                                      ContainsSubstring("begin > end")));
  write_bytes(path,
              raw_file(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}})", 16));
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("'w'") &&
                                      ContainsSubstring("data_offsets")));
}

TEST_CASE("malformed: unknown dtype", "[io][safetensors][malformed]") {
  TempDir dir;
  const std::string path = dir.file("dtype.safetensors");
  write_bytes(path, raw_file(R"({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}})", 2));
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring(path) && ContainsSubstring("'w'") &&
                                      ContainsSubstring("'Q7'")));
}

TEST_CASE("malformed: byte count does not match the shape", "[io][safetensors][malformed]") {
  TempDir dir;
  const std::string path = dir.file("count.safetensors");
  write_bytes(path,
              raw_file(R"({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}})", 24));
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("'w'") && ContainsSubstring("[2,3]") &&
                                      ContainsSubstring("needs 24")));
  write_bytes(
      path,
      raw_file(
          R"({"w": {"dtype": "F64", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})",
          0));
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("'w'") && ContainsSubstring("too large")));
  write_bytes(path,
              raw_file(R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]}})", 0));
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("'w'") && ContainsSubstring("shape")));
}

TEST_CASE("malformed: overlapping tensors", "[io][safetensors][malformed]") {
  TempDir dir;
  const std::string path = dir.file("overlap.safetensors");
  write_bytes(path, raw_file(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}})",
                             24));
  CHECK_THROWS_MATCHES(SafetensorsFile(path), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("'a'") && ContainsSubstring("'b'") &&
                                      ContainsSubstring("overlap")));
}

TEST_CASE("a hand-written header with metadata, padding and a gap is accepted",
          "[io][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("gap.safetensors");
  std::string data(12, '\0');
  const float value = -2.5f;
  std::memcpy(&data[8], &value, sizeof value);
  std::string header =
      R"({"__metadata__": {"k": "v"}, "x": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})";
  header.append(8 - header.size() % 8, ' ');
  write_bytes(path, le64(header.size()) + header + data);
  SafetensorsFile file(path);
  CHECK(file.metadata().at("k") == "v");
  CHECK(file.read<float>("x") == std::vector<float>{-2.5f});
}

TEST_CASE("sharded checkpoint reads through the index", "[io][safetensors][sharded]") {
  TempDir dir;
  {
    SafetensorsWriter first;
    first.add("model.layers.0.w", DType::F32, {2}, std::vector<float>{1, 2});
    first.add("model.embed", DType::BF16, {1}, std::vector<float>{3});
    first.write(dir.file("model-00001-of-00002.safetensors"));
    SafetensorsWriter second;
    second.add("model.layers.1.w", DType::F16, {2}, std::vector<float>{4, 5});
    second.write(dir.file("model-00002-of-00002.safetensors"));
  }
  std::ofstream(dir.file("model.safetensors.index.json")) << R"({
    "metadata": {"total_size": 14},
    "weight_map": {
      "model.embed": "model-00001-of-00002.safetensors",
      "model.layers.0.w": "model-00001-of-00002.safetensors",
      "model.layers.1.w": "model-00002-of-00002.safetensors"
    }})";

  const ShardedCheckpoint checkpoint(dir.str());
  CHECK(checkpoint.directory() == dir.str());
  CHECK(checkpoint.names() ==
        std::vector<std::string>{"model.embed", "model.layers.0.w", "model.layers.1.w"});
  CHECK(checkpoint.contains("model.layers.1.w"));
  CHECK_FALSE(checkpoint.contains("model.layers.2.w"));
  CHECK(checkpoint.info("model.layers.1.w").dtype == DType::F16);
  CHECK(checkpoint.read<double>("model.layers.1.w") == std::vector<double>{4, 5});
  CHECK(checkpoint.read<float>("model.embed") == std::vector<float>{3});
  std::vector<float> buffer(2);
  checkpoint.read_into("model.layers.0.w", buffer.data(), buffer.size());
  CHECK(buffer == std::vector<float>{1, 2});

  CHECK_THROWS_MATCHES(checkpoint.info("model.layers.2.w"), kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("model.layers.2.w") &&
                                      ContainsSubstring(dir.str())));
}

TEST_CASE("sharded checkpoint reports an index that points at a bad shard",
          "[io][safetensors][sharded]") {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add("a", DType::F32, {1}, std::vector<float>{1});
  writer.write(dir.file("shard.safetensors"));
  std::ofstream(dir.file("model.safetensors.index.json")) << R"({"weight_map": {
      "a": "shard.safetensors", "b": "shard.safetensors", "c": "gone.safetensors"}})";

  const ShardedCheckpoint checkpoint(dir.str());
  CHECK(checkpoint.read<float>("a") == std::vector<float>{1});
  CHECK_THROWS_MATCHES(checkpoint.read<float>("b"), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("'b'") &&
                                      ContainsSubstring("shard.safetensors")));
  CHECK_THROWS_MATCHES(checkpoint.read<float>("c"), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("'c'") &&
                                      ContainsSubstring("gone.safetensors")));

  std::ofstream(dir.file("model.safetensors.index.json"))
      << R"({"weight_map": {"a": "../outside.safetensors"}})";
  CHECK_THROWS_MATCHES(ShardedCheckpoint(dir.str()), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("'a'") &&
                                      ContainsSubstring("model.safetensors.index.json")));
  std::ofstream(dir.file("model.safetensors.index.json")) << "{\"weight_map\": ";
  CHECK_THROWS_MATCHES(ShardedCheckpoint(dir.str()), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("JSON")));
}

TEST_CASE("single-file checkpoint directory", "[io][safetensors][sharded]") {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add("w", DType::F64, {3}, std::vector<double>{1, 2, 3});
  writer.write(dir.file("model.safetensors"));

  const ShardedCheckpoint checkpoint(dir.str());
  CHECK(checkpoint.names() == std::vector<std::string>{"w"});
  CHECK(checkpoint.read<double>("w") == std::vector<double>{1, 2, 3});
  CHECK_THROWS_MATCHES(checkpoint.read<double>("v"), kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("name = v:") &&
                                      ContainsSubstring(dir.str())));
}

TEST_CASE("checkpoint directory that is missing or empty", "[io][safetensors][sharded]") {
  TempDir dir;
  CHECK_THROWS_MATCHES(ShardedCheckpoint(dir.str()), kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring(dir.str()) &&
                                      ContainsSubstring("model.safetensors")));
  const std::string missing = dir.file("no-such-model");
  CHECK_THROWS_MATCHES(ShardedCheckpoint(missing), kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring(missing) &&
                                      ContainsSubstring("not a directory")));
}

TEST_CASE("Hugging Face fixtures load and follow the documented conventions",
          "[io][safetensors][fixtures]") {
  // An absolute path from CMake: __FILE__ is relative to the build folder under ccache's
  // base_dir rewriting, and ctest runs the test from another folder.
  const fs::path fixtures = KMOE_FIXTURES_DIR;
  struct Case {
    std::string model, block, down_proj;
    std::int64_t experts, top_k;
    double weight_sum;  // sum of each token's top-k weights
  };
  const Case cases[] = {{"mixtral", "model.layers.1.block_sparse_moe", "w2", 8, 2, 1.0},
                        {"deepseek_v3", "model.layers.1.mlp", "down_proj", 16, 4, 2.5},
                        {"qwen3_moe", "model.layers.1.mlp", "down_proj", 8, 2, 1.0}};
  for (const Case& c : cases) {
    CAPTURE(c.model);
    const fs::path dir = fixtures / c.model;
    const ShardedCheckpoint checkpoint((dir / "model").string());
    const std::string gate = c.block + ".gate.weight";
    REQUIRE(checkpoint.contains(gate));
    CHECK(checkpoint.info(gate).dtype == DType::BF16);
    CHECK(checkpoint.info(gate).shape == std::vector<std::int64_t>{c.experts, 64});

    const SafetensorsFile input((dir / "input.safetensors").string());
    const SafetensorsFile output((dir / "output.safetensors").string());
    const SafetensorsFile grads((dir / "grads.safetensors").string());
    const std::int64_t tokens = input.info("hidden_states").shape.at(0);
    CHECK(input.info("hidden_states").shape == std::vector<std::int64_t>{13, 64});
    CHECK(output.info("topk_indices").dtype == DType::I64);
    CHECK(output.info("topk_indices").shape == std::vector<std::int64_t>{tokens, c.top_k});
    const std::string down = c.block + ".experts.3." + c.down_proj + ".weight";
    CHECK(grads.contains(down));
    CHECK(checkpoint.info(down).shape == grads.info(down).shape);
    CHECK(grads.contains("hidden_states"));

    // Router logits are x @ gate^T with the gate stored [experts, hidden] (nn.Linear).
    const auto x = input.read<double>("hidden_states");
    const auto w = checkpoint.read<double>(gate);
    const auto logits = output.read<double>("router_logits");
    for (std::int64_t t = 0; t < tokens; ++t) {
      for (std::int64_t e = 0; e < c.experts; ++e) {
        double sum = 0;
        for (std::int64_t h = 0; h < 64; ++h) sum += x[t * 64 + h] * w[e * 64 + h];
        CHECK(std::abs(sum - logits[t * c.experts + e]) < 1e-4);
      }
    }
    const auto indices = output.read<std::int32_t>("topk_indices");
    const auto weights = output.read<double>("topk_weights");
    for (std::int64_t t = 0; t < tokens; ++t) {
      double sum = 0;
      for (std::int64_t j = 0; j < c.top_k; ++j) {
        const auto i = static_cast<std::size_t>(t * c.top_k + j);
        CHECK((indices[i] >= 0 && indices[i] < c.experts));
        sum += weights[i];
      }
      CHECK(std::abs(sum - c.weight_sum) < 1e-5);
    }
  }
  const ShardedCheckpoint deepseek((fixtures / "deepseek_v3" / "model").string());
  CHECK(deepseek.info("model.layers.1.mlp.gate.e_score_correction_bias").dtype == DType::F32);
}

TEST_CASE("16-bit elements: their own dtype bit for bit, others rounded once",
          "[io][safetensors]") {
  TempDir dir;
  using kmoe::bfloat16;
  using kmoe::float16;
  // Own dtype: every pattern comes back as stored, signalling NaNs and payloads included.
  const std::vector<std::uint16_t> patterns{0x3f80, 0xc000, 0x7f7f, 0x0001, 0x8000,
                                            0x7fc1, 0x7f81, 0xff80, 0x1234, 0xfbff};
  write_bytes(dir.file("bf16.safetensors"), sixteen_bit_file("w", "BF16", patterns));
  write_bytes(dir.file("f16.safetensors"), sixteen_bit_file("w", "F16", patterns));
  const SafetensorsFile bf16_file(dir.file("bf16.safetensors"));
  const SafetensorsFile f16_file(dir.file("f16.safetensors"));
  CHECK(bits_of(bf16_file.read<bfloat16>("w")) == patterns);
  CHECK(bits_of(f16_file.read<float16>("w")) == patterns);
  std::vector<bfloat16> middle(3);
  bf16_file.read_range_into("w", 4, middle.data(), middle.size());
  CHECK(bits_of(middle) == std::vector<std::uint16_t>(patterns.begin() + 4, patterns.begin() + 7));

  // F16 into bfloat16: all 65536 patterns against io/float16.hpp's exact rounding of the
  // (exactly widened) value; every half value lies in bfloat16's range.
  std::vector<std::uint16_t> every(65536);
  for (std::size_t i = 0; i < every.size(); ++i) every[i] = static_cast<std::uint16_t>(i);
  write_bytes(dir.file("every_f16.safetensors"), sixteen_bit_file("w", "F16", every));
  const auto from_half = SafetensorsFile(dir.file("every_f16.safetensors")).read<bfloat16>("w");
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < every.size(); ++i)
    wrong +=
        from_half[i].bits() != kmoe::io::to_bfloat16_bits(kmoe::io::half_bits_to_float(every[i]));
  CHECK(wrong == 0);
  // BF16 into float16: every pattern whose value float16 holds (below 65520 in magnitude,
  // or not finite); one beyond is an error naming the tensor, the element and the type.
  std::vector<std::uint16_t> holdable;
  for (std::uint16_t b : every) {
    const float v = kmoe::io::bfloat16_bits_to_float(b);
    if (!std::isfinite(v) || std::abs(v) < 65520.0f) holdable.push_back(b);
  }
  write_bytes(dir.file("holdable.safetensors"), sixteen_bit_file("w", "BF16", holdable));
  const auto from_bf16 = SafetensorsFile(dir.file("holdable.safetensors")).read<float16>("w");
  wrong = 0;
  for (std::size_t i = 0; i < holdable.size(); ++i)
    wrong += from_bf16[i].bits() !=
             kmoe::io::to_half_bits(kmoe::io::bfloat16_bits_to_float(holdable[i]));
  CHECK(wrong == 0);
  write_bytes(dir.file("big.safetensors"), sixteen_bit_file("big", "BF16", {0x3f80, 0x4780}));
  CHECK_THROWS_MATCHES(
      SafetensorsFile(dir.file("big.safetensors")).read<float16>("big"), kmoe::runtime_error,
      MessageMatches(ContainsSubstring("'big'") && ContainsSubstring("element 1") &&
                     ContainsSubstring("float16")));

  // F32 and F64 into 16 bits: ties to even, and a double rounded in one step.
  SafetensorsWriter writer;
  const std::vector<float> singles{1.0f + pow2f(-8), 1.0f + 3 * pow2f(-8),
                                   1.0f + pow2f(-8) + pow2f(-20), -0.0f, 1.0f + pow2f(-11)};
  writer.add("f32", DType::F32, {5}, singles);
  // 1 + 2^-8 + 2^-30 lies above the tie between bfloat16's 1 and 1 + 2^-7; through float
  // (which drops 2^-30) it would be the tie, and round down to 1. Likewise for half at 2^-11.
  writer.add("f64", DType::F64, {2},
             std::vector<double>{1.0 + pow2(-8) + pow2(-30), 1.0 + pow2(-11) + pow2(-40)});
  writer.add("max", DType::F32, {1}, std::vector<float>{std::numeric_limits<float>::max()});
  writer.add("index", DType::I64, {1}, std::vector<std::int64_t>{3});
  writer.write(dir.file("wide.safetensors"));
  const SafetensorsFile wide(dir.file("wide.safetensors"));
  CHECK(bits_of(wide.read<bfloat16>("f32")) ==
        std::vector<std::uint16_t>{0x3f80, 0x3f82, 0x3f81, 0x8000, 0x3f80});
  CHECK(bits_of(wide.read<float16>("f32")) ==
        std::vector<std::uint16_t>{0x3c04, 0x3c0c, 0x3c04, 0x8000, 0x3c00});
  CHECK(wide.read<bfloat16>("f64")[0].bits() == 0x3f81);
  CHECK(wide.read<float16>("f64")[1].bits() == 0x3c01);
  // FLT_MAX is beyond bfloat16's largest finite value by more than half a unit.
  CHECK_THROWS_MATCHES(wide.read<bfloat16>("max"), kmoe::runtime_error,
                       MessageMatches(ContainsSubstring("'max'") && ContainsSubstring("bfloat16")));
  CHECK_THROWS_MATCHES(wide.read<bfloat16>("index"), kmoe::invalid_argument,
                       MessageMatches(ContainsSubstring("index") && ContainsSubstring("I64")));
}

TEST_CASE("writer stores 16-bit data exactly in its own dtype", "[io][safetensors]") {
  TempDir dir;
  std::vector<kmoe::bfloat16> values;
  for (std::uint16_t b : {0x3f80, 0xc0a0, 0x7fc1, 0x0001, 0x3f81, 0x4780})
    values.push_back(kmoe::bfloat16::from_bits(b));
  const auto bits = bits_of(values);
  SafetensorsWriter own;
  own.add("w", DType::BF16, {2, 3}, values);
  own.write(dir.file("own.safetensors"));
  // One tensor: the data section is the file's last bytes, little-endian.
  std::ifstream in(dir.file("own.safetensors"), std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  REQUIRE(bytes.size() >= 2 * bits.size());
  const std::string tail = bytes.substr(bytes.size() - 2 * bits.size());
  for (std::size_t i = 0; i < bits.size(); ++i) {
    INFO(i);
    CHECK(static_cast<unsigned char>(tail[2 * i]) == (bits[i] & 0xff));
    CHECK(static_cast<unsigned char>(tail[2 * i + 1]) == (bits[i] >> 8));
  }
  // Other dtypes: exact widening to F32 and F64, one rounding to F16 (65536 overflows).
  SafetensorsWriter other;
  other.add("f32", DType::F32, {6}, values);
  other.add("f64", DType::F64, {6}, values);
  other.add("f16", DType::F16, {6}, values);
  CHECK_THROWS_AS(other.add("i32", DType::I32, {6}, values), kmoe::invalid_argument);
  other.write(dir.file("other.safetensors"));
  const SafetensorsFile file(dir.file("other.safetensors"));
  const auto f32 = file.read<float>("f32");
  const auto f64 = file.read<double>("f64");
  const auto f16 = SafetensorsFile(dir.file("other.safetensors")).read<double>("f16");
  for (std::size_t i = 0; i < bits.size(); ++i) {
    INFO(i);
    const float exact = kmoe::io::bfloat16_bits_to_float(bits[i]);
    if (std::isnan(exact)) {
      CHECK((std::isnan(f32[i]) && std::isnan(f64[i]) && std::isnan(f16[i])));
      continue;
    }
    CHECK(f32[i] == exact);
    CHECK(f64[i] == double(exact));
    CHECK(f16[i] == double(kmoe::io::half_bits_to_float(kmoe::io::to_half_bits(exact))));
  }
}
