// proxyattn_example: loads q, k, v from .npy files, runs libproxyattn's causal prefill on the GPU and writes the
// output (float32 .npy). Shows the whole C API: config, workspace query, prefill on a stream, error messages.
//
//   proxyattn_example --q q.npy --k k.npy --v v.npy --out out.npy [--dtype bf16|fp16] [--block-size 128]
//                     [--stride 4] [--proxy-heads 1] [--gamma 0.83] [--min-budget-tokens 2048]
//                     [--dense-below-tokens N] [--budget-fraction F] [--budget-rule 0|1|2|3] [--recall-rows N]
//                     [--dense-density F] [--scale S] [--lse lse.npy]
//                     [--warmup 1] [--repeat 0]
//
// q is [B, S, Hq, D], k and v [B, S, Hkv, D], stored as float32 ('<f4'), float16 ('<f2') or bfloat16 bits
// ('<u2'). They are converted to --dtype on the host (exact when the file already holds that type).
// With --repeat N the call is timed N times with CUDA events after --warmup runs; the median is printed.
// The output buffer is poisoned (NaN) before the first run and every element is checked to be written.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "npy.hpp"
#include "proxyattn.h"

using proxyattn::NpyArray;

namespace {

[[noreturn]] void die(const std::string &msg) {
  std::fprintf(stderr, "proxyattn_example: %s\n", msg.c_str());
  std::exit(1);
}

void check_cuda(cudaError_t e, const char *what) {
  if (e != cudaSuccess) die(std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

void check_pa(proxyattn_status_t s, const char *what) {
  if (s != PROXYATTN_SUCCESS)
    die(std::string(what) + ": " + proxyattn_status_name(s) + ": " + proxyattn_last_error());
}

// Elements of `a` as 16-bit values of `dtype` (bf16 or fp16).
std::vector<uint16_t> to_device_type(const NpyArray &a, proxyattn_dtype_t dtype, const char *name) {
  const int64_t n = a.numel();
  std::vector<uint16_t> out(n);
  const bool bf16 = dtype == PROXYATTN_BF16;
  if ((a.descr == "<u2" && bf16) || (a.descr == "<f2" && !bf16)) {
    std::memcpy(out.data(), a.data.data(), n * 2);
    return out;
  }
  for (int64_t i = 0; i < n; ++i) {
    float f;
    if (a.descr == "<f4") {
      std::memcpy(&f, &a.data[i * 4], 4);
    } else if (a.descr == "<f2" || a.descr == "<u2") {
      uint16_t h;
      std::memcpy(&h, &a.data[i * 2], 2);
      f = a.descr == "<f2" ? proxyattn::half_to_float(h) : proxyattn::bf16_to_float(h);
    } else {
      die(std::string(name) + ": dtype " + a.descr + " is not supported; allowed: <f4, <f2, <u2 (bfloat16 bits)");
    }
    if (!std::isfinite(f)) die(std::string(name) + " contains non-finite values (NaN or inf)");
    out[i] = bf16 ? proxyattn::float_to_bf16(f) : proxyattn::float_to_half(f);
  }
  return out;
}

struct Args {
  std::string q, k, v, out, lse;
  std::string dtype = "bf16";
  proxyattn_config_t cfg;
  float scale = 0.0f;
  int warmup = 1, repeat = 0;
};

Args parse(int argc, char **argv) {
  Args a;
  proxyattn_config_default(&a.cfg);
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i];
    if (key == "-h" || key == "--help") {
      std::printf("usage: proxyattn_example --q q.npy --k k.npy --v v.npy --out out.npy [options]\n"
                  "  --dtype bf16|fp16 --block-size N --stride N --proxy-heads N --gamma F\n"
                  "  --min-budget-tokens N --dense-below-tokens N --budget-fraction F --budget-rule 0|1|2|3\n"
                  "  --recall-rows N --dense-density F (0: no dense fallback) --scale F\n"
                  "  --lse lse.npy --warmup N --repeat N\n");
      std::exit(0);
    }
    if (i + 1 >= argc) die("option " + key + " needs a value");
    std::string val = argv[++i];
    if (key == "--q") a.q = val;
    else if (key == "--k") a.k = val;
    else if (key == "--v") a.v = val;
    else if (key == "--out") a.out = val;
    else if (key == "--lse") a.lse = val;
    else if (key == "--dtype") a.dtype = val;
    else if (key == "--block-size") a.cfg.block_size = std::atoi(val.c_str());
    else if (key == "--stride") a.cfg.stride = std::atoi(val.c_str());
    else if (key == "--proxy-heads") a.cfg.proxy_heads = std::atoi(val.c_str());
    else if (key == "--gamma") a.cfg.gamma = std::strtof(val.c_str(), nullptr);
    else if (key == "--min-budget-tokens") a.cfg.min_budget_tokens = std::atoi(val.c_str());
    else if (key == "--dense-below-tokens") a.cfg.dense_below_tokens = std::atoi(val.c_str());
    else if (key == "--budget-fraction") a.cfg.budget_fraction = std::strtof(val.c_str(), nullptr);
    else if (key == "--budget-rule") a.cfg.budget_rule = std::atoi(val.c_str());
    else if (key == "--recall-rows") a.cfg.recall_rows = std::atoi(val.c_str());
    else if (key == "--dense-density") a.cfg.dense_density = std::strtof(val.c_str(), nullptr);
    else if (key == "--scale") a.scale = std::strtof(val.c_str(), nullptr);
    else if (key == "--warmup") a.warmup = std::atoi(val.c_str());
    else if (key == "--repeat") a.repeat = std::atoi(val.c_str());
    else die("unknown option " + key + " (see --help)");
  }
  if (a.q.empty() || a.k.empty() || a.v.empty() || a.out.empty()) die("--q, --k, --v and --out are required");
  if (a.dtype != "bf16" && a.dtype != "fp16") die("--dtype=" + a.dtype + " is not supported; allowed: bf16, fp16");
  return a;
}

NpyArray load(const std::string &path) {
  NpyArray a;
  std::string err;
  if (!proxyattn::npy_load(path, &a, &err)) die(err);
  if (a.shape.size() != 4) die(path + ": expected 4 dims [B, S, H, D]");
  return a;
}

}  // namespace

