"""Plain PyTorch GRU, LSTM and RNN layers with length masking: the test oracle, and the
differentiable path.

Written from the cell equations with ordinary tensor ops, so every autograd feature works
through them: double backward, forward-mode AD (torch.autograd.forward_ad, torch.func.jvp)
and the torch.func transforms. They also cover what torch.nn + packing refuses: zero-length
sequences and T = 0. varlen_rnn.ops uses the *_layer_reference functions where the fused
kernels have no derivative of their own (gradients of gradients, forward mode) and under
torch.func's grad/jacrev (which refuse ops with a registered autograd formula); they are never
on the first-order path of loss.backward().

One masked recurrence (_layer_reference) serves every cell; a cell is its step function.
Shape legend: T time, B batch, I input, H hidden, D directions, P the state width (the LSTM's
proj_size, else H); gates in torch.nn's order (GRU r|z|n, LSTM i|f|g|o).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gru_layer_reference",
    "gru_layer_ragged_reference",
    "gru_reference",
    "lstm_layer_reference",
    "lstm_layer_ragged_reference",
    "lstm_reference",
    "rnn_layer_reference",
    "rnn_layer_ragged_reference",
    "rnn_reference",
]

# step(d, gx, state) -> the new state: gx [B, G*H] is W_ih x + b_ih at one time step of
# direction d; state the tuple of state tensors [B, *] (h first, then c for the LSTM). The new
# h (first) is also the step's output.
Step = Callable[[int, Tensor, tuple], tuple]


def _at(t: Tensor | None, d: int) -> Tensor | None:
    return None if t is None else t[d]


def _layer_reference(
    input: Tensor,  # [T, B, I] or [B, T, I] if batch_first
    lengths,  # [B] ints, on any device (a list or tensor)
    states: tuple,  # the initial states [D, B, *], h first
    w_ih: Tensor,  # [D, G*H, I]
    b_ih: Tensor | None,  # [D, G*H]
    batch_first: bool,
    step: Step,
) -> tuple:
    """The masked recurrence every cell shares: (output, *final states). Output [T, B, D*P]
    (or [B, T, D*P]) is 0 past each length; each final state [D, B, *] is the row's state
    after its own last valid step (the initial state for a zero-length row); the reverse
    direction starts at each row's own last valid step. Padding is never read."""
    x = input.transpose(0, 1) if batch_first else input  # [T, B, I]
    T, B = x.shape[0], x.shape[1]
    D = w_ih.shape[0]
    lengths = torch.as_tensor(lengths, device=x.device).to(torch.int64)
    bad = ((lengths < 0) | (lengths > T)).nonzero()
    if bad.numel():  # the kernels' check, with the kernels' words
        i = int(bad[0, 0])
        got = int(lengths[i])
        raise RuntimeError(f"lengths must be in [0, T] with T={T}, got lengths[{i}]={got}")
    steps = torch.arange(T, device=x.device).unsqueeze(1)  # [T, 1]
    valid = steps < lengths  # [T, B]
    # Masked, not merely ignored: a NaN in the padding would otherwise reach the weight
    # gradients as 0 * NaN.
    x = torch.where(valid.unsqueeze(2), x, 0)
    # Step t of a row's reverse pass reads position len-1-t; past the length the index
    # stays put. The map is its own inverse, so it also puts the outputs back in place.
    flip = torch.where(valid, lengths - 1 - steps, steps).unsqueeze(2)  # [T, B, 1]
    outs, finals = [], []
    for d in range(D):
        xd = x.gather(0, flip.expand(T, B, x.shape[2])) if d else x
        # Unbound once: indexing gx[t] at every step would give each step's gradient a
        # zero-filled [T, B, G*H] of its own in the backward (T^2 work), unbind's backward
        # stacks them once.
        gx = F.linear(xd, w_ih[d], _at(b_ih, d)).unbind(0)  # T x [B, G*H]
        state = tuple(s[d] for s in states)  # each [B, *]
        ys = []
        for t in range(T):
            new = step(d, gx[t], state)
            keep = valid[t].unsqueeze(1)  # [B, 1]
            state = tuple(torch.where(keep, n, s) for n, s in zip(new, state))
            ys.append(new[0])
        P = state[0].shape[1]
        # Zero past each length, once for all steps (what each step's kept state is not).
        y = torch.where(valid.unsqueeze(2), torch.stack(ys), 0) if ys else x.new_zeros(0, B, P)
        outs.append(y.gather(0, flip.expand(T, B, P)) if d else y)  # [T, B, P]
        finals.append(state)
    out = torch.cat(outs, 2) if D > 1 else outs[0]
    out = out.transpose(0, 1) if batch_first else out
    return (out, *(torch.stack([f[k] for f in finals]) for k in range(len(states))))


