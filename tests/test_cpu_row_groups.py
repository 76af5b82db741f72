"""The CPU split loops with the batch's rows split between teams (csrc/cpu/team.h team_layout,
cpu/schedule.h row_ranges; VARLEN_RNN_CPU_ROW_GROUPS=n forces n groups): each team runs its own
range of the sorted rows with no synchronisation with the others. Every cell, every layout, both
directions (in turn and at once), 2 and 4 threads, 2 and 3 groups, chunks of 3 steps so chunk
boundaries fall inside the sequences: the forward without a workspace and every gradient of the
backward against the plain-PyTorch reference in float64 to 1e-10, with zero lengths, ranges of
unequal size, and more groups than rows with work (groups with no rows at all). float32 and
bfloat16 products: the groups give bit for bit what one team gives (each element is one chain of
multiply-adds either way; a bfloat16 layer's bias gradients are float64 sums per team, added in
the teams' order, which differ from one team's sum by float64 rounding only, far below the
bfloat16 rounding of the result). That holds where our micro-kernel runs the steps' products (x86
with AVX2 or AVX-512); elsewhere (aarch64) the BLAS runs them, and a BLAS may block a product of
fewer rows differently: there the groups agree with one team to rounding (seen under QEMU with
torch's aarch64 BLAS: up to 1e-7 in float32). A bad setting is refused with its name."""

import pytest
import torch
from test_cpu_small_gemm import runs as runs_kernel
from test_cpu_split_backward import CELLS, LAYOUTS, grads, make_input, make_weights, op_fn, ref_fn
from test_cpu_split_backward import run as run_layer

import varlen_rnn

TIGHT = dict(atol=1e-10, rtol=1e-10)
# 11 rows: ties, zero lengths (not in the packed layout, which has none), a long first row so the
# groups' shares of the work hold unequal numbers of rows.
LENGTHS = [5, 1, 0, 3, 9, 2, 7, 0, 4, 6, 7]
PACKED_LENGTHS = [5, 1, 3, 9, 2, 7, 4, 6, 7]


def lengths_for(layout):
    return PACKED_LENGTHS if layout == "packed" else LENGTHS


def configure(monkeypatch, groups, directions="serial"):
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", "split")
    monkeypatch.setenv("VARLEN_RNN_CPU_ROW_GROUPS", str(groups))
    monkeypatch.setenv("VARLEN_RNN_CPU_DIRECTIONS", directions)
    monkeypatch.setenv("VARLEN_RNN_CPU_CHUNK_STEPS", "3")


@pytest.mark.parametrize("threads", [2, 4], indirect=True)
@pytest.mark.parametrize("groups", [2, 3])
@pytest.mark.parametrize(
    "D,directions",
    [(1, "serial"), (2, "serial"), (2, "concurrent")],
    ids=["uni", "bi", "bi_at_once"],
)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cell", CELLS)
def test_row_groups_match_the_reference(monkeypatch, threads, groups, D, directions, layout, cell):
    configure(monkeypatch, groups, directions)
    lengths = lengths_for(layout)
    w = make_weights(cell, D, len(lengths))
    x, index, bf = make_input(layout, lengths)
    with torch.no_grad():
        got = run_layer(op_fn, cell, w, x, index, bf)
    want = run_layer(ref_fn, cell, w, x, index, bf)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TIGHT, msg=lambda m: f"output {k}: {m}")
    got_g = grads(op_fn, cell, w, x, index, bf)
    want_g = grads(ref_fn, cell, w, x, index, bf)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], **TIGHT, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("threads", [4], indirect=True)
@pytest.mark.parametrize("lengths", [[3, 0], [0, 0, 0], [6]], ids=["one_with_work", "none", "one"])
@pytest.mark.parametrize("cell", ["gru", "lstm", "lstm_proj"])
def test_more_groups_than_rows_with_work(monkeypatch, threads, cell, lengths):
    """Groups left with zero-length rows only, or with no rows at all: nothing to run there."""
    configure(monkeypatch, 3)
    w = make_weights(cell, 2, len(lengths))
    x, index, bf = make_input("padded", lengths)
    got = grads(op_fn, cell, w, x, index, bf)
    want = grads(ref_fn, cell, w, x, index, bf)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TIGHT, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("threads", [2], indirect=True)
@pytest.mark.parametrize("cell", ["gru", "lstm_proj"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_row_groups_with_the_whole_projection(monkeypatch, threads, cell, layout):
    """The projection computed before the loop (read by each group at its own rows)."""
    configure(monkeypatch, 2)
    monkeypatch.setenv("VARLEN_RNN_CPU_PROJECTION", "whole")
    lengths = lengths_for(layout)
    w = make_weights(cell, 1, len(lengths))
    x, index, bf = make_input(layout, lengths)
    got = grads(op_fn, cell, w, x, index, bf)
    want = grads(ref_fn, cell, w, x, index, bf)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TIGHT, msg=lambda m: f"{name}: {m}")


def module_run(cls, dtype, bidirectional, seed=0):
    """A 2-layer module's output, states and every gradient at B=24 (uneven lengths)."""
    torch.manual_seed(seed)
    kw = dict(proj_size=8) if cls is varlen_rnn.LSTM else {}
    m = cls(12, 40, num_layers=2, bidirectional=bidirectional, **kw).to(dtype)
    x = torch.randn(17, 24, 12, dtype=dtype, requires_grad=True)
    lengths = torch.randint(0, 18, (24,))
    lengths[3] = 17
    out, state = m(x, lengths=lengths)
    states = state if isinstance(state, tuple) else (state,)
    loss = (out.float() * torch.randn(out.shape)).sum() + sum(s.float().sum() for s in states)
    loss.backward()
    return [out.detach(), *(s.detach() for s in states), x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("threads", [2, 4], indirect=True)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("cls", [varlen_rnn.GRU, varlen_rnn.LSTM], ids=["gru", "lstm_proj"])
def test_row_groups_give_one_teams_results_bit_for_bit(
    monkeypatch, threads, bidirectional, dtype, cls
):
    # Our micro-kernel runs the steps' products (the "avx2" kernel runs on AVX-512 CPUs too).
    ours = runs_kernel("avx2")
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", "split")
    runs = {}
    for groups in ["1", "2", "3"]:
        monkeypatch.setenv("VARLEN_RNN_CPU_ROW_GROUPS", groups)
        runs[groups] = module_run(cls, dtype, bidirectional)
    monkeypatch.delenv("VARLEN_RNN_CPU_ROW_GROUPS")
    runs["auto"] = module_run(cls, dtype, bidirectional)
    for groups, got in runs.items():
        for k, (a, b) in enumerate(zip(got, runs["1"])):
            msg = f"{groups} groups, tensor {k}: max diff {(a - b).abs().max()}"
            if ours:
                assert torch.equal(a, b), msg
            else:
                torch.testing.assert_close(a, b, msg=msg)


@pytest.mark.parametrize("value", ["0", "-1", "two", "2x", ""])
def test_bad_row_groups_setting_is_refused_with_its_name(monkeypatch, value):
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", "split")
    monkeypatch.setenv("VARLEN_RNN_CPU_ROW_GROUPS", value)
    m = varlen_rnn.GRU(4, 16)
    with pytest.raises(RuntimeError, match="VARLEN_RNN_CPU_ROW_GROUPS must be a positive integer"):
        m(torch.randn(30, 3, 4), lengths=torch.tensor([30, 2, 5]))
