"""torch.export with dynamic batch and time, and torch.compile(fullgraph=True) of a whole
training step (forward, loss, backward, optimizer update) of a model using varlen_rnn.GRU."""

import copy
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from testing import ALL_DEVICES, OpArguments, make_kind_pair
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.optim.sgd import sgd

import varlen_rnn

VOCAB, E, H, C = 20, 5, 6, 3


class Classifier(nn.Module):
    """Embedding -> varlen_rnn.GRU over padded tokens + lengths -> Linear on the last h_n."""

    def __init__(self, batch_first=True, bidirectional=True):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, E)
        self.gru = varlen_rnn.GRU(
            E, H, num_layers=2, batch_first=batch_first, bidirectional=bidirectional
        )
        self.fc = nn.Linear(H, C)

    def forward(self, tokens, lengths):
        out, h_n = self.gru(self.emb(tokens), lengths=lengths)
        return self.fc(h_n[-1]), out


def _batch(B, T, batch_first, device, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (B, T) if batch_first else (T, B), generator=g)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T  # a full row and, when B > 1, an empty one
    if B > 1:
        lengths[1] = 0
    return tokens.to(device), lengths.to(device)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize(
    "batch_first,strict", [(True, False), (False, True)], ids=["bf-nonstrict", "tf-strict"]
)
def test_export_dynamic_batch_and_time(device, batch_first, strict):
    torch.manual_seed(0)
    model = Classifier(batch_first).to(device).eval()
    b_dim, t_dim = (0, 1) if batch_first else (1, 0)
    Bd, Td = torch.export.Dim("B", min=1, max=64), torch.export.Dim("T", min=1, max=256)
    tokens, lengths = _batch(4, 7, batch_first, device, seed=0)
    ep = torch.export.export(
        model,
        (tokens, lengths),
        dynamic_shapes={"tokens": {b_dim: Bd, t_dim: Td}, "lengths": {0: Bd}},
        strict=strict,
    )
    # Lengths are read by the kernels only: no host sync, no value-specialised guard.
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any(t.startswith("aten.item") or "_local_scalar_dense" in t for t in targets), (
        targets
    )
    assert "varlen_rnn.gru_layer_forward.default" in targets

    buf = io.BytesIO()  # what a serving stack does: save, then load elsewhere
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    for i, (B, T) in enumerate([(4, 7), (6, 11), (1, 3), (13, 40)]):
        tokens, lengths = _batch(B, T, batch_first, device, seed=i + 1)
        with torch.no_grad():
            expected = model(tokens, lengths)
            for runner in (ep.module(), loaded):
                got = runner(tokens, lengths)
                for g, e in zip(got, expected):
                    assert g.shape == e.shape
                    torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    # The kernels still check values the graph cannot see: here on the host (lengths on the
    # device are checked by a device-side assert instead, which leaves the CUDA context
    # unusable: test_cuda.py's test_cuda_out_of_range_length_is_a_device_assert).
    if device == "cpu":
        tokens, lengths = _batch(3, 5, batch_first, device, seed=9)
        lengths[2] = 6
        with pytest.raises(RuntimeError, match=r"lengths must be in \[0, T\]"):
            ep.module()(tokens, lengths)


