"""The ragged ops (gru_layer_ragged_forward/backward, layouts 0 offsets and 1 packed) against
the padded op gru_layer_forward/backward on the same data, padded here; gradcheck; opcheck;
the errors for bad seq_index, sorted_indices and max_len."""

import pytest
import torch
from testing import assert_close
from torch._library.simple_registry import singleton
from torch.nn.utils.rnn import pack_sequence

ops = torch.ops.varlen_rnn
OFFSETS, PACKED = 0, 1
I, H = 3, 4

# Lengths with 0, 1, T=5 and repeats; one sequence; nothing at all.
LENGTHS = {
    "mixed": [3, 5, 0, 1, 5, 2],
    "one_seq": [4],
    "ones": [1, 1, 1],
    "all_zero": [0, 0],
}
# PackedSequence has no empty sequences (but may have no steps at all).
PACKED_LENGTHS = {
    "mixed": [3, 5, 1, 5, 2, 1],
    "one_seq": [4],
    "ones": [1, 1, 1],
    "no_steps": [0, 0],
}


def _weights(D, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return (
        r(D, 3 * H, I),
        r(D, 3 * H, H),
        r(D, 3 * H) if bias else None,
        r(D, 3 * H) if bias else None,
    )


def _sequences(lengths, D, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randn(L, I, generator=g, dtype=dtype) for L in lengths]
    return seqs, torch.randn(D, len(lengths), H, generator=g, dtype=dtype)


def _ragged(seqs, layout):
    """(values [N, I], seq_index, sorted_indices, max_len, rows): rows[k] = (t, b) of row k."""
    lengths = [len(s) for s in seqs]
    if layout == OFFSETS:
        offsets = torch.tensor([0] + lengths).cumsum(0)
        rows = [(t, b) for b, L in enumerate(lengths) for t in range(L)]
        values = torch.cat(seqs) if seqs else torch.empty(0, I)
        return values, offsets, None, max(lengths, default=0), rows
    if sum(lengths) == 0:  # pack_sequence refuses empty sequences: no steps at all
        return (torch.cat(seqs), torch.empty(0, dtype=torch.long), None, 0, [])
    packed = pack_sequence(seqs, enforce_sorted=False)
    order = packed.sorted_indices.tolist()
    rows = [(t, order[i]) for t, n in enumerate(packed.batch_sizes.tolist()) for i in range(n)]
    return packed.data, packed.batch_sizes, packed.sorted_indices, len(packed.batch_sizes), rows


def _pad(values, rows, T, B):
    """[T, B, F]: the ragged rows at their (t, b), zeros elsewhere."""
    out = values.new_zeros(T, B, values.shape[1])
    for k, (t, b) in enumerate(rows):
        out[t, b] = values[k]
    return out


def _unpad(padded, rows):
    return (
        torch.stack([padded[t, b] for t, b in rows])
        if rows
        else padded.new_zeros(0, padded.shape[2])
    )


def _run_both(lengths, layout, D, bias, dtype, max_len_extra=0):
    """Both ops' forward and backward on the same data; the padded results brought to rows."""
    seqs, hx = _sequences(lengths, D, dtype)
    w_ih, w_hh, b_ih, b_hh = _weights(D, bias, dtype)
    x, seq_index, sorted_indices, max_len, rows = _ragged(seqs, layout)
    B, T = len(lengths), max(max(lengths, default=0), 1)
    inputs = [t.clone() for t in (x, seq_index, hx, w_ih, w_hh)]
    out, h_n, ws = ops.gru_layer_ragged_forward(
        x,
        seq_index,
        sorted_indices,
        layout,
        max_len + max_len_extra,
        hx,
        w_ih,
        w_hh,
        b_ih,
        b_hh,
        True,
    )
    g = torch.Generator().manual_seed(2)
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
    grad_h_n = torch.randn(h_n.shape, generator=g, dtype=dtype)
    grads = ops.gru_layer_ragged_backward(
        grad_out,
        grad_h_n,
        x,
        seq_index,
        sorted_indices,
        layout,
        max_len + max_len_extra,
        hx,
        w_ih,
        w_hh,
        out,
        ws,
    )
    for before, after in zip(inputs, (x, seq_index, hx, w_ih, w_hh)):
        assert torch.equal(before, after), "an input was modified"

    x_pad, lens = _pad(x, rows, T, B), torch.tensor(lengths)
    out_p, h_n_p, ws_p = ops.gru_layer_forward(x_pad, lens, hx, w_ih, w_hh, b_ih, b_hh, False, True)
    grads_p = list(
        ops.gru_layer_backward(
            _pad(grad_out, rows, T, B), grad_h_n, x_pad, lens, hx, w_ih, w_hh, out_p, ws_p, False
        )
    )
    grads_p[0] = _unpad(grads_p[0], rows)
    ours = (out, h_n, ws.shape, *grads)
    padded = (_unpad(out_p, rows), h_n_p, (D, len(rows), 4 * H), *grads_p)
    return ours, padded


NAMES = [
    "output",
    "h_n",
    "workspace shape",
    "grad_input",
    "grad_hx",
    "grad_w_ih",
    "grad_w_hh",
    "grad_b_ih",
    "grad_b_hh",
]


def _assert_same(ours, padded, dtype):
    for name, a, b in zip(NAMES, ours, padded):
        if name == "workspace shape":
            assert tuple(a) == tuple(b)
        else:
            assert_close(a, b, dtype, name)


@pytest.mark.parametrize(
    "layout,lengths",
    [
        *[pytest.param(OFFSETS, v, id=f"offsets-{k}") for k, v in LENGTHS.items()],
        *[pytest.param(PACKED, v, id=f"packed-{k}") for k, v in PACKED_LENGTHS.items()],
    ],
)
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_matches_padded_op_float64(layout, lengths, D, bias):
    _assert_same(*_run_both(lengths, layout, D, bias, torch.float64), torch.float64)


@pytest.mark.parametrize("layout", [OFFSETS, PACKED], ids=["offsets", "packed"])
def test_matches_padded_op_float32(layout):
    lengths = LENGTHS["mixed"] if layout == OFFSETS else PACKED_LENGTHS["mixed"]
    _assert_same(*_run_both(lengths, layout, 2, True, torch.float32), torch.float32)


@pytest.mark.parametrize("layout", [OFFSETS, PACKED], ids=["offsets", "packed"])
def test_max_len_above_the_longest_length_changes_nothing(layout):
    lengths = LENGTHS["mixed"] if layout == OFFSETS else PACKED_LENGTHS["mixed"]
    ours, _ = _run_both(lengths, layout, 2, True, torch.float64)
    ours_extra, _ = _run_both(lengths, layout, 2, True, torch.float64, max_len_extra=3)
    for name, a, b in zip(NAMES, ours, ours_extra):
        assert (tuple(a) == tuple(b)) if name == "workspace shape" else torch.equal(a, b), name


def test_int32_offsets_and_no_sorted_indices_mean_the_same():
    """int32 offsets equal int64 ones; packed input already sorted needs no sorted_indices."""
    seqs, hx = _sequences([2, 5, 3], 2, torch.float64)
    w = _weights(2, True, torch.float64)
    x, off, _, T, _ = _ragged(seqs, OFFSETS)
    a = ops.gru_layer_ragged_forward(x, off, None, OFFSETS, T, hx, *w, False)
    b = ops.gru_layer_ragged_forward(x, off.int(), None, OFFSETS, T, hx, *w, False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    seqs = sorted(seqs, key=len, reverse=True)  # already longest-first: sorted_indices = arange
    px, bs, si, T, _ = _ragged(seqs, PACKED)
    assert si.tolist() == [0, 1, 2]
    c = ops.gru_layer_ragged_forward(px, bs, si, PACKED, T, hx, *w, False)
    d = ops.gru_layer_ragged_forward(px, bs, None, PACKED, T, hx, *w, False)
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_types_match_the_padded_op(dtype):
    """Both run in float and round once at the end: the same numbers up to GEMM blocking."""
    ours, padded = _run_both(LENGTHS["mixed"], OFFSETS, 2, True, dtype)
    for name, a, b in zip(NAMES, ours, padded):
        if name != "workspace shape":
            assert a.dtype == dtype, name
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2, msg=name)


def test_non_contiguous_arguments():
    seqs, hx = _sequences([2, 5, 3], 2, torch.float64)
    w = _weights(2, True, torch.float64)
    x, bs, si, T, _ = _ragged(seqs, PACKED)
    expected = ops.gru_layer_ragged_forward(x, bs, si, PACKED, T, hx, *w, False)
    x_nc = x.t().contiguous().t()  # [N, I] with strides (1, N)
    hx_nc = hx.transpose(1, 2).contiguous().transpose(1, 2)
    si_nc = torch.stack([si, si], 1)[:, 0]
    assert not (x_nc.is_contiguous() or hx_nc.is_contiguous() or si_nc.is_contiguous())
    got = ops.gru_layer_ragged_forward(x_nc, bs, si_nc, PACKED, T, hx_nc, *w, False)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_inference_returns_an_empty_workspace():
    seqs, hx = _sequences([2, 3], 1, torch.float64)
    x, off, _, T, _ = _ragged(seqs, OFFSETS)
    _, _, ws = ops.gru_layer_ragged_forward(
        x, off, None, OFFSETS, T, hx, *_weights(1, True, torch.float64), False
    )
    assert ws.shape == (0,)


class _RaggedLayer(torch.autograd.Function):
    """The two ops wired together, for gradcheck of the kernels alone (varlen_rnn.ops wires
    them for real)."""

    @staticmethod
    def forward(ctx, x, seq_index, sorted_indices, layout, max_len, hx, w_ih, w_hh, b_ih, b_hh):
        out, h_n, ws = ops.gru_layer_ragged_forward(
            x, seq_index, sorted_indices, layout, max_len, hx, w_ih, w_hh, b_ih, b_hh, True
        )
        ctx.save_for_backward(x, seq_index, sorted_indices, hx, w_ih, w_hh, out, ws)
        ctx.layout, ctx.max_len = layout, max_len
        return out, h_n

    @staticmethod
    def backward(ctx, grad_out, grad_h_n):
        x, seq_index, sorted_indices, hx, w_ih, w_hh, out, ws = ctx.saved_tensors
        g = ops.gru_layer_ragged_backward(
            grad_out.contiguous(),
            grad_h_n.contiguous(),
            x,
            seq_index,
            sorted_indices,
            ctx.layout,
            ctx.max_len,
            hx,
            w_ih,
            w_hh,
            out,
            ws,
        )
        return g[0], None, None, None, None, *g[1:]


@pytest.mark.parametrize("layout", [OFFSETS, PACKED], ids=["offsets", "packed"])
@pytest.mark.parametrize("D", [1, 2])
def test_gradcheck(layout, D):
    lengths = [3, 0, 1, 3] if layout == OFFSETS else [3, 2, 1, 3]
    seqs, hx = _sequences(lengths, D, torch.float64)
    x, seq_index, sorted_indices, max_len, _ = _ragged(seqs, layout)
    args = [x, hx, *_weights(D, True, torch.float64)]
    for a in args:
        a.requires_grad_(True)

    def f(x, hx, w_ih, w_hh, b_ih, b_hh):
        return _RaggedLayer.apply(
            x, seq_index, sorted_indices, layout, max_len, hx, w_ih, w_hh, b_ih, b_hh
        )

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8)


