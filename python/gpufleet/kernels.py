"""gpufleet.kernels: postprocessing kernels with CUDA and multi-threaded CPU backends (placeholder)."""
__all__: list[str] = []
