#include "driver.hpp"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace proxyattn {

namespace {

thread_local std::string g_error;

// Driver entry points used by the library. Declared here (not taken from cuda.h's prototypes) because they
// are resolved with dlsym; the names below are the unversioned ABI symbols of libcuda.so.1.
struct Driver {
  void *handle = nullptr;
  CUresult (*Init)(unsigned) = nullptr;
  CUresult (*GetErrorName)(CUresult, const char **) = nullptr;
  CUresult (*CtxGetCurrent)(CUcontext *) = nullptr;
  CUresult (*CtxGetDevice)(CUdevice *) = nullptr;
  CUresult (*DeviceGetAttribute)(int *, CUdevice_attribute, CUdevice) = nullptr;
  CUresult (*ModuleLoadData)(CUmodule *, const void *) = nullptr;
  CUresult (*ModuleGetFunction)(CUfunction *, CUmodule, const char *) = nullptr;
  CUresult (*FuncSetAttribute)(CUfunction, CUfunction_attribute, int) = nullptr;
  CUresult (*LaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                           CUstream, void **, void **) = nullptr;
  CUresult (*MemsetD32Async)(CUdeviceptr, unsigned, size_t, CUstream) = nullptr;
};

Driver g_drv;
std::once_flag g_open_once;
proxyattn_status_t g_open_status = PROXYATTN_ERROR_DRIVER_UNAVAILABLE;
std::string g_open_message;

template <typename F>
bool resolve(void *h, const char *name, F *out) {
  *out = reinterpret_cast<F>(dlsym(h, name));
  return *out != nullptr;
}

void open_driver() {
  const char *path = std::getenv("PROXYATTN_LIBCUDA");
  if (path == nullptr || path[0] == '\0') path = "libcuda.so.1";
  void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) {
    const char *why = dlerror();
    g_open_message = std::string("cannot open the CUDA driver library '") + path + "': " + (why ? why : "unknown") +
                     " (libproxyattn needs an NVIDIA driver at run time)";
    return;
  }
  Driver d;
  d.handle = h;
  const char *missing = nullptr;
#define PA_RESOLVE(field, sym) \
  if (!missing && !resolve(h, sym, &d.field)) missing = sym;
  PA_RESOLVE(Init, "cuInit")
  PA_RESOLVE(GetErrorName, "cuGetErrorName")
  PA_RESOLVE(CtxGetCurrent, "cuCtxGetCurrent")
  PA_RESOLVE(CtxGetDevice, "cuCtxGetDevice")
  PA_RESOLVE(DeviceGetAttribute, "cuDeviceGetAttribute")
  PA_RESOLVE(ModuleLoadData, "cuModuleLoadData")
  PA_RESOLVE(ModuleGetFunction, "cuModuleGetFunction")
  PA_RESOLVE(FuncSetAttribute, "cuFuncSetAttribute")
  PA_RESOLVE(LaunchKernel, "cuLaunchKernel")
  PA_RESOLVE(MemsetD32Async, "cuMemsetD32Async")
#undef PA_RESOLVE
  if (missing) {
    g_open_message = std::string("the CUDA driver library '") + path + "' has no symbol " + missing;
    dlclose(h);
    return;
  }
  CUresult r = d.Init(0);
  if (r != CUDA_SUCCESS) {
    const char *name = "?";
    d.GetErrorName(r, &name);
    g_open_message = std::string("cuInit(0) failed: ") + name;
    return;
  }
  g_drv = d;
  g_open_status = PROXYATTN_SUCCESS;
}

// Loaded functions per context. A context gets a slot on first use; modules are never unloaded (they live
// as long as the context; a destroyed context's slot is never matched again unless the driver reuses the
// handle, which it does only after destroying the context's modules too, so the cache is cleared then).
struct ContextSlot {
  CUcontext ctx;
  std::vector<std::pair<const KernelImage *, CUfunction>> functions;
};
std::mutex g_cache_mutex;
std::vector<ContextSlot> g_slots;

}  // namespace

proxyattn_status_t fail(proxyattn_status_t status, const std::string &message) {
  g_error = message;
  return status;
}

void clear_error() { g_error.clear(); }

const char *last_error() { return g_error.c_str(); }

proxyattn_status_t check_cu(CUresult r, const char *what) {
  if (r == CUDA_SUCCESS) return PROXYATTN_SUCCESS;
  const char *name = "unknown CUresult";
  if (g_drv.GetErrorName) g_drv.GetErrorName(r, &name);
  return fail(PROXYATTN_ERROR_CUDA, std::string(what) + " failed: " + name + " (" + std::to_string(int(r)) + ")");
}

proxyattn_status_t driver_open() {
  std::call_once(g_open_once, open_driver);
  if (g_open_status != PROXYATTN_SUCCESS) return fail(g_open_status, g_open_message);
  return PROXYATTN_SUCCESS;
}

namespace {

// The calling thread's current CUDA context (the driver opened first); NO_CONTEXT when there is none.
proxyattn_status_t current_context(CUcontext *ctx) {
  proxyattn_status_t st = driver_open();
  if (st != PROXYATTN_SUCCESS) return st;
  if ((st = check_cu(g_drv.CtxGetCurrent(ctx), "cuCtxGetCurrent")) != PROXYATTN_SUCCESS) return st;
  if (*ctx == nullptr)
    return fail(PROXYATTN_ERROR_NO_CONTEXT,
                "no current CUDA context on this thread (call cudaSetDevice/cudaFree(0) or cuCtxSetCurrent first)");
  return PROXYATTN_SUCCESS;
}

}  // namespace

