// A recording stand-in for libcuda.so.1 (host tests only): libproxyattn opens it through PROXYATTN_LIBCUDA and
// "launches" its kernels here, which records every launch (entry name, grid, block, shared memory, parameter
// values) instead of running it. tests/cpp/test_launches.py compares the recorded parameters with those the Python
// launchers of proxyattn/kernels pass to the same kernels. Device pointers are plain numbers here: nothing is
// dereferenced.
#include <cuda.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#define FAKE_API extern "C" __attribute__((visibility("default")))

namespace {
struct Launch {
  std::string entry;
  unsigned grid[3], block, shared;
  std::vector<uint64_t> params;
};
std::vector<Launch> g_launches;
std::map<std::string, std::vector<int>> g_sizes;  // entry -> byte size of each parameter
std::vector<std::string> g_functions;             // CUfunction handle i+1 -> entry name
int g_sm_count = 8;
}  // namespace

FAKE_API void fake_set_param_sizes(const char *entry, const int *sizes, int n) {
  g_sizes[entry] = std::vector<int>(sizes, sizes + n);
}
FAKE_API void fake_set_sm_count(int n) { g_sm_count = n; }
FAKE_API int fake_launch_count() { return (int)g_launches.size(); }
FAKE_API void fake_clear() { g_launches.clear(); }
FAKE_API int fake_launch_info(int i, char *entry, int cap, unsigned *grid, unsigned *block, unsigned *shared,
                              uint64_t *params, int max_params) {
  const Launch &l = g_launches.at(i);
  std::strncpy(entry, l.entry.c_str(), cap - 1);
  entry[cap - 1] = '\0';
  for (int d = 0; d < 3; ++d) grid[d] = l.grid[d];
  *block = l.block;
  *shared = l.shared;
  int n = (int)l.params.size() < max_params ? (int)l.params.size() : max_params;
  for (int p = 0; p < n; ++p) params[p] = l.params[p];
  return (int)l.params.size();
}

FAKE_API CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
FAKE_API CUresult cuGetErrorName(CUresult, const char **s) {
  *s = "FAKE_ERROR";
  return CUDA_SUCCESS;
}
FAKE_API CUresult cuCtxGetCurrent(CUcontext *ctx) {
  *ctx = reinterpret_cast<CUcontext>(0x1000);
  return CUDA_SUCCESS;
}
FAKE_API CUresult cuCtxGetDevice(CUdevice *dev) {
  *dev = 0;
  return CUDA_SUCCESS;
}
FAKE_API CUresult cuDeviceGetAttribute(int *v, CUdevice_attribute a, CUdevice) {
  if (a == CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) *v = 9;
  else if (a == CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR) *v = 0;
  else if (a == CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) *v = g_sm_count;
  else *v = 0;
  return CUDA_SUCCESS;
}
FAKE_API CUresult cuModuleLoadData(CUmodule *m, const void *image) {
  // A cubin is an ELF file: check the magic, as the real driver would reject anything else.
  if (std::memcmp(image, "\x7f" "ELF", 4) != 0) return CUDA_ERROR_INVALID_IMAGE;
  *m = reinterpret_cast<CUmodule>(const_cast<void *>(image));
  return CUDA_SUCCESS;
}
FAKE_API CUresult cuModuleGetFunction(CUfunction *f, CUmodule, const char *name) {
  g_functions.push_back(name);
  *f = reinterpret_cast<CUfunction>(g_functions.size());
  return CUDA_SUCCESS;
}
FAKE_API CUresult cuFuncSetAttribute(CUfunction, CUfunction_attribute, int) { return CUDA_SUCCESS; }
FAKE_API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                 unsigned bz, unsigned shared, CUstream, void **params, void **) {
  Launch l;
  l.entry = g_functions.at(reinterpret_cast<uintptr_t>(f) - 1);
  l.grid[0] = gx;
  l.grid[1] = gy;
  l.grid[2] = gz;
  l.block = bx * by * bz;
  l.shared = shared;
  auto it = g_sizes.find(l.entry);
  if (it == g_sizes.end()) return CUDA_ERROR_INVALID_VALUE;  // the test must declare every entry's parameters
  for (size_t p = 0; p < it->second.size(); ++p) {
    uint64_t v = 0;
    std::memcpy(&v, params[p], (size_t)it->second[p]);
    l.params.push_back(v);
  }
  g_launches.push_back(l);
  return CUDA_SUCCESS;
}
// Recorded like a launch: entry "cuMemsetD32Async", grid and block 0, params (dst, value, count).
FAKE_API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned value, size_t count, CUstream) {
  Launch l;
  l.entry = "cuMemsetD32Async";
  l.grid[0] = l.grid[1] = l.grid[2] = 0;
  l.block = 0;
  l.shared = 0;
  l.params = {(uint64_t)dst, (uint64_t)value, (uint64_t)count};
  g_launches.push_back(l);
  return CUDA_SUCCESS;
}
