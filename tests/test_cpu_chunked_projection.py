"""The forward split loop's input projection computed per thread in chunks of steps
(csrc/cpu/chunked_projection.h; VARLEN_RNN_CPU_PROJECTION=whole is the one GEMM before the
loop), with the chunk size forced through VARLEN_RNN_CPU_CHUNK_STEPS so the boundaries fall where
the lengths make them interesting: the longest row spans more than two chunks and its length is
no multiple of the chunk, rows end mid-chunk, at a chunk's last step and at its first, a row has
length 0 (padded and offsets layouts), and the reverse direction starts each row at its own last
step. float64 against the plain-PyTorch reference to 1e-10 (forward and, through the workspace
the chunked forward saved, every gradient); float32 and bfloat16 against the whole projection."""

import ctypes
import sys

import pytest
import torch
from cell_ops_testing import make_batch, make_layer
from test_cell_ops import check_against_reference
from test_cpu_bf16 import UNITS, _available
from test_cpu_split_backward import _intel_cpu
from test_cpu_split_steps import H, I, P, check_gru_against_reference, gru_layer

import varlen_rnn

ops = torch.ops.varlen_rnn
TIGHT = dict(atol=1e-10, rtol=1e-10)
CHUNK = 4
# Longest 11 = 2 chunks of 4 + 3; 4 and 8 end at a chunk's last step, 5 and 9 at its first,
# 3 and 6 mid-chunk; a zero length.
LENGTHS = [11, 4, 0, 9, 3, 11, 5, 8, 6]
PACKED_LENGTHS = [n for n in LENGTHS if n > 0]  # packed rows have length >= 1
LAYOUTS = ["padded", "padded_bf", "offsets", "packed"]


def lengths_of(layout):
    return PACKED_LENGTHS if layout == "packed" else LENGTHS


@pytest.fixture
def chunked(monkeypatch):
    """The split loop, projecting in chunks of CHUNK steps."""
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", "split")
    monkeypatch.setenv("VARLEN_RNN_CPU_PROJECTION", "chunked")
    monkeypatch.setenv("VARLEN_RNN_CPU_CHUNK_STEPS", str(CHUNK))


@pytest.fixture(params=["chunked", "whole"])
def projection(request, chunked, monkeypatch):
    """Either projection in the split loop (the reference tests hold both to 1e-10)."""
    monkeypatch.setenv("VARLEN_RNN_CPU_PROJECTION", request.param)
    return request.param


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


# D and how a bidirectional layer runs its directions (VARLEN_RNN_CPU_DIRECTIONS): one
# direction has only one way.
DIRECTIONS = [(1, "serial"), (2, "serial"), (2, "concurrent")]
D_AND_DIRECTIONS = pytest.mark.parametrize(
    "D,directions", DIRECTIONS, ids=["uni", "bi-serial", "bi-concurrent"]
)


