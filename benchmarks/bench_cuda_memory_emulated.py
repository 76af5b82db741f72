"""The CUDA backend's training-step peak memory, measured without a GPU: the backend's host code
(csrc/cuda/ops_cuda.cu: its checks, the buffers it allocates, the GEMMs, the launchers) runs on
the CPU emulation (tests/emulation.py cuda_backend_on_cpu: the kernels on CPU threads, the device
a pretend one), and bench_memory.cpu_peak counts the most bytes its tensors held at once in one
forward + backward of out.sum() (lengths uniform in [1, T], one at T, float32, batch-first
input). These are the allocations a GPU would get; its caching allocator's rounding is not
counted. --commit REV measures that commit's CUDA backend (its csrc/ and tests/, exported) on the
same inputs beside this checkout's. --loss last-state: the loss is h_n[-1].sum() (a classifier's:
the output gets no gradient, None at the backward op), beside the same step given a zero tensor
for the output's gradient (what the op got before 5662507). --valid-rows: the lengths on the CPU,
which a CUDA training call runs on the valid rows only (varlen_rnn._inputs.valid_rows), beside
lengths on the GPU (the padded op). A markdown table on stdout and in
benchmarks/results/cuda-memory-emulated_cpu_<date>.md.

    python benchmarks/bench_cuda_memory_emulated.py --commit HEAD~1 [--path fallback|persistent]
    python benchmarks/bench_cuda_memory_emulated.py --loss last-state
    python benchmarks/bench_cuda_memory_emulated.py --valid-rows

Each tree is measured in a subprocess of its own (the profiler slows a process's later ops, and
each tree builds its emulation, ~1 minute).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# (cell, B, T, I, H) x directions: the CPU targets' first configuration, and a small one whose
# persistent launch fits the pretend device.
SHAPES = [("GRU", 64, 100, 256, 256), ("LSTM", 64, 100, 256, 256), ("RNN", 64, 100, 256, 256)]
QUICK = [("GRU", 4, 6, 8, 8), ("LSTM", 4, 6, 8, 8), ("RNN", 4, 6, 8, 8)]


def _worker(spec: dict) -> None:
    """Prints {label: bytes} for the CUDA backend of the tree whose tests/ is spec["tests"]."""
    sys.path.insert(0, spec["tests"])
    sys.path.insert(1, HERE)
    import checkout

    checkout.put_varlen_rnn_on_path()
    import emulation
    import torch
    from bench_memory import cpu_peak

    import varlen_rnn

    if spec.get("valid_rows"):  # the CPU stands in for CUDA: a CUDA user's CPU lengths
        varlen_rnn._inputs.VALID_ROWS_DEVICES.add("cpu")
    emu = emulation.load_emulation()
    emu.backend.set_device(8, 227 * 1024, 9)  # 8 SMs, an H100's shared memory per block
    emu.backend.set_knobs(spec["path"], 0, False, 0, True)  # tensor cores off: float32 exact
    result = {}
    for cell, B, T, I, H in spec["shapes"]:
        for D in (1, 2):
            torch.manual_seed(0)
            module = getattr(varlen_rnn, cell)(I, H, batch_first=True, bidirectional=D == 2)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(B, T, I, generator=g, requires_grad=True)
            lengths = torch.randint(1, T + 1, (B,), generator=g)
            lengths[0] = T

            def step(module=module, x=x, lengths=lengths, loss=spec["loss"]):
                out, h_n = module(x, lengths=lengths)
                if loss == "output":
                    out.sum().backward()
                    return
                h_n = h_n[0] if isinstance(h_n, tuple) else h_n  # the LSTM's (h_n, c_n)
                if loss == "last-state":  # the output unused: its gradient is None
                    h_n[-1].sum().backward()
                else:  # "last-state-zeros": a zero tensor for the output's gradient
                    torch.autograd.backward([h_n[-1].sum(), out], [None, torch.zeros_like(out)])

            def reset(module=module, x=x):
                x.grad = None
                module.zero_grad(set_to_none=True)

            step.reset = reset
            with emulation.cuda_backend_on_cpu(emu):
                step()  # lazy one-time allocations are not a step's
                result[f"{cell} B={B} T={T} I={I} H={H} D={D}"] = cpu_peak(step)
    print(json.dumps(result))


def measure(
    tests_dir: str, path: str, shapes, loss: str = "output", valid_rows: bool = False
) -> dict:
    spec = json.dumps(
        {"tests": tests_dir, "path": path, "shapes": shapes, "loss": loss, "valid_rows": valid_rows}
    )
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", spec],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export(commit: str, into: str) -> str:
    """commit's csrc/ and tests/ under into; returns its tests/."""
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", commit, "csrc", "tests"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return os.path.join(into, "tests")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--commit", help="also measure this commit's CUDA backend")
    p.add_argument("--path", default="fallback", choices=["fallback", "persistent", "auto"])
    p.add_argument("--loss", default="output", choices=["output", "last-state"])
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--quick", action="store_true", help="tiny shapes, a smoke test")
    p.add_argument(
        "--valid-rows",
        action="store_true",
        help="the same steps with the lengths on the CPU (a CUDA training call then runs on the "
        "valid rows: varlen_rnn._inputs.valid_rows) beside lengths on the GPU (the padded op)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(json.loads(args.worker))
    sys.path.insert(0, HERE)
    import checkout

    checkout.put_varlen_rnn_on_path()
    import bench_report

    shapes = QUICK if args.quick else SHAPES
    tests = os.path.join(ROOT, "tests")
    ours = measure(tests, args.path, shapes, args.loss)
    theirs, names = None, ("this checkout", args.commit)
    if args.valid_rows:
        theirs = ours
        ours = measure(tests, args.path, shapes, args.loss, valid_rows=True)
        names = ("lengths on the CPU (valid rows)", "lengths on the GPU (padded op)")
    elif args.loss == "last-state":
        theirs = measure(tests, args.path, shapes, "last-state-zeros")
        names = ("output's gradient None", "a zero tensor for it")
    elif args.commit:
        with tempfile.TemporaryDirectory() as tmp:
            theirs = measure(export(args.commit, tmp), args.path, shapes)
    mib = 2.0**20
    head = f"| case | {names[0]}, MiB | {names[1]}, MiB | change |" if theirs else "| case | MiB |"
    loss = "h_n[-1].sum()" if args.loss == "last-state" else "out.sum()"
    lines = [
        f"Training-step peak of the CUDA backend's tensors, {args.path} path, float32, on the CPU",
        f"emulation (8 pretend SMs); the loss {loss}.",
        "",
        head,
        "|---|---|---|---|" if theirs else "|---|---|",
    ]
    for label, b in ours.items():
        if theirs:
            t = theirs[label]
            lines.append(f"| {label} | {b / mib:.3f} | {t / mib:.3f} | {(b - t) / t:+.1%} |")
        else:
            lines.append(f"| {label} | {b / mib:.3f} |")
    import torch  # the workers' thread count (they keep torch's default)

    return bench_report.write_table(
        args.out,
        "cuda-memory-emulated",
        "The CUDA backend's training peak, emulated",
        torch.get_num_threads(),
        lines,
    )


if __name__ == "__main__":
    main()
