# Decides whether the CUDA backends are compiled (GPUFLEET_WITH_CUDA) from GPUFLEET_CUDA = AUTO/ON/OFF.
# The CUDA runtime is linked statically so the module imports on machines without an NVIDIA driver.
string(TOUPPER "${GPUFLEET_CUDA}" _gf_cuda)
if(NOT _gf_cuda MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "GPUFLEET_CUDA='${GPUFLEET_CUDA}' is not one of AUTO, ON, OFF")
endif()

set(GPUFLEET_WITH_CUDA OFF)
if(NOT _gf_cuda STREQUAL "OFF")
  include(CheckLanguage)
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER AND CMAKE_VERSION VERSION_LESS 3.25.2)
    # CMake < 3.25.2 does not know that nvcc >= 12 takes -std=c++20 and fails in enable_language with
    # "requires the language dialect CUDA20"; say what to do instead (pip does it by itself: the
    # cmake.version range in pyproject.toml makes scikit-build-core fetch a newer CMake).
    message(FATAL_ERROR "gpufleet: CUDA (GPUFLEET_CUDA=${GPUFLEET_CUDA}, nvcc at ${CMAKE_CUDA_COMPILER}) needs "
      "CMake >= 3.25.2 for the CUDA20 dialect; this is CMake ${CMAKE_VERSION}. Use a newer CMake "
      "(pip install 'cmake>=3.25.2') or build without CUDA (-DGPUFLEET_CUDA=OFF).")
  endif()
  if(CMAKE_CUDA_COMPILER)
    set(GPUFLEET_WITH_CUDA ON)
  elseif(_gf_cuda STREQUAL "ON")
    message(FATAL_ERROR "GPUFLEET_CUDA=ON but no CUDA compiler was found (set CMAKE_CUDA_COMPILER or CUDACXX)")
  else()
    message(STATUS "gpufleet: no CUDA compiler found; building without CUDA (GPUFLEET_CUDA=AUTO)")
  endif()
endif()

if(GPUFLEET_WITH_CUDA)
  # Turing to Hopper by default; override with -DCMAKE_CUDA_ARCHITECTURES=...
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
    set(CMAKE_CUDA_ARCHITECTURES "75;80;86;89;90" CACHE STRING "CUDA architectures" FORCE)
  endif()
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  set(GPUFLEET_CUDA_ARCHITECTURES_STRING "${CMAKE_CUDA_ARCHITECTURES}")
else()
  set(GPUFLEET_CUDA_ARCHITECTURES_STRING "")
endif()