@pytest.fixture(autouse=True)
def _set_directions(request, monkeypatch):
    """Sets VARLEN_RNN_CPU_DIRECTIONS for the tests parametrized by D_AND_DIRECTIONS."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "directions" in callspec.params:
        monkeypatch.setenv("VARLEN_RNN_CPU_DIRECTIONS", callspec.params["directions"])


@pytest.mark.parametrize("layout", LAYOUTS)
@D_AND_DIRECTIONS
def test_gru_matches_the_reference(projection, threads, directions, D, layout):
    lengths = lengths_of(layout)
    check_gru_against_reference(gru_layer(D, len(lengths)), make_batch(layout, lengths, I))


@pytest.mark.parametrize("layout", LAYOUTS)
@D_AND_DIRECTIONS
@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "rnn_tanh"])
def test_cells_match_the_reference(projection, threads, directions, cell, D, layout):
    """Forward and, through the saved workspace, every gradient of the backward op."""
    lengths = lengths_of(layout)
    layer = make_layer(cell, D, len(lengths), I, H, P=P)
    check_against_reference(layer, make_batch(layout, lengths, I))


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_one_step_and_one_whole_chunk(chunked, two_threads, monkeypatch, chunk):
    """Chunks of one step, of 3 (the longest length 11 is no multiple), and one chunk for all."""
    monkeypatch.setenv("VARLEN_RNN_CPU_CHUNK_STEPS", str(chunk))
    layer = make_layer("lstm", 2, len(LENGTHS), I, H)
    check_against_reference(layer, make_batch("padded", LENGTHS, I))


def float_runs(monkeypatch, dtype, layout, D, make_model):
    """Outputs of the whole-projection run and the chunked one, on a module of dtype."""
    torch.manual_seed(0)
    m = make_model().to(dtype)
    lengths = lengths_of(layout)
    x = torch.randn(max(lengths) + 1, len(lengths), m.input_size).to(dtype)
    if layout == "packed":
        x = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    runs = []
    for mode in ["whole", "chunked"]:
        monkeypatch.setenv("VARLEN_RNN_CPU_PROJECTION", mode)
        with torch.no_grad():
            out, state = m(x) if layout == "packed" else m(x, lengths=torch.tensor(lengths))
        out = out.data if layout == "packed" else out
        runs.append([out, *(state if isinstance(state, tuple) else (state,))])
    return runs


@pytest.mark.parametrize("layout", ["padded", "packed"])
@D_AND_DIRECTIONS
def test_float32_agrees_with_the_whole_projection(
    chunked, threads, directions, D, layout, monkeypatch
):
    whole, chunks = float_runs(
        monkeypatch, torch.float32, layout, D, lambda: varlen_rnn.LSTM(8, 48, bidirectional=D == 2)
    )
    for a, b in zip(whole, chunks):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("unit", list(UNITS))
@pytest.mark.parametrize("layout", ["padded", "packed"])
@D_AND_DIRECTIONS
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_bfloat16_equals_the_whole_projection(
    chunked, two_threads, directions, cell, D, layout, unit, monkeypatch
):
    """On either bfloat16 unit each row of a product is computed alone, over all of K in the
    same order, so the chunked projection's rows are bitwise the whole GEMM's: the chunked run
    (the bfloat16 default, here with chunk boundaries at every 4 steps) equals the whole one,
    which test_cpu_bf16.py holds to its float64 mirror."""
    if not _available(unit):
        pytest.skip(f"this CPU has no {UNITS[unit]}")
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", unit)
    cls = varlen_rnn.GRU if cell == "gru" else varlen_rnn.LSTM
    whole, chunks = float_runs(
        monkeypatch, torch.bfloat16, layout, D, lambda: cls(16, 64, bidirectional=D == 2)
    )
    for a, b in zip(whole, chunks):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["padded", "offsets"])
def test_float32_chunks_sized_by_a_wide_input(two_threads, layout, monkeypatch):
    """Where a thread's W_ih panel outgrows the L2 (here 2100 x 4*64 floats, 2.1 MB, past any
    L2 this runs on), chunk_steps makes each chunk span enough steps for I/2 rows, capped by
    the panel's size (here 228 rows: 6 steps of B=40): the default chunks, in several per
    call, rows ending within them, rows gathered (padded time-major with mixed lengths, and
    offsets), against the whole projection."""
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", "split")
    monkeypatch.delenv("VARLEN_RNN_CPU_CHUNK_STEPS", raising=False)
    torch.manual_seed(0)
    m = varlen_rnn.LSTM(2100, 128)
    lengths = torch.randint(0, 21, (40,))
    lengths[0] = 20
    x = torch.randn(20, 40, 2100)
    if layout == "offsets":
        x = torch.nested.nested_tensor(
            [x[: int(n), b] for b, n in enumerate(lengths)], layout=torch.jagged
        )
    runs = []
    for mode in ["whole", "chunked"]:
        monkeypatch.setenv("VARLEN_RNN_CPU_PROJECTION", mode)
        with torch.no_grad():
            out, (h, c) = m(x) if layout == "offsets" else m(x, lengths=lengths)
        runs.append([out.values() if layout == "offsets" else out, h, c])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def _l2_bytes() -> int:
    """The L2's size as the extension reads it (glibc's sysconf(_SC_LEVEL2_CACHE_SIZE), which
    Python's os.sysconf does not name), 1 MiB where unknown, as there."""
    if sys.platform.startswith("linux"):
        size = ctypes.CDLL(None).sysconf(191)  # _SC_LEVEL2_CACHE_SIZE in glibc's confname.h
        if size > 0:
            return size
    return 1 << 20


@pytest.mark.parametrize("case", ["wide", "wide-many-positions", "narrow"])
def test_the_choice_of_projection(two_threads, monkeypatch, case):
    """The default (chunked_projection): on Intel's CPUs, in float32, with a thread's W_ih
    panel past the L2 and at most I + P positions, the whole projection (MKL's GEMM: its sums,
    bit for bit); else the chunks (the micro-kernel's, where they differ). The panel: a GRU's
    3 * H gate columns over the 2 threads, I values each, I sized from this machine's L2
    (just past it, or 64 for a panel within it)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the chunks take the micro-kernel (whose sums tell them apart) on AVX2/AVX-512")
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", "split")
    H = 1024
    I = 64 if case == "narrow" else _l2_bytes() // (4 * 3 * H // 2) + 64
    B = 4 if case != "wide-many-positions" else 24
    T = 16 if case != "wide-many-positions" else (I + H) // B + 2  # N = B * T > I + P
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(I, H)
    x, lengths = torch.randn(T, B, I), torch.full((B,), T)
    runs = {}
    for mode in [None, "whole", "chunked"]:
        if mode is None:
            monkeypatch.delenv("VARLEN_RNN_CPU_PROJECTION", raising=False)
        else:
            monkeypatch.setenv("VARLEN_RNN_CPU_PROJECTION", mode)
        with torch.inference_mode():
            runs[mode] = torch.cat([t.flatten() for t in gru(x, lengths=lengths)])
    # the two sums differ (else this test could not tell them apart), both near each other
    assert not torch.equal(runs["whole"], runs["chunked"])
    torch.testing.assert_close(runs["whole"], runs["chunked"], atol=1e-4, rtol=1e-3)
    whole = _intel_cpu() and case == "wide"
    assert torch.equal(runs[None], runs["whole" if whole else "chunked"])
