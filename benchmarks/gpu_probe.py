"""Timing probe: where the persistent path (tensor cores and exact) stops beating the fallback, and
all against cuDNN.

    python benchmarks/gpu_probe.py                          # on a GPU: about a minute
    python benchmarks/gpu_probe.py --device cpu --tiny      # the plumbing, on a CPU machine
    python benchmarks/gpu_probe.py --B 1,8 --H 512 --impls persistent,cudnn --modes fwd

One layer, T steps, lengths uniform in [1, T], I = H, for every B x H x dtype x mode (fwd: a forward
under inference_mode; train: forward + backward of a random projection). Implementations: our
persistent and fallback paths (VARLEN_RNN_CUDA_PATH, read once per process, so each runs in a
child process of its own; `auto` may be added) and nn.GRU + pack_padded_sequence(enforce_sorted=
False) + pad_packed_sequence on cuDNN, with torch's default backend flags (cuDNN's TF32 for float32
included), as a user gets them. Times are medians of CUDA-event intervals after a warm-up, over
two input sets used in turn (fresh random data, never zeros). Prints a table and, per (H, dtype,
mode), the measured crossover: the smallest B at which persistent is no longer faster than fallback,
the number the path-choice model's constants are set from. Writes probe.json and probe.md to --out.
The persistent path is measured three times: `persistent` with tensor cores where the library
allows them (bfloat16/float16 always, float32 under cudnn.allow_tf32, which is on by default;
sm_80+), `persistent_exact` with VARLEN_RNN_TENSOR_CORES=0 in its child (the CUDA-core kernels),
`persistent_tagged`, those with VARLEN_RNN_EXCHANGE=tagged (the forward's blocks share h
without a grid barrier per step), and `persistent_unsliced`, the exact ones with
VARLEN_RNN_PERSISTENT_ROW_SLICES=1 (every block stages all rows, as before row slices: what
splitting the rows between blocks buys); each gets its crossover. The exact kernels and the recipe also
time float32 forward calls with every length 1 (`--one-step`, B=1 and 8): a call's fixed cost
(launches, the input projection, the host's work), and from it a step's, in probe.md's section
"One-step calls". A VARLEN_RNN_TENSOR_CORES=0 in the probe's own environment (gpu_check.sh sets
it when the wrapper test failed) reaches both children, and the header says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from gpu_children import Deadline, import_path, run_child

import_path()
import torch  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

OURS = (
    "persistent",
    "persistent_exact",
    "persistent_tagged",
    "persistent_unsliced",
    "fallback",
    "auto",
)
PERSISTENT = ("persistent", "persistent_exact", "persistent_tagged", "persistent_unsliced")
# Those timed on one-step calls too (--one-step): the exact kernels that inference at small B runs,
# and the recipe.
ONE_STEP_IMPLS = ("persistent_exact", "persistent_tagged", "cudnn")
# Each implementation's child environment: the path, and the tensor-core knob.
# `persistent` forces the tensor-core kernel where the dtype allows (auto would price it against the
# exact one), unless the check turned tensor cores off for the whole run after a failed mma stage.
_TC = "0" if os.environ.get("VARLEN_RNN_TENSOR_CORES") == "0" else "1"
CHILD_ENV = {
    "persistent": {"VARLEN_RNN_CUDA_PATH": "persistent", "VARLEN_RNN_TENSOR_CORES": _TC},
    "persistent_exact": {"VARLEN_RNN_CUDA_PATH": "persistent", "VARLEN_RNN_TENSOR_CORES": "0"},
    # the exact kernels with the tagged exchange (no grid barrier per forward step; launch.h)
    "persistent_tagged": {
        "VARLEN_RNN_CUDA_PATH": "persistent",
        "VARLEN_RNN_TENSOR_CORES": "0",
        "VARLEN_RNN_EXCHANGE": "tagged",
    },
    # the exact kernels, every row in each block (no row slices; plan.h)
    "persistent_unsliced": {
        "VARLEN_RNN_CUDA_PATH": "persistent",
        "VARLEN_RNN_TENSOR_CORES": "0",
        "VARLEN_RNN_PERSISTENT_ROW_SLICES": "1",
    },
    "fallback": {"VARLEN_RNN_CUDA_PATH": "fallback"},
    "auto": {"VARLEN_RNN_CUDA_PATH": "auto"},
    "cudnn": {},
}


def parse_ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def probe_lengths(B: int, H: int, T: int) -> torch.Tensor:
    """The lengths [B] of configuration (B, H): uniform in [1, T], seeded, so every child times
    the same batch and gpu_calibrate.py can rebuild the steps each path ran."""
    return torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(B * 7919 + H))


def device_facts(device: str) -> dict:
    """What plan.h's cut and cost model read of the device (gpu_calibrate.py rebuilds them)."""
    if not device.startswith("cuda"):
        return {"name": "CPU"}
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "name": p.name,
        "sms": p.multi_processor_count,
        "capability": [p.major, p.minor],
        "smem_per_block_optin": getattr(p, "shared_memory_per_block_optin", None),
    }


