"""A bidirectional layer's two directions on the CPU, run in turn or at once on two halves of
the threads (csrc/cpu/team.h step_loops; VARLEN_RNN_CPU_DIRECTIONS=serial|concurrent forces
either). Every cell (GRU, LSTM with and without a projection, RNN tanh/relu), every layout,
with and without biases, 2-4 threads (3: halves of 2 and 1 threads): the forward without a
workspace (inference), and with one through every gradient of the backward, both against the
plain-PyTorch reference in float64 to 1e-10; zero lengths and one row. float32: the
directions at once give bit for bit what the split loops give in turn (the same per-direction
arithmetic; the micro-kernel's and the BLAS's results do not depend on the thread count here)
and repeat exactly. A failure inside a thread of the team is raised as an error, and the next
call runs normally."""

import os
import subprocess
import sys

import pytest
import torch
from test_cpu_split_backward import (
    CELLS,
    LAYOUTS,
    assert_float32_grads_close,
    assert_float32_outputs_close,
    grads,
    make_input,
    make_weights,
    op_fn,
    ref_fn,
)
from test_cpu_split_backward import run as run_layer

import varlen_rnn

TIGHT = dict(atol=1e-10, rtol=1e-10)
LENGTHS = [5, 1, 3, 7, 2, 7, 4]  # unsorted, ties, no zero length (the packed layout has none)


