"""PyTorch's own test data for torch.nn.LSTM and torch.nn.RNN, run against varlen_rnn.LSTM and
varlen_rnn.RNN (tests/test_module_db.py does the same for the GRU).

The LSTM and RNN entries of torch.testing._internal.common_modules.module_db give sample
inputs (module_inputs_func; the RNN's also with PackedSequence) and error inputs
(module_error_inputs_func). Each test does what the matching test of PyTorch's
test/test_modules.py does, with our class in nn's place, and also compares with nn's module on
the same weights. No sample or error input is skipped.
"""

from unittest import mock

import pytest
import torch
from testing import ALL_DEVICES
from torch import nn
from torch.utils._pytree import tree_flatten

import varlen_rnn

# Importing torch's test utilities would freeze torch.backends flags for the whole pytest
# process (torch.backends.disable_global_flags); other test files set them.
with mock.patch.object(torch.backends, "disable_global_flags", lambda: None):
    from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
    from torch.testing._internal.common_utils import freeze_rng_state

CLASSES = {"LSTM": (nn.LSTM, varlen_rnn.LSTM), "RNN": (nn.RNN, varlen_rnn.RNN)}
INFOS = {name: next(m for m in module_db if m.module_cls is c[0]) for name, c in CLASSES.items()}
DTYPES = [torch.float32, torch.float64]


def samples(name, device, dtype, requires_grad=False, training=True, packed=False):
    info = INFOS[name]
    inputs = info.module_inputs_func(
        info,
        device=device,
        dtype=dtype,
        requires_grad=requires_grad,
        training=training,
        with_packed_sequence=packed,
    )
    if packed:  # the packed samples are the ones the call adds to the others
        inputs = [
            s for s in inputs if isinstance(s.forward_input.args[0], nn.utils.rnn.PackedSequence)
        ]
    return inputs


def build(name, sample, device, dtype, training):
    c = sample.constructor_input
    m = CLASSES[name][1](*c.args, **c.kwargs).to(device).to(dtype)
    return m.train(training)


def twin(name, ours):
    """nn's module with ours' configuration and weights."""
    ref = CLASSES[name][0](ours.input_size, ours.hidden_size, **_config(ours))
    ref.load_state_dict(ours.state_dict())
    return ref.to(ours.weight_ih_l0).train(ours.training)


def _config(m):
    return {k: v for k, v in m._config().items() if k not in ("input_size", "hidden_size")}


def flat(outputs):
    """Tensors of (output, state); a PackedSequence contributes its data and indices."""
    return [t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor)]


def close(a, b, **kw):
    for x, y in zip(flat(a), flat(b), strict=True):
        torch.testing.assert_close(x, y, **kw)


# The LSTM entry has no PackedSequence samples (its inputs function ignores the flag).
CASES = [("LSTM", False), ("RNN", False), ("RNN", True)]


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name,packed", CASES)
def test_forward(device, dtype, training, name, packed):
    """test_modules.py test_forward: the sample's reference (unbatched = batched of one),
    then nn's module on the same weights; .float()/.double() keep parameters on device."""
    cases = samples(name, device, dtype, training=training, packed=packed)
    assert cases
    for s in cases:
        with freeze_rng_state():
            m = build(name, s, device, dtype, training)
            args, kwargs = s.forward_input.args, s.forward_input.kwargs
            out = m(*args, **kwargs)
            if s.reference_fn is not None and not packed:  # its reference unsqueezes a tensor
                close(out, s.reference_fn(m, *args, **kwargs))
            close(out, twin(name, m)(*args, **kwargs))
            getattr(m, {torch.float32: "float", torch.float64: "double"}[dtype])()
            m(*args, **kwargs)
            for p in m.parameters():
                assert p.device == torch.device(device) and p.dtype == dtype


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_factory_kwargs_and_repr(device, name):
    for s in samples(name, device, torch.float32):
        c = s.constructor_input
        m = CLASSES[name][1](*c.args, **c.kwargs, device=device, dtype=torch.float64)
        assert all(
            p.device == torch.device(device) and p.dtype == torch.float64 for p in m.parameters()
        )
        assert repr(m) == repr(twin(name, m))


