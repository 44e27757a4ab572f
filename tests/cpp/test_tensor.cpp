// Tensors: dtype conversions (binary16/bfloat16 bit rules), storage lifetime, views, host copies,
// the caching allocator's bookkeeping (driven by malloc), DLPack ownership paths, chunking rules.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <set>

#include <thread>

#include "common/error.h"
#include "tensor/allocator.h"
#include "tensor/dlpack_exchange.h"
#include "tensor/stream.h"
#include "tensor/tensor.h"

using namespace gpufleet;

namespace {

Tensor arange_f32(const Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::Float32, Device::cpu());
  auto* p = static_cast<float*>(t.data_ptr());
  for (std::int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<float>(i);
  return t;
}

template <class T>
T at(const Tensor& t, const Shape& idx) {
  std::int64_t off = 0;
  for (std::size_t i = 0; i < idx.size(); ++i) off += idx[i] * t.strides()[i];
  return static_cast<const T*>(t.data_ptr())[off];
}

float f32_from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

bool message_contains(const std::exception& e, const std::string& needle) {
  return std::string(e.what()).find(needle) != std::string::npos;
}

}  // namespace

// ---- dtypes ---------------------------------------------------------------------------------------

TEST(TensorDType, NamesSizesAndAliases) {
  EXPECT_EQ(dtype_name(DType::BFloat16), "bfloat16");
  EXPECT_EQ(itemsize(DType::Int64), 8u);
  EXPECT_EQ(itemsize(DType::Bool), 1u);
  EXPECT_EQ(parse_dtype("half"), DType::Float16);
  EXPECT_EQ(parse_dtype("torch.float32"), DType::Float32);
  EXPECT_EQ(parse_dtype("double"), DType::Float64);
  EXPECT_EQ(parse_dtype("long"), DType::Int64);
  try {
    parse_dtype("complex64");
    FAIL() << "complex64 accepted";
  } catch (const TypeError_& e) {
    EXPECT_TRUE(message_contains(e, "complex64")) << e.what();
    EXPECT_TRUE(message_contains(e, "bfloat16")) << e.what();
  }
}

TEST(TensorDType, DLPackCodesRoundTrip) {
  for (int i = 0; i < kNumDTypes; ++i) {
    const auto d = static_cast<DType>(i);
    EXPECT_EQ(from_dlpack_dtype(to_dlpack_dtype(d)), d) << dtype_name(d);
  }
  EXPECT_EQ(to_dlpack_dtype(DType::BFloat16).code, kDLBfloat);
  EXPECT_EQ(to_dlpack_dtype(DType::Bool).code, kDLBool);
  EXPECT_THROW(from_dlpack_dtype(DLDataType{kDLComplex, 64, 1}), TypeError_);
  EXPECT_THROW(from_dlpack_dtype(DLDataType{kDLFloat, 32, 4}), TypeError_);
  EXPECT_THROW(from_dlpack_dtype(DLDataType{kDLUInt, 16, 1}), TypeError_);
}

TEST(TensorDType, HalfRoundTripsEveryNonNaNPattern) {
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const float f = half_bits_to_float(static_cast<std::uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(half_bits_to_float(float_to_half_bits(f))));
      continue;
    }
    ASSERT_EQ(float_to_half_bits(f), h) << std::hex << h;
    ASSERT_EQ(double_to_half_bits(static_cast<double>(f)), h) << std::hex << h;
  }
}

