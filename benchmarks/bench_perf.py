"""Where varlen_rnn's CPU time goes inside its ops: a sampling profile (Linux perf, the
software cpu-clock event, so it works in VMs without hardware counters) of repeated steps,
grouped into GEMM (BLAS/oneDNN), our gate passes, thread-team waits, copies and the rest.

    python benchmarks/bench_perf.py [--B 64 --T 100 --I 256 --H 256 --layers 1 --bi]
        [--cell gru|lstm|rnn] [--mode train|infer] [--competitor varlen|baseline]
        [--threads 2] [--seconds 10] [--top 15]

torch.profiler sees one op per layer; this looks inside it. The process records itself with
`perf record -p <pid>` after warm-up, so imports and compilation are not in the profile. Prints
a markdown table of categories (% of samples, all threads) and the top symbols.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import checkout  # noqa: E402

checkout.put_varlen_rnn_on_path()

from bench_cases import Bench, add_case_arguments, case_from_arguments  # noqa: E402

# (category, regex on "dso symbol"): the first match wins, so the specific come first.
CATEGORIES = [
    # csrc/cpu/small_gemm.cpp's per-ISA kernels (kernel_avx512, ...), the packing of their
    # strips (cpu/packing.cpp); the AVX512-BF16 strips and the float32 products on weights as
    # stored (cpu/dot_rows.h)
    (
        "our GEMM kernels",
        r"small_gemm|pack_b|pack_strips|pack_pairs|transpose8|interleave_pair|gather_pairs"
        r"|varlen_rnn::cpu::.*kernel_(avx512|avx2|portable)"
        r"|varlen_rnn::cpu::(row_tiles|dot_rows|strip_|f32_rows_times|bf16_dot_rows)",
    ),
    ("GEMM (BLAS / oneDNN)", r"mkl|sgemm|dgemm|gemm|dnnl|jit_avx|jit_uni|brgemm|openblas"),
    ("gate passes (ours)", r"forward_units|forward_row|backward_units|backward_row|Cell"),
    (
        "thread team: barriers, waits",
        r"gomp|libomp|iomp|kmp_|__kmp|barrier|sched_yield|futex|do_spin|spin",
    ),
    ("copies and fills", r"memcpy|memmove|memset|copy_|index_select|index_copy|fill"),
    ("kernel (OS)", r"\[kernel|\[k\]"),
    ("python and dispatch", r"libpython|python3|_PyEval|libtorch_python|c10::|Dispatcher"),
]


def categorize(rows):
    """rows: (percent, dso, symbol). Returns {category: percent} with "other" for the rest."""
    out = {name: 0.0 for name, _ in CATEGORIES}
    out["other"] = 0.0
    for pct, dso, sym in rows:
        text = f"{dso} {sym}"
        for name, rx in CATEGORIES:
            if re.search(rx, text):
                out[name] += pct
                break
        else:
            out["other"] += pct
    return out


def parse_report(text):
    """perf report --stdio --sort dso,sym lines: '  12.34%  libfoo.so  [.] symbol'."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)$", line)
        if m:
            dso = m.group(2) if m.group(3) == "." else f"[kernel] {m.group(2)}"
            rows.append((float(m.group(1)), dso, m.group(4).strip()))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_case_arguments(p)
    p.add_argument("--mode", choices=("train", "infer"), default="infer")
    p.add_argument("--competitor", default="varlen", choices=("varlen", "baseline"))
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args(argv)
    perf = shutil.which("perf")
    if perf is None:
        print("bench_perf: needs Linux perf on PATH (Debian: apt install linux-perf)")
        return 2
    case = case_from_arguments(a)
    step = Bench(case).step(a.mode, a.competitor)
    for _ in range(3):
        step()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        rec = subprocess.Popen(
            [
                perf,
                "record",
                "-q",
                "-e",
                "cpu-clock",
                "-F",
                "1999",
                "-p",
                str(os.getpid()),
                "-o",
                data,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)  # perf attaches
        t0, steps = time.perf_counter(), 0
        while time.perf_counter() - t0 < a.seconds:
            step()
            steps += 1
        elapsed = time.perf_counter() - t0
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=60)
        report = subprocess.run(
            [
                perf,
                "report",
                "-i",
                data,
                "--stdio",
                "--no-children",
                "--sort",
                "dso,sym",
                "--percent-limit",
                "0",
            ],
            capture_output=True,
            text=True,
        )
    rows = parse_report(report.stdout)
    if not rows:
        print("bench_perf: perf recorded nothing:", err.decode()[-2000:], report.stderr[-2000:])
        return 1
    cats = categorize(rows)
    print(
        f"### {a.competitor} {case.name()} {a.mode}, {a.threads} threads: {steps} steps in "
        f"{elapsed:.1f} s ({1e3 * elapsed / steps:.1f} ms/step); load average before: "
        f"{os.getloadavg()[0]:.2f}\n"
    )
    print("| where | % of samples |\n|---|---|")
    for name, pct in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {pct:.1f} |")
    print("\n| top symbols | dso | % |\n|---|---|---|")
    for pct, dso, sym in rows[: a.top]:
        print(f"| `{sym[:90]}` | {os.path.basename(dso)} | {pct:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
