"""The CPU backward's two step loops (csrc/cpu/recurrence.h), each chosen on purpose through
VARLEN_RNN_CPU_STEPS: "split" (hidden units split across a thread team, cpu/split_backward.h)
and "gemm" (one gate pass and one BLAS call per step). Every gradient of every cell (GRU, LSTM
with and without a projection, RNN tanh/relu), through autograd on the public layer functions,
against the plain-PyTorch reference in float64 to 1e-10, over every layout, both directions,
with and without biases; zero lengths, one row, widths that are not a multiple of the 16-unit
slices, more threads than slices. float32: the two loops agree, and the split loop repeats
exactly."""

import pytest
import torch

from varlen_rnn import ops, reference

TIGHT = dict(atol=1e-10, rtol=1e-10)
I = 6
# H = 40: three 16-unit blocks, so two threads get uneven slices (32 + 8 units); P = 19 splits
# dh's columns unevenly too, and with three threads one thread's P slice is empty.
H, P = 40, 19
LENGTHS = [5, 1, 3, 7, 2, 7, 4]  # unsorted, ties, no zero length (the packed layout has none)
CELLS = ["gru", "lstm", "lstm_proj", "rnn_tanh", "rnn_relu"]
LAYOUTS = ["padded", "padded_bf", "offsets", "packed"]
GATES = {"gru": 3, "lstm": 4, "rnn": 1}


def base(cell):
    return cell.split("_")[0]


def make_weights(cell, D, B, hidden=H, proj=P, bias=True, dtype=torch.float64, seed=0):
    """Uniform in [-0.6, 0.6] (gates away from saturation); torch.nn's shapes over directions."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * 0.6).to(dtype)

    G = GATES[base(cell)] * hidden
    width = proj if cell == "lstm_proj" else hidden
    w = dict(hx=rnd(D, B, width))
    if base(cell) == "lstm":
        w["cx"] = rnd(D, B, hidden)
    w.update(w_ih=rnd(D, G, I), w_hh=rnd(D, G, width))
    w.update(b_ih=rnd(D, G) if bias else None, b_hh=rnd(D, G) if bias else None)
    if base(cell) == "lstm":
        w["w_hr"] = rnd(D, proj, hidden) if cell == "lstm_proj" else None
    return w


def make_input(layout, lengths, dtype=torch.float64, seed=1):
    """(x, index, batch_first): padded x [T, B, I] or [B, T, I] with index (lengths,); ragged x
    [N, I] with index (seq_index, sorted_indices, layout code, max_len)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    B, T = lengths.numel(), int(lengths.max()) + 1
    if layout.startswith("padded"):
        bf = layout == "padded_bf"
        x = torch.randn((B, T, I) if bf else (T, B, I), generator=g, dtype=dtype)
        return x, (lengths,), bf
    x = torch.randn(int(lengths.sum()), I, generator=g, dtype=dtype)
    if layout == "offsets":
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        return x, (offsets, None, 0, T), None
    order = torch.sort(lengths, descending=True, stable=True).indices
    batch_sizes = (lengths.unsqueeze(0) > torch.arange(int(lengths.max())).unsqueeze(1)).sum(1)
    return x, (batch_sizes, order, 1, T), None


