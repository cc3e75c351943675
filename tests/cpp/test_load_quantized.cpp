// linquant::load_quantized and linquant::load_into on save_quantized directories this test writes
// itself (as python/linquant/serialization.py lays them out): a small model loads back into C++
// models built either way and computes what the saved one did; every check of Python's
// load_quantized refuses its damaged variant with a ValueError that says which.
#include <ATen/Context.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <optional>
#include <string>

#include "linquant/serialization.h"
#include "serialization_files.h"

namespace {

using namespace serialization_test;
using linquant::QLinear;
using linquant::QLinearImpl;

// A save_quantized directory, piece by piece, so that tests can damage one piece.
struct Save {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::vector<std::pair<std::string, std::string>> config;  // top-level keys of linquant.json, raw JSON values
  std::optional<std::string> weights_id = "0123abcd";

  void set(const std::string& key, const std::string& value) {
    for (auto& [k, v] : config) {
      if (k == key) {
        v = value;
        return;
      }
    }
    config.emplace_back(key, value);
  }
  void erase(const std::string& key) {
    std::erase_if(config, [&](const auto& kv) { return kv.first == key; });
  }
  // Replaces the one occurrence of `from` in the value of `key`.
  void edit(const std::string& key, const std::string& from, const std::string& to) {
    for (auto& [k, v] : config) {
      if (k == key) {
        const size_t at = v.find(from);
        ASSERT_NE(at, std::string::npos) << from;
        v.replace(at, from.size(), to);
      }
    }
  }
  at::Tensor& tensor(const std::string& name) {
    for (auto& [n, t] : tensors) {
      if (n == name) return t;
    }
    throw std::runtime_error("no tensor " + name);
  }
  void write(const fs::path& dir) const {
    std::string text = "{";
    for (const auto& [k, v] : config) text += (text.size() > 1 ? ",\n \"" : "\n \"") + k + "\": " + v;
    write_bytes(dir / "linquant.json", text + "\n}\n");
    std::map<std::string, std::string> metadata{{"format", "pt"}};
    if (weights_id) metadata["linquant_save_id"] = *weights_id;
    write_bytes(dir / "model.safetensors", safetensors_of(tensors, metadata));
  }
};

// The model: an embedding, a 4-bit g8 asymmetric layer (fp32, bias), ReLU, an 8-bit per-channel
// symmetric one (bf16 scales, no bias), and an unquantized head tied to the embedding.
struct Fixture {
  torch::nn::Sequential model;
  Save save;
};

Fixture make_fixture() {
  torch::manual_seed(0);
  torch::nn::Embedding embed(10, 16);
  torch::nn::Linear up(16, 32);
  torch::nn::Linear down(torch::nn::LinearOptions(32, 16).bias(false));
  down->to(at::kBFloat16);
  torch::nn::Linear head(torch::nn::LinearOptions(16, 10).bias(false));
  head->weight.set_data(embed->weight);
  QLinear q_up(QLinearImpl::from_linear(up, {4, 8, false}));
  QLinear q_down(QLinearImpl::from_linear(down, {8, std::nullopt, true}));
  Fixture f{torch::nn::Sequential(embed, q_up, torch::nn::ReLU(), q_down, head), {}};
  f.save.tensors = {{"0.weight", embed->weight.detach()}, {"1.qweight", q_up->qweight}, {"1.scales", q_up->scales},
                    {"1.zeros", q_up->zeros},             {"1.bias", q_up->bias},       {"3.qweight", q_down->qweight},
                    {"3.scales", q_down->scales}};
  f.save.config = {
      {"format", "\"linquant\""},
      {"format_version", "1"},
      {"save_id", "\"0123abcd\""},
      {"modules", R"({"1": {"in_features": 16, "out_features": 32, "bits": 4, "group_size": 8, "symmetric": false,)"
                  R"( "bias": true, "dtype": "float32"},)"
                  R"( "3": {"in_features": 32, "out_features": 16, "bits": 8, "group_size": null, "symmetric": true,)"
                  R"( "bias": false, "dtype": "bfloat16"}})"},
      {"tied", R"({"4.weight": "0.weight"})"},
      {"metadata", "{}"}};
  return f;
}

const at::Tensor& ids() {
  static const at::Tensor t = at::tensor({1, 4, 9, 0, 3, 3}, at::kLong).view({2, 3});
  return t;
}

// A model of the fixture's shape with `layer1` and `layer3` at the quantized places.
torch::nn::Sequential model_with(torch::nn::AnyModule layer1, torch::nn::AnyModule layer3) {
  torch::nn::Sequential m;
  m->push_back(torch::nn::Embedding(10, 16));
  m->push_back(std::move(layer1));
  m->push_back(torch::nn::ReLU());
  m->push_back(std::move(layer3));
  m->push_back(torch::nn::Linear(torch::nn::LinearOptions(16, 10).bias(false)));
  return m;
}

TEST(LoadQuantized, ReadsLayersAndTensorsAsSaved) {
  Fixture f = make_fixture();
  ScratchDir dir;
  f.save.write(dir.path());
  const linquant::LoadedModel loaded = linquant::load_quantized(dir.path().string());
  ASSERT_EQ(loaded.layers.size(), 2u);
  const QLinear& up = loaded.layers.at("1");
  EXPECT_EQ(up->in_features, 16);
  EXPECT_EQ(up->out_features, 32);
  EXPECT_EQ(up->options.bits, 4);
  EXPECT_EQ(up->options.group_size, 8);
  EXPECT_FALSE(up->options.symmetric);
  for (const char* buffer : {"qweight", "scales", "zeros", "bias"}) {
    EXPECT_TRUE(at::equal(up->named_buffers()[buffer], f.model->named_buffers()[std::string("1.") + buffer])) << buffer;
  }
  const QLinear& down = loaded.layers.at("3");
  EXPECT_EQ(down->scales.scalar_type(), at::kBFloat16);
  EXPECT_EQ(down->options.group_size, std::nullopt);
  EXPECT_FALSE(down->zeros.defined());
  EXPECT_FALSE(down->bias.defined());
  EXPECT_EQ(down->named_buffers().size(), 2u);
  ASSERT_EQ(loaded.tensors.size(), 2u);
  EXPECT_TRUE(at::equal(loaded.tensors.at("0.weight"), f.model->named_parameters()["0.weight"]));
  EXPECT_EQ(loaded.tensors.at("4.weight").data_ptr(), loaded.tensors.at("0.weight").data_ptr());  // tied: shared
}

TEST(LoadQuantized, IntoAModelBuiltWithTheLoadedLayers) {
  Fixture f = make_fixture();
  ScratchDir dir;
  f.save.write(dir.path());
  const linquant::LoadedModel loaded = linquant::load_quantized(dir.path().string());
  torch::nn::Sequential model = model_with(torch::nn::AnyModule(loaded.layers.at("1")),
                                           torch::nn::AnyModule(loaded.layers.at("3")));
  linquant::load_into(*model, loaded);
  EXPECT_TRUE(at::equal(model->forward(ids()), f.model->forward(ids())));
  EXPECT_EQ(model->named_parameters()["4.weight"].data_ptr(), model->named_parameters()["0.weight"].data_ptr());
}

TEST(LoadQuantized, IntoPlaceholderLayersOfTheSameFormat) {
  // Layers built by the program with the format it expects take the file's tensors (and the
  // file's float dtype: bf16 scales into a layer made with fp32 ones, as Python's assign=True).
  Fixture f = make_fixture();
  ScratchDir dir;
  f.save.write(dir.path());
  const linquant::LoadedModel loaded = linquant::load_quantized(dir.path().string());
  QLinear up(16, 32, true, linquant::QLinearOptions{4, 8, false});
  QLinear down(32, 16, false, linquant::QLinearOptions{8, std::nullopt, true});
  torch::nn::Sequential model = model_with(torch::nn::AnyModule(up), torch::nn::AnyModule(down));
  linquant::load_into(*model, loaded);
  EXPECT_EQ(down->scales.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(model->forward(ids()), f.model->forward(ids())));
}

TEST(LoadQuantized, SubByteLayersWhosePackedRowsEndInAPartialByte) {
  // in_features whose packed rows end in a partly filled byte, as Python's save_quantized writes
  // them: the row length the loader expects is (in_features * bits + 7) / 8.
  for (const int64_t bits : {4, 2}) {
    for (const int64_t in : {7, 13, 30}) {
      torch::manual_seed(in);
      torch::nn::Linear linear(in, 5);
      QLinear q(QLinearImpl::from_linear(linear, {bits, std::nullopt, false}));
      ASSERT_EQ(q->qweight.size(1), (in * bits + 7) / 8);
      Save save;
      save.tensors = {{"qweight", q->qweight}, {"scales", q->scales}, {"zeros", q->zeros}, {"bias", q->bias}};
      save.config = {{"format", "\"linquant\""},
                     {"format_version", "1"},
                     {"save_id", "\"0123abcd\""},
                     {"modules", "{\"\": {\"in_features\": " + std::to_string(in) + ", \"out_features\": 5, \"bits\": " +
                                     std::to_string(bits) +
                                     ", \"group_size\": null, \"symmetric\": false, \"bias\": true, \"dtype\": "
                                     "\"float32\"}}"},
                     {"tied", "{}"},
                     {"metadata", "{}"}};
      ScratchDir dir;
      save.write(dir.path());
      const linquant::LoadedModel loaded = linquant::load_quantized(dir.path().string());
      QLinear back = loaded.layers.at("");
      EXPECT_TRUE(at::equal(back->qweight, q->qweight)) << bits << " bits, in_features " << in;
      const at::Tensor x = torch::randn({3, in});
      EXPECT_TRUE(at::equal(back->forward(x), q->forward(x))) << bits << " bits, in_features " << in;
    }
  }
}

TEST(LoadQuantized, AModelThatIsItselfAQLinearAndALayerAtTwoPlaces) {
  torch::manual_seed(1);
  QLinear q(QLinearImpl::from_linear(torch::nn::Linear(24, 8), {2, 16, true}));
  Save save;
  save.tensors = {{"qweight", q->qweight}, {"scales", q->scales}, {"bias", q->bias}};
  save.config = {{"format", "\"linquant\""}, {"format_version", "1"},
                 {"modules", R"({"": {"in_features": 24, "out_features": 8, "bits": 2, "group_size": 16,)"
                             R"( "symmetric": true, "bias": true, "dtype": "float32"}})"}};
  save.weights_id.reset();  // files from before save ids carry none, in either file
  ScratchDir dir;
  save.write(dir.path());
  auto loaded = linquant::load_quantized(dir.path().string());
  QLinear into(24, 8, true, linquant::QLinearOptions{2, 16, true});
  linquant::load_into(*into, loaded);
  const at::Tensor x = at::randn({3, 24});
  EXPECT_TRUE(at::equal(into->forward(x), q->forward(x)));

  // One layer registered at two places: saved once, the second place's tensors tied.
  save.tensors = {{"a.qweight", q->qweight}, {"a.scales", q->scales}};
  save.config = {{"format", "\"linquant\""}, {"format_version", "1"},
                 {"modules", R"({"a": {"in_features": 24, "out_features": 8, "bits": 2, "group_size": 16,)"
                             R"( "symmetric": true, "bias": false, "dtype": "float32"},)"
                             R"( "b": {"in_features": 24, "out_features": 8, "bits": 2, "group_size": 16,)"
                             R"( "symmetric": true, "bias": false, "dtype": "float32"}})"},
                 {"tied", R"({"b.qweight": "a.qweight", "b.scales": "a.scales"})"}};
  save.write(dir.path());
  loaded = linquant::load_quantized(dir.path().string());
  EXPECT_EQ(loaded.layers.at("b")->qweight.data_ptr(), loaded.layers.at("a")->qweight.data_ptr());
  EXPECT_TRUE(loaded.tensors.empty());
}

TEST(LoadQuantized, RefusesDamagedDirectoriesSayingWhich) {
  const std::pair<std::function<void(Save&)>, std::string> cases[] = {
      {[](Save& s) { s.config = {{"format", "\"linquant\""}, {"format_version", "2"}}; },
       "linquant.json is not a linquant format 1 config (format \"linquant\", version 2)"},
      {[](Save& s) { s.set("format", "\"other\""); }, "is not a linquant format 1 config (format \"other\", version 1)"},
      {[](Save& s) { s.set("format_version", "1.0"); }, "(format \"linquant\", version 1.0)"},
      {[](Save& s) { s.erase("format_version"); }, "(format \"linquant\", version none)"},
      {[](Save& s) { s.erase("modules"); }, "'modules' and 'tied' must be JSON objects"},
      {[](Save& s) { s.set("tied", "[]"); }, "'modules' and 'tied' must be JSON objects"},
      {[](Save& s) { s.set("tied", R"({"4.weight": 3})"); }, "'tied' maps '4.weight' to 3; expected the name"},
      {[](Save& s) { s.set("metadata", "[]"); }, "'metadata' must be a JSON object, got []"},
      {[](Save& s) { s.set("save_id", "5"); }, "'save_id' must be a string, got 5"},
      {[](Save& s) { s.set("transformers", R"({"class": "Bert"})"); },
       "'transformers' must be an object with a 'class' name and a 'config' object holding a 'model_type'"},
      {[](Save& s) { s.edit("modules", R"("1": {)", R"("1": 7, "x": {)"); }, "module '1' must be a JSON object"},
      {[](Save& s) { s.edit("modules", R"("bits": 4)", R"("bits": "4")"); },
       "module '1' has a missing or invalid 'bits' (expected an integer, got \"4\")"},
      {[](Save& s) { s.edit("modules", R"("bits": 4, )", ""); },
       "module '1' has a missing or invalid 'bits' (expected an integer, got nothing)"},
      {[](Save& s) { s.edit("modules", R"("bits": 4)", R"("bits": 4.0)"); }, "invalid 'bits' (expected an integer, got 4.0)"},
      {[](Save& s) { s.edit("modules", R"("symmetric": false)", R"("symmetric": 0)"); },
       "invalid 'symmetric' (expected true or false, got 0)"},
      {[](Save& s) { s.edit("modules", R"("group_size": 8)", R"("group_size": "8")"); },
       "invalid 'group_size' (expected an integer or null, got \"8\")"},
      {[](Save& s) { s.edit("modules", R"("dtype": "float32")", R"("dtype": "float64")"); },
       "module '1' has an invalid 'dtype' (expected one of float32, float16, bfloat16, got \"float64\")"},
      {[](Save& s) { s.edit("modules", R"("in_features": 16)", R"("in_features": -1)"); },
       "module '1' has an invalid 'in_features' (expected an integer from 0 to 2147483647, got -1)"},
      {[](Save& s) { s.edit("modules", R"("out_features": 32)", R"("out_features": 2147483648)"); },
       "invalid 'out_features' (expected an integer from 0 to 2147483647, got 2147483648)"},
      {[](Save& s) { s.edit("modules", R"("bits": 4)", R"("bits": 3)"); }, "module '1': bits must be 8, 4 or 2, got 3"},
      {[](Save& s) { s.edit("modules", R"("group_size": 8)", R"("group_size": 3)"); },
       "module '1': group_size must be a positive multiple of 2 at 4 bits (groups start on byte boundaries), got 3"},
      {[](Save& s) { s.edit("modules", R"("group_size": 8)", R"("group_size": 0)"); }, "got 0"},
      {[](Save& s) { s.weights_id = "ffff"; },
       "come from different saves (save ids 'ffff' and '0123abcd'): a save_quantized was interrupted"},
      {[](Save& s) { s.weights_id.reset(); }, "come from different saves (save ids none and '0123abcd')"},
      {[](Save& s) { s.erase("save_id"); }, "come from different saves (save ids '0123abcd' and none)"},
      {[](Save& s) { s.set("tied", R"({"4.weight": "nope"})"); },
       "'4.weight' is tied to 'nope', which the file does not hold"},
      {[](Save& s) { s.set("tied", R"({"1.bias": "0.weight"})"); },
       "'1.bias' is both stored in the file and tied to '0.weight'"},
      {[](Save& s) { std::erase_if(s.tensors, [](const auto& t) { return t.first == "1.zeros"; }); },
       "the file has no tensor '1.zeros' for the quantized layer '1'"},
      {[](Save& s) { s.tensor("1.scales") = at::ones({32, 3}); },
       "'1.scales' is [32, 3] in the file but the layer's format needs [32, 2]"},
      {[](Save& s) { s.tensor("1.qweight") = at::zeros({32, 16}, at::kByte); },
       "'1.qweight' is [32, 16] in the file but the layer's format needs [32, 8]"},
      {[](Save& s) { s.tensor("3.qweight") = s.tensor("3.qweight").view(at::kByte); },
       "'3.qweight' is uint8 in the file but the layer's format needs int8"},
      {[](Save& s) { s.tensor("3.scales") = s.tensor("3.scales").to(at::kFloat); },
       "'3.scales' is float32 in the file but the layer's format needs bfloat16"},
      {[](Save& s) { s.tensor("1.zeros") = s.tensor("1.zeros").to(at::kLong); },
       "'1.zeros' is int64 in the file but the layer's format needs int32"},
      {[](Save& s) { s.tensor("1.bias") = s.tensor("1.bias").to(at::kInt); },
       "'1.bias' is int32 in the file but the layer's format needs float32, float16 or bfloat16"},
      {[](Save& s) { s.tensor("3.scales") = s.tensor("3.scales").clone().index_fill_(0, at::tensor({int64_t{5}}), 0); },
       "the scales of '3' hold values that are not finite and positive (a damaged file?)"},
      {[](Save& s) { s.tensor("1.scales") = s.tensor("1.scales").clone().index_fill_(1, at::tensor({int64_t{1}}), NAN); },
       "the scales of '1' hold values that are not finite and positive"},
      {[](Save& s) { s.tensor("1.scales") = -s.tensor("1.scales"); }, "the scales of '1' hold values"},
      {[](Save& s) { s.tensor("1.scales") = s.tensor("1.scales").clone().fill_(INFINITY); }, "the scales of '1'"},
      {[](Save& s) { s.tensors.emplace_back("3.zeros", at::zeros({16, 1}, at::kInt)); },
       "the file holds '3.zeros', which the quantized layer '3' does not have (its tensors: 3.qweight, 3.scales)"},
      {[](Save& s) { s.tensors.emplace_back("3.bias", at::zeros({16})); },
       "the file holds '3.bias', which the quantized layer '3' does not have"},
  };
  for (const auto& [damage, expected] : cases) {
    Fixture f = make_fixture();
    damage(f.save);
    ScratchDir dir;
    f.save.write(dir.path());
    const std::string message = value_error([&] { linquant::load_quantized(dir.path().string()); });
    EXPECT_EQ(message.rfind("linquant::load_quantized: ", 0), 0u) << message;
    EXPECT_NE(message.find(expected), std::string::npos) << expected << " -> " << message;
  }
}

TEST(LoadQuantized, RefusesMissingOrUnreadableFiles) {
  Fixture f = make_fixture();
  ScratchDir dir;
  const std::string path = dir.path().string();
  EXPECT_NE(value_error([&] { linquant::load_quantized(path); })
                .find("linquant.json not found (not a save_quantized directory)"),
            std::string::npos);
  f.save.write(dir.path());
  write_bytes(dir.path() / "linquant.json", "{\"format\": \"linquant\",");
  EXPECT_NE(value_error([&] { linquant::load_quantized(path); }).find("linquant.json is not valid JSON: "),
            std::string::npos);
  write_bytes(dir.path() / "linquant.json", "[]");
  EXPECT_NE(value_error([&] { linquant::load_quantized(path); }).find("is not a linquant format 1 config ([])"),
            std::string::npos);
  f.save.write(dir.path());
  fs::remove(dir.path() / "model.safetensors");
  EXPECT_NE(value_error([&] { linquant::load_quantized(path); })
                .find("model.safetensors not found (an incomplete save_quantized directory)"),
            std::string::npos);
  f.save.write(dir.path());
  const std::string weights = read_bytes(dir.path() / "model.safetensors");
  write_bytes(dir.path() / "model.safetensors", weights.substr(0, weights.size() - 1));
  EXPECT_NE(value_error([&] { linquant::load_quantized(path); }).find("a truncated file?"), std::string::npos);
  f.save.write(dir.path());
  EXPECT_NE(value_error([&] { linquant::load_quantized(path, c10::Device("meta")); })
                .find("linquant::load_quantized: device 'meta' is not a load target"),
            std::string::npos);
}

struct WithSteps : torch::nn::Module {
  WithSteps() {
    fc = register_module("fc", QLinear(8, 4, false, linquant::QLinearOptions{8, std::nullopt, true}));
    steps = register_buffer("steps", at::zeros({1}, at::kLong));
  }
  QLinear fc{nullptr};
  at::Tensor steps;
};

TEST(LoadQuantized, LoadIntoRefusesAModelThatDoesNotMatch) {
  Fixture f = make_fixture();
  ScratchDir dir;
  f.save.write(dir.path());
  const linquant::LoadedModel loaded = linquant::load_quantized(dir.path().string());
  const torch::nn::AnyModule up(loaded.layers.at("1")), down(loaded.layers.at("3"));
  const auto message = [&](torch::nn::Sequential model) {
    return value_error([&] { linquant::load_into(*model, loaded); });
  };
  const auto expect = [](const std::string& message, const std::string& expected) {
    EXPECT_EQ(message.rfind("linquant::load_into: ", 0), 0u) << message;
    EXPECT_NE(message.find(expected), std::string::npos) << expected << " -> " << message;
  };
  expect(message(model_with(torch::nn::AnyModule(torch::nn::Linear(16, 32)), down)),
         "the module at '1' is a torch::nn::Linear; build the model with the loaded QLinear there "
         "(loaded.layers.at(\"1\")): replacing it with replace_module would change the registry only");
  expect(message(model_with(torch::nn::AnyModule(torch::nn::ReLU()), down)),
         "the module at '1' is a torch::nn::ReLUImpl, expected a linquant::QLinear");
  expect(message(torch::nn::Sequential(torch::nn::Embedding(10, 16), up)),
         "the model has no module '3' that the file quantized; is this the right model?");
  expect(message(model_with(torch::nn::AnyModule(QLinear(16, 32, true, linquant::QLinearOptions{8, 8, false})), down)),
         "the QLinear at '1' has bits = 8, the file's has 4");
  expect(message(model_with(torch::nn::AnyModule(QLinear(16, 32, true, linquant::QLinearOptions{4, std::nullopt, false})), down)),
         "the QLinear at '1' has group_size (0: per-channel) = 0, the file's has 8");
  expect(message(model_with(torch::nn::AnyModule(QLinear(16, 32, false, linquant::QLinearOptions{4, 8, false})), down)),
         "the QLinear at '1' has bias = 0, the file's has 1");
  expect(message(model_with(up, torch::nn::AnyModule(QLinear(32, 16, false, linquant::QLinearOptions{8, std::nullopt, false})))),
         "the QLinear at '3' has symmetric = 0, the file's has 1");
  torch::nn::Sequential longer = model_with(up, down);
  longer->push_back(torch::nn::LayerNorm(torch::nn::LayerNormOptions({10})));
  const at::Tensor before = longer->named_parameters()["0.weight"].clone();
  expect(message(longer), "the file has no tensor for '5.bias'; is this the right model?");
  EXPECT_TRUE(at::equal(longer->named_parameters()["0.weight"], before));  // checked before anything changed
  expect(message(torch::nn::Sequential(torch::nn::Embedding(10, 16), up, torch::nn::ReLU(), down)),
         "the model has no parameter or buffer '4.weight' from the file");
  torch::nn::Sequential wider = model_with(up, down);
  wider[0]->as<torch::nn::Embedding>()->weight.set_data(at::zeros({11, 16}));
  expect(message(wider), "'0.weight' is [10, 16] in the file but [11, 16] in the model");

  // Integer tensors must keep their dtype.
  torch::manual_seed(3);
  QLinear fc(QLinearImpl::from_linear(torch::nn::Linear(8, 4), {8, std::nullopt, true}));
  Save save;
  save.tensors = {{"fc.qweight", fc->qweight}, {"fc.scales", fc->scales}, {"steps", at::ones({1}, at::kInt)}};
  save.config = {{"format", "\"linquant\""}, {"format_version", "1"}, {"save_id", "\"0123abcd\""},
                 {"modules", R"({"fc": {"in_features": 8, "out_features": 4, "bits": 8, "group_size": null,)"
                             R"( "symmetric": true, "bias": false, "dtype": "float32"}})"}};
  save.write(dir.path());
  const auto with_steps = std::make_shared<WithSteps>();
  expect(value_error([&] { linquant::load_into(*with_steps, linquant::load_quantized(dir.path().string())); }),
         "'steps' is int32 in the file but the model expects int64");
  save.tensor("steps") = at::ones({1}, at::kLong);
  save.write(dir.path());
  linquant::load_into(*with_steps, linquant::load_quantized(dir.path().string()));
  EXPECT_EQ(with_steps->steps.item<int64_t>(), 1);
  EXPECT_TRUE(at::equal(with_steps->fc->qweight, fc->qweight));  // the member sees what the registry holds
}

}  // namespace