def _train_step(model, params, momentum_buffers, tokens, lengths, labels, lr):
    logits, _ = model(tokens, lengths)
    loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    with torch.no_grad():
        # torch.optim.SGD.step's own math (the functional form it calls); the method itself
        # graph-breaks on purpose (torch/optim/optimizer.py, _use_grad_for_differentiable).
        # A hand-written `p -= lr * p.grad` is not used: under trace_autograd_ops, torch 2.14
        # drifts from eager from the second step on with it even for nn.Embedding + nn.Linear
        # alone, with no op of ours in the graph (checked with the "eager" backend too).
        sgd(
            params,
            [p.grad for p in params],
            momentum_buffers,
            weight_decay=1e-4,
            momentum=0.9,
            lr=lr,
            dampening=0.0,
            nesterov=False,
            maximize=False,
            foreach=True,
        )
        for p in params:
            p.grad = None
    return loss.detach()


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_training_step_matches_eager(device, backend):
    torch.manual_seed(0)
    eager = Classifier().to(device)
    compiled_model = copy.deepcopy(eager)
    initial = copy.deepcopy(eager.state_dict())
    opt = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    params = list(compiled_model.parameters())
    buffers = [None] * len(params)
    torch.compiler.reset()
    # trace_autograd_ops lets dynamo put loss.backward() inside the one graph.
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step = torch.compile(_train_step, fullgraph=True, backend=backend, dynamic=True)
        for i, (B, T) in enumerate([(4, 7), (4, 7), (5, 9), (3, 4)]):
            tokens, lengths = _batch(B, T, True, device, seed=i)
            labels = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(i)).to(
                device
            )
            opt.zero_grad()
            logits, _ = eager(tokens, lengths)
            loss = nn.functional.cross_entropy(logits, labels)
            loss.backward()
            opt.step()
            loss_c = step(compiled_model, params, buffers, tokens, lengths, labels, 0.1)
            torch.testing.assert_close(loss_c, loss.detach(), atol=1e-6, rtol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        assert not torch.equal(q, initial[name]), f"{name} was not updated"


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_aot_inductor_package_runs_new_shapes(device, tmp_path):
    """The deployment path torch.export leads to: AOTInductor compiles the exported program into
    a .pt2 package that runs without Python tracing; it must call our op and agree with eager on
    batch sizes, times and lengths it was not compiled with."""
    torch.manual_seed(0)
    model = Classifier().to(device).eval()
    Bd, Td = torch.export.Dim("B", min=1, max=64), torch.export.Dim("T", min=1, max=256)
    tokens, lengths = _batch(4, 7, True, device, seed=0)
    ep = torch.export.export(
        model, (tokens, lengths), dynamic_shapes={"tokens": {0: Bd, 1: Td}, "lengths": {0: Bd}}
    )
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "gru.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    for i, (B, T) in enumerate([(6, 11), (1, 3), (13, 40)]):
        tokens, lengths = _batch(B, T, True, device, seed=i + 1)
        with torch.no_grad():
            expected = model(tokens, lengths)
            got = runner(tokens, lengths)
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in torch 2.14
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("cls", [varlen_rnn.GRU, varlen_rnn.LSTM, varlen_rnn.RNN])
def test_jit_trace_and_script(cls, tmp_path):
    """What users of TorchScript already run: torch.jit.trace of a model holding our module
    works (saved, loaded, run on other shapes and lengths); torch.jit.script cannot type our
    forward and says so, naming what to use instead."""
    torch.manual_seed(0)
    rnn = cls(4, 5, num_layers=2, bidirectional=True, batch_first=True).eval()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x, lengths):
            out, h = self.rnn(x, lengths=lengths)
            return out, h[0] if isinstance(h, tuple) else h

    model = Model()
    with torch.no_grad():
        traced = torch.jit.trace(model, (torch.randn(3, 6, 4), torch.tensor([6, 2, 0])))
        traced.save(str(tmp_path / "m.pt"))
        loaded = torch.jit.load(str(tmp_path / "m.pt"))
        for B, T in [(5, 7), (1, 2), (8, 30)]:
            x = torch.randn(B, T, 4)
            lengths = torch.randint(0, T + 1, (B,))
            expected = model(x, lengths)
            for g, e in zip(loaded(x, lengths), expected, strict=True):
                torch.testing.assert_close(g, e, atol=0, rtol=0)
    with pytest.raises(
        RuntimeError,
        match=rf"varlen_rnn\.{cls.__name__} cannot be compiled by "
        r"torch\.jit\.script.*torch\.export",
    ):
        torch.jit.script(model)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in torch 2.14
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("cls", [varlen_rnn.GRU, varlen_rnn.LSTM, varlen_rnn.RNN])
@pytest.mark.parametrize("recipe", ["lengths", "packed"])
def test_jit_trace_with_gradients_on_trains_and_infers(cls, recipe, tmp_path):
    """torch.jit.trace as most users call it: gradients on, trainable parameters, the default
    check_trace (which retraces under no_grad and compares the graphs). The trace records the
    layer op that decides at run time whether to keep what the backward needs, as nn.GRU's
    trace does: the loaded trace trains (gradients equal eager's) and, under no_grad, keeps
    nothing for a backward. "packed": the model packs inside its forward (the recipe, our
    module in nn's place), and the trace follows the batch size and step count of new input."""
    torch.manual_seed(0)
    rnn = cls(4, 5, num_layers=2, bidirectional=True, batch_first=True)

    def run(module, x, lengths):
        if recipe == "packed":
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, h = module(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        else:
            out, h = module(x, lengths=lengths)
        return out, h[0] if isinstance(h, tuple) else h

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x, lengths):
            return run(self.rnn, x, lengths)

    model = Model()
    traced = torch.jit.trace(model, (torch.randn(3, 6, 4), torch.tensor([6, 2, 1])))
    nodes = traced.inlined_graph.nodes()
    kinds = {n.kind() for n in nodes if n.kind().startswith("varlen_rnn::")}
    ragged = "_ragged" if recipe == "packed" else ""
    assert kinds == {f"varlen_rnn::{cls.__name__.lower()}_layer{ragged}"}
    traced.save(str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    x = torch.randn(5, 7, 4, requires_grad=True)  # more rows and steps than traced
    lengths = torch.tensor([7, 2 if recipe == "packed" else 0, 3, 5, 1])
    with OpArguments("_forward", "need_workspace") as rec:
        got = loaded(x, lengths)
    assert rec.values == [True, True]  # two layers, each keeping its workspace
    expected = model(x, lengths)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=0, rtol=0)
    cotangents = [torch.randn_like(e) for e in expected]
    found = torch.autograd.grad(got, [x, *loaded.parameters()], cotangents)
    wanted = torch.autograd.grad(expected, [x, *rnn.parameters()], cotangents)
    assert len(found) == len(wanted) == 1 + 2 * 2 * 4  # x, 2 layers x 2 directions x 4
    for g, e in zip(found, wanted, strict=True):
        torch.testing.assert_close(g, e, atol=0, rtol=0)
    with torch.no_grad(), OpArguments("_forward", "need_workspace") as rec:
        got = loaded(x, lengths)
    assert rec.values == [False, False]
    # inference_mode skips the autograd keys, where the layer op decides: a dispatch mode
    # sees that op itself then, not the forward it calls, so only the results are checked.
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            got = loaded(x, lengths)
        assert not got[0].requires_grad
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=0, rtol=0)