def _has_package_fakes():
    return all(
        singleton.find(f"varlen_rnn::gru_layer_ragged_{p}").fake_impl.kernel is not None
        for p in ("forward", "backward")
    )


@pytest.mark.parametrize("layout", [OFFSETS, PACKED], ids=["offsets", "packed"])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_opcheck(layout, D, bias):
    assert _has_package_fakes(), "varlen_rnn/ops.py registers no fake kernel for the ragged ops"
    lengths = LENGTHS["mixed"] if layout == OFFSETS else PACKED_LENGTHS["mixed"]
    seqs, hx = _sequences(lengths, D, torch.float64)
    x, seq_index, sorted_indices, max_len, _ = _ragged(seqs, layout)
    w = _weights(D, bias, torch.float64)
    fwd = [x, seq_index, sorted_indices, layout, max_len, hx, *w]
    torch.library.opcheck(ops.gru_layer_ragged_forward.default, (*fwd, False))
    grad_args = [
        t.clone().requires_grad_(True) if torch.is_tensor(t) and t.is_floating_point() else t
        for t in fwd
    ]
    torch.library.opcheck(ops.gru_layer_ragged_forward.default, (*grad_args, True))
    out, h_n, ws = ops.gru_layer_ragged_forward(*fwd, True)
    bwd = (
        torch.randn_like(out),
        torch.randn_like(h_n),
        x,
        seq_index,
        sorted_indices,
        layout,
        max_len,
        hx,
        w[0],
        w[1],
        out,
        ws,
    )
    torch.library.opcheck(ops.gru_layer_ragged_backward.default, bwd)