namespace {

// A save with a quantized embedding "emb" (4-bit g8 asymmetric, padding row 2), a head tied to its
// table, and a mixture's projection "moe.up" (2 experts, 2-bit g16 asymmetric, bf16 scales).
struct TableAndExperts {
  linquant::QEmbedding emb;
  linquant::QExpertsWeight up;
  Save save;
};

TableAndExperts table_and_experts() {
  torch::manual_seed(5);
  TableAndExperts f{linquant::QEmbeddingImpl::from_embedding(
                        torch::nn::Embedding(torch::nn::EmbeddingOptions(12, 16).padding_idx(2)), {4, 8, false}),
                    linquant::QExpertsWeightImpl::from_weight(at::randn({2, 8, 32}).to(at::kBFloat16), {2, 16, false}),
                    {}};
  f.save.tensors = {{"emb.qweight", f.emb->qweight}, {"emb.scales", f.emb->scales}, {"emb.zeros", f.emb->zeros},
                    {"moe.up.qweight", f.up->qweight}, {"moe.up.scales", f.up->scales}, {"moe.up.zeros", f.up->zeros}};
  f.save.config = {
      {"format", "\"linquant\""},
      {"format_version", "1"},
      {"save_id", "\"0123abcd\""},
      {"modules", R"({"head": {"in_features": 16, "out_features": 12, "bits": 4, "group_size": 8, "symmetric": false,)"
                  R"( "bias": false, "dtype": "float32"}})"},
      {"embeddings", R"({"emb": {"num_embeddings": 12, "embedding_dim": 16, "padding_idx": 2, "bits": 4,)"
                     R"( "group_size": 8, "symmetric": false, "dtype": "float32"}})"},
      {"experts", R"({"moe.up": {"num_experts": 2, "in_features": 32, "out_features": 8, "bits": 2,)"
                  R"( "group_size": 16, "symmetric": false, "dtype": "bfloat16"}})"},
      {"tied", R"({"head.qweight": "emb.qweight", "head.scales": "emb.scales", "head.zeros": "emb.zeros"})"}};
  return f;
}

// A C++ model with the save's names: `emb`, `head` and `moe` (holding `up`) as given.
std::shared_ptr<torch::nn::Module> model_of(std::shared_ptr<torch::nn::Module> emb,
                                            std::shared_ptr<torch::nn::Module> head,
                                            std::shared_ptr<torch::nn::Module> up) {
  auto model = std::make_shared<torch::nn::Module>();
  model->register_module("emb", std::move(emb));
  model->register_module("head", std::move(head));
  model->register_module("moe", std::make_shared<torch::nn::Module>())->register_module("up", std::move(up));
  return model;
}

}  // namespace

