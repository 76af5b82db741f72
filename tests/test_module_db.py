"""PyTorch's own test data for torch.nn.GRU, nn.LSTM and nn.RNN, run against varlen_rnn's
modules.

The entries of torch.testing._internal.common_modules.module_db (installed with torch) give
sample inputs (module_inputs_func, with and without PackedSequence where the entry has them)
and error inputs (module_error_inputs_func). Each test here does what the matching test of
PyTorch's test/test_modules.py does, with our class in nn's place, and also compares with nn's
module on the same weights. No sample or error input is skipped: none of them uses T = 0 or a
zero length (the documented extensions where nn raises and we do not).
"""

import io
import pickle
from unittest import mock

import pytest
import torch
from testing import ALL_DEVICES
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

import varlen_rnn

# torch's test utilities import expecttest, which scripts/setup.sh installs and the GPU machine's
# image lacks: there this file is skipped, saying why, and the rest of the suite still runs.
pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest")

# Importing torch's test utilities would freeze torch.backends flags for the whole pytest
# process (torch.backends.disable_global_flags); other test files set them.
with mock.patch.object(torch.backends, "disable_global_flags", lambda: None):
    from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
    from torch.testing._internal.common_utils import freeze_rng_state

CLASSES = {
    "GRU": (nn.GRU, varlen_rnn.GRU),
    "LSTM": (nn.LSTM, varlen_rnn.LSTM),
    "RNN": (nn.RNN, varlen_rnn.RNN),
}
INFOS = {name: next(m for m in module_db if m.module_cls is c[0]) for name, c in CLASSES.items()}
NAMES = sorted(CLASSES)
DTYPES = [torch.float32, torch.float64]
# The LSTM entry has no PackedSequence samples (its inputs function ignores the flag).
CASES = [("GRU", False), ("GRU", True), ("LSTM", False), ("RNN", False), ("RNN", True)]
GPUS = [d for d in ALL_DEVICES if d != "cpu"]


def _is_packed(x):
    return isinstance(x, nn.utils.rnn.PackedSequence)


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
        inputs = [s for s in inputs if _is_packed(s.forward_input.args[0])]
    assert inputs
    return inputs


def build(name, sample, device, dtype, training):
    c = sample.constructor_input
    m = CLASSES[name][1](*c.args, **c.kwargs).to(device).to(dtype)
    return m.train(training)


def twin(name, ours):
    """nn's module with ours' configuration and weights."""
    config = {k: v for k, v in ours._config().items() if k not in ("input_size", "hidden_size")}
    ref = CLASSES[name][0](ours.input_size, ours.hidden_size, **config)
    ref.load_state_dict(ours.state_dict())
    return ref.to(ours.weight_ih_l0).train(ours.training)


def flat(outputs):
    """Tensors of (output, state); a PackedSequence contributes its data and indices."""
    return [t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor)]


def _to_cpu(x):
    """A pytree leaf on the CPU (a PackedSequence is a node: its tensors are leaves)."""
    return x.cpu() if isinstance(x, torch.Tensor) else x


def close(a, b, **kw):
    for x, y in zip(flat(a), flat(b), strict=True):
        torch.testing.assert_close(x, y, **kw)


def _device(device: str) -> torch.device:
    """Where a tensor made on `device` lives: "cuda" means the current GPU, cuda:0 (the H200's
    first run: a parameter's cuda:0 is not torch.device("cuda"))."""
    return torch.empty(0, device=device).device


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name,packed", CASES)
def test_forward(device, dtype, training, name, packed):
    """test_modules.py test_forward: the sample's reference (unbatched = batched of one),
    then nn's module on the same weights; .float()/.double() keep parameters on device."""
    for s in samples(name, device, dtype, training=training, packed=packed):
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
                assert p.device == _device(device) and p.dtype == dtype


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", NAMES)
def test_factory_kwargs_and_repr(device, dtype, name):
    for s in samples(name, device, dtype):
        c = s.constructor_input
        m = CLASSES[name][1](*c.args, **c.kwargs, device=device, dtype=dtype)
        assert all(p.device == _device(device) and p.dtype == dtype for p in m.parameters())
        assert repr(m) == repr(twin(name, m)) and str(m) == str(twin(name, m))


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("name,packed", CASES)
def test_pickle(device, name, packed):
    for s in samples(name, device, torch.float64, packed=packed):
        m = build(name, s, device, torch.float64, True)
        args = s.forward_input.args
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        for copy in (torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(m))):
            assert type(copy) is CLASSES[name][1]
            close(copy(*args), m(*args), rtol=0, atol=0)