def _is_packed(x):
    return isinstance(x, nn.utils.rnn.PackedSequence)


def _gradient_check(name, device, check, packed=False):
    """test_modules.py _test_gradients_helper (total derivative): the forward inputs and
    every parameter are the differentiable arguments."""
    cases = samples(name, device, torch.float64, requires_grad=True, packed=packed)
    assert cases
    for s in cases:
        m = build(name, s, device, torch.float64, True)
        names = [n for n, _ in m.named_parameters()]
        args, spec = tree_flatten(list(s.forward_input.args), is_leaf=_is_packed)
        if packed:  # the differentiable part of a PackedSequence is its data
            seq = args[0]
            args = [seq.data, *args[1:]]
        n_in = len(args)

        def fn(*flat_args):
            a = list(flat_args[:n_in])
            if packed:
                a[0] = seq._replace(data=a[0])
            call = spec.unflatten(a)
            params = dict(zip(names, flat_args[n_in:]))
            with freeze_rng_state():
                outs = flat(torch.func.functional_call(m, params, tuple(call)))
                return tuple(t for t in outs if t.is_floating_point())  # not batch_sizes

        params = [p.detach().clone().requires_grad_() for p in m.parameters()]
        assert check(fn, (*args, *params))


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("name,packed", CASES)
def test_grad(device, name, packed):
    """fast_mode (random projections of the Jacobian) keeps the samples quick."""
    check = lambda f, a: torch.autograd.gradcheck(f, a, atol=1e-7, fast_mode=True)  # noqa: E731
    _gradient_check(name, device, check, packed)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_gradgrad(device, name):
    check = lambda f, a: torch.autograd.gradgradcheck(f, a, atol=1e-6, fast_mode=True)  # noqa: E731
    _gradient_check(name, device, check)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_errors(device, dtype, name):
    """Every error input: the same exception type, the message matching torch's regex."""
    info = INFOS[name]
    errors = info.module_error_inputs_func(
        info, device=device, dtype=dtype, requires_grad=False, training=True
    )
    assert errors
    for e in errors:
        c = e.module_error_input.constructor_input
        with pytest.raises(e.error_type, match=e.error_regex):
            m = CLASSES[name][1](*c.args, **c.kwargs)
            assert e.error_on == ModuleErrorEnum.FORWARD_ERROR, "constructed without error"
            f = e.module_error_input.forward_input
            m(*f.args, **f.kwargs)


@pytest.mark.parametrize("device", [d for d in ALL_DEVICES if d != "cpu"])
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_cpu_gpu_parity(device, name):
    """test_modules.py test_cpu_gpu_parity (its tolerance for float64: 4e-4)."""
    for s in samples(name, "cpu", torch.float64, requires_grad=True):
        cpu = build(name, s, "cpu", torch.float64, True)
        gpu = build(name, s, device, torch.float64, True)
        gpu.load_state_dict(cpu.state_dict())
        a_cpu, spec = tree_flatten(list(s.forward_input.args))
        a_gpu = [t.detach().to(device).requires_grad_() for t in a_cpu]
        out_c, out_g = cpu(*spec.unflatten(a_cpu)), gpu(*spec.unflatten(a_gpu))
        close(out_g, out_c, atol=4e-4, rtol=0, check_device=False)
        g = [torch.randn_like(t) for t in flat(out_c)]
        grads_c = torch.autograd.grad(flat(out_c), a_cpu + list(cpu.parameters()), g)
        grads_g = torch.autograd.grad(
            flat(out_g), a_gpu + list(gpu.parameters()), [t.to(device) for t in g]
        )
        close(grads_g, grads_c, atol=4e-4, rtol=0, check_device=False)
