#include "device/random.h"

#include <random>

namespace gpufleet {

void Generator::manual_seed(std::uint64_t seed) {
  std::lock_guard lock(mutex_);
  seed_ = seed;
  offset_ = 0;
}

std::uint64_t Generator::seed() {
  std::random_device rd;
  const std::uint64_t s = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  manual_seed(s);
  return s;
}

std::uint64_t Generator::initial_seed() const {
  std::lock_guard lock(mutex_);
  return seed_;
}

std::uint64_t Generator::offset() const {
  std::lock_guard lock(mutex_);
  return offset_;
}

std::pair<std::uint64_t, std::uint64_t> Generator::reserve(std::uint64_t count) {
  std::lock_guard lock(mutex_);
  const auto start = offset_;
  offset_ += count;
  return {seed_, start};
}

std::uint64_t Generator::next_u64() {
  auto [s, off] = reserve(1);
  return mix64(s, off);
}

std::uint64_t mix64(std::uint64_t seed, std::uint64_t counter) {
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (counter + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

Generator& default_generator() {
  static Generator g;
  return g;
}

}  // namespace gpufleet