@pytest.mark.parametrize("cls", [varlen_rnn.GRU, varlen_rnn.LSTM, varlen_rnn.RNN])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_fx_symbolic_trace_keeps_the_module_a_leaf(cls, with_lengths):
    """torch.fx.symbolic_trace of a model holding our module, as of one holding torch.nn's:
    the same graph (one call_module node for the RNN, then getitem for the unpacking), and
    the GraphModule computes what the model does."""
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn = rnn
            self.fc = nn.Linear(5, 2)

        def forward(self, x, lengths):
            out, _ = self.rnn(x, lengths=lengths) if with_lengths else self.rnn(x)
            return self.fc(out)

    ours = Model(cls(4, 5))
    theirs = Model(cls._torch_cls(4, 5))

    def structure(gm):
        return [
            (n.op, n.target if n.op != "call_function" else n.target.__name__)
            for n in gm.graph.nodes
        ]

    gm = torch.fx.symbolic_trace(ours)
    if not with_lengths:
        assert structure(gm) == structure(torch.fx.symbolic_trace(theirs))
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "rnn"]
    assert len(calls) == 1
    assert ("lengths" in calls[0].kwargs) is with_lengths
    x, lengths = torch.randn(6, 3, 4), torch.tensor([6, 0, 2])
    torch.testing.assert_close(gm(x, lengths), ours(x, lengths), atol=0, rtol=0)
    # The module itself as the root: nothing to record a call to, and fx cannot trace into
    # it (nor into nn's): a TraceError that says what to do instead.
    with pytest.raises(torch.fx.proxy.TraceError, match="trace a model that holds it"):
        torch.fx.symbolic_trace(ours.rnn)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler (g++) to build the runner")
