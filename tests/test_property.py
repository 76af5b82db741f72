"""Property-based parity (Hypothesis, derandomized): drawn shapes, layers, directions, batch_first,
bias, lengths (0 and T included), hx or not, contiguous or not. Forward and backward in float64
match torch.nn.GRU + packing on the rows it accepts (length > 0) and the plain-PyTorch reference
(varlen_rnn.reference.gru_reference) on every row."""

import pytest
import torch

# CI installs hypothesis; the GPU machine has no package registry and may lack it.
pytest.importorskip("hypothesis", reason="hypothesis is not installed")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from testing import assert_close, make_pair, packed_baseline

from varlen_rnn.reference import gru_reference

F64 = torch.float64
LAYOUTS = ["contiguous", "transposed", "strided", "expanded"]

# Reproducible in CI: the same examples every run, no example database, no time limit.
CI = settings(
    derandomize=True,
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def configs(draw):
    T = draw(st.integers(0, 6))
    B = draw(st.integers(1, 5))
    return dict(
        T=T,
        B=B,
        I=draw(st.integers(1, 4)),
        H=draw(st.integers(1, 5)),
        num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bias=draw(st.booleans()),
        lengths=draw(st.lists(st.sampled_from([0, T]) | st.integers(0, T), min_size=B, max_size=B)),
        lengths_as=draw(st.sampled_from(["list", "int64", "int32"])),
        with_hx=draw(st.booleans()),
        x_layout=draw(st.sampled_from(LAYOUTS)),
        hx_layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2**16)),
    )


def _view(shape, layout, gen):
    """A leaf `base` and a view of it with the given shape and memory layout."""
    a, b, c = shape
    if layout == "contiguous":
        base = torch.randn(a, b, c, dtype=F64, generator=gen)
        make = lambda t: t
    elif layout == "transposed":  # dims 0 and 1 swapped in memory
        base = torch.randn(b, a, c, dtype=F64, generator=gen)
        make = lambda t: t.transpose(0, 1)
    elif layout == "strided":  # every other element of a wider last dim
        base = torch.randn(a, b, 2 * c, dtype=F64, generator=gen)
        make = lambda t: t[..., ::2]
    else:  # one row broadcast over dim 1 (stride 0)
        base = torch.randn(a, 1, c, dtype=F64, generator=gen)
        make = lambda t: t.expand(a, b, c)
    base.requires_grad_()
    view = make(base)
    assert view.shape == shape
    return base, view


def _projection(tensors, gen):
    """A loss giving every element its own weight, so each gradient entry is checked."""
    return sum((t * torch.randn(t.shape, dtype=F64, generator=gen)).sum() for t in tensors)


def _grad(loss, leaves, retain_graph=False):
    """Gradients of loss, None for leaves it does not depend on (all of them when T = 0 and
    there is no hx to pass through)."""
    if not loss.requires_grad:
        return [None] * len(leaves)
    return torch.autograd.grad(loss, leaves, retain_graph=retain_graph, allow_unused=True)


def _check(cfg):
    T, B, I, H = cfg["T"], cfg["B"], cfg["I"], cfg["H"]
    L, D, bf = cfg["num_layers"], 2 if cfg["bidirectional"] else 1, cfg["batch_first"]
    ref, ours = make_pair(I, H, L, cfg["bias"], bf, cfg["bidirectional"], F64, seed=cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    x_base, x = _view((B, T, I) if bf else (T, B, I), cfg["x_layout"], gen)
    hx_base, hx = _view((L * D, B, H), cfg["hx_layout"], gen) if cfg["with_hx"] else (None, None)
    lengths = cfg["lengths"]
    given_lengths = {
        "list": lengths,
        "int64": torch.tensor(lengths),
        "int32": torch.tensor(lengths, dtype=torch.int32),
    }[cfg["lengths_as"]]
    leaves = [x_base] + ([hx_base] if hx_base is not None else []) + list(ours.parameters())
    snapshot = [t.detach().clone() for t in (x, hx) if t is not None]

    out, h_n = ours(x, hx, lengths=given_lengths)
    assert out.shape == ((B, T, D * H) if bf else (T, B, D * H)) and h_n.shape == (L * D, B, H)

    # Every row, zero lengths included: the reference.
    out_r, h_r = gru_reference(ours, x, hx, lengths)
    assert_close(out, out_r, F64, "output vs reference")
    assert_close(h_n, h_r, F64, "h_n vs reference")
    seed = cfg["seed"] + 1
    g = _grad(_projection([out, h_n], torch.Generator().manual_seed(seed)), leaves, True)
    g_r = _grad(_projection([out_r, h_r], torch.Generator().manual_seed(seed)), leaves)
    for i, (a, e) in enumerate(zip(g, g_r)):
        if a is None or e is None:  # a leaf that no output depends on (e.g. T = 0)
            assert a is None or not a.any()
            assert e is None or not e.any()
            continue
        assert_close(a, e, F64, f"grad {i} vs reference")

    # The rows nn.GRU + packing accepts: the same numbers and gradients.
    rows = [b for b, n in enumerate(lengths) if n > 0]
    if rows:
        idx = torch.tensor(rows)
        bdim = 0 if bf else 1
        ref_leaves = leaves[: len(leaves) - len(list(ours.parameters()))] + list(ref.parameters())
        out_p, h_p = packed_baseline(
            ref,
            x.index_select(bdim, idx),
            [lengths[b] for b in rows],
            None if hx is None else hx.index_select(1, idx),
        )
        out_o, h_o = out.index_select(bdim, idx), h_n.index_select(1, idx)
        assert_close(out_o, out_p, F64, "output vs nn.GRU")
        assert_close(h_o, h_p, F64, "h_n vs nn.GRU")
        g = _grad(_projection([out_o, h_o], torch.Generator().manual_seed(seed)), leaves)
        g_p = _grad(_projection([out_p, h_p], torch.Generator().manual_seed(seed)), ref_leaves)
        for i, (a, e) in enumerate(zip(g, g_p)):
            a = torch.zeros_like(leaves[i]) if a is None else a
            e = torch.zeros_like(ref_leaves[i]) if e is None else e
            assert_close(a, e, F64, f"grad {i} vs nn.GRU")
    # Inputs are read, never written.
    assert all(
        torch.equal(t.detach(), s) for t, s in zip((t for t in (x, hx) if t is not None), snapshot)
    )


_BASE = dict(
    I=3,
    H=4,
    num_layers=2,
    bidirectional=True,
    bias=True,
    lengths_as="int64",
    with_hx=True,
    x_layout="transposed",
    hx_layout="strided",
    seed=7,
)


@CI
@given(configs())
@example(dict(_BASE, T=5, B=4, batch_first=False, lengths=[0, 5, 0, 2]))  # 0 and T, always
@example(dict(_BASE, T=4, B=3, batch_first=True, lengths=[4, 4, 4], x_layout="expanded"))
@example(dict(_BASE, T=3, B=2, batch_first=True, lengths=[0, 0], with_hx=False))
def test_matches_nn_gru_and_reference(cfg):
    _check(cfg)
