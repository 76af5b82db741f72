// Runs a model exported with torch.export and compiled by AOTInductor
// (torch._inductor.aoti_compile_and_package) from C++, with no Python in the
// process: the deployment path for a model that holds varlen_rnn modules.
//
//   aoti_runner MODEL.pt2 OPS_LIBRARY INPUTS.pt OUTPUTS.pt
//
// OPS_LIBRARY is varlen_rnn's compiled extension (python -c "import
// varlen_rnn._C as c; print(c.__file__)"): loading it registers the
// varlen_rnn ops that the package calls. It is opened with RTLD_LAZY because
// its one Python symbol belongs to the Python import hook, which C++ never
// calls. INPUTS.pt is a tuple of tensors written by torch.save (the model's
// positional inputs, e.g. (tokens [B, T], lengths [B])); OUTPUTS.pt gets the
// outputs as a tuple that torch.load reads.
//
// Build against the libtorch the package was made with (tests/test_export.py
// shows the command):
//   g++ -std=c++20 aoti_runner.cpp -I$TORCH/include
//       -I$TORCH/include/torch/csrc/api/include -L$TORCH/lib
//       -Wl,--no-as-needed -ltorch -ltorch_cpu -lc10 -Wl,-rpath,$TORCH/lib
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 OPS_LIBRARY INPUTS.pt OUTPUTS.pt\n";
    return 2;
  }
  if (dlopen(argv[2], RTLD_LAZY | RTLD_GLOBAL) == nullptr) {
    std::cerr << "OPS_LIBRARY: cannot load " << argv[2] << ": " << dlerror() << "\n";
    return 2;
  }
  std::ifstream in(argv[3], std::ios::binary);
  if (!in) {
    std::cerr << "INPUTS.pt: cannot read " << argv[3] << "\n";
    return 2;
  }
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)),
                                std::istreambuf_iterator<char>());
  const c10::IValue loaded = torch::pickle_load(bytes);  // owns the tensors below
  if (!loaded.isTuple()) {
    std::cerr << "INPUTS.pt: expected a tuple of tensors (torch.save((x, lengths), path))\n";
    return 2;
  }
  std::vector<at::Tensor> inputs;
  for (const c10::IValue& v : loaded.toTupleRef().elements()) inputs.push_back(v.toTensor());
  try {
    torch::inductor::AOTIModelPackageLoader model(argv[1]);
    const std::vector<at::Tensor> outputs = model.run(inputs);
    std::vector<c10::IValue> items(outputs.begin(), outputs.end());
    const std::vector<char> data = torch::pickle_save(c10::ivalue::Tuple::create(std::move(items)));
    std::ofstream(argv[4], std::ios::binary).write(data.data(), data.size());
  } catch (const c10::Error& e) {
    std::cerr << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {  // an op's error comes back through AOTI's C shim
    std::cerr << e.what() << "\n";
    return 1;
  }
  return 0;
}
