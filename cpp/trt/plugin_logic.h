// TensorRT-independent logic of the ProxyAttention IPluginV3 (ProxyAttnPlugin.cpp): the node's fields to a
// libproxyattn config, and tensor dimensions to a problem. Kept free of TensorRT types so that the host tests
// (tests/cpp/test_plugin_fields.py, through cpp/tests/host_api.cpp) check it on a machine without TensorRT.
//
// The node contract is export/contract.py: inputs query [B, Hq, S, D], key/value [B, Hkv, S, D] (BHSD), output
// [B, Hq, S, D] in query's dtype; fields pa_* (ProxyAttnConfig.to_attrs), scale (float), is_causal (int, must be 1),
// sliding_window (int, must be 0: this plugin refuses windowed layers rather than computing something else),
// pa_estimator (int, must be 0: the only estimator libproxyattn implements), pa_budget_rule (int, 0 "mass",
// 1 "recall", 2 "row_recall" or 3 "block_recall", proxyattn.config.BUDGET_RULES; other values are refused),
// pa_recall_rows (int, a power of two dividing pa_block_size; read by rule 3), pa_dense_density (float, 0 = no
// dense fallback, else (0, 1]), pa_column_fraction (float, must be 0: libproxyattn selects blocks only, no
// vertical columns). Every field is required (parse_fields): the plugin never substitutes a default for
// a field the node lacks.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "proxyattn.h"

