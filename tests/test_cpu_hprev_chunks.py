"""The CPU backward's dW_hh over h_prev gathered in chunks of positions (csrc/cpu/recurrence.h,
hprev_chunk_rows): each chunk's product added to the first's, so h_prev's [N, P] is never whole.
The chunk size forced through VARLEN_RNN_CPU_HPREV_ROWS puts boundaries inside the batch: every
cell (the LSTM with a projection keeps its loop's h_prev, unchunked), layout and direction mode,
both step loops, float64 against the plain-PyTorch reference to 1e-10 for every gradient; float32
against one chunk for all (every other gradient bit for bit, dW_hh to rounding); the default rule
where it makes two chunks; zero lengths, and no positions at all."""

import pytest
import torch
from test_cpu_split_backward import CELLS, LAYOUTS, check, grads, make_input, make_weights, op_fn

# 29 positions: chunks of 5 leave 4 in the last, chunks of 1 are single rows.
LENGTHS = [5, 1, 3, 7, 2, 7, 4]
DIRECTIONS = [(1, "serial"), (2, "serial"), (2, "concurrent")]


def _rows(monkeypatch, rows):
    if rows is None:
        monkeypatch.delenv("VARLEN_RNN_CPU_HPREV_ROWS", raising=False)
    else:
        monkeypatch.setenv("VARLEN_RNN_CPU_HPREV_ROWS", str(rows))


@pytest.mark.parametrize("D,directions", DIRECTIONS, ids=["uni", "bi-serial", "bi-concurrent"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("rows", [1, 5])
def test_chunks_match_the_reference(monkeypatch, rows, cell, layout, D, directions):
    """Both step loops (check runs each) against the reference in float64."""
    _rows(monkeypatch, rows)
    monkeypatch.setenv("VARLEN_RNN_CPU_DIRECTIONS", directions)
    check(monkeypatch, cell, make_weights(cell, D, len(LENGTHS)), *make_input(layout, LENGTHS))


@pytest.mark.parametrize("layout", ["padded", "offsets"])
@pytest.mark.parametrize("cell", CELLS)
def test_zero_lengths(monkeypatch, cell, layout):
    _rows(monkeypatch, 3)
    lengths = [3, 0, 2, 0, 6]
    check(monkeypatch, cell, make_weights(cell, 2, len(lengths)), *make_input(layout, lengths))


@pytest.mark.parametrize("layout", ["padded", "offsets"])
@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn_tanh"])
def test_float32_chunks_change_only_w_hh(monkeypatch, cell, layout):
    """Chunks of 7 against one chunk of all 105 positions, float32: no other gradient reads
    h_prev's chunks (bit for bit); dW_hh sums the same products grouped otherwise (to rounding),
    and differs (the chunks did run)."""
    lengths = [(7 * b) % 11 + 1 for b in range(20)]
    w = make_weights(cell, 2, len(lengths), hidden=24, dtype=torch.float32)
    x, index, bf = make_input(layout, lengths, dtype=torch.float32)
    _rows(monkeypatch, 10_000)
    whole = grads(op_fn, cell, w, x, index, bf)
    _rows(monkeypatch, 7)
    chunked = grads(op_fn, cell, w, x, index, bf)
    assert set(whole) == set(chunked)
    for name in whole:
        if name == "w_hh":
            torch.testing.assert_close(chunked[name], whole[name], atol=1e-5, rtol=1e-5)
            assert not torch.equal(chunked[name], whole[name])
        else:
            assert torch.equal(chunked[name], whole[name]), name


def test_the_default_rule_chunks_a_large_batch(monkeypatch):
    """No override: float64 at H = 40 takes 3,276 positions a chunk (1 MiB of rows), so 4,000
    positions make two chunks of 2,000; held to the reference as forced chunks are."""
    _rows(monkeypatch, None)
    lengths = [100] * 40
    check(monkeypatch, "gru", make_weights("gru", 1, len(lengths)), *make_input("offsets", lengths))


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn_tanh"])
def test_no_positions_give_zero_weight_gradients(monkeypatch, cell):
    """Every length 0: one empty chunk, dW_hh zeros (not the chunk buffer's leftovers)."""
    _rows(monkeypatch, 4)
    lengths = [0, 0, 0]
    w = make_weights(cell, 2, len(lengths))
    x, _, bf = make_input("padded", [1, 1, 1])
    index = (torch.tensor(lengths),)
    got = grads(op_fn, cell, w, x, index, bf)
    assert torch.equal(got["w_hh"], torch.zeros_like(got["w_hh"]))
    assert torch.equal(got["input"], torch.zeros_like(got["input"]))
