"""Weights are read at every call. Whatever changes a module's weights between two of its
calls (in place, .data, a new Parameter, load_state_dict, a dtype change, a parametrization
added or removed, a plain tensor in place of a deleted parameter as AWD-LSTM's WeightDrop
sets, torch.func.functional_call), the next call computes with the weights the module holds
then: the same results as torch.nn's twin holding those weights, with packing (float64)."""

import pytest
import torch
from testing import CELL_KINDS, TOL, packed_baseline, tensors_of
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import varlen_rnn

F64 = torch.float64
KINDS = ["gru", "lstm_proj", "rnn_relu"]
LENGTHS = [3, 1, 4]


def _classes(kind):
    if kind == "gru":
        return nn.GRU, varlen_rnn.GRU, {}
    nn_cls, extra = CELL_KINDS[kind]
    return nn_cls, getattr(varlen_rnn, nn_cls.__name__), extra(4)


def _module(kind, dtype=F64):
    _, cls, extra = _classes(kind)
    torch.manual_seed(0)
    return cls(3, 4, num_layers=2, bidirectional=True, dtype=dtype, **extra)


def _random(t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=F64).to(t.dtype)


def _nn_twin(kind, ours, weights=None):
    """torch.nn's module holding ours' weights as ours reads them now (getattr), or weights."""
    nn_cls, _, extra = _classes(kind)
    names = ours._flat_weights_names
    state = {n: getattr(ours, n).detach() for n in names} if weights is None else weights
    dtype = state[names[0]].dtype
    ref = nn_cls(3, 4, num_layers=2, bidirectional=True, dtype=dtype, **extra)
    ref.load_state_dict(state)
    return ref


class _Scale(nn.Module):
    def forward(self, w):
        return 0.5 * w


def _in_place(m):
    with torch.no_grad():
        m.weight_hh_l0.mul_(0.5)


def _data(m):
    m.weight_ih_l1_reverse.data = _random(m.weight_ih_l1_reverse, 1)


def _new_parameter(m):
    m.bias_hh_l1 = nn.Parameter(_random(m.bias_hh_l1, 2))


def _load_state_dict(m):
    m.load_state_dict({k: _random(v, 3 + i) for i, (k, v) in enumerate(m.state_dict().items())})


def _parametrize(m):
    parametrizations.weight_norm(m, "weight_hh_l1_reverse")
    with torch.no_grad():  # weight_norm alone leaves the weight as it was
        m.parametrizations.weight_hh_l1_reverse.original0.mul_(2.0)


def _parametrize_then_remove(m):
    parametrize.register_parametrization(m, "weight_ih_l0", _Scale())
    parametrize.remove_parametrizations(m, "weight_ih_l0", leave_parametrized=True)


def _plain_tensor(m):
    w = _random(m.weight_hh_l1, 4)
    del m.weight_hh_l1
    m.weight_hh_l1 = w  # a plain tensor attribute now, no longer in _parameters


CHANGES = {
    "in_place": _in_place,
    "data": _data,
    "new_parameter": _new_parameter,
    "load_state_dict": _load_state_dict,
    "parametrize": _parametrize,
    "parametrize_then_remove": _parametrize_then_remove,
    "plain_tensor": _plain_tensor,
    "double": lambda m: m.double(),  # from float32: weights cast to float64 differ after 1e-8
}


def _check(kind, ours, x, before):
    got = tensors_of(ours(x, lengths=LENGTHS))
    want = tensors_of(packed_baseline(_nn_twin(kind, ours), x, LENGTHS))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[x.dtype])
    # The change mattered: a module that kept the old weights would have failed above.
    if got[0].dtype == before[0].dtype:
        assert not all(torch.allclose(g, b) for g, b in zip(got, before))


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("kind", KINDS)
def test_the_next_call_reads_the_changed_weights(kind, change):
    ours = _module(kind, torch.float32 if change == "double" else F64)
    x = torch.randn(4, 3, 3, dtype=F64).to(ours.weight_ih_l0.dtype)
    before = [t.detach() for t in tensors_of(ours(x, lengths=LENGTHS))]
    CHANGES[change](ours)
    dtype = ours._flat_weights[0].dtype
    _check(kind, ours, x.to(dtype), before)


@pytest.mark.parametrize("kind", KINDS)
def test_functional_call_weights_for_one_call_only(kind):
    ours = _module(kind)
    x = torch.randn(4, 3, 3, dtype=F64)
    before = [t.detach() for t in tensors_of(ours(x, lengths=LENGTHS))]
    state = {k: v.detach() for k, v in ours.state_dict().items()}
    swapped = {"weight_hh_l0": _random(ours.weight_hh_l0, 5), "bias_ih_l1_reverse": None}
    swapped["bias_ih_l1_reverse"] = _random(ours.bias_ih_l1_reverse, 6)
    got = tensors_of(torch.func.functional_call(ours, swapped, (x,), {"lengths": LENGTHS}))
    ref = _nn_twin(kind, ours, {**state, **swapped})
    want = tensors_of(packed_baseline(ref, x, LENGTHS))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[F64])
    assert not all(torch.allclose(g, b) for g, b in zip(got, before))
    after = tensors_of(ours(x, lengths=LENGTHS))  # its own weights again
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, **TOL[F64])
