"""Under torch.autocast varlen_rnn.GRU returns the dtypes torch.nn.GRU returns, and numbers
close to nn.GRU's under the same autocast.

nn.GRU has two policies. CPU (and CUDA without cuDNN, or bfloat16 input): no autocast rule
for the RNN itself, so output and h_n keep hx's dtype (the input's when hx is None) and only
the GEMMs inside run in the autocast dtype. CUDA with cuDNN: the _cudnn_rnn autocast wrapper
casts input, hx and weights to float16. The tests compare with whatever nn.GRU returns at run
time, so they hold for either.
"""

import copy

import pytest
import torch
from testing import (
    HAS_CUDA,
    assert_as_accurate_as_nn,
    assert_autocast_grads_close,
    cudnn_enabled,
    float64_run,
    make_pair,
    packed_baseline,
)

import varlen_rnn

T, B, I, H = 9, 6, 3, 8
LENGTHS = [9, 2, 4, 7, 1, 9]
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

# (device, autocast dtype, cuDNN on); CUDA cases are reported as skipped without a GPU.
_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
CASES = [
    pytest.param("cpu", BF16, True, id="cpu-bf16"),
    pytest.param("cuda", F16, True, id="cuda-f16-cudnn", marks=_cuda),
    pytest.param("cuda", BF16, True, id="cuda-bf16-cudnn", marks=_cuda),
    pytest.param("cuda", F16, False, id="cuda-f16-native", marks=_cuda),
    pytest.param("cuda", BF16, False, id="cuda-bf16-native", marks=_cuda),
]
# Max abs difference allowed from nn.GRU under the same autocast: both round to 8 (bf16) or
# 11 (f16) mantissa bits in different places; nn.GRU's own distance from float32 is similar.
TOL = {BF16: 3e-2, F16: 5e-3}


@pytest.mark.parametrize("device,amp_dtype,cudnn", CASES)
# "low" is the case's autocast dtype; None: no hx.
@pytest.mark.parametrize(
    "x_kind,hx_kind",
    [("f32", None), ("f32", "f32"), ("low", None), ("f32", "low"), ("low", "low")],
    ids=["x32", "x32-h32", "xlow", "x32-hlow", "xlow-hlow"],
)
@pytest.mark.parametrize("batch_first", [False, True])
def test_dtypes_and_values_follow_nn_gru(device, amp_dtype, cudnn, x_kind, hx_kind, batch_first):
    x_dtype = {"f32": F32, "low": amp_dtype}[x_kind]
    hx_dtype = {"f32": F32, "low": amp_dtype, None: None}[hx_kind]
    ref, ours = make_pair(
        I, H, 2, batch_first=batch_first, bidirectional=True, dtype=F32, device=device
    )
    torch.manual_seed(1)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), device=device).to(x_dtype)
    hx = None if hx_dtype is None else torch.randn(4, B, H, device=device).to(hx_dtype)
    x_r, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
    with cudnn_enabled(cudnn), torch.autocast(device, dtype=amp_dtype):
        out_r, h_r = packed_baseline(ref, x_r, LENGTHS, hx)
        out, h = ours(x_o, hx, lengths=LENGTHS)
    assert (out.dtype, h.dtype) == (out_r.dtype, h_r.dtype)
    w = torch.randn(out.shape, device=device)
    outs64, truth = float64_run(
        ref, x, hx, LENGTHS, lambda t: (t[0] * w.double()).sum() + t[1].sum()
    )
    assert_as_accurate_as_nn(["output", "h_n"], [out, h], [out_r, h_r], outs64)
    # Backward outside the region, as the autocast docs recommend: gradients have the
    # dtypes of the leaves (float32 parameters, the input's dtype) and are as accurate.
    (out_r.float() * w).sum().add(h_r.float().sum()).backward()
    (out.float() * w).sum().add(h.float().sum()).backward()
    assert_autocast_grads_close(ours, ref, x_o, x_r, truth)


@pytest.mark.parametrize("device,amp_dtype,cudnn", CASES)
def test_packed_sequence_under_autocast(device, amp_dtype, cudnn):
    from torch.nn.utils.rnn import pack_padded_sequence

    ref, ours = make_pair(I, H, 2, dtype=F32, device=device)
    x = torch.randn(T, B, I, device=device)
    packed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    with cudnn_enabled(cudnn), torch.autocast(device, dtype=amp_dtype):
        out_r, h_r = ref(packed)
        out, h = ours(packed)
    assert (out.data.dtype, h.dtype) == (out_r.data.dtype, h_r.dtype)
    assert torch.equal(out.batch_sizes, out_r.batch_sizes)
    torch.testing.assert_close(out.data.float(), out_r.data.float(), atol=TOL[amp_dtype], rtol=0)