def _noncontiguous(t):
    out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
    assert not out.is_contiguous()
    return out.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_tensors(device, name):
    """Same outputs and gradients whether input, the states and the incoming gradients are
    contiguous or not."""
    for s in samples(name, device, torch.float64, requires_grad=True):
        m = build(name, s, device, torch.float64, True)
        args = list(s.forward_input.args)
        grads_out = [torch.randn_like(t) for t in flat(m(*args))]
        results = []
        for make in (lambda t: t, _noncontiguous):
            a = tree_map(make, args)
            outs = m(*a)
            leaves = tree_flatten(a)[0] + list(m.parameters())
            results.append(
                (outs, torch.autograd.grad(flat(outs), leaves, tree_map(make, grads_out)))
            )
        close(results[0][0], results[1][0], rtol=0, atol=0)
        close(results[0][1], results[1][1])


def _gradient_check(name, device, check, packed=False):
    """test_modules.py _test_gradients_helper (total derivative): the forward inputs and
    every parameter are the differentiable arguments."""
    for s in samples(name, device, torch.float64, requires_grad=True, packed=packed):
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
    """fast_mode (random projections of the Jacobian) keeps the samples quick; every entry is
    checked in test_gradcheck.py and test_cells_ops.py."""
    check = lambda f, a: torch.autograd.gradcheck(f, a, atol=1e-7, fast_mode=True)  # noqa: E731
    _gradient_check(name, device, check, packed)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_gradgrad(device, name):
    """nn's modules pass gradgradcheck on the CPU (cuDNN cannot: an expectedFailure there)."""
    check = lambda f, a: torch.autograd.gradgradcheck(f, a, atol=1e-6, fast_mode=True)  # noqa: E731
    _gradient_check(name, device, check)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_errors(device, dtype, training, name):
    """Every error input: the same exception type, the message matching torch's regex."""
    info = INFOS[name]
    errors = info.module_error_inputs_func(
        info, device=device, dtype=dtype, requires_grad=False, training=training
    )
    assert errors
    for e in errors:
        c = e.module_error_input.constructor_input
        with pytest.raises(e.error_type, match=e.error_regex):
            m = CLASSES[name][1](*c.args, **c.kwargs)
            assert e.error_on == ModuleErrorEnum.FORWARD_ERROR, "constructed without error"
            f = e.module_error_input.forward_input
            m(*f.args, **f.kwargs)


@pytest.mark.parametrize("device", GPUS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_cpu_gpu_parity(device, training, name):
    """test_modules.py test_cpu_gpu_parity (its tolerance for float64: 4e-4)."""
    for s in samples(name, "cpu", torch.float64, requires_grad=True, training=training):
        cpu = build(name, s, "cpu", torch.float64, training)
        gpu = build(name, s, device, torch.float64, training)
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


@pytest.mark.parametrize("device", GPUS)
@pytest.mark.parametrize("name", NAMES)
def test_multiple_device_transfer(device, name):
    """The module moved to the CPU and back gives the same results on the same inputs (the
    device's samples, moved: samples drawn on each device hold different numbers)."""
    for s_dev in samples(name, device, torch.float32):
        m = build(name, s_dev, device, torch.float32, True)
        out_dev = m(*s_dev.forward_input.args)
        m.cpu()
        args_cpu = tree_map(_to_cpu, list(s_dev.forward_input.args))
        close(m(*args_cpu), out_dev, check_device=False, atol=1e-5, rtol=1e-4)
        assert all(p.device.type == "cpu" for p in m.parameters())
        m.to(device)
        close(m(*s_dev.forward_input.args), out_dev)


@pytest.mark.parametrize("name", NAMES)
def test_the_documented_extensions_where_nn_raises(name):
    """T = 0 and zero-length sequences: nn's modules (and packing) refuse them, we define them
    (empty output / zero rows, the final state = the initial one). The only places the
    modules differ."""
    ours = CLASSES[name][1](2, 3, 2, bidirectional=True, dtype=torch.float64)
    ref = twin(name, ours)
    hx = torch.randn(4, 2, 3, dtype=torch.float64)
    state = (hx, torch.randn_like(hx)) if name == "LSTM" else hx
    empty = torch.randn(0, 2, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN"):
        ref(empty, state)
    out, h = ours(empty, state)
    assert out.shape == (0, 2, 6)
    for a, b in zip(flat(h), flat(state), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(4, 2, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Length of all samples has to be greater than 0"):
        nn.utils.rnn.pack_padded_sequence(x, [4, 0], enforce_sorted=False)
    out, h = ours(x, state, lengths=[4, 0])
    assert not out[:, 1].any()
    for a, b in zip(flat(h), flat(state), strict=True):
        assert torch.equal(a[:, 1], b[:, 1])
