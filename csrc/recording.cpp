// The kernels of {gru,lstm,rnn}_layer[_ragged]_recording (csrc/ops.cpp): an
// eager call that records a graph (varlen_rnn/ops.py _layer) runs the forward
// op below autograd, keeping its workspace, and records one node of its own,
// LayerBackward, whose apply calls the backward op. Both in C++: a decoder's
// one-step calls record one node per step, and the Python autograd function
// that did this before cost more than the step's products in that case (ad
// hoc, GRU B=1 I=H=256, 2 threads: the function's apply 19 us above the
// forward op, its backward 35 us above the backward op, a step's share of the
// whole being about 300 us).
//
// Written once for every layer op: each op's plan (where the backward op's
// arguments come from) is read from the forward and backward schemas by
// argument name. The registered autograd of the forward ops
// (varlen_rnn/_autograd.py) stays what torch.compile, export, jit tracing and
// torch.func differentiate, and what a gradient of a gradient runs here: under
// create_graph the node recomputes the layer with the forward op and its
// registered autograd and differentiates that with create_graph, whose
// backward is the differentiable recomputation (_autograd.py
// _differentiable_backward). First-order gradients never go through Python.
//
// squeezed: one direction's weights given without their D dimension of 1 (a
// module's parameters as they are, [G*H, I] for [1, G*H, I]): the node's edges
// go to the parameters themselves, the [1, ...] views the ops take are made
// below autograd, and the weights' gradients are returned without the D
// dimension. No view node per weight in the graph, which every one-step call's
// backward would otherwise run.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>  // get_current_graph_task_keep_graph
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/variable.h>  // impl::is_tensor_stealable
#include <torch/library.h>

#include <cctype>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "layer.h"  // ConsumableWorkspace