proxyattn_status_t get_function(const KernelImage &image, CUfunction *fn) {
  CUcontext ctx = nullptr;
  proxyattn_status_t st = current_context(&ctx);
  if (st != PROXYATTN_SUCCESS) return st;
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  ContextSlot *slot = nullptr;
  for (auto &s : g_slots)
    if (s.ctx == ctx) slot = &s;
  if (slot == nullptr) {
    CUdevice dev = 0;
    if ((st = check_cu(g_drv.CtxGetDevice(&dev), "cuCtxGetDevice")) != PROXYATTN_SUCCESS) return st;
    int major = 0, minor = 0;
    if ((st = check_cu(g_drv.DeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
                       "cuDeviceGetAttribute")) != PROXYATTN_SUCCESS)
      return st;
    g_drv.DeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
    if (major != 9)
      return fail(PROXYATTN_ERROR_DEVICE_UNSUPPORTED,
                  "the current device has compute capability " + std::to_string(major) + "." +
                      std::to_string(minor) + "; libproxyattn's kernels are compiled for sm_90 (9.x) only");
    g_slots.push_back(ContextSlot{ctx, {}});
    slot = &g_slots.back();
  }
  for (auto &p : slot->functions)
    if (p.first == &image) {
      *fn = p.second;
      return PROXYATTN_SUCCESS;
    }
  CUmodule mod = nullptr;
  std::string what = std::string("cuModuleLoadData(") + image.key + ")";
  if ((st = check_cu(g_drv.ModuleLoadData(&mod, image.cubin), what.c_str())) != PROXYATTN_SUCCESS) return st;
  CUfunction f = nullptr;
  what = std::string("cuModuleGetFunction(") + image.entry + ")";
  if ((st = check_cu(g_drv.ModuleGetFunction(&f, mod, image.entry), what.c_str())) != PROXYATTN_SUCCESS) return st;
  if (image.shared_bytes > 48 * 1024) {
    what = std::string("cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, ") + image.key + ")";
    st = check_cu(g_drv.FuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(image.shared_bytes)),
                  what.c_str());
    if (st != PROXYATTN_SUCCESS) return st;
  }
  slot->functions.emplace_back(&image, f);
  *fn = f;
  return PROXYATTN_SUCCESS;
}

proxyattn_status_t launch(const KernelImage &image, unsigned gx, unsigned gy, unsigned gz, unsigned block_threads,
                          unsigned shared, void **args, unsigned num_args, CUstream stream) {
  if (gx == 0 || gy == 0 || gz == 0) return PROXYATTN_SUCCESS;  // empty grid: nothing to do
  if (shared > image.shared_bytes)
    return fail(PROXYATTN_ERROR_INVALID_VALUE, std::string("internal: launch of ") + image.key + " asks for " +
                                                   std::to_string(shared) + " bytes of shared memory, more than " +
                                                   std::to_string(image.shared_bytes));
  CUfunction fn = nullptr;
  proxyattn_status_t st = get_function(image, &fn);
  if (st != PROXYATTN_SUCCESS) return st;
  void *all[64];
  CUdeviceptr global_scratch = 0, profile_scratch = 0;
  unsigned n = num_args;
  if (n + 2 > 64) return fail(PROXYATTN_ERROR_INVALID_VALUE, "internal: too many kernel arguments");
  for (unsigned i = 0; i < num_args; ++i) all[i] = args[i];
  if (image.triton) {
    all[n++] = &global_scratch;
    all[n++] = &profile_scratch;
  }
  if (n != image.num_params)
    return fail(PROXYATTN_ERROR_INVALID_VALUE, std::string("internal: kernel ") + image.key + " takes " +
                                                   std::to_string(image.num_params) + " parameters, launcher passed " +
                                                   std::to_string(n));
  std::string what = std::string("cuLaunchKernel(") + image.key + ")";
  return check_cu(g_drv.LaunchKernel(fn, gx, gy, gz, block_threads, 1, 1, shared, stream, all, nullptr),
                  what.c_str());
}

proxyattn_status_t current_sm_count(int *count) {
  CUcontext ctx = nullptr;
  proxyattn_status_t st = current_context(&ctx);
  if (st != PROXYATTN_SUCCESS) return st;
  CUdevice dev = 0;
  if ((st = check_cu(g_drv.CtxGetDevice(&dev), "cuCtxGetDevice")) != PROXYATTN_SUCCESS) return st;
  return check_cu(g_drv.DeviceGetAttribute(count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev),
                  "cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)");
}

proxyattn_status_t memset_d32(CUdeviceptr dst, unsigned value, size_t count, CUstream stream) {
  proxyattn_status_t st = driver_open();
  if (st != PROXYATTN_SUCCESS) return st;
  if (count == 0) return PROXYATTN_SUCCESS;
  return check_cu(g_drv.MemsetD32Async(dst, value, count, stream), "cuMemsetD32Async");
}

}  // namespace proxyattn