def build(impl: str, B: int, H: int, T: int, dtype: str, device: str, one_step: bool = False):
    """Module, two input sets [T, B, H], lengths [B] (CPU and device), loss weights. one_step:
    every length 1 (the same padded input, so the call's fixed work is the full call's)."""
    import varlen_rnn

    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    ref = torch.nn.GRU(H, H).to(device, dt)
    if impl in OURS:
        mod = varlen_rnn.GRU(H, H, device=device, dtype=dt)
        mod.load_state_dict(ref.state_dict())
    else:
        mod = ref
    lengths = torch.ones(B, dtype=torch.int64) if one_step else probe_lengths(B, H, T)
    # Drawn on the device (seeded: every child gets the same data); a CPU draw of B=256 x H=1024
    # inputs would cost seconds per configuration.
    g = torch.Generator(device).manual_seed(B * 7919 + H)
    xs = [torch.randn(T, B, H, generator=g, device=device, dtype=dt) for _ in range(2)]
    w_out = torch.randn(T, B, H, generator=g, device=device, dtype=dt)
    w_h = torch.randn(1, B, H, generator=g, device=device, dtype=dt)
    return mod, xs, lengths, lengths.to(device), w_out, w_h


def step_fn(impl: str, mode: str, mod, xs, lengths, lengths_dev, w_out, w_h, T: int):
    """fn(k) runs one step on input set k."""

    def forward(x):
        if impl in OURS:
            return mod(x, lengths=lengths_dev)
        out, h = mod(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return pad_packed_sequence(out, total_length=T)[0], h

    if mode == "fwd":

        def fwd(k):
            with torch.inference_mode():
                forward(xs[k])

        return fwd
    xs_grad = [x.detach().clone().requires_grad_() for x in xs]
    params = list(mod.parameters())

    def train(k):
        for p in params:
            p.grad = None
        out, h = forward(xs_grad[k])
        ((out * w_out).sum() + (h * w_h).sum()).backward()

    return train


def time_fn(
    fn, device: str, min_time: float, min_reps: int = 3, max_reps: int = 100
) -> list[float]:
    """Milliseconds per call: CUDA events around each call on the current stream (host clock on
    the CPU), after two warm-up calls; calls continue until min_time seconds have passed."""
    cuda = device.startswith("cuda")
    fn(0)
    fn(1)
    if cuda:
        torch.cuda.synchronize()
    times, pairs, t0 = [], [], time.perf_counter()
    k = 0
    while k < max_reps and (k < min_reps or time.perf_counter() - t0 < min_time):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(k % 2)
            end.record()
            pairs.append((start, end))
            if k % 8 == 7:  # bound the queue, and let the host clock see the device's progress
                end.synchronize()
        else:
            s = time.perf_counter()
            fn(k % 2)
            times.append((time.perf_counter() - s) * 1e3)
        k += 1
    if cuda:
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in pairs]
    return times


