#pragma once
/// Error conventions for the whole core (see STYLE: two tiers).
///
/// - Bad user input throws a standard exception that pybind11 maps to a Python type:
///   std::invalid_argument -> ValueError, std::out_of_range -> IndexError, TypeError_ -> TypeError.
///   Use GF_CHECK_ARG / GF_CHECK_TYPE with a message that names the value received and what is accepted.
/// - Broken internal invariants use GF_ASSERT, which throws gpufleet::InternalError (RuntimeError in
///   Python) naming file and line. Nothing in the core aborts the process.
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace gpufleet {

/// Raised for arguments of the wrong type (maps to Python TypeError).
class TypeError_ : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// A broken invariant inside gpufleet: a bug, never the user's fault.
class InternalError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

/// A failure reported by the CUDA runtime or driver (maps to gpufleet.CudaError, a RuntimeError).
class CudaError : public std::runtime_error {
 public:
  CudaError(std::string message, int code) : std::runtime_error(std::move(message)), code_(code) {}
  int code() const noexcept { return code_; }

 private:
  int code_;
};

}  // namespace gpufleet

#define GF_CHECK_ARG(cond, ...)                                       \
  do {                                                                \
    if (!(cond)) throw std::invalid_argument(fmt::format(__VA_ARGS__)); \
  } while (0)

#define GF_CHECK_TYPE(cond, ...)                                          \
  do {                                                                    \
    if (!(cond)) throw ::gpufleet::TypeError_(fmt::format(__VA_ARGS__)); \
  } while (0)

#define GF_ASSERT(cond, ...)                                                                   \
  do {                                                                                         \
    if (!(cond))                                                                               \
      throw ::gpufleet::InternalError(fmt::format("gpufleet internal error at {}:{}: {} ({})", \
                                                  __FILE__, __LINE__, #cond,                   \
                                                  fmt::format(__VA_ARGS__)));                  \
  } while (0)
