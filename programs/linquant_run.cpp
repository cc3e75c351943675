// linquant-run: runs a TorchScript module exported by `linquant export` (a quantized model with
// linquant ops inside) on inputs saved with torch.save, without Python.
//
//   linquant-run MODEL.pt INPUTS.pt [--out OUTPUT.pt] [--runs N] [--device cpu|cuda|cuda:N]
//
// Prints the output shapes and the time per run; --out writes the outputs for torch.load
// (atomically, on the CPU whatever the device). Exit codes: 0 ok, 1 the model or inputs failed
// (or the device is not there), 2 bad usage.
#include <torch/cuda.h>
#include <torch/script.h>
#include <torch/serialize.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "json.h"  // csrc/: the op library's JSON parser

namespace {

constexpr int kFormatVersion = 1;  // python/linquant/export.py writes the same number

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// The record's "format_version", read with the op library's JSON parser.
void check_format(const std::string& path, const std::string& meta) {
  const std::string not_exported = path + " was not exported by `linquant export` (";
  if (meta.empty()) throw std::runtime_error(not_exported + "no linquant.json inside)");
  const linquant::json::Value record = linquant::json::parse(meta, path + "'s linquant.json");
  const linquant::json::Value* version = record.is_object() ? record.find("format_version") : nullptr;
  if (version == nullptr) throw std::runtime_error(not_exported + "no format_version in its linquant.json)");
  if (!version->is_int()) {
    throw std::runtime_error(path + ": its linquant.json's format_version is not a whole number: " +
                             version->describe());
  }
  if (version->as_int() != kFormatVersion) {
    throw std::runtime_error(path + " was exported with linquant format_version " +
                             std::to_string(version->as_int()) + "; this linquant-run reads version " +
                             std::to_string(kFormatVersion));
  }
}

// The inputs file's tensor or list / tuple of tensors, as forward's arguments on `device`.
std::vector<c10::IValue> to_inputs(const c10::IValue& v, const c10::Device& device) {
  std::vector<c10::IValue> out;
  if (v.isTensor()) {
    out = {v};
  } else if (v.isList()) {
    for (const auto& e : v.toListRef()) out.push_back(e);
  } else if (v.isTuple()) {
    out = v.toTupleRef().elements().vec();
  } else {
    throw std::runtime_error("the inputs file must hold a tensor or a list / tuple of tensors");
  }
  for (auto& e : out) {
    if (e.isTensor()) e = e.toTensor().to(device);
  }
  return out;
}

// The output with every tensor on the CPU (for describing and saving).
c10::IValue to_cpu(const c10::IValue& v) {
  if (v.isTensor()) return v.toTensor().cpu();
  if (v.isTuple()) {
    std::vector<c10::IValue> elements;
    for (const auto& e : v.toTupleRef().elements()) elements.push_back(to_cpu(e));
    return c10::ivalue::Tuple::create(std::move(elements));
  }
  return v;
}

// Writes the file beside its final name, then renames it over: a reader never sees half a file.
void write_atomically(const std::string& path, const std::vector<char>& bytes) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    f.flush();
    if (!f) throw std::runtime_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot rename " + tmp + " to " + path);
}

void describe(const c10::IValue& out, std::ostream& os) {
  if (out.isTensor()) {
    const at::Tensor t = out.toTensor();
    os << "  tensor " << t.sizes() << " " << t.scalar_type() << "\n";
  } else if (out.isTuple()) {
    for (const auto& e : out.toTupleRef().elements()) describe(e, os);
  } else {
    os << "  " << out.tagKind() << "\n";
  }
}

int usage() {
  std::cerr << "usage: linquant-run MODEL.pt INPUTS.pt [--out OUTPUT.pt] [--runs N] [--device cpu|cuda|cuda:N]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string out_path;
  int runs = 10;
  c10::Device device(c10::kCPU);
  std::vector<std::string> positional;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--out" && i + 1 < args.size()) {
      out_path = args[++i];
    } else if (args[i] == "--device" && i + 1 < args.size()) {
      try {
        device = c10::Device(args[++i]);
      } catch (const c10::Error&) {
        std::cerr << "linquant-run: --device must be cpu, cuda or cuda:N, got '" << args[i] << "'\n";
        return usage();
      }
    } else if (args[i] == "--runs" && i + 1 < args.size()) {
      const std::string& n = args[++i];
      char* end = nullptr;
      const long value = std::strtol(n.c_str(), &end, 10);
      if (n.empty() || *end != '\0' || value < 1 || value > 1000000) {
        std::cerr << "linquant-run: --runs must be a whole number from 1 to 1000000, got '" << n << "'\n";
        return usage();
      }
      runs = static_cast<int>(value);
    } else if (args[i] == "-h" || args[i] == "--help") {
      usage();
      return 0;
    } else if (!args[i].empty() && args[i][0] == '-') {
      return usage();
    } else {
      positional.push_back(args[i]);
    }
  }
  if (positional.size() != 2) return usage();
  try {
    if (device.is_cuda() && !torch::cuda::is_available()) {
      throw std::runtime_error("--device " + device.str() + ": no CUDA device is available");
    }
    torch::jit::ExtraFilesMap extra{{"linquant.json", ""}};
    torch::jit::Module module = torch::jit::load(positional[0], device, extra);
    check_format(positional[0], extra["linquant.json"]);
    module.eval();
    const std::vector<c10::IValue> inputs = to_inputs(torch::pickle_load(read_file(positional[1])), device);
    torch::NoGradGuard no_grad;
    c10::IValue output = module.forward(inputs);
    // GPU work is asynchronous: time it up to its end.
    const auto sync = [&] { if (device.is_cuda()) torch::cuda::synchronize(device.index()); };
    sync();
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < runs; ++r) output = module.forward(inputs);
    sync();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() / runs;
    output = to_cpu(output);
    std::cout << "outputs:\n";
    describe(output, std::cout);
    std::cout << "time per run: " << ms << " ms (" << runs << " runs, " << device << ")\n";
    if (!out_path.empty()) write_atomically(out_path, torch::pickle_save(output));
  } catch (const c10::Error& e) {
    std::cerr << "linquant-run: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "linquant-run: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
