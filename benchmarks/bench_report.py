"""Where the results go: JSON (everything), a markdown table, a PNG plot, and a short console table.
Every file names the machine, torch version and date, so a number never loses its provenance."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

import torch
from bench_cases import LABELS


def machine_info(device: str, threads: int) -> dict:
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "cpu": _cpu_model(),
        "threads": threads,
        # Other work on the machine skews CPU timings (an OpenMP barrier waits for a descheduled thread).
        "loadavg_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(),
        # Which varlen_rnn ran: the checkout's in-place build (then git_commit is its code) or
        # an installed copy (built from whatever was installed).
        "varlen_rnn": _package_origin(),
        "compiler": _compiler(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(
            gpu=props.name,
            driver=_driver(),
            cuda=torch.version.cuda,
            sm_count=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def _package_origin() -> str:
    import varlen_rnn

    pkg = os.path.dirname(os.path.abspath(varlen_rnn.__file__))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return "checkout" if os.path.dirname(pkg) == repo else f"installed copy {pkg}"


def _compiler() -> str | None:
    """The C++ compiler of the varlen_rnn that ran, as its build recorded it (builds before
    the record: None)."""
    try:
        from varlen_rnn import _build_info
    except ImportError:
        return None
    return getattr(_build_info, "CXX", None) or None


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def _git_commit() -> str | None:
    """The checkout the run measured ("+dirty" when code had uncommitted changes; results don't count).
    A copy without .git (a GPU machine gets the working tree only) names it in VARLEN_RNN_COMMIT."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(repo, ".git")):
        return os.environ.get("VARLEN_RNN_COMMIT")
    try:
        head = subprocess.run(
            ["git", "-C", repo, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                repo,
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!benchmarks/results",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(info: dict) -> str:
    if "gpu" in info:
        where = (
            f"{info['gpu']} (driver {info.get('driver')}, CUDA {info['cuda']}, TF32 matmul="
            f"{info['tf32_matmul']} cudnn={info['tf32_cudnn']})"
        )
    else:
        where = f"{info['cpu']}, {info['threads']} threads"
    commit = f"; commit {info['git_commit']}" if info.get("git_commit") else ""
    origin = f"; varlen_rnn from the {info['varlen_rnn']}" if info.get("varlen_rnn") else ""
    compiler = f" (built by {info['compiler']})" if info.get("compiler") else ""
    return f"{where}; torch {info['torch']}; {info['date']}{commit}{origin}{compiler}"


def _ms(s):
    return "-" if s is None else f"{s * 1e3:.2f}"


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def markdown(results: dict) -> str:
    info = results["machine"]
    lines = [
        f"# varlen_rnn benchmark: preset `{results['preset']}`",
        "",
        f"Machine: {machine_line(info)}",
        "",
        "Median time per call (ms) from one interleaved run (torch.utils.benchmark); speedup is "
        "baseline time / competitor time. GFLOP/s count valid tokens only (training = 3x forward) and "
        f"are compared with a plain torch.mm measured in the same run "
        f"({_gemm_text(results)}). Peak memory is the step's peak above what was allocated before it.",
        "",
    ]
    for mode in ("infer", "train"):
        rows = [r for r in results["cases"] if mode in r["modes"]]
        if not rows:
            continue
        title = (
            "Inference forward (torch.inference_mode)"
            if mode == "infer"
            else "Training step (forward + backward)"
        )
        others = _competitors(rows)[1:]
        lines += [
            f"## {title}",
            "",
            "| case | baseline ms | "
            + " | ".join(f"{_SHORT[c]} ms (x)" for c in others)
            + " | varlen GFLOP/s (% GEMM) | peak MiB baseline / varlen | max abs diff |",
            "|---|---:|" + "---:|" * len(others) + "---:|---:|---:|",
        ]
        for r in rows:
            m = r["modes"][mode]
            t = m["median_s"]
            cells = [r["name"], _ms(t["baseline"])]
            for c in others:
                cells.append(
                    f"{_ms(t.get(c))} ({m['speedup'].get(c, 0):.2f}x)" if t.get(c) else "-"
                )
            g = m["gflops"].get("varlen")
            cells.append("-" if g is None else f"{g:.1f} ({m['gemm_fraction'] * 100:.0f}%)")
            mem = m.get("peak_bytes", {})
            cells.append(f"{_mib(mem.get('baseline'))} / {_mib(mem.get('varlen'))}")
            cells.append(f"{r.get('max_abs_diff', {}).get('varlen', float('nan')):.1e}")
            if "us_per_step" in m:
                cells[0] += (
                    f" ({m['us_per_step']['varlen']:.1f} vs {m['us_per_step']['baseline']:.1f} µs/step)"
                )
            ex = m.get("exchange", {}).get("varlen")
            if ex:  # which exchange the persistent kernels took (bench.py: last_exchange)
                cells[0] += " [" + "; ".join(f"{p}: {v}" for p, v in ex.items()) + "]"
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += _memory_table(results)
    if results.get("skipped"):
        lines += [f"Skipped for the time budget: {', '.join(results['skipped'])}", ""]
    return "\n".join(lines)


# Column names of the competitors (LABELS has the long ones, under the tables).
_SHORT = {
    "baseline": "baseline",
    "padded": "padded",
    "varlen": "varlen",
    "varlen_host": "varlen, CPU lengths",
    "varlen_packed": "varlen packed",
    "varlen_packseq": "varlen PackedSequence",
    "varlen_nested": "varlen nested",
}


def _competitors(rows) -> list:
    """The competitors the rows have, in LABELS' order (baseline first)."""
    present = {c for r in rows for m in r["modes"].values() for c in m["median_s"]}
    return [c for c in LABELS if c in present]


def _memory_table(results: dict) -> list:
    """Peak memory per competitor with the input it needs: a padded batch for the padded
    competitors, only the valid rows for the ragged ones (cases that record input_bytes)."""
    rows = [
        r
        for r in results["cases"]
        if "input_bytes" in r and any("peak_bytes" in m for m in r["modes"].values())
    ]
    if not rows:
        return []
    lines = [
        "## Peak memory with the input (MiB)",
        "",
        "Step peak + the input the competitor needs (padded [T, B, I] or ragged [N, I]); "
        "ratio to the baseline's total.",
        "",
        "| case | mode | competitor | step peak | input | total | vs baseline |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        for mode, m in r["modes"].items():
            peaks = m.get("peak_bytes", {})
            base = peaks["baseline"] + r["input_bytes"]["baseline"]
            for c in _competitors([r]):
                total = peaks[c] + r["input_bytes"][c]
                lines.append(
                    f"| {r['name']} | {mode} | {_SHORT[c]} | {_mib(peaks[c])} | "
                    f"{_mib(r['input_bytes'][c])} | {_mib(total)} | {total / base:.2f} |"
                )
    lines += ["", "Competitors: " + "; ".join(f"{_SHORT[c]} = {LABELS[c]}" for c in LABELS), ""]
    return lines


def _gemm_text(results):
    return ", ".join(
        f"{k}: {v['gflops']:.0f} GFLOP/s at n={v['n']}" for k, v in results["gemm"].items()
    )


def short_table(results: dict) -> str:
    """The few columns a reader needs at the end of a run."""
    head = (
        f"{'case':<44} {'mode':<5} {'base ms':>9} {'varlen ms':>9} {'speedup':>7} {'mem ratio':>9}"
    )
    out = [machine_line(results["machine"]), head, "-" * len(head)]
    for r in results["cases"]:
        for mode, m in r["modes"].items():
            t = m["median_s"]
            mem = m.get("peak_bytes", {})
            ratio = (
                f"{mem['varlen'] / mem['baseline']:.2f}"
                if mem.get("baseline") and mem.get("varlen") is not None
                else "-"
            )
            out.append(
                f"{r['name']:<44} {mode:<5} {_ms(t['baseline']):>9} {_ms(t.get('varlen')):>9} "
                f"{m['speedup'].get('varlen', 0):>6.2f}x {ratio:>9}"
            )
    return "\n".join(out)


def make_plot(results: dict, path: str) -> str | None:
    """Grouped bars of speedup over the baseline, one panel per mode. None when matplotlib is absent
    (the GPU machine has no package registry)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    modes = [m for m in ("infer", "train") if any(m in r["modes"] for r in results["cases"])]
    fig, axes = plt.subplots(
        len(modes),
        1,
        figsize=(max(8, 0.9 * len(results["cases"]) + 3), 4.2 * len(modes)),
        squeeze=False,
    )
    for ax, mode in zip(axes[:, 0], modes):
        rows = [r for r in results["cases"] if mode in r["modes"]]
        others = _competitors(rows)[1:]
        width = 0.8 / len(others)
        for k, c in enumerate(others):
            ys = [r["modes"][mode]["speedup"].get(c, 0) for r in rows]
            xs = [i + (k - (len(others) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, ys, width, label=LABELS[c])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(
            [
                r["name"]
                .replace(" I=", "\nI=")
                .replace(" uniform", "\nuniform")
                .replace(" full", "\nfull")
                .replace(" skewed", "\nskewed")
                .replace(" one_long", "\none_long")
                for r in rows
            ],
            fontsize=7,
        )
        ax.set_ylabel("speedup vs torch.nn + packing")
        ax.set_title(
            "inference forward" if mode == "infer" else "training step (forward + backward)"
        )
        ax.legend(fontsize=7)
    fig.suptitle(
        f"varlen_rnn `{results['preset']}`: {machine_line(results['machine'])}", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def key_line(results: dict, n_cases: int) -> str:
    """One line for a run's summary: cases done and the spread of varlen's speedup per mode."""
    parts = [f"{len(results['cases'])}/{n_cases} cases"]
    for mode in ("train", "infer"):
        s = sorted(
            r["modes"][mode]["speedup"]["varlen"] for r in results["cases"] if mode in r["modes"]
        )
        if s:
            parts.append(
                f"{mode} speedup vs baseline {s[0]:.2f}-{s[-1]:.2f}x (median {s[len(s) // 2]:.2f}x)"
            )
    return "KEY: " + "; ".join(parts)


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # a kill mid-write leaves the previous complete file


def write_table(out_dir: str, kind: str, title: str, threads: int, body: list[str]) -> str:
    """A small CPU benchmark's result (bench_grad_mask, bench_decoder_loop,
    bench_double_backward): the title, the machine line (machine_info: CPU, threads, torch,
    date, commit, which varlen_rnn, load average), then body, printed and written to
    out_dir/{kind}_cpu_<date>.md. Returns the path."""
    info = machine_info("cpu", threads)
    where = f"Machine: {machine_line(info)}; load average {info['loadavg_at_start']:.1f}"
    text = "\n".join([f"# {title}", "", where, "", *body]) + "\n"
    print(text)
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(out_dir, f"{kind}_cpu_{stamp}.md")
    _write(path, text)
    print("wrote", path)
    return path


def write_all(results: dict, out_dir: str, stem: str, plot: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, stem + ".json"),
        "md": os.path.join(out_dir, stem + ".md"),
    }
    _write(paths["json"], json.dumps(results, indent=1))
    _write(paths["md"], markdown(results))
    png = make_plot(results, os.path.join(out_dir, stem + ".png")) if plot else None
    if png:
        paths["png"] = png
    return paths


if (
    __name__ == "__main__"
):  # re-make the markdown and plot of a results JSON (e.g. after a cut-off run)
    with open(sys.argv[1]) as f:
        res = json.load(f)
    folder, name = os.path.split(os.path.abspath(sys.argv[1]))
    print(write_all(res, folder, name[: -len(".json")] if name.endswith(".json") else name))
