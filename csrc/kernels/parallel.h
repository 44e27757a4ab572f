#pragma once
/// A small fork-join thread pool for the CPU kernels: `parallel_for` splits a range over the pool's
/// threads (the calling thread takes part). One pool per process, sized by `set_num_threads`
/// (default: the CPUs this process may run on, or GPUFLEET_NUM_THREADS). A `parallel_for` called from
/// inside a worker runs serially, so kernels may nest freely.
#include <cstdint>
#include <functional>

namespace gpufleet::kernels {

/// The number of threads CPU kernels use (>= 1).
int num_threads();

/// Sets the number of threads CPU kernels use; n >= 1, or 0 for the default. Throws ValueError otherwise.
void set_num_threads(int n);

/// Calls `body(begin, end)` on disjoint chunks covering [0, n), at least `grain` items per chunk
/// (except the last), spread over the pool. Exceptions from `body` are rethrown (the first one).
void parallel_for(std::int64_t n, std::int64_t grain, const std::function<void(std::int64_t, std::int64_t)>& body);

}  // namespace gpufleet::kernels
