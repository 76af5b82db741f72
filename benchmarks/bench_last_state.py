"""The classifier's training step: the loss reads only each sequence's last state (h_n[-1], as
the README's example and the demo do), so the layer's output gets no gradient. For varlen_rnn and
for nn + pack_padded_sequence on the same inputs, float32, lengths uniform in [1, T]: the median
time of a step (torch.utils.benchmark) and its peak memory (bench_memory.cpu_peak: the most bytes
torch's tensors held at once, measured after every timing, as the profiler slows later ops). A
markdown table on stdout and in benchmarks/results/last-state_cpu_<date>.md.

    python benchmarks/bench_last_state.py --threads 2
"""

from __future__ import annotations

import os
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402
import checkout  # noqa: E402

checkout.put_varlen_rnn_on_path()  # the checkout's build if built in place, else the installed
import bench_memory  # noqa: E402
import step_cases  # noqa: E402

SHAPES = [
    ("GRU", 64, 100, 256, 256),
    ("LSTM", 64, 100, 256, 256),
    ("RNN", 64, 100, 256, 256),
    ("GRU", 16, 200, 256, 512),
]


def step_of(module, x, lengths, w, packed: bool):
    """One training step of a classifier over h_n[-1]: (h_n[-1] * w).sum(), w [B, H] fixed."""

    def step():
        for p in module.parameters():
            p.grad = None
        if packed:
            _, state = module(pack_padded_sequence(x, lengths, enforce_sorted=False))
        else:
            _, state = module(x, lengths=lengths)
        h_n = state[0] if isinstance(state, tuple) else state  # the LSTM's (h_n, c_n)
        (h_n[-1] * w).sum().backward()

    step.reset = lambda: [setattr(p, "grad", None) for p in module.parameters()]
    return step


def main(argv=None):
    args = step_cases.parser(__doc__).parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = []
    for label, ref, ours, x, lengths in step_cases.cases(
        step_cases.QUICK if args.quick else SHAPES
    ):
        w = torch.randn(x.shape[1], ref.hidden_size, generator=torch.Generator().manual_seed(2))
        for name, module in (("nn", ref), ("ours", ours)):
            steps.append((label, name, step_of(module, x, lengths, w, packed=name == "nn")))
    times, peaks = {}, {}
    for label, name, step in steps:
        step()  # one-time allocations (thread pools, oneDNN primitives) are not a step's
        t = Timer("step()", globals={"step": step}, num_threads=args.threads)
        times[label, name] = t.blocked_autorange(min_run_time=args.min_run_time).median
        print(f"{label} {name}: {times[label, name] * 1e3:.1f} ms", flush=True)
    for label, name, step in steps:
        peaks[label, name] = bench_memory.cpu_peak(step)
        print(f"{label} {name}: peak {peaks[label, name] / 2**20:.1f} MiB", flush=True)
    labels = list(dict.fromkeys(label for label, _, _ in steps))
    lines = [
        "One training step of a classifier that reads only h_n[-1]: median ms, and the peak of",
        "torch's CPU tensors during the step (MiB, above what the step starts with).",
        "",
        "| case | nn + packing: ms | varlen_rnn: ms | speed-up | nn + packing: peak MiB"
        " | varlen_rnn: peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for label in labels:
        tn, to = times[label, "nn"], times[label, "ours"]
        pn, po = peaks[label, "nn"] / 2**20, peaks[label, "ours"] / 2**20
        lines.append(
            f"| {label} | {tn * 1e3:.1f} | {to * 1e3:.1f} | {tn / to:.2f}x | {pn:.1f} | {po:.1f} |"
        )
    return bench_report.write_table(
        args.out,
        "last-state",
        "Training step of a classifier over the last state (the output unused)",
        args.threads,
        lines,
    )


if __name__ == "__main__":
    main()