TEST(LoadQuantized, EmbeddingsAndExpertsAsSaved) {
  TableAndExperts f = table_and_experts();
  ScratchDir dir;
  f.save.write(dir.path());
  const linquant::LoadedModel loaded = linquant::load_quantized(dir.path().string());
  EXPECT_TRUE(loaded.tensors.empty());
  linquant::QEmbedding emb = loaded.embeddings.at("emb");
  EXPECT_EQ(emb->padding_idx, std::optional<int64_t>(2));
  const at::Tensor ids = at::tensor({2, 11, 0, 5}, at::kLong);
  EXPECT_TRUE(at::equal(emb->forward(ids), f.emb->forward(ids)));
  // The head over the table's very memory, computing x @ table^T.
  QLinear head = loaded.layers.at("head");
  EXPECT_EQ(head->qweight.data_ptr(), emb->qweight.data_ptr());
  EXPECT_EQ(head->zeros.data_ptr(), emb->zeros.data_ptr());
  const at::Tensor x = at::randn({3, 16});
  EXPECT_TRUE(at::equal(head->forward(x), f.emb->tied_head()->forward(x)));
  linquant::QExpertsWeight up = loaded.experts.at("moe.up");
  EXPECT_EQ(up->scales.scalar_type(), at::kBFloat16);
  const at::Tensor h = at::randn({5, 32}).to(at::kBFloat16);
  for (int64_t e : {0, 1}) EXPECT_TRUE(at::equal(up->linear(h, e), f.up->linear(h, e))) << e;

  // load_into: the loaded modules themselves, or placeholders of the same formats.
  auto same = model_of(emb.ptr(), head.ptr(), up.ptr());
  linquant::load_into(*same, loaded);
  linquant::QEmbedding table(12, 16, linquant::QLinearOptions{4, 8, false});
  QLinear tied(16, 12, false, linquant::QLinearOptions{4, 8, false});
  linquant::QExpertsWeight experts(2, 32, 8, linquant::QLinearOptions{2, 16, false});
  linquant::load_into(*model_of(table.ptr(), tied.ptr(), experts.ptr()), loaded);
  EXPECT_TRUE(at::equal(table->forward(ids), f.emb->forward(ids)));
  EXPECT_TRUE(at::equal(tied->forward(x), f.emb->tied_head()->forward(x)));
  EXPECT_EQ(experts->scales.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(experts->linear(h, 1), f.up->linear(h, 1)));
}

