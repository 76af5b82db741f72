"""A tiny run of benchmarks/bench.py's machinery, so the benchmark cannot rot unnoticed."""

import json
import os
import re
import sys

import pytest
import torch

BENCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
if not os.path.exists(os.path.join(BENCH_DIR, "bench.py")):
    pytest.skip(
        "benchmarks/ is not next to tests/ (not a source checkout)", allow_module_level=True
    )
sys.path.insert(0, BENCH_DIR)

import bench  # noqa: E402
import bench_report  # noqa: E402
from bench_cases import COMPETITORS, RAGGED, Bench, Case, make_lengths  # noqa: E402


@pytest.mark.parametrize("dist", ["uniform", "full", "skewed", "one_long"])
def test_lengths_in_range_and_unsorted_order_kept(dist):
    lengths = make_lengths(dist, 50, 40, torch.Generator().manual_seed(0))
    assert lengths.shape == (50,) and lengths.min() >= 1 and lengths.max() <= 40
    if dist != "uniform":
        assert lengths.max() == 40
    if dist == "skewed":
        assert (lengths <= 4).sum() >= 40  # most short
    if dist == "one_long":
        assert sorted(lengths.tolist()) == [1] * 49 + [40]  # T // 50 = 0, at least 1


def test_competitors_agree_with_baseline():
    b = Bench(Case(B=5, T=7, I=3, H=4, layers=2, bidirectional=True, dtype="float64"))
    assert b.max_abs_diff("varlen") < 1e-10
    assert b.max_abs_diff("varlen_packed") < 1e-10
    for mode in ("infer", "train"):
        for c in COMPETITORS:
            b.step(mode, c)()


