"""Benchmark varlen_rnn.GRU / LSTM / RNN against torch.nn.GRU / LSTM / RNN + pack_padded_sequence.

    python benchmarks/bench.py --preset quick                 # about a minute on a 2-core CPU
    python benchmarks/bench.py --preset cpu-targets           # the three CPU target configs, 2 threads,
                                                              # for GRU, LSTM and RNN (--cell: one)
    python benchmarks/bench.py --preset cpu-full              # the same at full length: bfloat16
                                                              # and float32 vs nn.X without lengths
    python benchmarks/bench.py --preset cpu-small             # small calls: one decoding step, T=16
    python benchmarks/bench.py --preset cpu-shapes            # H 32-1024, B 1-512, T 20-1000, full
                                                              # lengths, float32, GRU/LSTM vs nn
    python benchmarks/bench.py --preset gpu --device cuda     # the CUDA grid (training fp32/bf16, inference)
    python benchmarks/bench.py --preset full [--device cuda]  # the whole grid
    python benchmarks/bench.py --preset ragged                # issue 10: nested/PackedSequence input, memory

Every competitor of a case is timed in the same run, on the same inputs and weights, in rounds
that rotate their order (so drift in clocks or caches hits all of them alike), and the reported
time is the median over all rounds. Results go to --out as JSON, markdown and PNG.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import checkout  # noqa: E402

checkout.put_varlen_rnn_on_path()

import bench_memory  # noqa: E402
import bench_report  # noqa: E402
import torch  # noqa: E402
from bench_cases import (  # noqa: E402
    CELLS,
    COMPETITORS,
    DISTRIBUTIONS,
    MODES,
    RAGGED,
    Bench,
    Case,
    layer_flops,
    train_flops,
)
from torch.utils.benchmark import Timer  # noqa: E402

# Timing effort per preset: rounds of blocked_autorange(min_run_time) per competitor.
EFFORT = {
    "quick": dict(rounds=2, min_run_time=0.1, warmup=1),
    "cpu-targets": dict(rounds=5, min_run_time=0.4, warmup=2),
    "full": dict(rounds=3, min_run_time=0.2, warmup=2),
    "gpu": dict(rounds=2, min_run_time=0.1, warmup=2),
    "ragged": dict(rounds=3, min_run_time=0.3, warmup=1),
    "cpu-full": dict(rounds=3, min_run_time=0.3, warmup=2),
    "cpu-small": dict(rounds=5, min_run_time=0.2, warmup=2),
    "cpu-shapes": dict(rounds=3, min_run_time=0.3, warmup=2),
}


# (H, B, T) of the cpu-shapes preset
SHAPE_SWEEP = [
    (32, 256, 200),
    (48, 32, 300),
    (64, 8, 500),
    (64, 256, 100),
    (128, 1, 1000),
    (128, 512, 50),
    (200, 16, 100),
    (512, 1, 200),
    (1024, 8, 50),
    (1024, 64, 20),
]


def preset_cases(preset: str, device: str) -> list[Case]:
    if preset == "quick":
        base = dict(B=32, T=64, I=128, H=128, device=device)
        return [Case(**base, dist=d) for d in DISTRIBUTIONS] + [
            Case(**base, layers=2, bidirectional=True, dist="uniform")
        ]
    if preset == "cpu-targets":
        # Issue 13: the same three shapes for each cell (GRU first, as before it had company).
        return [
            Case(B=B, T=T, I=I, H=H, layers=L, bidirectional=bi, device=device, cell=cell)
            for cell in CELLS
            for B, T, I, H, L, bi in (
                (64, 100, 256, 256, 1, False),
                (16, 200, 256, 512, 1, False),
                (128, 50, 128, 128, 2, True),
            )
        ]
    if preset == "cpu-full":
        # The cpu-targets shapes with every sequence at full length, where nn.X without lengths
        # ("padded") is correct and the competitor a user swapping modules compares with:
        # bfloat16 (the CPU's matrix units) both modes, float32 inference.
        shapes = ((64, 100, 256, 256, 1, False), (16, 200, 256, 512, 1, False))
        shapes += ((128, 50, 128, 128, 2, True),)
        return [
            Case(
                B=B,
                T=T,
                I=I,
                H=H,
                layers=L,
                bidirectional=bi,
                dist="full",
                dtype=dtype,
                device=device,
                cell=cell,
                modes=modes,
                competitors=("baseline", "padded", "varlen"),
            )
            for dtype, modes in (("bfloat16", MODES), ("float32", ("infer",)))
            for cell in CELLS
            for B, T, I, H, L, bi in shapes
        ]
    if preset == "cpu-small":
        # Small calls, where per-call costs decide: one decoding step (T=1, every sequence of
        # length 1, inference: what a step-by-step decoder pays per token) and short batches
        # (T=16, lengths uniform, both modes). Against nn.X without lengths (correct here at
        # T=1) and the recipe.
        # Then a bidirectional encoder over one short sentence (B=1, T=20, full length,
        # inference), where a module's per-call handling of its weights shows.
        one_step = [(1, 1, 256, False), (1, 1, 512, False), (8, 1, 256, False)]
        one_step += [(64, 1, 256, False)]
        short = [(1, 16, 256, False), (8, 16, 256, False)]
        encoder = [(1, 20, 256, True), (1, 20, 512, True)]
        return [
            Case(
                B=B,
                T=T,
                I=H,
                H=H,
                bidirectional=bi,
                dist="full" if T == 1 or bi else "uniform",
                device=device,
                cell=cell,
                modes=("infer",) if T == 1 or bi else MODES,
                competitors=("baseline", "padded", "varlen"),
            )
            for cell in ("gru", "lstm")
            for B, T, H, bi in one_step + short + encoder
        ]
    if preset == "cpu-shapes":
        # Beyond the three table shapes: small and large H, B from 1 to 512, T from 20 to 1000,
        # every sequence at full length, float32, both modes, against nn.X without lengths (what
        # a user swapping modules runs there; the recipe too, as in every case): where we win
        # and where we lose.
        return [
            Case(
                B=B,
                T=T,
                I=H,
                H=H,
                dist="full",
                device=device,
                cell=cell,
                competitors=("baseline", "padded", "varlen"),
            )
            for cell in ("gru", "lstm")
            for H, B, T in SHAPE_SWEEP
        ]
    if preset == "gpu":
        # Issue 12's grid: training step at T=256, lengths uniform in [1, T], float32 and bfloat16,
        # torch's default flags (--tf32); inference forward at B <= 8 (both modes on one set of inputs).
        cases = []
        # dtype innermost, so a run cut short by --time-budget still has both dtypes for what it ran.
        for H, B, dtype in itertools.product(
            (256, 512, 1024), (1, 8, 64, 256), ("float32", "bfloat16")
        ):
            modes = ("infer", "train") if B <= 8 else ("train",)
            # varlen_host: the lengths on the CPU, as the recipe's users have them (a training
            # call then runs on the valid rows: _inputs.valid_rows).
            competitors = COMPETITORS + ("varlen_host",)
            cases.append(
                Case(
                    B=B,
                    T=256,
                    I=H,
                    H=H,
                    dtype=dtype,
                    device=device,
                    modes=modes,
                    competitors=competitors,
                )
            )
        return cases
    if preset == "ragged":
        # Issue 10. The skewed batch (one sequence of 1000, 255 of 20): training-step memory of
        # nested input vs the baseline and padded + lengths, each with the input it needs. Then
        # PackedSequence (and nested) input vs padded + lengths on the same data.
        ragged = ("baseline", "varlen", "varlen_packed") + RAGGED
        return [
            Case(
                B=256,
                T=1000,
                I=128,
                H=128,
                dist="one_long",
                device=device,
                competitors=("baseline", "varlen", "varlen_nested"),
            ),
            Case(B=64, T=100, I=256, H=256, device=device, competitors=ragged),
            Case(
                B=128,
                T=50,
                I=128,
                H=128,
                layers=2,
                bidirectional=True,
                device=device,
                competitors=ragged,
            ),
        ]
    if preset == "full":
        if device.startswith("cuda"):
            grid = itertools.product(
                (1, 16, 128), (256,), (256, 1024), (1, 2), (False, True), DISTRIBUTIONS
            )
        else:
            grid = itertools.product(
                (16, 64), (50, 200), (128, 512), (1, 2), (False, True), DISTRIBUTIONS
            )
        return [
            Case(B=B, T=T, I=H, H=H, layers=L, bidirectional=bi, dist=d, device=device)
            for B, T, H, L, bi, d in grid
        ]
    raise ValueError(f"unknown preset {preset!r}")


def gemm_reference(device: str, dtype: str, threads: int, min_run_time: float) -> dict:
    """A plain n x n x n torch.mm: what this machine's GEMM reaches, for the GFLOP/s column."""
    n = 4096 if device.startswith("cuda") else 1024
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=gen).to(device, getattr(torch, dtype))
    b = torch.randn(n, n, generator=gen).to(device, getattr(torch, dtype))
    m = Timer(
        "torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b}, num_threads=threads
    ).blocked_autorange(min_run_time=min_run_time)
    return {"n": n, "median_s": m.median, "gflops": 2 * n**3 / m.median / 1e9}