TEST(TensorDType, HalfRoundingEdges) {
  EXPECT_EQ(float_to_half_bits(65504.0f), 0x7bffu);  // max finite
  EXPECT_EQ(float_to_half_bits(65519.0f), 0x7bffu);  // below the rounding midpoint
  EXPECT_EQ(float_to_half_bits(65520.0f), 0x7c00u);  // ties to even: overflows to inf
  EXPECT_EQ(float_to_half_bits(std::ldexp(1.0f, -24)), 0x0001u);  // smallest subnormal
  EXPECT_EQ(float_to_half_bits(std::ldexp(1.0f, -25)), 0x0000u);  // tie between 0 and 2^-24: even (0)
  EXPECT_EQ(float_to_half_bits(std::ldexp(3.0f, -25)), 0x0002u);  // 1.5 ulp: tie to even (2)
  EXPECT_EQ(float_to_half_bits(1.0f + std::ldexp(1.0f, -11)), 0x3c00u);  // tie: down to even
  EXPECT_EQ(float_to_half_bits(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02u);  // tie: up to even
  EXPECT_EQ(float_to_half_bits(-0.0f), 0x8000u);
  // float64 rounds once: 1 + 2^-11 + 2^-40 is above the midpoint although float32 would round it to
  // the midpoint (and then down).
  EXPECT_EQ(double_to_half_bits(1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40)), 0x3c01u);
  EXPECT_EQ(float_to_half_bits(static_cast<float>(1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40))), 0x3c00u);
}

TEST(TensorDType, BFloat16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bfloat16_bits(1.0f), 0x3f80u);
  EXPECT_EQ(float_to_bfloat16_bits(f32_from_bits(0x3f808000u)), 0x3f80u);  // tie: even
  EXPECT_EQ(float_to_bfloat16_bits(f32_from_bits(0x3f818000u)), 0x3f82u);  // tie: even (up)
  EXPECT_EQ(float_to_bfloat16_bits(f32_from_bits(0x3f808001u)), 0x3f81u);
  EXPECT_EQ(float_to_bfloat16_bits(NAN), 0x7fc0u);
  EXPECT_EQ(bfloat16_bits_to_float(0x4049u), f32_from_bits(0x40490000u));
}

// ---- storage, views, copies ------------------------------------------------------------------------

TEST(TensorStorage, ViewsKeepStorageAliveAndDeleterRunsOnce) {
  int deleted = 0;
  auto* buf = static_cast<float*>(std::malloc(12 * sizeof(float)));
  for (int i = 0; i < 12; ++i) buf[i] = static_cast<float>(i);
  Tensor view;
  {
    Tensor base(wrap_storage(buf, 12 * sizeof(float), Device::cpu(), MemoryKind::Pageable,
                             [&deleted](void* p) {
                               ++deleted;
                               std::free(p);
                             }),
                0, {3, 4}, {4, 1}, DType::Float32);
    view = base.transpose(0, 1).narrow(0, 1, 2);  // shape (2, 3)
  }
  EXPECT_EQ(deleted, 0);
  EXPECT_EQ(view.shape(), (Shape{2, 3}));
  EXPECT_FALSE(view.is_contiguous());
  EXPECT_EQ(at<float>(view, {0, 0}), 1.0f);
  EXPECT_EQ(at<float>(view, {1, 2}), 10.0f);
  view = Tensor();
  EXPECT_EQ(deleted, 1);
}

TEST(TensorStorage, ViewBoundsAreChecked) {
  auto s = allocate_storage(16, Device::cpu(), MemoryKind::Pageable);
  EXPECT_THROW(Tensor(s, 0, {5}, {1}, DType::Float32), std::invalid_argument);
  EXPECT_THROW(Tensor(s, 1, {2, 2}, {2, 1}, DType::Float32), std::invalid_argument);
  EXPECT_THROW(Tensor(s, 0, {2}, {-1}, DType::Float32), std::invalid_argument);
  EXPECT_NO_THROW(Tensor(s, 3, {1}, {1}, DType::Float32));
}