def _bad_call(kind, **change):
    """The forward on a small valid case, with some arguments replaced."""
    lengths = [2, 3, 1]
    seqs, hx = _sequences(lengths, 1, torch.float64)
    x, seq_index, sorted_indices, max_len, _ = _ragged(seqs, kind)
    w_ih, w_hh, b_ih, b_hh = _weights(1, True, torch.float64)
    args = dict(
        input=x,
        seq_index=seq_index,
        sorted_indices=sorted_indices,
        layout=kind,
        max_len=max_len,
        hx=hx,
        w_ih=w_ih,
        w_hh=w_hh,
        b_ih=b_ih,
        b_hh=b_hh,
        need_workspace=False,
    )
    args.update(change)
    return ops.gru_layer_ragged_forward(*args.values())


# offsets of the valid case: [0, 2, 5, 6]; N = 6; max_len = 3.
OFFSETS_ERRORS = {
    "decreasing": (
        dict(seq_index=torch.tensor([0, 4, 3, 6])),
        r"seq_index \(offsets\) must be non-decreasing, got offsets\[1\]=4 > "
        r"offsets\[2\]=3",
    ),
    "first_not_zero": (dict(seq_index=torch.tensor([1, 2, 5, 6])), r"offsets\[0\] must be 0"),
    "last_not_n": (
        dict(seq_index=torch.tensor([0, 2, 5, 5])),
        r"offsets\[B\] must equal input.size\(0\)=6, got offsets\[3\]=5",
    ),
    "float": (
        dict(seq_index=torch.tensor([0.0, 2, 5, 6])),
        r"seq_index must be an int64 or int32 tensor, got Float",
    ),
    "2d": (
        dict(seq_index=torch.tensor([[0, 2, 5, 6]])),
        r"seq_index \(offsets\) must be 1-D of size B\+1 >= 1",
    ),
    "empty": (
        dict(seq_index=torch.tensor([], dtype=torch.long)),
        r"seq_index \(offsets\) must be 1-D of size B\+1 >= 1",
    ),
    "wrong_size_for_hx": (
        dict(seq_index=torch.tensor([0, 2, 6])),
        r"hx must be \[D, B, H\] = \[1, 2, 4\]",
    ),
    "max_len_short": (
        dict(max_len=2),
        r"max_len=2 must be >= every length, got length 3 for sequence 1",
    ),
    "max_len_negative": (dict(max_len=-1), r"max_len must be >= 0, got -1"),
    "sorted_indices_given": (
        dict(sorted_indices=torch.tensor([1, 0, 2])),
        r"sorted_indices must be None for layout 0 \(offsets\)",
    ),
    "bad_layout": (dict(layout=2), r"layout must be 0 \(offsets, sequence-major\) or 1"),
    "input_3d": (
        dict(input=torch.zeros(6, 1, I, dtype=torch.float64)),
        r"input must be 2-D \[N, I\]",
    ),
}


