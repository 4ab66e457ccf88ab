// TensorRT IPluginV3 wrapper around libproxyattn's proxyattn_prefill (TensorRT 10.x API).
//
// Plugin "ProxyAttention", version "1", namespace "proxy": the names TensorRT's ONNX parser looks up for the
// proxy::ProxyAttention node (export/contract.py), so a file exported by export/ builds with this library loaded
// (trtexec --staticPlugins=libproxyattn_trt.so, or IPluginRegistry::loadLibrary). Inputs query [B, Hq, S, D],
// key/value [B, Hkv, S, D]; output [B, Hq, S, D]; fp16 or bf16, linear format; D 64/128/256.
// Everything numerical is libproxyattn's: this file only maps TensorRT's descriptors, fields and workspace onto
// the C API (the mapping itself lives in plugin_logic.h, which the CPU tests check).
//
// NOT COMPILED OR RUN in this project's environment: TensorRT's headers are not obtainable here (docs/cpp.md).
// Build with: cmake -S cpp -B build -DTENSORRT_ROOT=/path/to/TensorRT
#include <NvInferRuntime.h>

#include <cstdio>
#include <string>
#include <vector>

#include "plugin_logic.h"
#include "proxyattn.h"

using namespace nvinfer1;

namespace {

constexpr char kName[] = "ProxyAttention";
constexpr char kVersion[] = "1";
constexpr char kNamespace[] = "proxy";

void report(const std::string &msg) { std::fprintf(stderr, "[proxyattn_trt] %s\n", msg.c_str()); }

bool dtype_of(DataType t, proxyattn_dtype_t *out) {
  if (t == DataType::kHALF) *out = PROXYATTN_FP16;
  else if (t == DataType::kBF16) *out = PROXYATTN_BF16;
  else return false;
  return true;
}

class ProxyAttnPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  explicit ProxyAttnPlugin(const pa_trt::NodeAttrs &attrs) : attrs_(attrs) { buildFields(); }

  // IPluginV3
  IPluginCapability *getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore *>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild *>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime *>(this);
    }
    return nullptr;
  }
  IPluginV3 *clone() noexcept override { return new (std::nothrow) ProxyAttnPlugin(attrs_); }

  // IPluginV3OneCore
  char const *getPluginName() const noexcept override { return kName; }
  char const *getPluginVersion() const noexcept override { return kVersion; }
  char const *getPluginNamespace() const noexcept override { return kNamespace; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return 1; }

  int32_t getOutputDataTypes(DataType *outputTypes, int32_t nbOutputs, DataType const *inputTypes,
                             int32_t nbInputs) const noexcept override {
    if (nbOutputs != 1 || nbInputs != 3) return 1;
    outputTypes[0] = inputTypes[0];
    return 0;
  }

  int32_t getOutputShapes(DimsExprs const *inputs, int32_t nbInputs, DimsExprs const *, int32_t, DimsExprs *outputs,
                          int32_t nbOutputs, IExprBuilder &) noexcept override {
    if (nbInputs != 3 || nbOutputs != 1 || inputs[0].nbDims != 4) return 1;
    outputs[0] = inputs[0];  // [B, Hq, S, D]
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const *inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    if (nbInputs != 3 || nbOutputs != 1 || pos < 0 || pos > 3) return false;
    PluginTensorDesc const &d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    if (pos == 0) return d.type == DataType::kHALF || d.type == DataType::kBF16;
    return d.type == inOut[0].desc.type;  // k, v and out in q's dtype
  }

  int32_t configurePlugin(DynamicPluginTensorDesc const *in, int32_t nbInputs, DynamicPluginTensorDesc const *,
                          int32_t nbOutputs) noexcept override {
    if (nbInputs != 3 || nbOutputs != 1) return 1;
    proxyattn_problem_t p;
    std::string err = problemOf(in[0].max, in[1].max, in[0].desc.type, &p);
    if (!err.empty()) {
      report("configurePlugin: " + err);
      return 1;
    }
    return 0;
  }

  size_t getWorkspaceSize(DynamicPluginTensorDesc const *inputs, int32_t nbInputs, DynamicPluginTensorDesc const *,
                          int32_t) const noexcept override {
    // Sized for the profile's largest shape; the workspace of a smaller problem is never larger.
    proxyattn_problem_t p;
    if (nbInputs != 3 || !problemOf(inputs[0].max, inputs[1].max, inputs[0].desc.type, &p).empty()) return 0;
    size_t bytes = 0;
    if (proxyattn_workspace_size(&p, &attrs_.config, &bytes) != PROXYATTN_SUCCESS) {
      report(std::string("getWorkspaceSize: ") + proxyattn_last_error());
      return 0;
    }
    return bytes;
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(PluginTensorDesc const *in, int32_t nbInputs, PluginTensorDesc const *,
                        int32_t nbOutputs) noexcept override {
    return (nbInputs == 3 && nbOutputs == 1 && in[0].dims.nbDims == 4) ? 0 : 1;
  }

  int32_t enqueue(PluginTensorDesc const *inputDesc, PluginTensorDesc const *, void const *const *inputs,
                  void *const *outputs, void *workspace, cudaStream_t stream) noexcept override {
    proxyattn_problem_t p;
    std::string err = problemOf(inputDesc[0].dims, inputDesc[1].dims, inputDesc[0].type, &p);
    if (!err.empty()) {
      report("enqueue: " + err);
      return 1;
    }
    size_t bytes = 0;
    proxyattn_status_t st = proxyattn_workspace_size(&p, &attrs_.config, &bytes);
    if (st == PROXYATTN_SUCCESS)
      st = proxyattn_prefill(&p, &attrs_.config, inputs[0], inputs[1], inputs[2], outputs[0], nullptr, workspace,
                             bytes, reinterpret_cast<proxyattn_stream_t>(stream));
    if (st != PROXYATTN_SUCCESS) {
      report(std::string("enqueue: ") + proxyattn_status_name(st) + ": " + proxyattn_last_error());
      return 1;
    }
    return 0;
  }

  IPluginV3 *attachToContext(IPluginResourceContext *) noexcept override { return clone(); }

  PluginFieldCollection const *getFieldsToSerialize() noexcept override { return &fc_; }

 private:
  static std::string dimsToProblem(Dims const &q, Dims const &k, DataType type, proxyattn_problem_t *p) {
    proxyattn_dtype_t dt;
    if (!dtype_of(type, &dt)) return "query must be FP16 or BF16";
    int64_t qd[8] = {0}, kd[8] = {0};
    for (int i = 0; i < q.nbDims && i < 8; ++i) qd[i] = q.d[i];
    for (int i = 0; i < k.nbDims && i < 8; ++i) kd[i] = k.d[i];
    return pa_trt::make_problem(q.nbDims, qd, k.nbDims, kd, dt, 0.0f, p);
  }

  std::string problemOf(Dims const &q, Dims const &k, DataType type, proxyattn_problem_t *p) const {
    std::string err = dimsToProblem(q, k, type, p);
    p->scale = attrs_.scale;
    return err;
  }

  void buildFields() {
    int n = 0;
    const char *const *names = pa_trt::field_names(&n);
    const proxyattn_config_t &c = attrs_.config;
    // INT32 fields in field_names() order; dense_first_layers, dense_layer_mask, estimator serialise as 0.
    ints_ = {c.block_size, c.stride, c.proxy_heads, c.min_budget_tokens, c.keep_sink, c.keep_diagonal,
             c.dense_below_tokens, 0, 0, 0, c.budget_rule, c.recall_rows, attrs_.is_causal,
             attrs_.sliding_window};
    // The FLOAT32 fields in field_names() order; pa_column_fraction is always 0 here (parse_fields refuses others).
    floats_ = {c.gamma, c.budget_fraction, c.dense_density, 0.0f, attrs_.scale};
    fields_.clear();
    size_t ii = 0, fi = 0;
    for (int i = 0; i < n; ++i) {
      if (pa_trt::is_float_field(names[i])) fields_.emplace_back(names[i], &floats_[fi++], PluginFieldType::kFLOAT32, 1);
      else fields_.emplace_back(names[i], &ints_[ii++], PluginFieldType::kINT32, 1);
    }
    fc_.nbFields = int32_t(fields_.size());
    fc_.fields = fields_.data();
  }

  pa_trt::NodeAttrs attrs_;
  std::vector<int32_t> ints_;   // in field_names() order of the INT32 fields
  std::vector<float> floats_;   // in field_names() order of the FLOAT32 fields
  std::vector<PluginField> fields_;
  PluginFieldCollection fc_{};
};

