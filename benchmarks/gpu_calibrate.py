"""Calibrate the CUDA path choice (csrc/cuda/plan.h's cost model) from a GPU run's timing probe.

    python benchmarks/gpu_calibrate.py PROBE_DIR_OR_JSON [--out calibration.md]

gpu_probe.py times one GRU layer per configuration (H, dtype, mode, B) on each of our paths: the
persistent kernel on tensor cores (`persistent`), the exact one (`persistent_exact`), the exact
one with every row in each block (`persistent_unsliced`, VARLEN_RNN_PERSISTENT_ROW_SLICES=1) and
the fallback. For each configuration this rebuilds what those paths ran: the probe's lengths, the
rows still running at each step, and the cut plan.h makes on the probe's device (a probe from
before row slices, without probe.json's "row_slices", timed one slice everywhere: its cuts are
priced so). plan.h itself,
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
from typing import NamedTuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")

# (storage bytes, op-math bytes) per dtype the probe runs.
DTYPE_BYTES = {"float64": (8, 8), "float32": (4, 4), "bfloat16": (2, 4), "float16": (2, 4)}
PASSES = {"inference": 0, "training": 1, "backward": 2}
MODE_PASSES = {"fwd": ("inference",), "train": ("training", "backward")}
OURS = ("persistent", "persistent_exact", "persistent_unsliced", "fallback")
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
// First line: the constants (Constants below, in order). Then per problem line
//   In:  B H D pass storage_bytes acc_bytes gemm_tc mma_allowed gates slices sms smem k
//        n_0 .. n_{k-1}   (slices: Problem::row_slices, 0 the model's)
//   Out: auto's pick (0 fallback, 1 the exact persistent kernel, 2 the tensor-core one, as
//        prefer_tensor_cores picks), then for the exact kernel, the tensor-core one and the
//        exact one in one row slice each: fits persistent_us fallback_us, the full-B step terms
//        (sync load compute pointwise), the same summed over n_0 .. n_{k-1}, the fallback terms
//        (host kernel gemm).
void put(const Problem& p, const Device& dev, const Choice& c, const std::vector<long long>& n) {
  StepTerms full, sum;
  if (c.fits) {
    const Cut& u = c.cut;
    full = cut_step_terms(p, u);
    for (long long rows : n) {
      Problem q = p;
      q.B = rows;
      const StepTerms t = cut_step_terms(q, u);  // the largest row slice's rows
      sum.sync += t.sync, sum.load += t.load, sum.compute += t.compute;
      sum.pointwise += t.pointwise;
    }
  }
  const FallbackTerms f = fallback_step_terms(p, dev);
  std::printf(" %d %.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g",
              int(c.fits), c.persistent_us, c.fallback_us, full.sync, full.load, full.compute,
              full.pointwise, sum.sync, sum.load, sum.compute, sum.pointwise, f.host, f.kernel,
              f.gemm);
}
int main() {
  std::printf("%.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g\n",
              CostModel::kClockGHz, CostModel::kFallbackHostUs, CostModel::kFallbackKernelUs,
              CostModel::kGridSyncCycles, CostModel::kPassCycles, CostModel::kL2BytesPerCycle,
              CostModel::kCudaCoreScale, CostModel::kMmaScale, CostModel::kPointwiseCycles[0],
              CostModel::kPointwiseCycles[1], CostModel::kPointwiseCycles[2]);
  long long B, H, D, pass, sb, ab, tc, allowed, gates, slices, sms, smem, k;
  while (std::scanf("%lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld", &B, &H,
                    &D, &pass, &sb, &ab, &tc, &allowed, &gates, &slices, &sms, &smem, &k) == 13) {
    std::vector<long long> n(k);
    for (auto& v : n) std::scanf("%lld", &v);
    Problem p{B, H, D, Pass(pass), sb, ab, tc != 0};
    p.gates = gates;
    p.row_slices = slices;
    Problem q = p;
    q.persistent_mma = true;
    Problem one = p;
    one.row_slices = 1;
    const Device dev{sms, smem, true, true};
    const Choice exact = choose_path(p, dev, Path::kAuto, 0);
    Choice mma = choose_path(q, dev, Path::kAuto, 0);
    mma.mma = true;  // as choose() in call.h marks the tensor-core kernel's choice
    const Choice pick = allowed ? prefer_tensor_cores(exact, mma, false) : exact;
    std::printf("%d", pick.path != Path::kPersistent ? 0 : pick.mma ? 2 : 1);
    put(p, dev, exact, n);
    put(q, dev, mma, n);
    put(one, dev, choose_path(one, dev, Path::kAuto, 0), n);
    std::printf("\n");
  }
}
"""


