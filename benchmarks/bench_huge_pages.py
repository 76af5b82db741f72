"""What advising the CPU ops' large buffers for transparent huge pages (csrc/cpu/large_tensors.h)
does to a call: varlen_rnn with VARLEN_RNN_CPU_HUGE_PAGES=0 (every buffer in 4 KiB pages) against
=1 (the default), in alternating worker processes (advice given in one process outlives its
buffers, so the two settings never share one), with torch.nn measured beside them in each worker
as the reference. Per case: the median time of a training step (forward + out.sum().backward())
and of an inference call, and the minor page faults per call (getrusage), the mechanism itself.

    python benchmarks/bench_huge_pages.py [--threads 2] [--rounds 3] [--min-run-time 1]

Cases with lengths uniform in [1, T] compare with nn + pack_padded_sequence; full-length cases with
nn without lengths (correct there, and what a user swapping modules runs). A markdown table on
stdout and in benchmarks/results/huge-pages_cpu_<date>.md, with the kernel's THP settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import checkout  # noqa: E402

checkout.put_varlen_rnn_on_path()

import step_cases  # noqa: E402

# (cell, B, T, I, H, lengths): two of the CPU tables' cases and a small call, whose buffers are
# all under the 32 MiB from which the ops advise (controls), and full-length batches whose
# largest buffers are over it
CASES = [
    ("GRU", 64, 100, 256, 256, "uniform"),
    ("GRU", 16, 200, 256, 512, "uniform"),
    ("GRU", 512, 50, 128, 128, "full"),
    ("LSTM", 512, 50, 128, 128, "full"),
    ("GRU", 128, 200, 256, 256, "full"),
    ("LSTM", 256, 200, 32, 32, "full"),
    ("GRU", 8, 16, 256, 256, "uniform"),
]
QUICK = [("GRU", 3, 4, 2, 5, "uniform"), ("LSTM", 3, 4, 2, 5, "full")]  # a smoke test's
SETTINGS = ("0", "1")


def label(case) -> str:
    cell, B, T, I, H, dist = case
    return f"{cell} B={B} T={T} I={I} H={H}, {dist} lengths"


def worker(threads: int, min_run_time: float, cases) -> None:
    """One setting (from the environment), every case: prints one JSON line."""
    import resource

    import torch
    from torch.utils.benchmark import Timer

    import varlen_rnn

    torch.set_num_threads(threads)
    out = {}
    for case in cases:
        cell, B, T, I, H, dist = case
        torch.manual_seed(0)
        ref = getattr(torch.nn, cell)(I, H)
        ours = getattr(varlen_rnn, cell).from_torch(ref)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(T, B, I, generator=g)
        if dist == "uniform":
            lengths = torch.randint(1, T + 1, (B,), generator=g)
            lengths[0] = T
        else:
            lengths = None
        xg = x.clone().requires_grad_()
        res = {}
        for name, module in (("nn", ref), ("ours", ours)):
            packed = name == "nn" and lengths is not None

            def train(m=module, packed=packed):
                if lengths is None:
                    m(xg)[0].sum().backward()
                else:
                    step_cases.padded_output(m, xg, lengths, packed).sum().backward()

            def infer(m=module, packed=packed):
                with torch.inference_mode():
                    if lengths is None:
                        m(x)
                    else:
                        step_cases.padded_output(m, x, lengths, packed)

            for mode, fn in (("train", train), ("infer", infer)):
                t = Timer("fn()", globals={"fn": fn}, num_threads=threads)
                m = t.blocked_autorange(min_run_time=min_run_time)
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                for _ in range(5):
                    fn()
                faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
                res[f"{name} {mode}"] = (m.median, faults)
        out[label(case)] = res
    print(json.dumps(out))


def thp_settings() -> str:
    parts = []
    for name in ("enabled", "defrag"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
                parts.append(f"{name} {f.read().strip()}")
        except OSError:
            parts.append(f"{name} unknown")
    return "; ".join(parts)


def main(argv=None) -> str:
    p = step_cases.parser(__doc__)
    p.add_argument("--rounds", type=int, default=3, help="worker runs per setting, alternating")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one setting's run
    args = p.parse_args(argv)
    cases = QUICK if args.quick else CASES
    if args.worker:
        worker(args.threads, args.min_run_time, cases)
        return ""
    import statistics

    import bench_report

    runs = {s: [] for s in SETTINGS}
    for r in range(args.rounds):
        for s in SETTINGS:
            env = dict(os.environ, VARLEN_RNN_CPU_HUGE_PAGES=s)
            cmd = [sys.executable, os.path.abspath(__file__), "--worker"]
            cmd += ["--threads", str(args.threads), "--min-run-time", str(args.min_run_time)]
            cmd += ["--quick"] if args.quick else []
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"worker failed:\n{done.stderr[-3000:]}")
            runs[s].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds}, VARLEN_RNN_CPU_HUGE_PAGES={s}: done", flush=True)

    def med(s, case, key, i):
        return statistics.median(run[case][key][i] for run in runs[s])

    lines = [
        f"Kernel THP settings: {thp_settings()}. Medians over {args.rounds} worker runs per",
        "setting (each a torch.utils.benchmark median), the settings alternating; faults: minor",
        "page faults per call. nn: the reference, measured in every worker (median of all).",
        "",
        "| case | mode | nn ms | ours, advice off → on (ms) | faults per call, off → on |"
        " vs nn, off → on |",
        "|---|---|---|---|---|---|",
    ]
    for case in map(label, cases):
        for mode in ("train", "infer"):
            nn_t = statistics.median(
                run[case][f"nn {mode}"][0] for s in SETTINGS for run in runs[s]
            )
            off, on = (med(s, case, f"ours {mode}", 0) for s in SETTINGS)
            f_off, f_on = (med(s, case, f"ours {mode}", 1) for s in SETTINGS)
            lines.append(
                f"| {case} | {mode} | {nn_t * 1e3:.2f} | {off * 1e3:.2f} → {on * 1e3:.2f}"
                f" ({off / on:.2f}x) | {f_off:.0f} → {f_on:.0f} |"
                f" {nn_t / off:.2f}x → {nn_t / on:.2f}x |"
            )
    return bench_report.write_table(
        args.out,
        "huge-pages",
        "Large CPU buffers advised for transparent huge pages (VARLEN_RNN_CPU_HUGE_PAGES=0 vs 1)",
        args.threads,
        lines,
    )


if __name__ == "__main__":
    main()