TEST(TensorCopy, StridedConversionMatchesElementwise) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-100.f, 100.f);
  Tensor src = Tensor::empty({7, 5, 3}, DType::Float32, Device::cpu());
  auto* p = static_cast<float*>(src.data_ptr());
  for (int i = 0; i < 105; ++i) p[i] = dist(rng);
  const Tensor perm = src.permute({2, 0, 1}).slice(2, 1, std::nullopt, 2);  // (3, 7, 2), strided
  for (DType d : {DType::Float64, DType::Int32, DType::Int16, DType::Float16, DType::BFloat16, DType::Bool}) {
    Tensor out = perm.to(std::nullopt, d);
    ASSERT_TRUE(out.is_contiguous());
    Tensor back = out.to(std::nullopt, DType::Float64);
    for (std::int64_t a = 0; a < 3; ++a)
      for (std::int64_t b = 0; b < 7; ++b)
        for (std::int64_t c = 0; c < 2; ++c) {
          const float v = at<float>(perm, {a, b, c});
          const double got = at<double>(back, {a, b, c});
          double want = v;
          if (d == DType::Int32 || d == DType::Int16) want = std::trunc(v);
          if (d == DType::Float16) want = half_bits_to_float(float_to_half_bits(v));
          if (d == DType::BFloat16) want = bfloat16_bits_to_float(float_to_bfloat16_bits(v));
          if (d == DType::Bool) want = v != 0.0f;
          ASSERT_EQ(got, want) << dtype_name(d) << " at " << a << "," << b << "," << c;
        }
  }
}

TEST(TensorCopy, OverlappingCopyGoesThroughATemporary) {
  Tensor t = arange_f32({4, 4});
  t.copy_(t.transpose(0, 1));
  for (std::int64_t i = 0; i < 4; ++i)
    for (std::int64_t j = 0; j < 4; ++j) EXPECT_EQ(at<float>(t, {i, j}), static_cast<float>(j * 4 + i));
}

TEST(TensorCopy, FillAndFullUseExactIntegers) {
  Tensor t = Tensor::full({3}, std::int64_t{(1LL << 53) + 1}, DType::Int64, Device::cpu());
  EXPECT_EQ(at<std::int64_t>(t, {2}), (1LL << 53) + 1);
  Tensor h = Tensor::full({2, 3}, 0.1, DType::Float16, Device::cpu());
  EXPECT_EQ(at<std::uint16_t>(h, {1, 2}), double_to_half_bits(0.1));
  Tensor z = Tensor::zeros({0, 4}, DType::Float32, Device::cpu());
  EXPECT_EQ(z.numel(), 0);
  EXPECT_TRUE(z.is_contiguous());
}

TEST(TensorTo, IdentityOrCopy) {
  Tensor t = arange_f32({2, 3});
  EXPECT_TRUE(t.to(Device::cpu()).shares_storage_with(t));
  EXPECT_TRUE(t.to(std::nullopt, DType::Float32).shares_storage_with(t));
  EXPECT_TRUE(t.to(Device::parse("cpu")).shares_storage_with(t));
  EXPECT_FALSE(t.to(Device::cpu(), std::nullopt, false, /*copy=*/true).shares_storage_with(t));
  EXPECT_FALSE(t.to(std::nullopt, DType::Float64).shares_storage_with(t));
  EXPECT_TRUE(t.contiguous().shares_storage_with(t));
  EXPECT_FALSE(t.transpose(0, 1).contiguous().shares_storage_with(t));
  EXPECT_FALSE(t.clone().shares_storage_with(t));
}

TEST(TensorTo, CudaWithoutADeviceRaisesCleanly) {
  Tensor t = arange_f32({3});
  try {
    t.to(Device::cuda(0));
    GTEST_SKIP() << "a CUDA device is present";
  } catch (const std::runtime_error& e) {
    const std::string m = e.what();
    EXPECT_TRUE(m.find("built without CUDA") != std::string::npos ||
                m.find("no CUDA device is available") != std::string::npos)
        << m;
  }
  EXPECT_ANY_THROW(t.pin_memory());
  EXPECT_ANY_THROW(Stream::create(0));
}

