// The kernels of {gru,lstm,rnn}_layer[_ragged] (csrc/ops.cpp): the forward op
// with need_workspace decided when the call runs, its workspace dropped (and,
// for packed rows, the step count read from batch_sizes).
//
// Why an op of its own: a traced graph (torch.jit.trace) records each op with
// its arguments, so a flag computed in Python from the grad mode at trace time
// would be a constant of the graph. torch.nn's RNN ops make the choice inside
// the call (their autograd kernel); this op does it the same way, one level
// above autograd (CompositeImplicitAutograd), so one traced graph keeps what
// the backward needs when it is run for training and nothing when it is run
// under no_grad / inference_mode. Eager calls and torch.compile call the
// forward op directly (varlen_rnn/ops.py), as before.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

namespace varlen_rnn {
namespace {

// A gradient is wanted from the call: grad mode on and a tensor argument
// requiring one (the lengths and indices never do).
bool gradient_wanted(const torch::jit::Stack& stack, size_t first, size_t count) {
  if (!at::GradMode::is_enabled()) return false;
  for (size_t k = first; k < first + count; ++k) {
    const c10::IValue& v = stack[k];
    if (v.isTensor() && v.toTensor().requires_grad()) return true;
  }
  return false;
}

void deciding_workspace(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const size_t n = schema.arguments().size();
  const size_t first = stack->size() - n;
  const std::string forward_name = schema.name() + "_forward";
  const c10::OperatorHandle forward =
      c10::Dispatcher::singleton().findSchemaOrThrow(forward_name.c_str(), "");
  // Packed rows (layout 1): the steps are batch_sizes.size(0), read here rather than
  // taken from max_len, which a trace holds as the traced call's constant.
  const auto layout = schema.argumentIndexWithName("layout");
  if (layout && (*stack)[first + *layout].toInt() == 1) {
    const int64_t steps =
        (*stack)[first + *schema.argumentIndexWithName("seq_index")].toTensor().size(0);
    (*stack)[first + *schema.argumentIndexWithName("max_len")] = c10::IValue(c10::SymInt(steps));
  }
  stack->emplace_back(gradient_wanted(*stack, first, n));
  forward.callBoxed(stack);  // the forward's results, the workspace last
  stack->pop_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(varlen_rnn, CompositeImplicitAutograd, m) {
  for (const char* name : {"gru_layer", "gru_layer_ragged", "lstm_layer", "lstm_layer_ragged",
                           "rnn_layer", "rnn_layer_ragged"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&deciding_workspace>());
  }
}

}  // namespace varlen_rnn