namespace pa_trt {

enum FieldType { kInt32 = 0, kFloat32 = 1 };

struct Field {
  const char *name;
  FieldType type;
  const void *data;
  int32_t length;
};

struct NodeAttrs {
  proxyattn_config_t config;
  float scale = 0.0f;  // 0: 1/sqrt(D)
  int32_t is_causal = 1;
  int32_t sliding_window = 0;
  int32_t recall_rows = 4;     // ProxyAttnConfig.recall_rows (also in config.recall_rows)
  float dense_density = 0.8f;  // ProxyAttnConfig.dense_density, 0 = None (also in config.dense_density)
};

// Every field name the plugin declares, in the order it serialises them.
inline const char *const *field_names(int *count) {
  static const char *const names[] = {"pa_block_size",         "pa_stride",          "pa_proxy_heads",
                                      "pa_gamma",              "pa_min_budget_tokens", "pa_keep_sink",
                                      "pa_keep_diagonal",      "pa_dense_below_tokens", "pa_budget_fraction",
                                      "pa_dense_first_layers", "pa_dense_layer_mask", "pa_estimator",
                                      "pa_budget_rule",        "pa_recall_rows",     "pa_dense_density",
                                      "pa_column_fraction",    "scale",                 "is_causal",          "sliding_window"};
  *count = int(sizeof(names) / sizeof(names[0]));
  return names;
}

inline bool is_float_field(const std::string &n) {
  return n == "pa_gamma" || n == "pa_budget_fraction" || n == "pa_dense_density" || n == "pa_column_fraction" ||
         n == "scale";
}

// Index of `name` in field_names(), or -1.
inline int field_index(const std::string &name) {
  int n = 0;
  const char *const *names = field_names(&n);
  for (int i = 0; i < n; ++i)
    if (name == names[i]) return i;
  return -1;
}

// Every declared field name, comma-separated (for error messages).
inline std::string declared_fields() {
  int n = 0;
  const char *const *names = field_names(&n);
  std::string out;
  for (int i = 0; i < n; ++i) out += (i ? ", " : "") + std::string(names[i]);
  return out;
}

inline bool is_bool_field(const std::string &n) { return n == "pa_keep_sink" || n == "pa_keep_diagonal"; }

// Stores one field's value (already checked to be a declared name of the right type) into *a; returns "" or a
// message naming the field, its value and the allowed values.
inline std::string apply_field(const std::string &name, int32_t iv, float fv, NodeAttrs *a) {
  if (is_bool_field(name) && iv != 0 && iv != 1)
    return name + "=" + std::to_string(iv) + " must be 0 or 1 (a boolean travels as INT 0/1)";
  if (name == "pa_block_size") a->config.block_size = iv;
  else if (name == "pa_stride") a->config.stride = iv;
  else if (name == "pa_proxy_heads") a->config.proxy_heads = iv;
  else if (name == "pa_gamma") a->config.gamma = fv;
  else if (name == "pa_min_budget_tokens") a->config.min_budget_tokens = iv;
  else if (name == "pa_keep_sink") a->config.keep_sink = iv;
  else if (name == "pa_keep_diagonal") a->config.keep_diagonal = iv;
  else if (name == "pa_dense_below_tokens") a->config.dense_below_tokens = iv;
  else if (name == "pa_budget_fraction") a->config.budget_fraction = fv;
  else if (name == "pa_dense_first_layers" || name == "pa_dense_layer_mask") {
    // Model-level fields: carried by every node, acted on by the exporter (export/contract.py), not here.
    if (iv < 0) return name + "=" + std::to_string(iv) + " must be >= 0";
  } else if (name == "pa_estimator") {
    if (iv != 0)
      return "pa_estimator=" + std::to_string(iv) +
             " is not supported: libproxyattn implements estimator 0 (the paper's mean-pooled proxy heads)";
  } else if (name == "pa_budget_rule") {
    if (iv < PROXYATTN_BUDGET_RULE_MASS || iv > PROXYATTN_BUDGET_RULE_BLOCK_RECALL)
      return "pa_budget_rule=" + std::to_string(iv) +
             " is not supported; allowed: 0 (mass), 1 (recall), 2 (row_recall), 3 (block_recall)";
    a->config.budget_rule = iv;
  } else if (name == "pa_recall_rows") {
    if (iv < 1 || iv > 128 || (iv & (iv - 1)) != 0)
      return "pa_recall_rows=" + std::to_string(iv) + " must be a power of two in 1..128";
    a->recall_rows = iv;
    a->config.recall_rows = iv;
  } else if (name == "pa_dense_density") {
    if (!(fv == 0.0f || (fv > 0.0f && fv <= 1.0f)))
      return "pa_dense_density=" + std::to_string(fv) + " must be 0 (no dense fallback) or lie in (0, 1]";
    a->dense_density = fv;
    a->config.dense_density = fv;
  } else if (name == "pa_column_fraction") {
    if (fv != 0.0f)
      return "pa_column_fraction=" + std::to_string(fv) +
             " is not supported: libproxyattn implements block selection only; allowed: 0 (no vertical columns)";
  } else if (name == "scale") a->scale = fv;
  else if (name == "is_causal") a->is_causal = iv;
  else if (name == "sliding_window") a->sliding_window = iv;
  return "";
}

// Reads the node's fields, strictly (as ProxyAttnConfig.from_attrs does in Python): every declared field
// (field_names) must be given exactly once, with its type (FLOAT32 for pa_gamma, pa_budget_fraction, pa_dense_density, pa_column_fraction and scale,
// INT32 otherwise) and one value. A missing, unknown or repeated field, a boolean other than 0/1 and a value the
// config does not allow are errors; nothing falls back to a default. TensorRT's ONNX parser passes every declared
// field the node carries (ONNX INT -> INT32, FLOAT -> FLOAT32) and export/contract.py writes every one of them.
// Returns "" on success, else a message naming the field.
inline std::string parse_fields(const Field *fields, int n, NodeAttrs *out) {
  int count = 0;
  const char *const *names = field_names(&count);
  std::vector<bool> seen(size_t(count), false);
  NodeAttrs a;
  proxyattn_config_default(&a.config);
  for (int i = 0; i < n; ++i) {
    const Field &f = fields[i];
    const std::string name = f.name ? f.name : "";
    const int idx = field_index(name);
    if (idx < 0) return "unknown field " + name + "; declared: " + declared_fields();
    if (seen[idx]) return "field " + name + " is given twice";
    seen[idx] = true;
    if (f.length != 1 || f.data == nullptr) return "field " + name + " must hold exactly one value";
    const bool want_float = is_float_field(name);
    if ((want_float && f.type != kFloat32) || (!want_float && f.type != kInt32))
      return "field " + name + " must be " + (want_float ? "FLOAT32" : "INT32") + ", not " +
             (f.type == kFloat32 ? "FLOAT32" : f.type == kInt32 ? "INT32" : "type " + std::to_string(int(f.type)));
    int32_t iv = 0;
    float fv = 0.0f;
    if (want_float) std::memcpy(&fv, f.data, 4);
    else std::memcpy(&iv, f.data, 4);
    const std::string err = apply_field(name, iv, fv, &a);
    if (!err.empty()) return err;
  }
  std::string missing;
  for (int i = 0; i < count; ++i)
    if (!seen[i]) missing += (missing.empty() ? "" : ", ") + std::string(names[i]);
  if (!missing.empty())
    return "missing field(s) " + missing + "; every declared field is required: " + declared_fields() +
           " (export/contract.py encode_attrs writes them all)";
  if (a.is_causal != 1) return "is_causal=" + std::to_string(a.is_causal) + ": only causal prefill (1) is supported";
  if (a.sliding_window != 0)
    return "sliding_window=" + std::to_string(a.sliding_window) +
           ": windowed layers are not supported by this plugin (the node must be refused, not approximated)";
  if (!(a.scale >= 0.0f) || !std::isfinite(a.scale)) return "scale must be finite and >= 0 (0: 1/sqrt(D))";
  if (a.config.block_size > 0 && a.config.block_size % a.recall_rows != 0)
    return "pa_recall_rows=" + std::to_string(a.recall_rows) + " must divide pa_block_size=" + std::to_string(a.config.block_size);
  if (proxyattn_config_validate(&a.config) != PROXYATTN_SUCCESS) return proxyattn_last_error();
  *out = a;
  return "";
}

// q [B, Hq, S, D] and k [B, Hkv, S, D] dimensions to a padded BHSD problem. Returns "" or a message.
inline std::string make_problem(int q_nbdims, const int64_t *q, int k_nbdims, const int64_t *k, proxyattn_dtype_t dtype,
                                float scale, proxyattn_problem_t *out) {
  if (q_nbdims != 4 || k_nbdims != 4) return "query and key must have 4 dims [B, H, S, D]";
  if (q[0] != k[0] || q[2] != k[2] || q[3] != k[3]) return "query [B, Hq, S, D] and key [B, Hkv, S, D] disagree in B, S or D";
  for (int i = 0; i < 4; ++i)
    if (q[i] < 0 || q[i] > INT32_MAX || k[i] < 0 || k[i] > INT32_MAX) return "dimension out of int32 range";
  proxyattn_problem_t p;
  std::memset(&p, 0, sizeof p);
  p.dtype = dtype;
  p.batch = int32_t(q[0]);
  p.num_q_heads = int32_t(q[1]);
  p.seq_len = int32_t(q[2]);
  p.head_dim = int32_t(q[3]);
  p.num_kv_heads = int32_t(k[1]);
  p.cu_seqlens = nullptr;
  p.scale = scale;
  p.layout = PROXYATTN_LAYOUT_BHSD;
  *out = p;
  return "";
}

}  // namespace pa_trt