TEST(TensorErrors, MixedDevicesNameBoth) {
  try {
    check_same_device(Device::cuda(0), Device::cpu(), "cat");
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_TRUE(message_contains(e, "Expected all tensors to be on the same device, but found at least two "
                                    "devices, cuda:0 and cpu!"))
        << e.what();
  }
  EXPECT_THROW(arange_f32({2, 3}).copy_(arange_f32({3, 2})), std::invalid_argument);
  EXPECT_THROW(arange_f32({2, 3}).narrow(1, 2, 2), std::invalid_argument);
  EXPECT_THROW(arange_f32({2, 3}).select(2, 0), std::out_of_range);
  EXPECT_THROW(arange_f32({2, 3}).view({4, -1}), std::invalid_argument);
  EXPECT_THROW(Tensor::empty({2, -1}, DType::Float32, Device::cpu()), std::invalid_argument);
}

// ---- multi-device helpers ----------------------------------------------------------------------

TEST(TensorScatter, DataParallelChunking) {
  EXPECT_EQ(chunk_sizes(5, 4), (std::vector<std::int64_t>{2, 2, 1}));
  EXPECT_EQ(chunk_sizes(16, 2), (std::vector<std::int64_t>{8, 8}));
  EXPECT_EQ(chunk_sizes(3, 4), (std::vector<std::int64_t>{1, 1, 1}));
  EXPECT_EQ(chunk_sizes(10, 3), (std::vector<std::int64_t>{4, 4, 2}));
  EXPECT_THROW(chunk_sizes(4, 0), std::invalid_argument);

  Tensor t = arange_f32({5, 3});
  auto parts = scatter(t, {Device::cpu(), Device::cpu(), Device::cpu(), Device::cpu()});
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[2].shape(), (Shape{1, 3}));
  EXPECT_TRUE(parts[0].shares_storage_with(t));  // stays on its device: a view
  Tensor back = gather(parts, Device::cpu());
  EXPECT_EQ(back.shape(), t.shape());
  EXPECT_EQ(std::memcmp(back.data_ptr(), t.data_ptr(), t.nbytes()), 0);
  EXPECT_THROW(scatter(t, {Device::cpu(), Device::cpu()}, 0, std::vector<std::int64_t>{2, 2}), std::invalid_argument);
  auto cols = scatter(t, {Device::cpu(), Device::cpu()}, 1, std::vector<std::int64_t>{1, 2});
  EXPECT_EQ(cols[1].shape(), (Shape{5, 2}));
  EXPECT_THROW(gather({t, t.to(std::nullopt, DType::Float64)}, Device::cpu()), std::invalid_argument);
}

// ---- caching allocator (malloc-driven) ---------------------------------------------------------

namespace {
struct MallocCounter {
  int allocs = 0, frees = 0;
  std::size_t live = 0, limit = SIZE_MAX;
  CachingAllocator::RawOps ops() {
    return {[this](std::size_t n) -> void* {
              if (live + n > limit) return nullptr;
              ++allocs;
              live += n;
              return std::malloc(n);
            },
            [this](void* p, std::size_t n) {
              ++frees;
              live -= n;
              std::free(p);
            }};
  }
};
}  // namespace

