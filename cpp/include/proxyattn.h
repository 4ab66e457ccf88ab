/*
 * libproxyattn: ProxyAttn causal prefill as a C library (no Python at run time).
 *
 * One entry point, proxyattn_prefill(), runs the whole algorithm of proxyattn.proxy_attention on device
 * pointers: proxy scores, per-head budgets, block selection and block-sparse attention (or dense attention
 * for sequences with S <= dense_below_tokens), all launched on the caller's stream with no host
 * synchronisation. Kernels are Triton kernels compiled ahead of time for sm_90 plus a few CUDA C helper
 * kernels, all embedded in the library as cubins and loaded through the CUDA driver API, which the library
 * opens at run time (dlopen of libcuda.so.1): building and linking needs no GPU and no libcuda.
 *
 * Layouts (row-major, contiguous):
 *   padded batch  (cu_seqlens == NULL): q, out [B, S, Hq, D]; k, v [B, S, Hkv, D]   (layout BSHD, the default)
 *                                       q, out [B, Hq, S, D]; k, v [B, Hkv, S, D]   (layout BHSD)
 *   packed varlen (cu_seqlens != NULL): q, out [T, Hq, D];    k, v [T, Hkv, D], T = cu_seqlens[B];
 *                                       sequence b occupies rows cu_seqlens[b] .. cu_seqlens[b+1]-1;
 *                                       cu_seqlens lives on the device (read by the kernels: no host sync)
 *                                       and each sequence is planned on its own, exactly as
 *                                       proxy_attention on that sequence alone.
 * dtype fp16 or bf16 for all four; D in {64, 128, 256}; Hq a multiple of Hkv; proxy_heads divides Hkv.
 * Pointers must be 16-byte aligned. The caller's thread must have a current CUDA context (any CUDA runtime
 * call, e.g. cudaSetDevice/cudaMalloc, makes the device's primary context current).
 *
 * Errors come back as proxyattn_status_t; proxyattn_last_error() gives a message naming the bad value
 * (thread-local, valid until the next call on the same thread).
 */
#ifndef PROXYATTN_H_
#define PROXYATTN_H_

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define PROXYATTN_API __attribute__((visibility("default")))
#else
#define PROXYATTN_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define PROXYATTN_VERSION_MAJOR 0
#define PROXYATTN_VERSION_MINOR 1
#define PROXYATTN_VERSION_PATCH 0

/* Same type as cudaStream_t and CUstream; pass either (or NULL for the legacy default stream). */
typedef struct CUstream_st *proxyattn_stream_t;

typedef enum proxyattn_status {
  PROXYATTN_SUCCESS = 0,
  PROXYATTN_ERROR_INVALID_VALUE = 1,       /* a bad argument; the message names it and the allowed values */
  PROXYATTN_ERROR_NOT_COMPILED = 2,        /* valid, but no kernel was compiled for this dtype/D/block */
  PROXYATTN_ERROR_WORKSPACE_TOO_SMALL = 3, /* workspace_bytes < proxyattn_workspace_size() */
  PROXYATTN_ERROR_MISALIGNED = 4,          /* a pointer is not 16-byte aligned */
  PROXYATTN_ERROR_DRIVER_UNAVAILABLE = 5,  /* libcuda.so.1 could not be opened or lacks a symbol */
  PROXYATTN_ERROR_NO_CONTEXT = 6,          /* no current CUDA context on the calling thread */
  PROXYATTN_ERROR_DEVICE_UNSUPPORTED = 7,  /* the current device cannot run the sm_90 cubins */
  PROXYATTN_ERROR_CUDA = 8                 /* a CUDA driver call failed; the message has its name */
} proxyattn_status_t;

typedef enum proxyattn_dtype {
  PROXYATTN_FP16 = 0,
  PROXYATTN_BF16 = 1
} proxyattn_dtype_t;

/*
 * The algorithm's choices: the same fields, meanings and defaults as proxyattn.ProxyAttnConfig, named as in
 * ProxyAttnConfig.to_attrs() without the "pa_" prefix. Booleans are 0/1. Python's None maps to:
 * dense_below_tokens = -1 (max(min_budget_tokens, 32768), as ProxyAttnConfig resolves None), budget_fraction = 0
 * (gamma rule), dense_density = 0 (no dense fallback). Start from proxyattn_config_default() so that fields added
 * later (budget_rule, recall_rows, dense_density: appended last) get their defaults.
 */
