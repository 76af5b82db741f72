"""A plain PyTorch GRU with length masking: the test oracle, and the differentiable path.

Written from the GRU equations with ordinary tensor ops, so every autograd feature works
through it: double backward, forward-mode AD (torch.autograd.forward_ad, torch.func.jvp)
and the torch.func transforms. It also covers what torch.nn.GRU + packing refuses:
zero-length sequences and T = 0. varlen_rnn.ops uses gru_layer_reference where the fused
kernels have no derivative of their own (gradients of gradients, forward mode) and under
torch.func's grad/jacrev (which refuse ops with a registered autograd formula); it is never
on the first-order path of loss.backward().
Shape legend: T time, B batch, I input, H hidden, D directions; r|z|n gates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gru_layer_reference", "gru_reference"]


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
    x = input.transpose(0, 1) if batch_first else input  # [T, B, I]
    T, B = x.shape[0], x.shape[1]
    D, H = w_ih.shape[0], w_hh.shape[2]
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
    outs, h_n = [], []
    for d in range(D):
        xd = x.gather(0, flip.expand(T, B, x.shape[2])) if d else x
        gx = F.linear(xd, w_ih[d], None if b_ih is None else b_ih[d])  # [T, B, 3H]
        h = hx[d]  # [B, H]
        ys = []
        for t in range(T):
            gh = F.linear(h, w_hh[d], None if b_hh is None else b_hh[d])  # [B, 3H]
            r = torch.sigmoid(gx[t, :, :H] + gh[:, :H])
            z = torch.sigmoid(gx[t, :, H : 2 * H] + gh[:, H : 2 * H])
            n = torch.tanh(gx[t, :, 2 * H :] + r * gh[:, 2 * H :])
            h_new = (1 - z) * n + z * h
            keep = valid[t].unsqueeze(1)  # [B, 1]
            h = torch.where(keep, h_new, h)
            ys.append(torch.where(keep, h_new, 0))
        y = torch.stack(ys) if ys else x.new_zeros(0, B, H)  # [T, B, H]
        outs.append(y.gather(0, flip.expand(T, B, H)) if d else y)
        h_n.append(h)
    out = torch.cat(outs, 2) if D > 1 else outs[0]
    return (out.transpose(0, 1) if batch_first else out), torch.stack(h_n)


def gru_reference(module, input: Tensor, hx: Tensor | None = None, lengths=None):
    """What varlen_rnn.GRU(input, hx, lengths) must return (without dropout), for a
    batched padded input, computed with module's parameters (a varlen_rnn.GRU or a
    torch.nn.GRU)."""
    T, B = (input.shape[1], input.shape[0]) if module.batch_first else input.shape[:2]
    D, H = (2 if module.bidirectional else 1), module.hidden_size
    if lengths is None:
        lengths = [T] * B
    if hx is None:
        hx = input.new_zeros(module.num_layers * D, B, H)
    x, h_n = input, []
    for layer in range(module.num_layers):
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")[: 4 if module.bias else 2]
        sfx = [f"l{layer}", f"l{layer}_reverse"][:D]
        w = [torch.stack([getattr(module, f"{n}_{s}") for s in sfx]) for n in names]
        w += [None] * (4 - len(w))
        x, h = gru_layer_reference(
            x, lengths, hx[layer * D : (layer + 1) * D], *w, batch_first=module.batch_first
        )
        h_n.append(h)
    return x, torch.cat(h_n, 0)


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
    h_n [D, B, H]. Built on gru_layer_reference through differentiable gathers (rows to a
    padded [T, B, I] batch and back), so every autograd feature works through it too."""
    N, B = input.shape[0], hx.shape[1]
    rows, lengths = ragged_rows(seq_index, sorted_indices, layout, max_len, B, N, input.device)
    T = rows.shape[0]
    # Row N is a zero sentinel for the positions past each length (and makes N = 0 work).
    ext = torch.cat([input, input.new_zeros(1, input.shape[1])])  # [N+1, I]
    padded = ext[rows]  # [T, B, I]
    out, h_n = gru_layer_reference(padded, lengths, hx, w_ih, w_hh, b_ih, b_hh)
    # Each valid row is the image of exactly one (t, b): invert the map to read out back.
    where = torch.full((N + 1,), T * B, dtype=torch.int64, device=input.device)
    where.scatter_(0, rows.flatten(), torch.arange(T * B, device=input.device))
    flat = torch.cat([out.reshape(T * B, -1), out.new_zeros(1, out.shape[2])])  # [T*B+1, D*H]
    return flat[where[:N]], h_n