int main(int argc, char **argv) {
  Args args = parse(argc, argv);
  const proxyattn_dtype_t dtype = args.dtype == "bf16" ? PROXYATTN_BF16 : PROXYATTN_FP16;
  NpyArray q = load(args.q), k = load(args.k), v = load(args.v);
  if (k.shape != v.shape) die("k and v shapes differ");
  if (q.shape[0] != k.shape[0] || q.shape[1] != k.shape[1] || q.shape[3] != k.shape[3])
    die("q [B, S, Hq, D] and k [B, S, Hkv, D] disagree in B, S or D");

  proxyattn_problem_t prob;
  std::memset(&prob, 0, sizeof prob);
  prob.dtype = dtype;
  prob.batch = (int32_t)q.shape[0];
  prob.seq_len = (int32_t)q.shape[1];
  prob.cu_seqlens = nullptr;
  prob.num_q_heads = (int32_t)q.shape[2];
  prob.num_kv_heads = (int32_t)k.shape[2];
  prob.head_dim = (int32_t)q.shape[3];
  prob.scale = args.scale;

  size_t ws_bytes = 0;
  check_pa(proxyattn_workspace_size(&prob, &args.cfg, &ws_bytes), "proxyattn_workspace_size");

  std::vector<uint16_t> hq = to_device_type(q, dtype, "q"), hk = to_device_type(k, dtype, "k"),
                        hv = to_device_type(v, dtype, "v");
  check_cuda(cudaSetDevice(0), "cudaSetDevice");
  void *dq, *dk, *dv, *dout, *dws = nullptr;
  float *dlse = nullptr;
  check_cuda(cudaMalloc(&dq, hq.size() * 2), "cudaMalloc(q)");
  check_cuda(cudaMalloc(&dk, hk.size() * 2), "cudaMalloc(k)");
  check_cuda(cudaMalloc(&dv, hv.size() * 2), "cudaMalloc(v)");
  check_cuda(cudaMalloc(&dout, hq.size() * 2), "cudaMalloc(out)");
  if (ws_bytes) check_cuda(cudaMalloc(&dws, ws_bytes), "cudaMalloc(workspace)");
  const size_t lse_n = (size_t)prob.batch * prob.num_q_heads * prob.seq_len;
  if (!args.lse.empty()) check_cuda(cudaMalloc((void **)&dlse, lse_n * 4), "cudaMalloc(lse)");
  check_cuda(cudaMemcpy(dq, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice), "cudaMemcpy(q)");
  check_cuda(cudaMemcpy(dk, hk.data(), hk.size() * 2, cudaMemcpyHostToDevice), "cudaMemcpy(k)");
  check_cuda(cudaMemcpy(dv, hv.data(), hv.size() * 2, cudaMemcpyHostToDevice), "cudaMemcpy(v)");
  check_cuda(cudaMemset(dout, 0xff, hq.size() * 2), "cudaMemset(out)");  // NaN poison: every element must be written

  cudaStream_t stream;
  check_cuda(cudaStreamCreate(&stream), "cudaStreamCreate");
  auto run = [&]() {
    check_pa(proxyattn_prefill(&prob, &args.cfg, dq, dk, dv, dout, dlse, dws, ws_bytes, stream), "proxyattn_prefill");
  };
  run();
  check_cuda(cudaStreamSynchronize(stream), "first prefill");
  check_cuda(cudaGetLastError(), "first prefill");
  std::vector<uint16_t> hout(hq.size());
  check_cuda(cudaMemcpy(hout.data(), dout, hout.size() * 2, cudaMemcpyDeviceToHost), "cudaMemcpy(out)");

  for (int i = 0; i < args.warmup; ++i) run();
  std::vector<float> times;
  if (args.repeat > 0) {
    cudaEvent_t e0, e1;
    check_cuda(cudaEventCreate(&e0), "cudaEventCreate");
    check_cuda(cudaEventCreate(&e1), "cudaEventCreate");
    for (int i = 0; i < args.repeat; ++i) {
      check_cuda(cudaEventRecord(e0, stream), "cudaEventRecord");
      run();
      check_cuda(cudaEventRecord(e1, stream), "cudaEventRecord");
      check_cuda(cudaEventSynchronize(e1), "cudaEventSynchronize");
      float ms = 0.0f;
      check_cuda(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
      times.push_back(ms);
    }
  }
  check_cuda(cudaStreamSynchronize(stream), "prefill");

  NpyArray out;
  out.descr = "<f4";
  out.shape = q.shape;
  out.data.resize(hout.size() * 4);
  size_t non_finite = 0;
  for (size_t i = 0; i < hout.size(); ++i) {
    float f = dtype == PROXYATTN_BF16 ? proxyattn::bf16_to_float(hout[i]) : proxyattn::half_to_float(hout[i]);
    non_finite += !std::isfinite(f);
    std::memcpy(&out.data[i * 4], &f, 4);
  }
  std::string err;
  if (!proxyattn::npy_save(args.out, out, &err)) die(err);
  if (dlse) {
    NpyArray l;
    l.descr = "<f4";
    l.shape = {prob.batch, prob.num_q_heads, prob.seq_len};
    l.data.resize(lse_n * 4);
    check_cuda(cudaMemcpy(l.data.data(), dlse, lse_n * 4, cudaMemcpyDeviceToHost), "cudaMemcpy(lse)");
    if (!proxyattn::npy_save(args.lse, l, &err)) die(err);
  }
  std::printf("{\"library\": \"%s\", \"shape\": [%d, %d, %d, %d], \"kv_heads\": %d, \"dtype\": \"%s\", "
              "\"workspace_bytes\": %zu, \"non_finite_outputs\": %zu",
              proxyattn_version(), prob.batch, prob.seq_len, prob.num_q_heads, prob.head_dim, prob.num_kv_heads,
              args.dtype.c_str(), ws_bytes, non_finite);
  if (!times.empty()) {
    std::vector<float> sorted = times;
    std::sort(sorted.begin(), sorted.end());
    std::printf(", \"repeat\": %zu, \"median_ms\": %.4f, \"min_ms\": %.4f", times.size(), sorted[sorted.size() / 2],
                sorted.front());
  }
  std::printf("}\n");
  cudaFree(dq);
  cudaFree(dk);
  cudaFree(dv);
  cudaFree(dout);
  if (dws) cudaFree(dws);
  if (dlse) cudaFree(dlse);
  cudaStreamDestroy(stream);
  return non_finite ? 2 : 0;
}
