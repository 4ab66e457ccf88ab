// Bodies of libproxyattn's CUDA C helper kernels, written once for the device (helpers.cu) and the host
// (the host tests run them on the CPU against the PyTorch code they replace).
//
// Every body is a sequence of phases `for (i = tid; i < n; i += nthreads)` separated by PA_SYNC(); each phase
// writes distinct elements, so running it with tid = 0, nthreads = 1 and no barrier (the host) computes the
// same values as a thread block does.
//   budget_row   <- api.head_budgets (reference.head_budgets' sort / cumsum / count given the mass per key
//                   block, rule 0 "mass"; the gather along the last query block's ranking / cumsum / count, rule 1
//                   "recall", and the same per row of the last block with the largest count over the rows, rule 2
//                   "row_recall", estimate_budgets.py::_recall_budgets; reference.fraction_budgets; gamma = 1; the
//                   dense path keeps every block)
//   select_row   <- plan.compact_plan (order, counts)
//   full_plan_row <- the plan that keeps every causal block (dense path through the sparse kernel)
//   early_dense_element <- reference.early_dense_groups (the dense fallback's first decision, from the MASS budgets)
//   needs_budgets_element <- reference.needs_budgets (budget rule 3's reported budget; packed short sequences: Nb_b)
//   dense_fallback_program <- reference.dense_groups + apply_dense_groups (plan.dense_fallback)
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define PA_HD __device__ __forceinline__
#define PA_SYNC() __syncthreads()
#else
#define PA_HD inline
#define PA_SYNC() ((void)0)
#endif

