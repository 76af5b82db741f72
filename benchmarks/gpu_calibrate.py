"""Calibrate the CUDA path choice (csrc/cuda/plan.h's cost model) from a GPU run's timing probe.

    python benchmarks/gpu_calibrate.py PROBE_DIR_OR_JSON [--out calibration.md]

gpu_probe.py times one GRU layer per configuration (H, dtype, mode, B) on each of our paths: the
persistent kernel on tensor cores (`persistent`), the exact one (`persistent_exact`) and the
fallback. For each configuration this rebuilds what those paths ran: the probe's lengths, the
rows still running at each step, and the cut plan.h makes on the probe's device. plan.h itself,
compiled here with the host C++ compiler, gives each path's modelled cost by term: per
persistent step the grid barrier, the staging from L2, the recurrent product (CUDA cores or
tensor cores) and the pointwise part, summed over the steps the kernel ran; per fallback step
the host's floor and the GPU's kernels and GEMM, times the T steps its loop runs.

The fit: what the path choice turns on is the difference between paths, and the differences of
measured times (tensor-core persistent minus fallback, exact persistent minus fallback) cancel
all that the paths share (the input projection, the weight gradients' GEMMs, allocations). A
scale per term is fitted to them by least squares, each configuration weighted by 1 / its
fallback time, with a weak pull toward today's constants (ridge), so a direction the data cannot see
(the barrier against the fallback's host floor when both are per-step constants) keeps its
present value. The fallback's max(host, kernel + GEMM) is fitted piecewise: which side binds is
decided from the current fit, and the fit repeated until that no longer changes.

Prints, and writes to --out: the constants to put into plan.h (before, after), and per
configuration the measured times, the modelled and measured differences, the fastest path
measured and the path `auto` picks before and after the fit (and `auto`'s own time, where the
probe ran it). Python and plan.h must agree on every choice with today's constants; this
checks that on every configuration before fitting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")

# (storage bytes, op-math bytes) per dtype the probe runs.
DTYPE_BYTES = {"float64": (8, 8), "float32": (4, 4), "bfloat16": (2, 4), "float16": (2, 4)}
PASSES = {"inference": 0, "training": 1, "backward": 2}
MODE_PASSES = {"fwd": ("inference",), "train": ("training", "backward")}
OURS = ("persistent", "persistent_exact", "fallback")
# The fitted scales, in the order of the design matrix's columns. Persistent terms scale the
# modelled cycles; host_us and kernel_us are the fallback's constants themselves; gemm scales its
# GEMM time.
PARAMS = ("sync", "load", "cuda_core", "mma", "pointwise", "host_us", "kernel_us", "gemm")
# When a GPU's H100-like defaults are needed (a probe.json from before it recorded the device).
DEFAULT_DEVICE = {"sms": 132, "smem_per_block_optin": 227 * 1024}

DRIVER = r"""
#include <cstdio>
#include <vector>
#include "cuda/plan.h"
using namespace varlen_rnn::plan;
// In: B H D pass storage_bytes acc_bytes gemm_tc mma gates sms smem k n_0 .. n_{k-1}
// Out: fits path persistent_us fallback_us J tile_rows kc,
//      full-B step terms (sync load compute pointwise), the same summed over n_0..n_{k-1},
//      fallback terms (host kernel gemm); a line of constants first.
int main() {
  std::printf("%.17g %.17g %.17g\n", CostModel::kClockGHz, CostModel::kFallbackHostUs,
              CostModel::kFallbackKernelUs);
  long long B, H, D, pass, sb, ab, tc, mma, gates, sms, smem, k;
  while (std::scanf("%lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld", &B, &H, &D,
                    &pass, &sb, &ab, &tc, &mma, &gates, &sms, &smem, &k) == 12) {
    std::vector<long long> n(k);
    for (auto& v : n) std::scanf("%lld", &v);
    Problem p{B, H, D, Pass(pass), sb, ab, tc != 0};
    p.persistent_mma = mma != 0;
    p.gates = gates;
    const Device dev{sms, smem, true, true};
    const Choice c = choose_path(p, dev, Path::kAuto, 0);
    StepTerms full, sum;
    if (c.fits) {
      const Cut& u = c.cut;
      full = persistent_step_terms(p, u.J, u.tile_rows, u.kc, u.w_stride, u.kc_stride);
      for (long long rows : n) {
        Problem q = p;
        q.B = rows;
        const StepTerms t = persistent_step_terms(q, u.J, u.tile_rows, u.kc, u.w_stride,
                                                  u.kc_stride);
        sum.sync += t.sync, sum.load += t.load, sum.compute += t.compute;
        sum.pointwise += t.pointwise;
      }
    }
    const FallbackTerms f = fallback_step_terms(p, dev);
    std::printf("%d %d %.17g %.17g %lld %lld %lld %.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g"
                " %.17g %.17g %.17g\n",
                int(c.fits), int(c.path), c.persistent_us, c.fallback_us, (long long)c.cut.J,
                (long long)c.cut.tile_rows, (long long)c.cut.kc, full.sync, full.load,
                full.compute, full.pointwise, sum.sync, sum.load, sum.compute, sum.pointwise,
                f.host, f.kernel, f.gemm);
  }
}
"""


@dataclass
class Pass:
    """plan.h's answer for one pass of one configuration on one persistent kernel."""

    fits: bool
    path: int  # plan::Path: 1 persistent, 2 fallback (auto's choice for this kernel alone)
    persistent_us: float
    fallback_us: float
    cut: tuple
    full: np.ndarray  # [sync, load, compute, pointwise] cycles of one step, all B rows
    summed: np.ndarray  # the same, summed over the steps the kernel ran
    fallback: np.ndarray  # [host, kernel, gemm] us of one fallback step


