"""The training step when autograd wants only some gradients (the backward ops' output_mask):
all of them ("full"), the input as data ("data_input": no input gradient) and frozen weights
("frozen": the input's gradient only, as for saliency maps or adversarial inputs), for
varlen_rnn and for nn + pack_padded_sequence on the same inputs, float32, lengths uniform in
[1, T]. Medians of torch.utils.benchmark, the cases interleaved; a markdown table on stdout and
in benchmarks/results/grad-mask_cpu_<date>.md.

    python benchmarks/bench_grad_mask.py --threads 2
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402
import checkout  # noqa: E402

checkout.put_varlen_rnn_on_path()  # the checkout's build if built in place, else the installed
import step_cases  # noqa: E402

SHAPES = [("GRU", 64, 100, 256, 256), ("LSTM", 64, 100, 256, 256), ("GRU", 16, 200, 256, 512)]
CASES = {"full": (True, True), "data_input": (False, True), "frozen": (True, False)}


def step_of(module, x, lengths, packed: bool):
    def step():
        step_cases.padded_output(module, x, lengths, packed).sum().backward()

    return step


def main(argv=None):
    args = step_cases.parser(__doc__).parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for label, ref, ours, x0, lengths in step_cases.cases(
        step_cases.QUICK if args.quick else SHAPES
    ):
        times = {}
        for case, (input_grad, weight_grad) in CASES.items():
            x = x0.clone().requires_grad_(input_grad)
            for name, module in (("nn", ref), ("ours", ours)):
                for q in module.parameters():
                    q.requires_grad_(weight_grad)
                    q.grad = None
                step = step_of(module, x, lengths, packed=name == "nn")
                t = Timer("step()", globals={"step": step}, num_threads=args.threads)
                times[case, name] = t.blocked_autorange(min_run_time=args.min_run_time).median
                print(f"{label} {case} {name}: {times[case, name] * 1e3:.1f} ms")
        rows.append((label, times))
    lines = [
        "Median ms per step (forward + backward of out.sum()); in brackets the time relative to",
        "the same implementation's full step.",
        "",
        "| case | nn + packing: full / data input / frozen | varlen_rnn: full / data input /"
        " frozen | varlen_rnn vs nn (full / data input / frozen) |",
        "|---|---|---|---|",
    ]
    for label, t in rows:
        cells = []
        for name in ("nn", "ours"):
            full = t["full", name]
            cells.append(
                " / ".join(
                    f"{t[c, name] * 1e3:.1f}"
                    + ("" if c == "full" else f" ({t[c, name] / full:.2f})")
                    for c in CASES
                )
            )
        ratio = " / ".join(f"{t[c, 'nn'] / t[c, 'ours']:.2f}x" for c in CASES)
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {ratio} |")
    return bench_report.write_table(
        args.out,
        "grad-mask",
        "Training step with some gradients not wanted (output_mask)",
        args.threads,
        lines,
    )


if __name__ == "__main__":
    main()