def time_interleaved(
    steps: dict, threads: int, rounds: int, min_run_time: float, warmup: int
) -> dict:
    """Median and IQR per step, over `rounds` rounds whose order rotates."""
    names = list(steps)
    timers = {n: Timer("step()", globals={"step": steps[n]}, num_threads=threads) for n in names}
    for n in names:
        for _ in range(warmup):
            steps[n]()
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            times[n].extend(timers[n].blocked_autorange(min_run_time=min_run_time).times)
    out = {}
    for n, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[n] = {"median_s": statistics.median(ts), "iqr_s": q[2] - q[0], "samples": len(ts)}
    return out


# csrc/cuda/launch.h's Exchange codes: how the last pass shared h (forward) / dgh (backward).
EXCHANGES = {
    0: "fallback",
    1: "persistent exact (acc-type h)",
    2: "persistent tf32 mma (fp32 h, padded smem)",
    3: "persistent 16-bit mma (16-bit h, padded smem)",
}


def last_exchange(step, passes) -> dict:
    """Runs `step` once and returns, for each of `passes` ("forward", "backward"), which
    exchange it took (the extension's varlen_rnn_cuda_last_exchange_for_testing hook;
    "unknown" without it)."""
    import ctypes

    import varlen_rnn

    try:
        f = ctypes.CDLL(varlen_rnn._C.__file__).varlen_rnn_cuda_last_exchange_for_testing
    except (AttributeError, OSError):
        return {p: "unknown" for p in passes}
    f.argtypes, f.restype = [ctypes.c_int], ctypes.c_int
    step()
    torch.cuda.synchronize()
    return {p: EXCHANGES.get(f(int(p == "backward")), "unknown") for p in passes}


