// libproxyattn: the C entry points. Validation, workspace layout and the launch sequence of
// proxyattn.proxy_attention / proxy_attention_varlen on the GPU path:
//
//   budget pass 0       proxyattn/kernels/estimate_budgets.py::_budget_kernel PASS=0 LOG_MASS (Triton, AOT): the
//                       one sweep over the keys, row statistics and every row's log2 block masses
//   combine lse         pa_combine_lse (CUDA C; estimate_budgets._combine_lse_kernel)
//   masses              estimate_budgets.py::_finish_mass_kernel (mean mass: rules 0/1, the dense fallback's early
//                       decision) and/or ROWS (the mass of every row: rule 2)          (Triton, AOT)
//   early decision      pa_budgets (budget_rule 0, no dense sequences) + pa_early_dense (CUDA C;
//                       api.early_dense_groups / estimate_budgets._early_dense_kernel): KV groups dense from the
//                       start; with budget_rule 3 and no early decision the flags are zeroed (cuMemsetD32Async)
//   pool q, pool k      proxyattn/kernels/estimate_scores.py::_pool_heads_kernel      (Triton, AOT)
//   per chunk of query tiles (the row maxima stay below kRowsScratchBytes, estimate_scores._ROWS_SCRATCH_BYTES),
//   the heaviest chunk first:
//     score rows        proxyattn/kernels/estimate_scores.py::_proxy_rows_kernel      (Triton, AOT): the one sweep
//                       over the keys, each strided row's max logit per key block and its log-sum-exp
//     proxy scores      estimate_scores.py::_scores_from_rows_kernel                  (Triton, AOT)
// budget rules 0-2 and budget_fraction:
//   budgets             pa_budgets (CUDA C; torch sort or last-row ranking / cumsum / count, fraction and dense
//                       budgets; budget_rule 2 counts per row)
//   select              pa_select (CUDA C; proxyattn/plan.py::compact_plan)
// budget rule 3 (proxyattn/kernels/estimate_needs.py::needs_plan):
//   rankings            proxyattn/kernels/estimate_rank.py::_rank_kernel             (Triton, AOT)
//   per chunk of query blocks (the scratch stays below kNeedsScratchBytes, estimate_needs._SCRATCH_BYTES):
//     needs mass        estimate_needs.py::_mass_kernel (SKIP: the early groups)     (Triton, AOT)
//     needs cut         estimate_needs.py::_cut_kernel (SKIP, COUNTS: the plan's counts) (Triton, AOT)
//   budgets             pa_needs_budgets (CUDA C; reference.needs_budgets)
// then:
//   dense fallback      pa_dense_fallback (CUDA C; plan.dense_fallback: the early groups and those whose plan keeps
//                       >= dense_density of their causal blocks keep every causal block)
//   attention           proxyattn/kernels/attention.py::_sparse_attn_fwd_kernel      (Triton, AOT)
//
// The dense path (every sequence of a padded batch <= dense_below_tokens) skips the estimation and runs the
// sparse kernel on the keep-everything plan; dense groups of the fallback run as full rows in the sparse kernel
// (the Python path's eager mode runs cuDNN when every group is dense, which needs a host read the library does not
// make). Nothing here synchronises with the device or allocates.
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstdio>
#include <string>

#include "driver.hpp"
#include "helpers_impl.h"
#include "proxyattn.h"
#include "proxyattn_version.h"

namespace proxyattn {
const KernelImage *find_kernel(const char *key);  // generated: kernel_table.cpp
}

using namespace proxyattn;

namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr int kMaxBlocks = 8192;  // helpers keep 2 * Nb (+ block_size) words in shared memory (64.5 KB)
constexpr int kMaxRankBlocks = PROXYATTN_MAX_BLOCKS_BLOCK_RECALL;  // the ranking kernel sorts a row in registers
constexpr size_t kNeedsScratchBytes = size_t(512) << 20;         // estimate_needs._SCRATCH_BYTES
constexpr int kNeedsQB = 8;                                       // generate_kernels.NEEDS_QB
constexpr int kFinishBlocks = 16;                                 // estimate_budgets._FINISH_BLOCKS
constexpr size_t kRowsScratchBytes = size_t(256) << 20;          // estimate_scores._ROWS_SCRATCH_BYTES
constexpr int kRowsBlockC = 64;                                   // estimate_scores._ROWS_BLOCK_C
constexpr int kHelperThreads = 256;
constexpr size_t kAlign = 256;

struct Resolved {
  proxyattn_dtype_t dtype;
  int B, S, T, Hq, Hkv, D, G;
  bool varlen;
  bool bhsd;  // [B, H, S, D] inputs and output
  const int32_t *cu;
  double scale;
  int bs, stride, min_blocks, keep_sink, keep_diag, dense_below, budget_rule, recall_rows, permille;
  float gamma;
  double fraction;
  int nb;
  bool all_dense;  // padded batch with S <= dense_below: no estimation at all
  bool rule3;      // budget_rule 3 plans the sparse sequences (gamma rule, not all dense)
  bool early;      // the dense fallback's early decision runs (permille > 0, gamma rule with gamma < 1)
  bool rule_mass;  // budget rules 0-2 need the last block's mass (gamma < 1)
  bool need_mass;  // the budget kernel's passes run (rule_mass or early)
  bool mean_mass;  // the mass of each key block (finish kernel without ROWS): rules 0/1 or the early decision
  bool row_mass;   // the mass of every row and key block (finish kernel with ROWS): rule 2
  bool fallback;   // pa_dense_fallback runs (permille > 0, or rule 3 with gamma >= 1: flags mark every group)
  // budget rule 3's needs kernels (estimate_needs._launch_needs): rows per query block RB, query blocks per mass
  // program QB, query blocks per chunk (slots) of the scratch.
  int needs_rb, needs_qb, needs_slots;
  // the one-sweep proxy scores (estimate_scores._launch_scores): query blocks per tile, query tiles per chunk of the
  // row-maxima scratch (estimate_scores.rows_chunk_tiles).
  int scores_qb, scores_tiles;
  bool needs_measure;  // rule3 with gamma < 1: the needs kernels run
};

// Workspace layout (byte offsets, each 256-aligned).
struct Layout {
  size_t pq = 0, pk = 0, scores = 0, rmax = 0, rlse = 0, mstat = 0, lstat = 0, blse = 0, lmass = 0, mass = 0, mass_rows = 0, budgets0 = 0,
         flags = 0, rank = 0, sink = 0, diag = 0, need = 0, nmass = 0, nlse = 0, budgets = 0, order = 0, counts = 0,
         lse = 0, total = 0;
  size_t rows_q = 0, rows_k = 0;
};

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