@dataclass
class Config:
    H: int
    dtype: str
    mode: str
    B: int
    measured: dict  # impl -> ms
    mma_allowed: bool
    # pass name -> {"exact": Pass, "tc": Pass}
    passes: dict = field(default_factory=dict)


class Model:
    """plan.h compiled once; query(problems) -> Pass per problem."""

    def __init__(self, workdir: str):
        cxx = next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
        if cxx is None:
            raise RuntimeError("no host C++ compiler (c++, g++ or clang++) to compile plan.h")
        src = os.path.join(workdir, "plan_driver.cpp")
        self.exe = os.path.join(workdir, "plan_driver")
        with open(src, "w") as f:
            f.write(DRIVER)
        r = subprocess.run(
            [cxx, "-std=c++17", "-O1", "-I", CSRC, src, "-o", self.exe],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise RuntimeError(f"compiling plan.h's driver failed:\n{r.stderr[-3000:]}")

    def query(self, lines: list[str]) -> tuple[tuple, list[Pass]]:
        r = subprocess.run(
            [self.exe], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True
        )
        out = r.stdout.splitlines()
        consts = tuple(float(v) for v in out[0].split())
        passes = []
        for line in out[1:]:
            v = line.split()
            f = [float(x) for x in v]
            passes.append(
                Pass(
                    fits=v[0] == "1",
                    path=int(v[1]),
                    persistent_us=f[2],
                    fallback_us=f[3],
                    cut=tuple(int(x) for x in v[4:7]),
                    full=np.array(f[7:11]),
                    summed=np.array(f[11:15]),
                    fallback=np.array(f[15:18]),
                )
            )
        return consts, passes


def running_rows(lengths: list[int]) -> list[int]:
    """Rows still running at each step s < max length (the persistent kernel's steps)."""
    top = max(lengths, default=0)
    return [sum(1 for L in lengths if L > s) for s in range(top)]


def load_probe(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "probe.json")
    with open(path) as f:
        return json.load(f)


def measured_table(probe: dict) -> dict:
    """{(H, dtype, mode, B): {impl: median ms}} over every child that timed it."""
    table = {}
    for impl, res in probe.get("children", {}).items():
        for r in res.get("results", []):
            if "median_ms" in r:
                table.setdefault((r["H"], r["dtype"], r["mode"], r["B"]), {})[impl] = r["median_ms"]
    return table


def tf32_on(probe: dict) -> bool:
    """cudnn.allow_tf32 as the children ran (torch's default: on)."""
    for res in probe.get("children", {}).values():
        flags = res.get("flags")
        if flags and "cudnn.allow_tf32" in flags:
            return bool(flags["cudnn.allow_tf32"])
    return True


def build_configs(probe: dict, model: Model, lengths_of) -> tuple[tuple, list[Config]]:
    """Every configuration the probe timed on at least one of our paths, with plan.h's answers.
    lengths_of(B, H, T) gives the probe's lengths."""
    T = probe["args"]["T"]
    dev = {**DEFAULT_DEVICE, **{k: v for k, v in probe.get("device", {}).items() if v}}
    tf32 = tf32_on(probe)
    configs, lines = [], []
    for (H, dtype, mode, B), meas in sorted(measured_table(probe).items()):
        if dtype not in DTYPE_BYTES or not any(i in meas for i in OURS):
            continue
        sb, ab = DTYPE_BYTES[dtype]
        mma_allowed = dtype != "float64" and (dtype != "float32" or tf32)
        gemm_tc = sb != 4 or tf32
        n = running_rows([int(v) for v in lengths_of(B, H, T)])
        c = Config(H, dtype, mode, B, meas, mma_allowed)
        for pname in MODE_PASSES[mode]:
            for mma in (False, True):
                lines.append(
                    f"{B} {H} 1 {PASSES[pname]} {sb} {ab} {int(gemm_tc)} {int(mma)} 3 "
                    f"{dev['sms']} {dev['smem_per_block_optin']} {len(n)} {' '.join(map(str, n))}"
                )
        configs.append(c)
    consts, answers = model.query(lines)
    it = iter(answers)
    for c in configs:
        for pname in MODE_PASSES[c.mode]:
            c.passes[pname] = {"exact": next(it), "tc": next(it)}
    return consts, configs


# ---- The model as a function of the scales ------------------------------------------------
def theta0(consts: tuple) -> np.ndarray:
    _, host, kernel = consts
    return np.array([1, 1, 1, 1, 1, host, kernel, 1], dtype=float)


def persistent_row(ps: Pass, mma: bool, clock: float, summed: bool = True) -> np.ndarray:
    """The persistent kernel's time (us) as a linear function of the scales."""
    t = ps.summed if summed else ps.full
    row = np.zeros(len(PARAMS))
    row[0], row[1], row[4] = t[0], t[1], t[3]
    row[3 if mma else 2] = t[2]
    return row / (clock * 1e3)


def fallback_step(ps: Pass, th: np.ndarray) -> float:
    host, kernel, gemm = ps.fallback
    return max(th[5], th[6] + th[7] * gemm)


def fallback_row(ps: Pass, th: np.ndarray, steps: int) -> np.ndarray:
    """steps fallback steps (us), linear in the scales on the side of the max that binds at th."""
    row = np.zeros(len(PARAMS))
    gemm = ps.fallback[2]
    if th[5] >= th[6] + th[7] * gemm:
        row[5] = steps
    else:
        row[6], row[7] = steps, steps * gemm
    return row


def kernel_of(c: Config, impl: str) -> str:
    """Which persistent kernel a probe child ran: tensor cores where allowed (forced on)."""
    return "tc" if impl == "persistent" and c.mma_allowed else "exact"


def modelled_us(c: Config, impl: str, th: np.ndarray, clock: float, T: int) -> float:
    """A path's modelled recurrence time for the whole call (us), all passes."""
    total = 0.0
    for kernels in c.passes.values():
        if impl == "fallback":
            total += T * fallback_step(kernels["exact"], th)
        else:
            k = kernel_of(c, impl)
            total += float(persistent_row(kernels[k], k == "tc", clock) @ th)
    return total


def auto_choice(c: Config, th: np.ndarray, clock: float) -> list[str]:
    """auto's path per pass with the scales th, as choose() and plan.h decide: per kernel,
    persistent where it fits and its full-B step is cheaper than the fallback's; then
    prefer_tensor_cores (unforced)."""
    out = []
    for kernels in c.passes.values():
        picks = {}
        for k in ("exact", "tc") if c.mma_allowed else ("exact",):
            ps = kernels[k]
            p_us = float(persistent_row(ps, k == "tc", clock, summed=False) @ th)
            runs = ps.fits and p_us < fallback_step(ps, th)
            picks[k] = (runs, p_us)
        exact_runs, exact_us = picks["exact"]
        tc_runs, tc_us = picks.get("tc", (False, 0.0))
        if tc_runs and (not exact_runs or tc_us <= exact_us):
            out.append("persistent")
        elif exact_runs:
            out.append("persistent_exact" if c.mma_allowed else "persistent")
        else:
            out.append("fallback")
    return out


def check_against_plan(configs: list[Config], th0: np.ndarray, clock: float) -> list[str]:
    """With today's constants Python must choose as plan.h does (its choose_path per kernel and
    prefer_tensor_cores). Returns the disagreements."""
    bad = []
    for c in configs:
        for (pname, kernels), got in zip(c.passes.items(), auto_choice(c, th0, clock)):
            ex, tc = kernels["exact"], kernels["tc"]
            tc_runs = c.mma_allowed and tc.path == 1
            if tc_runs and (ex.path != 1 or tc.persistent_us <= ex.persistent_us):
                want = "persistent"
            elif ex.path == 1:
                want = "persistent_exact" if c.mma_allowed else "persistent"
            else:
                want = "fallback"
            for k in ("exact", "tc"):
                ps = kernels[k]
                if ps.fits:
                    p_us = float(persistent_row(ps, k == "tc", clock, summed=False) @ th0)
                    if abs(p_us - ps.persistent_us) > 1e-6 * max(1.0, ps.persistent_us):
                        bad.append(f"{c.H} {c.dtype} {c.mode} B={c.B} {pname} {k}: {p_us}")
                if abs(fallback_step(ps, th0) - ps.fallback_us) > 1e-9 * max(1.0, ps.fallback_us):
                    bad.append(f"{c.H} {c.dtype} {c.mode} B={c.B} {pname} fallback")
            if got != want:
                bad.append(f"{c.H} {c.dtype} {c.mode} B={c.B} {pname}: {got} vs plan.h {want}")
    return bad


def compared(configs: list[Config]):
    """(configuration, persistent variant) pairs whose difference from the fallback was measured
    and which the model can price (the kernel fits every pass)."""
    for c in configs:
        if "fallback" not in c.measured:
            continue
        for impl in ("persistent", "persistent_exact"):
            k = kernel_of(c, impl)
            if impl in c.measured and all(ks[k].fits for ks in c.passes.values()):
                yield c, impl


def modelled_diff_ms(c: Config, impl: str, th: np.ndarray, clock: float, T: int) -> float:
    return (modelled_us(c, impl, th, clock, T) - modelled_us(c, "fallback", th, clock, T)) / 1e3


def residual(configs: list[Config], th: np.ndarray, clock: float, T: int) -> float:
    """rms over compared pairs of (modelled - measured difference) / the fallback's time."""
    r = [
        (modelled_diff_ms(c, i, th, clock, T) - (c.measured[i] - c.measured["fallback"]))
        / c.measured["fallback"]
        for c, i in compared(configs)
    ]
    return float(np.sqrt(np.mean(np.square(r)))) if r else float("nan")


def fit(configs: list[Config], th0: np.ndarray, clock: float, T: int, ridge: float = 1e-3):
    """The scales fitted to the measured differences: (theta, equations used)."""
    th = th0.copy()
    lo, hi = th0 * 0.02, th0 * 50
    pairs = list(compared(configs))
    if not pairs:
        return th, 0
    for _ in range(20):
        rows, ys = [], []
        for c, impl in pairs:
            fb = c.measured["fallback"]
            k = kernel_of(c, impl)
            f_row = sum(fallback_row(ks["exact"], th, T) for ks in c.passes.values())
            p_row = sum(persistent_row(ks[k], k == "tc", clock) for ks in c.passes.values())
            w = 1.0 / (fb * 1e3)
            rows.append((p_row - f_row) * w)
            ys.append((c.measured[impl] - fb) * 1e3 * w)
        A = np.vstack(rows + [np.diag(np.sqrt(ridge) / th0)])
        y = np.concatenate([ys, np.sqrt(ridge) * np.ones(len(th0))])
        new = np.clip(np.linalg.lstsq(A, y, rcond=None)[0], lo, hi)
        done = np.allclose(new, th, rtol=1e-9, atol=0)
        th = new
        if done:
            break
    return th, len(pairs)


def fastest(c: Config) -> str | None:
    ours = {i: c.measured[i] for i in OURS if i in c.measured}
    if not c.mma_allowed:
        ours.pop("persistent_exact", None)  # the same kernel as `persistent`
    return min(ours, key=ours.get) if ours else None


def plan_lines(th0: np.ndarray, th: np.ndarray) -> list[tuple[str, str, str]]:
    """(constant, before, after) for plan.h from the fitted scales."""
    s = th / th0

    def fmt(v):
        return f"{v:.4g}"

    return [
        ("CostModel::kGridSyncCycles", "3000", fmt(3000 * s[0])),
        ("CostModel::kPassCycles", "1000", fmt(1000 * s[1])),
        ("CostModel::kL2BytesPerCycle", "24", fmt(24 / s[1])),
        ("CostModel::kCudaCoreScale", "1", fmt(s[2])),
        ("CostModel::kMmaScale", "1", fmt(s[3])),
        (
            "CostModel::kPointwiseCycles",
            "{400, 600, 800}",
            "{" + ", ".join(fmt(v * s[4]) for v in (400, 600, 800)) + "}",
        ),
        ("CostModel::kFallbackHostUs", fmt(th0[5]), fmt(th[5])),
        ("CostModel::kFallbackKernelUs", fmt(th0[6]), fmt(th[6])),
        ("CostModel::kGemm* (all four)", "x1", f"x{fmt(1 / s[7])}"),
    ]


def report(probe: dict, consts: tuple, configs: list[Config]) -> tuple[str, str]:
    clock = consts[0]
    T = probe["args"]["T"]
    th0 = theta0(consts)
    bad = check_against_plan(configs, th0, clock)
    if bad:
        raise AssertionError("Python's choice differs from plan.h's:\n" + "\n".join(bad[:20]))
    th, eq = fit(configs, th0, clock, T)
    rms0, rms = residual(configs, th0, clock, T), residual(configs, th, clock, T)
    dev = probe.get("device", {})
    lines = [
        f"# Path-choice calibration from the timing probe ({dev.get('name', 'device unknown')}, "
        f"{dev.get('sms', DEFAULT_DEVICE['sms'])} SMs; T={T})",
        "",
        f"Fitted to {eq} measured differences (persistent - fallback). Residual rms, relative "
        f"to the fallback's time: {rms0:.3f} with today's constants, {rms:.3f} fitted.",
        "",
        "| constant in csrc/cuda/plan.h | today | fitted |",
        "|---|---:|---:|",
    ]
    lines += [f"| `{n}` | {a} | {b} |" for n, a, b in plan_lines(th0, th)]
    lines += [
        "",
        "Per configuration: measured ms; persistent - fallback in ms, modelled today / fitted / "
        "measured; the fastest of our paths measured; auto's choice per pass today and fitted "
        "(a train step's forward, then backward).",
        "",
        "| H | dtype | mode | B | persistent | persistent_exact | fallback | auto | "
        "tc - fb: today / fitted / measured | exact - fb: today / fitted / measured | fastest | "
        "auto today | auto fitted |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|---|---|---|",
    ]
    right = {"today": 0, "fitted": 0}
    lost = {"today": 0.0, "fitted": 0.0}
    n = 0

    def ms(c, i):
        return f"{c.measured[i]:.3f}" if i in c.measured else "-"

    for c in configs:
        priced = {i for cc, i in compared([c])}
        diffs = [
            f"{modelled_diff_ms(c, i, th0, clock, T):+.3f} / "
            f"{modelled_diff_ms(c, i, th, clock, T):+.3f} / "
            f"{c.measured[i] - c.measured['fallback']:+.3f}"
            if i in priced
            else "-"
            for i in ("persistent", "persistent_exact")
        ]
        best = fastest(c)
        picks = {}
        for tag, t in (("today", th0), ("fitted", th)):
            choice = auto_choice(c, t, clock)
            picks[tag] = ", ".join(choice)
            if best is not None and len(set(choice)) == 1 and choice[0] in c.measured:
                right[tag] += choice[0] == best
                lost[tag] += c.measured[choice[0]] - c.measured[best]
        n += best is not None
        lines.append(
            f"| {c.H} | {c.dtype} | {c.mode} | {c.B} | {ms(c, 'persistent')} | "
            f"{ms(c, 'persistent_exact')} | {ms(c, 'fallback')} | {ms(c, 'auto')} | "
            f"{diffs[0]} | {diffs[1]} | {best or '-'} | {picks['today']} | {picks['fitted']} |"
        )
    key = (
        f"KEY: calibration: auto picks the fastest measured path in {right['today']}/{n} "
        f"configurations today, {right['fitted']}/{n} fitted (time lost {lost['today']:.2f} / "
        f"{lost['fitted']:.2f} ms); residual {rms0:.2f} -> {rms:.2f}"
    )
    lines += [
        "",
        "A choice that mixes paths across a train step's passes counts as neither right nor "
        "wrong (the probe times each path for both passes). The fitted constants are a "
        "proposal: put them into plan.h, rerun tests/test_plan.py (its expectations follow "
        "the model) and the probe.",
        "",
        key,
    ]
    return "\n".join(lines), key


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("probe", help="gpu_probe.py's --out folder, or its probe.json")
    p.add_argument("--out", default=None, help="also write the report here (markdown)")
    a = p.parse_args(argv)
    sys.path.insert(0, HERE)
    from gpu_children import import_path

    import_path()
    from gpu_probe import probe_lengths

    probe = load_probe(a.probe)
    with tempfile.TemporaryDirectory(prefix="gpu_calibrate") as tmp:
        consts, configs = build_configs(probe, Model(tmp), probe_lengths)
    if not configs:
        print("KEY: calibration: the probe timed none of our paths")
        return 1
    md, key = report(probe, consts, configs)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
