"""What a training step holds at its peak: for one case, the benchmark's own step (bench_cases:
loss = (out * w_out).sum() + (h_n * w_h).sum(), backward) of each competitor runs once under
torch.profiler(profile_memory=True), and the allocations live when their running sum peaks are
listed, largest first, each with the ops it was allocated in (innermost last), and summed by the
outermost op. The numbers are bench_memory's: tensors, not a backend's private allocations.

It was written for a question the H200's first run left open: the GPU benchmark measured our
training peak at 1.8x the recipe's (B=64 T=256 I=H=256 float32: 241 against 137 MiB), while the
CUDA backend's host code run on the CPU emulation (the same allocations, the kernels on CPU
threads) peaks at about 154 MiB on that step. The GPU run of this script says what the
difference is.

    python benchmarks/bench_memory_peak.py --device cuda --B 64 --T 256 --I 256 --H 256
    python benchmarks/bench_memory_peak.py --device cpu --B 8 --T 32 --I 16 --H 16   # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_memory  # noqa: E402
import checkout  # noqa: E402
from bench_cases import Bench, add_case_arguments, case_from_arguments  # noqa: E402

MIB = 2.0**20


def _events(step, device: str) -> list:
    """The chrome trace's events of one run of step under the memory profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with (
        bench_memory._quiet_stderr(),
        profile(activities=activities, profile_memory=True, record_shapes=True) as prof,
    ):
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]
    finally:
        os.unlink(path)


def live_at_peak(events: list, device_type: int) -> tuple:
    """(peak bytes, [(bytes, [op names enclosing the allocation, outermost first])]) for the
    allocations of device_type (0 CPU, 1 CUDA) live at the peak of their running sum. An
    allocation's ops are the CPU ops of its thread whose span holds its time stamp, the
    innermost with its arguments' shapes."""
    mem = [
        e
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == device_type
    ]
    mem.sort(key=lambda e: e["args"].get("Ev Idx", 0))
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    live, held, peak, at_peak = {}, 0, 0, {}
    for e in mem:
        a = e["args"]
        if a["Bytes"] > 0:
            live[a["Addr"]] = e
        else:
            live.pop(a["Addr"], None)
        held += a["Bytes"]
        if held > peak:
            peak, at_peak = held, dict(live)

    def chain(e):
        inside = [
            o
            for o in ops
            if o.get("tid") == e.get("tid") and o["ts"] <= e["ts"] <= o["ts"] + o.get("dur", 0)
        ]
        inside.sort(key=lambda o: (o["ts"], -o.get("dur", 0)))
        names = [o["name"] for o in inside]
        if inside:  # the innermost op's tensors' shapes, or an empty's size
            args = inside[-1]["args"]
            dims = [d for d in args.get("Input Dims", []) if d]
            concrete = [c for c in args.get("Concrete Inputs", []) if c.startswith("[")]
            if dims or concrete:
                names[-1] += " " + str(dims or concrete[0])
        return names

    blocks = [(e["args"]["Bytes"], chain(e)) for e in at_peak.values()]
    blocks.sort(key=lambda b: -b[0])
    return peak, blocks


def report(name: str, peak: int, blocks: list, top: int) -> str:
    lines = [f"## {name}: peak {peak / MIB:.1f} MiB, {len(blocks)} allocations live", ""]
    by_outer: dict = {}
    for size, ops in blocks:
        key = ops[0] if ops else "(outside any op)"
        by_outer[key] = by_outer.get(key, 0) + size
    lines.append("| outermost op | MiB |")
    lines.append("|---|---:|")
    for key, size in sorted(by_outer.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {key} | {size / MIB:.2f} |")
    lines += ["", "| MiB | allocated in (outermost > ... > innermost) |", "|---:|---|"]
    for size, ops in blocks[:top]:
        shown = ops if len(ops) <= 4 else ops[:1] + ["..."] + ops[-3:]
        lines.append(f"| {size / MIB:.2f} | {' > '.join(shown) or '(outside any op)'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_case_arguments(p)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--competitors", default="baseline,varlen,varlen_host")
    p.add_argument("--top", type=int, default=15, help="allocations listed per competitor")
    p.add_argument("--out", help="also write the report to this file")
    a = p.parse_args(argv)
    checkout.put_varlen_rnn_on_path()
    case = case_from_arguments(a, device=a.device)
    bench = Bench(case)
    device_type = 1 if a.device == "cuda" else 0
    out = [f"# Training step memory at its peak: {case.name()} on {a.device}", ""]
    peaks = []
    for name in a.competitors.split(","):
        step = bench.step("train", name)
        step()  # one-time allocations (handles, workspaces) are not the step's
        bench_memory._reset(step)
        peak, blocks = live_at_peak(_events(step, a.device), device_type)
        out.append(report(name, peak, blocks, a.top))
        top = f"{blocks[0][0] / MIB:.1f} MiB in {blocks[0][1][-1]}" if blocks else "none"
        peaks.append(f"{name} {peak / MIB:.1f} MiB (largest {top})")
    text = "\n".join(out)
    print(text)
    print(f"KEY: {case.name()} training peak: " + "; ".join(peaks))
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