TEST(LoadQuantized, EmbeddingsAndExpertsRefusedSayingWhich) {
  ScratchDir dir;
  const auto load_message = [&](const std::function<void(TableAndExperts&)>& damage) {
    TableAndExperts f = table_and_experts();
    damage(f);
    f.save.write(dir.path());
    return value_error([&] { linquant::load_quantized(dir.path().string()); });
  };
  const std::string config = (dir.path() / "linquant.json").string();
  EXPECT_EQ(load_message([](TableAndExperts& f) { f.save.edit("embeddings", "\"padding_idx\": 2", "\"padding_idx\": 12"); }),
            "linquant::load_quantized: " + config + ": embedding 'emb' has an invalid 'padding_idx' (expected null or "
            "an integer from 0 to num_embeddings - 1 = 11, got 12)");
  EXPECT_EQ(load_message([](TableAndExperts& f) { f.save.edit("experts", "\"num_experts\": 2, ", ""); }),
            "linquant::load_quantized: " + config + ": experts projection 'moe.up' has a missing or invalid "
            "'num_experts' (expected an integer, got nothing)");
  EXPECT_EQ(load_message([](TableAndExperts& f) { f.save.edit("experts", "\"num_experts\": 2", "\"num_experts\": 3"); }),
            "linquant::load_quantized: 'moe.up.qweight' is [2, 8, 8] in the file but the layer's format needs [3, 8, 8]");
  EXPECT_EQ(load_message([](TableAndExperts& f) { f.save.tensor("emb.zeros") = f.save.tensor("emb.zeros").to(at::kLong); }),
            // the head's tensor, tied to it, is checked first (modules before embeddings)
            "linquant::load_quantized: 'head.zeros' is int64 in the file but the layer's format needs int32");
  EXPECT_EQ(load_message([](TableAndExperts& f) { f.save.tensor("moe.up.scales")[1][3][0] = 0; }),
            "linquant::load_quantized: the scales of 'moe.up' hold values that are not finite and positive (a damaged "
            "file?)");
  EXPECT_EQ(load_message([](TableAndExperts& f) { f.save.set("embeddings", "[]"); }),
            "linquant::load_quantized: " + config + ": 'embeddings' must be a JSON object");

  TableAndExperts f = table_and_experts();
  f.save.write(dir.path());
  const linquant::LoadedModel loaded = linquant::load_quantized(dir.path().string());
  const auto into_message = [&](std::shared_ptr<torch::nn::Module> model) {
    return value_error([&] { linquant::load_into(*model, loaded); });
  };
  const auto head = loaded.layers.at("head").ptr();
  const auto up = loaded.experts.at("moe.up").ptr();
  EXPECT_EQ(into_message(model_of(torch::nn::Embedding(12, 16).ptr(), head, up)).rfind(
                "linquant::load_into: the module at 'emb' is a torch::nn::Embedding; build the model with the loaded "
                "QEmbedding there (loaded.embeddings.at(\"emb\")): replacing it with replace_module",
                0),
            0u);
  const auto emb = loaded.embeddings.at("emb").ptr();
  EXPECT_EQ(into_message(model_of(emb, head, linquant::QExpertsWeight(3, 32, 8, linquant::QLinearOptions{2, 16, false}).ptr())),
            "linquant::load_into: the QExpertsWeight at 'moe.up' has num_experts = 3, the file's has 2");
  EXPECT_EQ(into_message(model_of(emb, head, torch::nn::Linear(32, 8).ptr())),
            "linquant::load_into: the module at 'moe.up' is a torch::nn::LinearImpl, expected a linquant::QExpertsWeight");
  EXPECT_EQ(into_message(model_of(linquant::QEmbedding(12, 16, linquant::QLinearOptions{4, 8, true}).ptr(), head, up)),
            "linquant::load_into: the QEmbedding at 'emb' has symmetric = 1, the file's has 0");
}

