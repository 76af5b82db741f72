"""The raw LSTM and RNN ops on the CPU against the plain-PyTorch reference (varlen_rnn.reference):
outputs, final states and every gradient of the backward op, in float64 to 1e-10, over every
layout; zero-length rows; float32 and the half types against float64; bad arguments."""

import pytest
import torch
from cell_ops_testing import (
    CELLS,
    LAYOUTS,
    Batch,
    make_batch,
    make_layer,
    op_backward,
    op_forward,
    ref_forward,
)

I, H = 3, 5
TIGHT = dict(atol=1e-10, rtol=1e-10)
# Unsorted, with zero-length rows; the packed layout cannot hold a zero-length row.
LENGTHS = {"default": [4, 0, 2, 6, 1, 0], "packed": [4, 1, 2, 6, 1, 3]}


def lengths_for(layout):
    return LENGTHS["packed" if layout == "packed" else "default"]


def random_grads(out, h_n, c_n, seed=2):
    g = torch.Generator().manual_seed(seed)

    def like(t):
        return None if t is None else torch.randn(t.shape, generator=g, dtype=t.dtype)

    return like(out), like(h_n), like(c_n)


def reference_grads(layer, batch, grads_out):
    """{name: gradient} through the reference; absent biases enter as zeros, so their
    gradients (which the op always computes) are defined too."""
    G = layer.w_ih.shape[1]
    zeros = layer.w_ih.new_zeros(layer.w_ih.shape[0], G)
    layer = layer.replace(
        b_ih=zeros.clone() if layer.b_ih is None else layer.b_ih,
        b_hh=zeros.clone() if layer.b_hh is None else layer.b_hh,
    )
    leaves = {"input": batch.x.clone().requires_grad_()}
    for name, t in layer.tensors().items():
        leaves[name] = t.clone().requires_grad_()
    ref_layer = layer.replace(**{k: v for k, v in leaves.items() if k != "input"})
    outs = ref_forward(ref_layer, batch, x=leaves["input"])
    loss = sum((o * g).sum() for o, g in zip(outs, grads_out) if o is not None)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def check_against_reference(layer, batch):
    out, h_n, c_n, ws = op_forward(layer, batch)
    r_out, r_h, r_c = ref_forward(layer, batch)
    torch.testing.assert_close(out, r_out, **TIGHT)
    torch.testing.assert_close(h_n, r_h, **TIGHT)
    if layer.lstm:
        torch.testing.assert_close(c_n, r_c, **TIGHT)
    grads_out = random_grads(out, h_n, c_n)
    got = op_backward(layer, batch, out, ws, *grads_out)
    want = reference_grads(layer, batch, grads_out)
    if layer.lstm and layer.w_hr is None:  # grad_w_hr is [0] without a projection
        assert got.pop("w_hr").shape == (0,)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TIGHT, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("D", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", CELLS)
def test_ops_match_the_reference(cell, D, bias, layout):
    lengths = lengths_for(layout)
    layer = make_layer(cell, D, len(lengths), I, H, bias=bias)
    check_against_reference(layer, make_batch(layout, lengths, I))


@pytest.mark.parametrize("cell", CELLS)
def test_a_wider_layer_matches_the_reference(cell):
    """H past one vector register, a projection P < H that is not a multiple of it, and more
    rows than one parallel task takes."""
    lengths = [(7 * b) % 11 + 1 for b in range(40)]
    layer = make_layer(cell, 2, len(lengths), 9, 37, P=13)
    check_against_reference(layer, make_batch("padded", lengths, 9))


@pytest.mark.parametrize("layout", ["padded", "offsets"])
@pytest.mark.parametrize("cell", CELLS)
def test_zero_length_rows_keep_their_state(cell, layout):
    lengths = [3, 0, 2, 0]
    layer = make_layer(cell, 2, 4, I, H)
    batch = make_batch(layout, lengths, I)
    out, h_n, c_n, ws = op_forward(layer, batch)
    zero = torch.tensor(lengths) == 0
    assert torch.equal(h_n[:, zero], layer.hx[:, zero])
    if layer.lstm:
        assert torch.equal(c_n[:, zero], layer.cx[:, zero])
    if layout == "padded":
        assert not out[:, zero].any()
    grads_out = random_grads(out, h_n, c_n)
    got = op_backward(layer, batch, out, ws, *grads_out)
    assert torch.equal(got["hx"][:, zero], grads_out[1][:, zero])
    if layer.lstm:
        assert torch.equal(got["cx"][:, zero], grads_out[2][:, zero])


@pytest.mark.parametrize("cell", CELLS)
def test_all_rows_empty(cell):
    """T = 0 (padded) and N = 0 (ragged): the states pass through, the weights get zeros."""
    layer = make_layer(cell, 2, 3, I, H)
    for batch in (
        Batch(
            "padded", torch.randn(0, 3, I, dtype=torch.float64), torch.zeros(3, dtype=torch.long)
        ),
        make_batch("offsets", [0, 0, 0], I, T=0),
    ):
        out, h_n, c_n, ws = op_forward(layer, batch)
        assert out.numel() == 0 and torch.equal(h_n, layer.hx)
        if layer.lstm:
            assert torch.equal(c_n, layer.cx)
        grads_out = random_grads(out, h_n, c_n)
        got = op_backward(layer, batch, out, ws, *grads_out)
        assert torch.equal(got["hx"], grads_out[1])
        assert not got["w_ih"].any() and not got["w_hh"].any() and not got["b_hh"].any()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cell", CELLS)
def test_inference_gives_the_training_forward(cell, layout):
    lengths = lengths_for(layout)
    layer = make_layer(cell, 2, len(lengths), I, H)
    batch = make_batch(layout, lengths, I)
    train = op_forward(layer, batch, need_workspace=True)
    infer = op_forward(layer, batch, need_workspace=False)
    assert infer[3].numel() == 0 and train[3].dtype == torch.float64
    for a, b in zip(train[:3], infer[:3]):
        assert (a is None and b is None) or torch.equal(a, b)


def to_dtype(layer, batch, dtype):
    layer = layer.replace(**{k: v.to(dtype) for k, v in layer.tensors().items()})
    return layer, Batch(**{**vars(batch), "x": batch.x.to(dtype)})


@pytest.mark.parametrize(
    "dtype,tol",
    [
        (torch.float32, dict(atol=2e-5, rtol=1e-4)),
        (torch.bfloat16, dict(atol=4e-2, rtol=4e-2)),
        (torch.float16, dict(atol=5e-3, rtol=5e-3)),
    ],
    ids=["float32", "bfloat16", "float16"],
)
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("cell", CELLS)
def test_lower_precision_matches_float64(cell, layout, dtype, tol):
    """The float rows run the vectorized math. float16 runs in float32 (the workspace too) and
    rounds its results once, at the end: the outputs are within one float16 ulp (2^-10
    relative) of the float64 run on the same values, where rounding the state at every step
    would drift past it. bfloat16 takes bfloat16 products where the CPU has a bfloat16 unit,
    its state rounded as their operand once per step (as nn's bfloat16 path; the exact
    roundings are tests/test_cpu_bf16.py's mirror), hence its looser bound; its workspace is
    bfloat16 (the saved values rounded once, as nn's bfloat16 CPU path keeps them). The
    gradients read the rounded outputs as their previous states: the dtype's bound for all
    three."""
    lengths = lengths_for(layout)
    layer64 = make_layer(cell, 2, len(lengths), I, H)
    batch64 = make_batch(layout, lengths, I)
    layer, batch = to_dtype(layer64, batch64, dtype)
    # The float64 run sees the same (rounded) values.
    layer64, batch64 = to_dtype(layer, batch, torch.float64)
    got, want = op_forward(layer, batch), op_forward(layer64, batch64)
    ws_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    assert got[0].dtype == dtype and got[3].dtype == ws_dtype
    out_tol = dict(atol=1e-7, rtol=2.0**-10) if dtype == torch.float16 else tol
    for a, b in zip(got[:3], want[:3]):
        if b is not None:
            torch.testing.assert_close(a.double(), b, **out_tol)
    grads_out = random_grads(*want[:3])
    g = op_backward(
        layer, batch, got[0], got[3], *(t if t is None else t.to(dtype) for t in grads_out)
    )
    w = op_backward(layer64, batch64, want[0], want[3], *grads_out)
    for name in w:
        assert g[name].dtype == dtype, name
        torch.testing.assert_close(g[name], w[name].to(dtype), **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cell", CELLS)
def test_inputs_are_never_modified(cell):
    layer = make_layer(cell, 2, 4, I, H)
    batch = make_batch("padded", [3, 0, 2, 3], I)
    saved = {k: v.clone() for k, v in layer.tensors().items()} | {"x": batch.x.clone()}
    out, h_n, c_n, ws = op_forward(layer, batch)
    grads_out = random_grads(out, h_n, c_n)
    kept = [t.clone() for t in (out, ws, *grads_out) if t is not None]
    op_backward(layer, batch, out, ws, *grads_out)
    now = layer.tensors() | {"x": batch.x}
    assert all(torch.equal(now[k], saved[k]) for k in saved)
    assert all(
        torch.equal(a, b) for a, b in zip(kept, [t for t in (out, ws, *grads_out) if t is not None])
    )


@pytest.mark.parametrize("cell", CELLS)
def test_non_contiguous_arguments_give_the_contiguous_result(cell):
    layer = make_layer(cell, 2, 4, I, H)
    batch = make_batch("padded", [3, 0, 2, 3], I)
    want = op_forward(layer, batch)

    def strided(t):  # the same values in a transposed-back view
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() > 1 else t

    layer_nc = layer.replace(**{k: strided(v) for k, v in layer.tensors().items()})
    batch_nc = Batch(**{**vars(batch), "x": strided(batch.x)})
    assert not batch_nc.x.is_contiguous() and not layer_nc.w_ih.is_contiguous()
    got = op_forward(layer_nc, batch_nc)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)
    grads_out = random_grads(*want[:3])
    g = op_backward(layer_nc, batch_nc, got[0], got[3], *grads_out)
    w = op_backward(layer, batch, want[0], want[3], *grads_out)
    assert all(torch.equal(g[k], w[k]) for k in w)


# ---- bad arguments: the error names the argument and the expected shape ----------------------

D_, B_ = 2, 3


def z(*shape):
    return torch.zeros(shape, dtype=torch.float64)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(cx=z(D_, B_, 2)), r"cx must be \[D, B, H\] = \[2, 3, 5\], got shape \[2, 3, 2\]"),
        (dict(cx=z(B_, H)), r"cx must be \[D, B, H\] = \[2, 3, 5\]"),
        (dict(w_hr=z(D_, 2, H + 1)), r"w_hr must be \[D, P, H\] = \[2, P, 5\]"),
        (dict(w_hr=z(D_, 0, H)), r"w_hr must be \[D, P, H\] .*P > 0"),
        (dict(w_hr=None), r"w_hh must be \[D, 4H, P\] = \[2, 20, 5\], got shape \[2, 20, 2\]"),
        (dict(hx=z(D_, B_, H)), r"hx must be \[D, B, P\] = \[2, 3, 2\]"),
        (dict(w_ih=z(D_, 3 * H, I)), r"w_ih must be \[D, 4H, I\]"),
        (dict(b_hh=z(D_, 3 * H)), r"b_hh must be \[D, 4H\] = \[2, 20\]"),
    ],
)
def test_lstm_bad_arguments(change, match):
    layer = make_layer("lstm_proj", D_, B_, I, H, P=2).replace(**change)
    batch = make_batch("padded", [4, 2, 0], I)
    with pytest.raises(RuntimeError, match=match):
        op_forward(layer, batch)
    ragged = make_batch("offsets", [4, 2, 0], I)
    with pytest.raises(RuntimeError, match=match):
        op_forward(layer, ragged)


