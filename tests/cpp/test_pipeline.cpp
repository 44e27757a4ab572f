// Pipeline core: bounded queues (backpressure, close, cancel), worker clocks that add up, stage
// statistics, the limiting stage, the sampling monitor.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "pipeline/bounded_queue.h"
#include "pipeline/clock.h"
#include "pipeline/stage_stats.h"

using namespace gpufleet::pipeline;
using namespace std::chrono_literals;

TEST(PipelineQueue, FifoAndCapacity) {
  BoundedQueue<int> q(3);
  for (int i = 0; i < 3; ++i) {
    int x = i;
    EXPECT_EQ(q.try_put(x), QueueStatus::Ok);
  }
  int extra = 99;
  EXPECT_EQ(q.try_put(extra), QueueStatus::WouldBlock);
  EXPECT_EQ(extra, 99);  // left with the caller
  EXPECT_EQ(q.put(extra, nullptr, 0.01), QueueStatus::Timeout);
  EXPECT_EQ(q.size(), 3u);
  EXPECT_EQ(q.high_water(), 3u);
  for (int i = 0; i < 3; ++i) {
    int out = -1;
    EXPECT_EQ(q.try_get(out), QueueStatus::Ok);
    EXPECT_EQ(out, i);
  }
  int out = -1;
  EXPECT_EQ(q.try_get(out), QueueStatus::WouldBlock);
  EXPECT_EQ(q.get(out, nullptr, 0.01), QueueStatus::Timeout);
}

TEST(PipelineQueue, RejectsZeroCapacityAndExtraProducerDone) {
  EXPECT_THROW(BoundedQueue<int>(0), std::invalid_argument);
  BoundedQueue<int> q(1);
  EXPECT_THROW(q.set_producers(0), std::invalid_argument);
  q.set_producers(1);
  EXPECT_TRUE(q.producer_done());
  EXPECT_THROW(q.producer_done(), gpufleet::InternalError);
}

TEST(PipelineQueue, CloseDrainsThenReportsClosed) {
  BoundedQueue<int> q(4);
  int a = 1, b = 2;
  q.put(a);
  q.put(b);
  q.close();
  int c = 3;
  EXPECT_EQ(q.put(c), QueueStatus::Closed);
  int out = 0;
  EXPECT_EQ(q.get(out), QueueStatus::Ok);
  EXPECT_EQ(out, 1);
  EXPECT_EQ(q.get(out), QueueStatus::Ok);
  EXPECT_EQ(out, 2);
  EXPECT_EQ(q.get(out), QueueStatus::Closed);
}

// Several producers and consumers with random sizes: every item arrives exactly once, the queue
// never holds more than its capacity, and it closes itself after the last producer.
TEST(PipelineQueue, ManyProducersConsumersExactlyOnce) {
  std::mt19937 rng(std::random_device{}());
  const int producers = 1 + static_cast<int>(rng() % 4), consumers = 1 + static_cast<int>(rng() % 4);
  const int per_producer = 997 + static_cast<int>(rng() % 500);
  const std::size_t capacity = 1 + rng() % 7;
  BoundedQueue<int> q(capacity);
  q.set_producers(producers);
  std::vector<std::thread> threads;
  std::vector<std::vector<int>> got(static_cast<std::size_t>(consumers));
  for (int p = 0; p < producers; ++p)
    threads.emplace_back([&, p] {
      for (int i = 0; i < per_producer; ++i) {
        int x = p * per_producer + i;
        ASSERT_EQ(q.put(x), QueueStatus::Ok);
      }
      q.producer_done();
    });
  for (int c = 0; c < consumers; ++c)
    threads.emplace_back([&, c] {
      int x;
      while (q.get(x) == QueueStatus::Ok) got[static_cast<std::size_t>(c)].push_back(x);
    });
  for (auto& t : threads) t.join();
  std::vector<int> all;
  for (auto& g : got) all.insert(all.end(), g.begin(), g.end());
  ASSERT_EQ(all.size(), static_cast<std::size_t>(producers * per_producer));
  std::sort(all.begin(), all.end());
  for (std::size_t i = 0; i < all.size(); ++i) ASSERT_EQ(all[i], static_cast<int>(i));
  EXPECT_LE(q.high_water(), capacity);
  EXPECT_TRUE(q.closed());
  // Each producer's items keep their order for a single consumer.
  if (consumers == 1) {
    std::vector<int> last(static_cast<std::size_t>(producers), -1);
    for (int x : got[0]) {
      ASSERT_GT(x, last[static_cast<std::size_t>(x / per_producer)]);
      last[static_cast<std::size_t>(x / per_producer)] = x;
    }
  }
}

TEST(PipelineQueue, CancelWakesBlockedPuttersAndGetters) {
  BoundedQueue<int> full(1), empty(1);
  int x = 1;
  full.put(x);
  std::atomic<int> woke{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 3; ++i) {
    threads.emplace_back([&] {
      int y = 2;
      EXPECT_EQ(full.put(y), QueueStatus::Cancelled);
      ++woke;
    });
    threads.emplace_back([&] {
      int y;
      EXPECT_EQ(empty.get(y), QueueStatus::Cancelled);
      ++woke;
    });
  }
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(woke.load(), 0);
  full.cancel();
  empty.cancel();
  for (auto& t : threads) t.join();
  EXPECT_EQ(woke.load(), 6);
  int y;
  EXPECT_EQ(full.try_get(y), QueueStatus::Cancelled);
  auto left = full.drain();
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(left[0], 1);
}

