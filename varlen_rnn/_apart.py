"""Short bidirectional calls on the CPU: a padded layer of few positions runs its two
directions as two one-direction calls on the parameters as they are (RNNBase._run asks
directions_apart, then calls layer_apart), instead of one call on both directions' weights
stacked, a copy of every weight at every call."""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from ._schema import Cell

# A bidirectional padded call on the CPU of at most this many positions (T*B) runs its
# directions apart (layer_apart). The layer op takes both directions' weights as
# one [2, ...] tensor, and stacking them copies every weight at every call: fresh memory
# that costs more than a short call's recurrence (B=1 T=20 H=512, 2 threads: the GRU's
# stack alone ~3 ms, the op ~1.8 ms). On a GPU the copy is cheap and the one call runs
# both directions at once, so CUDA input keeps it.
APART_POSITIONS = 32


def layer_apart(
    cell: Cell,
    x: Tensor,
    lengths: Tensor,
    states: list,
    weights: list,
    options: tuple,
    batch_first: bool,
):
    """A bidirectional padded layer as two one-direction calls (see directions_apart): the
    reverse direction is the forward recurrence over each sequence's valid steps reversed,
    a gather of x's rows and of that call's output back (the same positions as the layer
    op's reverse direction, in the same order, from the same state). x [T, B, I] (or
    [B, T, I]), states [2, B, .] each, weights the two directions' weight arguments without
    their D dimension (RNNBase._stacked's for one direction). Returns (output [.., 2P],
    finals [2, B, .] ...)."""
    outs, ends, src = [], [], None
    for d in range(2):
        mine = [s[d : d + 1] for s in states]
        if d == 1:  # after the forward call, whose kernel has checked the lengths
            src = reversal(lengths, x, batch_first)
            x = x.gather(1 if batch_first else 0, src.expand(x.shape))
        args = (x, lengths, *mine, *weights[d], *options, batch_first)
        out, *end = ops._layer(cell, False, args, squeezed=True)
        if d == 1:
            out = out.gather(1 if batch_first else 0, src.expand(out.shape))
        outs.append(out)
        ends.append(end)
    return (torch.cat(outs, -1), *[torch.cat(e, 0) for e in zip(*ends)])


def directions_apart(x: Tensor) -> bool:
    """Whether a bidirectional layer on padded x ([T, B, I] or [B, T, I]) runs its two
    directions as two one-direction calls, which read the parameters as they are: on the
    CPU in eager mode, where the call has at most APART_POSITIONS positions.
    torch.compile, export and jit tracing keep the one call."""
    # The mode first: under export a test of the shapes would guard them.
    return (
        not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and x.device.type == "cpu"
        and x.shape[0] * x.shape[1] <= APART_POSITIONS
    )


def reversal(lengths: Tensor, x: Tensor, batch_first: bool) -> Tensor:
    """The gather index [T, B, 1] (or [B, T, 1]) that puts each sequence's first lengths[b]
    steps of x [T, B, F] (or [B, T, F]) in reverse order and leaves the steps past its length
    where they are (its own inverse). x and lengths are on the CPU (directions_apart)."""
    T = x.shape[1 if batch_first else 0]
    t = torch.arange(T)[:, None]  # [T, 1]
    n = lengths.to(torch.int64)[None, :]  # [1, B]
    src = torch.where(t < n, n - 1 - t, t)  # [T, B]: the step each position reads
    if batch_first:
        src = src.t()
    return src[:, :, None]
