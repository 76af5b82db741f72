"""What splitting the batch's rows between teams of threads does to the CPU split step loops
(csrc/cpu/team.h team_layout): varlen_rnn with VARLEN_RNN_CPU_ROW_GROUPS=1 (one team of all
threads, which split the hidden units and meet at a barrier each step), =threads (one group per
thread, each running its own rows with no barrier) and unset (the library's rule), alternating
in one process (the setting is read at every call), with torch.nn beside them as the reference.
Per case: the median time of a training step (forward + out.sum().backward()) and of an
inference call, the minimum over the rounds of each setting's median.

    python benchmarks/bench_row_groups.py [--threads 2] [--rounds 3] [--min-run-time 0.4]

Cases with lengths uniform in [1, T] compare with nn + pack_padded_sequence; full-length cases
with nn without lengths (correct there). The split loops are forced (VARLEN_RNN_CPU_STEPS=split)
so every case compares the two layouts of the same loop. A markdown table on stdout and in
benchmarks/results/row-groups_cpu_<date>.md.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import checkout  # noqa: E402

checkout.put_varlen_rnn_on_path()

import step_cases  # noqa: E402

# (cell, B, T, I, H, lengths, dtype): small to large H on both sides of the rule's 1 MiB of
# W_hh, batches from 16 to 256 rows.
CASES = [
    ("LSTM", 256, 200, 32, 32, "full", "float32"),
    ("GRU", 256, 200, 32, 32, "full", "float32"),
    ("LSTM", 32, 300, 48, 48, "full", "float32"),
    ("GRU", 256, 100, 64, 64, "uniform", "float32"),
    ("LSTM", 128, 50, 128, 128, "uniform", "float32"),
    ("GRU", 64, 100, 256, 256, "uniform", "float32"),
    ("LSTM", 64, 100, 256, 256, "uniform", "float32"),
    ("GRU", 16, 50, 256, 256, "full", "float32"),
    ("GRU", 16, 100, 512, 512, "uniform", "float32"),
    ("LSTM", 8, 50, 1024, 1024, "full", "float32"),
    ("GRU", 128, 50, 128, 128, "uniform", "bfloat16"),
    ("LSTM", 64, 100, 256, 256, "uniform", "bfloat16"),
]
QUICK = [("GRU", 9, 4, 2, 5, "uniform", "float32"), ("LSTM", 9, 4, 2, 5, "full", "bfloat16")]


def label(case) -> str:
    cell, B, T, I, H, dist, dtype = case
    return f"{cell} B={B} T={T} I={I} H={H}, {dist} lengths, {dtype}"


def measure(threads: int, rounds: int, min_run_time: float, cases) -> dict:
    """{label: {mode: {setting: seconds}}}; settings "nn", "1", str(threads), "rule"."""
    import torch
    from torch.utils.benchmark import Timer

    import varlen_rnn

    torch.set_num_threads(threads)
    settings = ["1", str(threads), "rule"]
    old = {k: os.environ.get(k) for k in ("VARLEN_RNN_CPU_ROW_GROUPS", "VARLEN_RNN_CPU_STEPS")}
    os.environ["VARLEN_RNN_CPU_STEPS"] = "split"
    out = {}
    try:
        for case in cases:
            cell, B, T, I, H, dist, dtype = case
            dt = getattr(torch, dtype)
            torch.manual_seed(0)
            ref = getattr(torch.nn, cell)(I, H).to(dt)
            ours = getattr(varlen_rnn, cell).from_torch(ref)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(T, B, I, generator=g).to(dt)
            lengths = None
            if dist == "uniform":
                lengths = torch.randint(1, T + 1, (B,), generator=g)
                lengths[0] = T
            xg = x.clone().requires_grad_()

            def fns(m, packed):
                def train():
                    if lengths is None:
                        m(xg)[0].float().sum().backward()
                    else:
                        step_cases.padded_output(m, xg, lengths, packed).float().sum().backward()

                def infer():
                    with torch.inference_mode():
                        if lengths is None:
                            m(x)
                        else:
                            step_cases.padded_output(m, x, lengths, packed)

                return {"train": train, "infer": infer}

            nn_fns, our_fns = fns(ref, lengths is not None), fns(ours, False)
            res = {}
            for mode in ("train", "infer"):
                times = {s: [] for s in ["nn", *settings]}
                for _ in range(rounds):
                    for s in ["nn", *settings]:
                        if s == "rule":
                            os.environ.pop("VARLEN_RNN_CPU_ROW_GROUPS", None)
                        elif s != "nn":
                            os.environ["VARLEN_RNN_CPU_ROW_GROUPS"] = s
                        fn = nn_fns[mode] if s == "nn" else our_fns[mode]
                        t = Timer("fn()", globals={"fn": fn}, num_threads=threads)
                        times[s].append(t.blocked_autorange(min_run_time=min_run_time).median)
                res[mode] = {s: min(v) for s, v in times.items()}
            out[label(case)] = res
            print(f"{label(case)}: done", flush=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def main(argv=None) -> str:
    p = step_cases.parser(__doc__)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per setting")
    p.set_defaults(min_run_time=0.4)
    args = p.parse_args(argv)
    import bench_report

    cases = QUICK if args.quick else CASES
    res = measure(args.threads, args.rounds, args.min_run_time, cases)
    n = str(args.threads)
    lines = [
        f"Minimum over {args.rounds} alternating rounds of each setting's torch.utils.benchmark",
        "median (ms); the split loops forced. one team: VARLEN_RNN_CPU_ROW_GROUPS=1; groups:",
        f"={n} (one per thread); rule: unset (groups where W_hh is at most 1 MiB and each group",
        "has 8 rows). nn: without lengths at full lengths, nn + packing otherwise.",
        "",
        f"| case | mode | nn ms | one team ms | {n} groups ms (vs one team) | rule ms |",
        "|---|---|---|---|---|---|",
    ]
    for case in map(label, cases):
        for mode in ("train", "infer"):
            r = res[case][mode]
            lines.append(
                f"| {case} | {mode} | {r['nn'] * 1e3:.2f} | {r['1'] * 1e3:.2f} |"
                f" {r[n] * 1e3:.2f} ({r['1'] / r[n]:.2f}x) | {r['rule'] * 1e3:.2f} |"
            )
    return bench_report.write_table(
        args.out,
        "row-groups",
        "CPU split loops: rows split between teams (VARLEN_RNN_CPU_ROW_GROUPS=1 vs threads vs the rule)",
        args.threads,
        lines,
    )


if __name__ == "__main__":
    main()
