"""The CPU float32 gate passes' exp, sigmoid and tanh (csrc/cpu/vec_math.h: plain arithmetic that
GCC vectorizes) against float64 over their whole input range, extremes and NaN included.

Each is reached through a one-step layer whose weights make one gate's pre-activation equal to
the input: RNN(tanh) gives tanh(x); an LSTM whose i and g gates saturate (c' = 1) gives
sigmoid(x) * tanh(1) from its o gate. Both step loops run (VARLEN_RNN_CPU_STEPS), and H spans a
vector body and a tail."""

import math

import pytest
import torch

import varlen_rnn

# The float32 math's absolute error bound: tanh(x) = 1 - 2 / (exp(2x) + 1) loses relative accuracy
# near 0 by the subtraction, but stays within a few ulp of 1 absolutely; sigmoid within a few ulp
# of its value.
TANH_ATOL = 3e-7
SIGMOID_RTOL = 4e-7


def _inputs() -> torch.Tensor:
    """[n] float32: a dense sweep of [-100, 100], the exp's clamps and overflow edges, tiny and
    huge magnitudes, +-inf and NaN."""
    sweep = torch.linspace(-100, 100, 200_001, dtype=torch.float64)
    edges = torch.tensor(
        [87.0, 88.0, 88.38, 88.5, 88.72, 88.73, 89.0, 89.5, 9.0, 9.01, 10.0, 10.5, 45.0]
    )
    tiny = torch.tensor([1e-30, 1e-12, 1e-7, 1e-5, 1e-3, 0.0])
    huge = torch.tensor([1e5, 3e38, float("inf")])
    special = torch.tensor([float("nan")])
    x = torch.cat([sweep, edges, tiny, huge, -edges, -tiny, -huge, special])
    return x.to(torch.float32)


def _one_step(module, x: torch.Tensor) -> torch.Tensor:
    """module's output at one step over a batch of one-feature rows x [n]: [n, H]."""
    with torch.inference_mode():
        out = module(x.view(1, -1, 1), lengths=[1] * x.numel())
    return out[0][0] if isinstance(out, tuple) else out[0]


@pytest.mark.parametrize("steps", ["split", "gemm"])
@pytest.mark.parametrize("H", [1, 37])
def test_tanh_against_float64(monkeypatch, steps, H):
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", steps)
    rnn = varlen_rnn.RNN(1, H, nonlinearity="tanh")
    with torch.no_grad():
        rnn.weight_ih_l0.fill_(1.0)
        rnn.weight_hh_l0.zero_()
        rnn.bias_ih_l0.zero_()
        rnn.bias_hh_l0.zero_()
    x = _inputs()
    got = _one_step(rnn, x)  # [n, H]: every unit computes tanh(x)
    want = torch.tanh(x.double()).unsqueeze(1).expand_as(got)
    assert torch.equal(got.isnan(), want.isnan()), "NaN must stay NaN, and only NaN"
    ok = ~want.isnan()
    err = (got.double()[ok] - want[ok]).abs().max().item()
    assert err <= TANH_ATOL, f"tanh off by {err:.3g} (bound {TANH_ATOL})"
    # Saturation is exact, as tanhf's from 9.01 on.
    assert (got[x >= 10] == 1).all() and (got[x <= -10] == -1).all()


@pytest.mark.parametrize("steps", ["split", "gemm"])
@pytest.mark.parametrize("H", [1, 37])
def test_sigmoid_against_float64(monkeypatch, steps, H):
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", steps)
    lstm = varlen_rnn.LSTM(1, H)
    big = 1000.0  # i = sigmoid(big) = 1 and g = tanh(big) = 1 exactly: c' = 1
    with torch.no_grad():
        lstm.weight_hh_l0.zero_()
        lstm.bias_hh_l0.zero_()
        w = lstm.weight_ih_l0.view(4, H)
        b = lstm.bias_ih_l0.view(4, H)
        w.zero_()
        b.copy_(torch.tensor([big, 0.0, big, 0.0]).view(4, 1).expand(4, H))
        w[3].fill_(1.0)  # the o gate's pre-activation is x
    # +-inf would make the other gates' 0 * x NaN: +-3e38 (in _inputs too) saturate the same way.
    x = _inputs()
    x = x[~x.isinf()]
    got = _one_step(lstm, x)  # [n, H]: sigmoid(x) * tanh(1)
    tanh1 = torch.tensor(math.tanh(1.0), dtype=torch.float32)
    want = (torch.sigmoid(x.double()) * tanh1.double()).unsqueeze(1).expand_as(got)
    assert torch.equal(got.isnan(), want.isnan()), "NaN must stay NaN, and only NaN"
    ok = ~want.isnan()
    # tanh(1) in float32 and the product add their own rounding to sigmoid's; below float32's
    # normal range (sigmoid(x) < 1.2e-38, x < -87.3) only an absolute bound holds.
    err = (got.double()[ok] - want[ok]).abs() - (SIGMOID_RTOL + 2**-23) * want[ok]
    assert err.max().item() <= 1.2e-38, f"sigmoid off by {err.max().item():.3g} past the bound"
    # The ends are exact, as nn.LSTM's: 0 far below (exp overflows to inf), 1 far above.
    assert (got[x <= -104] == 0).all()
    assert (got[x >= 17] == tanh1).all()