class ProxyAttnPluginCreator : public IPluginCreatorV3One {
 public:
  ProxyAttnPluginCreator() {
    int n = 0;
    const char *const *names = pa_trt::field_names(&n);
    for (int i = 0; i < n; ++i)
      fields_.emplace_back(names[i], nullptr,
                           pa_trt::is_float_field(names[i]) ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32, 1);
    fc_.nbFields = int32_t(fields_.size());
    fc_.fields = fields_.data();
  }

  char const *getPluginName() const noexcept override { return kName; }
  char const *getPluginVersion() const noexcept override { return kVersion; }
  char const *getPluginNamespace() const noexcept override { return kNamespace; }
  PluginFieldCollection const *getFieldNames() noexcept override { return &fc_; }

  IPluginV3 *createPlugin(char const *, PluginFieldCollection const *fc, TensorRTPhase) noexcept override {
    std::vector<pa_trt::Field> fields;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
      PluginField const &f = fc->fields[i];
      pa_trt::FieldType t;
      if (f.type == PluginFieldType::kINT32) t = pa_trt::kInt32;
      else if (f.type == PluginFieldType::kFLOAT32) t = pa_trt::kFloat32;
      else {
        report(std::string("createPlugin: field ") + f.name + " must be INT32 or FLOAT32");
        return nullptr;
      }
      fields.push_back({f.name, t, f.data, f.length});
    }
    pa_trt::NodeAttrs attrs;
    std::string err = pa_trt::parse_fields(fields.data(), int(fields.size()), &attrs);
    if (!err.empty()) {
      report("createPlugin: " + err);
      return nullptr;
    }
    return new (std::nothrow) ProxyAttnPlugin(attrs);
  }

 private:
  std::vector<PluginField> fields_;
  PluginFieldCollection fc_{};
};

}  // namespace

// Entry point TensorRT 10 looks up when it loads a plugin library (IPluginRegistry::loadLibrary, trtexec
// --staticPlugins / --dynamicPlugins).
extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface *const *getCreators(int32_t &nbCreators) {
  static ProxyAttnPluginCreator creator;
  static IPluginCreatorInterface *const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}
