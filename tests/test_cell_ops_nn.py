"""The raw LSTM and RNN ops on the CPU against torch.nn.LSTM / torch.nn.RNN + packing
(pack_padded_sequence(enforce_sorted=False)), single layers with the module's weights copied in,
in float64 to 1e-10: outputs, final states and every gradient. Also the references' module-level
stacks (lstm_reference, rnn_reference, gru_reference) against multi-layer torch.nn modules."""

import pytest
import torch
from cell_ops_testing import CELLS, Batch, Layer, op_backward, op_forward
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from varlen_rnn import reference

I, H, P = 4, 6, 3
TIGHT = dict(atol=1e-10, rtol=1e-10)
LENGTHS = [5, 2, 7, 1, 7, 3]  # unsorted, repeated; nn + packing refuses zero-length rows


def make_module(cell, bidirectional, batch_first, bias, seed=0):
    torch.manual_seed(seed)
    kw = dict(bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    kw["dtype"] = torch.float64
    if cell.startswith("lstm"):
        return torch.nn.LSTM(I, H, proj_size=P if cell == "lstm_proj" else 0, **kw)
    return torch.nn.RNN(I, H, nonlinearity=cell.split("_")[1], **kw)


def layer_of(module, cell, hx, cx) -> Layer:
    """The op's stacked weights, sharing the module's parameters' values (detached)."""
    sfx = ["l0", "l0_reverse"][: 2 if module.bidirectional else 1]

    def stack(name):
        if not hasattr(module, f"{name}_l0"):
            return None
        return torch.stack([getattr(module, f"{name}_{s}").detach() for s in sfx])

    return Layer(
        cell,
        hx=hx,
        cx=cx,
        w_ih=stack("weight_ih"),
        w_hh=stack("weight_hh"),
        b_ih=stack("bias_ih"),
        b_hh=stack("bias_hh"),
        w_hr=stack("weight_hr"),
    )


def nn_grads_by_op_name(module, loss, x, hx, cx):
    """Gradients of loss through the module, named as the op returns them (the directions
    stacked)."""
    names = {"weight_ih": "w_ih", "weight_hh": "w_hh", "bias_ih": "b_ih", "bias_hh": "b_hh"}
    names["weight_hr"] = "w_hr"
    params = dict(module.named_parameters())
    leaves = [x, hx] + ([cx] if cx is not None else []) + list(params.values())
    flat = torch.autograd.grad(loss, leaves)
    out = {"input": flat[0], "hx": flat[1]}
    if cx is not None:
        out["cx"] = flat[2]
    by_param = dict(zip(params, flat[len(leaves) - len(params) :]))
    sfx = ["l0", "l0_reverse"][: 2 if module.bidirectional else 1]
    for nn_name, op_name in names.items():
        if f"{nn_name}_l0" in by_param:
            out[op_name] = torch.stack([by_param[f"{nn_name}_{s}"] for s in sfx])
    return out


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tm", "bf"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", CELLS)
def test_padded_ops_match_torch_nn_with_packing(cell, bidirectional, batch_first, bias):
    module = make_module(cell, bidirectional, batch_first, bias)
    D, B, T = 2 if bidirectional else 1, len(LENGTHS), max(LENGTHS) + 1
    lstm = cell.startswith("lstm")
    Pw = P if cell == "lstm_proj" else H
    g = torch.Generator().manual_seed(1)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), generator=g, dtype=torch.float64)
    hx = torch.randn(D, B, Pw, generator=g, dtype=torch.float64)
    cx = torch.randn(D, B, H, generator=g, dtype=torch.float64) if lstm else None
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, hx, cx)]
    packed = pack_padded_sequence(leaves[0], LENGTHS, batch_first=batch_first, enforce_sorted=False)
    out_p, state = module(packed, (leaves[1], leaves[2]) if lstm else leaves[1])
    r_out, _ = pad_packed_sequence(out_p, batch_first=batch_first, total_length=T)
    r_h, r_c = state if lstm else (state, None)

    layer = layer_of(module, cell, hx, cx)
    batch = Batch("padded_bf" if batch_first else "padded", x, torch.tensor(LENGTHS))
    out, h_n, c_n, ws = op_forward(layer, batch)
    torch.testing.assert_close(out, r_out.detach(), **TIGHT)
    torch.testing.assert_close(h_n, r_h.detach(), **TIGHT)
    if lstm:
        torch.testing.assert_close(c_n, r_c.detach(), **TIGHT)

    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    gh = torch.randn(h_n.shape, generator=g, dtype=torch.float64)
    gc = torch.randn(c_n.shape, generator=g, dtype=torch.float64) if lstm else None
    loss = (r_out * go).sum() + (r_h * gh).sum() + ((r_c * gc).sum() if lstm else 0)
    want = nn_grads_by_op_name(module, loss, *leaves)
    got = op_backward(layer, batch, out, ws, go, gh, gc)
    if lstm and layer.w_hr is None:
        assert got.pop("w_hr").shape == (0,)
    if not bias:  # the op computes them anyway; nn.LSTM has none to compare with
        got.pop("b_ih"), got.pop("b_hh")
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TIGHT, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", CELLS)
def test_packed_layout_runs_on_a_packed_sequence(cell, bidirectional):
    """The ragged op with layout 1 on PackedSequence.data, batch_sizes and sorted_indices gives
    nn's packed output rows and (sequence-ordered) final states."""
    module = make_module(cell, bidirectional, False, True)
    D, B, T = 2 if bidirectional else 1, len(LENGTHS), max(LENGTHS)
    lstm = cell.startswith("lstm")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    hx = torch.randn(D, B, P if cell == "lstm_proj" else H, generator=g, dtype=torch.float64)
    cx = torch.randn(D, B, H, generator=g, dtype=torch.float64) if lstm else None
    packed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    with torch.no_grad():
        r_out, state = module(packed, (hx, cx) if lstm else hx)
    r_h, r_c = state if lstm else (state, None)
    batch = Batch(
        "packed", packed.data, torch.tensor(LENGTHS), packed.batch_sizes, packed.sorted_indices, T
    )
    out, h_n, c_n, _ = op_forward(layer_of(module, cell, hx, cx), batch, need_workspace=False)
    torch.testing.assert_close(out, r_out.data, **TIGHT)
    torch.testing.assert_close(h_n, r_h, **TIGHT)
    if lstm:
        torch.testing.assert_close(c_n, r_c, **TIGHT)