def _gru_step(w_hh: Tensor, b_hh: Tensor | None) -> Step:
    H = w_hh.shape[2]

    def step(d, gx, state):
        (h,) = state
        gh = F.linear(h, w_hh[d], _at(b_hh, d))  # [B, 3H]
        r, z = torch.sigmoid(gx[:, : 2 * H] + gh[:, : 2 * H]).chunk(2, 1)  # each [B, H]
        n = torch.tanh(torch.addcmul(gx[:, 2 * H :], r, gh[:, 2 * H :]))
        return (torch.lerp(n, h, z),)  # (1 - z) * n + z * h

    return step


def _lstm_step(w_hh: Tensor, b_hh: Tensor | None, w_hr: Tensor | None) -> Step:
    def step(d, gx, state):
        h, c = state
        gates = gx + F.linear(h, w_hh[d], _at(b_hh, d))  # [B, 4H]
        i, f, _, o = torch.sigmoid(gates).chunk(4, 1)  # each [B, H]
        g = torch.tanh(gates.chunk(4, 1)[2])
        c = torch.addcmul(f * c, i, g)
        h = o * torch.tanh(c)
        return (h if w_hr is None else F.linear(h, w_hr[d])), c

    return step


def _rnn_step(w_hh: Tensor, b_hh: Tensor | None, nonlinearity: str) -> Step:
    if nonlinearity not in ("tanh", "relu"):  # the kernels' check, with the kernels' words
        raise RuntimeError(f"nonlinearity must be 'tanh' or 'relu', got '{nonlinearity}'")
    act = torch.tanh if nonlinearity == "tanh" else torch.relu

    def step(d, gx, state):
        return (act(gx + F.linear(state[0], w_hh[d], _at(b_hh, d))),)

    return step


def gru_layer_reference(
    input: Tensor,  # [T, B, I] or [B, T, I] if batch_first
    lengths,  # [B] ints, on any device (a list or tensor)
    hx: Tensor,  # [D, B, H]
    w_ih: Tensor,  # [D, 3H, I]
    w_hh: Tensor,  # [D, 3H, H]
    b_ih: Tensor | None = None,  # [D, 3H]
    b_hh: Tensor | None = None,  # [D, 3H]
    batch_first: bool = False,
) -> tuple[Tensor, Tensor]:
    """What varlen_rnn.ops.gru_layer returns, with the kernels' semantics: output
    [T, B, D*H] (or [B, T, D*H]) that is 0 past each length, h_n [D, B, H] each row's
    state after its own last valid step (hx for a zero-length row); the reverse
    direction starts at each row's own last valid step. Padding is never read."""
    step = _gru_step(w_hh, b_hh)
    return _layer_reference(input, lengths, (hx,), w_ih, b_ih, batch_first, step)


