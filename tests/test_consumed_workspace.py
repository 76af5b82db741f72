"""The last backward through a layer writes its gate gradients over the forward's workspace.

An eager call that records a graph keeps its workspace in its node (csrc/recording.cpp). Where
autograd frees it right after the node's backward (the graph is not kept, nothing else holds
it), the backward writes dG over it, in the rows and columns of the saved values it comes from,
and takes no buffer of its own for it: the CPU's (csrc/cpu/recurrence.h backward_impl) and the
CUDA backend's (csrc/cuda/entries.h set_backward_buffers; its kernels write a unit's gradients
where they have just read its saved values). Checked here: the gradients are bit for bit those
of a kept graph (autograd.grad with retain_graph, which leaves the workspace alone), for every
cell, both directions, every layout, the CPU's per-step and split loops, the directions in turn
and at once, the CUDA backend's persistent and fallback paths (on a GPU, and on the emulation:
its code on CPU threads, tests/emulation.py); a kept graph's backward can be run again with the
same results, and the last one after it too; and the backward's peak memory is lower by at
least dG's size than a kept graph's, so the workspace was indeed written over.
"""

import contextlib
import os
import sys

import emulation
import pytest
import torch
from testing import ALL_DEVICES, make_kind_pair
from torch.nn.utils.rnn import pack_padded_sequence

LENGTHS = [9, 3, 9, 1, 6, 0, 4]  # unsorted, ties, a zero length (padded and nested only)
I, H = 5, 16


def run(module, kind, x, lengths):
    """The layer's output and states as plain tensors, for the input in `kind`'s layout."""
    if kind == "padded":
        out, states = module(x, lengths=lengths)
    elif kind == "packed":
        keep = lengths > 0  # a PackedSequence has no empty sequence
        packed = pack_padded_sequence(x[:, keep], lengths[keep], enforce_sorted=False)
        out, states = module(packed)
        out = out.data
    else:  # a jagged nested tensor of the rows, batch first
        rows = [x[: int(n), b] for b, n in enumerate(lengths)]
        values = torch.cat(rows)
        offsets = torch.tensor([0] + lengths.cumsum(0).tolist(), device=x.device)
        out, states = module(torch.nested.nested_tensor_from_jagged(values, offsets))
        out = out.values()
    return [out, *(states if isinstance(states, tuple) else (states,))]


def loss_of(tensors):
    # weights that differ across positions and units, so no gradient is symmetric by chance
    return sum(
        (t * torch.linspace(-1, 2, t.numel(), dtype=t.dtype, device=t.device).view_as(t)).sum()
        for t in tensors
    )


def make(kind_cell, bidirectional, dtype, device, kind, inputs=I):
    _, module = make_kind_pair(
        kind_cell,
        inputs,
        H,
        bidirectional=bidirectional,
        dtype=dtype,
        device=device,
        batch_first=kind == "nested",
        num_layers=2,
    )
    g = torch.Generator().manual_seed(3)
    T = max(LENGTHS)
    x = torch.randn(T, len(LENGTHS), inputs, generator=g, dtype=dtype).to(device).requires_grad_()
    return module, x, torch.tensor(LENGTHS)


def kept_and_last(module, kind, x, lengths):
    """The gradients of a kept graph's backward, then of the last one through the same graph."""
    params = [x, *module.parameters()]
    loss = loss_of(run(module, kind, x, lengths))
    kept = torch.autograd.grad(loss, params, retain_graph=True)
    for p in params:
        p.grad = None
    loss.backward()
    return kept, [p.grad for p in params]


def assert_same_gradients(module, kept, last):
    """The two backwards' gradients (the input's, then the parameters') are the same bits."""
    for name, a, b in zip(["input", *dict(module.named_parameters())], kept, last, strict=True):
        assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max().item():.3g}"


# (bidirectional, the CPU's step loops, its directions: in turn or at once)
LOOPS = {
    "uni-split": (False, "split", "serial"),
    "uni-gemm": (False, "gemm", "serial"),
    "bi-split": (True, "split", "serial"),
    "bi-gemm": (True, "gemm", "serial"),
    "bi-concurrent": (True, "split", "concurrent"),
}
CASES = [("cpu", k) for k in LOOPS] + [
    pytest.param(
        "cuda", k, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    )
    for k in ("uni-split", "bi-split")
]


