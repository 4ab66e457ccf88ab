// Native host tests of libproxyattn, run by ctest without Python (cpp/CMakeLists.txt registers one test per group):
//   proxyattn_host_tests config   the C config API: defaults, validation errors that name the value, problem checks
//   proxyattn_host_tests fields   the TensorRT plugin's field parsing (trt/plugin_logic.h), strict: missing, unknown,
//                                 repeated, mistyped fields and booleans other than 0/1 are refused; budget rule 3
//                                 and the dense fallback (the default config's fields) are read into the config
//   proxyattn_host_tests npy      the .npy codec: element conversions and a save / load round trip
//   proxyattn_host_tests plan     the helper kernels' bodies (src/helpers_impl.h) on hand-computed cases
// Every expected value below is written out by hand (worked in the comments), not computed by the code under test.
// Exit status 0 when every check of the group passes; each failure prints the check and the values involved.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <unistd.h>

#include "helpers_impl.h"
#include "npy.hpp"
#include "plugin_logic.h"
#include "proxyattn.h"

namespace {

int g_failures = 0;
int g_checks = 0;

// Records one check; prints `what` (and `detail`) when it fails.
void check(bool ok, const std::string &what, const std::string &detail = "") {
  ++g_checks;
  if (ok) return;
  ++g_failures;
  std::fprintf(stderr, "FAILED: %s%s%s\n", what.c_str(), detail.empty() ? "" : "\n  ", detail.c_str());
}

bool contains(const std::string &haystack, const std::string &needle) { return haystack.find(needle) != std::string::npos; }

// ------------------------------------------------------------------------------------------------ config
void test_config_defaults() {
  proxyattn_config_t c;
  std::memset(&c, 0x7f, sizeof c);
  proxyattn_config_default(&c);
  // proxyattn.ProxyAttnConfig(): budget_rule 3 (block_recall), recall_rows 4, dense_density 0.8.
  check(c.block_size == 128 && c.stride == 4 && c.proxy_heads == 1, "default block_size 128, stride 4, proxy_heads 1");
  check(c.gamma == 0.83f && c.min_budget_tokens == 2048, "default gamma 0.83, min_budget_tokens 2048");
  check(c.keep_sink == 1 && c.keep_diagonal == 1, "default keep_sink 1, keep_diagonal 1");
  check(c.dense_below_tokens == -1 && c.budget_fraction == 0.0f, "default dense_below_tokens -1, budget_fraction 0");
  check(c.budget_rule == PROXYATTN_BUDGET_RULE_BLOCK_RECALL && c.budget_rule == 3, "default budget_rule 3 (block_recall)");
  check(c.recall_rows == 4 && c.dense_density == 0.8f, "default recall_rows 4, dense_density 0.8");
  check(proxyattn_config_validate(&c) == PROXYATTN_SUCCESS, "defaults validate", proxyattn_last_error());
  check(std::string(proxyattn_last_error()).empty(), "no error message after a success");
}

// One config error: `change` applied to the defaults must be refused with a message containing `needle`.
void expect_config_error(const char *label, const std::function<void(proxyattn_config_t &)> &change,
                         const std::string &needle) {
  proxyattn_config_t c;
  proxyattn_config_default(&c);
  change(c);
  const proxyattn_status_t st = proxyattn_config_validate(&c);
  const std::string msg = proxyattn_last_error();
  check(st == PROXYATTN_ERROR_INVALID_VALUE && contains(msg, needle), std::string("config error: ") + label,
        "status " + std::to_string(int(st)) + ", message '" + msg + "', wanted '" + needle + "'");
}

void test_config_errors() {
  expect_config_error("block_size 96", [](proxyattn_config_t &c) { c.block_size = 96; }, "block_size=96");
  expect_config_error("stride 3", [](proxyattn_config_t &c) { c.stride = 3; }, "stride=3");
  expect_config_error("proxy_heads 0", [](proxyattn_config_t &c) { c.proxy_heads = 0; }, "proxy_heads=0 must be >= 1");
  expect_config_error("gamma 1.5", [](proxyattn_config_t &c) { c.gamma = 1.5f; }, "gamma=1.5");
  expect_config_error("keep_sink 2", [](proxyattn_config_t &c) { c.keep_sink = 2; }, "keep_sink=2 must be 0 or 1");
  expect_config_error("keep_diagonal -1", [](proxyattn_config_t &c) { c.keep_diagonal = -1; }, "keep_diagonal=-1");
  expect_config_error("dense_below_tokens -2", [](proxyattn_config_t &c) { c.dense_below_tokens = -2; },
                      "dense_below_tokens=-2");
  expect_config_error("budget_fraction 1.5", [](proxyattn_config_t &c) { c.budget_fraction = 1.5f; },
                      "budget_fraction=1.5");
  expect_config_error("budget_rule 4", [](proxyattn_config_t &c) { c.budget_rule = 4; },
                      "budget_rule=4 is not supported; allowed: 0 (mass), 1 (recall), 2 (row_recall), 3 (block_recall)");
  expect_config_error("recall_rows 3", [](proxyattn_config_t &c) { c.recall_rows = 3; },
                      "recall_rows=3 must be a power of two dividing block_size=128");
  expect_config_error("recall_rows 256 > block_size", [](proxyattn_config_t &c) { c.recall_rows = 256; },
                      "recall_rows=256");
  expect_config_error("dense_density 1.5", [](proxyattn_config_t &c) { c.dense_density = 1.5f; },
                      "dense_density=1.5 must be 0 (no dense fallback) or lie in (0, 1]");
  expect_config_error("dense_density -0.1", [](proxyattn_config_t &c) { c.dense_density = -0.1f; },
                      "dense_density=-0.1");
  for (int rule = 0; rule <= 3; ++rule) {
    proxyattn_config_t c;
    proxyattn_config_default(&c);
    c.budget_rule = rule;
    c.dense_density = rule == 3 ? 0.0f : 0.5f;
    check(proxyattn_config_validate(&c) == PROXYATTN_SUCCESS, "budget_rule " + std::to_string(rule) + " validates",
          proxyattn_last_error());
  }
  check(std::string(proxyattn_status_name(PROXYATTN_ERROR_INVALID_VALUE)) == "PROXYATTN_ERROR_INVALID_VALUE",
        "status name of INVALID_VALUE");
  check(proxyattn_config_validate(nullptr) == PROXYATTN_ERROR_INVALID_VALUE, "a NULL config is refused");
}

// A padded BSHD problem, bf16, 4096 tokens, 8 query / 2 KV heads, D 128.
proxyattn_problem_t default_problem() {
  proxyattn_problem_t p;
  std::memset(&p, 0, sizeof p);
  p.dtype = PROXYATTN_BF16;
  p.batch = 1;
  p.seq_len = 4096;
  p.num_q_heads = 8;
  p.num_kv_heads = 2;
  p.head_dim = 128;
  p.layout = PROXYATTN_LAYOUT_BSHD;
  return p;
}

void test_problem_errors() {
  proxyattn_config_t c;
  proxyattn_config_default(&c);
  size_t bytes = 0;
  proxyattn_problem_t p = default_problem();
  check(proxyattn_workspace_size(&p, &c, &bytes) == PROXYATTN_SUCCESS, "the default problem is valid",
        proxyattn_last_error());
  const struct {
    const char *label;
    std::function<void(proxyattn_problem_t &)> change;
    const char *needle;
  } cases[] = {
      {"head_dim 0", [](proxyattn_problem_t &q) { q.head_dim = 0; }, "head_dim=0 is not supported; allowed: (64, 128, 256)"},
      {"head_dim 96", [](proxyattn_problem_t &q) { q.head_dim = 96; }, "head_dim=96"},
      {"batch 0", [](proxyattn_problem_t &q) { q.batch = 0; }, "batch=0 must be >= 1"},
      {"seq_len 0", [](proxyattn_problem_t &q) { q.seq_len = 0; }, "seq_len=0"},
  };
  for (const auto &k : cases) {
    proxyattn_problem_t q = default_problem();
    k.change(q);
    const proxyattn_status_t st = proxyattn_workspace_size(&q, &c, &bytes);
    const std::string msg = proxyattn_last_error();
    check(st == PROXYATTN_ERROR_INVALID_VALUE && contains(msg, k.needle), std::string("problem error: ") + k.label,
          "message '" + msg + "', wanted '" + k.needle + "'");
  }
}

// ------------------------------------------------------------------------------------------------ plugin fields
// A field value as the TensorRT parser delivers it: INT32 or FLOAT32, one element.
struct Value {
  pa_trt::FieldType type;
  int32_t i;
  float f;
};

Value I(int32_t v) { return {pa_trt::kInt32, v, 0.0f}; }
Value F(float v) { return {pa_trt::kFloat32, 0, v}; }

// The fields of the node export/contract.py writes for ProxyAttnConfig(block_size=64, stride=8, proxy_heads=2,
// gamma=0.9, min_budget_tokens=1024, keep_sink=False, budget_fraction=0.25, budget_rule=1, dense_density=None)
// (engines.models.engine_config: no dense fallback, which travels as pa_dense_density 0.0), scale 0.0625.
std::map<std::string, Value> node_fields() {
  return {{"pa_block_size", I(64)},        {"pa_stride", I(8)},           {"pa_proxy_heads", I(2)},
          {"pa_gamma", F(0.9f)},           {"pa_min_budget_tokens", I(1024)}, {"pa_keep_sink", I(0)},
          {"pa_keep_diagonal", I(1)},      {"pa_dense_below_tokens", I(8192)}, {"pa_budget_fraction", F(0.25f)},
          {"pa_dense_first_layers", I(0)}, {"pa_dense_layer_mask", I(0)}, {"pa_estimator", I(0)},
          {"pa_budget_rule", I(1)},        {"pa_recall_rows", I(4)},      {"pa_dense_density", F(0.0f)},
          {"pa_column_fraction", F(0.0f)}, {"scale", F(0.0625f)},           {"is_causal", I(1)},           {"sliding_window", I(0)}};
}

// parse_fields over `fields` (plus `extra` appended, to give a field twice); returns its message.
std::string parse(const std::map<std::string, Value> &fields, pa_trt::NodeAttrs *out,
                  const std::vector<std::pair<std::string, Value>> &extra = {}) {
  std::vector<std::pair<std::string, Value>> all(fields.begin(), fields.end());
  all.insert(all.end(), extra.begin(), extra.end());
  std::vector<pa_trt::Field> list;
  for (const auto &kv : all) {
    const Value &v = kv.second;
    list.push_back({kv.first.c_str(), v.type, v.type == pa_trt::kInt32 ? (const void *)&v.i : (const void *)&v.f, 1});
  }
  return pa_trt::parse_fields(list.data(), int(list.size()), out);
}

// `change` applied to node_fields() must be refused with a message containing `needle`.
void expect_field_error(const char *label, const std::function<void(std::map<std::string, Value> &)> &change,
                        const std::string &needle) {
  auto fields = node_fields();
  change(fields);
  pa_trt::NodeAttrs attrs;
  const std::string err = parse(fields, &attrs);
  check(contains(err, needle), std::string("field error: ") + label, "message '" + err + "', wanted '" + needle + "'");
}

void test_fields_read_every_value() {
  int n = 0;
  pa_trt::field_names(&n);
  int pa = 0;
  for (const auto &kv : node_fields()) pa += kv.first.rfind("pa_", 0) == 0;
  check(n == 19 && node_fields().size() == 19u && pa == 16,
        "the plugin declares 19 fields (16 pa_* + scale, is_causal, sliding_window)",
        std::to_string(n) + " declared, " + std::to_string(node_fields().size()) + " given, " + std::to_string(pa) +
            " pa_*");
  check(pa_trt::field_index("pa_dense_density") >= 0, "pa_dense_density is a declared field");
  pa_trt::NodeAttrs a;
  const std::string err = parse(node_fields(), &a);
  check(err.empty(), "the exporter's full field set parses", err);
  const proxyattn_config_t &c = a.config;
  check(c.block_size == 64 && c.stride == 8 && c.proxy_heads == 2 && c.min_budget_tokens == 1024,
        "block_size 64, stride 8, proxy_heads 2, min_budget_tokens 1024 read back");
  check(c.gamma == 0.9f && c.budget_fraction == 0.25f && a.scale == 0.0625f, "gamma 0.9, budget_fraction 0.25, scale 1/16");
  check(c.keep_sink == 0 && c.keep_diagonal == 1 && c.dense_below_tokens == 8192 && c.budget_rule == 1,
        "keep_sink 0, keep_diagonal 1, dense_below_tokens 8192, budget_rule 1 read back");
  check(a.recall_rows == 4 && a.is_causal == 1 && a.sliding_window == 0, "recall_rows 4, causal, no window");
  check(a.dense_density == 0.0f, "dense_density 0 (no dense fallback) read back");
}

// pa_dense_density (ProxyAttnConfig.dense_density, None = 0.0): declared, FLOAT32, required, 0 or (0, 1], read into
// config.dense_density; pa_budget_rule 3 and pa_recall_rows into the config (the default config's node).
void test_fields_read_the_dense_fallback_and_rule_3() {
  for (float v : {0.0f, 0.9f, 1.0f, 0.001f}) {
    auto fields = node_fields();
    fields["pa_dense_density"] = F(v);
    fields["pa_budget_rule"] = I(3);
    fields["pa_recall_rows"] = I(8);
    pa_trt::NodeAttrs a;
    const std::string err = parse(fields, &a);
    check(err.empty() && a.config.dense_density == v && a.dense_density == v && a.config.budget_rule == 3 &&
              a.config.recall_rows == 8,
          "pa_dense_density " + std::to_string(v) + ", pa_budget_rule 3, pa_recall_rows 8 are read into the config", err);
  }
  expect_field_error("dense_density 1.5", [](auto &f) { f["pa_dense_density"] = F(1.5f); },
                     "pa_dense_density=1.500000 must be 0 (no dense fallback) or lie in (0, 1]");
  expect_field_error("dense_density -0.5", [](auto &f) { f["pa_dense_density"] = F(-0.5f); }, "pa_dense_density=-0.5");
  expect_field_error("dense_density as INT32", [](auto &f) { f["pa_dense_density"] = I(0); },
                     "field pa_dense_density must be FLOAT32, not INT32");
  expect_field_error("missing pa_dense_density", [](auto &f) { f.erase("pa_dense_density"); },
                     "missing field(s) pa_dense_density; every declared field is required");
  // pa_column_fraction (ProxyAttnConfig.column_fraction): declared, FLOAT32, required, only 0 (no columns here).
  expect_field_error("column_fraction 0.02", [](auto &f) { f["pa_column_fraction"] = F(0.02f); },
                     "pa_column_fraction=0.020000 is not supported: libproxyattn implements block selection only; allowed: 0");
  expect_field_error("missing pa_column_fraction", [](auto &f) { f.erase("pa_column_fraction"); },
                     "missing field(s) pa_column_fraction");
}

void test_fields_are_strict() {
  expect_field_error("missing pa_keep_sink", [](auto &f) { f.erase("pa_keep_sink"); },
                     "missing field(s) pa_keep_sink; every declared field is required");
  expect_field_error("missing pa_budget_rule and scale",
                     [](auto &f) {
                       f.erase("pa_budget_rule");
                       f.erase("scale");
                     },
                     "missing field(s) pa_budget_rule, scale");
  {
    pa_trt::NodeAttrs a;
    const std::string err = parse({}, &a);
    check(contains(err, "missing field(s) pa_block_size, pa_stride"), "no field at all: every one is missing", err);
  }
  expect_field_error("unknown pa_bogus", [](auto &f) { f["pa_bogus"] = I(1); }, "unknown field pa_bogus; declared: pa_block_size");
  expect_field_error("keep_sink 2", [](auto &f) { f["pa_keep_sink"] = I(2); }, "pa_keep_sink=2 must be 0 or 1");
  expect_field_error("keep_diagonal -1", [](auto &f) { f["pa_keep_diagonal"] = I(-1); }, "pa_keep_diagonal=-1 must be 0 or 1");
  // keep_sink is an INT32 field: a FLOAT attribute (0.5 or even 1.0) is a type error, never truncated to 0.
  expect_field_error("keep_sink 0.5 as FLOAT32", [](auto &f) { f["pa_keep_sink"] = F(0.5f); },
                     "field pa_keep_sink must be INT32, not FLOAT32");
  expect_field_error("gamma as INT32", [](auto &f) { f["pa_gamma"] = I(1); }, "field pa_gamma must be FLOAT32, not INT32");
  expect_field_error("dense_first_layers -1", [](auto &f) { f["pa_dense_first_layers"] = I(-1); },
                     "pa_dense_first_layers=-1 must be >= 0");
  expect_field_error("stride 3 (config validation)", [](auto &f) { f["pa_stride"] = I(3); }, "stride=3");
  expect_field_error("budget_rule 4", [](auto &f) { f["pa_budget_rule"] = I(4); },
                     "pa_budget_rule=4 is not supported; allowed: 0 (mass), 1 (recall), 2 (row_recall), 3 (block_recall)");
  expect_field_error("recall_rows 128 with block_size 64", [](auto &f) { f["pa_recall_rows"] = I(128); },
                     "pa_recall_rows=128 must divide pa_block_size=64");
  expect_field_error("sliding_window 512", [](auto &f) { f["sliding_window"] = I(512); }, "sliding_window=512");
  expect_field_error("negative scale", [](auto &f) { f["scale"] = F(-1.0f); }, "scale must be finite and >= 0");
  {
    pa_trt::NodeAttrs a;
    const std::string err = parse(node_fields(), &a, {{"pa_stride", I(8)}});
    check(contains(err, "field pa_stride is given twice"), "a repeated field is refused", err);
  }
  {
    auto fields = node_fields();
    std::vector<pa_trt::Field> list;
    for (const auto &kv : fields) list.push_back({kv.first.c_str(), kv.second.type, &kv.second.i, 1});
    list[0].length = 2;
    pa_trt::NodeAttrs a;
    const std::string err = pa_trt::parse_fields(list.data(), int(list.size()), &a);
    check(contains(err, "must hold exactly one value"), "a field with two elements is refused", err);
  }
}

// ------------------------------------------------------------------------------------------------ .npy codec
void test_npy_conversions() {
  // Half: 1.0 = 0x3C00, -2.0 = 0xC000, 65504 (largest) = 0x7BFF, 2^-24 (smallest subnormal) = 0x0001.
  check(proxyattn::float_to_half(1.0f) == 0x3C00 && proxyattn::float_to_half(-2.0f) == 0xC000, "half of 1 and -2");
  check(proxyattn::float_to_half(65504.0f) == 0x7BFF && proxyattn::float_to_half(std::ldexp(1.0f, -24)) == 0x0001,
        "half of 65504 and 2^-24");
  check(proxyattn::half_to_float(0x3555) == 0.333251953125f, "0x3555 is 1365/4096 = 0.333251953125");
  // Subnormals, in units of 2^-24: 1e-5 / 2^-24 = 167.77 -> 168 = 0xA8; 2^-25 is a tie between 0 and 1 -> 0 (even);
  // 3 * 2^-26 = 0.75 units -> 1.
  check(proxyattn::float_to_half(1e-5f) == 0x00A8, "half of 1e-5 is the subnormal 0x00A8");
  check(proxyattn::float_to_half(std::ldexp(1.0f, -25)) == 0x0000 && proxyattn::float_to_half(std::ldexp(3.0f, -26)) == 0x0001,
        "half of 2^-25 (tie, to even 0) and 3 * 2^-26 (0.75 units, to 1)");
  check(proxyattn::half_to_float(0x0001) == std::ldexp(1.0f, -24) && proxyattn::half_to_float(0x03FF) == 1023 * std::ldexp(1.0f, -24),
        "0x0001 is 2^-24, 0x03FF is 1023 * 2^-24");
  // bfloat16 keeps the top 16 bits, rounding to nearest even: 1 + 2^-8 (0x3F808000) is a tie -> 0x3F80 (even);
  // 1 + 3 * 2^-8 (0x3F818000) is a tie -> 0x3F82 (even); 1 + 2^-8 + 2^-16 is above the tie -> 0x3F81.
  check(proxyattn::float_to_bf16(1.0f) == 0x3F80, "bf16 of 1.0");
  check(proxyattn::float_to_bf16(1.00390625f) == 0x3F80, "bf16 tie rounds down to even");
  check(proxyattn::float_to_bf16(1.01171875f) == 0x3F82, "bf16 tie rounds up to even");
  check(proxyattn::float_to_bf16(1.00390625f + 1.0f / 65536) == 0x3F81, "bf16 above the tie rounds up");
  check(proxyattn::bf16_to_float(0xC0A0) == -5.0f, "0xC0A0 is -5");
}

void test_npy_round_trip() {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("proxyattn_host_tests_" + std::to_string(getpid()));
  fs::create_directories(dir);
  const float values[6] = {0.0f, 1.0f, -2.5f, 3.25f, 1e-3f, 65504.0f};
  for (const char *descr : {"<f4", "<f2", "<u2"}) {
    proxyattn::NpyArray a;
    a.descr = descr;
    a.shape = {2, 3};
    a.data.resize(6 * a.item_size());
    for (int i = 0; i < 6; ++i) {
      if (a.descr == "<f4") {
        std::memcpy(&a.data[i * 4], &values[i], 4);
      } else {
        const uint16_t v = a.descr == "<f2" ? proxyattn::float_to_half(values[i]) : proxyattn::float_to_bf16(values[i]);
        std::memcpy(&a.data[i * 2], &v, 2);
      }
    }
    const std::string path = (dir / (std::string("a") + descr[1] + descr[2] + ".npy")).string();
    std::string err;
    check(proxyattn::npy_save(path, a, &err), std::string("npy_save ") + descr, err);
    proxyattn::NpyArray b;
    check(proxyattn::npy_load(path, &b, &err), std::string("npy_load ") + descr, err);
    check(b.descr == a.descr && b.shape == a.shape && b.data == a.data, std::string("npy round trip keeps ") + descr,
          "descr '" + b.descr + "', " + std::to_string(b.shape.size()) + " dims, " + std::to_string(b.data.size()) +
              " bytes");
    check(b.numel() == 6, std::string("numel 6 for ") + descr);
  }
  proxyattn::NpyArray missing;
  std::string err;
  const std::string nowhere = (dir / "missing.npy").string();
  check(!proxyattn::npy_load(nowhere, &missing, &err) && contains(err, "missing.npy"),
        "loading a missing file fails naming it", err);
  fs::remove_all(dir);
}

// ------------------------------------------------------------------------------------------------ plan helpers
// pa_budgets (rule 0, "mass") for one head of a 256-token sequence in blocks of 64 (Nb = 4) whose last query block
// puts mass (0.05, 0.5, 0.15, 0.3) on the key blocks.
int32_t mass_budget(float gamma, double fraction, int dense_below) {
  const float mass[4] = {0.05f, 0.5f, 0.15f, 0.3f};
  int32_t budget = -7;
  std::vector<float> smem(size_t(pa_impl::budgets_scratch_words(4, 64)));
  pa_impl::budgets_program(0, 0, 1, mass, &budget, nullptr, 256, 64, 4, 1, gamma, fraction, dense_below, nullptr, 1,
                           PROXYATTN_BUDGET_RULE_MASS, 1, 1, smem.data(), 0, 1);
  return budget;
}

void test_budgets_by_hand() {
  // Sorted: 0.5, 0.3, 0.15, 0.05; running sums 0.5, 0.8, 0.95, 1.0. gamma 0.9: two sums stay below, plus one = 3.
  check(mass_budget(0.9f, 0.0, 0) == 3, "gamma 0.9 keeps 3 of 4 blocks", std::to_string(mass_budget(0.9f, 0.0, 0)));
  // gamma 0.4: no running sum stays below 0.4, plus one = 1 block.
  check(mass_budget(0.4f, 0.0, 0) == 1, "gamma 0.4 keeps 1 block", std::to_string(mass_budget(0.4f, 0.0, 0)));
  check(mass_budget(0.99f, 0.0, 0) == 4, "gamma 0.99 keeps all 4 blocks");
  // budget_fraction 0.3: ceil(0.3 * 4) = 2, whatever the mass.
  check(mass_budget(0.9f, 0.3, 0) == 2, "budget_fraction 0.3 of 4 blocks is 2", std::to_string(mass_budget(0.9f, 0.3, 0)));
  // A sequence of 256 tokens with dense_below_tokens 256 is dense: every block.
  check(mass_budget(0.4f, 0.0, 256) == 4, "a dense sequence keeps every block");
}

void test_selection_by_hand() {
  // One sequence of 6 blocks of 64 tokens, one ranking shared by 2 query heads with budgets 2 and 6 blocks.
  // Query block m = 5 scores its key blocks 0..5 as (0.1, 0.9, 0.5, 0.2, 0.3, 0.8): descending ranks
  // b1 0, b5 1, b2 2, b4 3, b3 4, b0 5. Sink (b0) and diagonal (b5) are forced to the front, among themselves by
  // rank (b5, b0), then the rest by rank: order (5, 0, 1, 2, 4, 3).
  // Head 0: k = ceil(2 * 6 / 6) = 2 leading ranks {b1, b5}; the sink b0 ranks 5 >= 2, one extra: count 3 (5, 0, 1).
  // Head 1: k = ceil(6 * 6 / 6) = 6, clamped to m + 1 = 6, no extra: count 6.
  const int nb = 6;
  std::vector<float> scores(nb * nb, -INFINITY);
  const float row5[6] = {0.1f, 0.9f, 0.5f, 0.2f, 0.3f, 0.8f};
  for (int n = 0; n < nb; ++n) scores[5 * nb + n] = row5[n];
  const int32_t budgets[2] = {2, 6};
  for (int min_blocks : {0, 3}) {
    std::vector<int32_t> order(nb * nb, -7), counts(2 * nb, -7);
    std::vector<float> smem(2 * nb);
    pa_impl::select_program(5, 0, 0, 1, scores.data(), budgets, order.data(), counts.data(), nullptr, nb * 64, 64, nb, 2,
                            min_blocks, 1, 1, 0, smem.data(), 0, 1);
    const std::vector<int32_t> want_order = {5, 0, 1, 2, 4, 3};
    check(std::vector<int32_t>(order.begin() + 5 * nb, order.begin() + 6 * nb) == want_order,
          "order of query block 5 is (5, 0, 1, 2, 4, 3)");
    // min_blocks 3: head 0 keeps k = 3 leading ranks {b1, b5, b2} plus the sink: count 4 (5, 0, 1, 2).
    const int32_t want0 = min_blocks == 0 ? 3 : 4;
    check(counts[0 * nb + 5] == want0 && counts[1 * nb + 5] == 6,
          "counts of query block 5 with min_blocks " + std::to_string(min_blocks),
          "got " + std::to_string(counts[5]) + ", " + std::to_string(counts[nb + 5]) + "; want " +
              std::to_string(want0) + ", 6");
    check(order[0] == -7 && counts[0] == -7, "other query blocks are left untouched");
  }
}


void test_dense_fallback_by_hand() {
  // Early decision: 2 KV groups of 2 heads, Nb = 4 (256 tokens, blocks of 64). MASS budgets (4, 3 | 2, 1).
  // permille 875: group 0 keeps 7 of 2 x 4 = 8 -> 7000 >= 875 * 8 = 7000: dense; group 1: 3000 < 7000: not.
  // permille 876: 7000 < 7008: not dense. permille 0 (off): never.
  const int32_t budgets0[4] = {4, 3, 2, 1};
  for (int permille : {875, 876, 0}) {
    int32_t flags[2] = {-7, -7};
    for (long long i = 0; i < 2; ++i)
      pa_impl::early_dense_element(i, budgets0, flags, nullptr, 256, 64, 4, 2, permille);
    const int want0 = permille == 875 ? 1 : 0;
    check(flags[0] == want0 && flags[1] == 0, "early decision with permille " + std::to_string(permille),
          std::to_string(flags[0]) + ", " + std::to_string(flags[1]));
  }
  // Rule 3's budget: needs of one head over Nb = 4: (1, 2, 2, 3); last need 3; min_blocks 2 -> 3; min_blocks 4 ->
  // min(4, Nb = 4) = 4; a packed sequence of 200 tokens (<= dense_below 200): Nb_b = ceil(200 / 64) = 4.
  const int32_t need[4] = {1, 2, 2, 3};
  int32_t b = -7;
  pa_impl::needs_budgets_element(0, need, &b, nullptr, 256, 64, 4, 1, 2, -1, 0);
  check(b == 3, "rule-3 budget: the last block's need 3", std::to_string(b));
  pa_impl::needs_budgets_element(0, need, &b, nullptr, 256, 64, 4, 1, 4, -1, 0);
  check(b == 4, "rule-3 budget: at least min(min_blocks, Nb) = 4", std::to_string(b));
  const int32_t cu[2] = {0, 200};
  pa_impl::needs_budgets_element(0, need, &b, cu, 256, 64, 4, 1, 2, 200, 0);
  check(b == 4, "rule-3 budget of a short packed sequence: its Nb_b = 4", std::to_string(b));
  // Late decision: one KV group of 2 heads, Nb = 4: causal blocks 2 x (1+2+3+4) = 20. Counts (1, 2, 2, 3 | 1, 2, 3, 3)
  // keep 8 + 9 = 17: permille 850 -> 17000 >= 17000: dense, counts become (1, 2, 3, 4) for both heads;
  // permille 851 -> not dense, counts untouched; with an early flag: dense whatever the counts.
  for (int permille : {850, 851}) {
    for (int early_flag : {0, 1}) {
      int32_t counts[8] = {1, 2, 2, 3, 1, 2, 3, 3};
      const int32_t early[1] = {early_flag};
      long long scratch[2];
      pa_impl::dense_fallback_program(0, 0, 1, counts, early, nullptr, 256, 64, 4, 2, permille, scratch, 0, 1);
      const bool dense = permille == 850 || early_flag;
      const int32_t full[8] = {1, 2, 3, 4, 1, 2, 3, 4}, kept[8] = {1, 2, 2, 3, 1, 2, 3, 3};
      check(std::memcmp(counts, dense ? full : kept, sizeof counts) == 0,
            "late decision, permille " + std::to_string(permille) + ", early flag " + std::to_string(early_flag));
    }
  }
}

}  // namespace

int main(int argc, char **argv) {
  const std::map<std::string, std::vector<void (*)()>> groups = {
      {"config", {test_config_defaults, test_config_errors, test_problem_errors}},
      {"fields", {test_fields_read_every_value, test_fields_are_strict, test_fields_read_the_dense_fallback_and_rule_3}},
      {"npy", {test_npy_conversions, test_npy_round_trip}},
      {"plan", {test_budgets_by_hand, test_selection_by_hand, test_dense_fallback_by_hand}},
  };
  std::vector<std::string> wanted;
  for (int i = 1; i < argc; ++i) wanted.push_back(argv[i]);
  if (wanted.empty())
    for (const auto &g : groups) wanted.push_back(g.first);
  for (const auto &name : wanted) {
    auto it = groups.find(name);
    if (it == groups.end()) {
      std::fprintf(stderr, "unknown test group '%s'; allowed: config, fields, npy, plan\n", name.c_str());
      return 2;
    }
    for (auto fn : it->second) fn();
  }
  std::printf("%d checks, %d failed\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
