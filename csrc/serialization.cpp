// linquant::load_quantized and linquant::load_into (linquant/serialization.h): the C++ reader of
// python/linquant/serialization.py's directories, with the checks of its read_config and
// load_quantized, so that both readers accept the same directories.
#include "linquant/serialization.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/linear.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <vector>

#include "json.h"
#include "safetensors.h"

namespace linquant {
namespace {

const std::string kWho = "linquant::load_quantized";
constexpr const char* kWeightsName = "model.safetensors";
constexpr const char* kConfigName = "linquant.json";
constexpr int64_t kFormatVersion = 1;
constexpr const char* kSaveIdKey = "linquant_save_id";  // in the safetensors header's metadata
// Far above any real layer, and low enough that out_features x in_features fits int64 sizes.
constexpr int64_t kMaxFeatures = (int64_t{1} << 31) - 1;

// A linquant.json module entry.
struct ModuleSpec {
  int64_t in_features = 0, out_features = 0;
  QLinearOptions options;
  bool bias = false;
  at::ScalarType dtype = at::kFloat;
};

std::string read_text(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK_VALUE(f.is_open(), kWho, ": cannot open ", path.string());
  std::string text{std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
  TORCH_CHECK_VALUE(!f.bad(), kWho, ": cannot read ", path.string());
  return text;
}

// `spec[key]`, which must pass `valid`; else a ValueError naming the key and what it expected.
const json::Value& field(const std::string& where, const json::Value& spec, const char* key,
                         bool (*valid)(const json::Value&), const char* expected) {
  const json::Value* v = spec.find(key);
  TORCH_CHECK_VALUE(v && valid(*v), where, " has a missing or invalid '", key, "' (expected ", expected, ", got ",
                    v ? v->describe() : "nothing", ")");
  return *v;
}

bool is_int(const json::Value& v) { return v.is_int(); }
bool is_int_or_null(const json::Value& v) { return v.is_int() || v.is_null(); }
bool is_bool(const json::Value& v) { return v.is_bool(); }
bool is_string(const json::Value& v) { return v.is_string(); }

ModuleSpec parse_spec(const std::string& where, const json::Value& entry) {
  TORCH_CHECK_VALUE(entry.is_object(), where, " must be a JSON object");
  ModuleSpec s;
  for (auto [key, out] : {std::pair{"in_features", &s.in_features}, std::pair{"out_features", &s.out_features}}) {
    *out = field(where, entry, key, is_int, "an integer").as_int();
    TORCH_CHECK_VALUE(*out >= 0 && *out <= kMaxFeatures, where, " has an invalid '", key,
                      "' (expected an integer from 0 to ", kMaxFeatures, ", got ", *out, ")");
  }
  s.options.bits = field(where, entry, "bits", is_int, "an integer").as_int();
  const json::Value& group = field(where, entry, "group_size", is_int_or_null, "an integer or null");
  if (!group.is_null()) s.options.group_size = group.as_int();
  s.options.symmetric = field(where, entry, "symmetric", is_bool, "true or false").as_bool();
  s.bias = field(where, entry, "bias", is_bool, "true or false").as_bool();
  const std::string& dtype = field(where, entry, "dtype", is_string, "a string").as_string();
  // As python/linquant/weights.py's check_format: groups start on byte boundaries.
  const int64_t bits = s.options.bits;
  TORCH_CHECK_VALUE(bits == 8 || bits == 4 || bits == 2, where, ": bits must be 8, 4 or 2, got ", bits);
  TORCH_CHECK_VALUE(!s.options.group_size || (*s.options.group_size >= 1 && *s.options.group_size % (8 / bits) == 0),
                    where, ": group_size must be a positive multiple of ", 8 / bits, " at ", bits,
                    " bits (groups start on byte boundaries), got ", *s.options.group_size);
  if (dtype == "float32") {
    s.dtype = at::kFloat;
  } else if (dtype == "float16") {
    s.dtype = at::kHalf;
  } else if (dtype == "bfloat16") {
    s.dtype = at::kBFloat16;
  } else {
    C10_THROW_ERROR(ValueError, where + " has an invalid 'dtype' (expected one of float32, float16, bfloat16, got \"" +
                                    dtype + "\")");
  }
  return s;
}

// linquant.json, checked as Python's read_config does: its module entries by name, in file order,
// and the whole document (for "tied" and "save_id").
json::Value read_config(const std::filesystem::path& cfg_path, std::vector<std::pair<std::string, ModuleSpec>>& specs) {
  const std::string cfg = cfg_path.string();
  TORCH_CHECK_VALUE(std::filesystem::is_regular_file(cfg_path), kWho, ": ", cfg,
                    " not found (not a save_quantized directory)");
  json::Value config = json::parse(read_text(cfg_path), kWho + ": " + cfg);
  const json::Value* format = config.find("format");
  const json::Value* version = config.find("format_version");
  const bool ours = format && format->is_string() && format->as_string() == "linquant" && version &&
                    version->is_int() && version->as_int() == kFormatVersion;
  TORCH_CHECK_VALUE(ours, kWho, ": ", cfg, " is not a linquant format ", kFormatVersion, " config (",
                    !config.is_object() ? config.describe()
                                        : "format " + (format ? format->describe() : "none") + ", version " +
                                              (version ? version->describe() : "none"),
                    ")");
  const json::Value* modules = config.find("modules");
  const json::Value* tied = config.find("tied");
  TORCH_CHECK_VALUE(modules && modules->is_object() && (!tied || tied->is_object()), kWho, ": ", cfg,
                    ": 'modules' and 'tied' must be JSON objects");
  if (tied) {
    for (const auto& [name, source] : tied->as_object()) {
      TORCH_CHECK_VALUE(source.is_string(), kWho, ": ", cfg, ": 'tied' maps '", name, "' to ", source.describe(),
                        "; expected the name of the tensor it shares (a string)");
    }
  }
  // Unused here, but checked as Python checks them: a directory one reader refuses, the other does too.
  const json::Value* metadata = config.find("metadata");
  TORCH_CHECK_VALUE(!metadata || metadata->is_object(), kWho, ": ", cfg, ": 'metadata' must be a JSON object, got ",
                    metadata ? metadata->describe() : "");
  const json::Value* save_id = config.find("save_id");  // absent in files from before save ids
  TORCH_CHECK_VALUE(!save_id || save_id->is_string(), kWho, ": ", cfg, ": 'save_id' must be a string, got ",
                    save_id ? save_id->describe() : "");
  if (const json::Value* hf = config.find("transformers")) {
    const json::Value* cls = hf->find("class");
    const json::Value* hf_config = hf->find("config");
    const json::Value* model_type = hf_config ? hf_config->find("model_type") : nullptr;
    TORCH_CHECK_VALUE(cls && cls->is_string() && hf_config && hf_config->is_object() && model_type &&
                          model_type->is_string(),
                      kWho, ": ", cfg,
                      ": 'transformers' must be an object with a 'class' name and a 'config' object holding a "
                      "'model_type'");
  }
  // Quantized mixture-of-experts projections and embeddings (Python's QExpertsWeight, QEmbedding) have
  // no C++ module: refused by name rather than left among the plain tensors, where their buffers would
  // pass for the model's own.
  for (const auto& [key, what] : {std::pair<const char*, const char*>{"experts", "experts projections"},
                                  std::pair<const char*, const char*>{"embeddings", "embeddings"}}) {
    const json::Value* entries = config.find(key);
    if (!entries) continue;
    TORCH_CHECK_VALUE(entries->is_object(), kWho, ": ", cfg, ": '", key, "' must be a JSON object");
    TORCH_CHECK_VALUE(entries->as_object().empty(), kWho, ": ", cfg, ": holds ", entries->as_object().size(),
                      " quantized ", what, " (the first '", entries->as_object().begin()->first,
                      "'), which the C++ API does not run; load this model with Python's linquant.load_quantized");
  }
  for (const auto& [name, entry] : modules->as_object()) {
    specs.emplace_back(name, parse_spec(kWho + ": " + cfg + ": module '" + name + "'", entry));
  }
  return config;
}

// "'x'" or "none": a save id as the message shows it.
std::string id_text(const std::string* id) { return id ? "'" + *id + "'" : "none"; }

std::string shape_text(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

// The tensor `key` of a layer's format: present, with this shape.
const at::Tensor& layer_tensor(const std::map<std::string, at::Tensor>& state, const std::string& key,
                               const std::string& layer, at::IntArrayRef shape) {
  const auto it = state.find(key);
  TORCH_CHECK_VALUE(it != state.end(), kWho, ": the file has no tensor '", key, "' for the quantized layer '", layer,
                    "'");
  TORCH_CHECK_VALUE(it->second.sizes() == shape, kWho, ": '", key, "' is ", shape_text(it->second.sizes()),
                    " in the file but the layer's format needs ", shape_text(shape));
  return it->second;
}

void check_dtype(const std::string& key, const at::Tensor& t, bool ok, const std::string& expected) {
  TORCH_CHECK_VALUE(ok, kWho, ": '", key, "' is ", detail::dtype_name(t.scalar_type()),
                    " in the file but the layer's format needs ", expected);
}

// The QLinear of one module entry, holding the file's tensors, each checked against the entry
// before the layer is built (its constructor allocates buffers of the entry's sizes).
QLinear build_layer(const std::string& name, const ModuleSpec& s, const std::map<std::string, at::Tensor>& state) {
  const std::string prefix = name.empty() ? "" : name + ".";
  const int64_t groups = !s.options.group_size ? 1
                         : s.in_features == 0  ? 0
                                               : (s.in_features - 1) / *s.options.group_size + 1;
  const auto qdtype = s.options.bits == 8 && s.options.symmetric ? at::kChar : at::kByte;
  const at::Tensor& qweight =
      layer_tensor(state, prefix + "qweight", name, {s.out_features, (s.in_features * s.options.bits + 7) / 8});
  check_dtype(prefix + "qweight", qweight, qweight.scalar_type() == qdtype, detail::dtype_name(qdtype));
  const at::Tensor& scales = layer_tensor(state, prefix + "scales", name, {s.out_features, groups});
  check_dtype(prefix + "scales", scales, scales.scalar_type() == s.dtype, detail::dtype_name(s.dtype));
  // Damaged scales would make every output NaN or inf, silently.
  TORCH_CHECK_VALUE(scales.numel() == 0 || at::isfinite(scales).logical_and_(scales > 0).all().item<bool>(), kWho,
                    ": the scales of '", name.empty() ? "the model" : name,
                    "' hold values that are not finite and positive (a damaged file?)");
  at::Tensor zeros, bias;
  if (!s.options.symmetric) {
    zeros = layer_tensor(state, prefix + "zeros", name, {s.out_features, groups});
    check_dtype(prefix + "zeros", zeros, zeros.scalar_type() == at::kInt, "int32");
  }
  if (s.bias) {  // linear takes any of its float dtypes, whatever the scales' one
    bias = layer_tensor(state, prefix + "bias", name, {s.out_features});
    const auto dt = bias.scalar_type();
    check_dtype(prefix + "bias", bias, dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                "float32, float16 or bfloat16");
  }
  QLinear layer(s.in_features, s.out_features, s.bias, s.options, s.dtype);
  layer->qweight.set_data(qweight);
  layer->scales.set_data(scales);
  if (zeros.defined()) layer->zeros.set_data(zeros);
  if (bias.defined()) layer->bias.set_data(bias);
  return layer;
}

// The names of a layer's tensors in the state_dict.
std::vector<std::string> layer_keys(const std::string& name, const QLinearImpl& layer) {
  const std::string prefix = name.empty() ? "" : name + ".";
  std::vector<std::string> keys;
  for (const auto& buffer : layer.named_buffers(/*recurse=*/false)) keys.push_back(prefix + buffer.key());
  return keys;
}

// The module name owning a state_dict key ("a.b.weight" -> "a.b", "weight" -> "").
std::string owner_of(const std::string& key) {
  const size_t dot = key.rfind('.');
  return dot == std::string::npos ? "" : key.substr(0, dot);
}

}  // namespace

LoadedModel load_quantized(const std::string& dir, c10::Device device) {
  detail::check_load_device(device, kWho);
  const std::filesystem::path root(dir);
  std::vector<std::pair<std::string, ModuleSpec>> specs;
  const json::Value config = read_config(root / kConfigName, specs);
  const std::filesystem::path weights = root / kWeightsName;
  TORCH_CHECK_VALUE(std::filesystem::is_regular_file(weights), kWho, ": ", weights.string(),
                    " not found (an incomplete save_quantized directory)");
  SafetensorsFile file = read_safetensors(weights.string(), device);

  // Both files carry the id of the save that wrote them: a pair from two saves (one interrupted
  // between its two renames, or files copied from two directories) would load one model's weights
  // under another's formats.
  const auto weights_id = file.metadata.find(kSaveIdKey);
  const json::Value* config_id = config.find("save_id");
  const std::string* a = weights_id == file.metadata.end() ? nullptr : &weights_id->second;
  const std::string* b = config_id ? &config_id->as_string() : nullptr;
  TORCH_CHECK_VALUE((!a && !b) || (a && b && *a == *b), kWho, ": ", kWeightsName, " and ", kConfigName, " in ", dir,
                    " come from different saves (save ids ", id_text(a), " and ", id_text(b),
                    "): a save_quantized was interrupted between its two files, or the files were copied from two "
                    "saves; save the model again");

  std::map<std::string, at::Tensor>& state = file.tensors;
  if (const json::Value* tied = config.find("tied")) {
    for (const auto& [name, source] : tied->as_object()) {
      const auto it = state.find(source.as_string());
      TORCH_CHECK_VALUE(it != state.end(), kWho, ": '", name, "' is tied to '", source.as_string(),
                        "', which the file does not hold");
      TORCH_CHECK_VALUE(state.count(name) == 0, kWho, ": '", name, "' is both stored in the file and tied to '",
                        source.as_string(), "'");
      state.emplace(name, it->second);
    }
  }

  LoadedModel loaded;
  for (const auto& [name, spec] : specs) loaded.layers.emplace(name, build_layer(name, spec, state));
  std::set<std::string> layer_tensors;
  for (const auto& [name, layer] : loaded.layers) {
    for (std::string& key : layer_keys(name, *layer)) layer_tensors.insert(std::move(key));
  }
  for (const auto& [key, t] : state) {
    if (layer_tensors.count(key)) continue;
    const std::string owner = owner_of(key);
    const auto layer = loaded.layers.find(owner);
    if (layer != loaded.layers.end()) {
      std::string keys;
      for (const std::string& k : layer_keys(owner, *layer->second)) keys += (keys.empty() ? "" : ", ") + k;
      C10_THROW_ERROR(ValueError, kWho + ": the file holds '" + key + "', which the quantized layer '" + owner +
                                      "' does not have (its tensors: " + keys + ")");
    }
    loaded.tensors.emplace(key, t);
  }
  return loaded;
}

void load_into(torch::nn::Module& model, const LoadedModel& loaded) {
  const std::string who = "linquant::load_into";
  std::vector<std::pair<at::Tensor, at::Tensor>> assignments;  // (the model's tensor, the loaded one)

  const auto submodules = model.named_modules("", /*include_self=*/false);
  for (const auto& [name, layer] : loaded.layers) {
    torch::nn::Module* found = &model;
    if (!name.empty()) {
      const auto* child = submodules.find(name);
      TORCH_CHECK_VALUE(child, who, ": the model has no module '", name,
                        "' that the file quantized; is this the right model?");
      found = child->get();
    }
    auto* target = dynamic_cast<QLinearImpl*>(found);
    TORCH_CHECK_VALUE(target || !dynamic_cast<torch::nn::LinearImpl*>(found), who, ": the module at '", name,
                      "' is a torch::nn::Linear; build the model with the loaded QLinear there (loaded.layers.at(\"",
                      name, "\")): replacing it with replace_module would change the registry only, while its "
                      "parent's member or a Sequential would still call the Linear");
    TORCH_CHECK_VALUE(target, who, ": the module at '", name, "' is a ", found->name(),
                      ", expected a linquant::QLinear");
    if (target == layer.get()) continue;
    const QLinearImpl& want = *layer;
    const std::pair<const char*, std::pair<int64_t, int64_t>> fields[] = {
        {"in_features", {target->in_features, want.in_features}},
        {"out_features", {target->out_features, want.out_features}},
        {"bits", {target->options.bits, want.options.bits}},
        {"group_size (0: per-channel)", {target->options.group_size.value_or(0), want.options.group_size.value_or(0)}},
        {"symmetric", {target->options.symmetric, want.options.symmetric}},
        {"bias", {target->bias.defined(), want.bias.defined()}}};
    for (const auto& [field_name, values] : fields) {
      TORCH_CHECK_VALUE(values.first == values.second, who, ": the QLinear at '", name, "' has ", field_name, " = ",
                        values.first, ", the file's has ", values.second);
    }
    assignments.emplace_back(target->qweight, want.qweight);
    assignments.emplace_back(target->scales, want.scales);
    if (want.zeros.defined()) assignments.emplace_back(target->zeros, want.zeros);
    if (want.bias.defined()) assignments.emplace_back(target->bias, want.bias);
  }

  // The model's other parameters and buffers: exactly the loaded tensors.
  std::map<std::string, at::Tensor> own;
  for (const auto& tensors : {model.named_parameters(), model.named_buffers()}) {
    for (const auto& item : tensors) {
      if (!loaded.layers.count(owner_of(item.key()))) own.emplace(item.key(), item.value());
    }
  }
  for (const auto& [key, t] : own) {
    TORCH_CHECK_VALUE(loaded.tensors.count(key), who, ": the file has no tensor for '", key,
                      "'; is this the right model?");
  }
  for (const auto& [key, t] : loaded.tensors) {
    const auto it = own.find(key);
    TORCH_CHECK_VALUE(it != own.end(), who, ": the model has no parameter or buffer '", key, "' from the file");
    const at::Tensor& mine = it->second;
    TORCH_CHECK_VALUE(mine.sizes() == t.sizes(), who, ": '", key, "' is ", shape_text(t.sizes()),
                      " in the file but ", shape_text(mine.sizes()), " in the model");
    // Float tensors take the file's float dtype; integer ones must match (they are formats, indices).
    const bool same_kind = mine.is_floating_point() == t.is_floating_point();
    TORCH_CHECK_VALUE(same_kind && (t.is_floating_point() || mine.scalar_type() == t.scalar_type()), who, ": '", key,
                      "' is ", detail::dtype_name(t.scalar_type()), " in the file but the model expects ",
                      detail::dtype_name(mine.scalar_type()));
    assignments.emplace_back(mine, t);
  }
  for (auto& [mine, t] : assignments) mine.set_data(t);
}

}  // namespace linquant
