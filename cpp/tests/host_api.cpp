// Host-side test surface of libproxyattn (built only with PROXYATTN_BUILD_TESTS): the CUDA C helper kernels'
// bodies (src/helpers_impl.h) run over whole grids on the CPU, and the .npy codec of the example program, behind
// a C interface that tests/cpp calls through ctypes and compares with the PyTorch code they replace.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "helpers_impl.h"
#include "npy.hpp"
#include "plugin_logic.h"

#define HOST_API extern "C" __attribute__((visibility("default")))

// pa_select over the grid (nb_total, R, B) with one "thread".
HOST_API void pa_host_select(const float *scores, const int32_t *budgets, int32_t *order, int32_t *counts,
                             const int32_t *cu_seqlens, int batch, int num_rankings, int seq_len, int block_size,
                             int nb_total, int num_q_heads, int min_blocks, int keep_sink, int keep_diagonal,
                             int dense_below_tokens) {
  std::vector<float> smem(2 * (size_t)nb_total);
  for (int b = 0; b < batch; ++b)
    for (int r = 0; r < num_rankings; ++r)
      for (int m = 0; m < nb_total; ++m)
        pa_impl::select_program(m, r, b, num_rankings, scores, budgets, order, counts, cu_seqlens, seq_len, block_size,
                                nb_total, num_q_heads, min_blocks, keep_sink, keep_diagonal, dense_below_tokens,
                                smem.data(), 0, 1);
}

// pa_budgets over the grid (Hq, B). scores [B, R, nb_total, nb_total] (R = num_rankings) are read by budget_rules 1
// and 2; rule 2 reads mass_parts [B, Hq, block_size, nb_total] (the mass of every row of the last query block).
HOST_API void pa_host_budgets(const float *mass_parts, int32_t *budgets, const int32_t *cu_seqlens, int batch,
                              int num_q_heads, int seq_len, int block_size, int nb_total, int parts, float gamma,
                              double budget_fraction, int dense_below_tokens, const float *scores, int num_rankings,
                              int budget_rule, int keep_sink, int keep_diagonal) {
  std::vector<float> smem((size_t)pa_impl::budgets_scratch_words(nb_total, block_size));
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < num_q_heads; ++h)
      pa_impl::budgets_program(h, b, num_q_heads, mass_parts, budgets, cu_seqlens, seq_len, block_size, nb_total,
                               parts, gamma, budget_fraction, dense_below_tokens, scores, num_rankings, budget_rule,
                               keep_sink, keep_diagonal, smem.data(), 0, 1);
}

// pa_combine_lse over all rows * bs elements.
HOST_API void pa_host_combine_lse(const float *mstat, const float *lstat, float *lse, int rows, int nchunk, int bs) {
  for (long long i = 0; i < (long long)rows * bs; ++i) pa_impl::combine_lse_element(i, mstat, lstat, lse, nchunk, bs);
}

// pa_early_dense over every (b, KV group): budgets0 [B, Hq] -> flags [B * Hkv].
HOST_API void pa_host_early_dense(const int32_t *budgets0, int32_t *flags, const int32_t *cu_seqlens, int batch,
                                  int seq_len, int block_size, int num_q_heads, int num_kv_heads, int permille) {
  for (long long i = 0; i < (long long)batch * num_kv_heads; ++i)
    pa_impl::early_dense_element(i, budgets0, flags, cu_seqlens, seq_len, block_size, num_q_heads, num_kv_heads,
                                 permille);
}

// pa_needs_budgets over every (b, h): need [B, Hq, nb_total] -> budgets [B, Hq].
HOST_API void pa_host_needs_budgets(const int32_t *need, int32_t *budgets, const int32_t *cu_seqlens, int batch,
                                    int seq_len, int block_size, int nb_total, int num_q_heads, int min_blocks,
                                    int dense_below_tokens, int full) {
  for (long long i = 0; i < (long long)batch * num_q_heads; ++i)
    pa_impl::needs_budgets_element(i, need, budgets, cu_seqlens, seq_len, block_size, nb_total, num_q_heads, min_blocks,
                                   dense_below_tokens, full);
}

// pa_dense_fallback over the grid (Hkv, B) with one "thread" (tid 0, nthreads 1: scratch of 2 partial words).
HOST_API void pa_host_dense_fallback(int32_t *counts, const int32_t *early, const int32_t *cu_seqlens, int batch,
                                     int num_kv_heads, int seq_len, int block_size, int nb_total, int num_q_heads,
                                     int permille) {
  std::vector<long long> scratch(2);
  for (int b = 0; b < batch; ++b)
    for (int g = 0; g < num_kv_heads; ++g)
      pa_impl::dense_fallback_program(g, b, num_kv_heads, counts, early, cu_seqlens, seq_len, block_size, nb_total,
                                      num_q_heads, permille, scratch.data(), 0, 1);
}

