"""Under torch.autocast varlen_rnn.LSTM and RNN return the dtypes torch.nn.LSTM and RNN +
packing return, and numbers close to theirs under the same autocast (tests/test_autocast.py
is the GRU's). nn.LSTM keeps hx's dtype off cuDNN; nn.RNN's steps are autocast GEMMs, so it
returns the autocast dtype; cuDNN casts to float16. The tests compare with whatever nn returns
at run time."""

import pytest
import torch
from testing import (
    HAS_CUDA,
    assert_as_accurate_as_nn,
    assert_autocast_grads_close,
    cudnn_enabled,
    float64_run,
    make_cell_pair,
    packed_baseline,
    tensors_of,
)

T, B, I, H = 9, 6, 3, 8
LENGTHS = [9, 2, 4, 7, 1, 9]
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
CASES = [
    pytest.param("cpu", BF16, True, id="cpu-bf16"),
    pytest.param("cuda", F16, True, id="cuda-f16-cudnn", marks=_cuda),
    pytest.param("cuda", BF16, False, id="cuda-bf16-native", marks=_cuda),
]


def _state(ref, dtype, device):
    if dtype is None:
        return None
    g = torch.Generator().manual_seed(2)
    LD, P = 4, ref.proj_size or H
    h = torch.randn(LD, B, P, generator=g).to(device, dtype)
    if isinstance(ref, torch.nn.LSTM):
        return h, torch.randn(LD, B, H, generator=g).to(device, dtype)
    return h


@pytest.mark.parametrize("device,amp_dtype,cudnn", CASES)
@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize(
    "x_kind,hx_kind",
    [("f32", None), ("f32", "f32"), ("low", None), ("f32", "low"), ("low", "low"), ("low", "f32")],
)
def test_dtypes_and_values_follow_nn(device, amp_dtype, cudnn, kind, x_kind, hx_kind):
    to = {"f32": F32, "low": amp_dtype, None: None}
    ref, ours = make_cell_pair(kind, I, H, 2, bidirectional=True, dtype=F32, device=device)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(1)).to(device, to[x_kind])
    x_r, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
    hx = _state(ref, to[hx_kind], device)
    with cudnn_enabled(cudnn), torch.autocast(device, dtype=amp_dtype):
        expected = tensors_of(packed_baseline(ref, x_r, LENGTHS, hx))
        got = tensors_of(ours(x_o, hx, lengths=LENGTHS))
    assert [t.dtype for t in got] == [t.dtype for t in expected]
    w = [torch.randn(t.shape, generator=torch.Generator().manual_seed(3)).to(device) for t in got]
    outs64, truth = float64_run(
        ref, x, hx, LENGTHS, lambda ts: sum((t * v.double()).sum() for t, v in zip(ts, w))
    )
    assert_as_accurate_as_nn(["output", "h_n", "c_n"][: len(got)], got, expected, outs64)
    # Backward outside the region, as the GRU's test.
    sum((e.float() * v).sum() for e, v in zip(expected, w)).backward()
    sum((a.float() * v).sum() for a, v in zip(got, w)).backward()
    assert x_o.grad.dtype == x.dtype
    assert_autocast_grads_close(ours, ref, x_o, x_r, truth)


@pytest.mark.parametrize("kind", ["lstm_proj", "rnn_tanh"])
def test_compiled_under_autocast_matches_eager_dtypes(kind):
    _, ours = make_cell_pair(kind, I, H, 2, dtype=F32)
    x = torch.randn(T, B, I)
    f = lambda x: tensors_of(ours(x, lengths=LENGTHS))  # noqa: E731
    with torch.autocast("cpu", dtype=BF16):
        eager = f(x)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert [t.dtype for t in compiled] == [t.dtype for t in eager]
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e)