def child(impl: str, a, out: str, deadline: Deadline) -> int:
    res = {
        "impl": impl,
        "env_path": os.environ.get("VARLEN_RNN_CUDA_PATH"),
        "env_tensor_cores": os.environ.get("VARLEN_RNN_TENSOR_CORES"),
        "flags": {
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.enabled": torch.backends.cudnn.enabled,
        },
        "T": a.T,
        "results": [],
        "one_step": [],
        "not_reached": 0,
    }
    configs = [
        (H, d, m, B)
        for H in parse_ints(a.H)
        for d in a.dtypes.split(",")
        for m in a.modes.split(",")
        for B in parse_ints(a.B)
    ]
    # Then the one-step calls (every length 1: the call's fixed cost), where asked for.
    one = [] if impl not in ONE_STEP_IMPLS else parse_ints(a.one_step)
    configs += [(H, "float32", "fwd", B, True) for H in parse_ints(a.H) for B in one]
    for H, dtype, mode, B, *short in configs:
        if deadline.left() < 2 * a.min_time + 1:
            res["not_reached"] += 1
            continue
        r = {"H": H, "dtype": dtype, "mode": mode, "B": B}
        parts = None
        try:
            parts = build(impl, B, H, a.T, dtype, a.device, one_step=bool(short))
            ts = time_fn(step_fn(impl, mode, *parts, a.T), a.device, a.min_time)
            q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
            r.update(median_ms=statistics.median(ts), iqr_ms=q[2] - q[0], reps=len(ts))
            print(
                f"{impl} H={H} {dtype} {mode} B={B}{' one step' if short else ''}: "
                f"{r['median_ms']:.3f} ms",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001  e.g. a shape the persistent path refuses: recorded, not fatal
            r["error"] = f"{type(e).__name__}: {e}"[:300]
            print(f"{impl} H={H} {dtype} {mode} B={B}: ERROR {r['error']}", flush=True)
        res["one_step" if short else "results"].append(r)
        del parts
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, out)
    return 0


def crossovers(table: dict, Bs: list[int], persistent: str = "persistent") -> dict:
    """{(H, dtype, mode): (B, text)}: the smallest B at which `persistent` (an implementation's
    name) is no longer faster than fallback ("none" if it wins at every B measured), with the
    ratio persistent/fallback per B."""
    out = {}
    for key in sorted({k[:3] for k in table}):
        ratios, cross = [], "none"
        for B in Bs:
            t = table.get((*key, B), {})
            p, f = t.get(persistent), t.get("fallback")
            if p is None or f is None:
                ratios.append(f"B{B} -")
                continue
            ratios.append(f"B{B} {p / f:.2f}")
            if p >= f and cross == "none":
                cross = str(B)
        out[key] = (cross, ", ".join(ratios))
    return out


