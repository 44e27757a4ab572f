#pragma once
/// gpufleet's own random streams (used by sampling kernels): a counter-based generator whose state
/// is (seed, offset), as PyTorch's Philox generators are, so CPU and CUDA draws can agree.
#include <cstdint>
#include <mutex>
#include <utility>

namespace gpufleet {

class Generator {
 public:
  explicit Generator(std::uint64_t seed = 67280421310721ULL) : seed_(seed) {}

  /// Resets the stream to `seed`, offset 0.
  void manual_seed(std::uint64_t seed);
  /// Reseeds from a non-deterministic source and returns the new seed.
  std::uint64_t seed();
  std::uint64_t initial_seed() const;
  std::uint64_t offset() const;

  /// Reserves `count` draws: returns the (seed, offset) a kernel should start from.
  std::pair<std::uint64_t, std::uint64_t> reserve(std::uint64_t count);

  /// Draws one 64-bit value on the host (splitmix64 over the counter).
  std::uint64_t next_u64();

 private:
  mutable std::mutex mutex_;
  std::uint64_t seed_;
  std::uint64_t offset_ = 0;
};

/// The process-wide default generator.
Generator& default_generator();

/// splitmix64 of (seed, counter): the stateless mixing function behind Generator draws.
std::uint64_t mix64(std::uint64_t seed, std::uint64_t counter);

}  // namespace gpufleet