TEST(TensorAllocator, ReusesFreedBlocksPerStream) {
  MallocCounter raw;
  {
    CachingAllocator a("test", raw.ops());
    void* p = a.allocate(1000);
    EXPECT_EQ(a.stats().allocated_bytes, 1024u);  // rounded to 512
    a.deallocate(p);
    void* q = a.allocate(900);
    EXPECT_EQ(q, p);  // same rounded size: reused
    EXPECT_EQ(raw.allocs, 1);
    void* other_stream = a.allocate(900, /*stream=*/7);
    EXPECT_NE(other_stream, p);  // p is in use; and a freed block on stream 0 would not serve stream 7
    a.deallocate(q);
    void* r = a.allocate(900, 7);
    EXPECT_NE(r, q);
    EXPECT_EQ(raw.allocs, 3);
    void* small = a.allocate(100);  // 512 is half of the cached 1024 block: still served from it
    EXPECT_EQ(small, q);
    const auto s = a.stats();
    EXPECT_EQ(s.num_cache_hits, 2u);
    EXPECT_EQ(s.active_blocks, 3u);
    EXPECT_EQ(s.cached_blocks, 0u);
    EXPECT_EQ(s.reserved_bytes, 1024u * 3);
    EXPECT_EQ(s.peak_allocated_bytes, 1024u * 3);
    void* b = a.allocate(1500);  // 1536
    a.deallocate(b);
    void* tiny = a.allocate(100);  // 512 < 1536 / 2: the big block is not wasted on it
    EXPECT_NE(tiny, b);
    void* mid = a.allocate(700);  // 1024 >= 768: served from the 1536 block
    EXPECT_EQ(mid, b);
    a.deallocate(tiny);
    a.deallocate(mid);
    a.deallocate(other_stream);
    a.deallocate(r);
    a.deallocate(small);
    a.empty_cache();
    EXPECT_EQ(a.stats().reserved_bytes, 0u);
    EXPECT_EQ(raw.live, 0u);
    EXPECT_THROW(a.deallocate(reinterpret_cast<void*>(0x1000)), std::invalid_argument);
    EXPECT_EQ(a.allocate(0), nullptr);
    void* keep = a.allocate(3 << 20);  // large: rounded to 2 MiB multiples
    EXPECT_EQ(a.stats().allocated_bytes, 4u << 20);
    a.deallocate(keep);
  }
  EXPECT_EQ(raw.frees, raw.allocs);  // the destructor released the cached block
}

TEST(TensorAllocator, EmptiesCacheAndRetriesWhenOutOfMemory) {
  MallocCounter raw;
  raw.limit = 4096;
  CachingAllocator a("small", raw.ops());
  void* p = a.allocate(2048);
  void* q = a.allocate(1024);
  a.deallocate(p);  // 2048 cached, 1024 in use: 3072 live
  void* r = a.allocate(3000);  // 3072 needed: fails, cache emptied, retried
  EXPECT_NE(r, nullptr);
  EXPECT_EQ(a.stats().num_oom_retries, 1u);
  try {
    a.allocate(4096);
    FAIL() << "allocation beyond the limit succeeded";
  } catch (const OutOfMemoryError& e) {
    EXPECT_TRUE(message_contains(e, "out of memory")) << e.what();
  }
  a.deallocate(q);
  a.deallocate(r);
}

TEST(TensorAllocator, ConcurrentChurnKeepsCountsConsistent) {
  MallocCounter raw;
  CachingAllocator a("churn", raw.ops());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&a, t] {
      std::mt19937 rng(t);
      std::vector<void*> live;
      for (int i = 0; i < 2000; ++i) {
        if (live.empty() || rng() % 2) {
          live.push_back(a.allocate(1 + rng() % 5000));
        } else {
          a.deallocate(live.back());
          live.pop_back();
        }
      }
      for (void* p : live) a.deallocate(p);
    });
  for (auto& th : threads) th.join();
  const auto s = a.stats();
  EXPECT_EQ(s.allocated_bytes, 0u);
  EXPECT_EQ(s.num_allocs, s.num_frees);
  EXPECT_GT(s.num_cache_hits, 0u);
  EXPECT_EQ(s.reserved_bytes, s.cached_bytes);
}

// Events the test completes by hand, standing in for CUDA events (Note [record_stream]).
struct FakeEvents {
  std::map<std::uintptr_t, bool> done;  // live events
  std::vector<std::uintptr_t> recorded_on;  // the stream of each record, in order
  std::uintptr_t next = 1;
  int waits = 0;
  void add_to(CachingAllocator::RawOps& ops) {
    ops.record_event = [this](std::uintptr_t stream) {
      recorded_on.push_back(stream);
      done[next] = false;
      return next++;
    };
    ops.event_done = [this](std::uintptr_t e) { return done.at(e); };
    ops.event_wait = [this](std::uintptr_t e) {
      ++waits;
      done.at(e) = true;
    };
    ops.event_release = [this](std::uintptr_t e) { EXPECT_EQ(done.erase(e), 1u) << "event released twice"; };
  }
  std::uintptr_t make() {
    done[next] = false;
    return next++;
  }
  void complete_all() {
    for (auto& [e, d] : done) d = true;
  }
};

