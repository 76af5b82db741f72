"""Which part of test_cuda_persistent_launches_on_busy_streams_finish goes wrong (H200 run 1:
NaN in dx of the H=264 layer). Each variant runs in a child; prints one line per mismatch."""

import subprocess
import sys
import textwrap

BODY = r"""
import ctypes, sys, torch, varlen_rnn
V = sys.argv[1]
lib = ctypes.CDLL(varlen_rnn._C.__file__)
knobs = lib.varlen_rnn_cuda_set_knobs_for_testing
knobs.argtypes, knobs.restype = [ctypes.c_char_p, ctypes.c_longlong, ctypes.c_int], ctypes.c_int
keep = V == "keep-graph"
def layer(args, lengths):
    args = [a.detach().requires_grad_() for a in args]
    out, h = varlen_rnn.ops.gru_layer(args[0], lengths, *args[1:])
    g = torch.Generator(device=out.device).manual_seed(1)
    w = torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)
    if V == "sync-fwd":
        torch.cuda.current_stream().synchronize()
    return [out, h, *torch.autograd.grad((out * w).sum() + h.sum(), args, retain_graph=keep)]
assert knobs(b"fallback" if V == "fallback" else b"persistent", 0, 0) == 0
torch.backends.cudnn.allow_tf32 = False
sms = torch.cuda.get_device_properties(0).multi_processor_count
torch.manual_seed(0)
T, B, I = 200, 6, 8
lengths = torch.tensor([T, 3, T - 1, 0, T // 2, 9], device="cuda")
def args(H):
    g = torch.Generator().manual_seed(H)
    shapes = [(T, B, I), (2, B, H), (2, 3 * H, I), (2, 3 * H, H), (2, 3 * H), (2, 3 * H)]
    return [(0.5 * torch.randn(s, generator=g)).cuda() for s in shapes]
Hs = (4 * (sms // 2),) if V == "one-case" else (4 * (sms // 2), 16)
cases = {H: args(H) for H in Hs}
expected = {H: layer(a, lengths) for H, a in cases.items()}
torch.cuda.synchronize()
for H, e in expected.items():
    assert all(torch.isfinite(t).all() for t in e), f"expected {H} not finite"
streams = [torch.cuda.Stream() for _ in range(3)]
for s in streams:
    s.wait_stream(torch.cuda.current_stream())
big = torch.randn(4096, 4096, device="cuda")
got = {}
if V != "no-gemm":
    with torch.cuda.stream(streams[0]):
        for _ in range(8):
            big = (big @ big).mul_(1e-3)
for rep in range(3):
    for s, (H, a) in zip(streams[1:], cases.items()):
        with torch.cuda.stream(s):
            got[H, rep] = layer(a, lengths)
        if V == "serial":
            s.synchronize()
for s in streams:
    torch.cuda.current_stream().wait_stream(s)
torch.cuda.synchronize()
bad = 0
names = ["out", "h", "dx", "dhx", "dw_ih", "dw_hh", "db_ih", "db_hh"]
for (H, rep), res in got.items():
    for i, (u, v) in enumerate(zip(res, expected[H])):
        err = (u - v).abs()
        nan = int(torch.isnan(u).sum())
        mx = float(err.nan_to_num(float("inf")).max())
        if nan or mx > 1e-4:
            bad += 1
            msg = f"  {V}: H={H} rep={rep} {names[i]} nan={nan} max_err={mx:.3g} shape={tuple(u.shape)}"
            if i in (0, 2) and nan:
                idx = torch.isnan(u).any(-1).nonzero().tolist()
                ts = sorted({t for t, b in idx}); bs = sorted({b for t, b in idx})
                msg += f" nan (t,b): b={bs} t={ts[:12]}{'...' if len(ts) > 12 else ''} ({len(idx)} positions)"
            elif mx > 1e-4 and u.dim() == 3:
                where = (err > 1e-4).any(-1).nonzero().tolist()
                msg += f" bad (t,b)[:10]={where[:10]} ({len(where)})"
            print(msg)
print(f"{V}: {'ok' if bad == 0 else str(bad) + ' mismatches'}")
"""

variants = sys.argv[1:] or [
    "as-test",
    "as-test",
    "no-gemm",
    "one-case",
    "serial",
    "keep-graph",
    "sync-fwd",
    "fallback",
]
for v in variants:
    try:
        r = subprocess.run(
            [sys.executable, "-c", BODY, v], capture_output=True, text=True, timeout=45
        )
        print(r.stdout.strip() or f"{v}: no output")
        if r.returncode:
            print(textwrap.indent(r.stderr[-1500:], "    "))
    except subprocess.TimeoutExpired:
        print(f"{v}: timed out")
    sys.stdout.flush()