def render(merged: dict, impls: list[str], Bs: list[int], T: int) -> tuple[str, str]:
    """(markdown, KEY line)."""
    table = {}
    for impl, res in merged.items():
        for r in res.get("results", []):
            if "median_ms" in r:
                table.setdefault((r["H"], r["dtype"], r["mode"], r["B"]), {})[impl] = r["median_ms"]
    ours = [i for i in impls if i in OURS]
    lines = [
        "| H | dtype | mode | B | "
        + " | ".join(f"{i} ms" for i in impls)
        + " | best ours vs cudnn | best ours µs/step (steps) |",
        "|---|---|---|---|" + "---:|" * len(impls) + "---:|---:|",
    ]
    for key in sorted(table):
        t = table[key]
        cells = [f"{t[i]:.3f}" if i in t else "-" for i in impls]
        best = min((t[i] for i in ours if i in t), default=None)
        speed = f"{t['cudnn'] / best:.2f}x" if best and "cudnn" in t else "-"
        # per step of the recurrence: the longest of the configuration's lengths, not T
        steps = int(probe_lengths(key[3], key[0], T).max())
        step = f"{best * 1e3 / steps:.1f}" if best else "-"
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | "
            + " | ".join(cells)
            + f" | {speed} | {step} ({steps}) |"
        )
    lines += [
        "",
        (
            "Crossover (smallest B where persistent is not faster than fallback; "
            "persistent/fallback time per B), `persistent` on tensor cores where allowed, "
            "`persistent_exact` with VARLEN_RNN_TENSOR_CORES=0, `persistent_tagged` with "
            "VARLEN_RNN_EXCHANGE=tagged too, `persistent_unsliced` the exact kernels with "
            "VARLEN_RNN_PERSISTENT_ROW_SLICES=1:"
        ),
        "",
    ]
    first = Bs[0] if Bs else None
    cross = {v: crossovers(table, Bs, v) for v in PERSISTENT if v in impls}
    for v, cv in cross.items():
        lines += [
            f"- H={k[0]} {k[1]} {k[2]}, {v}: B={c}"
            + (
                " (never faster)"
                if c == str(first)
                else " (faster at every B)"
                if c == "none"
                else ""
            )
            + f"; {r}"
            for k, (c, r) in cv.items()
        ]
    for impl, res in merged.items():
        errs = [r for r in res.get("results", []) if "error" in r]
        if errs:
            lines.append(f"- {impl}: {len(errs)} configs raised, e.g. {errs[0]['error']}")
        if res.get("not_reached"):
            lines.append(f"- {impl}: {res['not_reached']} configs not reached in its time share")
    short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}
    tag = {
        "persistent": "tc",
        "persistent_exact": "exact",
        "persistent_tagged": "tagged",
        "persistent_unsliced": "unsliced",
    }
    key_line = "KEY: crossover B " + (
        "; ".join(
            f"{tag[v]} H{k[0]} {short.get(k[1], k[1])} {k[2]} {c}"
            for v, cv in cross.items()
            for k, (c, _) in cv.items()
        )
        or "none measured"
    )
    return "\n".join(lines), key_line


def one_step_section(merged: dict, T: int) -> tuple[str, str]:
    """(markdown, KEY line) of the one-step calls: a call's fixed cost (every length 1, the
    same padded input: the launches, the input projection, the host's work), and the time of a
    step beside it, (full call - one-step call) / (steps - 1), from the forward of the same H
    and B in the main table. Empty where none was timed."""
    rows, keys = [], []
    for impl, res in merged.items():
        full = {
            (r["H"], r["B"]): r["median_ms"]
            for r in res.get("results", [])
            if "median_ms" in r and r["mode"] == "fwd" and r["dtype"] == "float32"
        }
        for r in res.get("one_step", []):
            if "median_ms" not in r:
                continue
            H, B, one = r["H"], r["B"], r["median_ms"]
            steps = int(probe_lengths(B, H, T).max())
            t = full.get((H, B))
            per_step = f"{(t - one) * 1e3 / (steps - 1):.2f}" if t and steps > 1 else "-"
            share = f"{one / t:.0%}" if t else "-"
            rows.append(
                f"| {impl} | {H} | {B} | {one:.3f} | "
                + (f"{t:.3f} ({steps})" if t else "-")
                + f" | {share} | {per_step} |"
            )
            keys.append(f"{impl} H{H} B{B} {one * 1e3:.0f} us")
    if not rows:
        return "", ""
    lines = [
        "## One-step calls: a call's fixed cost",
        "",
        "float32 forward (inference), every length 1, the same padded input [T, B, H]: what a "
        "call costs apart from its steps. µs/step: (full call - one-step call) / (steps - 1).",
        "",
        "| impl | H | B | one step ms | full call ms (steps) | fixed share | µs/step |",
        "|---|---|---|---:|---:|---:|---:|",
        *sorted(rows),
    ]
    return "\n".join(lines), "KEY: one-step call " + "; ".join(sorted(keys))