def test_lstm_backward_checks_grad_c_n_and_the_workspace_width():
    layer = make_layer("lstm", 1, 3, I, H)
    batch = make_batch("padded", [2, 1, 3], I)
    out, h_n, c_n, ws = op_forward(layer, batch)
    with pytest.raises(RuntimeError, match=r"grad_c_n must be \[D, B, H\] = \[1, 3, 5\]"):
        op_backward(layer, batch, out, ws, out, h_n, z(1, 3, 4))
    with pytest.raises(RuntimeError, match=r"workspace must be \[D, 6, 5H\]"):
        op_backward(layer, batch, out, ws[..., :-1], out, h_n, c_n)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "ragged"])
def test_rnn_bad_nonlinearity(padded):
    layer = make_layer("rnn_tanh", 1, 3, I, H)
    batch = make_batch("padded" if padded else "offsets", [2, 1, 3], I)
    out, h_n, _, ws = op_forward(layer, batch)
    w = (layer.hx, layer.w_ih, layer.w_hh)
    match = r"nonlinearity must be 'tanh' or 'relu', got 'sigmoid'"
    ops = torch.ops.varlen_rnn
    if padded:
        x_idx = (batch.x, batch.lengths)
        forward = lambda: ops.rnn_layer_forward(*x_idx, *w, None, None, "sigmoid", False, True)  # noqa: E731
        backward = lambda: ops.rnn_layer_backward(  # noqa: E731
            out, h_n, *x_idx, *w, out, ws, "sigmoid", False
        )
    else:
        x_idx = (batch.x, batch.seq_index, None, 0, batch.max_len)
        forward = lambda: ops.rnn_layer_ragged_forward(*x_idx, *w, None, None, "sigmoid", True)  # noqa: E731
        backward = lambda: ops.rnn_layer_ragged_backward(  # noqa: E731
            out, h_n, *x_idx, *w, out, ws, "sigmoid"
        )
    for call in (forward, backward):
        with pytest.raises(RuntimeError, match=match):
            call()


def test_rnn_weights_have_one_gate_block():
    layer = make_layer("rnn_tanh", 1, 3, I, H)
    batch = make_batch("padded", [2, 1, 3], I)
    with pytest.raises(RuntimeError, match=r"w_hh must be \[D, H, H\] = \[1, 5, 5\]"):
        op_forward(layer.replace(w_hh=z(1, 3 * H, H)), batch)
    with pytest.raises(RuntimeError, match=r"hx must be \[D, B, H\] = \[1, 3, 5\]"):
        op_forward(layer.replace(hx=z(1, 3, 4)), batch)
    # The workspace has no columns (the backward reads h' from the output): one of H columns
    # (what the forward returned before 7d819f2) is refused.
    out, h_n, _, ws = op_forward(layer, batch)
    assert ws.shape == (1, 6, 0)
    with pytest.raises(RuntimeError, match=r"workspace must be \[D, 6, 0\]"):
        op_backward(layer, batch, out, ws.new_zeros(1, 6, H), out, h_n, None)