namespace varlen_rnn {
namespace {

namespace ag = torch::autograd;

// The autograd graph's node pointer: std::shared_ptr<Node> up to some torch
// release, c10::intrusive_ptr<Node> in 2.14 (both are supported).
using NodePtr = decltype(ag::Edge::function);

const char* const kLayerOps[] = {"gru_layer",         "gru_layer_ragged", "lstm_layer",
                                 "lstm_layer_ragged", "rnn_layer",        "rnn_layer_ragged"};

// Where one argument of a backward op comes from.
enum class From { kGrad, kArg, kOutput, kWorkspace, kMask };
struct Source {
  From from;
  size_t at;  // kGrad: the incoming gradient (output, h_n, c_n); kArg: the forward argument
};

// One layer op's plan, read from its schemas once.
struct Plan {
  std::string node_name;  // "GRULayerBackward", "LSTMLayerRaggedBackward", ...
  std::optional<c10::OperatorHandle> forward, backward;  // set by make_plan
  size_t n_args = 0;  // the recording op's: the forward's, need_workspace's place holding squeezed
  size_t n_states = 0;  // 1 (h) or 2 (h, c)
  // The differentiable arguments (forward positions), in the node's edge order and the
  // backward op's result order: input, hx[, cx], w_ih, w_hh, b_ih, b_hh[, w_hr].
  std::vector<size_t> diff;
  size_t first_weight = 0;      // diff's index of w_ih
  std::vector<Source> sources;  // the backward op's arguments, in order
};

Plan make_plan(const std::string& name) {
  auto& dispatcher = c10::Dispatcher::singleton();
  Plan p;
  p.forward = dispatcher.findSchemaOrThrow(("varlen_rnn::" + name + "_forward").c_str(), "");
  p.backward = dispatcher.findSchemaOrThrow(("varlen_rnn::" + name + "_backward").c_str(), "");
  const auto& args = p.forward->schema().arguments();
  p.n_args = args.size();
  auto index_of = [&](const std::string& n) -> std::optional<size_t> {
    for (size_t k = 0; k < args.size(); ++k) {
      if (args[k].name() == n) return k;
    }
    return std::nullopt;
  };
  TORCH_INTERNAL_ASSERT(args.back().name() == "need_workspace");
  p.n_states = index_of("cx") ? 2 : 1;
  for (const std::string n : {"input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"}) {
    if (const auto k = index_of(n)) {
      if (n == "w_ih") p.first_weight = p.diff.size();
      p.diff.push_back(*k);
    }
  }
  for (const auto& a : p.backward->schema().arguments()) {
    const std::string& n = a.name();
    if (n == "grad_output") {
      p.sources.push_back({From::kGrad, 0});
    } else if (n == "grad_h_n") {
      p.sources.push_back({From::kGrad, 1});
    } else if (n == "grad_c_n") {
      p.sources.push_back({From::kGrad, 2});
    } else if (n == "output") {
      p.sources.push_back({From::kOutput, 0});
    } else if (n == "workspace") {
      p.sources.push_back({From::kWorkspace, 0});
    } else if (n == "output_mask") {
      p.sources.push_back({From::kMask, 0});
    } else {
      const auto k = index_of(n);
      TORCH_INTERNAL_ASSERT(k, "varlen_rnn: ", name, "_backward's argument ", n,
                            " is not one of its forward's");
      p.sources.push_back({From::kArg, *k});
    }
  }
  // "gru_layer_ragged" -> "GRULayerRaggedBackward"
  const std::string cell = name.substr(0, name.find('_'));
  for (char c : cell) p.node_name += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  p.node_name +=
      name.find("_ragged") != std::string::npos ? "LayerRaggedBackward" : "LayerBackward";
  return p;
}

const Plan& plan_of(const c10::OperatorHandle& op) {
  static const std::unordered_map<std::string, Plan> plans = [] {
    std::unordered_map<std::string, Plan> m;
    for (const char* name : kLayerOps) m.emplace(std::string(name) + "_recording", make_plan(name));
    return m;
  }();
  const std::string& full = op.schema().name();  // "varlen_rnn::gru_layer_recording"
  return plans.at(full.substr(full.find("::") + 2));
}

// Squeezed weights in a forward op's arguments as the ops take them: each its
// [1, ...] view, None left as it is (no graph where the caller is below autograd;
// recorded where it differentiates them).
void op_weights(const Plan& p, std::vector<c10::IValue>& args) {
  for (size_t k = p.first_weight; k < p.diff.size(); ++k) {
    c10::IValue& w = args[p.diff[k]];
    if (w.isTensor()) w = c10::IValue(w.toTensor().unsqueeze(0));
  }
}

struct LayerBackward : public ag::Node {
  explicit LayerBackward(const Plan& plan, bool squeezed)
      : plan_(plan),
        squeezed_(squeezed),
        saved_(plan.n_args - 1),
        consts_(plan.n_args - 1),
        is_tensor_(plan.n_args - 1, false) {}

  std::string name() const override { return plan_.node_name; }

  // Compiled autograd compiles every node of a graph; this one it cannot. ops._layer records
  // the registered autograd's node instead where compiled autograd is on at the forward.
  void compiled_args(ag::CompiledNodeArgs& /*args*/) const override {
    TORCH_CHECK_NOT_IMPLEMENTED(
        false, name(),
        " (varlen_rnn) is not supported by compiled autograd: turn compiled autograd on "
        "before the forward call as well (torch._dynamo.config.compiled_autograd = True, or "
        "its context around forward and backward), and varlen_rnn records a node it "
        "supports");
  }

  void release_variables() override {
    for (auto& s : saved_) s.reset_data();
    output_.reset_data();
    workspace_.reset();
  }

  // The forward's arguments (need_workspace excluded): tensors saved, the rest kept.
  void save(const std::vector<c10::IValue>& args) {
    for (size_t k = 0; k + 1 < plan_.n_args; ++k) {
      if (args[k].isTensor()) {
        saved_[k] = ag::SavedVariable(args[k].toTensor(), false);
        is_tensor_[k] = true;
      } else {
        consts_[k] = args[k];
      }
    }
  }
  void save_results(const at::Tensor& output, at::Tensor workspace) {
    output_ = ag::SavedVariable(output, true);
    workspace_ = std::move(workspace);
  }