const char *dtype_name(proxyattn_dtype_t d) { return d == PROXYATTN_BF16 ? "bf16" : "fp16"; }

std::string str(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

proxyattn_status_t validate_config(const proxyattn_config_t *c) {
  if (c == nullptr) return fail(PROXYATTN_ERROR_INVALID_VALUE, "config is NULL (use proxyattn_config_default)");
  if (c->block_size != 64 && c->block_size != 128)
    return fail(PROXYATTN_ERROR_INVALID_VALUE,
                "block_size=" + std::to_string(c->block_size) + " is not supported; allowed: (64, 128)");
  if (c->stride < 1 || c->block_size % c->stride != 0)
    return fail(PROXYATTN_ERROR_INVALID_VALUE, "stride=" + std::to_string(c->stride) +
                                                   " must be a positive divisor of block_size=" +
                                                   std::to_string(c->block_size));
  if (c->proxy_heads < 1)
    return fail(PROXYATTN_ERROR_INVALID_VALUE, "proxy_heads=" + std::to_string(c->proxy_heads) + " must be >= 1");
  if (!(c->gamma > 0.0f && c->gamma <= 1.0f))
    return fail(PROXYATTN_ERROR_INVALID_VALUE, "gamma=" + str(c->gamma) + " must lie in (0, 1]");
  if (c->min_budget_tokens < 0)
    return fail(PROXYATTN_ERROR_INVALID_VALUE,
                "min_budget_tokens=" + std::to_string(c->min_budget_tokens) + " must be >= 0");
  if (c->keep_sink != 0 && c->keep_sink != 1)
    return fail(PROXYATTN_ERROR_INVALID_VALUE, "keep_sink=" + std::to_string(c->keep_sink) + " must be 0 or 1");
  if (c->keep_diagonal != 0 && c->keep_diagonal != 1)
    return fail(PROXYATTN_ERROR_INVALID_VALUE,
                "keep_diagonal=" + std::to_string(c->keep_diagonal) + " must be 0 or 1");
  if (c->dense_below_tokens < -1)
    return fail(PROXYATTN_ERROR_INVALID_VALUE, "dense_below_tokens=" + std::to_string(c->dense_below_tokens) +
                                                   " must be >= 0, or -1 (= max(min_budget_tokens, 32768))");
  if (!(c->budget_fraction == 0.0f || (c->budget_fraction > 0.0f && c->budget_fraction <= 1.0f)))
    return fail(PROXYATTN_ERROR_INVALID_VALUE,
                "budget_fraction=" + str(c->budget_fraction) + " must be 0 (gamma rule) or lie in (0, 1]");
  if (c->budget_rule < PROXYATTN_BUDGET_RULE_MASS || c->budget_rule > PROXYATTN_BUDGET_RULE_BLOCK_RECALL)
    return fail(PROXYATTN_ERROR_INVALID_VALUE, "budget_rule=" + std::to_string(c->budget_rule) +
                                                   " is not supported; allowed: 0 (mass), 1 (recall), 2 (row_recall), "
                                                   "3 (block_recall)");
  if (c->recall_rows < 1 || c->recall_rows > c->block_size || (c->recall_rows & (c->recall_rows - 1)) != 0)
    return fail(PROXYATTN_ERROR_INVALID_VALUE, "recall_rows=" + std::to_string(c->recall_rows) +
                                                   " must be a power of two dividing block_size=" +
                                                   std::to_string(c->block_size) + " (1, 2, 4, ..., " +
                                                   std::to_string(c->block_size) + ")");
  if (!(c->dense_density == 0.0f || (c->dense_density > 0.0f && c->dense_density <= 1.0f)))
    return fail(PROXYATTN_ERROR_INVALID_VALUE, "dense_density=" + str(c->dense_density) +
                                                   " must be 0 (no dense fallback) or lie in (0, 1]");
  return PROXYATTN_SUCCESS;
}

proxyattn_status_t resolve(const proxyattn_problem_t *p, const proxyattn_config_t *c, Resolved *r) {
  proxyattn_status_t st = validate_config(c);
  if (st != PROXYATTN_SUCCESS) return st;
  if (p == nullptr) return fail(PROXYATTN_ERROR_INVALID_VALUE, "problem is NULL");
  if (p->dtype != PROXYATTN_FP16 && p->dtype != PROXYATTN_BF16)
    return fail(PROXYATTN_ERROR_INVALID_VALUE,
                "dtype=" + std::to_string(int(p->dtype)) + " is not supported; allowed: PROXYATTN_FP16, PROXYATTN_BF16");
  if (p->batch < 1)
    return fail(PROXYATTN_ERROR_INVALID_VALUE, "batch=" + std::to_string(p->batch) + " must be >= 1");
  if (p->seq_len < 1)
    return fail(PROXYATTN_ERROR_INVALID_VALUE,
                "seq_len=" + std::to_string(p->seq_len) + " must be >= 1 (S=0: q must hold at least one token)");
  if (p->head_dim != 64 && p->head_dim != 128 && p->head_dim != 256)
    return fail(PROXYATTN_ERROR_INVALID_VALUE,
                "head_dim=" + std::to_string(p->head_dim) + " is not supported; allowed: (64, 128, 256)");
  if (p->num_q_heads < 1 || p->num_kv_heads < 1 || p->num_q_heads % p->num_kv_heads != 0)
    return fail(PROXYATTN_ERROR_INVALID_VALUE, "query heads Hq=" + std::to_string(p->num_q_heads) +
                                                   " must be a positive multiple of KV heads Hkv=" +
                                                   std::to_string(p->num_kv_heads));
  if (p->num_kv_heads % c->proxy_heads != 0)
    return fail(PROXYATTN_ERROR_INVALID_VALUE, "proxy_heads=" + std::to_string(c->proxy_heads) +
                                                   " must divide the number of KV heads Hkv=" +
                                                   std::to_string(p->num_kv_heads));
  if (!(p->scale >= 0.0f) || std::isinf(p->scale))
    return fail(PROXYATTN_ERROR_INVALID_VALUE,
                "scale=" + str(p->scale) + " must be a positive finite number, or 0 for 1/sqrt(D)");
  if (p->layout != PROXYATTN_LAYOUT_BSHD && p->layout != PROXYATTN_LAYOUT_BHSD)
    return fail(PROXYATTN_ERROR_INVALID_VALUE, "layout=" + std::to_string(int(p->layout)) +
                                                   " is not supported; allowed: PROXYATTN_LAYOUT_BSHD (0), "
                                                   "PROXYATTN_LAYOUT_BHSD (1)");
  if (p->layout == PROXYATTN_LAYOUT_BHSD && p->cu_seqlens != nullptr)
    return fail(PROXYATTN_ERROR_INVALID_VALUE,
                "layout=PROXYATTN_LAYOUT_BHSD needs the padded batch (cu_seqlens NULL); packed batches are [T, H, D]");
  r->bhsd = p->layout == PROXYATTN_LAYOUT_BHSD;
  r->dtype = p->dtype;
  r->B = p->batch;
  r->S = p->seq_len;
  r->varlen = p->cu_seqlens != nullptr;
  r->cu = p->cu_seqlens;
  if (r->varlen) {
    if (p->total_tokens < 0 || (int64_t)p->total_tokens > (int64_t)p->batch * p->seq_len)
      return fail(PROXYATTN_ERROR_INVALID_VALUE, "total_tokens=" + std::to_string(p->total_tokens) +
                                                     " must lie in [0, batch * seq_len] = [0, " +
                                                     std::to_string((int64_t)p->batch * p->seq_len) + "]");
    r->T = p->total_tokens;
  } else {
    r->T = 0;
  }
  r->Hq = p->num_q_heads;
  r->Hkv = p->num_kv_heads;
  r->D = p->head_dim;
  r->G = c->proxy_heads;
  r->scale = p->scale > 0.0f ? (double)p->scale : 1.0 / std::sqrt((double)p->head_dim);
  r->bs = c->block_size;
  r->stride = c->stride;
  r->min_blocks = (c->min_budget_tokens + c->block_size - 1) / c->block_size;
  r->keep_sink = c->keep_sink;
  r->keep_diag = c->keep_diagonal;
  r->dense_below = c->dense_below_tokens >= 0 ? c->dense_below_tokens
                                             : std::max<int32_t>(c->min_budget_tokens, PROXYATTN_DENSE_CROSSOVER_TOKENS);
  r->gamma = c->gamma;
  r->fraction = c->budget_fraction;
  r->budget_rule = c->budget_rule;
  r->recall_rows = c->recall_rows;
  // ProxyAttnConfig.dense_density_permille: round half to even (Python's round), at least 1 when on. From the
  // float32 field: equal to Python's value from the float64 one except within 1e-4 of a half-thousandth.
  r->permille = c->dense_density == 0.0f ? 0 : std::max(1, (int)std::nearbyint((double)c->dense_density * 1000.0));
  r->nb = (r->S + r->bs - 1) / r->bs;
  if (r->nb > kMaxBlocks)
    return fail(PROXYATTN_ERROR_INVALID_VALUE, "seq_len=" + std::to_string(r->S) + " gives " + std::to_string(r->nb) +
                                                   " blocks of " + std::to_string(r->bs) + "; at most " +
                                                   std::to_string(kMaxBlocks) + " blocks are supported");
  // Every stride the kernels take as int32 must fit: the largest is a sequence's q/out stride S * Hq * D.
  const int64_t big = (int64_t)r->S * r->Hq * r->D;
  if (big >= (int64_t(1) << 31))
    return fail(PROXYATTN_ERROR_INVALID_VALUE, "seq_len * num_q_heads * head_dim = " + std::to_string(big) +
                                                   " must stay below 2^31 (int32 strides of the compiled kernels)");
  r->all_dense = !r->varlen && r->S <= r->dense_below;
  const bool gamma_rule = !r->all_dense && r->fraction == 0.0;
  r->rule3 = gamma_rule && r->budget_rule == PROXYATTN_BUDGET_RULE_BLOCK_RECALL;
  r->early = gamma_rule && r->permille > 0 && r->gamma < 1.0f;
  r->rule_mass = gamma_rule && !r->rule3 && r->gamma < 1.0f;
  r->need_mass = r->rule_mass || r->early;
  r->row_mass = r->rule_mass && r->budget_rule == PROXYATTN_BUDGET_RULE_ROW_RECALL;
  r->mean_mass = r->early || (r->rule_mass && !r->row_mass);
  r->needs_measure = r->rule3 && r->gamma < 1.0f;
  r->fallback = !r->all_dense && (r->permille > 0 || (r->rule3 && !r->needs_measure));
  if (r->rule3 && r->nb > kMaxRankBlocks)
    return fail(PROXYATTN_ERROR_INVALID_VALUE,
                "seq_len=" + std::to_string(r->S) + " gives " + std::to_string(r->nb) + " blocks of " +
                    std::to_string(r->bs) + "; budget_rule=3 (block_recall) ranks at most " +
                    std::to_string(kMaxRankBlocks) + " blocks per sequence in libproxyattn (the ranking kernel sorts a "
                    "row in registers; the Python path uses torch.sort beyond); allowed: seq_len <= " +
                    std::to_string(kMaxRankBlocks * r->bs) + " with block_size=" + std::to_string(r->bs) +
                    ", or budget_rule 0, 1, 2");
  // estimate_needs._launch_needs: RB rows per query block (heads x rows, a power of two), QB query blocks per mass
  // program (the compiled QB: the Python path's qb for Nb >= 8), chunks of `slots` query blocks whose block masses
  // fit kNeedsScratchBytes.
  {
    const int group = r->Hq / r->Hkv;
    int rb = 1;
    while (rb < group * r->recall_rows) rb *= 2;
    r->needs_rb = rb;
    r->needs_qb = std::max(kNeedsQB, (16 + rb - 1) / rb);
    const size_t per_slot = (size_t)r->B * r->Hkv * r->nb * rb * 4;
    const int qb = r->needs_qb;
    size_t slots = std::max((size_t)qb, (kNeedsScratchBytes / per_slot) / qb * qb);
    slots = std::min(slots, (size_t)((r->nb + qb - 1) / qb) * qb);
    r->needs_slots = (int)slots;
  }
  // estimate_scores._launch_scores / rows_chunk_tiles: 64 strided rows per tile; as many tiles per chunk as keep the
  // row maxima [B * G, Nb, tiles x 64] float32 within kRowsScratchBytes (at least one, at most all).
  {
    const int rpb = r->bs / r->stride;
    r->scores_qb = std::max(1, 64 / rpb);
    const size_t n_tiles = (size_t)(r->nb + r->scores_qb - 1) / r->scores_qb;
    const size_t per_tile = (size_t)r->B * r->G * r->nb * r->scores_qb * rpb * 4;
    r->scores_tiles = (int)std::max((size_t)1, std::min(n_tiles, kRowsScratchBytes / per_tile));
  }
  return PROXYATTN_SUCCESS;
}

Layout layout_of(const Resolved &r) {
  Layout L;
  const size_t B = r.B, S = r.S, Hq = r.Hq, D = r.D, G = r.G, nb = r.nb, bs = r.bs;
  const size_t tokens = r.varlen ? (size_t)r.T : B * S;  // pooled rows as the Python path sizes them
  L.rows_q = tokens / r.stride + B;
  L.rows_k = tokens + B;
  size_t off = 0;
  auto take = [&](size_t bytes) {
    size_t at = off;
    off = align_up(off + bytes);
    return at;
  };
  if (!r.all_dense) {
    L.pq = take(G * L.rows_q * D * 2);  // float16
    L.pk = take(G * L.rows_k * D * 2);
    L.scores = take(B * G * nb * nb * 4);
    const size_t chunk_rows = (size_t)r.scores_tiles * r.scores_qb * (r.bs / r.stride);
    L.rmax = take(B * G * nb * chunk_rows * 4);  // [B * G, nb, chunk_rows]: each strided row's max logit per key block
    L.rlse = take(B * G * chunk_rows * 4);
    if (r.need_mass) {
      L.mstat = take(B * Hq * nb * bs * 4);  // chunks <= nb
      L.lstat = take(B * Hq * nb * bs * 4);
      L.blse = take(B * Hq * bs * 4);
      L.lmass = take(B * Hq * nb * bs * 4);  // pass 0's log2 block masses of every row [B * Hq, nb, bs]
      if (r.mean_mass) L.mass = take(B * Hq * nb * 4);
      if (r.row_mass) L.mass_rows = take(B * Hq * bs * nb * 4);  // rule 2: the mass of every row
    }
    if (r.early) L.budgets0 = take(B * Hq * 4);         // the MASS budgets of the early decision
    if (r.early || r.rule3) L.flags = take(B * r.Hkv * 4);  // early groups (the needs kernels' skip flags)
    if (r.rule3) {
      L.rank = take(B * G * nb * nb * 4);  // the ranking kernel's inverse permutation (not read by the library)
      L.sink = take(B * G * nb * 4);
      L.diag = take(B * G * nb * 4);
      L.need = take(B * Hq * nb * 4);
      if (r.needs_measure) {
        const size_t rows = (size_t)B * r.Hkv * r.needs_slots * r.needs_rb;
        L.nmass = take(rows * nb * 4);  // [B * Hkv, slots, Nb, RB]
        L.nlse = take(rows * 4);        // [B * Hkv, slots, RB]
      }
    }
  }
  L.budgets = take(B * Hq * 4);
  L.order = take(B * G * nb * nb * 4);
  L.counts = take(B * Hq * nb * 4);
  L.lse = take(B * Hq * S * 4);  // used when the caller passes no lse
  L.total = off;
  return L;
}

proxyattn_status_t need(const std::string &key, const KernelImage **img) {
  *img = find_kernel(key.c_str());
  if (*img == nullptr)
    return fail(PROXYATTN_ERROR_NOT_COMPILED, "no kernel '" + key +
                                                  "' was compiled into this libproxyattn (see cpp/tools/"
                                                  "generate_kernels.py for the compiled variants)");
  return PROXYATTN_SUCCESS;
}

bool misaligned(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) != 0; }