def test_cli_smoke(tmp_path, capsys):
    rc = bench.main(
        [
            "--preset",
            "quick",
            "--limit",
            "1",
            "--rounds",
            "1",
            "--min-run-time",
            "0.01",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "speedup" in out and torch.__version__ in out
    [js] = tmp_path.glob("*.json")
    res = json.loads(js.read_text())
    assert res["machine"]["torch"] == torch.__version__ and res["machine"]["threads"] == 1
    [case] = res["cases"]
    for mode in ("infer", "train"):
        m = case["modes"][mode]
        assert set(m["median_s"]) == set(COMPETITORS) and all(t > 0 for t in m["median_s"].values())
        assert m["speedup"]["baseline"] == 1.0
        assert all(b > 0 for b in m["peak_bytes"].values())
    assert case["max_abs_diff"]["varlen"] < 1e-4
    md = next(tmp_path.glob("*.md")).read_text()
    assert "Training step" in md and res["machine"]["cpu"] in md


def test_ragged_competitors_agree_and_count_their_input():
    """Nested and PackedSequence input (no padded batch) give the baseline's numbers at the
    valid positions; their input is the N valid rows, the others' the padded batch."""
    case = Case(
        B=5,
        T=50,
        I=3,
        H=4,
        layers=2,
        bidirectional=True,
        dtype="float64",
        dist="one_long",
        competitors=("baseline", "varlen") + RAGGED,
    )
    b = Bench(case)
    assert b.lengths.tolist().count(50) == 1 and b.lengths.tolist().count(1) == 4
    for c in RAGGED:
        assert b.max_abs_diff(c) < 1e-10
        assert b.input_bytes(c) == 54 * 3 * 8  # N = 50 + 4 rows
    assert b.input_bytes("baseline") == 50 * 5 * 3 * 8
    rec = bench.run_case(case, dict(rounds=1, min_run_time=0.01, warmup=1), 1, {"gflops": 1.0})
    for mode in ("infer", "train"):
        assert set(rec["modes"][mode]["median_s"]) == set(case.competitors)
        assert all(v > 0 for v in rec["modes"][mode]["peak_bytes"].values())
    md = bench_report.markdown(
        {
            "preset": "ragged",
            "machine": bench_report.machine_info("cpu", 1),
            "gemm": {},
            "cases": [rec],
        }
    )
    assert "Peak memory with the input" in md and "varlen nested" in md


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_lstm_and_rnn_cases_agree_with_baseline(cell):
    """Every competitor of an LSTM / RNN case runs, and the varlen ones give nn's numbers."""
    case = Case(
        B=5,
        T=7,
        I=3,
        H=4,
        layers=2,
        bidirectional=True,
        dtype="float64",
        cell=cell,
        competitors=COMPETITORS + RAGGED,
    )
    assert case.name().startswith(f"{cell.upper()} B=5")
    assert Case.fromdict(case.asdict()) == case
    b = Bench(case)
    assert type(b.var).__name__ == cell.upper() and type(b.ref).__name__ == cell.upper()
    for c in ("varlen", "varlen_packed") + RAGGED:
        assert b.max_abs_diff(c) < 1e-10, c
    for mode in ("infer", "train"):
        for c in case.competitors:
            b.step(mode, c)()


def test_cpu_targets_preset_has_the_three_shapes_for_every_cell():
    cases = bench.preset_cases("cpu-targets", "cpu")
    shapes = {
        cell: [(c.B, c.T, c.I, c.H, c.layers) for c in cases if c.cell == cell]
        for cell in ("gru", "lstm", "rnn")
    }
    assert shapes["gru"][0] == (64, 100, 256, 256, 1) and len(shapes["gru"]) == 3
    assert shapes["lstm"] == shapes["gru"] == shapes["rnn"]
    # The GRU's case names (and so its earlier results) are unchanged.
    assert cases[0].name() == "B=64 T=100 I=256 H=256 L=1 uniform float32"


def test_cpu_full_preset_is_cpu_targets_at_full_length():
    targets = bench.preset_cases("cpu-targets", "cpu")
    full = bench.preset_cases("cpu-full", "cpu")
    shape = lambda c: (c.cell, c.B, c.T, c.I, c.H, c.layers, c.bidirectional)  # noqa: E731
    for dtype, modes in (("bfloat16", ("infer", "train")), ("float32", ("infer",))):
        mine = [c for c in full if c.dtype == dtype]
        assert [shape(c) for c in mine] == [shape(c) for c in targets]
        assert all(c.dist == "full" and c.modes == modes for c in mine)


def test_cpu_shapes_preset_is_the_sweep_at_full_length_against_nn():
    cases = bench.preset_cases("cpu-shapes", "cpu")
    assert len(cases) == 2 * len(bench.SHAPE_SWEEP)
    for cell in ("gru", "lstm"):
        mine = [c for c in cases if c.cell == cell]
        assert [(c.H, c.B, c.T) for c in mine] == bench.SHAPE_SWEEP
        assert all(c.I == c.H and c.dist == "full" and c.dtype == "float32" for c in mine)
        assert all(c.modes == ("infer", "train") for c in mine)
        assert all(c.competitors == ("baseline", "padded", "varlen") for c in mine)


def test_perf_profile_report_is_parsed_and_grouped():
    """bench_perf.py's reading of `perf report --stdio --sort dso,sym` (the profile itself needs
    perf and an idle machine: it is a benchmark, not a test)."""
    import bench_perf

    text = """
# Overhead  Shared Object      Symbol
    55.20%  libgomp.so.1       [.] 0x000000000001e02a
     4.90%  libtorch_cpu.so    [.] mkl_blas_avx512_sgemm_kernel_0
     2.80%  _C.cpython-311-x86_64-linux-gnu.so  [.] varlen_rnn::forward_units
     0.80%  libc.so.6          [.] __memmove_avx512_unaligned_erms
     0.70%  [kernel.kallsyms]  [k] finish_task_switch.isra.0
     0.30%  _C.cpython-311-x86_64-linux-gnu.so  [.] varlen_rnn::cpu::layer_forward
    22.90%  _C.cpython-311-x86_64-linux-gnu.so  [.] varlen_rnn::cpu::(anonymous namespace)::kernel_avx512
     6.00%  _C.cpython-311-x86_64-linux-gnu.so  [.] varlen_rnn::cpu::row_tiles<c10::BFloat16>
"""
    rows = bench_perf.parse_report(text)
    assert [r[0] for r in rows] == [55.2, 4.9, 2.8, 0.8, 0.7, 0.3, 22.9, 6.0]
    cats = bench_perf.categorize(rows)
    assert cats["thread team: barriers, waits"] == pytest.approx(55.2)
    assert cats["GEMM (BLAS / oneDNN)"] == pytest.approx(4.9)
    assert cats["gate passes (ours)"] == pytest.approx(2.8)
    assert cats["copies and fills"] == pytest.approx(0.8)
    assert cats["kernel (OS)"] == pytest.approx(0.7)
    assert cats["other"] == pytest.approx(0.3)
    assert cats["our GEMM kernels"] == pytest.approx(22.9 + 6.0)  # the bfloat16 strips too


def test_small_gemm_dots_bench_smoke(capsys):
    """benchmarks/bench_small_gemm.py --part dots, one try each: a row of 7 timings (ours against
    torch.mm) for each of the four weights."""
    import bench_small_gemm

    import varlen_rnn  # noqa: F401  (registers the ops)

    try:
        torch.ops.varlen_rnn._small_gemm(torch.ones(1, 1), torch.ones(1, 1), None, "dots", 0)
    except RuntimeError as e:
        pytest.skip(f"this CPU runs no dot products: {e}")
    threads = torch.get_num_threads()
    try:
        assert bench_small_gemm.main(["--part", "dots", "--repeats", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [ln for ln in capsys.readouterr().out.splitlines() if re.match(r"(GRU|LSTM) H=", ln)]
    assert len(rows) == 4
    for ln in rows:
        assert len(re.findall(r"\d+\.\d vs +\d+\.\d +\d+\.\d\dx", ln)) == 7, ln


def test_grad_mask_bench_smoke(tmp_path):
    """benchmarks/bench_grad_mask.py on tiny shapes: every case timed, the table written."""
    import bench_grad_mask

    path = bench_grad_mask.main(["--quick", "--min-run-time", "0.01", "--out", str(tmp_path)])
    text = open(path).read()
    assert text.count("| GRU B=3") == 1 and text.count("| LSTM B=3") == 1


def test_last_state_bench_smoke(tmp_path):
    """benchmarks/bench_last_state.py on tiny shapes: both competitors timed and their peaks
    measured (a few KiB here, printed as 0.0 MiB), the table written."""

    import bench_last_state

    path = bench_last_state.main(["--quick", "--min-run-time", "0.01", "--out", str(tmp_path)])
    rows = re.findall(r"^\| (GRU|LSTM) B=3 .*\|$", open(path).read(), re.M)
    assert rows == ["GRU", "LSTM"]
    for line in open(path).read().splitlines():
        if line.startswith("| GRU B=3") or line.startswith("| LSTM B=3"):
            *_, ms_nn, ms_ours, _, peak_nn, peak_ours = line.strip("|").split("|")
            assert float(ms_nn) > 0 and float(ms_ours) > 0, line
            assert float(peak_nn) >= 0 and float(peak_ours) >= 0, line


@pytest.mark.skipif(
    os.environ.get("VARLEN_RNN_SKIP_EMULATION") == "1", reason="VARLEN_RNN_SKIP_EMULATION=1"
)
def test_cuda_memory_emulated_bench_smoke(tmp_path):
    """benchmarks/bench_cuda_memory_emulated.py on tiny shapes: the CUDA backend's training peak
    of every cell, one and two directions, measured on the emulation (a subprocess building it)."""

    import bench_cuda_memory_emulated

    text = open(bench_cuda_memory_emulated.main(["--quick", "--out", str(tmp_path)])).read()
    for cell in ("GRU", "LSTM", "RNN"):
        for D in (1, 2):
            row = re.search(rf"\| {cell} B=4 T=6 I=8 H=8 D={D} \| ([0-9.]+) \|", text)
            assert row and float(row.group(1)) > 0, (cell, D, text)
    # A classifier's loss: the output's gradient None never holds more than a zero tensor.
    argv = ["--quick", "--loss", "last-state", "--out", str(tmp_path)]
    text = open(bench_cuda_memory_emulated.main(argv)).read()
    rows = re.findall(r"\| \w+ B=4 T=6 I=8 H=8 D=\d \| ([0-9.]+) \| ([0-9.]+) \|", text)
    assert len(rows) == 6, text
    assert all(0 < float(none) <= float(zeros) for none, zeros in rows), text


def test_decoder_loop_bench_smoke(tmp_path):
    """benchmarks/bench_decoder_loop.py on tiny shapes: both cells timed, the table written."""
    import bench_decoder_loop

    argv = ["--steps", "2", "--hidden", "4", "--batches", "1", "--min-run-time", "0.01"]
    path = bench_decoder_loop.main([*argv, "--out", str(tmp_path)])
    text = open(path).read()
    assert "| GRU | 1 |" in text and "| LSTM | 1 |" in text
    argv += ["--inference", "--dtype", "bfloat16"]
    text = open(bench_decoder_loop.main([*argv, "--out", str(tmp_path)])).read()
    assert "inference loop" in text and "bfloat16" in text and "| LSTM | 1 |" in text
    argv[-1] = "float32"
    text = open(bench_decoder_loop.main([*argv, "--vocab", "11", "--out", str(tmp_path)])).read()
    assert "greedy decoding over 11 tokens" in text, text
    assert re.search(r"\| GRU \| 1 \| \d+ \| \d+ \(-?\d+\) \| \d+ \(-?\d+\) \|", text), text
    # the calls timed in place, both competitors: "nn → ours (speedup)" last
    assert re.search(r"\| GRU \| 1 \|.* \| \d+ → \d+ \([0-9.]+x\) \|$", text, re.M), text
    with pytest.raises(SystemExit):  # greedy decoding is inference
        bench_decoder_loop.main(["--vocab", "11", "--out", str(tmp_path)])
    argv += ["--full-path", "--rounds", "2", "--cells", "GRU"]
    text = open(bench_decoder_loop.main([*argv, "--vocab", "11", "--out", str(tmp_path)])).read()
    assert "without the shortcut (its share)" in text, text
    assert re.search(r"\| GRU \| 1 \| \d+( \| \d+ \(-?\d+\)( \| [0-9.-]+x?)?){3} \|", text), text
    text = open(bench_decoder_loop.main([*argv, "--out", str(tmp_path)])).read()
    assert re.search(r"\| GRU \| 1 \| \d+ \| \d+ \| [0-9.]+x \| \d+ \| [0-9.]+x \|", text), text
    gemm = ["--gemm", "kernel", "mkl"]
    text = open(bench_decoder_loop.main([*argv, *gemm, "--out", str(tmp_path)])).read()
    assert "VARLEN_RNN_CPU_GEMM=kernel | speedup | varlen_rnn, VARLEN_RNN_CPU_GEMM=mkl" in text, (
        text
    )
    assert re.search(r"\| GRU \| 1 \| \d+( \| \d+ \| [0-9.]+x){4} \|", text), text
    assert "VARLEN_RNN_CPU_GEMM" not in os.environ  # put back as it was


def test_double_backward_bench_smoke(tmp_path):
    """benchmarks/bench_double_backward.py on tiny shapes: both cells timed, the table written."""
    import bench_double_backward

    argv = ["--quick", "--min-run-time", "0.01", "--out", str(tmp_path)]
    text = open(bench_double_backward.main(argv)).read()
    assert text.count("| GRU B=3") == 1 and text.count("| LSTM B=3") == 1


def test_huge_pages_bench_smoke(tmp_path):
    """benchmarks/bench_huge_pages.py on tiny shapes: worker processes with the advice off and
    on, both modes of both cases in the table, which names the kernel's THP settings."""
    import bench_huge_pages

    argv = ["--quick", "--rounds", "1", "--min-run-time", "0.01", "--out", str(tmp_path)]
    text = open(bench_huge_pages.main(argv)).read()
    assert "Kernel THP settings: enabled" in text
    for case in ("GRU B=3 T=4 I=2 H=5, uniform lengths", "LSTM B=3 T=4 I=2 H=5, full lengths"):
        assert text.count(f"| {case} | train |") == 1 and text.count(f"| {case} | infer |") == 1


def test_row_groups_bench_smoke(tmp_path):
    """benchmarks/bench_row_groups.py on tiny shapes: one team, a group per thread and the rule,
    both modes of both cases in the table, with nn beside them."""
    import bench_row_groups

    argv = ["--quick", "--rounds", "1", "--min-run-time", "0.01", "--out", str(tmp_path)]
    text = open(bench_row_groups.main(argv)).read()
    assert "| case | mode | nn ms | one team ms | 2 groups ms (vs one team) | rule ms |" in text
    for case in ("GRU B=9 T=4 I=2 H=5, uniform lengths, float32", "LSTM B=9 T=4 I=2 H=5, full"):
        assert text.count(f"| {case}") == 2, case
    assert os.environ.get("VARLEN_RNN_CPU_ROW_GROUPS") is None  # the script restores it


def test_bench_modules_leave_the_import_path_to_the_installed_package():
    """Importing the benchmark scripts (as these tests do) must not put a checkout that was
    never built in place ahead of the installed varlen_rnn: processes spawned later from this
    one (test_ddp.py's workers) inherit sys.path and must import the same package."""
    import subprocess

    import bench_cuda_memory_emulated  # noqa: F401
    import bench_decoder_loop  # noqa: F401
    import bench_double_backward  # noqa: F401
    import bench_grad_mask  # noqa: F401
    import bench_huge_pages  # noqa: F401
    import bench_row_groups  # noqa: F401
    import bench_small_gemm  # noqa: F401

    import varlen_rnn

    code = "import varlen_rnn; print(varlen_rnn.__file__)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    run = dict(env=env, capture_output=True, text=True, cwd=os.path.dirname(os.__file__))
    child = subprocess.run([sys.executable, "-c", code], **run)  # cwd: not a checkout
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == varlen_rnn.__file__
