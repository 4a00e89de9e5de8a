// The CPU twin harnesses' file exchange with their Python drivers: raw little-endian arrays.
// Include after the kernel source (which brings in csrc/cpu_twin.h).
#pragma once

#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace twin_files {

inline std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) awq_twin::fail("cannot read " + path);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

inline void write_file(const std::string& path, const uint8_t* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!f) awq_twin::fail("cannot write " + path);
}

}  // namespace twin_files