// .npy: load `path` and write its elements converted to float32 into `out` (capacity `cap` elements);
// returns the element count, or -1 with the message in `err` (capacity `err_cap`).
HOST_API long long pa_host_npy_load_f32(const char *path, float *out, long long cap, long long *shape, int *ndim,
                                        char *err, int err_cap) {
  proxyattn::NpyArray a;
  std::string e;
  if (!proxyattn::npy_load(path, &a, &e)) {
    std::strncpy(err, e.c_str(), err_cap - 1);
    err[err_cap - 1] = '\0';
    return -1;
  }
  const long long n = a.numel();
  if (n > cap) {
    std::strncpy(err, "capacity too small", err_cap - 1);
    return -1;
  }
  *ndim = (int)a.shape.size();
  for (size_t i = 0; i < a.shape.size(); ++i) shape[i] = a.shape[i];
  for (long long i = 0; i < n; ++i) {
    if (a.descr == "<f4") {
      std::memcpy(&out[i], &a.data[i * 4], 4);
    } else if (a.descr == "<i4") {
      int32_t v;
      std::memcpy(&v, &a.data[i * 4], 4);
      out[i] = (float)v;
    } else {
      uint16_t v;
      std::memcpy(&v, &a.data[i * 2], 2);
      out[i] = a.descr == "<f2" ? proxyattn::half_to_float(v) : proxyattn::bf16_to_float(v);
    }
  }
  return n;
}

// .npy: write float32 `data` of `shape` to `path` as dtype `descr` ('<f4', '<f2', or '<u2' = bfloat16 bits).
HOST_API int pa_host_npy_save(const char *path, const float *data, const long long *shape, int ndim,
                              const char *descr, char *err, int err_cap) {
  proxyattn::NpyArray a;
  a.descr = descr;
  a.shape.assign(shape, shape + ndim);
  const long long n = a.numel();
  a.data.resize(n * a.item_size());
  for (long long i = 0; i < n; ++i) {
    if (a.descr == "<f4") {
      std::memcpy(&a.data[i * 4], &data[i], 4);
    } else {
      uint16_t v = a.descr == "<f2" ? proxyattn::float_to_half(data[i]) : proxyattn::float_to_bf16(data[i]);
      std::memcpy(&a.data[i * 2], &v, 2);
    }
  }
  std::string e;
  if (!proxyattn::npy_save(path, a, &e)) {
    std::strncpy(err, e.c_str(), err_cap - 1);
    err[err_cap - 1] = '\0';
    return -1;
  }
  return 0;
}

// TensorRT plugin logic (trt/plugin_logic.h): fields given as (name, 0 = INT32 / 1 = FLOAT32, value). An INT32
// field must be given an integral value (as TensorRT's parser delivers ONNX INT attributes): this bridge refuses
// anything else rather than truncating it, so that a test cannot pass a 0.5 that silently becomes 0.
HOST_API int pa_host_parse_fields(const char *const *names, const int *types, const double *values, int n,
                                  proxyattn_config_t *config, float *scale, char *err, int err_cap) {
  std::vector<int32_t> ints(n);
  std::vector<float> floats(n);
  std::vector<pa_trt::Field> fields(n);
  for (int i = 0; i < n; ++i) {
    if (!types[i] && !(values[i] >= INT32_MIN && values[i] <= INT32_MAX && values[i] == std::trunc(values[i]))) {
      std::string e = std::string("test bridge: INT32 field ") + names[i] + " given the non-int32 value " +
                      std::to_string(values[i]) + "; pass it as FLOAT32 (type 1) to test a FLOAT attribute";
      std::strncpy(err, e.c_str(), err_cap - 1);
      err[err_cap - 1] = '\0';
      return -1;
    }
    ints[i] = (int32_t)values[i];
    floats[i] = (float)values[i];
    fields[i] = {names[i], types[i] ? pa_trt::kFloat32 : pa_trt::kInt32,
                 types[i] ? (const void *)&floats[i] : (const void *)&ints[i], 1};
  }
  pa_trt::NodeAttrs attrs;
  std::string e = pa_trt::parse_fields(fields.data(), n, &attrs);
  std::strncpy(err, e.c_str(), err_cap - 1);
  err[err_cap - 1] = '\0';
  if (!e.empty()) return -1;
  *config = attrs.config;
  *scale = attrs.scale;
  return 0;
}

// TensorRT plugin logic: the field names the plugin declares (at most `cap` written); returns their count.
HOST_API int pa_host_field_names(const char **out, int cap) {
  int n = 0;
  const char *const *names = pa_trt::field_names(&n);
  for (int i = 0; i < n && i < cap; ++i) out[i] = names[i];
  return n;
}

HOST_API int pa_host_make_problem(const long long *q, const long long *k, int dtype, proxyattn_problem_t *out,
                                  char *err, int err_cap) {
  int64_t qd[4], kd[4];
  for (int i = 0; i < 4; ++i) {
    qd[i] = q[i];
    kd[i] = k[i];
  }
  std::string e = pa_trt::make_problem(4, qd, 4, kd, (proxyattn_dtype_t)dtype, 0.0f, out);
  std::strncpy(err, e.c_str(), err_cap - 1);
  err[err_cap - 1] = '\0';
  return e.empty() ? 0 : -1;
}