def compare(merged: dict, previous: dict, source: str) -> tuple[str, str]:
    """(markdown, KEY line): each implementation's medians against a previous probe's (another
    commit's kernels on the same configurations): previous ms, now ms, previous / now (above 1:
    faster now)."""
    prev_dev = previous.get("device", {}).get("name", "?")
    prev = {}
    for impl, res in previous.get("children", {}).items():
        for r in res.get("results", []):
            if "median_ms" in r:
                prev[(impl, r["H"], r["dtype"], r["mode"], r["B"])] = r["median_ms"]
    rows, ratios = [], {}
    for impl, res in merged.items():
        for r in res.get("results", []):
            k = (impl, r["H"], r["dtype"], r["mode"], r["B"])
            if "median_ms" in r and k in prev:
                ratio = prev[k] / r["median_ms"]
                ratios.setdefault(impl, []).append(ratio)
                rows.append(
                    f"| {impl} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {prev[k]:.3f} | "
                    f"{r['median_ms']:.3f} | {ratio:.2f}x |"
                )
    commit = previous.get("commit") or "its commit in the folder's README"
    head = f"## Against the previous probe (`{source}`: {prev_dev}, {commit})"
    if not rows:
        return head + "\n\nNo configuration in common.\n", "KEY: vs previous probe: none in common"
    lines = [
        head,
        "",
        "previous / now: above 1, faster now. The cuDNN recipe's row shows the two runs' noise.",
        "",
        "| impl | H | dtype | mode | B | previous ms | now ms | previous / now |",
        "|---|---|---|---|---|---:|---:|---:|",
        *sorted(rows),
    ]
    key = "KEY: vs previous probe, median (range) of previous / now: " + "; ".join(
        f"{i} {statistics.median(v):.2f}x ({min(v):.2f}-{max(v):.2f})"
        for i, v in sorted(ratios.items())
    )
    return "\n".join(lines) + "\n", key


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--B", default="1,8,64,256", help="batch sizes, comma-separated")
    p.add_argument(
        "--H", default=None, help="hidden sizes (I = H), comma-separated (default 256,1024)"
    )
    p.add_argument("--T", type=int, default=256, help="padded length; lengths uniform in [1, T]")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--modes", default="fwd,train", help="fwd (inference) and/or train (fwd+bwd)")
    p.add_argument(
        "--impls",
        default="persistent,persistent_exact,persistent_tagged,persistent_unsliced,fallback,cudnn",
        help="persistent (tensor cores where allowed), persistent_exact (without), "
        "persistent_tagged (without, VARLEN_RNN_EXCHANGE=tagged), persistent_unsliced (without, "
        "VARLEN_RNN_PERSISTENT_ROW_SLICES=1), fallback, auto (our paths) "
        "and cudnn (nn.GRU + packing)",
    )
    p.add_argument(
        "--one-step",
        default="1,8",
        help="batch sizes of float32 forward calls with every length 1, timed on "
        f"{', '.join(ONE_STEP_IMPLS)}: a call's fixed cost, apart from its steps ('' for none)",
    )
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timed calls per config")
    p.add_argument("--time-budget", type=float, default=90.0, help="seconds for all children")
    p.add_argument(
        "--tiny", action="store_true", help="B 1,4 T 16, H 16,32 unless given: a dry run"
    )
    p.add_argument(
        "--out", default=None, help="folder for probe.json, probe.md, the children's logs"
    )
    p.add_argument(
        "--previous",
        default=None,
        help="a previous probe.json: each configuration's time against it (probe.md's last section)",
    )
    p.add_argument("--commit", default=None, help="the commit measured, for probe.json")
    p.add_argument("--child", default=None, help="run one implementation (internal)")
    p.add_argument("--json", default=None, help="the child's result file (internal)")
    a = p.parse_args(argv)
    if a.tiny:
        a.B, a.T, a.min_time, a.one_step = "1,4", 16, 0.02, "1"
    a.H = a.H or ("16,32" if a.tiny else "256,1024")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error(
            "--device cuda but torch.cuda.is_available() is False (use --device cpu for a dry run)"
        )
    impls = a.impls.split(",")
    bad = [i for i in impls if i not in (*OURS, "cudnn")]
    if bad:
        p.error(f"--impls must be among {(*OURS, 'cudnn')}, got {bad}")
    if a.child:
        return child(a.child, a, a.json, Deadline(a.time_budget))

    out_dir = a.out or tempfile.mkdtemp(prefix="gpu_probe")
    os.makedirs(out_dir, exist_ok=True)
    deadline = Deadline(a.time_budget)
    merged = {}
    with open(os.path.join(out_dir, "children.log"), "w") as log:
        for i, impl in enumerate(impls):
            share = deadline.share(len(impls) - i)
            js = os.path.join(out_dir, f"{impl}.json")
            args = [
                os.path.abspath(__file__),
                "--child",
                impl,
                "--json",
                js,
                "--device",
                a.device,
                "--B",
                a.B,
                "--H",
                a.H,
                "--T",
                str(a.T),
                "--dtypes",
                a.dtypes,
                "--modes",
                a.modes,
                "--min-time",
                str(a.min_time),
                "--one-step",
                a.one_step,
                "--time-budget",
                str(max(1.0, share - 3)),
            ]
            env = CHILD_ENV[impl]
            r = run_child(args, share, env, log)
            print(f"child {impl}: {r['status']} ({r['seconds']:.0f}s)", flush=True)
            if r["status"] != "ok":
                print("    " + r["tail"][-1000:].replace("\n", "\n    "), flush=True)
            if os.path.exists(js):
                with open(js) as f:
                    merged[impl] = json.load(f)
                merged[impl]["child_status"] = r["status"]
            else:
                merged[impl] = {"child_status": r["status"]}
    md, key = render(merged, impls, parse_ints(a.B), a.T)
    flags = next((m["flags"] for m in merged.values() if "flags" in m), {})
    head = (
        f"# Timing probe: T={a.T}, lengths uniform in [1, T], I=H, 1 layer, device {a.device}"
        f" ({torch.cuda.get_device_name() if a.device == 'cuda' else 'CPU'}), torch "
        f"{torch.__version__}, flags {flags}\n\n"
    )
    if os.environ.get("VARLEN_RNN_TENSOR_CORES") == "0":
        head += (
            "**VARLEN_RNN_TENSOR_CORES=0 in the probe's environment: `persistent` ran without "
            "tensor cores too.**\n\n"
        )
    keys = [key]
    one_md, one_key = one_step_section(merged, a.T)
    if one_md:
        md += "\n\n" + one_md
        keys.append(one_key)
    if a.previous:
        with open(a.previous) as f:
            vs_md, vs_key = compare(merged, json.load(f), a.previous)
        md += "\n\n" + vs_md
        keys.append(vs_key)
    with open(os.path.join(out_dir, "probe.md"), "w") as f:
        f.write(head + md + "\n")
    with open(os.path.join(out_dir, "probe.json"), "w") as f:
        json.dump(
            {
                "args": vars(a),
                "device": device_facts(a.device),
                "commit": a.commit,
                # The persistent kernels split rows between blocks by plan.h's model (row
                # slices); a probe without this key timed kernels from before them, every row in
                # each block (gpu_calibrate.py models it so).
                "row_slices": "model",
                "children": merged,
            },
            f,
            indent=1,
        )
    print(head + md)
    print("\n".join(keys))
    return 0 if all(m.get("child_status") == "ok" for m in merged.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
