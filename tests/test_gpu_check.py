"""benchmarks/gpu_check.sh's plumbing, by its CPU dry run (GPU_CHECK_DRY_RUN=1): what the device tool
brings back (at most 8 files, two folders deep, plain names), the summary printed last, the archive
rewritten after every stage, a hung stage killed while later ones still run, a spent budget; and
the pure logic of the smoke test's and the timing probe's reports."""

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
if not SCRIPT.exists():
    pytest.skip(
        "benchmarks/ is not next to tests/ (not a source checkout)", allow_module_level=True
    )
missing = [t for t in ("bash", "timeout", "tar") if shutil.which(t) is None]
if missing:
    pytest.skip(f"the GPU check needs {missing}", allow_module_level=True)
sys.path.insert(0, str(REPO / "benchmarks"))

NAME = re.compile(r"[A-Za-z0-9._-]+")
ROW = re.compile(r"^\| (\w+) \| ([^|]+?) \| (\d+) \|", re.MULTILINE)


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k != "VARLEN_RNN_TENSOR_CORES"}
    env = dict(
        env,
        GPU_CHECK_DRY_RUN="1",
        PYTHON=sys.executable,
        GPU_CHECK_WORK=str(tmp_path / "work"),
        GPU_CHECK_KILL_AFTER="1",
    )
    env.update(extra)
    return env


def _check(tmp_path, budget, **extra):
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out), str(budget)],
        check=False,
        env=_env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, out, time.monotonic() - t0


def _statuses(summary: str) -> dict:
    """{stage: (status, seconds)} from the stage table (the sections below have tables too)."""
    table = summary.split("\n## ", 1)[0]
    return {m.group(1): (m.group(2), int(m.group(3))) for m in ROW.finditer(table)}


def _assert_device_tool_can_return(out: Path):
    entries = list(out.rglob("*"))
    files = [p for p in entries if p.is_file()]
    assert 0 < len(files) <= 8, [str(p) for p in files]
    for p in entries:
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3, f"{rel} is more than two folders down"
        assert all(NAME.fullmatch(part) for part in rel.parts), f"{rel} has a name the tool refuses"
        assert not p.is_symlink(), rel


def _archive(out: Path) -> dict:
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        return {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}


def _archived_text(out: Path, name: str) -> str:
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        return tar.extractfile("./" + name).read().decode()


def test_dry_run_survives_a_hang_and_a_failure(tmp_path):
    proc, out, _ = _check(
        tmp_path,
        300,
        GPU_CHECK_STAGES="env smoke probe memcheck bench",
        GPU_CHECK_FAIL="smoke",
        GPU_CHECK_HANG="probe",
        GPU_CHECK_LIMITS="probe=2",
        GPU_CHECK_SANITIZER="refuse",
    )
    assert proc.returncode != 0, "a failed and a timed-out stage must fail the run"
    _assert_device_tool_can_return(out)
    summary = (out / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip()), "summary.md must be printed last"
    st = _statuses(summary)
    assert list(st) == ["env", "smoke", "probe", "memcheck", "bench"]
    assert st["env"][0] == "ok" and "torch " + torch.__version__ in summary
    assert st["smoke"][0] == "failed (exit 7)"
    assert st["probe"][0] == "timed out (after 2s)"
    assert st["probe"][1] <= 2 + 1 + 2, "SIGTERM was ignored: the kill must follow within the grace"
    assert st["memcheck"][0].startswith("not run (") and "Device not supported" in st["memcheck"][0]
    assert st["bench"][0] == "ok", "the stage after the hang must still run"
    names = {p.name for p in out.iterdir()}
    stems = {n.rsplit(".", 1)[0] for n in names if n.startswith("quick_cpu")}
    assert len(stems) == 1, names
    stem = stems.pop()
    assert {f"{stem}.{e}" for e in ("json", "md", "png")} <= names
    archived = _archive(out)
    for stage in st:
        assert f"{stage}.log" in archived, f"{stage}.log missing from the archive"
    assert "simulated hang" in _archived_text(out, "probe.log")
    assert _statuses(_archived_text(out, "summary.md")) == st, "the archive holds the final summary"