def test_aot_inductor_package_runs_from_cpp(tmp_path):
    """The package runs from C++ with no Python in the process (examples/aoti_runner.cpp loads
    our extension library for the ops, then the package), on inputs of a shape it was not
    compiled with, and agrees with eager. A varlen_rnn op error crosses into C++ as an error."""
    from torch.utils import cpp_extension

    import varlen_rnn._C

    torch.manual_seed(0)
    model = Classifier().eval()
    Bd, Td = torch.export.Dim("B", min=1, max=64), torch.export.Dim("T", min=1, max=256)
    ep = torch.export.export(
        model, _batch(4, 7, True, "cpu", seed=0), dynamic_shapes=({0: Bd, 1: Td}, {0: Bd})
    )
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    runner = tmp_path / "aoti_runner"
    source = Path(__file__).resolve().parents[1] / "examples" / "aoti_runner.cpp"
    libs = cpp_extension.library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in cpp_extension.include_paths())]
    links = [f"-L{libs}", "-Wl,--no-as-needed", "-ltorch", "-ltorch_cpu", "-lc10"]
    build = subprocess.run(
        [
            "g++",
            "-std=c++20",
            "-O1",
            str(source),
            "-o",
            str(runner),
            *flags,
            *links,
            f"-Wl,-rpath,{libs}",
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]

    def run(inputs):
        torch.save(inputs, tmp_path / "in.pt")
        done = subprocess.run(
            [
                str(runner),
                package,
                varlen_rnn._C.__file__,
                str(tmp_path / "in.pt"),
                str(tmp_path / "out.pt"),
            ],
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        )
        return done, (torch.load(tmp_path / "out.pt") if done.returncode == 0 else None)

    tokens, lengths = _batch(9, 23, True, "cpu", seed=5)
    done, got = run((tokens, lengths))
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        expected = model(tokens, lengths)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    lengths[1] = 24
    done, _ = run((tokens, lengths))
    assert done.returncode == 1 and "lengths must be in [0, T]" in done.stderr, done.stderr


@pytest.mark.xfail(
    torch.__version__ < "2.14",
    reason="torch 2.11's dynamo fails inside pad_packed_sequence on any PackedSequence a "
    "traced module returns, ours or a three-line Python module that rewraps its input's (nn's "
    "RNNs, which dynamo skips, compile); torch 2.14 compiles both",
    raises=torch._dynamo.exc.TorchRuntimeError,
    strict=True,
)
@pytest.mark.parametrize("kind", ["gru", "lstm_proj", "rnn_tanh"])
def test_compile_of_the_recipe_with_our_module(kind):
    """The recipe that packs inside a compiled function, our module in nn's place: torch.compile
    (not fullgraph: torch's pack_padded_sequence breaks the graph, for nn's modules too, and our
    PackedSequence path reads batch_sizes on the host) runs it and gives nn + packing's numbers,
    forward and every gradient, in float64, on the first shapes and on new ones."""
    ref, ours = make_kind_pair(kind, 4, 5, num_layers=2, bidirectional=True, batch_first=True)

    def recipe(module, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, h = module(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        h = h if isinstance(h, tuple) else (h,)
        return (out, *h)

    torch.compiler.reset()
    compiled = torch.compile(recipe, backend="aot_eager")
    for seed, (B, T) in enumerate([(3, 6), (3, 6), (5, 9)]):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(B, T, 4, generator=g, dtype=torch.float64)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[-1] = T
        results = []
        for fn, module in ((compiled, ours), (recipe, ref)):
            xi = x.clone().requires_grad_()
            outs = fn(module, xi, lengths)
            loss = sum(
                (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs
            )
            params = [xi, *module.parameters()]
            results.append([*outs, *torch.autograd.grad(loss, params)])
        assert len(results[0]) == len(results[1])
        for k, (a, b) in enumerate(zip(*results)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m: f"{k}: {m}")