TEST(LoadQuantized, OntoAGpu) {
  if (!at::hasCUDA()) GTEST_SKIP() << "needs a CUDA GPU";
  Fixture f = make_fixture();
  ScratchDir dir;
  f.save.write(dir.path());
  const linquant::LoadedModel loaded = linquant::load_quantized(dir.path().string(), c10::Device("cuda"));
  EXPECT_TRUE(loaded.layers.at("1")->zeros.is_cuda());
  EXPECT_TRUE(loaded.tensors.at("0.weight").is_cuda());
  // A model built on the CPU: load_into gives it the GPU's tensors.
  torch::nn::Sequential model = model_with(torch::nn::AnyModule(loaded.layers.at("1")),
                                           torch::nn::AnyModule(loaded.layers.at("3")));
  linquant::load_into(*model, loaded);
  const at::Tensor y = model->forward(ids().cuda());
  EXPECT_TRUE(y.is_cuda());
  // The CUDA kernels sum in another order than the CPU ones.
  EXPECT_TRUE(at::allclose(y.cpu(), f.model->forward(ids()), 1e-4, 1e-4));

  // Quantized embeddings and experts too: lookups bit for bit, each expert's linear as on the CPU.
  TableAndExperts g = table_and_experts();
  g.save.write(dir.path());
  const linquant::LoadedModel more = linquant::load_quantized(dir.path().string(), c10::Device("cuda"));
  linquant::QEmbedding emb = more.embeddings.at("emb");
  linquant::QExpertsWeight up = more.experts.at("moe.up");
  EXPECT_TRUE(emb->qweight.is_cuda() && up->scales.is_cuda());
  const at::Tensor tokens = at::tensor({2, 11, 0, 5}, at::kLong);
  EXPECT_TRUE(at::equal(emb->forward(tokens.cuda()).cpu(), g.emb->forward(tokens)));
  const at::Tensor h = at::randn({5, 32}).to(at::kBFloat16);
  EXPECT_TRUE(at::allclose(up->linear(h.cuda(), 1).cpu().to(at::kFloat), g.up->linear(h, 1).to(at::kFloat), 2e-2, 2e-2));
}