class Constants(NamedTuple):
    """plan.h's CostModel constants, as the driver was compiled with them."""

    clock_ghz: float
    fallback_host_us: float
    fallback_kernel_us: float
    grid_sync_cycles: float
    pass_cycles: float
    l2_bytes_per_cycle: float
    cuda_core_scale: float
    mma_scale: float
    pointwise_cycles: tuple


@dataclass
class Pass:
    """plan.h's answer for one pass of one configuration on one persistent kernel."""

    fits: bool
    persistent_us: float
    fallback_us: float
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
    # plan.h's own choice per pass with today's constants: "fallback", "exact" or "tc"
    plan_picks: list = field(default_factory=list)


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

    def query(self, lines: list[str]) -> tuple[Constants, list[tuple[str, Pass, Pass]]]:
        """plan.h's constants, and per problem line auto's pick ("fallback", "exact" or "tc")
        with the exact, the tensor-core and the one-slice exact kernel's answers."""
        r = subprocess.run(
            [self.exe], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True
        )
        out = r.stdout.splitlines()
        c = [float(v) for v in out[0].split()]
        consts = Constants(*c[:8], tuple(c[8:11]))
        answers = []
        for line in out[1:]:
            v = [float(x) for x in line.split()]
            kernels = [
                Pass(
                    fits=f[0] == 1,
                    persistent_us=f[1],
                    fallback_us=f[2],
                    full=np.array(f[3:7]),
                    summed=np.array(f[7:11]),
                    fallback=np.array(f[11:14]),
                )
                for f in (v[1:15], v[15:29], v[29:43])
            ]
            answers.append((("fallback", "exact", "tc")[int(v[0])], *kernels))
        return consts, answers


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


def build_configs(probe: dict, model: Model, lengths_of) -> tuple[Constants, list[Config]]:
    """Every configuration the probe timed on at least one of our paths, with plan.h's answers.
    lengths_of(B, H, T) gives the probe's lengths."""
    T = probe["args"]["T"]
    dev = {**DEFAULT_DEVICE, **{k: v for k, v in probe.get("device", {}).items() if v}}
    tf32 = tf32_on(probe)
    slices = 0 if "row_slices" in probe else 1  # before row slices: one slice everywhere
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
            lines.append(
                f"{B} {H} 1 {PASSES[pname]} {sb} {ab} {int(gemm_tc)} {int(mma_allowed)} 3 "
                f"{slices} {dev['sms']} {dev['smem_per_block_optin']} {len(n)} "
                f"{' '.join(map(str, n))}"
            )
        configs.append(c)
    consts, answers = model.query(lines)
    it = iter(answers)
    for c in configs:
        for pname in MODE_PASSES[c.mode]:
            pick, exact, tc, unsliced = next(it)
            c.passes[pname] = {"exact": exact, "tc": tc, "unsliced": unsliced}
            c.plan_picks.append(pick)
    return consts, configs


# ---- The model as a function of the scales ------------------------------------------------
def theta0(consts: Constants) -> np.ndarray:
    return np.array([1, 1, 1, 1, 1, consts.fallback_host_us, consts.fallback_kernel_us, 1])