#define PA_TRY(expr)                                       \
  do {                                                     \
    proxyattn_status_t _st = (expr);                       \
    if (_st != PROXYATTN_SUCCESS) return _st;              \
  } while (0)

struct Kernels {
  const KernelImage *pool_q = nullptr, *pool_k = nullptr, *scores_rows = nullptr, *scores = nullptr, *budget0 = nullptr, *finish = nullptr;
  const KernelImage *finish_rows = nullptr, *combine = nullptr, *budgets = nullptr, *select = nullptr, *attn = nullptr;
  const KernelImage *early_dense = nullptr, *rank = nullptr, *needs_mass = nullptr, *needs_cut = nullptr;
  const KernelImage *needs_budgets = nullptr, *dense_fallback = nullptr;
};

// BLOCK of the ranking kernel for nb blocks (estimate_rank._launch_rank): max(16, next_pow2(nb)).
int rank_block(int nb) {
  int b = 16;
  while (b < nb) b *= 2;
  return b;
}

proxyattn_status_t find_kernels(const Resolved &r, bool with_attention, Kernels *k) {
  char buf[128];
  const int v = r.varlen ? 1 : 0;
  const char *dt = dtype_name(r.dtype);
  if (!r.all_dense) {
    std::snprintf(buf, sizeof buf, "pool/%s/d%d/step%d/varlen%d", dt, r.D, r.stride, v);
    if (need(buf, &k->pool_q) != PROXYATTN_SUCCESS)
      return fail(PROXYATTN_ERROR_NOT_COMPILED, "stride=" + std::to_string(r.stride) + " (with " + dt + ", head_dim=" +
                                                    std::to_string(r.D) + ") has no compiled kernel '" + buf +
                                                    "'; the compiled strides are listed in STRIDES of "
                                                    "cpp/tools/generate_kernels.py");
    std::snprintf(buf, sizeof buf, "pool/%s/d%d/step1/varlen%d", dt, r.D, v);
    PA_TRY(need(buf, &k->pool_k));
    std::snprintf(buf, sizeof buf, "scores_rows/d%d/bs%d/stride%d/varlen%d", r.D, r.bs, r.stride, v);
    PA_TRY(need(buf, &k->scores_rows));
    std::snprintf(buf, sizeof buf, "scores_finish/bs%d/stride%d/varlen%d", r.bs, r.stride, v);
    PA_TRY(need(buf, &k->scores));
    if (r.need_mass) {
      std::snprintf(buf, sizeof buf, "budget/%s/d%d/bs%d/varlen%d/pass0", dt, r.D, r.bs, v);
      PA_TRY(need(buf, &k->budget0));
      if (r.mean_mass) {
        std::snprintf(buf, sizeof buf, "finish/bs%d/varlen%d/rows0", r.bs, v);
        PA_TRY(need(buf, &k->finish));
      }
      if (r.row_mass) {
        std::snprintf(buf, sizeof buf, "finish/bs%d/varlen%d/rows1", r.bs, v);
        PA_TRY(need(buf, &k->finish_rows));
      }
      PA_TRY(need("helper/combine_lse", &k->combine));
    }
    if (r.early) PA_TRY(need("helper/early_dense", &k->early_dense));
    if (r.rule3) {
      std::snprintf(buf, sizeof buf, "rank/block%d", rank_block(r.nb));
      PA_TRY(need(buf, &k->rank));
      PA_TRY(need("helper/needs_budgets", &k->needs_budgets));
    }
    if (r.needs_measure) {
      std::snprintf(buf, sizeof buf, "needs_mass/%s/d%d/bs%d/rows%d/rb%d/varlen%d", dt, r.D, r.bs, r.recall_rows,
                    r.needs_rb, v);
      if (need(buf, &k->needs_mass) != PROXYATTN_SUCCESS)
        return fail(PROXYATTN_ERROR_NOT_COMPILED,
                    "budget_rule=3 with recall_rows=" + std::to_string(r.recall_rows) + " and " +
                        std::to_string(r.Hq / r.Hkv) + " query heads per KV head (" + dt + ", head_dim=" +
                        std::to_string(r.D) + ", block_size=" + std::to_string(r.bs) + ") has no compiled kernel '" +
                        buf + "'; the compiled recall_rows and the largest group are ROWS and MAX_NEEDS_GROUP in "
                        "cpp/tools/generate_kernels.py");
      std::snprintf(buf, sizeof buf, "needs_cut/bs%d/rows%d/rb%d/varlen%d", r.bs, r.recall_rows, r.needs_rb, v);
      PA_TRY(need(buf, &k->needs_cut));
    }
  }
  if (!r.rule3) {
    PA_TRY(need("helper/budgets", &k->budgets));
    PA_TRY(need("helper/select", &k->select));
  }
  if (r.early) PA_TRY(need("helper/budgets", &k->budgets));
  if (r.fallback) PA_TRY(need("helper/dense_fallback", &k->dense_fallback));
  if (with_attention) {
    std::snprintf(buf, sizeof buf, "attn/%s/d%d/bs%d/varlen%d", dt, r.D, r.bs, v);
    PA_TRY(need(buf, &k->attn));
  }
  return PROXYATTN_SUCCESS;
}