  ag::variable_list apply(ag::variable_list&& grads) override {
    const Plan& p = plan_;
    const auto self = getptr();
    std::vector<c10::IValue> args(p.n_args - 1);
    for (size_t k = 0; k + 1 < p.n_args; ++k) {
      args[k] = is_tensor_[k] ? c10::IValue(saved_[k].unpack(self)) : consts_[k];
    }
    // An unused output's gradient arrives undefined. The states' become zeros; the
    // output's stays None, which the backward op reads as zeros without a [T, B, D*H]
    // tensor of them.
    std::vector<at::Tensor> g(1 + p.n_states);
    g[0] = grads[0];
    for (size_t s = 0; s < p.n_states; ++s) {
      const at::Tensor& state = args[p.diff[1 + s]].toTensor();
      g[1 + s] = grads[1 + s].defined() ? grads[1 + s] : at::zeros_like(state);
    }
    if (at::GradMode::is_enabled()) return with_graph(std::move(args), g);
    // Only what autograd asks for: the input's gradient is not wanted where the input
    // is data, the weights' where they are frozen; the op then skips those products.
    const bool want_input = task_should_compute_output(0);
    bool want_weights = false;
    for (size_t k = p.first_weight; k < p.diff.size(); ++k) {
      want_weights = want_weights || task_should_compute_output(k);
    }
    // Unless the graph is kept, autograd frees the workspace right after this call
    // (release_variables): if nothing else holds it, the backward op may write over it
    // (layer.h ConsumableWorkspace; the backend's dG then takes no memory of its own).
    // A workspace that has had a Python wrapper (one a Python kernel returned) is also
    // held by it while C++ holds it: torch's own test of a tensor nothing else holds
    // counts that wrapper's reference where nothing in Python holds the wrapper.
    const bool consumable = workspace_.defined() && ag::impl::is_tensor_stealable(workspace_) &&
                            workspace_.storage().use_count() == 1 &&
                            !ag::get_current_graph_task_keep_graph();
    std::vector<c10::IValue> stack;
    stack.reserve(p.sources.size());
    ag::variable_list result(p.diff.size());
    {
      at::AutoDispatchBelowADInplaceOrView below;
      if (squeezed_) op_weights(p, args);
      for (const Source& s : p.sources) {
        switch (s.from) {
          case From::kGrad:
            stack.emplace_back(g[s.at].defined() ? c10::IValue(g[s.at]) : c10::IValue());
            break;
          case From::kArg:
            stack.push_back(args[s.at]);
            break;
          case From::kOutput:
            stack.emplace_back(output_.unpack(self));
            break;
          case From::kWorkspace:
            stack.emplace_back(workspace_);
            break;
          case From::kMask:
            stack.emplace_back(c10::List<bool>({want_input, want_weights}));
            break;
        }
      }
      {
        const ConsumableWorkspace consume(consumable ? workspace_.const_data_ptr() : nullptr);
        p.backward->callBoxed(&stack);
      }
      // stack: grad_input, the states' gradients, then the weights' in diff's order
      if (want_input) result[0] = stack[0].toTensor();
      for (size_t s = 0; s < p.n_states; ++s) result[1 + s] = stack[1 + s].toTensor();
      for (size_t k = p.first_weight; want_weights && k < p.diff.size(); ++k) {
        if (!args[p.diff[k]].isTensor()) continue;  // no biases, no projection: not wanted
        const at::Tensor gw = stack[k].toTensor();
        result[k] = squeezed_ ? gw.select(0, 0) : gw;
      }
    }
    return result;
  }

