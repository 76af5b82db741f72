"""A one-minute smoke test of the CUDA backend: persistent vs fallback vs float64 vs the CPU kernels.

    python benchmarks/gpu_smoke.py                             # on a GPU: every dtype, D=1 and 2
    python benchmarks/gpu_smoke.py --device cpu --sizes tiny   # the plumbing, on a CPU machine
    VARLEN_RNN_CUDA_PATH=fallback python benchmarks/gpu_smoke.py --child fallback --out r.pt
                                                               # one path alone (compute-sanitizer)

The library reads VARLEN_RNN_CUDA_PATH once per process, so each path runs in a child process of
its own (`--child persistent|fallback`, plus `--child cpu` for the CPU kernels and the float64
reference), which saves its results with torch.save after every case; the parent compares them.
A child that hangs is killed after its share of --time-budget and reported; the others still count.
Every comparison is ||a - b|| / ||b|| over output, h_n and every gradient, TF32 off (float32 means
float32); the reference is varlen_rnn.reference.gru_reference in float64 on the same inputs and
weights rounded to the dtype under test, so the tolerance measures the computation, not the inputs.

The persistent path runs in four children: `persistent` (tensor cores where the library allows
them: bfloat16 and float16 on sm_80+; float32 stays on the exact path because TF32 is off in the
children), `persistent_exact` (VARLEN_RNN_TENSOR_CORES=0: the CUDA-core kernels in every dtype),
`persistent_tf32` (float32 only, cudnn.allow_tf32 on: the TF32 mma path) and `persistent_tagged`
(the exact kernels with VARLEN_RNN_EXCHANGE=tagged; a float state only). Tensor-core results are
held to MMA_TOL (the compute precision's rounding of h and, for TF32, of W_hh), the others to TOL.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

from gpu_children import Deadline, import_path, run_child

import_path()
import torch  # noqa: E402

# name: (T, B, I, H, layers, D). "smoke": a tile of more than 32 rows (B=70: one of 72 on the
# exact kernels, three of 24 on tensor cores; an H100) and K > one warp's worth; "sanitize":
# small enough for compute-sanitizer; "tiny": the CPU dry run.
SIZES = {
    "smoke": [(17, 11, 8, 40, 2, 1), (17, 11, 8, 40, 2, 2), (33, 70, 16, 96, 1, 2)],
    "sanitize": [(7, 11, 5, 40, 2, 2)],
    "tiny": [(5, 4, 3, 8, 1, 1), (5, 4, 3, 8, 2, 2)],
}
ALL_DTYPES = ("float64", "float32", "float16", "bfloat16")
CPU_DTYPES = ("float64", "float32")  # what the CPU kernels dispatch
# ||a - b|| / ||b|| allowed: against the float64 reference, and between two of our paths.
TOL = {"float64": 1e-10, "float32": 2e-5, "float16": 5e-3, "bfloat16": 3e-2}
# The same for a path whose recurrent product runs on tensor cores: about ten units of the
# product's input precision (TF32 and float16: 2^-10; bfloat16: 2^-7, as TOL already allows for
# bfloat16 storage, plus the staged h rounded to bfloat16). Estimates until a GPU run sets them.
MMA_TOL = {"float64": 1e-10, "float32": 1e-2, "float16": 1e-2, "bfloat16": 5e-2}
# Each CUDA child's environment (VARLEN_RNN_CUDA_PATH and the tensor-core knob), whether it turns
# TF32 on, and the dtypes it runs (None: all asked for).
# `persistent` forces the tensor-core kernel wherever the dtype allows (VARLEN_RNN_TENSOR_CORES=1:
# auto would pick the exact kernel where the cost model prices it faster), unless the check
# turned tensor cores off for the whole run after a failed mma stage.
_TC = "0" if os.environ.get("VARLEN_RNN_TENSOR_CORES") == "0" else "1"
CHILDREN = {
    "persistent": (
        {"VARLEN_RNN_CUDA_PATH": "persistent", "VARLEN_RNN_TENSOR_CORES": _TC},
        False,
        None,
    ),
    "persistent_exact": (
        {"VARLEN_RNN_CUDA_PATH": "persistent", "VARLEN_RNN_TENSOR_CORES": "0"},
        False,
        None,
    ),
    "persistent_tf32": (
        {"VARLEN_RNN_CUDA_PATH": "persistent", "VARLEN_RNN_TENSOR_CORES": _TC},
        True,
        ("float32",),
    ),
    # the exact kernels' forward with the tagged exchange (launch.h): a float state only
    "persistent_tagged": (
        {
            "VARLEN_RNN_CUDA_PATH": "persistent",
            "VARLEN_RNN_TENSOR_CORES": "0",
            "VARLEN_RNN_EXCHANGE": "tagged",
        },
        False,
        ("float32", "float16", "bfloat16"),
    ),
    "fallback": ({"VARLEN_RNN_CUDA_PATH": "fallback"}, False, None),
    "auto": ({"VARLEN_RNN_CUDA_PATH": "auto"}, False, None),
}


def path_dtypes(path: str, dtypes) -> tuple:
    only = CHILDREN.get(path, ({}, False, None))[2]
    return tuple(d for d in dtypes if only is None or d in only)


def tolerance(path: str, dtype: str) -> float:
    """TOL, or MMA_TOL where `path` runs the recurrent product on tensor cores (a GPU's sm_80+
    assumed: on older ones the looser bound still holds)."""
    mma = (path == "persistent" and dtype in ("float16", "bfloat16")) or path == "persistent_tf32"
    return (MMA_TOL if mma else TOL)[dtype]


def case_name(c) -> str:
    T, B, I, H, L, D = c
    return f"T{T}-B{B}-I{I}-H{H}-L{L}-D{D}"


def make_inputs(c, seed=0):
    """float64 CPU tensors, the same in every process: weights, x [T, B, I], hx [L*D, B, H],
    lengths [B] (a zero, a one and T included), and the loss weights for out and h_n."""
    import varlen_rnn

    T, B, I, H, L, D = c
    torch.manual_seed(seed)
    gru = varlen_rnn.GRU(I, H, L, bidirectional=D == 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[1 % B], lengths[2 % B] = T, 0, 1
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    hx = torch.randn(L * D, B, H, generator=g, dtype=torch.float64)
    w_out = torch.randn(T, B, D * H, generator=g, dtype=torch.float64)
    w_h = torch.randn(L * D, B, H, generator=g, dtype=torch.float64)
    return gru, x, hx, lengths, w_out, w_h


def run_one(c, dtype: str, device: str, reference: bool = False):
    """[out, h_n, d x, d hx, d params...] as float64 CPU tensors. reference: gru_reference in
    float64 on the inputs and weights rounded to `dtype`."""
    from varlen_rnn.reference import gru_reference

    gru, x, hx, lengths, w_out, w_h = make_inputs(c)
    dt = getattr(torch, dtype)
    if reference:
        gru = gru.to(dt).double()
        x, hx = x.to(dt).double(), hx.to(dt).double()
        dt, device = torch.float64, "cpu"
    gru = gru.to(device, dt)
    x = x.to(device, dt).requires_grad_()
    hx = hx.to(device, dt).requires_grad_()
    if reference:
        out, h = gru_reference(gru, x, hx, lengths)
    else:
        out, h = gru(x, hx, lengths=lengths.to(device))
    loss = (out.double() * w_out.to(device)).sum() + (h.double() * w_h.to(device)).sum()
    grads = torch.autograd.grad(loss, [x, hx, *gru.parameters()])
    return [t.detach().double().cpu() for t in (out, h, *grads)]


def graph_check(device: str) -> float:
    """Capture forward + backward in a CUDA graph, replay it on new inputs, compare with eager."""
    import varlen_rnn

    T, B, I, H = 12, 9, 6, 24
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(I, H, 2, bidirectional=True, device=device)
    x = torch.randn(T, B, I, device=device, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,), device=device)
    params = list(gru.parameters())

    def step():
        out, h = gru(x, lengths=lengths)
        return [out, h, *torch.autograd.grad((out * out).sum() + h.sum(), [x, *params])]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch's docs ask
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    with torch.no_grad():
        x.copy_(torch.randn(T, B, I, device=device))
        lengths.copy_(torch.randint(1, T + 1, (B,), device=device))
    graph.replay()
    eager = step()
    torch.cuda.synchronize()
    return max(rel_err(a, e) for a, e in zip(static, eager))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the last complete file


def child(name: str, device: str, sizes: str, dtypes, graph: bool, out: str) -> int:
    """One process: `name` is a CUDA path (persistent|fallback|auto, read by the library from the
    environment) or "cpu" (CPU kernels + float64 references)."""
    old_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = CHILDREN.get(name, ({}, False, None))[1]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    dtypes = path_dtypes(name, dtypes)
    res = {
        "child": name,
        "env_path": os.environ.get("VARLEN_RNN_CUDA_PATH"),
        "tf32": tf32,
        "env_tensor_cores": os.environ.get("VARLEN_RNN_TENSOR_CORES"),
        "runs": {},
        "errors": {},
        "warnings": [],
    }
    failed = 0
    try:
        for c in SIZES[sizes]:
            todo = (
                (
                    [(d, "cpu", False) for d in CPU_DTYPES if d in dtypes]
                    + [(d, "ref", True) for d in dtypes]
                )
                if name == "cpu"
                else [(d, name, False) for d in dtypes]
            )
            for dtype, key, reference in todo:
                tag = f"{case_name(c)}/{dtype}/{key}"
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        res["runs"][tag] = run_one(
                            c, dtype, "cpu" if name == "cpu" else device, reference
                        )
                    for w in caught:
                        res["warnings"].append(f"{tag}: {w.message}")
                        print(f"WARNING: {tag}: {w.message}", flush=True)
                    print(f"ran {tag}", flush=True)
                except Exception as e:  # noqa: BLE001  one failing case must not hide the others
                    failed += 1
                    res["errors"][tag] = f"{type(e).__name__}: {e}"[:500]
                    print(f"ERROR {tag}: {res['errors'][tag]}", flush=True)
                save(res, out)
        if graph and name != "cpu" and device == "cuda":
            try:
                res["graph"] = graph_check(device)
                print(f"graph replay vs eager: {res['graph']:.2e}", flush=True)
            except Exception as e:  # noqa: BLE001  reported as a failed check
                failed += 1
                res["errors"]["graph"] = f"{type(e).__name__}: {e}"[:500]
                print(f"ERROR graph: {res['errors']['graph']}", flush=True)
            save(res, out)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_tf32
    return 1 if failed else 0


def compare(results: dict, paths, sizes: str, dtypes) -> tuple[list, list]:
    """(table rows, checks): each check is (name, error, tol, ok); a missing result fails."""
    checks, rows = [], []
    ref_runs = results.get("cpu", {}).get("runs", {})

    def check(name, a, b, tol):
        if a is None or b is None:
            checks.append((name, None, tol, False))
            return None
        err = max(rel_err(x, y) for x, y in zip(a, b))
        checks.append((name, err, tol, err <= tol))
        return err

    for c in SIZES[sizes]:
        lengths = make_inputs(c)[3]
        T = c[0]
        pad = torch.arange(T).unsqueeze(1) >= lengths.unsqueeze(0)  # [T, B]
        for d in dtypes:
            tag = f"{case_name(c)}/{d}"
            ref = ref_runs.get(f"{tag}/ref")
            here = [p for p in paths if d in path_dtypes(p, dtypes)]  # the paths that ran d
            got = {p: results.get(p, {}).get("runs", {}).get(f"{tag}/{p}") for p in here}
            row = [case_name(c), d]
            for p in paths:
                if p not in here:
                    row.append("n/a")
                    continue
                row.append(check(f"{tag}: {p} vs float64 reference", got[p], ref, tolerance(p, d)))
                if got[p] is not None:
                    zero = bool((got[p][0][pad] == 0).all())
                    checks.append((f"{tag}: {p} output past each length is 0", None, None, zero))
            for a, b in zip(paths, paths[1:]):  # neighbours: each pair at the looser tolerance
                if a in here and b in here:
                    row.append(
                        check(
                            f"{tag}: {a} vs {b}",
                            got[a],
                            got[b],
                            max(tolerance(a, d), tolerance(b, d)),
                        )
                    )
                else:
                    row.append("n/a")
            if d in CPU_DTYPES:
                cpu = ref_runs.get(f"{tag}/cpu")
                check(f"{tag}: CPU kernels vs float64 reference", cpu, ref, TOL[d])
                for p in paths:
                    row.append(
                        check(f"{tag}: {p} vs CPU kernels", got[p], cpu, tolerance(p, d))
                        if p in here
                        else "n/a"
                    )
            rows.append(row)
    for p in paths:
        if "graph" in results.get(p, {}):
            err = results[p]["graph"]
            checks.append((f"{p}: CUDA graph replay vs eager (float32)", err, 1e-5, err <= 1e-5))
        for tag, msg in results.get(p, {}).get("errors", {}).items():
            checks.append((f"{p}: {tag} raised {msg}", None, None, False))
    for tag, msg in results.get("cpu", {}).get("errors", {}).items():
        checks.append((f"cpu: {tag} raised {msg}", None, None, False))
    return rows, checks


def fmt(e) -> str:
    return "missing" if e is None else e if isinstance(e, str) else f"{e:.1e}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: the CUDA paths' children run on the CPU (a dry run of the plumbing)",
    )
    p.add_argument(
        "--sizes", choices=sorted(SIZES), default=None, help="default: smoke (tiny on cpu)"
    )
    p.add_argument(
        "--dtypes",
        default=None,
        help=f"comma-separated (default: {','.join(ALL_DTYPES)}; on cpu {','.join(CPU_DTYPES)})",
    )
    p.add_argument(
        "--paths",
        default="persistent,persistent_exact,persistent_tagged,fallback,persistent_tf32",
        help=f"CUDA children to compare, among {', '.join(CHILDREN)}; neighbours are "
        "compared with each other",
    )
    p.add_argument("--time-budget", type=float, default=60.0, help="seconds for all children")
    p.add_argument(
        "--out", default=None, help="folder for the children's results (default: a temp dir)"
    )
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA graph capture")
    p.add_argument("--child", default=None, help="run one child: a path name, or cpu")
    a = p.parse_args(argv)
    sizes = a.sizes or ("tiny" if a.device == "cpu" else "smoke")
    dtypes = tuple(
        (a.dtypes or ",".join(CPU_DTYPES if a.device == "cpu" else ALL_DTYPES)).split(",")
    )
    bad = [d for d in dtypes if d not in ALL_DTYPES]
    if bad:
        p.error(f"--dtypes must be among {ALL_DTYPES}, got {bad}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error(
            "--device cuda but torch.cuda.is_available() is False (use --device cpu for a dry run)"
        )
    if a.child:
        out = a.out or os.path.join(tempfile.mkdtemp(), f"{a.child}.pt")
        return child(a.child, a.device, sizes, dtypes, not a.no_graph, out)

    out_dir = a.out or tempfile.mkdtemp(prefix="gpu_smoke")
    os.makedirs(out_dir, exist_ok=True)
    paths = a.paths.split(",")
    if any(q not in CHILDREN for q in paths):
        p.error(f"--paths must be among {tuple(CHILDREN)}, got {paths}")
    paths = [q for q in paths if path_dtypes(q, dtypes)]  # persistent_tf32 without float32: none
    deadline = Deadline(a.time_budget)
    results, status = {}, {}
    order = ["cpu", *paths]  # cpu first: the reference is cheap and everything compares with it
    with open(os.path.join(out_dir, "children.log"), "w") as log:
        for i, name in enumerate(order):
            pt = os.path.join(out_dir, f"{name}.pt")
            args = [
                os.path.abspath(__file__),
                "--child",
                name,
                "--device",
                a.device,
                "--sizes",
                sizes,
                "--dtypes",
                ",".join(dtypes),
                "--out",
                pt,
            ] + (["--no-graph"] if a.no_graph else [])
            env = {} if name == "cpu" else CHILDREN[name][0]
            r = run_child(args, deadline.share(len(order) - i), env, log)
            status[name] = f"{r['status']} ({r['seconds']:.0f}s)"
            print(f"child {name}: {status[name]}", flush=True)
            if r["status"] != "ok":
                print("    " + r["tail"][-1500:].replace("\n", "\n    "), flush=True)
            if os.path.exists(pt):
                results[name] = torch.load(pt, weights_only=False)
    rows, checks = compare(results, paths, sizes, dtypes)
    head = ["case", "dtype", *[f"{q} vs f64" for q in paths]]
    head += [f"{q} vs {r}" for q, r in zip(paths, paths[1:])]
    head += [f"{q} vs CPU" for q in paths]
    print(
        "\nrelative error ||a-b||/||b|| (tolerance per dtype: "
        + ", ".join(f"{d} {TOL[d]:.0e}" for d in dtypes)
        + "; on tensor cores "
        + ", ".join(f"{d} {MMA_TOL[d]:.0e}" for d in dtypes)
        + ")"
    )
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(r[:2] + [fmt(e) for e in r[2:]]))
    bad = [c for c in checks if not c[3]]
    for name, err, tol, _ in bad[:30]:
        print(f"FAIL {name}" + (f": {fmt(err)} > {tol:.0e}" if tol is not None else ""))
    warned = sum(len(results.get(q, {}).get("warnings", [])) for q in paths)
    print(
        f"KEY: {len(checks) - len(bad)}/{len(checks)} checks passed"
        + (f", {len(bad)} FAILED" if bad else "")
        + "; children "
        + ", ".join(f"{k} {v}" for k, v in status.items())
        + (f"; {warned} warnings" if warned else "")
    )
    return 1 if bad or any(not s.startswith("ok") for s in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