@pytest.mark.parametrize("device, loops", CASES)
@pytest.mark.parametrize("kind", ["padded", "packed", "nested"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", ["gru", "lstm", "lstm_proj", "rnn_tanh"])
def test_the_last_backward_gives_a_kept_graphs_gradients(
    monkeypatch, device, loops, kind, dtype, cell
):
    bidirectional, steps, directions = LOOPS[loops]
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", steps)
    monkeypatch.setenv("VARLEN_RNN_CPU_DIRECTIONS", directions)
    module, x, lengths = make(cell, bidirectional, dtype, device, kind)
    kept, last = kept_and_last(module, kind, x, lengths)
    assert_same_gradients(module, kept, last)


def cpu_bf16_unit():
    """Whether this CPU runs bfloat16 layers' products in bfloat16 (csrc/cpu/bf16_gemm.h)."""
    try:
        torch.ops.varlen_rnn._bf16_gemm(
            torch.ones(1, 2, dtype=torch.bfloat16), torch.ones(2, 1), None, None, False
        )
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not cpu_bf16_unit(), reason="this CPU has no bfloat16 unit (AMX, AVX512-BF16)")
@pytest.mark.parametrize("loops", list(LOOPS))
@pytest.mark.parametrize("kind", ["padded", "packed", "nested"])
@pytest.mark.parametrize("cell", ["gru", "lstm", "lstm_proj", "rnn_tanh"])
def test_a_cpu_bfloat16_last_backward_gives_a_kept_graphs_gradients(monkeypatch, loops, kind, cell):
    # a bfloat16 layer (even I and P) on the CPU's bfloat16 products keeps a bfloat16 workspace,
    # which its dG, bfloat16 over the positions too, then goes over (csrc/cpu/backward_bf16.h)
    bidirectional, steps, directions = LOOPS[loops]
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", steps)
    monkeypatch.setenv("VARLEN_RNN_CPU_DIRECTIONS", directions)
    module, x, lengths = make(cell, bidirectional, torch.bfloat16, "cpu", kind, inputs=6)
    kept, last = kept_and_last(module, kind, x, lengths)
    assert_same_gradients(module, kept, last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("path", ["persistent", "fallback"])
@pytest.mark.parametrize("kind", ["padded", "packed", "nested"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_a_cuda_bfloat16_last_backward_gives_a_kept_graphs_gradients(path, kind, cell):
    # bfloat16 layers keep a bfloat16 workspace on CUDA, which their dG then goes over
    import cuda_testing

    module, x, lengths = make(cell, True, torch.bfloat16, "cuda", kind)
    cuda_testing.set_knobs(path)
    try:
        kept, last = kept_and_last(module, kind, x, lengths)
    finally:
        cuda_testing.set_knobs()
    assert_same_gradients(module, kept, last)


@contextlib.contextmanager
def emulated_cuda_backend(path):
    """Within: the ops run on the CUDA backend's code on the emulation (CPU tensors, a pretend
    device of 8 SMs), on `path`."""
    emu = emulation.load_emulation()
    emu.backend.set_device(8, 227 * 1024, 9)
    emu.backend.set_knobs(path, 0, False, 2, True)
    with emulation.cuda_backend_on_cpu(emu):
        yield


@emulation.needs_emulation
@pytest.mark.parametrize("path", ["persistent", "fallback"])
@pytest.mark.parametrize("kind", ["padded", "packed", "nested"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("cell", ["gru", "lstm", "lstm_proj", "rnn_tanh"])
def test_the_emulated_cuda_backends_last_backward_gives_a_kept_graphs_gradients(
    path, kind, dtype, cell
):
    module, x, lengths = make(cell, True, dtype, "cpu", kind)
    with emulated_cuda_backend(path):
        kept, last = kept_and_last(module, kind, x, lengths)
    assert_same_gradients(module, kept, last)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_a_kept_graph_runs_again(device, cell):
    module, x, lengths = make(cell, True, torch.float32, device, "padded")
    params = [x, *module.parameters()]
    loss = loss_of(run(module, "padded", x, lengths))
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params, retain_graph=True)
    third = torch.autograd.grad(loss, params)  # the last: may consume the workspace
    for a, b, c in zip(first, second, third, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, params)


def backward_peak(step, device="cpu") -> int:
    """The most bytes torch's allocator held during step(), above what it held before: the
    count benchmarks/bench_memory.py reports (the profiler's on the CPU, max_memory_allocated on
    CUDA)."""
    bench_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
    if not os.path.exists(os.path.join(bench_dir, "bench_memory.py")):
        pytest.skip("benchmarks/ is not next to tests/ (not a source checkout)")
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    from bench_memory import cpu_peak, cuda_peak

    return cuda_peak(step) if device == "cuda" else cpu_peak(step)


# Where the backward runs: the CPU's kernels, a GPU, or the CUDA backend on the emulation (a
# path of it); the emulated cases use a smaller batch (its kernels are CPU threads).
BACKENDS = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
    pytest.param("emulated-persistent", marks=emulation.needs_emulation),
    pytest.param("emulated-fallback", marks=emulation.needs_emulation),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell, gates", [("gru", 4), ("lstm", 4)])  # the GRU's dG: 3 gates + dghn
def test_the_last_backward_holds_no_gate_gradients_of_its_own(backend, cell, gates):
    emulated = backend.startswith("emulated-")
    device = "cuda" if backend == "cuda" else "cpu"
    T, B, Hb = (12, 8, 32) if emulated else (40, 32, 64)
    _, module = make_kind_pair(cell, Hb, Hb, dtype=torch.float32, device=device)
    x = torch.randn(T, B, Hb, device=device, requires_grad=True)
    lengths = torch.full((B,), T)
    params = [x, *module.parameters()]

    def kept():
        loss = loss_of(run(module, "padded", x, lengths))
        return backward_peak(lambda: torch.autograd.grad(loss, params, retain_graph=True), device)

    def last():
        loss = loss_of(run(module, "padded", x, lengths))
        return backward_peak(lambda: torch.autograd.grad(loss, params), device)

    backend_on = emulated_cuda_backend(backend[9:]) if emulated else contextlib.nullcontext()
    with backend_on:
        kept(), last()  # one-time allocations (thread pools) outside the measured steps
        saved = kept() - last()
    dg_bytes = T * B * gates * Hb * 4  # [N, G*H] float32 (the GRU's with its [N, H] dghn)
    assert saved >= dg_bytes, f"the last backward held {saved} bytes fewer, dG is {dg_bytes}"
