// linquant::load_quantized and linquant::load_into (linquant/serialization.h): the C++ reader of
// python/linquant/serialization.py's directories, with the checks of its read_config and
// load_quantized, so that both readers accept the same directories.
#include "linquant/serialization.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <type_traits>
#include <vector>

#include "json.h"
#include "quantized_module.h"
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

// The sections of linquant.json listing quantized modules, each of one kind.
enum class Kind { kLayer, kEmbedding, kExperts };

struct Section {
  const char* key;   // in linquant.json
  const char* what;  // an entry, in messages (as Python's read_config names it)
  Kind kind;
};
constexpr Section kSections[] = {{"modules", "module", Kind::kLayer},
                                 {"embeddings", "embedding", Kind::kEmbedding},
                                 {"experts", "experts projection", Kind::kExperts}};

// A linquant.json entry: a weight of `rows` x `cols` (out x in features; tokens x embedding
// dimension) in a format, one per expert for experts projections.
struct ModuleSpec {
  Kind kind = Kind::kLayer;
  int64_t rows = 0, cols = 0, num_experts = 0;
  QLinearOptions options;
  bool bias = false;
  std::optional<int64_t> padding_idx;
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

ModuleSpec parse_spec(const std::string& where, const json::Value& entry, Kind kind) {
  TORCH_CHECK_VALUE(entry.is_object(), where, " must be a JSON object");
  const auto size = [&](const char* key) {
    const int64_t v = field(where, entry, key, is_int, "an integer").as_int();
    TORCH_CHECK_VALUE(v >= 0 && v <= kMaxFeatures, where, " has an invalid '", key,
                      "' (expected an integer from 0 to ", kMaxFeatures, ", got ", v, ")");
    return v;
  };
  ModuleSpec s;
  s.kind = kind;
  if (kind == Kind::kExperts) s.num_experts = size("num_experts");
  if (kind == Kind::kEmbedding) {
    s.rows = size("num_embeddings");
    s.cols = size("embedding_dim");
    const json::Value& pad = field(where, entry, "padding_idx", is_int_or_null, "an integer or null");
    if (!pad.is_null()) {  // saved as nn.Embedding keeps it: counted from the start
      s.padding_idx = pad.as_int();
      TORCH_CHECK_VALUE(*s.padding_idx >= 0 && *s.padding_idx < s.rows, where,
                        " has an invalid 'padding_idx' (expected null or an integer from 0 to num_embeddings - 1 = ",
                        s.rows - 1, ", got ", *s.padding_idx, ")");
    }
  } else {
    s.cols = size("in_features");
    s.rows = size("out_features");
  }
  s.options.bits = field(where, entry, "bits", is_int, "an integer").as_int();
  const json::Value& group = field(where, entry, "group_size", is_int_or_null, "an integer or null");
  if (!group.is_null()) s.options.group_size = group.as_int();
  s.options.symmetric = field(where, entry, "symmetric", is_bool, "true or false").as_bool();
  if (kind == Kind::kLayer) s.bias = field(where, entry, "bias", is_bool, "true or false").as_bool();
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

// linquant.json, checked as Python's read_config does: its modules, embeddings and experts entries
// by name, in file order, and the whole document (for "tied" and "save_id").
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
  std::set<std::string> names;
  for (const Section& section : kSections) {
    const json::Value* entries = config.find(section.key);
    if (!entries) continue;  // "modules" is always there (checked above), the others when not empty
    TORCH_CHECK_VALUE(entries->is_object(), kWho, ": ", cfg, ": '", section.key, "' must be a JSON object");
    for (const auto& entry : entries->as_object()) {
      TORCH_CHECK_VALUE(names.insert(entry.first).second, kWho, ": ", cfg, " lists '", entry.first,
                        "' twice (among modules, embeddings and experts)");
    }
  }
  for (const Section& section : kSections) {
    const json::Value* entries = config.find(section.key);
    if (!entries) continue;
    for (const auto& [name, entry] : entries->as_object()) {
      specs.emplace_back(name, parse_spec(kWho + ": " + cfg + ": " + section.what + " '" + name + "'", entry,
                                          section.kind));
    }
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

// The format's tensors of a quantized module, each checked against its entry before the module is
// built (its constructor allocates buffers of the entry's sizes).
detail::FormatBuffers format_tensors(const std::string& name, const ModuleSpec& s,
                                     const std::map<std::string, at::Tensor>& state) {
  const std::string prefix = name.empty() ? "" : name + ".";
  const auto shape = [&](int64_t last) {
    std::vector<int64_t> sizes;
    if (s.kind == Kind::kExperts) sizes.push_back(s.num_experts);
    sizes.insert(sizes.end(), {s.rows, last});
    return sizes;
  };
  const int64_t groups = detail::group_count(s.cols, s.options);
  const auto qdtype = s.options.bits == 8 && s.options.symmetric ? at::kChar : at::kByte;
  detail::FormatBuffers t;
  t.qweight = layer_tensor(state, prefix + "qweight", name, shape((s.cols * s.options.bits + 7) / 8));
  check_dtype(prefix + "qweight", t.qweight, t.qweight.scalar_type() == qdtype, detail::dtype_name(qdtype));
  t.scales = layer_tensor(state, prefix + "scales", name, shape(groups));
  check_dtype(prefix + "scales", t.scales, t.scales.scalar_type() == s.dtype, detail::dtype_name(s.dtype));
  // Damaged scales would make every output NaN or inf, silently.
  TORCH_CHECK_VALUE(t.scales.numel() == 0 || at::isfinite(t.scales).logical_and_(t.scales > 0).all().item<bool>(),
                    kWho, ": the scales of '", name.empty() ? "the model" : name,
                    "' hold values that are not finite and positive (a damaged file?)");
  if (!s.options.symmetric) {
    t.zeros = layer_tensor(state, prefix + "zeros", name, shape(groups));
    check_dtype(prefix + "zeros", t.zeros, t.zeros.scalar_type() == at::kInt, "int32");
  }
  return t;
}

// Points a freshly built module's format buffers at the file's tensors.
template <typename Impl>
void take(Impl& module, const detail::FormatBuffers& t) {
  module.qweight.set_data(t.qweight);
  module.scales.set_data(t.scales);
  if (t.zeros.defined()) module.zeros.set_data(t.zeros);
}

QLinear build_layer(const std::string& name, const ModuleSpec& s, const std::map<std::string, at::Tensor>& state) {
  const detail::FormatBuffers t = format_tensors(name, s, state);
  at::Tensor bias;
  if (s.bias) {  // linear takes any of its float dtypes, whatever the scales' one
    const std::string key = name.empty() ? "bias" : name + ".bias";
    bias = layer_tensor(state, key, name, {s.rows});
    const auto dt = bias.scalar_type();
    check_dtype(key, bias, dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "float32, float16 or bfloat16");
  }
  QLinear layer(s.cols, s.rows, s.bias, s.options, s.dtype);
  take(*layer, t);
  if (bias.defined()) layer->bias.set_data(bias);
  return layer;
}

QEmbedding build_embedding(const std::string& name, const ModuleSpec& s,
                           const std::map<std::string, at::Tensor>& state) {
  const detail::FormatBuffers t = format_tensors(name, s, state);
  QEmbedding table(s.rows, s.cols, s.options, s.padding_idx, s.dtype);
  take(*table, t);
  return table;
}

QExpertsWeight build_experts(const std::string& name, const ModuleSpec& s,
                             const std::map<std::string, at::Tensor>& state) {
  const detail::FormatBuffers t = format_tensors(name, s, state);
  QExpertsWeight experts(s.num_experts, s.cols, s.rows, s.options, s.dtype);
  take(*experts, t);
  return experts;
}

// The names of a quantized module's tensors in the state_dict.
std::vector<std::string> module_keys(const std::string& name, const torch::nn::Module& module) {
  const std::string prefix = name.empty() ? "" : name + ".";
  std::vector<std::string> keys;
  for (const auto& buffer : module.named_buffers(/*recurse=*/false)) keys.push_back(prefix + buffer.key());
  return keys;
}

// What load_into compares between a model's quantized module and the loaded one: its format
// record, and for a layer whether it has a bias.
detail::NamedSizes compared(const torch::nn::Module& module) {
  if (const auto* layer = dynamic_cast<const QLinearImpl*>(&module)) {
    detail::NamedSizes fields = layer->format_record();
    fields.emplace_back("bias", int64_t{layer->bias.defined()});
    return fields;
  }
  if (const auto* table = dynamic_cast<const QEmbeddingImpl*>(&module)) return table->format_record();
  return dynamic_cast<const QExpertsWeightImpl&>(module).format_record();
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
  std::map<std::string, const torch::nn::Module*> quantized;  // every quantized module, by name
  for (const auto& [name, spec] : specs) {
    const torch::nn::Module* module = nullptr;
    switch (spec.kind) {
      case Kind::kLayer:
        module = loaded.layers.emplace(name, build_layer(name, spec, state)).first->second.get();
        break;
      case Kind::kEmbedding:
        module = loaded.embeddings.emplace(name, build_embedding(name, spec, state)).first->second.get();
        break;
      case Kind::kExperts:
        module = loaded.experts.emplace(name, build_experts(name, spec, state)).first->second.get();
        break;
    }
    quantized.emplace(name, module);
  }
  std::set<std::string> quantized_tensors;
  for (const auto& [name, module] : quantized) {
    for (std::string& key : module_keys(name, *module)) quantized_tensors.insert(std::move(key));
  }
  for (const auto& [key, t] : state) {
    if (quantized_tensors.count(key)) continue;
    const std::string owner = owner_of(key);
    const auto module = quantized.find(owner);
    if (module != quantized.end()) {
      std::string keys;
      for (const std::string& k : module_keys(owner, *module->second)) keys += (keys.empty() ? "" : ", ") + k;
      C10_THROW_ERROR(ValueError, kWho + ": the file holds '" + key + "', which the quantized layer '" + owner +
                                      "' does not have (its tensors: " + keys + ")");
    }
    loaded.tensors.emplace(key, t);
  }
  return loaded;
}

namespace {

const std::string kIntoWho = "linquant::load_into";

using Submodules = torch::OrderedDict<std::string, std::shared_ptr<torch::nn::Module>>;
using Assignments = std::vector<std::pair<at::Tensor, at::Tensor>>;  // (the model's tensor, the loaded one)

// Places the loaded quantized module `want` at `name` in the model: the module there must be an
// Impl (`kind`) with want's format, not the float module it replaces (`Float`, named `float_kind`;
// void where that is no module); its buffers are to take want's tensors.
template <typename Impl, typename Float>
void place(torch::nn::Module& model, const Submodules& submodules, const std::string& name, const Impl& want,
           const char* kind, const char* field, Assignments& assignments, const char* float_kind = nullptr) {
  torch::nn::Module* found = &model;
  if (!name.empty()) {
    const auto* child = submodules.find(name);
    TORCH_CHECK_VALUE(child, kIntoWho, ": the model has no module '", name,
                      "' that the file quantized; is this the right model?");
    found = child->get();
  }
  auto* target = dynamic_cast<Impl*>(found);
  if constexpr (!std::is_void_v<Float>) {
    TORCH_CHECK_VALUE(target || !dynamic_cast<Float*>(found), kIntoWho, ": the module at '", name, "' is a ",
                      float_kind, "; build the model with the loaded ", kind, " there (loaded.", field, ".at(\"",
                      name, "\")): replacing it with replace_module would change the registry only, while its "
                      "parent's member or a Sequential would still call the ", float_kind);
  }
  TORCH_CHECK_VALUE(target, kIntoWho, ": the module at '", name, "' is a ", found->name(), ", expected a linquant::",
                    kind);
  if (target == &want) return;
  const detail::NamedSizes mine = compared(*target), theirs = compared(want);
  for (size_t i = 0; i < mine.size(); ++i) {
    TORCH_CHECK_VALUE(mine[i].second == theirs[i].second, kIntoWho, ": the ", kind, " at '", name, "' has ",
                      mine[i].first, " = ", mine[i].second, ", the file's has ", theirs[i].second);
  }
  auto buffers = target->named_buffers(/*recurse=*/false);
  for (const auto& buffer : want.named_buffers(/*recurse=*/false)) {
    assignments.emplace_back(buffers[buffer.key()], buffer.value());
  }
}

}  // namespace

void load_into(torch::nn::Module& model, const LoadedModel& loaded) {
  const std::string& who = kIntoWho;
  Assignments assignments;
  const Submodules submodules = model.named_modules("", /*include_self=*/false);
  std::set<std::string> quantized;
  for (const auto& [name, layer] : loaded.layers) {
    place<QLinearImpl, torch::nn::LinearImpl>(model, submodules, name, *layer, "QLinear", "layers", assignments,
                                              "torch::nn::Linear");
    quantized.insert(name);
  }
  for (const auto& [name, table] : loaded.embeddings) {
    place<QEmbeddingImpl, torch::nn::EmbeddingImpl>(model, submodules, name, *table, "QEmbedding", "embeddings",
                                                    assignments, "torch::nn::Embedding");
    quantized.insert(name);
  }
  for (const auto& [name, experts] : loaded.experts) {
    // A float model holds experts projections as parameters, not modules: no float module to name.
    place<QExpertsWeightImpl, void>(model, submodules, name, *experts, "QExpertsWeight", "experts", assignments);
    quantized.insert(name);
  }

  // The model's other parameters and buffers: exactly the loaded tensors.
  std::map<std::string, at::Tensor> own;
  for (const auto& tensors : {model.named_parameters(), model.named_buffers()}) {
    for (const auto& item : tensors) {
      if (!quantized.count(owner_of(item.key()))) own.emplace(item.key(), item.value());
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