@pytest.mark.parametrize("change,match", OFFSETS_ERRORS.values(), ids=OFFSETS_ERRORS.keys())
def test_bad_offsets_name_the_argument(change, match):
    with pytest.raises(RuntimeError, match=match):
        _bad_call(OFFSETS, **change)


# The valid case packed: batch_sizes [3, 2, 1], sorted_indices [1, 0, 2]; N = 6, B = 3.
PACKED_ERRORS = {
    "increasing": (
        dict(seq_index=torch.tensor([2, 3, 1])),
        r"seq_index \(batch_sizes\) must be non-increasing, got batch_sizes\[0\]=2 < "
        r"batch_sizes\[1\]=3",
    ),
    "zero": (
        dict(seq_index=torch.tensor([3, 3, 0])),
        r"seq_index \(batch_sizes\) must be >= 1, got batch_sizes\[2\]=0",
    ),
    "first_not_b": (
        dict(seq_index=torch.tensor([2, 2, 2])),
        r"batch_sizes\[0\] must equal B=3 \(hx.size\(1\)\), got 2",
    ),
    "wrong_sum": (
        dict(seq_index=torch.tensor([3, 2])),
        r"seq_index \(batch_sizes\) must sum to input.size\(0\)=6, got 5",
    ),
    "2d": (
        dict(seq_index=torch.tensor([[3, 2, 1]])),
        r"seq_index \(batch_sizes\) must be 1-D \[T\]",
    ),
    "float": (
        dict(seq_index=torch.tensor([3.0, 2, 1])),
        r"seq_index must be an int64 or int32 tensor",
    ),
    "max_len_short": (
        dict(max_len=2),
        r"max_len must be >= batch_sizes.size\(0\)=3 \(the longest length\), got 2",
    ),
    "indices_repeat": (
        dict(sorted_indices=torch.tensor([1, 0, 1])),
        r"sorted_indices must be a permutation of 0..B-1 \(B=3\), got "
        r"sorted_indices\[2\]=1 twice",
    ),
    "indices_out_of_range": (
        dict(sorted_indices=torch.tensor([1, 0, 3])),
        r"sorted_indices\[2\]=3 out of range",
    ),
    "indices_size": (
        dict(sorted_indices=torch.tensor([1, 0])),
        r"sorted_indices must be 1-D of size B=3 \(hx.size\(1\)\), got shape",
    ),
    "indices_int32": (
        dict(sorted_indices=torch.tensor([1, 0, 2], dtype=torch.int32)),
        r"sorted_indices must be an int64 tensor, got Int",
    ),
}