unsigned threads_of(const KernelImage &img) { return img.num_warps ? img.num_warps * 32u : kHelperThreads; }

// Element strides (batch, token, head) of a [B, S, H, D], [B, H, S, D] or [T, H, D] (varlen) tensor.
struct Strides {
  int b, t, h;
};
Strides strides_of(const Resolved &r, int heads) {
  Strides s;
  if (r.bhsd) {
    s.t = r.D;
    s.h = r.S * r.D;
  } else {
    s.h = r.D;
    s.t = heads * r.D;
  }
  s.b = r.varlen ? 0 : r.S * heads * r.D;
  return s;
}

unsigned helper_grid(size_t n) { return (unsigned)((n + kHelperThreads - 1) / kHelperThreads); }

// Plan into (order, counts, budgets); everything on `stream`.
proxyattn_status_t run_plan(const Resolved &r, const Layout &L, const Kernels &K, const void *q, const void *k,
                            int32_t *order, int32_t *counts, int32_t *budgets, char *ws, CUstream stream) {
  CUdeviceptr qp = (CUdeviceptr)q, kp = (CUdeviceptr)k;
  // Triton kernels read cu_seqlens only when compiled with VARLEN: any valid aligned pointer otherwise. The CUDA C
  // helpers tell the layouts apart by cu_seqlens == NULL, so they get NULL for a padded batch.
  CUdeviceptr cu = r.varlen ? (CUdeviceptr)r.cu : (CUdeviceptr)(ws + L.budgets);
  CUdeviceptr cu_helpers = r.varlen ? (CUdeviceptr)r.cu : (CUdeviceptr)0;
  int seq_len = r.S, nb = r.nb, Hq = r.Hq, Hkv = r.Hkv, G = r.G, B = r.B;
  float qk_scale = (float)(r.scale * kLog2e);
  CUdeviceptr bud = (CUdeviceptr)budgets, ord = (CUdeviceptr)order, cnt = (CUdeviceptr)counts;
  CUdeviceptr mass = (CUdeviceptr)(ws + L.mass), mass_rows = (CUdeviceptr)(ws + L.mass_rows);
  CUdeviceptr flags = (CUdeviceptr)(ws + L.flags);
  CUdeviceptr sc = r.all_dense ? (CUdeviceptr)0 : (CUdeviceptr)(ws + L.scores);
  if (r.need_mass) {
    // 1. attention mass per key block of each head's last query block [B, Hq, nb] (rules 0/1, the early decision);
    //    rule 2: of every row of that block, [B, Hq, bs, nb]. One sweep over the keys (pass 0: row statistics and
    //    every row's log2 block masses), the rows' log-sum-exp, then the finish kernel(s): pass 0 and the combine
    //    serve both masses.
    int sms = 0;
    PA_TRY(current_sm_count(&sms));
    const int bh = r.B * r.Hq;
    int chunks = std::max(1, std::min(nb, (4 * sms + std::max(1, bh) - 1) / std::max(1, bh)));
    int cb = (nb + chunks - 1) / chunks;
    int nchunk = (nb + cb - 1) / cb;
    CUdeviceptr ms = (CUdeviceptr)(ws + L.mstat), ls = (CUdeviceptr)(ws + L.lstat), bl = (CUdeviceptr)(ws + L.blse);
    Strides sq = strides_of(r, r.Hq), sk = strides_of(r, r.Hkv);
    int group = r.Hq / r.Hkv;
    CUdeviceptr lm = (CUdeviceptr)(ws + L.lmass);
    void *args[] = {&qp, &kp, &cu, &ms, &ls, &bl, &lm, &seq_len, &nb, &Hq, &qk_scale,
                    &sq.b, &sq.t, &sq.h, &sk.b, &sk.t, &sk.h, &group, &nchunk, &cb};
    PA_TRY(launch(*K.budget0, (unsigned)bh, (unsigned)nchunk, 1, threads_of(*K.budget0), K.budget0->shared_bytes,
                  args, 20, stream));
    int rows = bh, bsz = r.bs;
    void *cargs[] = {&ms, &ls, &bl, &rows, &nchunk, &bsz};
    PA_TRY(launch(*K.combine, helper_grid((size_t)bh * r.bs), 1, 1, kHelperThreads, 0, cargs, 6, stream));
    const unsigned fgrid = (unsigned)((nb + kFinishBlocks - 1) / kFinishBlocks);
    for (int rows_mode = 0; rows_mode < 2; ++rows_mode) {
      if (!(rows_mode ? r.row_mass : r.mean_mass)) continue;
      const KernelImage &fin = rows_mode ? *K.finish_rows : *K.finish;
      CUdeviceptr out = rows_mode ? mass_rows : mass;
      void *fargs[] = {&lm, &bl, &out, &cu, &seq_len, &nb, &Hq};
      PA_TRY(launch(fin, (unsigned)bh, fgrid, 1, threads_of(fin), fin.shared_bytes, fargs, 7, stream));
    }
  }
  if (r.early) {
    // 2. the dense fallback's early decision: MASS budgets of the last query block (every sequence measured: no
    //    dense sequences), then per KV group their sum against permille of group x Nb_b.
    int bs = r.bs, parts = 1, dense = -1, rule = PROXYATTN_BUDGET_RULE_MASS, sink = r.keep_sink, diag = r.keep_diag;
    float gamma = r.gamma;
    double fraction = 0.0;
    CUdeviceptr b0 = (CUdeviceptr)(ws + L.budgets0), no_scores = 0;
    void *args[] = {&mass, &b0, &cu_helpers, &seq_len, &bs, &nb, &parts, &gamma, &fraction, &dense,
                    &no_scores, &G, &rule, &sink, &diag};
    const unsigned smem = (unsigned)(pa_impl::budgets_scratch_words(nb, bs) * 4);
    PA_TRY(launch(*K.budgets, (unsigned)r.Hq, (unsigned)r.B, 1, kHelperThreads, smem, args, 15, stream));
    int permille = r.permille;
    void *eargs[] = {&b0, &flags, &cu_helpers, &seq_len, &bs, &Hq, &Hkv, &B, &permille};
    PA_TRY(launch(*K.early_dense, helper_grid((size_t)r.B * r.Hkv), 1, 1, kHelperThreads, 0, eargs, 9, stream));
  } else if (r.rule3) {
    // No early decision: no group is skipped (gamma >= 1: every group keeps every block, as the Python path's
    // full needs).
    PA_TRY(memset_d32(flags, r.gamma >= 1.0f ? 1u : 0u, (size_t)r.B * r.Hkv, stream));
  }
  CUdeviceptr pq = (CUdeviceptr)(ws + L.pq), pk = (CUdeviceptr)(ws + L.pk);
  if (!r.all_dense) {
    // 3. pooled proxies (float16): pq [G, rows_q, D] on strided query rows, pk [G, rows_k, D].
    for (int which = 0; which < 2; ++which) {
      const KernelImage &img = which == 0 ? *K.pool_q : *K.pool_k;
      const int heads = which == 0 ? r.Hq : r.Hkv;
      const int step = which == 0 ? r.stride : 1;
      const size_t rows = which == 0 ? L.rows_q : L.rows_k;
      CUdeviceptr x = which == 0 ? qp : kp, out = which == 0 ? pq : pk;
      Strides s = strides_of(r, heads);
      int sog = (int)(rows * r.D), sor = r.D, hpg = heads / G;
      const int block_d = r.D;  // D is a power of two
      const int block_t = std::max(1, std::min(64, 8192 / block_d));
      const unsigned gx = (unsigned)(((r.S + step - 1) / step + block_t - 1) / block_t);
      void *args[] = {&x, &out, &cu, &seq_len, &s.b, &s.t, &s.h, &sog, &sor, &hpg};
      PA_TRY(launch(img, gx, (unsigned)r.B, (unsigned)G, threads_of(img), img.shared_bytes, args, 10, stream));
    }
    // 4. proxy block scores [B, G, nb, nb]: per chunk of query tiles, the heaviest first, the one sweep over the
    //    keys (row maxima and log-sum-exps) then the scores of the chunk's query blocks.
    {
      const int rpb = r.bs / r.stride, qb = r.scores_qb, tiles = r.scores_tiles;
      const int n_tiles = (nb + qb - 1) / qb;
      int chunk_rows = tiles * qb * rpb;
      int spqg = (int)(L.rows_q * r.D), spqr = r.D, spkg = (int)(L.rows_k * r.D), spkr = r.D;
      int sob = G * nb * nb, sog = nb * nb, som = nb;
      CUdeviceptr rm = (CUdeviceptr)(ws + L.rmax), rl = (CUdeviceptr)(ws + L.rlse);
      for (int tile_lo = (n_tiles - 1) / tiles * tiles; tile_lo >= 0; tile_lo -= tiles) {
        const int n_chunk = std::min(tiles, n_tiles - tile_lo);
        int lo = tile_lo, m_lo = tile_lo * qb;
        void *args[] = {&pq,   &pk,   &cu,   &rm,   &rl,   &seq_len, &nb,        &G,
                        &qk_scale, &spqg, &spqr, &spkg, &spkr, &lo,      &chunk_rows};
        PA_TRY(launch(*K.scores_rows, (unsigned)n_chunk, (unsigned)(r.B * G), 1, threads_of(*K.scores_rows),
                      K.scores_rows->shared_bytes, args, 15, stream));
        void *fargs[] = {&rm, &rl, &cu, &sc, &seq_len, &nb, &G, &sob, &sog, &som, &m_lo, &chunk_rows};
        PA_TRY(launch(*K.scores, (unsigned)std::min(n_chunk * qb, nb - m_lo), (unsigned)(r.B * G),
                      (unsigned)((nb + kRowsBlockC - 1) / kRowsBlockC), threads_of(*K.scores), K.scores->shared_bytes,
                      fargs, 12, stream));
      }
    }
  }
  if (r.rule3) {
    // 5 (rule 3). rankings: order [B, G, nb, nb], its inverse, and the score ranks of block 0 / block m per row.
    CUdeviceptr rk = (CUdeviceptr)(ws + L.rank), sr = (CUdeviceptr)(ws + L.sink), dr = (CUdeviceptr)(ws + L.diag);
    uint8_t ks = (uint8_t)r.keep_sink, kd = (uint8_t)r.keep_diag;  // i1 parameters: one byte
    void *rargs[] = {&sc, &ord, &rk, &sr, &dr, &nb, &ks, &kd};
    PA_TRY(launch(*K.rank, (unsigned)((size_t)r.B * G * nb), 1, 1, threads_of(*K.rank), K.rank->shared_bytes, rargs, 8,
                  stream));
    CUdeviceptr nd = (CUdeviceptr)(ws + L.need);
    if (r.needs_measure) {
      // 6 (rule 3). needs and the plan's counts, per chunk of `slots` query blocks (estimate_needs._launch_needs).
      CUdeviceptr nm = (CUdeviceptr)(ws + L.nmass), nl = (CUdeviceptr)(ws + L.nlse);
      Strides sq = strides_of(r, r.Hq), sk = strides_of(r, r.Hkv);
      int group = r.Hq / r.Hkv, slots = r.needs_slots, kv_per_rank = r.Hkv / G, minb = r.min_blocks;
      int dense_below = r.varlen ? r.dense_below : -1, sink = r.keep_sink, diag = r.keep_diag;
      float gamma = r.gamma;
      for (int m_lo = 0; m_lo < nb; m_lo += slots) {
        const int n_slots = std::min(slots, nb - m_lo);
        void *margs[] = {&qp,   &kp,   &cu,   &flags, &nm,   &nl,   &seq_len, &nb,  &Hkv,   &m_lo,
                         &slots, &qk_scale, &sq.b, &sq.t, &sq.h, &sk.b, &sk.t,    &sk.h, &group};
        PA_TRY(launch(*K.needs_mass, (unsigned)(r.B * r.Hkv), (unsigned)((n_slots + r.needs_qb - 1) / r.needs_qb), 1,
                      threads_of(*K.needs_mass), K.needs_mass->shared_bytes, margs, 19, stream));
        void *cargs[] = {&nm,   &nl,   &ord,   &sr,    &dr,    &cu,    &flags, &nd,          &cnt,   &seq_len, &nb,
                         &Hkv,  &kv_per_rank, &m_lo, &slots, &gamma, &minb,  &dense_below, &group, &sink,    &diag};
        PA_TRY(launch(*K.needs_cut, (unsigned)(r.B * r.Hkv), (unsigned)n_slots, 1, threads_of(*K.needs_cut),
                      K.needs_cut->shared_bytes, cargs, 21, stream));
      }
    }
    // 7 (rule 3). reported budgets: the last query block's need (reference.needs_budgets); gamma >= 1: Nb_b.
    int bs = r.bs, minb = r.min_blocks, dense = r.dense_below, full = r.needs_measure ? 0 : 1;
    void *args[] = {&nd, &bud, &cu_helpers, &seq_len, &bs, &nb, &Hq, &B, &minb, &dense, &full};
    PA_TRY(launch(*K.needs_budgets, helper_grid((size_t)r.B * r.Hq), 1, 1, kHelperThreads, 0, args, 11, stream));
  } else {
    // 5. budgets [B, Hq] (gamma rule from the mass, rules 1/2 also from the last query block's scores; fraction;
    //    gamma = 1; dense sequences keep everything). The scores exist whenever the mass does.
    {
      int bs = r.bs, parts = 1, dense = r.dense_below, rule = r.budget_rule, sink = r.keep_sink, diag = r.keep_diag;
      float gamma = r.gamma;
      double fraction = r.fraction;
      CUdeviceptr m = r.row_mass ? mass_rows : mass;  // read only by the gamma rule with gamma < 1
      void *args[] = {&m, &bud, &cu_helpers, &seq_len, &bs, &nb, &parts, &gamma, &fraction, &dense,
                      &sc, &G,   &rule,       &sink,    &diag};
      const unsigned smem = r.rule_mass ? (unsigned)(pa_impl::budgets_scratch_words(nb, bs) * 4) : 0u;
      PA_TRY(launch(*K.budgets, (unsigned)r.Hq, (unsigned)r.B, 1, kHelperThreads, smem, args, 15, stream));
    }
    // 6. selection into the compact plan.
    {
      CUdeviceptr ssc = (CUdeviceptr)(ws + (r.all_dense ? L.budgets : L.scores));
      int bs = r.bs, minb = r.min_blocks, sink = r.keep_sink, diag = r.keep_diag, dense = r.dense_below;
      void *args[] = {&ssc, &bud, &ord, &cnt, &cu_helpers, &seq_len, &bs, &nb, &Hq, &minb, &sink, &diag, &dense};
      PA_TRY(launch(*K.select, (unsigned)nb, (unsigned)G, (unsigned)r.B, kHelperThreads, (unsigned)(2 * nb * 4), args,
                    13, stream));
    }
  }
  if (r.fallback) {
    // 8. the dense fallback: early groups and groups whose plan keeps >= permille of their causal blocks keep them all.
    CUdeviceptr early = (r.early || r.rule3) ? flags : (CUdeviceptr)0;
    int bs = r.bs, permille = r.permille;
    void *args[] = {&cnt, &early, &cu_helpers, &seq_len, &bs, &nb, &Hq, &permille};
    PA_TRY(launch(*K.dense_fallback, (unsigned)r.Hkv, (unsigned)r.B, 1, kHelperThreads, 0, args, 8, stream));
  }
  return PROXYATTN_SUCCESS;
}