namespace pa_impl {

// Descending stable rank of v[n] among v[0..len): ties go to the lower index first (torch.sort stable).
PA_HD int desc_rank(const float *v, int len, int n) {
  const float x = v[n];
  int r = 0;
  for (int j = 0; j < len; ++j) {
    const float y = v[j];
    r += (y > x) || (y == x && j < n);
  }
  return r;
}

// Log-sum-exp (log2 units) of one budget row from its key chunks' online (max, sum) statistics, like the torch
// ops between the two passes of proxyattn/kernels/estimate_budgets.py: top = max_c m_c,
// total = sum_c l_c * 2^(m_c - top); total > 0 ? top + log2(max(total, 1e-30)) : -inf.
// m, l: the row's statistics, element c at [c * chunk_stride].
PA_HD float combine_lse(const float *m, const float *l, int nchunk, int chunk_stride) {
  float top = m[0];
  for (int c = 1; c < nchunk; ++c) top = m[(long long)c * chunk_stride] > top ? m[(long long)c * chunk_stride] : top;
  float total = 0.0f;
  for (int c = 0; c < nchunk; ++c) total += l[(long long)c * chunk_stride] * exp2f(m[(long long)c * chunk_stride] - top);
  return total > 0.0f ? top + log2f(total > 1e-30f ? total : 1e-30f) : -INFINITY;
}

// Length of sequence b: cu_seqlens[b+1] - cu_seqlens[b] (varlen) or seq_len (padded batch).
PA_HD int seq_length(const int32_t *cu_seqlens, int seq_len, int b) {
  return cu_seqlens ? cu_seqlens[b + 1] - cu_seqlens[b] : seq_len;
}

// Position of key block n in the "recall" ranking of a last query block with nb blocks (reference.last_row_order):
// the forced blocks (0 if sink, nb-1 if diag) first, ordered among themselves by descending score, then every other
// block by descending score; ties go to the lower index. keys[0..nb): the scores of that row.
PA_HD int recall_position(const float *keys, int nb, int n, bool sink, bool diag) {
  const float x = keys[n];
  const int last = nb - 1;
  const bool forced_n = (sink && n == 0) || (diag && n == last);
  const int nforced = (sink && diag && last > 0) ? 2 : ((sink || diag) ? 1 : 0);
  int above = 0;  // forced blocks other than n ranked above n (descending score, ties to the lower index)
  if (sink && n != 0) above += (keys[0] > x) || (keys[0] == x && 0 < n);
  if (diag && n != last) above += (keys[last] > x) || (keys[last] == x && last < n);
  if (forced_n) return above;
  return nforced + desc_rank(keys, nb, n) - above;  // desc_rank counts every block above n, the forced ones too
}

// Number of leading entries of ordered mass whose cumulative sum stays below gamma, plus one: like torch.cumsum of a
// float32 tensor on the CPU (the reference), accumulated in float64, each partial sum rounded to float32, then
// compared with gamma as float32. `at(i)` gives the i-th mass in order; *total gets the rounded full sum.
template <class At>
PA_HD int prefix_needed(At at, int nb, float gamma, float *total) {
  double cum = 0.0;
  int below = 0;
  for (int i = 0; i < nb; ++i) {
    cum += (double)at(i);
    below += ((float)cum < gamma);
  }
  *total = (float)cum;
  return below + 1;
}

// Budget in key blocks of one (batch, head) whose sequence has nb blocks (the sequence's own Nb):
//   dense sequence (length <= dense_below_tokens): nb (every block is kept);
//   budget_fraction > 0: min(nb, max(1, ceil(budget_fraction * nb))) in float64, like reference.fraction_budgets;
//   gamma >= 1: nb;
//   else (reference.head_budgets): mass[n] = sum over the `parts` partial sums mass_parts[p * part_stride + n]
//   (fixed order), put in order -- budget_rule 0: sorted descending; budget_rule 1: in the order of the last query
//   block's ranking (recall_position over score_row[0..nb), the scores of the head's ranking at query block nb-1;
//   read only by rules 1 and 2) -- then the number of leading blocks whose cumulative sum stays below gamma, plus
//   one, at most nb;
//   budget_rule 2: mass_parts holds `rows` rows (row i at mass_parts[i * part_stride], parts must be 1), the mass of
//   every row of the last query block; each row with any mass needs the prefix of the ranking that rule 1 counts on
//   its own mass, the budget is the largest need (rows without mass, past a sequence shorter than one block, need
//   nothing), at most nb.
// Scratch: vals[nb], sorted[nb], and for rule 2 need[rows] ints.
PA_HD void budget_row(const float *mass_parts, int parts, int part_stride, int32_t *budget, int nb, int dense,
                      double budget_fraction, float gamma, int budget_rule, const float *score_row, int keep_sink,
                      int keep_diagonal, int rows, float *vals, float *sorted, int *need, int tid, int nthreads) {
  if (dense || budget_fraction > 0.0 || gamma >= 1.0f) {
    if (tid == 0) {
      int n = nb;
      if (!dense && budget_fraction > 0.0) {
        const double want = budget_fraction * (double)nb;
        long long c = (long long)want;
        if ((double)c < want) ++c;  // ceil
        n = (int)(c < 1 ? 1 : (c > nb ? nb : c));
      }
      *budget = n;
    }
    return;
  }
  if (budget_rule == 2) {
    // sorted (as ints) holds the ranking: inv[i] = the block at position i; then one row per thread.
    int *inv = reinterpret_cast<int *>(sorted);
    for (int n = tid; n < nb; n += nthreads) vals[n] = score_row[n];
    PA_SYNC();
    for (int n = tid; n < nb; n += nthreads) inv[recall_position(vals, nb, n, keep_sink != 0, keep_diagonal != 0)] = n;
    PA_SYNC();
    for (int r = tid; r < rows; r += nthreads) {
      const float *row = mass_parts + (long long)r * part_stride;
      float total;
      const int n = prefix_needed([&](int i) { return row[inv[i]]; }, nb, gamma, &total);
      need[r] = total > 0.0f ? n : 0;
    }
    PA_SYNC();
    if (tid == 0) {
      int most = 0;
      for (int r = 0; r < rows; ++r) most = need[r] > most ? need[r] : most;
      *budget = most < nb ? most : nb;
    }
    return;
  }
  if (budget_rule == 1) {
    // vals holds the ranking's scores; each block's mass goes straight to its position in the ranking.
    for (int n = tid; n < nb; n += nthreads) vals[n] = score_row[n];
    PA_SYNC();
    for (int n = tid; n < nb; n += nthreads) {
      float acc = 0.0f;
      for (int p = 0; p < parts; ++p) acc += mass_parts[(long long)p * part_stride + n];
      sorted[recall_position(vals, nb, n, keep_sink != 0, keep_diagonal != 0)] = acc;
    }
  } else {
    for (int n = tid; n < nb; n += nthreads) {
      float acc = 0.0f;
      for (int p = 0; p < parts; ++p) acc += mass_parts[(long long)p * part_stride + n];
      vals[n] = acc;
    }
    PA_SYNC();
    for (int n = tid; n < nb; n += nthreads) sorted[desc_rank(vals, nb, n)] = vals[n];
  }
  PA_SYNC();
  if (tid == 0) {
    float total;
    const int n = prefix_needed([&](int i) { return sorted[i]; }, nb, gamma, &total);
    *budget = n < nb ? n : nb;
  }
}

// One ranking row (batch b, ranking r, query block m) of the compact plan (proxyattn/plan.py) of a sequence
// with nb blocks, stored in arrays padded to nb_total >= nb blocks:
//   order_row[0..nb_total): the causal key blocks 0..m in keep order (forced blocks, i.e. sink and diagonal,
//   first; then descending score, ties to the lower index), then m+1..nb_total-1;
//   counts of the heads h of this ranking (head_budgets[i] = n_h, counts_col[i * nb_total] = counts[b, h, m]):
//   clamp(ceil(n_h (m+1) / nb), min_blocks, m+1) plus the forced blocks outside those leading entries.
// score_row: scores[b, r, m, :]. Scratch: vals[m+1] floats, rank[m+1] ints.
PA_HD void select_row(const float *score_row, const int32_t *head_budgets, int32_t *order_row, int32_t *counts_col,
                      int heads_per_ranking, int m, int nb, int nb_total, int min_blocks, int keep_sink,
                      int keep_diagonal, float *vals, int *rank, int tid, int nthreads) {
  const int len = m + 1;
  for (int n = tid; n < len; n += nthreads) vals[n] = score_row[n];
  PA_SYNC();
  for (int n = tid; n < len; n += nthreads) rank[n] = desc_rank(vals, len, n);
  PA_SYNC();
  const bool sink = keep_sink != 0;
  const bool diag = keep_diagonal != 0;
  const int rank0 = rank[0], rankm = rank[m];
  // Forced blocks: 0 (sink) and m (diagonal); in row 0 they are the same block.
  const int nforced = (sink && diag && m > 0) ? 2 : ((sink || diag) ? 1 : 0);
  for (int n = tid; n < len; n += nthreads) {
    const bool forced = (sink && n == 0) || (diag && n == m);
    const int rn = rank[n];
    int forced_before = 0;  // forced blocks other than n ranked above n
    if (sink && n != 0 && rank0 < rn) ++forced_before;
    if (diag && n != m && rankm < rn) ++forced_before;
    order_row[forced ? forced_before : nforced + rn - forced_before] = n;
  }
  for (int n = len + tid; n < nb_total; n += nthreads) order_row[n] = n;
  for (int i = tid; i < heads_per_ranking; i += nthreads) {
    const long long nh = head_budgets[i];
    long long k = (nh * (m + 1) + nb - 1) / nb;
    if (k < min_blocks) k = min_blocks;
    if (k > m + 1) k = m + 1;
    int extra = 0;
    if (sink && rank0 >= k) ++extra;
    if (diag && rankm >= k && !(sink && m == 0)) ++extra;
    counts_col[(long long)i * nb_total] = (int32_t)k + extra;
  }
}

// Keep-everything plan row m (dense sequences): order_row[n] = n; counts of the ranking's heads = m + 1.
PA_HD void full_plan_row(int32_t *order_row, int32_t *counts_col, int heads_per_ranking, int m, int nb_total, int tid,
                         int nthreads) {
  for (int n = tid; n < nb_total; n += nthreads) order_row[n] = n;
  for (int i = tid; i < heads_per_ranking; i += nthreads) counts_col[(long long)i * nb_total] = m + 1;
}

// ---------------------------------------------------------------------------------------------- programs
// One thread block of each helper kernel (block indices as arguments), shared by helpers.cu and the host tests.

// pa_budgets program (h, b): mass_parts [B, Hq, parts, nb_total] (budget_rule 2: [B, Hq, block_size, nb_total], the
// mass of every row of the last query block) -> budgets [B, Hq]. budget_rules 1 and 2 also read scores
// [B, R, nb_total, nb_total] (head h reads ranking r = h / (Hq / R)) at the sequence's last query block, row
// nb_b - 1; rule 0 never touches scores (may be NULL). Scratch budgets_scratch_words(nb_total, block_size) words.
PA_HD void budgets_program(int h, int b, int num_q_heads, const float *mass_parts, int32_t *budgets,
                           const int32_t *cu_seqlens, int seq_len, int block_size, int nb_total, int parts, float gamma,
                           double budget_fraction, int dense_below_tokens, const float *scores, int num_rankings,
                           int budget_rule, int keep_sink, int keep_diagonal, float *smem, int tid, int nthreads) {
  const int len = seq_length(cu_seqlens, seq_len, b);
  const int nb = (len + block_size - 1) / block_size;
  const long long row = (long long)b * num_q_heads + h;
  const float *score_row = nullptr;
  if ((budget_rule == 1 || budget_rule == 2) && scores != nullptr && nb > 0) {
    const long long r = h / (num_q_heads / num_rankings);
    score_row = scores + (((long long)b * num_rankings + r) * nb_total + (nb - 1)) * nb_total;
  }
  const int rows = budget_rule == 2 ? block_size : parts;  // rule 2: one part per row (parts is 1)
  budget_row(mass_parts + row * rows * nb_total, budget_rule == 2 ? 1 : parts, nb_total, budgets + row, nb,
             len <= dense_below_tokens, budget_fraction, gamma, budget_rule, score_row, keep_sink, keep_diagonal,
             block_size, smem, smem + nb_total, reinterpret_cast<int *>(smem + 2 * nb_total), tid, nthreads);
}

// Scratch words (4 bytes) of one pa_budgets program: vals and sorted of nb_total each, need of block_size (rule 2).
PA_HD long long budgets_scratch_words(int nb_total, int block_size) { return 2LL * nb_total + block_size; }

// pa_select program (m, r, b): scores [B, R, nb_total, nb_total], budgets [B, Hq] -> order [B, R, nb_total,
// nb_total], counts [B, Hq, nb_total]. Dense sequences get the keep-everything plan; query blocks past a
// sequence's end are left untouched (the attention kernel never reads them). Scratch 2 * nb_total words.
PA_HD void select_program(int m, int r, int b, int num_rankings, const float *scores, const int32_t *budgets,
                          int32_t *order, int32_t *counts, const int32_t *cu_seqlens, int seq_len, int block_size,
                          int nb_total, int num_q_heads, int min_blocks, int keep_sink, int keep_diagonal,
                          int dense_below_tokens, float *smem, int tid, int nthreads) {
  const int len = seq_length(cu_seqlens, seq_len, b);
  const int nb = (len + block_size - 1) / block_size;
  if (m >= nb) return;
  const int rep = num_q_heads / num_rankings;
  const long long row = ((long long)b * num_rankings + r) * nb_total + m;
  const long long head0 = (long long)b * num_q_heads + (long long)r * rep;
  if (len <= dense_below_tokens) {
    full_plan_row(order + row * nb_total, counts + head0 * nb_total + m, rep, m, nb_total, tid, nthreads);
  } else {
    select_row(scores + row * nb_total, budgets + head0, order + row * nb_total, counts + head0 * nb_total + m, rep, m,
               nb, nb_total, min_blocks, keep_sink, keep_diagonal, smem, reinterpret_cast<int *>(smem + nb_total), tid,
               nthreads);
  }
}

// pa_combine_lse element i of [rows, bs]: mstat, lstat [rows, nchunk, bs] -> lse [rows, bs].
PA_HD void combine_lse_element(long long i, const float *mstat, const float *lstat, float *lse, int nchunk, int bs) {
  const long long row = i / bs, r = i % bs;
  const long long off = row * nchunk * bs + r;
  lse[i] = combine_lse(mstat + off, lstat + off, nchunk, bs);
}

// ---------------------------------------------------------------------------------------------- dense fallback
// pa_early_dense element i = b * Hkv + g (reference.early_dense_groups): the KV group's heads' budgets of the paper's
// rule on the last query block (budgets0 [B, Hq], pa_budgets with budget_rule 0 and no dense sequences) sum to at
// least permille / 1000 of group x Nb_b blocks -> flags[i] = 1, else 0. Integer arithmetic. permille 0: 0.
PA_HD void early_dense_element(long long i, const int32_t *budgets0, int32_t *flags, const int32_t *cu_seqlens,
                               int seq_len, int block_size, int num_q_heads, int num_kv_heads, int permille) {
  const int b = (int)(i / num_kv_heads), g = (int)(i % num_kv_heads);
  const int group = num_q_heads / num_kv_heads;
  const long long nb = (seq_length(cu_seqlens, seq_len, b) + block_size - 1) / block_size;
  long long total = 0;
  for (int j = 0; j < group; ++j) total += budgets0[(long long)b * num_q_heads + (long long)g * group + j];
  flags[i] = (permille > 0 && nb > 0 && total * 1000 >= (long long)permille * group * nb) ? 1 : 0;
}

// pa_needs_budgets element i = b * Hq + h (reference.needs_budgets): the need of the sequence's last query block
// (need [B, Hq, nb_total], row nb_b - 1, row 0 for an empty sequence), at least min(min_blocks, nb_b); every block
// (nb_b) for a sequence of at most dense_below_tokens tokens (packed batches) or when `full` (gamma >= 1: need is
// not read).
PA_HD void needs_budgets_element(long long i, const int32_t *need, int32_t *budgets, const int32_t *cu_seqlens,
                                 int seq_len, int block_size, int nb_total, int num_q_heads, int min_blocks,
                                 int dense_below_tokens, int full) {
  const int b = (int)(i / num_q_heads);
  const int len = seq_length(cu_seqlens, seq_len, b);
  const int nb = (len + block_size - 1) / block_size;
  if (full || len <= dense_below_tokens) {
    budgets[i] = nb;
    return;
  }
  const int last = need[i * nb_total + (nb > 0 ? nb - 1 : 0)];
  const int floor_blocks = nb < min_blocks ? nb : min_blocks;
  budgets[i] = last > floor_blocks ? last : floor_blocks;
}

// pa_dense_fallback program (g, b) (plan.dense_fallback: reference.dense_groups | early, then apply_dense_groups):
// the KV group g of sequence b is dense when early[b * Hkv + g] != 0 (early may be NULL: no early decision) or,
// with permille > 0, when its heads keep at least permille / 1000 of their causal blocks (counts [B, Hq, nb_total],
// query blocks m < nb_b summed as int64; group x nb_b (nb_b + 1) / 2 causal blocks); a dense group's heads then keep
// every causal block: counts m + 1 for m < nb_b (query blocks past a packed sequence's end stay untouched).
// Scratch: nthreads long longs (partial sums) + 1 (the decision).
PA_HD void dense_fallback_program(int g, int b, int num_kv_heads, int32_t *counts, const int32_t *early,
                                  const int32_t *cu_seqlens, int seq_len, int block_size, int nb_total,
                                  int num_q_heads, int permille, long long *scratch, int tid, int nthreads) {
  const int group = num_q_heads / num_kv_heads;
  const long long nb = (seq_length(cu_seqlens, seq_len, b) + block_size - 1) / block_size;
  int32_t *base = counts + ((long long)b * num_q_heads + (long long)g * group) * nb_total;
  const long long n = (long long)group * nb;
  long long part = 0;
  for (long long i = tid; i < n; i += nthreads) part += base[(i / nb) * nb_total + i % nb];
  scratch[tid] = part;
  PA_SYNC();
  if (tid == 0) {
    long long kept = 0;
    for (int t = 0; t < nthreads; ++t) kept += scratch[t];
    const long long causal = (long long)group * nb * (nb + 1) / 2;
    const bool late = permille > 0 && causal > 0 && kept * 1000 >= (long long)permille * causal;
    const bool first = early != nullptr && early[(long long)b * num_kv_heads + g] != 0;
    scratch[nthreads] = (late || first) ? 1 : 0;
  }
  PA_SYNC();
  if (scratch[nthreads] != 0)
    for (long long i = tid; i < n; i += nthreads) base[(i / nb) * nb_total + i % nb] = (int32_t)(i % nb) + 1;
}

}  // namespace pa_impl
