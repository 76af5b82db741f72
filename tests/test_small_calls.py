"""The shortcuts of a small call on the CPU, against torch.nn + packing in float64:

- input rows read in place, without a gather, where the valid positions are all T*B rows in
  order (full lengths time-major, one sequence, one step), and gathered where they are a prefix
  of the rows but not all of them (batch_first [T, 0, 0]: the positions are rows 0..T-1);
- the states moved to and from the kernels' sorted order by a copy where that order is the
  caller's (lengths already descending), by an index elsewhere;
- the op called below its autograd kernel when no gradient is wanted: the results of the
  gradient-recording call, bit for bit, and the input untouched;
- a decoder's loop of one-step calls, the state carried between them.
"""

import pytest
import torch
from testing import CELL_KINDS, TOL, OpArguments, make_kind_pair, packed_baseline

import varlen_rnn

KINDS = ["gru", *CELL_KINDS]


def states_of(kind, B, H, L, D, g):
    """Random initial states: h (and c) [L*D, B, P or H], as the module takes them."""
    h = torch.randn(
        L * D, B, H // 2 if kind == "lstm_proj" else H, generator=g, dtype=torch.float64
    )
    if kind.startswith("lstm"):
        return (h, torch.randn(L * D, B, H, generator=g, dtype=torch.float64))
    return h


def baseline(ref, x, lengths, hx):
    """nn + packing over the rows of nonzero length (packing refuses zero lengths), put back in
    place: zero-length rows get output 0 and their hx as the final state."""
    bf = ref.batch_first
    keep = [b for b, n in enumerate(lengths) if n > 0]
    xs = x[keep] if bf else x[:, keep]
    pick = lambda s: s[:, keep]  # noqa: E731
    hxs = tuple(pick(s) for s in hx) if isinstance(hx, tuple) else pick(hx)
    out_k, fin_k = packed_baseline(ref, xs, [lengths[b] for b in keep], hxs)
    out = x.new_zeros((*x.shape[:2], out_k.shape[-1]))
    if bf:
        out[keep] = out_k
    else:
        out[:, keep] = out_k

    def place(init, fin):
        full = init.clone()
        full[:, keep] = fin
        return full

    if isinstance(hx, tuple):
        return out, tuple(place(i, f) for i, f in zip(hx, fin_k))
    return out, place(hx, fin_k)


def flat(result):
    out, fin = result
    return [out, *(fin if isinstance(fin, tuple) else (fin,))]


