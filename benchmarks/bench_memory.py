"""Peak memory of one step: the most bytes its tensors held at once, above what was held before it.

CUDA: torch.cuda.max_memory_allocated. CPU: torch keeps no CPU memory statistics and tracemalloc
cannot see tensor storage, while a process's resident set moves by megabytes with what malloc keeps
for itself; so the step runs once under torch.profiler(profile_memory=True), whose trace lists every
allocation and free of torch's CPU allocator in order, and the peak of their running sum is the
step's peak. (Like max_memory_allocated, it counts tensors, not a backend's private malloc calls.)
The profiler slows every later op of its process, so CPU peaks are measured in a subprocess: run as
a script, this file is that subprocess.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _reset(step):
    # A training step frees the previous step's gradients first: free them before measuring, so
    # the peak is counted from what stays allocated between steps (weights, inputs).
    reset = getattr(step, "reset", None)
    if reset is not None:
        reset()


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's native side logs each start and stop on fd 2; keep the benchmark's log readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cuda_peak(step) -> int:
    _reset(step)
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def cpu_peak(step) -> int:
    from torch.profiler import ProfilerActivity, profile

    _reset(step)
    gc.collect()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    mem = [
        e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0
    ]
    mem.sort(key=lambda e: e["args"].get("Ev Idx", 0))
    held = peak = 0
    for e in mem:
        held += e["args"]["Bytes"]
        peak = max(peak, held)
    return peak


def cpu_peaks(case_dict: dict, competitors, modes, seed: int) -> dict:
    """{mode: {competitor: bytes}}, measured by this file run as a subprocess."""
    import varlen_rnn

    arg = json.dumps(
        {"case": case_dict, "competitors": list(competitors), "modes": list(modes), "seed": seed}
    )
    # The worker imports the varlen_rnn this process measures (an in-place build first on sys.path
    # here would otherwise lose to an installed one there).
    env = dict(os.environ)
    where = os.path.dirname(os.path.dirname(os.path.abspath(varlen_rnn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (where, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), arg],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker(arg: str) -> None:
    sys.path.insert(0, HERE)  # PYTHONPATH (set by the parent) holds the varlen_rnn it measures
    from bench_cases import Bench, Case

    spec = json.loads(arg)
    bench = Bench(Case.fromdict(spec["case"]), seed=spec["seed"])
    steps = {
        (mode, name): bench.step(mode, name)
        for mode in spec["modes"]
        for name in spec["competitors"]
    }
    for step in steps.values():
        step()  # lazy one-time allocations (thread pools, oneDNN primitives) are not a step's
    result = {mode: {} for mode in spec["modes"]}
    for (mode, name), step in steps.items():
        result[mode][name] = cpu_peak(step)
    print(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1])
