// Streams, events and the per-thread current device and streams. The CUDA calls go through the
// CUDA slot (cuda_backend.h); a CPU-only build raises "gpufleet was built without CUDA".
#include "tensor/stream.h"

#include <unordered_map>

#include "common/error.h"
#include "tensor/cuda_backend.h"

namespace gpufleet {

namespace {
thread_local int t_current_index = 0;
thread_local std::unordered_map<int, Stream> t_current_streams;
}  // namespace

int current_cuda_index() { return t_current_index; }
void set_current_cuda_index(int index) {
  GF_CHECK_ARG(index >= 0, "invalid CUDA device index {}: expected a non-negative integer", index);
  t_current_index = index;
}

Stream Stream::create(int device, int priority) {
#if !GPUFLEET_WITH_CUDA
  throw_no_cuda("CUDA streams need the CUDA runtime");
#else
  cuda_backend::check_device(device, "cannot create a CUDA stream");
  Stream s;
  s.device_ = device;
  s.handle_ = cuda_backend::stream_create(device, priority);
  const std::uintptr_t h = s.handle_;
  s.owner_ = std::shared_ptr<void>(nullptr, [device, h](void*) {
    try {
      cuda_backend::stream_destroy(device, h);
    } catch (...) {
    }
  });
  return s;
#endif
}

Stream Stream::default_stream(int device) {
  GF_CHECK_ARG(device >= 0, "invalid CUDA device index {}", device);
  Stream s;
  s.device_ = device;
  return s;
}

Stream Stream::external(int device, std::uintptr_t handle) {
  Stream s = default_stream(device);
  s.handle_ = handle;
  return s;
}

void Stream::synchronize() const {
#if !GPUFLEET_WITH_CUDA
  throw_no_cuda("CUDA streams need the CUDA runtime");
#else
  cuda_backend::stream_synchronize(device_, handle_);
#endif
}

bool Stream::query() const {
#if !GPUFLEET_WITH_CUDA
  throw_no_cuda("CUDA streams need the CUDA runtime");
#else
  return cuda_backend::stream_query(device_, handle_);
#endif
}

void Stream::wait_stream(const Stream& other) const {
#if !GPUFLEET_WITH_CUDA
  throw_no_cuda("CUDA streams need the CUDA runtime");
#else
  if (other == *this) return;
  Event e;
  e.record(other);
  e.wait(*this);
#endif
}

struct Event::State {
  int device = 0;
  std::uintptr_t handle = 0;
  ~State() {
#if GPUFLEET_WITH_CUDA
    try {
      cuda_backend::event_destroy(device, handle);
    } catch (...) {
    }
#endif
  }
};

void Event::record(const Stream& stream) {
#if !GPUFLEET_WITH_CUDA
  throw_no_cuda("CUDA events need the CUDA runtime");
#else
  if (state_ && state_->device != stream.device())
    throw std::invalid_argument(fmt::format(
        "this event was recorded on cuda:{} and cannot be recorded on a stream of cuda:{}", state_->device,
        stream.device()));
  if (!state_) {
    auto st = std::make_shared<State>();
    st->device = stream.device();
    st->handle = cuda_backend::event_create(stream.device(), timing_);
    state_ = std::move(st);
  }
  cuda_backend::event_record(state_->device, state_->handle, stream.handle());
#endif
}

void Event::synchronize() const {
#if GPUFLEET_WITH_CUDA
  if (state_) cuda_backend::event_synchronize(state_->handle);
#endif
}

bool Event::query() const {
#if GPUFLEET_WITH_CUDA
  if (state_) return cuda_backend::event_query(state_->handle);
#endif
  return true;
}

void Event::wait(const Stream& stream) const {
#if GPUFLEET_WITH_CUDA
  if (state_) cuda_backend::stream_wait_event(stream.device(), stream.handle(), state_->handle);
#endif
}

double Event::elapsed_ms(const Event& end) const {
  GF_CHECK_ARG(timing_ && end.timing_, "elapsed_time needs two events created with enable_timing=True");
  GF_CHECK_ARG(state_ && end.state_, "elapsed_time needs two recorded events (call record() on both first)");
#if !GPUFLEET_WITH_CUDA
  throw_no_cuda("CUDA events need the CUDA runtime");
#else
  return cuda_backend::event_elapsed_ms(state_->handle, end.state_->handle);
#endif
}

int Event::device() const { return state_ ? state_->device : -1; }

Stream current_stream(int device) {
  GF_CHECK_ARG(device >= 0, "invalid CUDA device index {}", device);
  auto it = t_current_streams.find(device);
  return it == t_current_streams.end() ? Stream::default_stream(device) : it->second;
}

void set_current_stream(const Stream& stream) {
  if (stream.is_default())
    t_current_streams.erase(stream.device());
  else
    t_current_streams[stream.device()] = stream;
}

void synchronize_device(int device) {
#if !GPUFLEET_WITH_CUDA
  throw_no_cuda("synchronize needs the CUDA runtime");
#else
  cuda_backend::check_device(device, "cannot synchronize");
  cuda_backend::device_synchronize(device);
#endif
}

}  // namespace gpufleet