# (lengths, T): positions that are all T*B rows in order (read in place in time-major, and in
# batch_first where B == 1 or T == 1), a prefix of the rows (batch_first [T, 0, 0]), already
# descending (the sorted order is the caller's), and unsorted.
CASES = {
    "full": ([5, 5, 5], 5),
    "one_sequence": ([5], 5),
    "one_step": ([1, 1, 1, 1], 1),
    "first_only": ([5, 0, 0], 5),
    "descending": ([5, 3, 3, 0], 5),
    "unsorted": ([2, 5, 0, 4], 5),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", KINDS)
def test_small_call_shortcuts_match_nn_with_packing(kind, bidirectional, batch_first, case):
    lengths, T = CASES[case]
    B, I, H, L, D = len(lengths), 3, 4, 2, 2 if bidirectional else 1
    ref, ours = make_kind_pair(
        kind, I, H, num_layers=L, batch_first=batch_first, bidirectional=bidirectional
    )
    g = torch.Generator().manual_seed(1)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    hx = states_of(kind, B, H, L, D, g)
    hxs = hx if isinstance(hx, tuple) else (hx,)
    for s in hxs:
        s.requires_grad_()
    got = flat(ours(x, hx, lengths=lengths))
    want = flat(baseline(ref, x, lengths, hx))
    for a, b, what in zip(got, want, ["output", "h_n", "c_n"]):
        torch.testing.assert_close(a, b, **TOL[torch.float64], msg=lambda m: f"{what}: {m}")
    seeds = torch.Generator().manual_seed(2)
    weights = [torch.randn(o.shape, generator=seeds, dtype=torch.float64) for o in got]
    inputs_ours = [x, *hxs, *ours.parameters()]
    inputs_ref = [x, *hxs, *ref.parameters()]
    grad_ours = torch.autograd.grad(sum((o * w).sum() for o, w in zip(got, weights)), inputs_ours)
    grad_ref = torch.autograd.grad(sum((o * w).sum() for o, w in zip(want, weights)), inputs_ref)
    for k, (a, b) in enumerate(zip(grad_ours, grad_ref)):
        torch.testing.assert_close(a, b, **TOL[torch.float64], msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("case", ["full", "one_step", "first_only", "unsorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_inference_call_equals_the_recording_call(kind, dtype, case):
    """No gradient wanted (torch.no_grad, torch.inference_mode, or nothing requiring grad): the
    op runs below its autograd kernel, with the kernels of the recording call, so the results
    are those of a call that records a graph, bit for bit; the input, read in place where its
    rows are the positions, is left as it was."""
    lengths, T = CASES[case]
    B, I, H = len(lengths), 4, 6
    _, ours = make_kind_pair(kind, I, H, num_layers=2, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, I, generator=g).to(dtype)
    before = x.clone()
    recorded = flat(ours(x.clone().requires_grad_(), lengths=lengths))
    assert recorded[0].requires_grad
    with torch.no_grad():
        no_grad = flat(ours(x, lengths=lengths))
    with torch.inference_mode():
        inference = flat(ours(x, lengths=lengths))
    for p in ours.parameters():
        p.requires_grad_(False)
    frozen = flat(ours(x, lengths=lengths))
    for results in (no_grad, inference, frozen):
        for a, b in zip(results, recorded):
            assert not a.requires_grad
            assert torch.equal(a, b.detach())
    assert torch.equal(x, before)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_decoder_loop_of_one_step_calls_matches_nn(kind, B):
    """out, h = rnn(x_t, h) for t in range(T), the state carried between calls: at length 1
    every call is nn's without packing. Inference and training, the loss of every step
    differentiated back through the chain of calls."""
    I, H, T = 3, 5, 6
    ref, ours = make_kind_pair(kind, I, H, num_layers=2)
    g = torch.Generator().manual_seed(4)
    xs = torch.randn(T, 1, B, I, generator=g, dtype=torch.float64, requires_grad=True)
    h_ours = h_ref = states_of(kind, B, H, 2, 1, g)
    outs_ours, outs_ref = [], []
    for t in range(T):
        o, h_ours = ours(xs[t], h_ours)
        r, h_ref = ref(xs[t], h_ref)
        outs_ours.append(o)
        outs_ref.append(r)
    torch.testing.assert_close(torch.cat(outs_ours), torch.cat(outs_ref), **TOL[torch.float64])
    for a, b in zip(flat((None, h_ours))[1:], flat((None, h_ref))[1:]):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    w = torch.randn(T, B, outs_ours[0].shape[-1], generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((torch.cat(outs_ours) * w).sum(), [xs, *ours.parameters()])
    gb = torch.autograd.grad((torch.cat(outs_ref) * w).sum(), [xs, *ref.parameters()])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("D", [1, 2], ids=["squeezed", "bi"])
@pytest.mark.parametrize("ragged", [False, True], ids=["padded", "ragged"])
@pytest.mark.parametrize("kind", KINDS)
def test_eager_autograd_equals_the_registered_autograd(kind, ragged, D):
    """An eager call that records a graph runs the recording op, whose C++ node calls the
    backward op (csrc/recording.cpp); the forward op called through the dispatcher runs its
    registered autograd kernel (varlen_rnn/_autograd.py). Same outputs, same gradients and
    gradients of gradients, bit for bit, and the eager node is the C++ one. With one
    direction the recording op takes the weights without their D dimension (the parameters
    themselves, ops._layer's squeezed), the forward op their [1, ...] views: the graph then
    holds our node alone, no view node per weight."""
    from varlen_rnn import _schema

    cell = _schema.CELLS[kind.split("_")[0]]
    ref, _ = make_kind_pair(kind, 3, 4, bidirectional=D == 2)
    g = torch.Generator().manual_seed(8)
    B, T, H = 3, 4, 4
    P = H // 2 if kind == "lstm_proj" else H
    lengths = [4, 0, 2]
    x = torch.randn(sum(lengths) if ragged else T, *(() if ragged else (B,)), 3, generator=g)
    x = x.double().requires_grad_()
    states = [torch.randn(D, B, P, generator=g, dtype=torch.float64, requires_grad=True)]
    if cell.states == 2:
        states.append(torch.randn(D, B, H, generator=g, dtype=torch.float64, requires_grad=True))
    names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"] + (["weight_hr"] if cell.proj else [])
    sfx = ["l0", "l0_reverse"][:D]
    weights = []  # the leaves: [D, ...], or the parameters' shapes with one direction
    for n in names:
        if hasattr(ref, f"{n}_l0"):
            w = torch.stack([getattr(ref, f"{n}_{s}") for s in sfx]).detach()
            w = (w[0] if D == 1 else w).clone().requires_grad_()
        else:
            w = None
        weights.append(w)
    op_weights = _schema._unsqueezed(weights) if D == 1 else weights
    if ragged:
        index = (torch.tensor([0, 4, 4, 6]), None, 0, T)
    else:
        index = (torch.tensor(lengths),)
    options = (kind.split("_")[1],) if cell.options else ()
    tail = (*options, *(() if ragged else (False,)))
    args = (x, *index, *states, *weights, *tail)
    leaves = [t for t in (x, *states, *weights) if t is not None]
    eager = _schema._op(cell, ragged, "recording")(*args, D == 1)
    dispatched = _schema._op(cell, ragged, "forward")(x, *index, *states, *op_weights, *tail, True)
    node = f"{cell.name.upper()}Layer{'Ragged' if ragged else ''}Backward"
    assert all(o.grad_fn is eager[0].grad_fn for o in eager)
    assert eager[0].grad_fn.name() == node
    assert type(eager[0].grad_fn) is not type(dispatched[0].grad_fn)
    if D == 1:  # the weights are the node's inputs themselves
        inputs = {id(fn.variable) for fn, _ in eager[0].grad_fn.next_functions if fn is not None}
        assert all(id(w) in inputs for w in weights if w is not None)
    w = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in eager]
    loss_e = sum((o * v).sum() for o, v in zip(eager, w))
    loss_d = sum((o * v).sum() for o, v in zip(dispatched[:-1], w))
    ge = torch.autograd.grad(loss_e, leaves, create_graph=True)
    gd = torch.autograd.grad(loss_d, leaves, create_graph=True)
    assert len(eager) == len(dispatched) - 1  # no workspace: the node keeps it
    for a, b in zip(eager, dispatched[:-1]):
        assert torch.equal(a, b)
    for k, (a, b) in enumerate(zip(ge, gd)):
        assert a.shape == b.shape and torch.equal(a, b), f"gradient {k}"
    # Gradients of gradients (the recomputed, differentiable backward) agree too.
    gge = torch.autograd.grad(sum(a.square().sum() for a in ge), leaves, allow_unused=True)
    ggd = torch.autograd.grad(sum(b.square().sum() for b in gd), leaves, allow_unused=True)
    for k, (a, b) in enumerate(zip(gge, ggd)):
        assert (a is None) == (b is None), f"second-order gradient {k}"
        assert a is None or torch.equal(a, b), f"second-order gradient {k}"
        if D == 1 and any(leaves[k] is w for w in weights):
            assert a is not None, f"second-order gradient {k} is missing"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("kind", KINDS)
def test_short_bidirectional_call_runs_directions_apart(kind, batch_first, dtype, monkeypatch):
    """A bidirectional padded call of few positions (varlen_rnn._apart.APART_POSITIONS) runs its
    directions as two one-direction calls, the reverse one over each sequence's steps reversed:
    no stack of the weights, and the results of the one call on stacked weights bit for bit
    (forced with the limit at 0), zero and unsorted lengths included. The gradients agree to
    rounding: a layer's input gradient sums its two directions' parts after their products
    here, inside one product there. nn + packing in float64
    (test_small_call_shortcuts_match_nn_with_packing) checks both against torch.nn."""
    from torch.profiler import profile

    from varlen_rnn import _apart

    lengths, T = [3, 0, 4, 1, 4], 4
    B, I, H = len(lengths), 3, 4
    _, ours = make_kind_pair(kind, I, H, num_layers=2, batch_first=batch_first, bidirectional=True)
    ours = ours.to(dtype)
    g = torch.Generator().manual_seed(5)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), generator=g).to(dtype)
    assert T * B <= _apart.APART_POSITIONS

    def run():
        xg = x.clone().requires_grad_()
        with profile() as prof:
            got = flat(ours(xg, lengths=lengths))
        stacks = sum(e.count for e in prof.key_averages() if e.key == "aten::stack")
        w = torch.Generator().manual_seed(6)
        loss = sum((o.float() * torch.randn(o.shape, generator=w)).sum() for o in got)
        grads = torch.autograd.grad(loss, [xg, *ours.parameters()])
        return got, grads, stacks

    apart, grads_apart, stacks_apart = run()
    monkeypatch.setattr(_apart, "APART_POSITIONS", 0)
    one, grads_one, stacks_one = run()
    assert stacks_apart == 0 and stacks_one > 0
    for k, (a, b) in enumerate(zip(apart, one)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"result {k}"
    tol = TOL.get(dtype, dict(atol=2e-2, rtol=2e-2))  # bfloat16: its gradients' rounding
    for k, (a, b) in enumerate(zip(grads_apart, grads_one)):
        assert a.dtype == b.dtype, f"gradient {k}"
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"gradient {k}: {m}")


def _full_path_only(monkeypatch):
    """forward without its eager shortcut."""
    monkeypatch.setattr(varlen_rnn.RNNBase, "_eager_shortcut", lambda *a: None)


@pytest.mark.parametrize("hx_given", [False, True], ids=["hx0", "hx"])
@pytest.mark.parametrize("lengths_kind", ["none", "list", "tensor"])
@pytest.mark.parametrize("layers,batch_first,bias", [(1, False, True), (2, True, False)])
@pytest.mark.parametrize("kind", KINDS)
def test_eager_shortcut_shortcut(
    monkeypatch, kind, layers, batch_first, bias, lengths_kind, hx_given
):
    """A call that wants no gradient, one direction, padded: forward's shortcut
    (RNNBase._eager_shortcut) runs it without the full path's layer loop (RNNBase._run is not
    called), with the same op calls (one per layer, no workspace kept): outputs and final states
    equal the full path's bit for bit, and nn + packing's in float64."""
    lengths, T = [2, 5, 0, 4], 5
    B, I, H = len(lengths), 3, 6
    ref, ours = make_kind_pair(kind, I, H, num_layers=layers, batch_first=batch_first, bias=bias)
    g = torch.Generator().manual_seed(5)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), generator=g, dtype=torch.float64)
    hx = states_of(kind, B, H, layers, 1, g) if hx_given else None
    arg = {"none": None, "list": lengths, "tensor": torch.tensor(lengths)}[lengths_kind]
    if arg is None:
        lengths = [T] * B
    with torch.no_grad():
        with monkeypatch.context() as m, OpArguments("_forward", "need_workspace") as rec:
            m.setattr(varlen_rnn.RNNBase, "_run", None)  # calling it fails the test
            short = flat(ours(x, hx, lengths=arg))
        assert rec.values == [False] * layers  # each layer's op, keeping nothing
        with monkeypatch.context() as m:
            _full_path_only(m)
            full = flat(ours(x, hx, lengths=arg))
    for a, b in zip(short, full, strict=True):
        assert torch.equal(a, b)
    zeros = tuple(
        torch.zeros_like(s) for s in flat((None, states_of(kind, B, H, layers, 1, g)))[1:]
    )
    init = hx if hx_given else (zeros if kind.startswith("lstm") else zeros[0])
    for a, b in zip(short, flat(baseline(ref, x, lengths, init)), strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("wants", ["all", "parameters", "input", "state"])
@pytest.mark.parametrize("layers,batch_first,bias", [(1, False, True), (2, True, False)])
@pytest.mark.parametrize("kind", KINDS)
def test_eager_shortcut_of_a_recording_call(monkeypatch, kind, layers, batch_first, bias, wants):
    """A call that records a graph, one direction, padded: the shortcut runs it too, each layer
    through the recording op (one node per layer, RNNBase._run not called), with what requires
    a gradient varied (everything; the parameters only, the input being data; the input or the
    initial state only, the parameters frozen). Outputs, final states and every gradient equal
    the full path's bit for bit, and nn + packing's in float64."""
    lengths, T = [2, 5, 0, 4], 5
    B, I, H = len(lengths), 3, 6
    ref, ours = make_kind_pair(kind, I, H, num_layers=layers, batch_first=batch_first, bias=bias)
    g = torch.Generator().manual_seed(6)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), generator=g, dtype=torch.float64)
    hx = states_of(kind, B, H, layers, 1, g)
    states = list(hx) if isinstance(hx, tuple) else [hx]
    x.requires_grad_(wants in ("all", "input"))
    for s in states:
        s.requires_grad_(wants in ("all", "state"))
    for p in (*ours.parameters(), *ref.parameters()):
        p.requires_grad_(wants in ("all", "parameters"))
    leaves = [t for t in (x, *states, *ours.parameters()) if t.requires_grad]
    v = torch.Generator().manual_seed(7)

    def loss_of(result):
        return sum(
            (t * torch.randn(t.shape, generator=v, dtype=t.dtype)).sum() for t in flat(result)
        )

    with monkeypatch.context() as m, OpArguments("_forward", "need_workspace") as rec:
        m.setattr(varlen_rnn.RNNBase, "_run", None)  # calling it fails the test
        short = ours(x, hx, lengths=lengths)
    assert rec.values == [True] * layers  # each layer's forward op, keeping its workspace
    node = f"{kind.split('_')[0].upper()}LayerBackward"
    last = flat(short)[0].grad_fn
    assert last.name() == node  # the recording op's node (its C++ name)
    v.manual_seed(7)
    g_short = torch.autograd.grad(loss_of(short), leaves)
    with monkeypatch.context() as m:
        _full_path_only(m)
        full = ours(x, hx, lengths=lengths)
    v.manual_seed(7)
    g_full = torch.autograd.grad(loss_of(full), leaves)
    for a, b in zip((*flat(short), *g_short), (*flat(full), *g_full), strict=True):
        assert torch.equal(a, b)
    leaves_nn = [t for t in (x, *states, *ref.parameters()) if t.requires_grad]
    v.manual_seed(7)
    g_nn = torch.autograd.grad(loss_of(baseline(ref, x, lengths, hx)), leaves_nn)
    for a, b in zip(g_short, g_nn, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_eager_shortcut_declines(monkeypatch):
    """What the shortcut leaves to the full path: two directions, unbatched or ragged input,
    autocast, dropout between layers in training, torch.func and forward AD, arguments
    forward's checks refuse (which then raise the full path's errors, unchanged, with and
    without a gradient)."""
    from torch.nn.utils.rnn import pack_sequence

    ours = varlen_rnn.GRU(3, 4, num_layers=2, dropout=0.5)
    bi = varlen_rnn.GRU(3, 4, bidirectional=True)
    x, h = torch.randn(5, 2, 3), torch.zeros(2, 2, 4)
    ours.eval()
    with torch.no_grad():
        assert ours._eager_shortcut(x, h, None) is not None  # the one that takes it
        declined = [
            (bi, x, None),
            (ours, x[:, 0], h[:, 0]),  # unbatched
            (ours, pack_sequence([x[:, 0], x[:3, 1]]), None),
            (ours, torch.nested.nested_tensor([x[:, 0], x[:3, 1]], layout=torch.jagged), None),
            (ours, x.double(), h),  # the input's dtype is not the weights'
            (ours, x, h.double()),
            (ours, x, h[:1]),  # hx of the wrong shape
            (ours, x, (h,)),  # a tuple for a GRU
            (ours, torch.randn(5, 2, 4), h),  # the wrong feature size
        ]
        for module, inp, state in declined:
            assert module._eager_shortcut(inp, state, None) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ours._eager_shortcut(x, h, None) is None
        ours.train()
        assert ours._eager_shortcut(x, h, None) is None  # dropout between the two layers
        ours.eval()
        seen = []
        torch.func.vmap(lambda xi: seen.append(ours._eager_shortcut(xi, None, None)) or xi)(
            x.unsqueeze(0)
        )
        assert seen == [None]
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            assert ours._eager_shortcut(x, h, None) is None
    assert ours._eager_shortcut(x, h, None) is not None  # a gradient wanted: taken too
    # Refused arguments raise as before: the same error with and without a gradient.
    for inp, state in [(x.double(), h), (x, h[:1]), (torch.randn(5, 2, 4), h)]:
        with pytest.raises(Exception) as with_grad:
            ours(inp, state)
        with torch.no_grad(), pytest.raises(type(with_grad.value)) as without:
            ours(inp, state)
        assert str(without.value) == str(with_grad.value)