@pytest.fixture(params=[2, 3, 4], ids=["2threads", "3threads", "4threads"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def set_directions(monkeypatch, directions, steps="split"):
    monkeypatch.setenv("VARLEN_RNN_CPU_DIRECTIONS", directions)
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", steps)


def inference(cell, w, x, index, bf):
    """The outputs without a workspace (no gradient wanted)."""
    with torch.no_grad():
        return run_layer(op_fn, cell, w, x, index, bf)


def outputs_and_grads(monkeypatch, directions, cell, w, x, index, bf, steps="split"):
    set_directions(monkeypatch, directions, steps)
    return inference(cell, w, x, index, bf), grads(op_fn, cell, w, x, index, bf)


def check_against_reference(monkeypatch, cell, w, x, index, bf):
    want_out = run_layer(ref_fn, cell, w, x, index, bf)
    want = grads(ref_fn, cell, w, x, index, bf)
    for directions in ("serial", "concurrent"):
        outs, got = outputs_and_grads(monkeypatch, directions, cell, w, x, index, bf)
        assert len(outs) == len(want_out)
        for k, (o, r) in enumerate(zip(outs, want_out)):
            torch.testing.assert_close(o, r, **TIGHT, msg=lambda m: f"{directions} out{k}: {m}")
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(
                got[name], want[name], **TIGHT, msg=lambda m: f"{directions} {name}: {m}"
            )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", CELLS)
def test_both_orders_match_the_reference(monkeypatch, threads, cell, bias, layout):
    w = make_weights(cell, 2, len(LENGTHS), bias=bias)
    check_against_reference(monkeypatch, cell, w, *make_input(layout, LENGTHS))


@pytest.mark.parametrize("layout", ["padded", "offsets"])
@pytest.mark.parametrize("cell", CELLS)
def test_zero_length_rows(monkeypatch, threads, cell, layout):
    lengths = [3, 0, 2, 0, 6]
    w = make_weights(cell, 2, len(lengths))
    check_against_reference(monkeypatch, cell, w, *make_input(layout, lengths))


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("cell", CELLS)
def test_one_row(monkeypatch, threads, cell, layout):
    check_against_reference(monkeypatch, cell, make_weights(cell, 2, 1), *make_input(layout, [6]))


def float32_case(cell, layout="padded"):
    lengths = [(7 * b) % 11 + 1 for b in range(24)]
    w = make_weights(cell, 2, len(lengths), hidden=48, proj=20, dtype=torch.float32)
    return w, *make_input(layout, lengths, dtype=torch.float32)


def assert_all_equal(a, b, what):
    (outs_a, grads_a), (outs_b, grads_b) = a, b
    for k, (x, y) in enumerate(zip(outs_a, outs_b, strict=True)):
        assert torch.equal(x, y), f"{what}: out{k} differs by {(x - y).abs().max().item():.3g}"
    assert set(grads_a) == set(grads_b)
    for name in grads_a:
        x, y = grads_a[name], grads_b[name]
        assert torch.equal(x, y), f"{what}: {name} differs by {(x - y).abs().max().item():.3g}"


@pytest.mark.parametrize("layout", ["padded", "offsets", "packed"])
@pytest.mark.parametrize("kernel", ["kernel", "mkl"])
@pytest.mark.parametrize("cell", CELLS)
def test_float32_concurrent_is_bitwise_the_split_loops_in_turn(
    monkeypatch, threads, cell, kernel, layout
):
    """The same per-direction arithmetic in both orders: with the micro-kernel, which computes
    each element the same way whatever the slice or thread count, equal bits; the concurrent
    order repeats exactly. The BLAS may round an element differently by the width of the
    slice it is given (MKL on an AMD EPYC does, for the LSTM projection's 20 columns split
    16 + 4), so with it the two orders agree to float32 tolerance."""
    monkeypatch.setenv("VARLEN_RNN_CPU_GEMM", kernel)
    w, x, index, bf = float32_case(cell, layout)
    serial = outputs_and_grads(monkeypatch, "serial", cell, w, x, index, bf)
    concurrent = outputs_and_grads(monkeypatch, "concurrent", cell, w, x, index, bf)
    again = outputs_and_grads(monkeypatch, "concurrent", cell, w, x, index, bf)
    assert_all_equal(concurrent, again, "concurrent twice")
    if kernel == "kernel":
        assert_all_equal(concurrent, serial, "concurrent vs serial")
        return
    for k, (a, b) in enumerate(zip(concurrent[0], serial[0], strict=True)):
        assert_float32_outputs_close(a, b, f"out{k}")
    assert set(concurrent[1]) == set(serial[1])
    for name in serial[1]:
        assert_float32_grads_close(cell, concurrent[1][name], serial[1][name], name)


@pytest.mark.parametrize("cell", CELLS)
def test_float32_concurrent_agrees_with_the_gemm_loop(monkeypatch, cell):
    """The per-step GEMM loop (the serial order's other loop) rounds its products differently:
    agreement to float32 tolerance."""
    w, x, index, bf = float32_case(cell)
    gemm = outputs_and_grads(monkeypatch, "serial", cell, w, x, index, bf, steps="gemm")
    concurrent = outputs_and_grads(monkeypatch, "concurrent", cell, w, x, index, bf)
    for k, (a, b) in enumerate(zip(concurrent[0], gemm[0], strict=True)):
        assert_float32_outputs_close(a, b, f"out{k}")
    for name in gemm[1]:
        assert_float32_grads_close(cell, concurrent[1][name], gemm[1][name], name)


@pytest.mark.parametrize("directions", ["serial", "concurrent"])
@pytest.mark.parametrize("cell", ["gru", "lstm_proj"])
def test_a_failing_thread_raises_and_the_next_call_runs(monkeypatch, threads, cell, directions):
    """VARLEN_RNN_CPU_TEAM_FAULT=k: the team's thread k throws before its loop while its
    teammates go on to the barrier; forward and backward raise, then run normally."""
    w, x, index, bf = float32_case(cell)
    set_directions(monkeypatch, directions)
    want = outputs_and_grads(monkeypatch, directions, cell, w, x, index, bf)
    # In turn, the team is one thread per 16-unit slice of H = 48: at most 3.
    for k in range(threads if directions == "concurrent" else min(threads, 3)):
        monkeypatch.setenv("VARLEN_RNN_CPU_TEAM_FAULT", str(k))
        with pytest.raises(RuntimeError, match=f"thread {k} failed on purpose"):
            inference(cell, w, x, index, bf)
        # The backward alone: a forward with its workspace first, then the fault.
        monkeypatch.delenv("VARLEN_RNN_CPU_TEAM_FAULT")
        leaf = x.clone().requires_grad_()
        outs = run_layer(op_fn, cell, w, leaf, index, bf)
        monkeypatch.setenv("VARLEN_RNN_CPU_TEAM_FAULT", str(k))
        with pytest.raises(RuntimeError, match=f"thread {k} failed on purpose"):
            torch.autograd.grad(sum(o.sum() for o in outs), leaf)
        monkeypatch.delenv("VARLEN_RNN_CPU_TEAM_FAULT")
        assert_all_equal(outputs_and_grads(monkeypatch, directions, cell, w, x, index, bf), want, k)


# Run in a fresh process: OMP_THREAD_LIMIT is read when OpenMP starts. It imports the
# varlen_rnn this process imported (installed, or an in-place build), never by accident the
# source tree without its compiled ops.
LIMITED = """
import sys, torch
sys.path[:0] = [{package_root!r}, {tests!r}]
torch.set_num_threads(4)
from test_cpu_split_backward import grads, make_input, make_weights, op_fn, ref_fn
w = make_weights({cell!r}, 2, 7)
x, index, bf = make_input("padded", [5, 1, 3, 7, 2, 7, 4])
got, want = grads(op_fn, {cell!r}, w, x, index, bf), grads(ref_fn, {cell!r}, w, x, index, bf)
for k in want:
    torch.testing.assert_close(got[k], want[k], atol=1e-10, rtol=1e-10, msg=k)
print("checked", len(want), "gradients")
"""


@pytest.mark.parametrize("limit", [1, 3])
@pytest.mark.parametrize("cell", ["gru", "lstm_proj"])
def test_fewer_threads_than_asked(cell, limit):
    """OpenMP grants fewer threads than the halves ask for (OMP_THREAD_LIMIT under 4 threads):
    with 3 the two teams share them out, with 1 one thread runs both directions in turn."""
    tests = os.path.dirname(os.path.abspath(__file__))
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(varlen_rnn.__file__)))
    env = dict(os.environ, OMP_THREAD_LIMIT=str(limit), VARLEN_RNN_CPU_DIRECTIONS="concurrent")
    env.pop("VARLEN_RNN_CPU_STEPS", None)
    proc = subprocess.run(
        [sys.executable, "-c", LIMITED.format(package_root=package_root, tests=tests, cell=cell)],
        cwd=tests,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checked" in proc.stdout
