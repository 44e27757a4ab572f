#pragma once
/// CUDA streams and events, and the current stream per device and thread (PyTorch's model: the
/// default stream is the legacy NULL stream; `with gpufleet.stream(s)` makes s current).
#include <cstdint>
#include <memory>

namespace gpufleet {

/// A CUDA stream on one device. Copies share ownership: the stream is destroyed with its last copy.
/// The default stream has handle 0 and is never destroyed.
class Stream {
 public:
  Stream() = default;  ///< the default (legacy NULL) stream of device 0
  /// Creates a new non-blocking stream on `device` (needs CUDA and a device).
  static Stream create(int device, int priority = 0);
  static Stream default_stream(int device);
  /// Wraps an existing cudaStream_t (not owned; the caller keeps it alive).
  static Stream external(int device, std::uintptr_t handle);

  int device() const noexcept { return device_; }
  std::uintptr_t handle() const noexcept { return handle_; }
  bool is_default() const noexcept { return handle_ == 0; }
  void synchronize() const;
  /// True when all work queued on the stream has finished.
  bool query() const;
  /// Work queued later on this stream waits for everything queued so far on `other`.
  void wait_stream(const Stream& other) const;
  friend bool operator==(const Stream& a, const Stream& b) {
    return a.device_ == b.device_ && a.handle_ == b.handle_;
  }

 private:
  int device_ = 0;
  std::uintptr_t handle_ = 0;
  std::shared_ptr<void> owner_;
};

/// A CUDA event (created lazily on its first record, on the recording stream's device).
class Event {
 public:
  explicit Event(bool enable_timing = false) : timing_(enable_timing) {}
  void record(const Stream& stream);
  /// Blocks until the recorded work finished (returns at once if never recorded).
  void synchronize() const;
  bool query() const;
  /// Makes `stream` wait for this event (no-op if never recorded).
  void wait(const Stream& stream) const;
  /// Milliseconds between this event and `end` (both recorded, timing enabled).
  double elapsed_ms(const Event& end) const;
  bool recorded() const noexcept { return state_ != nullptr; }
  bool enable_timing() const noexcept { return timing_; }
  int device() const;

 private:
  struct State;
  bool timing_;
  std::shared_ptr<State> state_;
};

/// The current stream of `device` in this thread (the default stream unless set).
Stream current_stream(int device);
/// Makes `stream` current for its device in this thread.
void set_current_stream(const Stream& stream);
/// Waits for all work on `device` (cudaDeviceSynchronize).
void synchronize_device(int device);

/// The current CUDA device index of this thread (default 0).
int current_cuda_index();
/// Sets the current CUDA device index of this thread (no CUDA call; validated by the caller).
void set_current_cuda_index(int index);

}  // namespace gpufleet