proxyattn_status_t check_common(const Resolved &r, const Layout &L, void *workspace, size_t workspace_bytes,
                                std::initializer_list<std::pair<const char *, const void *>> ptrs) {
  for (auto &p : ptrs) {
    if (p.second == nullptr) return fail(PROXYATTN_ERROR_INVALID_VALUE, std::string(p.first) + " is NULL");
    if (misaligned(p.second))
      return fail(PROXYATTN_ERROR_MISALIGNED, std::string(p.first) + " is not 16-byte aligned");
  }
  if (r.varlen && misaligned(r.cu)) return fail(PROXYATTN_ERROR_MISALIGNED, "cu_seqlens is not 16-byte aligned");
  if (workspace_bytes < L.total)
    return fail(PROXYATTN_ERROR_WORKSPACE_TOO_SMALL, "workspace_bytes=" + std::to_string(workspace_bytes) +
                                                         " is smaller than proxyattn_workspace_size()=" +
                                                         std::to_string(L.total));
  if (L.total > 0 && workspace == nullptr) return fail(PROXYATTN_ERROR_INVALID_VALUE, "workspace is NULL");
  if (misaligned(workspace)) return fail(PROXYATTN_ERROR_MISALIGNED, "workspace is not 16-byte aligned");
  return PROXYATTN_SUCCESS;
}

}  // namespace