// Note [Stats add up]: busy + starved + blocked is the wall time exactly, and the waits land in the
// right bucket.
TEST(PipelineClock, SegmentsAddUpAndWaitsAreCharged) {
  BoundedQueue<int> in(1), out(1);
  WorkerClock clock;
  std::thread producer([&] {
    std::this_thread::sleep_for(30ms);  // the worker starves for ~30 ms
    int x = 7;
    in.put(x);
  });
  clock.start();
  int item = 0;
  ASSERT_EQ(in.get(item, &clock), QueueStatus::Ok);
  auto spin_until = std::chrono::steady_clock::now() + 10ms;  // ~10 ms busy
  while (std::chrono::steady_clock::now() < spin_until) {
  }
  int first = 1;
  out.put(first);
  std::thread consumer([&] {
    std::this_thread::sleep_for(25ms);  // the worker is blocked for ~25 ms on a full queue
    int y;
    out.get(y);
  });
  int second = 2;
  ASSERT_EQ(out.put(second, &clock), QueueStatus::Ok);
  clock.finish();
  producer.join();
  consumer.join();
  const WorkerTotals t = clock.totals();
  EXPECT_EQ(t.busy_ns + t.starved_ns + t.blocked_ns, t.wall_ns());
  EXPECT_GE(t.starved_ns, 20'000'000);
  EXPECT_GE(t.blocked_ns, 15'000'000);
  EXPECT_GE(t.busy_ns, 10'000'000);
  EXPECT_EQ(t.state, WorkerState::Done);
  // The spans tile the timeline.
  auto spans = clock.spans();
  ASSERT_FALSE(spans.empty());
  std::int64_t sum = 0;
  for (std::size_t i = 0; i < spans.size(); ++i) {
    sum += spans[i].duration_ns;
    if (i > 0) EXPECT_EQ(spans[i].start_ns, spans[i - 1].start_ns + spans[i - 1].duration_ns);
  }
  EXPECT_EQ(sum, t.wall_ns());
}

TEST(PipelineClock, SpansAreBoundedAndIgnoredOutsideARun) {
  WorkerClock clock(4);
  clock.switch_to(WorkerState::Starved);  // before start: ignored
  EXPECT_EQ(clock.state(), WorkerState::Idle);
  clock.start();
  for (int i = 0; i < 10; ++i) {
    clock.switch_to(WorkerState::Starved);
    clock.switch_to(WorkerState::Busy);
  }
  clock.finish();
  EXPECT_EQ(clock.spans().size(), 4u);
  EXPECT_EQ(clock.dropped_spans(), 17u);  // 21 segments in all
  const auto before = clock.totals();
  clock.switch_to(WorkerState::Busy);  // after finish: ignored
  EXPECT_EQ(clock.totals().wall_ns(), before.wall_ns());
}

TEST(PipelineStats, CountersBatchesAndLimitingStage) {
  auto fast = std::make_shared<StageStats>("fast", 2);
  auto slow = std::make_shared<StageStats>("slow", 1);
  EXPECT_THROW(StageStats("none", 0), std::invalid_argument);
  EXPECT_THROW(fast->clock(2), std::out_of_range);
  EXPECT_EQ(limiting_stage({fast.get(), slow.get()}), -1);  // nothing ran
  fast->add_batch(5);
  fast->add_batch(2);
  EXPECT_DOUBLE_EQ(fast->mean_batch_size(), 3.5);
  EXPECT_DOUBLE_EQ(slow->mean_batch_size(), 0.0);
  for (int i = 0; i < 2; ++i) fast->clock(i).start();
  slow->clock(0).start();
  // fast workers mostly starve, the slow one is busy the whole time.
  for (int i = 0; i < 2; ++i) fast->clock(i).switch_to(WorkerState::Starved);
  std::this_thread::sleep_for(20ms);
  for (int i = 0; i < 2; ++i) fast->clock(i).finish();
  slow->clock(0).finish();
  EXPECT_LT(fast->utilization(), 0.5);
  EXPECT_GT(slow->utilization(), 0.99);
  EXPECT_EQ(limiting_stage({fast.get(), slow.get()}), 1);
  EXPECT_EQ(limiting_stage({slow.get(), fast.get()}), 0);
  const auto t = fast->totals();
  EXPECT_EQ(t.busy_ns + t.starved_ns + t.blocked_ns,
            fast->clock(0).totals().wall_ns() + fast->clock(1).totals().wall_ns());
}

TEST(PipelineMonitor, SamplesProbesAndStaysBounded) {
  std::atomic<int> depth{0};
  Monitor mon(0.001, 8);
  EXPECT_THROW(Monitor(0.0), std::invalid_argument);
  mon.add_probe("depth", [&] { return static_cast<double>(depth.load()); });
  mon.start();
  EXPECT_THROW(mon.add_probe("late", [] { return 0.0; }), std::invalid_argument);
  for (int i = 1; i <= 30; ++i) {
    depth = i;
    std::this_thread::sleep_for(1ms);
  }
  mon.stop();
  mon.stop();  // idempotent
  const auto samples = mon.samples();
  ASSERT_GE(samples.size(), 2u);
  EXPECT_LE(samples.size(), 9u);
  EXPECT_EQ(samples.back().values.at(0), 30.0);  // the last sample is the final state
  for (std::size_t i = 1; i < samples.size(); ++i) EXPECT_GE(samples[i].t_s, samples[i - 1].t_s);
  EXPECT_GT(mon.interval_s(), 0.001);  // it thinned out and slowed down
}