TEST(TensorAllocator, RecordStreamKeepsABlockUntilTheOtherStreamsWorkIsDone) {
  // Item 9 of issue 17: a block allocated on stream 1, used on stream 2 and freed must not serve the
  // next allocation on stream 1 while stream 2's work may still read it.
  MallocCounter raw;
  FakeEvents ev;
  auto ops = raw.ops();
  ev.add_to(ops);
  CachingAllocator a("streams", ops);
  void* p = a.allocate(4096, /*stream=*/1);
  a.record_stream(p, 2);
  a.record_stream(p, 2);  // once per stream
  a.record_stream(p, 1);  // its own stream: nothing to record
  a.deallocate(p);
  ASSERT_EQ(ev.recorded_on, (std::vector<std::uintptr_t>{2}));  // recorded on stream 2 at the free
  EXPECT_EQ(a.stats().pending_blocks, 1u);
  EXPECT_EQ(a.stats().pending_bytes, 4096u);
  void* q = a.allocate(4096, 1);
  EXPECT_NE(q, p) << "reused while stream 2 may still use it";
  ev.complete_all();
  void* r = a.allocate(4096, 1);  // the event completed: back on stream 1's free list, reused
  EXPECT_EQ(r, p);
  EXPECT_EQ(a.stats().pending_blocks, 0u);
  EXPECT_TRUE(ev.done.empty()) << "every event is released once its block is reusable";
  // A block with a use is waited for by empty_cache(), then released.
  a.record_stream(r, 3);
  a.deallocate(r);
  a.deallocate(q);
  a.empty_cache();
  EXPECT_EQ(ev.waits, 1);
  EXPECT_EQ(a.stats().reserved_bytes, 0u);
  EXPECT_EQ(raw.live, 0u);
  EXPECT_THROW(a.record_stream(reinterpret_cast<void*>(0x10), 2), std::invalid_argument);
}

TEST(TensorAllocator, DeallocateAfterWaitsForTheCallersEvents) {
  // csrc/kernels' results: the streams may be gone when the block is freed, so the caller hands over
  // events it recorded while they existed.
  MallocCounter raw;
  FakeEvents ev;
  auto ops = raw.ops();
  ev.add_to(ops);
  CachingAllocator a("after", ops);
  void* p = a.allocate(1000, 5);
  a.deallocate_after(p, {ev.make(), ev.make()});
  void* q1 = a.allocate(1000, 5);
  EXPECT_NE(q1, p);
  ev.done.begin()->second = true;  // one of the two: still pending
  void* q2 = a.allocate(1000, 5);
  EXPECT_NE(q2, p);
  ev.complete_all();
  void* p2 = a.allocate(1000, 5);
  EXPECT_EQ(p2, p);
  EXPECT_TRUE(ev.done.empty());
  a.deallocate_after(q1, {});  // no events: cached at once
  EXPECT_EQ(a.stats().cached_blocks, 1u);
  a.deallocate(q2);
  a.deallocate(p2);
  // Out of memory: pending blocks are waited for and released before the retry.
  MallocCounter small;
  small.limit = 2048;
  auto sops = small.ops();
  ev.add_to(sops);
  CachingAllocator b("oom", sops);
  void* x = b.allocate(1500, 1);
  b.deallocate_after(x, {ev.make()});
  void* y = b.allocate(1200, 2);  // another stream, and 1536 + 1536 > 2048: wait, release, retry
  EXPECT_NE(y, nullptr);
  EXPECT_EQ(b.stats().num_oom_retries, 1u);
  EXPECT_EQ(b.stats().pending_blocks, 0u);
  b.deallocate(y);
}