extern "C" {

void proxyattn_config_default(proxyattn_config_t *c) {
  if (c == nullptr) return;
  c->block_size = 128;
  c->stride = 4;
  c->proxy_heads = 1;
  c->gamma = 0.83f;
  c->min_budget_tokens = 2048;
  c->keep_sink = 1;
  c->keep_diagonal = 1;
  c->dense_below_tokens = -1;
  c->budget_fraction = 0.0f;
  c->budget_rule = PROXYATTN_BUDGET_RULE_BLOCK_RECALL;
  c->recall_rows = 4;
  c->dense_density = 0.8f;
}

proxyattn_status_t proxyattn_config_validate(const proxyattn_config_t *config) {
  clear_error();
  return validate_config(config);
}

proxyattn_status_t proxyattn_workspace_size(const proxyattn_problem_t *problem, const proxyattn_config_t *config,
                                            size_t *bytes) {
  clear_error();
  if (bytes == nullptr) return fail(PROXYATTN_ERROR_INVALID_VALUE, "bytes is NULL");
  Resolved r;
  PA_TRY(resolve(problem, config, &r));
  *bytes = layout_of(r).total;
  return PROXYATTN_SUCCESS;
}

proxyattn_status_t proxyattn_plan(const proxyattn_problem_t *problem, const proxyattn_config_t *config, const void *q,
                                  const void *k, int32_t *order, int32_t *counts, int32_t *budgets, void *workspace,
                                  size_t workspace_bytes, proxyattn_stream_t stream) {
  clear_error();
  Resolved r;
  PA_TRY(resolve(problem, config, &r));
  Layout L = layout_of(r);
  PA_TRY(check_common(r, L, workspace, workspace_bytes, {{"q", q}, {"k", k}, {"order", order}, {"counts", counts}}));
  if (budgets != nullptr && misaligned(budgets))
    return fail(PROXYATTN_ERROR_MISALIGNED, "budgets is not 16-byte aligned");
  Kernels K;
  PA_TRY(find_kernels(r, false, &K));
  char *ws = static_cast<char *>(workspace);
  int32_t *bud = budgets != nullptr ? budgets : reinterpret_cast<int32_t *>(ws + L.budgets);
  return run_plan(r, L, K, q, k, order, counts, bud, ws, reinterpret_cast<CUstream>(stream));
}

proxyattn_status_t proxyattn_prefill(const proxyattn_problem_t *problem, const proxyattn_config_t *config,
                                     const void *q, const void *k, const void *v, void *out, float *lse,
                                     void *workspace, size_t workspace_bytes, proxyattn_stream_t stream) {
  clear_error();
  Resolved r;
  PA_TRY(resolve(problem, config, &r));
  Layout L = layout_of(r);
  PA_TRY(check_common(r, L, workspace, workspace_bytes, {{"q", q}, {"k", k}, {"v", v}, {"out", out}}));
  if (lse != nullptr && misaligned(lse)) return fail(PROXYATTN_ERROR_MISALIGNED, "lse is not 16-byte aligned");
  if (r.varlen && r.T == 0) return PROXYATTN_SUCCESS;  // nothing to compute
  Kernels K;
  PA_TRY(find_kernels(r, true, &K));
  char *ws = static_cast<char *>(workspace);
  CUstream s = reinterpret_cast<CUstream>(stream);
  int32_t *order = reinterpret_cast<int32_t *>(ws + L.order);
  int32_t *counts = reinterpret_cast<int32_t *>(ws + L.counts);
  int32_t *budgets = reinterpret_cast<int32_t *>(ws + L.budgets);
  PA_TRY(run_plan(r, L, K, q, k, order, counts, budgets, ws, s));

  CUdeviceptr qp = (CUdeviceptr)q, kp = (CUdeviceptr)k, vp = (CUdeviceptr)v, op = (CUdeviceptr)out;
  CUdeviceptr lp = (CUdeviceptr)(lse != nullptr ? (void *)lse : (void *)(ws + L.lse));
  CUdeviceptr ord = (CUdeviceptr)order, cnt = (CUdeviceptr)counts;
  CUdeviceptr cu = r.varlen ? (CUdeviceptr)r.cu : cnt;
  Strides sq = strides_of(r, r.Hq), sk = strides_of(r, r.Hkv), sv = sk, so = sq;
  // lse: [B, Hq, S] (padded) or [Hq, T] (varlen).
  int slb = r.varlen ? 0 : r.Hq * r.S, slh = r.varlen ? r.T : r.S;
  int srb = r.G * r.nb * r.nb, srr = r.nb * r.nb, srm = r.nb, scb = r.Hq * r.nb, sch = r.nb;
  // len_bucket: the Python path's autotuning key (unused by the kernel body); passed as Python passes it.
  int len_bucket = 4096;
  while (len_bucket < r.S) len_bucket *= 2;
  int seq_len = r.S, nb = r.nb, Hq = r.Hq, group = r.Hq / r.Hkv, rgroup = r.Hq / r.G;
  float qk_scale = (float)(r.scale * kLog2e);
  void *args[] = {&qp,   &kp,   &vp,   &op,   &lp,   &ord,  &cnt,  &cu,      &sq.b,    &sq.t,       &sq.h,
                  &sk.b, &sk.t, &sk.h, &sv.b, &sv.t, &sv.h, &so.b, &so.t,    &so.h,    &slb,        &slh,
                  &srb,  &srr,  &srm,  &scb,  &sch,  &seq_len, &nb, &Hq, &qk_scale, &len_bucket, &group, &rgroup};
  const size_t programs = (size_t)r.B * r.Hq * r.nb;
  if (programs >= (size_t(1) << 31))
    return fail(PROXYATTN_ERROR_INVALID_VALUE, "batch * num_q_heads * blocks = " + std::to_string(programs) +
                                                   " exceeds the grid limit 2^31 - 1");
  return launch(*K.attn, (unsigned)programs, 1, 1, threads_of(*K.attn), K.attn->shared_bytes, args, 34, s);
}

int proxyattn_is_compiled(proxyattn_dtype_t dtype, int32_t head_dim, int32_t block_size) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "attn/%s/d%d/bs%d/varlen0", dtype == PROXYATTN_BF16 ? "bf16" : "fp16", head_dim,
                block_size);
  return find_kernel(buf) != nullptr ? 1 : 0;
}

