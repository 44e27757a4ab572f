// The CPU kernels' thread pool (see parallel.h).
#include "kernels/parallel.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"

namespace gpufleet::kernels {

namespace {

thread_local bool t_inside_pool = false;

int default_threads() {
  if (const char* env = std::getenv("GPUFLEET_NUM_THREADS")) {
    char* end = nullptr;
    long v = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && v >= 1 && v <= 1024) return static_cast<int>(v);
  }
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n >= 1) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// Workers wait for a new generation of work; each generation is one parallel_for. Chunks are
// claimed with an atomic counter so uneven chunks balance themselves.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void run(std::int64_t chunks, const std::function<void(std::int64_t)>& chunk_body) {
    std::unique_lock<std::mutex> run_lock(run_mutex_);  // one parallel_for at a time per pool
    {
      std::lock_guard<std::mutex> lock(mutex_);
      body_ = &chunk_body;
      chunks_ = chunks;
      next_.store(0);
      pending_ = static_cast<int>(workers_.size());
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    body_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work() {
    const bool was_inside = t_inside_pool;
    t_inside_pool = true;
    for (;;) {
      std::int64_t c = next_.fetch_add(1);
      if (c >= chunks_) break;
      try {
        (*body_)(c);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
        next_.store(chunks_);
      }
    }
    t_inside_pool = was_inside;
  }
  void loop() {
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      work();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (--pending_ == 0) done_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(std::int64_t)>* body_ = nullptr;
  std::int64_t chunks_ = 0;
  std::atomic<std::int64_t> next_{0};
  int pending_ = 0;
  std::uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

std::mutex g_pool_mutex;
std::shared_ptr<Pool> g_pool;
int g_threads = 0;  // 0: not decided yet

std::shared_ptr<Pool> pool() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_threads == 0) g_threads = default_threads();
  if (!g_pool || g_pool->size() != g_threads) g_pool = std::make_shared<Pool>(g_threads);
  return g_pool;
}

}  // namespace

int num_threads() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_threads == 0) g_threads = default_threads();
  return g_threads;
}

void set_num_threads(int n) {
  GF_CHECK_ARG(n >= 0 && n <= 1024, "set_num_threads({}): expected a thread count from 1 to 1024, or 0 for the default", n);
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  g_threads = n == 0 ? default_threads() : n;
}

void parallel_for(std::int64_t n, std::int64_t grain, const std::function<void(std::int64_t, std::int64_t)>& body) {
  if (n <= 0) return;
  grain = std::max<std::int64_t>(grain, 1);
  if (t_inside_pool || n <= grain) {
    body(0, n);
    return;
  }
  std::shared_ptr<Pool> p = pool();  // keeps the pool alive even if set_num_threads swaps it meanwhile
  const std::int64_t threads = p->size();
  if (threads == 1) {
    body(0, n);
    return;
  }
  // About 4 chunks per thread for balance, never below the grain.
  std::int64_t chunk = std::max(grain, (n + threads * 4 - 1) / (threads * 4));
  const std::int64_t chunks = (n + chunk - 1) / chunk;
  if (chunks == 1) {
    body(0, n);
    return;
  }
  std::function<void(std::int64_t)> chunk_body = [&](std::int64_t c) {
    const std::int64_t b = c * chunk;
    body(b, std::min(n, b + chunk));
  };
  p->run(chunks, chunk_body);
}

}  // namespace gpufleet::kernels