 private:
  // backward(create_graph=True): the gradients as differentiable functions of the
  // inputs and of grads. The layer is recomputed by the forward op through its
  // registered autograd, and that is differentiated with create_graph (its backward
  // recomputes the layer with differentiable ops: varlen_rnn/_autograd.py).
  ag::variable_list with_graph(std::vector<c10::IValue> args, const std::vector<at::Tensor>& g) {
    const Plan& p = plan_;
    ag::variable_list wrt;
    std::vector<size_t> which;
    for (size_t k = 0; k < p.diff.size(); ++k) {
      const c10::IValue& v = args[p.diff[k]];
      if (task_should_compute_output(k) && v.isTensor() && v.toTensor().requires_grad()) {
        wrt.push_back(v.toTensor());
        which.push_back(k);
      }
    }
    ag::variable_list result(p.diff.size());
    if (wrt.empty()) return result;
    if (squeezed_) op_weights(p, args);  // recorded: the gradients reach the parameters
    args.emplace_back(true);             // need_workspace
    p.forward->callBoxed(&args);         // output, states, workspace
    ag::variable_list outputs, grad_outputs;
    for (size_t j = 0; j < g.size(); ++j) {
      if (!g[j].defined()) continue;
      outputs.push_back(args[j].toTensor());
      grad_outputs.push_back(g[j]);
    }
    const ag::variable_list found =
        ag::grad(outputs, wrt, grad_outputs, std::nullopt, /*create_graph=*/true,
                 /*allow_unused=*/true);
    for (size_t i = 0; i < which.size(); ++i) {
      result[which[i]] = found[i].defined() ? found[i] : at::zeros_like(wrt[i]);
    }
    return result;
  }

  const Plan& plan_;
  const bool squeezed_;
  std::vector<ag::SavedVariable> saved_;  // by forward argument: the tensors
  std::vector<c10::IValue> consts_;       // by forward argument: the rest (None for tensors)
  std::vector<bool> is_tensor_;           // by forward argument: saved_ holds it
  ag::SavedVariable output_;
  at::Tensor workspace_;  // the forward's, not the user's: consumed by a last backward only
};

template <typename T>
NodePtr make_node(const Plan& plan, bool squeezed) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<ag::Node>>) {
    // deleteNode: the graph's nodes are freed without recursion (long chains of steps).
    T* node = new T(plan, squeezed);
    return std::shared_ptr<T>(node, [](T* n) { deleteNode(n); });
  } else {
    return c10::make_intrusive<T>(plan, squeezed);
  }
}

// kAutograd: the Autograd kernel, which records where a gradient is wanted; the
// other runs below autograd (inference mode), recording nothing.
template <bool kAutograd>
void recording(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const Plan& p = plan_of(op);
  const size_t first = stack->size() - p.n_args;
  std::vector<c10::IValue> args(std::make_move_iterator(stack->begin() + first),
                                std::make_move_iterator(stack->end()));
  stack->erase(stack->begin() + first, stack->end());
  const bool squeezed = args.back().toBool();
  ag::variable_list inputs(p.diff.size());  // the node's edges: the tensors as given
  bool wanted = false;
  for (size_t k = 0; k < p.diff.size(); ++k) {
    const c10::IValue& v = args[p.diff[k]];
    if (!v.isTensor()) continue;
    inputs[k] = v.toTensor();
    wanted = wanted || inputs[k].requires_grad();
  }
  const bool record = kAutograd && wanted && at::GradMode::is_enabled();
  std::vector<c10::IValue> call = args;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    if (squeezed) op_weights(p, call);
    call.back() = c10::IValue(record);  // need_workspace
    p.forward->callBoxed(&call);        // output, states, workspace
  }
  const size_t n_out = 1 + p.n_states;
  if (record) {
    NodePtr node = make_node<LayerBackward>(p, squeezed);
    node->set_next_edges(ag::collect_next_edges(inputs));
    auto* layer = static_cast<LayerBackward*>(node.get());
    layer->save(args);
    ag::variable_list outputs;
    for (size_t j = 0; j < n_out; ++j) outputs.push_back(call[j].toTensor());
    ag::set_history(outputs, node);
    layer->save_results(outputs[0], call[n_out].toTensor());
  }
  for (size_t j = 0; j < n_out; ++j) stack->push_back(std::move(call[j]));
}

}  // namespace

TORCH_LIBRARY_IMPL(varlen_rnn, Autograd, m) {
  for (const char* name : kLayerOps) {
    m.impl((std::string(name) + "_recording").c_str(),
           torch::CppFunction::makeFromBoxedFunction<&recording<true>>());
  }
}

TORCH_LIBRARY_IMPL(varlen_rnn, CompositeExplicitAutograd, m) {
  for (const char* name : kLayerOps) {
    m.impl((std::string(name) + "_recording").c_str(),
           torch::CppFunction::makeFromBoxedFunction<&recording<false>>());
  }
}

}  // namespace varlen_rnn