@pytest.mark.parametrize("change,match", PACKED_ERRORS.values(), ids=PACKED_ERRORS.keys())
def test_bad_batch_sizes_and_sorted_indices_name_the_argument(change, match):
    with pytest.raises(RuntimeError, match=match):
        _bad_call(PACKED, **change)


def test_backward_checks_its_tensors_against_the_forward():
    seqs, hx = _sequences([2, 3, 1], 1, torch.float64)
    x, off, _, T, _ = _ragged(seqs, OFFSETS)
    w_ih, w_hh, b_ih, b_hh = _weights(1, True, torch.float64)
    out, h_n, ws = ops.gru_layer_ragged_forward(
        x, off, None, OFFSETS, T, hx, w_ih, w_hh, b_ih, b_hh, True
    )

    def backward(**change):
        args = dict(
            grad_output=out,
            grad_h_n=h_n,
            input=x,
            seq_index=off,
            sorted_indices=None,
            layout=OFFSETS,
            max_len=T,
            hx=hx,
            w_ih=w_ih,
            w_hh=w_hh,
            output=out,
            workspace=ws,
        )
        args.update(change)
        return ops.gru_layer_ragged_backward(*args.values())

    backward()  # the valid call
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \[6, 4\]"):
        backward(grad_output=out[:5])
    with pytest.raises(RuntimeError, match=r"workspace must be \[D, 6, 4H\]"):
        backward(workspace=ws[:, :5])
    with pytest.raises(RuntimeError, match=r"offsets\[B\] must equal input.size\(0\)=6"):
        backward(seq_index=torch.tensor([0, 2, 5, 7]))
