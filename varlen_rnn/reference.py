"""A plain PyTorch GRU with length masking: the test oracle, never on a hot path.

Written from the GRU equations with ordinary tensor ops (autograd works through
it), so it also covers what torch.nn.GRU + packing refuses: zero-length
sequences and T = 0.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gru_reference"]


def gru_reference(module, input: Tensor, hx: Tensor | None = None, lengths=None):
    """What varlen_rnn.GRU(input, hx, lengths) must return, for a batched padded input,
    computed with module's parameters (a varlen_rnn.GRU or a torch.nn.GRU)."""
    x = input.transpose(0, 1) if module.batch_first else input  # [T, B, I]
    T, B = x.shape[0], x.shape[1]
    D, H = (2 if module.bidirectional else 1), module.hidden_size
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=x.device)
    if hx is None:
        hx = x.new_zeros(module.num_layers * D, B, H)
    rows = torch.arange(B, device=x.device)
    h_n = []
    for layer in range(module.num_layers):
        outs = []
        for d in range(D):
            sfx = f"l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(module, "weight_ih_" + sfx), getattr(module, "weight_hh_" + sfx)
            b_ih = getattr(module, "bias_ih_" + sfx) if module.bias else None
            b_hh = getattr(module, "bias_hh_" + sfx) if module.bias else None
            h = hx[layer * D + d]
            out = x.new_zeros(T, B, H)
            for step in range(T):
                # Reverse: each row starts at its own last valid step.
                t = (lengths - 1 - step).clamp(min=0) if d else torch.full_like(lengths, step)
                valid = (step < lengths).unsqueeze(1)
                gx = torch.nn.functional.linear(x[t, rows], w_ih, b_ih)
                gh = torch.nn.functional.linear(h, w_hh, b_hh)
                r = torch.sigmoid(gx[:, :H] + gh[:, :H])
                z = torch.sigmoid(gx[:, H : 2 * H] + gh[:, H : 2 * H])
                n = torch.tanh(gx[:, 2 * H :] + r * gh[:, 2 * H :])
                h_new = (1 - z) * n + z * h
                h = torch.where(valid, h_new, h)
                out = out.index_put((t, rows), torch.where(valid, h_new, out[t, rows]))
            outs.append(out)
            h_n.append(h)
        x = torch.cat(outs, 2) if D == 2 else outs[0]
    out = x.transpose(0, 1) if module.batch_first else x
    return out, torch.stack(h_n, 0)
