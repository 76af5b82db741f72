"""Where a step's time and memory go: torch.profiler tables for the baseline and varlen_rnn.

    python benchmarks/bench_profile.py [--B 64 --T 100 --I 256 --H 256 --layers 1 --bi --cell gru]
        [--mode train|infer] [--competitors baseline,varlen] [--threads 2] [--rows 12]

Prints, per competitor, the ops by self CPU time and by self CPU memory (allocated minus freed
inside the op: a large positive number is what the op leaves allocated, e.g. saved for backward).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import checkout  # noqa: E402

checkout.put_varlen_rnn_on_path()

from bench_cases import Bench, add_case_arguments, case_from_arguments  # noqa: E402
from bench_memory import _quiet_stderr  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_case_arguments(p)
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument("--competitors", default="baseline,varlen")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=12)
    a = p.parse_args(argv)
    case = case_from_arguments(a, a.device)
    bench = Bench(case)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device.startswith("cuda") else [])
    for name in a.competitors.split(","):
        step = bench.step(a.mode, name)
        for _ in range(3):
            step()
        with _quiet_stderr(), profile(activities=acts, profile_memory=True) as prof:
            for _ in range(3):
                step()
        avg = prof.key_averages()
        print(f"\n===== {name}: {case.name()} {a.mode} ({a.threads} threads), 3 steps =====")
        print(avg.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=48))
        print(avg.table(sort_by="self_cpu_memory_usage", row_limit=6, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    sys.exit(main())