def lstm_layer_reference(
    input: Tensor,  # [T, B, I] or [B, T, I] if batch_first
    lengths,  # [B] ints, on any device (a list or tensor)
    hx: Tensor,  # [D, B, P]
    cx: Tensor,  # [D, B, H]
    w_ih: Tensor,  # [D, 4H, I]
    w_hh: Tensor,  # [D, 4H, P]
    b_ih: Tensor | None = None,  # [D, 4H]
    b_hh: Tensor | None = None,  # [D, 4H]
    w_hr: Tensor | None = None,  # [D, P, H] (proj_size P), or None: P = H
    batch_first: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """What the lstm_layer_forward op returns (without the workspace): output [T, B, D*P]
    (or [B, T, D*P]), h_n [D, B, P], c_n [D, B, H], with gru_layer_reference's semantics."""
    step = _lstm_step(w_hh, b_hh, w_hr)
    return _layer_reference(input, lengths, (hx, cx), w_ih, b_ih, batch_first, step)


def rnn_layer_reference(
    input: Tensor,  # [T, B, I] or [B, T, I] if batch_first
    lengths,  # [B] ints, on any device (a list or tensor)
    hx: Tensor,  # [D, B, H]
    w_ih: Tensor,  # [D, H, I]
    w_hh: Tensor,  # [D, H, H]
    b_ih: Tensor | None = None,  # [D, H]
    b_hh: Tensor | None = None,  # [D, H]
    nonlinearity: str = "tanh",  # or "relu"
    batch_first: bool = False,
) -> tuple[Tensor, Tensor]:
    """What the rnn_layer_forward op returns (without the workspace): output [T, B, D*H]
    (or [B, T, D*H]) and h_n [D, B, H], with gru_layer_reference's semantics."""
    step = _rnn_step(w_hh, b_hh, nonlinearity)
    return _layer_reference(input, lengths, (hx,), w_ih, b_ih, batch_first, step)


def _module_reference(module, input: Tensor, states: list, lengths, layer) -> tuple:
    """A multi-layer module's stack of layer references (without dropout): states are the
    initial [L*D, B, *] tensors (h first); layer(x, lengths, layer_states, weights) runs one
    layer. Returns (output, *final states [L*D, B, *])."""
    T, B = (input.shape[1], input.shape[0]) if module.batch_first else input.shape[:2]
    D = 2 if module.bidirectional else 1
    if lengths is None:
        lengths = [T] * B
    names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    if getattr(module, "proj_size", 0) > 0:
        names.append("weight_hr")
    x, finals = input, []
    for k in range(module.num_layers):
        sfx = [f"l{k}", f"l{k}_reverse"][:D]
        w = {
            n: torch.stack([getattr(module, f"{n}_{s}") for s in sfx])
            for n in names
            if module.bias or not n.startswith("bias")
        }
        x, *h = layer(x, lengths, [s[k * D : (k + 1) * D] for s in states], w)
        finals.append(h)
    return (x, *(torch.cat([f[i] for f in finals], 0) for i in range(len(states))))


def _zeros_state(module, input: Tensor, width: int) -> Tensor:
    B = input.shape[0] if module.batch_first else input.shape[1]
    D = 2 if module.bidirectional else 1
    return input.new_zeros(module.num_layers * D, B, width)


def gru_reference(module, input: Tensor, hx: Tensor | None = None, lengths=None):
    """What varlen_rnn.GRU(input, hx, lengths) must return (without dropout), for a
    batched padded input, computed with module's parameters (a varlen_rnn.GRU or a
    torch.nn.GRU)."""
    if hx is None:
        hx = _zeros_state(module, input, module.hidden_size)

    def layer(x, lengths, states, w):
        args = (w["weight_ih"], w["weight_hh"], w.get("bias_ih"), w.get("bias_hh"))
        return gru_layer_reference(x, lengths, states[0], *args, module.batch_first)

    return _module_reference(module, input, [hx], lengths, layer)


def lstm_reference(module, input: Tensor, hx: tuple | None = None, lengths=None):
    """What varlen_rnn.LSTM(input, hx, lengths) must return (without dropout) for a batched
    padded input: (output, (h_n, c_n)), computed with module's parameters (a varlen_rnn.LSTM
    or a torch.nn.LSTM). hx = (h_0 [L*D, B, P], c_0 [L*D, B, H]) or None."""
    if hx is None:
        P = module.proj_size or module.hidden_size
        hx = (_zeros_state(module, input, P), _zeros_state(module, input, module.hidden_size))

    def layer(x, lengths, states, w):
        args = (w["weight_ih"], w["weight_hh"], w.get("bias_ih"), w.get("bias_hh"))
        return lstm_layer_reference(
            x, lengths, *states, *args, w.get("weight_hr"), module.batch_first
        )

    out, h_n, c_n = _module_reference(module, input, list(hx), lengths, layer)
    return out, (h_n, c_n)


def rnn_reference(module, input: Tensor, hx: Tensor | None = None, lengths=None):
    """What varlen_rnn.RNN(input, hx, lengths) must return (without dropout) for a batched
    padded input, computed with module's parameters (a varlen_rnn.RNN or a torch.nn.RNN)."""
    if hx is None:
        hx = _zeros_state(module, input, module.hidden_size)

    def layer(x, lengths, states, w):
        args = (w["weight_ih"], w["weight_hh"], w.get("bias_ih"), w.get("bias_hh"))
        return rnn_layer_reference(
            x, lengths, states[0], *args, module.nonlinearity, module.batch_first
        )

    return _module_reference(module, input, [hx], lengths, layer)


def ragged_rows(
    seq_index: Tensor,  # layout 0: offsets [B+1]; layout 1: batch_sizes [T]
    sorted_indices: Tensor | None,  # layout 1: [B], rank -> sequence; None = identity
    layout: int,
    max_len: int,
    B: int,
    N: int,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Where each (t, b) of a ragged batch lives: rows [T, B] (T = max_len) with the row of
    step t of sequence b, N past its length, and lengths [B], both in sequence order b.
    Layout 0 (offsets, sequence-major): row = offsets[b] + t. Layout 1 (packed, time-major):
    row of rank i at step t = sum(batch_sizes[:t]) + i, for the sequence sorted_indices[i]."""
    T = int(max_len)
    steps = torch.arange(T, device=device).unsqueeze(1)  # [T, 1]
    if layout == 0:
        offsets = seq_index.to(device, torch.int64)
        lengths = offsets.diff()  # [B]
        rows = offsets[:-1] + steps  # [T, B]
    elif layout == 1:
        batch_sizes = seq_index.to(device, torch.int64)  # [T'] (T' <= T)
        ranks = torch.arange(B, device=device)  # [B]
        lengths = (batch_sizes.unsqueeze(1) > ranks).sum(0)  # [B] by rank
        starts = torch.zeros(T, dtype=torch.int64, device=device)
        starts[: batch_sizes.numel()] = batch_sizes.cumsum(0) - batch_sizes
        rows = starts.unsqueeze(1) + ranks  # [T, B] by rank
        if sorted_indices is not None:  # rank i holds sequence sorted_indices[i]
            order = sorted_indices.to(device, torch.int64)
            lengths = torch.empty_like(lengths).index_copy_(0, order, lengths)
            rows = torch.empty_like(rows).index_copy_(1, order, rows)
    else:
        raise ValueError(f"layout must be 0 (offsets) or 1 (packed), got {layout}")
    if lengths.numel() != B:
        raise RuntimeError(f"seq_index describes {lengths.numel()} sequences, hx has B={B}")
    if B and (lengths.min() < 0 or lengths.max() > T or int(lengths.sum()) != N):
        raise RuntimeError(
            f"seq_index must describe lengths in [0, max_len={T}] summing to "
            f"input.size(0)={N}, got lengths {lengths.tolist()}"
        )
    return torch.where(steps < lengths, rows, N), lengths


def _ragged_reference(input: Tensor, seq_index, sorted_indices, layout, max_len, B, run) -> tuple:
    """A padded layer reference over ragged rows: run(padded [T, B, I], lengths) returns
    (output [T, B, D*P], *final states); this returns (output [N, D*P] in input's row order,
    *final states). Differentiable gathers move the rows to a padded batch and back, so every
    autograd feature works through it too."""
    N = input.shape[0]
    rows, lengths = ragged_rows(seq_index, sorted_indices, layout, max_len, B, N, input.device)
    T = rows.shape[0]
    # Row N is a zero sentinel for the positions past each length (and makes N = 0 work).
    ext = torch.cat([input, input.new_zeros(1, input.shape[1])])  # [N+1, I]
    out, *states = run(ext[rows], lengths)  # out [T, B, D*P]
    # Each valid row is the image of exactly one (t, b): invert the map to read out back.
    where = torch.full((N + 1,), T * B, dtype=torch.int64, device=input.device)
    where.scatter_(0, rows.flatten(), torch.arange(T * B, device=input.device))
    flat = torch.cat([out.reshape(T * B, -1), out.new_zeros(1, out.shape[2])])  # [T*B+1, D*P]
    return (flat[where[:N]], *states)


def gru_layer_ragged_reference(
    input: Tensor,  # [N, I]: only the valid positions, rows in the layout's order
    seq_index: Tensor,  # layout 0: offsets [B+1]; layout 1: batch_sizes [T] (CPU)
    sorted_indices: Tensor | None,  # layout 1: [B] rank -> sequence; None = identity
    layout: int,  # 0 = offsets (sequence-major), 1 = packed (time-major)
    max_len: int,  # >= every length
    hx: Tensor,  # [D, B, H], sequence order b
    w_ih: Tensor,  # [D, 3H, I]
    w_hh: Tensor,  # [D, 3H, H]
    b_ih: Tensor | None = None,  # [D, 3H]
    b_hh: Tensor | None = None,  # [D, 3H]
) -> tuple[Tensor, Tensor]:
    """What varlen_rnn.ops.gru_layer_ragged returns: output [N, D*H] in input's row order and
    h_n [D, B, H]. Built on gru_layer_reference (see _ragged_reference)."""
    return _ragged_reference(
        input,
        seq_index,
        sorted_indices,
        layout,
        max_len,
        hx.shape[1],
        lambda x, lengths: gru_layer_reference(x, lengths, hx, w_ih, w_hh, b_ih, b_hh),
    )


def lstm_layer_ragged_reference(
    input: Tensor,  # [N, I]: only the valid positions, rows in the layout's order
    seq_index: Tensor,  # layout 0: offsets [B+1]; layout 1: batch_sizes [T] (CPU)
    sorted_indices: Tensor | None,  # layout 1: [B] rank -> sequence; None = identity
    layout: int,  # 0 = offsets (sequence-major), 1 = packed (time-major)
    max_len: int,  # >= every length
    hx: Tensor,  # [D, B, P], sequence order b
    cx: Tensor,  # [D, B, H], sequence order b
    w_ih: Tensor,  # [D, 4H, I]
    w_hh: Tensor,  # [D, 4H, P]
    b_ih: Tensor | None = None,  # [D, 4H]
    b_hh: Tensor | None = None,  # [D, 4H]
    w_hr: Tensor | None = None,  # [D, P, H] or None
) -> tuple[Tensor, Tensor, Tensor]:
    """What the lstm_layer_ragged_forward op returns (without the workspace): output
    [N, D*P] in input's row order, h_n [D, B, P], c_n [D, B, H]."""
    return _ragged_reference(
        input,
        seq_index,
        sorted_indices,
        layout,
        max_len,
        hx.shape[1],
        lambda x, lengths: lstm_layer_reference(x, lengths, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr),
    )


def rnn_layer_ragged_reference(
    input: Tensor,  # [N, I]: only the valid positions, rows in the layout's order
    seq_index: Tensor,  # layout 0: offsets [B+1]; layout 1: batch_sizes [T] (CPU)
    sorted_indices: Tensor | None,  # layout 1: [B] rank -> sequence; None = identity
    layout: int,  # 0 = offsets (sequence-major), 1 = packed (time-major)
    max_len: int,  # >= every length
    hx: Tensor,  # [D, B, H], sequence order b
    w_ih: Tensor,  # [D, H, I]
    w_hh: Tensor,  # [D, H, H]
    b_ih: Tensor | None = None,  # [D, H]
    b_hh: Tensor | None = None,  # [D, H]
    nonlinearity: str = "tanh",  # or "relu"
) -> tuple[Tensor, Tensor]:
    """What the rnn_layer_ragged_forward op returns (without the workspace): output
    [N, D*H] in input's row order and h_n [D, B, H]."""
    return _ragged_reference(
        input,
        seq_index,
        sorted_indices,
        layout,
        max_len,
        hx.shape[1],
        lambda x, lengths: rnn_layer_reference(
            x, lengths, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity
        ),
    )
