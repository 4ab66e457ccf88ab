// libproxyattn's CUDA C helper kernels: the steps the Python GPU path does with torch tensor operations.
// Bodies in helpers_impl.h, shared with the host tests (tests/cpp/test_host_helpers.py runs them on the CPU against
// the torch code they replace). Compiled by nvcc to an sm_90 cubin and loaded through the driver API like the Triton
// kernels. cu_seqlens (device, [B+1]) is NULL for the padded layout, where every sequence has seq_len tokens.
#include "helpers_impl.h"

#define PA_THREADS 256

// mass_parts [B, Hq, parts, nb_total] float32 (budget_rule 2 "row_recall": [B, Hq, block_size, nb_total], per row)
// -> budgets [B, Hq] int32. budget_rules 1 ("recall") and 2 also read scores [B, R, nb_total, nb_total] (the
// sequence's last query block); rule 0 ignores them (may be NULL). Grid (Hq, B); shared
// budgets_scratch_words(nb_total, block_size) * 4 bytes.
extern "C" __global__ void __launch_bounds__(PA_THREADS)
pa_budgets(const float *__restrict__ mass_parts, int32_t *__restrict__ budgets, const int32_t *__restrict__ cu_seqlens,
           int seq_len, int block_size, int nb_total, int parts, float gamma, double budget_fraction,
           int dense_below_tokens, const float *__restrict__ scores, int num_rankings, int budget_rule, int keep_sink,
           int keep_diagonal) {
  extern __shared__ float smem[];
  pa_impl::budgets_program(blockIdx.x, blockIdx.y, gridDim.x, mass_parts, budgets, cu_seqlens, seq_len, block_size,
                           nb_total, parts, gamma, budget_fraction, dense_below_tokens, scores, num_rankings,
                           budget_rule, keep_sink, keep_diagonal, smem, threadIdx.x, blockDim.x);
}

// Compact plan from scores and budgets. Grid (nb_total, R, B); shared 2 * nb_total * 4 bytes.
extern "C" __global__ void __launch_bounds__(PA_THREADS)
pa_select(const float *__restrict__ scores, const int32_t *__restrict__ budgets, int32_t *__restrict__ order,
          int32_t *__restrict__ counts, const int32_t *__restrict__ cu_seqlens, int seq_len, int block_size,
          int nb_total, int num_q_heads, int min_blocks, int keep_sink, int keep_diagonal, int dense_below_tokens) {
  extern __shared__ float smem[];
  pa_impl::select_program(blockIdx.x, blockIdx.y, blockIdx.z, gridDim.y, scores, budgets, order, counts, cu_seqlens,
                          seq_len, block_size, nb_total, num_q_heads, min_blocks, keep_sink, keep_diagonal,
                          dense_below_tokens, smem, threadIdx.x, blockDim.x);
}

// mstat, lstat [rows, nchunk, bs] float32 -> lse [rows, bs] (log2 units). Grid (ceil(rows * bs / 256)).
extern "C" __global__ void __launch_bounds__(PA_THREADS)
pa_combine_lse(const float *__restrict__ mstat, const float *__restrict__ lstat, float *__restrict__ lse, int rows,
               int nchunk, int bs) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < (long long)rows * bs) pa_impl::combine_lse_element(i, mstat, lstat, lse, nchunk, bs);
}

// The dense fallback's first decision: budgets0 [B, Hq] (MASS budgets) -> flags [B * Hkv] int32 0/1.
// Grid (ceil(B * Hkv / 256)).
extern "C" __global__ void __launch_bounds__(PA_THREADS)
pa_early_dense(const int32_t *__restrict__ budgets0, int32_t *__restrict__ flags, const int32_t *__restrict__ cu_seqlens,
               int seq_len, int block_size, int num_q_heads, int num_kv_heads, int batch, int permille) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < (long long)batch * num_kv_heads)
    pa_impl::early_dense_element(i, budgets0, flags, cu_seqlens, seq_len, block_size, num_q_heads, num_kv_heads,
                                 permille);
}

// Budget rule 3's reported budgets: need [B, Hq, nb_total] -> budgets [B, Hq]. Grid (ceil(B * Hq / 256)).
extern "C" __global__ void __launch_bounds__(PA_THREADS)
pa_needs_budgets(const int32_t *__restrict__ need, int32_t *__restrict__ budgets, const int32_t *__restrict__ cu_seqlens,
                 int seq_len, int block_size, int nb_total, int num_q_heads, int batch, int min_blocks,
                 int dense_below_tokens, int full) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < (long long)batch * num_q_heads)
    pa_impl::needs_budgets_element(i, need, budgets, cu_seqlens, seq_len, block_size, nb_total, num_q_heads,
                                   min_blocks, dense_below_tokens, full);
}

// The dense fallback on a plan's counts [B, Hq, nb_total] (in place), early flags [B * Hkv] or NULL.
// Grid (Hkv, B), PA_THREADS threads; static shared memory.
extern "C" __global__ void __launch_bounds__(PA_THREADS)
pa_dense_fallback(int32_t *__restrict__ counts, const int32_t *__restrict__ early, const int32_t *__restrict__ cu_seqlens,
                  int seq_len, int block_size, int nb_total, int num_q_heads, int permille) {
  __shared__ long long scratch[PA_THREADS + 1];
  pa_impl::dense_fallback_program(blockIdx.x, blockIdx.y, gridDim.x, counts, early, cu_seqlens, seq_len, block_size,
                                  nb_total, num_q_heads, permille, scratch, threadIdx.x, blockDim.x);
}