@pytest.mark.parametrize("cell", ["gru", "lstm", "lstm_proj", "rnn_tanh", "rnn_relu"])
def test_module_references_match_torch_nn(cell):
    """The oracle itself: two bidirectional layers, full-length rows (no packing needed)."""
    torch.manual_seed(0)
    kw = dict(num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64)
    if cell == "gru":
        module, ref = torch.nn.GRU(I, H, **kw), reference.gru_reference
    elif cell.startswith("lstm"):
        module = torch.nn.LSTM(I, H, proj_size=P if cell == "lstm_proj" else 0, **kw)
        ref = reference.lstm_reference
    else:
        module = torch.nn.RNN(I, H, nonlinearity=cell.split("_")[1], **kw)
        ref = reference.rnn_reference
    x = torch.randn(3, 5, I, dtype=torch.float64)
    with torch.no_grad():
        want, got = module(x), ref(module, x)
    torch.testing.assert_close(got[0], want[0], **TIGHT)
    if cell.startswith("lstm"):
        torch.testing.assert_close(got[1][0], want[1][0], **TIGHT)
        torch.testing.assert_close(got[1][1], want[1][1], **TIGHT)
    else:
        torch.testing.assert_close(got[1], want[1], **TIGHT)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("cell", CELLS)
def test_non_finite_input_propagates_as_in_torch_nn(cell, dtype):
    """NaN, +-inf and huge values give nn's NaNs and saturations (relu keeps a NaN; the
    float rows' vectorized exp/tanh saturate as libm's)."""
    module = make_module(cell, True, False, True).to(dtype)
    lengths, lstm = [5, 4, 3, 5], cell.startswith("lstm")
    x = torch.randn(5, 4, I, dtype=dtype, generator=torch.Generator().manual_seed(4)) * 30
    x[1, 0, 0], x[2, 1, 1], x[0, 2, 2], x[3, 3] = float("nan"), float("inf"), -float("inf"), 1e30
    hx = torch.zeros(2, 4, P if cell == "lstm_proj" else H, dtype=dtype)
    cx = torch.zeros(2, 4, H, dtype=dtype) if lstm else None
    with torch.no_grad():
        r_out, state = module(
            pack_padded_sequence(x, lengths, enforce_sorted=False), (hx, cx) if lstm else hx
        )
    r_out, _ = pad_packed_sequence(r_out, total_length=5)
    want = [r_out, *(state if lstm else (state,))]
    got = op_forward(layer_of(module, cell, hx, cx), Batch("padded", x, torch.tensor(lengths)))
    assert r_out.isnan().any()  # the case is what it says
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True, atol=1e-5, rtol=1e-5)