#define PROXYATTN_DENSE_CROSSOVER_TOKENS 32768 /* proxyattn.config.DENSE_CROSSOVER_TOKENS */
typedef struct proxyattn_config {
  int32_t block_size;         /* 64 or 128 (default 128) */
  int32_t stride;             /* positive divisor of block_size (default 4) */
  int32_t proxy_heads;        /* divides Hkv (default 1) */
  float gamma;                /* (0, 1] (default 0.83) */
  int32_t min_budget_tokens;  /* >= 0 (default 2048) */
  int32_t keep_sink;          /* 0/1 (default 1) */
  int32_t keep_diagonal;      /* 0/1 (default 1) */
  int32_t dense_below_tokens; /* >= 0, or -1 = max(min_budget_tokens, PROXYATTN_DENSE_CROSSOVER_TOKENS) (default -1) */
  float budget_fraction;      /* 0 = gamma rule, else (0, 1] (default 0) */
  int32_t budget_rule;        /* how the gamma budget is counted (default 3, BLOCK_RECALL): PROXYATTN_BUDGET_RULE_* */
  int32_t recall_rows;        /* query rows per block that budget_rule 3 measures: a power of two dividing block_size
                                 (default 4; the compiled values are listed in ROWS of cpp/tools/generate_kernels.py) */
  float dense_density;        /* the dense fallback: 0 = off, else (0, 1] (default 0.8), applied in thousandths
                                 (round(dense_density * 1000), at least 1: ProxyAttnConfig.dense_density_permille) */
} proxyattn_config_t;

/*
 * config.budget_rule, proxyattn.config.BUDGET_RULES (proxyattn.reference.head_budgets / block_needs). Rules 0-2
 * count on the attention of each head's last query block (softmax of its last block_size queries, summed per key
 * block) and scale that budget by position:
 *   MASS (0, the paper): the fewest key blocks holding gamma of that block's mean mass (sorted descending);
 *   RECALL (1): the shortest prefix of the shared ranking of the last query block (proxy score row Nb-1 of the
 *     head's ranking: sink/diagonal blocks first, then descending score, ties to the lower index) holding gamma of
 *     the head's own mean mass, so a head that attends where the ranking does not look gets a larger budget;
 *   ROW_RECALL (2): the shortest prefix of that ranking holding gamma of the mass of every row of the last query
 *     block (never below RECALL): a query that retrieves what its block's other rows ignore keeps its blocks.
 *     Workspace: the mass of every row, block_size times the per-head mass.
 *   BLOCK_RECALL (3, the default): every (head, query block) keeps min_budget_tokens' top blocks plus the forced
 *     blocks, and at least the shortest prefix of that block's own ranking holding gamma of the mass of each of
 *     recall_rows rows of the block (its last row and every block_size / recall_rows-th row before it). At most
 *     PROXYATTN_MAX_BLOCKS_BLOCK_RECALL blocks per sequence (longer: PROXYATTN_ERROR_INVALID_VALUE). The reported
 *     budget is the need of the last query block, at least min(min_budget_tokens' blocks, Nb).
 * Only the gamma rule (budget_fraction = 0, sparse sequences) reads it.
 *
 * The dense fallback (config.dense_density > 0; ProxyAttnConfig.dense_density): a KV group (the query heads of one
 * KV head) keeps every causal block when its heads' MASS budgets on the last query block sum to at least
 * dense_density of group x Nb blocks (decided first, from the attention mass alone; budget_rule 3 then does not
 * measure the group), or when its plan keeps at least dense_density of its causal blocks. Such groups run as full
 * rows in the block-sparse kernel. Integer arithmetic in thousandths, as every backend.
 */
#define PROXYATTN_BUDGET_RULE_MASS 0
#define PROXYATTN_BUDGET_RULE_RECALL 1
#define PROXYATTN_BUDGET_RULE_ROW_RECALL 2
#define PROXYATTN_BUDGET_RULE_BLOCK_RECALL 3
#define PROXYATTN_MAX_BLOCKS_BLOCK_RECALL 4096 /* proxyattn.kernels.estimate_rank.MAX_SORT_BLOCKS */

typedef enum proxyattn_layout {
  PROXYATTN_LAYOUT_BSHD = 0, /* q, out [B, S, Hq, D]; k, v [B, S, Hkv, D] (flash-attention layout; varlen: [T, H, D]) */
  PROXYATTN_LAYOUT_BHSD = 1  /* q, out [B, Hq, S, D]; k, v [B, Hkv, S, D] (transformers / ONNX node layout) */
} proxyattn_layout_t;