const char *proxyattn_status_name(proxyattn_status_t s) {
  switch (s) {
    case PROXYATTN_SUCCESS: return "PROXYATTN_SUCCESS";
    case PROXYATTN_ERROR_INVALID_VALUE: return "PROXYATTN_ERROR_INVALID_VALUE";
    case PROXYATTN_ERROR_NOT_COMPILED: return "PROXYATTN_ERROR_NOT_COMPILED";
    case PROXYATTN_ERROR_WORKSPACE_TOO_SMALL: return "PROXYATTN_ERROR_WORKSPACE_TOO_SMALL";
    case PROXYATTN_ERROR_MISALIGNED: return "PROXYATTN_ERROR_MISALIGNED";
    case PROXYATTN_ERROR_DRIVER_UNAVAILABLE: return "PROXYATTN_ERROR_DRIVER_UNAVAILABLE";
    case PROXYATTN_ERROR_NO_CONTEXT: return "PROXYATTN_ERROR_NO_CONTEXT";
    case PROXYATTN_ERROR_DEVICE_UNSUPPORTED: return "PROXYATTN_ERROR_DEVICE_UNSUPPORTED";
    case PROXYATTN_ERROR_CUDA: return "PROXYATTN_ERROR_CUDA";
  }
  return "PROXYATTN_UNKNOWN_STATUS";
}

const char *proxyattn_last_error(void) { return last_error(); }

const char *proxyattn_version(void) { return PROXYATTN_VERSION_STRING; }

}  // extern "C"
