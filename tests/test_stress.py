"""Stress: memory stays flat over hundreds of training steps, several Python threads get the
results of a serial run bit for bit, and NaN/inf in the input propagate exactly as in
torch.nn.GRU + packing. (Inputs are never modified: tests/test_errors.py.)"""

import gc
import os
import threading

import pytest
import torch
from testing import ALL_DEVICES, TOL, make_pair, packed_baseline

import varlen_rnn

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss():
    """Resident set size in bytes, from /proc/self/statm (no psutil needed)."""
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared CI box an oversubscribed OpenMP pool makes each step
    10-40x slower, and per-thread malloc arenas appearing late would read as growth."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
@pytest.mark.parametrize("grad", [True, False], ids=["train", "inference"])
def test_memory_is_flat_over_hundreds_of_steps(grad, one_thread):
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(8, 24, num_layers=2, bidirectional=True, batch_first=True)
    head = torch.nn.Linear(48, 4)
    opt = torch.optim.SGD(list(gru.parameters()) + list(head.parameters()), lr=1e-2, momentum=0.9)
    shapes = [(16, 16), (9, 23), (16, 5), (3, 16)]  # cycled: every shape's buffers recur
    batches = []
    for i, (B, T) in enumerate(shapes):
        g = torch.Generator().manual_seed(i)
        batches.append(
            (
                torch.randn(B, T, 8, generator=g),
                torch.randint(0, T + 1, (B,), generator=g),
                torch.randint(0, 4, (B,), generator=g),
            )
        )

    def step(i):
        x, lengths, y = batches[i % len(batches)]
        with torch.set_grad_enabled(grad):
            _, h = gru(x, lengths=lengths if i % 2 else lengths.tolist())
            loss = torch.nn.functional.cross_entropy(head(torch.cat([h[-2], h[-1]], 1)), y)
        if grad:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    for i in range(50):  # warm-up: allocator pools, momentum buffers, lazily created state
        step(i)
    before = _rss()
    for i in range(300):
        step(i)
    grown = _rss() - before
    # Measured here: < 0.1 MiB. Keeping one step's output alive adds ~9 MiB over 300 steps,
    # its h_n ~5 MiB, what backward saves (workspaces) far more.
    assert grown < 2 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 300 steps"


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+backward"])
def test_threads_get_the_serial_results(device, grad):
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(6, 16, num_layers=2, bidirectional=True, device=device).eval()
    params = list(gru.parameters())
    jobs = []
    for i in range(12):
        g = torch.Generator().manual_seed(i)
        T, B = 4 + i % 5, 1 + (3 * i) % 7
        jobs.append(
            (
                torch.randn(T, B, 6, generator=g).to(device).requires_grad_(grad),
                torch.randint(0, T + 1, (B,), generator=g).to(device),
            )
        )

    def run(x, lengths):
        out, h = gru(x, lengths=lengths)
        if not grad:
            return [out, h]
        # autograd.grad, not .backward(): concurrent accumulation into .grad is a race by design.
        return [out, h, *torch.autograd.grad(out.sum() + (h * h).sum(), [x] + params)]

    with torch.set_grad_enabled(grad):
        serial = [run(*job) for job in jobs]
    results, errors = {}, []
    start = threading.Barrier(4)

    def worker(t):
        try:
            start.wait()
            with torch.set_grad_enabled(grad):
                for _ in range(3):
                    for i in range(t, len(jobs), 4):
                        results.setdefault(i, []).append(run(*jobs[i]))
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, expected in enumerate(serial):
        assert len(results[i]) == 3
        for got in results[i]:
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), f"job {i}"


def _poison(kind, x, hx, lengths):
    """Put non-finite (or huge) values at chosen places of x (and hx)."""
    big = torch.finfo(x.dtype).max / 4
    if kind == "nan":
        x[1, 0, 2] = x[0, 3, 0] = float("nan")
    elif kind == "inf":
        x[2, 1, 1] = float("inf")
        x[0, 4, 5] = float("-inf")
    elif kind == "huge":  # finite but saturating every gate; exp/tanh must not overflow to NaN
        x[:, 2] = big
        x[:, 5] = -big
    elif kind == "mixed":
        m = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
        x[m < 0.02] = float("nan")
        x[(m > 0.02) & (m < 0.04)] = float("inf")
        x[(m > 0.04) & (m < 0.06)] = float("-inf")
        x[(m > 0.06) & (m < 0.1)] = big
    elif kind == "padding":  # beyond each length: never read, so no NaN may come out
        for b, n in enumerate(lengths):
            x[n:, b] = float("nan")
    elif kind == "hx":
        hx[1, 2, 3] = float("nan")
        hx[2, 6, 0] = float("inf")


# The gradients' finite values: sums over every position of the batch, so float32's bound is
# looser than the outputs' (TOL).
GRAD_TOL = {torch.float64: TOL[torch.float64], torch.float32: dict(atol=1e-4, rtol=1e-4)}


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", ["nan", "inf", "huge", "mixed", "padding", "hx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_nonfinite_inputs_propagate_like_nn_gru(device, kind, dtype):
    # H = 37: the vectorized gate loops run both their full-width body and their tail.
    ref, ours = make_pair(8, 37, 2, bidirectional=True, dtype=dtype, device=device, seed=1)
    T, B = 7, 9
    lengths = [7, 3, 4, 1, 7, 2, 5, 6, 7]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, 8, generator=g, dtype=dtype) * 5
    hx = torch.randn(4, B, 37, generator=g, dtype=dtype)
    _poison(kind, x, hx, lengths)
    x, hx = x.to(device), hx.to(device)
    x_r, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, h_r = packed_baseline(ref, x_r, lengths, hx)
    out, h = ours(x_o, hx, lengths=lengths)
    for name, a, e in (("output", out, out_r), ("h_n", h, h_r)):
        assert torch.equal(a.isnan(), e.isnan()), f"{name}: NaN positions differ"
        assert torch.equal(a.isinf(), e.isinf()), f"{name}: inf positions differ"
        finite = e.isfinite()
        torch.testing.assert_close(a[finite], e[finite], **TOL[dtype])
    if kind == "padding":
        assert out.isfinite().all() and h.isfinite().all()
    (out.sum() + h.sum()).backward()
    (out_r.sum() + h_r.sum()).backward()
    grads = [(n, p.grad, q.grad) for (n, p), q in zip(ours.named_parameters(), ref.parameters())]
    for name, a, e in [("input", x_o.grad, x_r.grad)] + grads:
        assert torch.equal(a.isnan(), e.isnan()), f"grad of {name}: NaN positions differ"
        assert torch.equal(a.isinf(), e.isinf()), f"grad of {name}: inf positions differ"
        finite = e.isfinite()
        torch.testing.assert_close(
            a[finite], e[finite], **GRAD_TOL[dtype], msg=lambda m: f"grad of {name}: {m}"
        )