TEST(TensorAllocator, AFailingRawFreeNeverLeavesAFreedPointerInTheCache) {
  // Item 10 of issue 17: cudaFree failing in the middle of releasing the cache (an out-of-memory retry)
  // used to leave already-freed pointers on the free lists, for the next cache hit to hand out.
  std::set<void*> freed;
  void* lost = nullptr;  // the block whose free failed: not freed by the allocator, freed by the test
  int calls = 0;
  std::size_t live = 0, limit = 4 * 1024;
  CachingAllocator::RawOps ops{[&](std::size_t n) -> void* {
                                 if (live + n > limit) return nullptr;
                                 live += n;
                                 void* p = std::malloc(n);
                                 freed.erase(p);
                                 return p;
                               },
                               [&](void* p, std::size_t n) {
                                 if (++calls == 2) {
                                   lost = p;
                                   throw CudaError("injected cudaFree failure", 719);
                                 }
                                 freed.insert(p);
                                 live -= n;
                                 std::free(p);
                               }};
  CachingAllocator a("failing", ops);
  std::vector<void*> blocks;
  for (int i = 0; i < 4; ++i) blocks.push_back(a.allocate(1000, static_cast<std::uintptr_t>(i)));
  for (void* p : blocks) a.deallocate(p);  // four cached blocks, one per stream: the limit is reached
  EXPECT_THROW(a.allocate(1000, 9), CudaError);  // the retry empties the cache; the second free fails
  const auto s = a.stats();
  EXPECT_EQ(s.cached_blocks, 0u) << "every block left the cache, freed or not";
  EXPECT_EQ(s.num_raw_free_failures, 1u);
  EXPECT_EQ(s.num_raw_frees, 3u);
  EXPECT_EQ(s.reserved_bytes, 0u);
  for (int stream = 0; stream < 4; ++stream) {
    void* p = a.allocate(1000, static_cast<std::uintptr_t>(stream));
    EXPECT_EQ(freed.count(p), 0u) << "handed out memory that was freed";
    a.deallocate(p);
  }
  calls = 100;  // no more failures
  a.empty_cache();
  EXPECT_NE(lost, nullptr);
  std::free(lost);
}

// ---- pending host work ----------------------------------------------------------------------------

TEST(TensorStorage, HostReadsWaitForPendingWork) {
  struct Counting : PendingWork {
    int* waits;
    explicit Counting(int* w) : waits(w) {}
    void wait() override { ++*waits; }
  };
  int waits = 0;
  Tensor t = arange_f32({4});
  t.storage()->set_pending(std::make_shared<Counting>(&waits));
  Tensor out = t.clone();  // a host read
  EXPECT_EQ(waits, 1);
  EXPECT_FALSE(t.storage()->has_pending());
  t.storage()->set_pending(std::make_shared<Counting>(&waits));
  DLManagedTensor* m = to_dlpack(t);  // export waits too
  EXPECT_EQ(waits, 2);
  m->deleter(m);
}

// ---- DLPack ownership -------------------------------------------------------------------------------

TEST(TensorDLPack, RoundTripSharesMemoryAndKeepsProducerAlive) {
  Tensor t = arange_f32({3, 4}).transpose(0, 1);  // strided export
  DLManagedTensorVersioned* m = to_dlpack_versioned(t);
  EXPECT_EQ(m->version.major, 1u);
  EXPECT_EQ(m->flags, 0u);
  EXPECT_EQ(m->dl_tensor.strides[0], 1);
  EXPECT_EQ(m->dl_tensor.strides[1], 4);
  EXPECT_EQ(m->dl_tensor.device.device_type, kDLCPU);
  void* data = t.data_ptr();
  t = Tensor();  // the producer dies first: the export keeps the storage
  bool read_only = true;
  Tensor u = from_dlpack(m, &read_only);
  EXPECT_FALSE(read_only);
  EXPECT_EQ(u.data_ptr(), data);
  EXPECT_EQ(at<float>(u, {3, 2}), 11.0f);
  static_cast<float*>(u.data_ptr())[0] = 42.f;  // written through the import
  Tensor v = u.narrow(0, 0, 1);
  u = Tensor();
  EXPECT_EQ(at<float>(v, {0, 0}), 42.f);  // views of the import keep it alive
}