def persistent_row(ps: Pass, mma: bool, clock: float, summed: bool = True) -> np.ndarray:
    """The persistent kernel's time (us) as a linear function of the scales."""
    t = ps.summed if summed else ps.full
    row = np.zeros(len(PARAMS))
    row[0], row[1], row[4] = t[0], t[1], t[3]
    row[3 if mma else 2] = t[2]
    return row / (clock * 1e3)


def fallback_step(ps: Pass, th: np.ndarray) -> float:
    return max(th[5], th[6] + th[7] * ps.fallback[2])


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
    """Which persistent kernel a probe child ran: tensor cores where allowed (forced on), the
    exact one in one row slice, or the exact one."""
    if impl == "persistent_unsliced":
        return "unsliced"
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
    """With today's constants Python must price and choose as plan.h does (choose_path per
    kernel, then prefer_tensor_cores, which the driver runs). Returns the disagreements."""
    impl = {"fallback": "fallback", "tc": "persistent"}
    bad = []
    for c in configs:
        got_all = auto_choice(c, th0, clock)
        for (pname, kernels), got, pick in zip(c.passes.items(), got_all, c.plan_picks):
            want = impl.get(pick, "persistent_exact" if c.mma_allowed else "persistent")
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
        for impl in ("persistent", "persistent_exact", "persistent_unsliced"):
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


def plan_lines(consts: Constants, th0: np.ndarray, th: np.ndarray) -> list[tuple[str, str, str]]:
    """(constant, today, fitted) for plan.h: today's values as the driver was compiled with them,
    scaled by the fitted scales."""
    s = th / th0

    def fmt(v):
        return f"{v:.4g}"

    def pair(name, today, scale):
        return (f"CostModel::{name}", fmt(today), fmt(today * scale))

    pw = consts.pointwise_cycles
    return [
        pair("kGridSyncCycles", consts.grid_sync_cycles, s[0]),
        pair("kPassCycles", consts.pass_cycles, s[1]),
        pair("kL2BytesPerCycle", consts.l2_bytes_per_cycle, 1 / s[1]),
        pair("kCudaCoreScale", consts.cuda_core_scale, s[2]),
        pair("kMmaScale", consts.mma_scale, s[3]),
        (
            "CostModel::kPointwiseCycles",
            "{" + ", ".join(fmt(v) for v in pw) + "}",
            "{" + ", ".join(fmt(v * s[4]) for v in pw) + "}",
        ),
        pair("kFallbackHostUs", th0[5], s[5]),
        pair("kFallbackKernelUs", th0[6], s[6]),
        ("CostModel::kGemm* (all four)", "x1", f"x{fmt(1 / s[7])}"),
    ]


def report(probe: dict, consts: Constants, configs: list[Config]) -> tuple[str, str]:
    clock = consts.clock_ghz
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
    lines += [f"| `{n}` | {a} | {b} |" for n, a, b in plan_lines(consts, th0, th)]
    lines += [
        "",
        "Per configuration: measured ms; persistent - fallback in ms, modelled today / fitted / "
        "measured; the fastest of our paths measured; auto's choice per pass today and fitted "
        "(a train step's forward, then backward).",
        "",
        "| H | dtype | mode | B | persistent | persistent_exact | persistent_unsliced | fallback | "
        "auto | tc - fb: today / fitted / measured | exact - fb: today / fitted / measured | "
        "unsliced - fb: today / fitted / measured | fastest | auto today | auto fitted |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|---|---|---|",
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
            for i in ("persistent", "persistent_exact", "persistent_unsliced")
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
            f"{ms(c, 'persistent_exact')} | {ms(c, 'persistent_unsliced')} | {ms(c, 'fallback')} | "
            f"{ms(c, 'auto')} | {diffs[0]} | {diffs[1]} | {diffs[2]} | {best or '-'} | "
            f"{picks['today']} | {picks['fitted']} |"
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
