// The CUDA driver API, opened at run time (dlopen of libcuda.so.1), and the per-context cache of loaded
// kernels. Nothing here links against libcuda, so the library builds and its host tests run on machines
// without a GPU or driver.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <string>

#include "proxyattn.h"

namespace proxyattn {

// One kernel image embedded in the library (an AOT-compiled Triton kernel or a CUDA C helper).
struct KernelImage {
  const char *key;              // unique name inside the library, e.g. "attn_bf16_d128_b128"
  const char *entry;            // function name inside the cubin
  const unsigned char *cubin;   // cubin bytes (sm_90)
  size_t cubin_size;
  unsigned shared_bytes;        // dynamic shared memory: Triton kernels' fixed need; helpers' maximum
  unsigned num_warps;           // block = num_warps * 32 threads (Triton kernels); 0 for CUDA C helpers
  unsigned num_params;          // parameters of the entry, hidden ones included (Triton: +2 scratch pointers)
  int triton;                   // 1: Triton kernel (append the 2 hidden scratch pointers at launch)
};

// Thread-local error message, set by fail(); returns the status for `return fail(...)`.
proxyattn_status_t fail(proxyattn_status_t status, const std::string &message);
void clear_error();
const char *last_error();

// Result of a driver call, converted: CUDA_SUCCESS -> PROXYATTN_SUCCESS, else PROXYATTN_ERROR_CUDA with the
// driver's error name and `what` in the message.
proxyattn_status_t check_cu(CUresult r, const char *what);

// Opens libcuda.so.1 once (thread-safe). PROXYATTN_ERROR_DRIVER_UNAVAILABLE when it cannot.
// The path can be overridden with the environment variable PROXYATTN_LIBCUDA (used by the host tests).
proxyattn_status_t driver_open();

// The loaded function of `image` in the calling thread's current context (loaded on first use; thread-safe).
// Also checks that a context is current and that its device is compute capability 9.x.
proxyattn_status_t get_function(const KernelImage &image, CUfunction *fn);

// Launches `image`'s function with `args` (its visible parameters; hidden Triton scratch pointers are added)
// and `shared` bytes of dynamic shared memory (at most image.shared_bytes).
proxyattn_status_t launch(const KernelImage &image, unsigned gx, unsigned gy, unsigned gz, unsigned block_threads,
                          unsigned shared, void **args, unsigned num_args, CUstream stream);

// Multiprocessors of the current context's device (cached per context by the caller if needed).
proxyattn_status_t current_sm_count(int *count);

// cuMemsetD32Async through the opened driver.
proxyattn_status_t memset_d32(CUdeviceptr dst, unsigned value, size_t count, CUstream stream);

}  // namespace proxyattn