TEST(TensorDLPack, DeleterRunsExactlyOnce) {
  int calls = 0;
  struct Ctx {
    int* calls;
    std::int64_t shape[1] = {4};
    float data[4] = {1, 2, 3, 4};
  };
  auto* ctx = new Ctx{&calls};
  auto* m = new DLManagedTensor{};
  m->dl_tensor = DLTensor{ctx->data, {kDLCPU, 0}, 1, {kDLFloat, 32, 1}, ctx->shape, nullptr, 0};
  m->manager_ctx = ctx;
  m->deleter = [](DLManagedTensor* self) {
    auto* c = static_cast<Ctx*>(self->manager_ctx);
    ++*c->calls;
    delete c;
    delete self;
  };
  {
    Tensor t = from_dlpack(m);
    EXPECT_EQ(t.strides(), (Shape{1}));  // NULL strides: compact
    Tensor w = t.narrow(0, 1, 2);
    EXPECT_EQ(calls, 0);
  }
  EXPECT_EQ(calls, 1);
}

TEST(TensorDLPack, FailedImportReleasesTheProducerOnce) {
  int calls = 0;
  struct Holder {
    int* calls;
    std::int64_t shape[2] = {2, 2};
    std::int64_t strides[2] = {2, -1};
    double data[4] = {};
  };
  for (int variant = 0; variant < 2; ++variant) {
    auto* h = new Holder{&calls};
    auto* m = new DLManagedTensor{};
    const DLDataType dt = variant == 0 ? DLDataType{kDLComplex, 64, 1} : DLDataType{kDLFloat, 64, 1};
    m->dl_tensor = DLTensor{h->data + 1, {kDLCPU, 0}, 2, dt, h->shape, h->strides, 0};
    m->manager_ctx = h;
    m->deleter = [](DLManagedTensor* self) {
      auto* c = static_cast<Holder*>(self->manager_ctx);
      ++*c->calls;
      delete c;
      delete self;
    };
    EXPECT_ANY_THROW(from_dlpack(m));  // complex dtype; negative strides
    EXPECT_EQ(calls, variant + 1);
  }
}

TEST(TensorDLPack, UnconsumedExportIsFreedByItsDeleter) {
  Tensor t = arange_f32({5});
  DLManagedTensor* m = to_dlpack(t);
  EXPECT_EQ(t.storage().use_count(), 2);
  m->deleter(m);
  EXPECT_EQ(t.storage().use_count(), 1);
  DLManagedTensorVersioned* v = to_dlpack_versioned(t, /*copied=*/true);
  EXPECT_EQ(v->flags, static_cast<std::uint64_t>(DLPACK_FLAG_BITMASK_IS_COPIED));
  v->deleter(v);
  EXPECT_THROW(dlpack_sync_for_consumer(t, 1), std::invalid_argument);  // host tensors take no stream
  EXPECT_NO_THROW(dlpack_sync_for_consumer(t, std::nullopt));
}

TEST(TensorStreams, CurrentDeviceIsThreadLocal) {
  set_current_cuda_index(0);
  set_current_cuda_index(3);
  EXPECT_EQ(resolve_device(Device::cuda()), Device::cuda(3));
  std::thread([] { EXPECT_EQ(current_cuda_index(), 0); }).join();
  set_current_cuda_index(0);
  EXPECT_THROW(set_current_cuda_index(-1), std::invalid_argument);
  EXPECT_TRUE(current_stream(2).is_default());
}