@pytest.mark.parametrize("device,amp_dtype,cudnn", CASES)
def test_float64_model_is_left_alone(device, amp_dtype, cudnn):
    """Autocast never touches float64: nn.GRU stays float64, and so does this GRU, exactly."""
    ref, ours = make_pair(I, H, 2, bidirectional=True, dtype=F64, device=device)
    x = torch.randn(T, B, I, dtype=F64, device=device)
    expected = ours(x, lengths=LENGTHS)
    with cudnn_enabled(cudnn), torch.autocast(device, dtype=amp_dtype):
        out_r, h_r = packed_baseline(ref, x, LENGTHS)
        out, h = ours(x, lengths=LENGTHS)
    assert out.dtype == h.dtype == out_r.dtype == h_r.dtype == F64
    assert torch.equal(out, expected[0]) and torch.equal(h, expected[1])


@pytest.mark.parametrize("device,amp_dtype,cudnn", CASES[:1] + CASES[3:])  # the native policy
def test_float32_state_is_computed_in_float32(device, amp_dtype, cudnn):
    """Where nn.GRU keeps a float32 state, the kernels run in float32: the result is the one
    outside autocast, bit for bit (the kernels' own GEMMs are not autocast behind their back).
    Except on a CPU whose bfloat16 layers take their products in bfloat16 (AMX or AVX512-BF16):
    there, under bfloat16 autocast, the layers run as bfloat16 layers (bfloat16 product operands,
    float32 state and gates inside, as nn.GRU's autocast GEMMs), and the result is exactly that
    of the same model in bfloat16, cast back to float32."""
    _, ours = make_pair(I, H, 2, bidirectional=True, dtype=F32, device=device)
    x = torch.randn(T, B, I, device=device)
    if device == "cpu" and amp_dtype == BF16 and varlen_rnn._autocast.CPU_BF16:
        low = copy.deepcopy(ours).to(BF16)
        expected = [t.float() for t in low(x.to(BF16), lengths=LENGTHS)]
        plain = ours(x, lengths=LENGTHS)
    else:
        expected = plain = ours(x, lengths=LENGTHS)
    with cudnn_enabled(cudnn), torch.autocast(device, dtype=amp_dtype):
        got = ours(x, lengths=LENGTHS)
    assert got[0].dtype == got[1].dtype == F32
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    if plain is not expected:  # the bfloat16 products really ran
        assert not torch.equal(got[0], plain[0])


@pytest.mark.parametrize("device,amp_dtype,cudnn", CASES)
def test_op_and_backward_inside_the_autocast_region(device, amp_dtype, cudnn):
    """The op wrapper runs under autocast in any dtype, and backward() may be called inside
    the region too (the backward kernel's GEMMs are not autocast either)."""
    D = 2
    f = lambda *s: torch.randn(*s, device=device, requires_grad=True)
    args = (
        f(T, B, I),
        torch.tensor(LENGTHS, device=device),
        f(D, B, H),
        f(D, 3 * H, I),
        f(D, 3 * H, H),
        f(D, 3 * H),
        f(D, 3 * H),
    )
    expected = varlen_rnn.ops.gru_layer(*args)
    g_expected = torch.autograd.grad(expected[0].sum() + expected[1].sum(), args[0])
    with cudnn_enabled(cudnn), torch.autocast(device, dtype=amp_dtype):
        out, h = varlen_rnn.ops.gru_layer(*args)
        (g,) = torch.autograd.grad(out.sum() + h.sum(), args[0])
    assert out.dtype == h.dtype == F32
    assert torch.equal(out, expected[0]) and torch.equal(h, expected[1])
    assert torch.equal(g, g_expected[0])


@pytest.mark.parametrize("device,amp_dtype,cudnn", CASES[:2])
def test_compiled_under_autocast_matches_eager_dtypes(device, amp_dtype, cudnn):
    _, ours = make_pair(I, H, 2, dtype=F32, device=device)
    x = torch.randn(T, B, I, device=device)
    lengths = torch.tensor(LENGTHS, device=device)

    def run(x, lengths):
        with torch.autocast(device, dtype=amp_dtype):
            return ours(x, lengths=lengths)

    with cudnn_enabled(cudnn):
        expected = run(x, lengths)
        got = torch.compile(run, fullgraph=True, backend="aot_eager")(x, lengths)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