def run(fn_of, cell, w, x, index, bf):
    """Outputs of the layer function fn_of(name) (name: gru_layer, lstm_layer_ragged, ...)."""
    name = f"{base(cell)}_layer" + ("" if bf is not None else "_ragged")
    states = (w["hx"], w["cx"]) if base(cell) == "lstm" else (w["hx"],)
    weights = (w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    tail = (w["w_hr"],) if base(cell) == "lstm" else ()
    tail += ("relu" if cell == "rnn_relu" else "tanh",) if base(cell) == "rnn" else ()
    tail += (bf,) if bf is not None else ()
    return fn_of(name)(x, *index, *states, *weights, *tail)


def op_fn(name):
    return getattr(ops, name)


def ref_fn(name):
    return getattr(reference, f"{name}_reference")


def grads(fn_of, cell, w, x, index, bf, seed=2):
    """{name: gradient} of sum(out * g) over every output, for the input and every tensor."""
    leaves = {"input": x.clone().requires_grad_()}
    leaves.update({k: v.clone().requires_grad_() for k, v in w.items() if v is not None})
    w_leaves = {k: leaves.get(k) for k in w}
    outs = run(fn_of, cell, w_leaves, leaves["input"], index, bf)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def assert_float32_outputs_close(got, want, what):
    """Two float32 runs that round their products differently: outputs agree to 1e-5 of each
    element and 2e-6 of the result's largest value. A product's rounding error is relative to
    the largest terms of its sums, and every later step carries it, so small elements carry
    errors the size of the large ones' roundings: the relu RNN's states are unbounded (up to
    2e3 in float32_case), and an element of 13.4 differed by 1.8e-4 between the per-step GEMM
    loop and the split loops in a -O1 build, each within 8e-4 of the float64 result everywhere.
    The bounded cells' outputs stay below 1, where the bound is the plain 1e-5."""
    atol = max(1e-5, 2e-6 * want.abs().max().item())
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def assert_float32_grads_close(cell, got, want, name):
    """Two float32 runs that round their products differently: gradients agree to 1e-4.
    Except at relu's kink: where a pre-activation is within a rounding of zero the two runs
    may take different sides, and the gradient flowing through that position differs by the
    whole of its dh. So the relu RNN may have a few elements (at most 0.5%) outside the
    tolerance; a wrong product moves every element."""
    if cell != "rnn_relu":
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        return
    outside = ~torch.isclose(got, want, atol=1e-4, rtol=1e-4)
    assert outside.sum().item() <= 0.005 * got.numel(), (
        f"{name}: {outside.sum().item()} of {got.numel()} elements differ beyond 1e-4"
    )


def split_and_gemm(monkeypatch, cell, w, x, index, bf):
    got = {}
    for steps in ("split", "gemm"):
        monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", steps)
        got[steps] = grads(op_fn, cell, w, x, index, bf)
    return got["split"], got["gemm"]


def check(monkeypatch, cell, w, x, index, bf):
    split, gemm = split_and_gemm(monkeypatch, cell, w, x, index, bf)
    want = grads(ref_fn, cell, w, x, index, bf)
    assert set(split) == set(want) == set(gemm)
    for name in want:
        torch.testing.assert_close(split[name], want[name], **TIGHT, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(split[name], gemm[name], **TIGHT, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("D", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", CELLS)
def test_split_gradients_match_the_reference(monkeypatch, threads, cell, D, bias, layout):
    w = make_weights(cell, D, len(LENGTHS), bias=bias)
    check(monkeypatch, cell, w, *make_input(layout, LENGTHS))


@pytest.mark.parametrize("layout", ["padded", "offsets"])
@pytest.mark.parametrize("cell", CELLS)
def test_zero_length_rows(monkeypatch, threads, cell, layout):
    lengths = [3, 0, 2, 0, 6]
    check(monkeypatch, cell, make_weights(cell, 2, len(lengths)), *make_input(layout, lengths))


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("cell", CELLS)
def test_one_row(monkeypatch, threads, cell, layout):
    check(monkeypatch, cell, make_weights(cell, 2, 1), *make_input(layout, [6]))


@pytest.mark.parametrize("hidden,proj", [(5, 3), (21, 17), (40, 19)])
@pytest.mark.parametrize("cell", CELLS)
def test_more_threads_than_slices(monkeypatch, cell, hidden, proj):
    """Four threads, at most three 16-unit slices (H = 5: one; H = 21: two)."""
    old = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        w = make_weights(cell, 2, len(LENGTHS), hidden=hidden, proj=proj)
        check(monkeypatch, cell, w, *make_input("padded", LENGTHS))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("kernel", ["kernel", "mkl"])
@pytest.mark.parametrize("cell", CELLS)
def test_float32_split_agrees_with_gemm_and_repeats_exactly(monkeypatch, threads, cell, kernel):
    """Both products of the split loops in float32: the micro-kernel and the BLAS."""
    monkeypatch.setenv("VARLEN_RNN_CPU_GEMM", kernel)
    lengths = [(7 * b) % 11 + 1 for b in range(24)]
    w = make_weights(cell, 2, len(lengths), hidden=48, proj=20, dtype=torch.float32)
    x, index, bf = make_input("padded", lengths, dtype=torch.float32)
    split_a, gemm = split_and_gemm(monkeypatch, cell, w, x, index, bf)
    split_b, _ = split_and_gemm(monkeypatch, cell, w, x, index, bf)
    for name in split_a:
        assert torch.equal(split_a[name], split_b[name]), name
        assert_float32_grads_close(cell, split_a[name], gemm[name], name)


@pytest.mark.parametrize("lengths", [[3], [4, 1, 3, 2, 4, 4, 1, 2]], ids=["one-row", "eight"])
@pytest.mark.parametrize("cell", CELLS)
def test_few_step_float32_gradients(monkeypatch, cell, lengths):
    """A call of few steps runs the per-step GEMM loop, whose float32 products at few rows take
    the weights as stored (cpu/small_gemm.h: f32_dot_rows forward, f32_rows_times for the
    backward's dG W_hh and f32_weight_grad for the weights'; VARLEN_RNN_CPU_GEMM=kernel insists
    on them, =mkl keeps the BLAS, and as built, on Intel's CPUs, the backward's take the BLAS):
    every gradient agrees with the plain-PyTorch reference's (run in float32 too, so that the
    cotangents drawn are the same) on each, and (on an AVX-512 or AVX2 CPU) kernel and mkl took
    different products, and the build's choice those of kernel but on Intel's CPUs (there a
    row's backward differs)."""
    w32 = make_weights(cell, 2, len(lengths), dtype=torch.float32)
    x32, index, bf = make_input("padded", lengths, dtype=torch.float32)
    want = grads(ref_fn, cell, w32, x32, index, bf)
    got = {}
    for setting in ("auto", "kernel", "mkl"):
        monkeypatch.setenv("VARLEN_RNN_CPU_GEMM", setting)
        got[setting] = grads(op_fn, cell, w32, x32, index, bf)
        for name in want:
            assert_float32_grads_close(cell, got[setting][name], want[name], name)
    if _stored_products():  # elsewhere every setting takes the BLAS
        assert any(not torch.equal(got["kernel"][k], got["mkl"][k]) for k in want)
        # The same forward (f32_dot_rows) and, but on Intel's CPUs, the same backward; there one
        # row's backward is f32_rows_times under kernel, the BLAS's as built.
        same = all(torch.equal(got["auto"][k], got["kernel"][k]) for k in want)
        assert same if not _intel_cpu() else (not same or len(lengths) > 1)


def _intel_cpu() -> bool:
    """Whether the CPU is Intel's (vendor_id in /proc/cpuinfo; False where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(ln.split(":")[-1].strip() == "GenuineIntel" for ln in f if "vendor_id" in ln)
    except OSError:
        return False


def _stored_products() -> bool:
    """Whether this CPU runs the products on the weights as stored (AVX-512 or AVX2)."""
    try:
        torch.ops.varlen_rnn._small_gemm(torch.ones(1, 1), torch.ones(1, 1), None, "dots")
    except RuntimeError as e:
        assert "does not run kernel" in str(e)
        return False
    return True
