"""The training step when autograd wants only some gradients (the backward ops' output_mask):
all of them ("full"), the input as data ("data_input": no input gradient) and frozen weights
("frozen": the input's gradient only, as for saliency maps or adversarial inputs), for
varlen_rnn and for nn + pack_padded_sequence on the same inputs, float32, lengths uniform in
[1, T]. Medians of torch.utils.benchmark, the cases interleaved; a markdown table on stdout and
in benchmarks/results/grad-mask_cpu_<date>.md.

    python benchmarks/bench_grad_mask.py --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkout  # noqa: E402

checkout.put_varlen_rnn_on_path()  # the checkout's build if built in place, else the installed
import varlen_rnn  # noqa: E402

SHAPES = [("GRU", 64, 100, 256, 256), ("LSTM", 64, 100, 256, 256), ("GRU", 16, 200, 256, 512)]
CASES = {"full": (True, True), "data_input": (False, True), "frozen": (True, False)}


def step_of(module, x, lengths, packed: bool):
    T = x.shape[0]

    def step():
        if packed:
            p = pack_padded_sequence(x, lengths, enforce_sorted=False)
            out, _ = pad_packed_sequence(module(p)[0], total_length=T)
        else:
            out, _ = module(x, lengths=lengths)
        out.sum().backward()

    return step


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-run-time", type=float, default=2.0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--quick", action="store_true", help="tiny shapes, a smoke test")
    args = p.parse_args(argv)
    shapes = [("GRU", 3, 4, 2, 5), ("LSTM", 3, 4, 2, 5)] if args.quick else SHAPES
    torch.set_num_threads(args.threads)
    rows = []
    for cell, B, T, I, H in shapes:
        torch.manual_seed(0)
        ref = getattr(torch.nn, cell)(I, H)
        ours = getattr(varlen_rnn, cell).from_torch(ref)
        g = torch.Generator().manual_seed(1)
        x0 = torch.randn(T, B, I, generator=g)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
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
                print(f"{cell} B={B} T={T} H={H} {case} {name}: {times[case, name] * 1e3:.1f} ms")
        rows.append((f"{cell} B={B} T={T} I={I} H={H}", times))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=checkout.ROOT
    ).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        "# Training step with some gradients not wanted (output_mask)",
        "",
        f"{args.threads} threads; torch {torch.__version__}; {now.isoformat(timespec='seconds')};"
        f" commit {commit}; load average {os.getloadavg()[0]:.1f}",
        "",
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
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"grad-mask_cpu_{now.strftime('%Y%m%d-%H%M%S')}.md")
    with open(path, "w") as f:
        f.write(text)
    print("wrote", path)
    return path


if __name__ == "__main__":
    main()