typedef struct proxyattn_problem {
  proxyattn_dtype_t dtype;
  int32_t batch;              /* B >= 1 */
  int32_t seq_len;            /* padded layout: S >= 1; varlen: max_seqlen, >= every length (not checked on the device) */
  const int32_t *cu_seqlens;  /* NULL (padded layout) or DEVICE int32 [B+1], cu_seqlens[0] = 0, non-decreasing */
  int32_t total_tokens;       /* varlen: T = cu_seqlens[B] (host copy; T <= B * seq_len); ignored when padded */
  int32_t num_q_heads;        /* Hq */
  int32_t num_kv_heads;       /* Hkv */
  int32_t head_dim;           /* D: 64, 128 or 256 */
  float scale;                /* softmax scale; 0 means 1/sqrt(D) */
  proxyattn_layout_t layout;  /* padded batch: BSHD (default, 0) or BHSD; varlen: BSHD only ([T, H, D]) */
} proxyattn_problem_t;

/* Fills *config with the defaults of proxyattn.ProxyAttnConfig(). */
PROXYATTN_API void proxyattn_config_default(proxyattn_config_t *config);

/* Checks a config alone (the rules of ProxyAttnConfig.__post_init__). */
PROXYATTN_API proxyattn_status_t proxyattn_config_validate(const proxyattn_config_t *config);

/*
 * Bytes of device workspace proxyattn_prefill() needs for this problem and config (0 is possible: then the
 * workspace pointer may be NULL). Depends only on dtype, B, seq_len, heads, D and the config, never on the
 * data, so it can be called once at setup. Pure host function: needs no GPU or driver.
 */
PROXYATTN_API proxyattn_status_t proxyattn_workspace_size(const proxyattn_problem_t *problem, const proxyattn_config_t *config,
                                            size_t *bytes);

/*
 * ProxyAttn causal prefill: out = proxy_attention(q, k, v, config, scale). Everything is enqueued on
 * `stream` (no host synchronisation, no allocation); the workspace must stay untouched until the stream
 * has finished this call. Equal to proxyattn.proxy_attention on the same inputs within bf16/fp16
 * tolerance (checked on an H200 with budget rules 0-2 and no dense fallback; budget rule 3 and the dense fallback
 * have not run on a GPU yet: see docs/cpp.md).
 * lse may be NULL; otherwise float32 [B, Hq, S] (padded) or [Hq, T] (varlen): natural log of each row's
 * softmax denominator over the kept keys.
 */
PROXYATTN_API proxyattn_status_t proxyattn_prefill(const proxyattn_problem_t *problem, const proxyattn_config_t *config,
                                     const void *q, const void *k, const void *v, void *out, float *lse,
                                     void *workspace, size_t workspace_bytes, proxyattn_stream_t stream);

/*
 * The block plan alone (proxyattn.plan_blocks / plan_blocks_varlen), for inspection and tests:
 *   order   int32 [B, G, Nb, Nb] (G = proxy_heads; row m lists key blocks 0..m in keep order),
 *   counts  int32 [B, Hq, Nb]    (head h keeps the first counts[b, h, m] entries of order[b, h / (Hq / G), m]),
 *   budgets int32 [B, Hq]        (budget in key blocks; may be NULL),
 * Nb = ceil(seq_len / block_size). Query blocks past a varlen sequence's end are unused: left unwritten by
 * budget rules 0-2; budget rule 3 writes counts 0 there and order rows ranked from the padding. Dense
 * sequences (length <= dense_below_tokens) get the keep-everything plan (counts m+1; order 0..Nb-1, with budget
 * rule 3 as ranked) and a budget of
 * their own block count; the heads of KV groups sent to the dense fallback keep every causal block (counts m+1,
 * order as ranked). Same workspace as proxyattn_prefill().
 */
PROXYATTN_API proxyattn_status_t proxyattn_plan(const proxyattn_problem_t *problem, const proxyattn_config_t *config,
                                  const void *q, const void *k, int32_t *order, int32_t *counts, int32_t *budgets,
                                  void *workspace, size_t workspace_bytes, proxyattn_stream_t stream);

/* Whether kernels for this (dtype, head_dim, block_size) were compiled into the library: 1 or 0. */
PROXYATTN_API int proxyattn_is_compiled(proxyattn_dtype_t dtype, int32_t head_dim, int32_t block_size);

/* Short fixed name of a status ("PROXYATTN_ERROR_INVALID_VALUE", ...); never NULL. */
PROXYATTN_API const char *proxyattn_status_name(proxyattn_status_t status);

/* Detailed message of the last failed call on this thread ("" after a success); never NULL. */
PROXYATTN_API const char *proxyattn_last_error(void);

/* Library version "MAJOR.MINOR.PATCH" plus the Triton version the kernels were compiled with. */
PROXYATTN_API const char *proxyattn_version(void);

#ifdef __cplusplus
}
#endif

#endif /* PROXYATTN_H_ */