def test_a_cut_off_run_keeps_every_finished_stage(tmp_path):
    """Killed from outside (as the device tool does at its limit) while a stage hangs: the
    archive written after the previous stage is complete, and the summary says which one ran."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), str(out), "300"],
        env=_env(tmp_path, GPU_CHECK_STAGES="resources smoke bench", GPU_CHECK_HANG="smoke"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            summary = out / "summary.md"
            if summary.exists() and "| smoke | running" in summary.read_text():
                break
            time.sleep(0.2)
        else:
            pytest.fail("the smoke stage never showed as running")
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _assert_device_tool_can_return(out)
    archived = _archive(out)
    assert "resources.log" in archived and "| kernel |" in _archived_text(out, "resources.log")
    st = _statuses(_archived_text(out, "summary.md"))
    assert st["resources"][0] == "ok" and st["smoke"][0].startswith("running")
    assert "bench" not in st


def test_a_spent_budget_skips_the_later_stages(tmp_path):
    proc, out, seconds = _check(
        tmp_path, 16, GPU_CHECK_STAGES="env smoke bench", GPU_CHECK_HANG="env"
    )
    summary = (out / "summary.md").read_text()
    st = _statuses(summary)
    # 16 s less the 8 s kept back for the summary: env gets 8 s, then nothing is left. The
    # script counts whole seconds ($SECONDS), so the start-up before env (nvidia-smi, git) may
    # already have crossed a second boundary on a loaded machine: 7 s then.
    assert st["env"][0] in ("timed out (after 8s)", "timed out (after 7s)"), st["env"]
    for stage in ("smoke", "bench"):
        assert st[stage][0].startswith("skipped (no time left"), st[stage]
    assert seconds < 16 + 5
    assert proc.returncode != 0 and proc.stdout.rstrip().endswith(summary.rstrip())
    _assert_device_tool_can_return(out)


def test_a_prebuilt_extension_is_used_only_where_it_matches(tmp_path):
    """benchmarks/gpu_prebuild.sh's folder, carried to the GPU machine, stands in for the build
    there only when it was built from the same csrc/ and setup.py, for this Python and this
    torch (the dry run's build stage says which it would do and why)."""
    fingerprint = subprocess.run(
        ["bash", "-c", '. "$0/benchmarks/gpu_prebuilt.sh"; sources_fingerprint "$0"', str(REPO)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint), fingerprint
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    cases = {
        "match": (fingerprint, suffix, torch.__version__, "would use the prebuilt extension"),
        "sources": ("0" * 16, suffix, torch.__version__, "built from other sources"),
        "python": (
            fingerprint,
            ".cpython-299-x86_64-linux-gnu.so",
            torch.__version__,
            "another Python",
        ),
        "torch": (fingerprint, suffix, "1.0.0", "built against torch 1.0.0, here torch"),
    }
    for name, (fp, ext, built, expected) in cases.items():
        pre = tmp_path / name / "prebuilt"
        pre.mkdir(parents=True)
        (pre / f"_C{ext}").write_bytes(b"")
        (pre / "_build_info.py").write_text(f"TORCH_VERSION = '{built}'\nWITH_CUDA = True\n")
        (pre / "fingerprint").write_text(fp + "\n")
        proc, out, _ = _check(
            tmp_path / name, 60, GPU_CHECK_STAGES="build", GPU_CHECK_PREBUILT=str(pre)
        )
        log = (tmp_path / name / "work" / "build.log").read_text()
        assert expected in log, (name, log)
        assert _statuses((out / "summary.md").read_text())["build"][0] == "ok", name


def test_a_cooperative_launch_refused_under_the_sanitizer_is_not_a_finding(tmp_path):
    """compute-sanitizer's reserved resources may make the driver refuse the persistent kernel's
    cooperative launch; with VARLEN_RNN_CUDA_PATH=persistent the op then raises. The stage says
    the persistent kernel did not run under the tool, and still checks the fallback."""
    proc, out, _ = _check(
        tmp_path, 300, GPU_CHECK_STAGES="memcheck", GPU_CHECK_SANITIZER="refuse-cooperative"
    )
    summary = (out / "summary.md").read_text()
    st = _statuses(summary)
    assert st["memcheck"][0] == "ok", (st, proc.stdout[-2000:])
    row = next(line for line in summary.splitlines() if line.startswith("| memcheck |"))
    assert "persistent: not run (the driver refused its cooperative launch under memcheck)" in row
    assert "fallback: ERROR SUMMARY: 0 errors" in row, row
    # The text the script looks for is what the ops raise: paths.cuh for a launch refused now,
    # call.h (with launch.h's reason) for one refused earlier in the process.
    wanted = re.search(r'^COOPERATIVE_REFUSED="([^"]+)"', SCRIPT.read_text(), re.MULTILINE)
    assert wanted, "gpu_check.sh no longer names the refusal it looks for"
    src = {
        name: re.sub(r'"\s*\n\s*"', "", (REPO / "csrc" / "cuda" / name).read_text())
        for name in ("paths.cuh", "call.h", "launch.h")
    }
    assert wanted.group(1) in src["paths.cuh"]
    assert 'persistent kernel cannot run: ", choice.why' in src["call.h"]
    assert '"the driver refused its cooperative launch (' in src["launch.h"]


def test_a_sanitizer_run_of_the_persistent_kernel_is_reported_as_run(tmp_path):
    """Where nothing refuses the launch, the stage reports the persistent kernel's sanitizer
    summary, not "not run" (the H200's first run said "not run" for runs that had happened: the
    refusal's text was an unexported variable, empty in the stage's shell, and an empty pattern
    matches every log)."""
    proc, out, _ = _check(tmp_path, 300, GPU_CHECK_STAGES="racecheck")
    summary = (out / "summary.md").read_text()
    assert _statuses(summary)["racecheck"][0] == "ok", proc.stdout[-2000:]
    row = next(line for line in summary.splitlines() if line.startswith("| racecheck |"))
    assert re.search(r"persistent: (ERROR|RACECHECK) SUMMARY", row) and "not run" not in row, row


def _knob(out: Path, stage: str) -> str:
    """The VARLEN_RNN_TENSOR_CORES a stage's processes inherited (its log's first line)."""
    return _archived_text(out, f"{stage}.log").splitlines()[0]


@pytest.mark.parametrize("mma_fails", [False, True])
def test_the_wrapper_test_runs_first_and_a_failure_turns_tensor_cores_off(tmp_path, mma_fails):
    """The mma stage runs right after the build whatever order GPU_CHECK_STAGES lists; when it
    does not pass, every later stage inherits VARLEN_RNN_TENSOR_CORES=0 and the summary says so
    on top. (The later stage is resources, the cheapest: the smoke stage's five processes are
    test_dry_run_survives_a_hang_and_a_failure's.)"""
    extra = {"GPU_CHECK_FAIL": "mma"} if mma_fails else {}
    proc, out, _ = _check(tmp_path, 300, GPU_CHECK_STAGES="resources mma build env", **extra)
    summary = (out / "summary.md").read_text()
    st = _statuses(summary)
    assert list(st) == ["env", "build", "mma", "resources"]
    for stage in ("env", "build", "mma"):
        assert _knob(out, stage) == "VARLEN_RNN_TENSOR_CORES=unset", stage
    off = "TENSOR CORES OFF" in summary
    if mma_fails:
        assert st["mma"][0] == "failed (exit 7)" and proc.returncode != 0
        assert off and summary.index("TENSOR CORES OFF") < summary.index("| stage |")
        assert _knob(out, "resources") == "VARLEN_RNN_TENSOR_CORES=0"
        assert st["resources"][0] == "ok", st["resources"]
    else:
        assert st["mma"][0] == "ok", st["mma"]
        row = next(line for line in summary.splitlines() if line.startswith("| mma |"))
        assert "skipped" in row and "passed" not in row, row  # no GPU: the wrapper tests skip
        assert not off
        assert _knob(out, "resources") == "VARLEN_RNN_TENSOR_CORES=unset"
        assert "mma.xml" in _archive(out), "the wrapper test's junit XML is archived"


def test_probe_crossover_is_the_first_batch_where_persistent_loses():
    from gpu_probe import crossovers

    Bs = [1, 8, 64, 256]
    table = {}
    for B, (p, f) in zip(Bs, [(1.0, 2.0), (1.0, 1.5), (3.0, 2.0), (1.0, 2.0)]):
        table[(256, "float32", "train", B)] = {"persistent": p, "fallback": f}
    for B in Bs:
        table[(1024, "float32", "train", B)] = {"persistent": 2.0, "fallback": 1.0}
        table[(256, "bfloat16", "fwd", B)] = {"persistent": 1.0, "fallback": 1.5}
    got = crossovers(table, Bs)
    assert got[(256, "float32", "train")][0] == "64"  # a later win does not move it
    assert got[(1024, "float32", "train")][0] == "1"
    assert got[(256, "bfloat16", "fwd")][0] == "none"
    assert "B64 1.50" in got[(256, "float32", "train")][1]


def test_probe_reports_a_crossover_for_each_persistent_variant():
    from gpu_probe import crossovers, render

    def child(impl, times):
        return {
            "results": [
                {"H": 256, "dtype": "bfloat16", "mode": "train", "B": B, "median_ms": t}
                for B, t in zip((1, 8, 64), times)
            ]
        }

    merged = {
        "persistent": child("persistent", (1.0, 1.0, 1.0)),
        "persistent_exact": child("persistent_exact", (1.0, 3.0, 4.0)),
        "fallback": child("fallback", (2.0, 2.0, 2.0)),
    }
    impls = ["persistent", "persistent_exact", "fallback"]
    md, key = render(merged, impls, [1, 8, 64], 16)
    assert "- H=256 bfloat16 train, persistent: B=none (faster at every B)" in md
    assert "- H=256 bfloat16 train, persistent_exact: B=8;" in md
    assert key == "KEY: crossover B tc H256 bf16 train none; exact H256 bf16 train 8"
    table = {(256, "bfloat16", "train", 1): {"persistent_exact": 3.0, "fallback": 2.0}}
    assert crossovers(table, [1], "persistent_exact")[(256, "bfloat16", "train")][0] == "1"


def test_probe_per_step_time_counts_the_steps_that_ran():
    """The µs/step column divides by the longest of the configuration's lengths, the steps the
    recurrence ran, not by T (at B = 1 the one length can be a third of T)."""
    from gpu_probe import probe_lengths, render

    steps = int(probe_lengths(1, 256, 256).max())
    assert steps < 256  # the case this guards: B = 1 drew a short length
    merged = {
        "persistent_exact": {
            "results": [
                {"H": 256, "dtype": "float32", "mode": "fwd", "B": 1, "median_ms": steps * 2e-3}
            ]
        }
    }
    md, _ = render(merged, ["persistent_exact"], [1], 256)
    assert f"| 2.0 ({steps}) |" in md


def test_probe_one_step_calls_split_a_call_into_fixed_cost_and_steps():
    """A one-step call's time is the fixed cost; the rest of the full call's time, over the
    steps after the first, is a step's."""
    from gpu_probe import one_step_section, probe_lengths

    steps = int(probe_lengths(8, 1024, 256).max())
    full = 0.1 + (steps - 1) * 5e-3  # 100 us fixed, 5 us a step
    merged = {
        "persistent_exact": {
            "results": [
                {"H": 1024, "dtype": "float32", "mode": "fwd", "B": 8, "median_ms": full},
                {"H": 1024, "dtype": "float32", "mode": "train", "B": 8, "median_ms": 9.0},
            ],
            "one_step": [{"H": 1024, "dtype": "float32", "mode": "fwd", "B": 8, "median_ms": 0.1}],
        },
        "cudnn": {"results": [], "one_step": [{"H": 1024, "B": 1, "error": "x"}]},
        "fallback": {"results": []},
    }
    md, key = one_step_section(merged, 256)
    row = (
        f"| persistent_exact | 1024 | 8 | 0.100 | {full:.3f} ({steps}) | {0.1 / full:.0%} | 5.00 |"
    )
    assert row in md
    assert "cudnn |" not in md  # its one-step call raised: no row
    assert key == "KEY: one-step call persistent_exact H1024 B8 100 us"
    assert one_step_section({"fallback": {"results": []}}, 256) == ("", "")


def test_probe_compares_each_time_with_a_previous_probe():
    from gpu_probe import compare

    def run(times):
        return {
            "results": [
                {"H": 256, "dtype": "float32", "mode": "fwd", "B": B, "median_ms": t}
                for B, t in zip((1, 8), times)
            ]
        }

    previous = {
        "device": {"name": "GPU X"},
        "commit": "abc1234",
        "children": {"persistent_exact": run((2.0, 3.0)), "cudnn": run((4.0, 4.0))},
    }
    now = {
        "persistent_exact": run((1.0, 3.0)),
        "cudnn": run((4.0, 5.0)),
        "fallback": run((1.0, 1.0)),
    }
    md, key = compare(now, previous, "old/probe.json")
    assert "`old/probe.json`: GPU X, abc1234" in md
    assert "| persistent_exact | 256 | float32 | fwd | 1 | 2.000 | 1.000 | 2.00x |" in md
    assert "| cudnn | 256 | float32 | fwd | 8 | 4.000 | 5.000 | 0.80x |" in md
    assert "fallback" not in md  # not in the previous probe
    assert key == (
        "KEY: vs previous probe, median (range) of previous / now: "
        "cudnn 0.90x (0.80-1.00); persistent_exact 1.50x (1.00-2.00)"
    )
    md, key = compare(now, {"children": {}}, "none.json")
    assert "No configuration in common" in md and key.endswith("none in common")


def test_smoke_comparison_flags_a_wrong_path_and_a_missing_one():
    from gpu_smoke import SIZES, case_name, compare, run_one

    c = SIZES["tiny"][0]
    tag = f"{case_name(c)}/float64"
    ref = run_one(c, "float64", "cpu", reference=True)
    cpu = run_one(c, "float64", "cpu")
    wrong = [t * (1 + 1e-6) for t in cpu]
    results = {
        "cpu": {"runs": {f"{tag}/ref": ref, f"{tag}/cpu": cpu}},
        "persistent": {"runs": {f"{tag}/persistent": cpu}},
        "fallback": {"runs": {f"{tag}/fallback": wrong}},
    }
    _, checks = compare(results, ["persistent", "fallback"], "tiny", ("float64",))
    verdict = {name: ok for name, _, _, ok in checks if name.startswith(case_name(c))}
    assert verdict[f"{tag}: persistent vs float64 reference"]
    assert not verdict[f"{tag}: fallback vs float64 reference"]
    assert not verdict[f"{tag}: persistent vs fallback"]
    assert verdict[f"{tag}: persistent output past each length is 0"]
    _, checks = compare({"cpu": results["cpu"]}, ["persistent"], "tiny", ("float64",))
    assert any(
        name.endswith("persistent vs float64 reference") and not ok for name, _, _, ok in checks
    )


def test_smoke_holds_only_tensor_core_results_to_the_looser_tolerance():
    """A bfloat16 error of 4e-2 (above TOL, within MMA_TOL) passes for `persistent` (tensor
    cores) and fails for `persistent_exact`; persistent_tf32 runs float32 only and is not asked
    for bf16."""
    from gpu_smoke import MMA_TOL, SIZES, TOL, case_name, compare, run_one

    assert TOL["bfloat16"] < 4e-2 <= MMA_TOL["bfloat16"]
    c = SIZES["tiny"][0]
    tag = f"{case_name(c)}/bfloat16"
    ref = run_one(c, "float64", "cpu")
    off = [t * (1 + 4e-2) for t in ref]
    results = {
        "cpu": {"runs": {f"{tag}/ref": ref}},
        "persistent": {"runs": {f"{tag}/persistent": off}},
        "persistent_exact": {"runs": {f"{tag}/persistent_exact": off}},
        "persistent_tf32": {"runs": {}},
    }
    paths = ["persistent", "persistent_exact", "persistent_tf32"]
    rows, checks = compare(results, paths, "tiny", ("bfloat16",))
    verdict = {name: ok for name, _, _, ok in checks if name.startswith(tag)}
    assert verdict[f"{tag}: persistent vs float64 reference"]
    assert not verdict[f"{tag}: persistent_exact vs float64 reference"]
    assert verdict[f"{tag}: persistent vs persistent_exact"]
    assert not any("persistent_tf32" in name for name in verdict), verdict
    assert rows[0][4] == "n/a"  # persistent_tf32's column