def run_case(
    case: Case, effort: dict, threads: int, gemm: dict, memory: bool = True, seed: int = 0
) -> dict:
    bench = Bench(case, seed=seed)
    competitors = case.competitors
    record = {
        "name": case.name(),
        "case": case.asdict(),
        "valid_tokens": int(bench.lengths.sum()),
        "padded_tokens": case.T * case.B,
        "max_abs_diff": {c: bench.max_abs_diff(c) for c in competitors if c.startswith("varlen")},
        "input_bytes": {c: bench.input_bytes(c) for c in competitors},
        "modes": {},
    }
    cpu_peaks = {}
    if memory and not case.device.startswith("cuda"):
        cpu_peaks = bench_memory.cpu_peaks(case.asdict(), competitors, case.modes, seed)
    for mode in case.modes:
        steps = {c: bench.step(mode, c) for c in competitors}
        timed = time_interleaved(
            steps, threads, effort["rounds"], effort["min_run_time"], effort["warmup"]
        )
        flops = (layer_flops if mode == "infer" else train_flops)(case, bench.lengths)
        med = {c: timed[c]["median_s"] for c in competitors}
        m = {
            "median_s": med,
            "iqr_s": {c: timed[c]["iqr_s"] for c in competitors},
            "samples": {c: timed[c]["samples"] for c in competitors},
            "speedup": {c: med["baseline"] / med[c] for c in competitors},
            "gflops": {c: flops / med[c] / 1e9 for c in competitors},
            "flops": flops,
        }
        m["gemm_fraction"] = m["gflops"].get("varlen", 0.0) / gemm["gflops"]
        if mode == "infer":  # per layer-step: the time one layer spends on one time step
            m["us_per_step"] = {c: med[c] / (case.T * case.layers) * 1e6 for c in competitors}
        if case.device.startswith("cuda"):
            passes = ("forward",) if mode == "infer" else ("forward", "backward")
            m["exchange"] = {
                c: last_exchange(steps[c], passes) for c in competitors if c.startswith("varlen")
            }
        if memory and case.device.startswith("cuda"):
            m["peak_bytes"] = {c: bench_memory.cuda_peak(steps[c]) for c in competitors}
        elif memory:
            m["peak_bytes"] = cpu_peaks[mode]
        record["modes"][mode] = m
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(EFFORT), default="quick")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda for --preset gpu, else cpu",
    )
    p.add_argument(
        "--out",
        default=os.path.join(HERE, "results"),
        help="results folder (default benchmarks/results)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 2 for the cpu-* presets, else torch's default)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; cases that would start after it are skipped and listed (gpu preset: 210)",
    )
    p.add_argument("--limit", type=int, default=None, help="run only the first N cases (dry runs)")
    p.add_argument("--match", default=None, help="run only the cases whose name contains this text")
    p.add_argument("--cell", choices=sorted(CELLS), default=None, help="run only this cell's cases")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument(
        "--rounds", type=int, default=None, help="override the preset's interleaved rounds"
    )
    p.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="override the preset's seconds per blocked_autorange",
    )
    p.add_argument(
        "--tf32",
        choices=("default", "off"),
        default="default",
        help="CUDA: default keeps torch's flags (cuDNN's TF32 on for float32, as nn.GRU users "
        "get it); off turns TF32 off on both sides",
    )
    args = p.parse_args(argv)

    device = args.device or ("cuda" if args.preset == "gpu" else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    threads = args.threads or (
        2
        if args.preset in ("cpu-targets", "cpu-full", "cpu-small", "cpu-shapes")
        else torch.get_num_threads()
    )
    torch.set_num_threads(threads)
    budget = (
        args.time_budget
        if args.time_budget is not None
        else (210.0 if args.preset == "gpu" else None)
    )
    try:
        import varlen_rnn  # noqa: F401
    except ImportError as e:
        print(
            f"error: cannot import varlen_rnn ({e}); build it first: "
            "pip install --no-build-isolation -e .",
            file=sys.stderr,
        )
        return 2
    if device == "cuda" and args.tf32 == "off":  # machine_info records the flags either way
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device == "cpu" and load > 0.5:
        print(
            f"warning: load average {load:.1f} before the run; other work on this machine makes CPU "
            "timings noisy",
            file=sys.stderr,
        )
    effort = dict(EFFORT[args.preset])
    if args.rounds is not None:
        effort["rounds"] = args.rounds
    if args.min_run_time is not None:
        effort["min_run_time"] = args.min_run_time
    cases = [
        c
        for c in preset_cases(args.preset, device)
        if (args.match is None or args.match in c.name()) and args.cell in (None, c.cell)
    ]
    cases = cases[: args.limit]
    if not cases:
        raise SystemExit(
            f"no case of --preset {args.preset} matches --match {args.match!r} --cell {args.cell}"
            " (case names look like 'LSTM B=64 T=20 I=1024 H=1024 L=1 full float32')"
        )
    results = {
        "preset": args.preset,
        "machine": bench_report.machine_info(device, threads),
        "effort": effort,
        "gemm": {},
        "cases": [],
        "skipped": [],
    }
    start = time.perf_counter()
    tag = "".join(
        ch if ch.isalnum() or ch in "-_." else "_" for ch in results["machine"].get("gpu", "cpu")
    )
    stem = f"{args.preset}_{device}_{tag}_{time.strftime('%Y%m%d-%H%M%S')}"
    for dtype in sorted({c.dtype for c in cases}):
        results["gemm"][dtype] = gemm_reference(device, dtype, threads, effort["min_run_time"] * 2)
    last = 0.0  # the previous case's seconds: a case that would end past the budget is not started
    for i, case in enumerate(cases):
        elapsed = time.perf_counter() - start
        if budget is not None and elapsed + last > budget:
            results["skipped"].append(case.name())
            continue
        print(
            f"[{i + 1}/{len(cases)} {elapsed:5.0f}s] {case.name()} ...", file=sys.stderr, flush=True
        )
        t0 = time.perf_counter()
        rec = run_case(
            case, effort, threads, results["gemm"][case.dtype], memory=not args.no_memory
        )
        last = time.perf_counter() - t0
        results["cases"].append(rec)
        for mode, m in rec["modes"].items():
            print(
                f"    {mode}: baseline {m['median_s']['baseline'] * 1e3:.2f} ms, varlen "
                f"{m['median_s']['varlen'] * 1e3:.2f} ms ({m['speedup']['varlen']:.2f}x)",
                file=sys.stderr,
                flush=True,
            )
        # JSON and markdown after every case: a run killed by a time limit keeps what it measured.
        results["wall_s"] = time.perf_counter() - start
        bench_report.write_all(results, args.out, stem, plot=False)
    results["wall_s"] = time.perf_counter() - start

    paths = bench_report.write_all(results, args.out, stem)
    print(
        "\nwrote "
        + ", ".join(paths.values())
        + (" (no matplotlib: no plot)" if "png" not in paths else "")
    )
    if results["skipped"]:
        print(f"skipped for the time budget: {len(results['skipped'])} cases")
    print(bench_report.short_table(results))
    print(bench_report.key_line(results, len(cases)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
