"""benchmarks/gpu_calibrate.py, which fits csrc/cuda/plan.h's cost model to a GPU run's timing
probe: its Python copy of the path choice agrees with plan.h's, and on a probe synthesized from
a device whose constants differ from today's, the fit finds choices that device's times make
right. No GPU needed: plan.h compiles with the host compiler."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import gpu_calibrate as cal  # noqa: E402
from gpu_probe import probe_lengths  # noqa: E402

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="no host C++ compiler"
)

IMPLS = ("persistent", "persistent_exact", "fallback")
H100 = {"name": "pretend H100", "sms": 132, "smem_per_block_optin": 227 * 1024}
A100 = {"name": "pretend A100", "sms": 108, "smem_per_block_optin": 163 * 1024}


def _probe(T, Hs, dtypes, Bs, device, tf32=True, modes=("fwd", "train")):
    results = [
        {"H": H, "dtype": d, "mode": m, "B": B, "median_ms": 1.0}
        for H in Hs
        for d in dtypes
        for m in modes
        for B in Bs
    ]
    flags = {"cudnn.allow_tf32": tf32}
    return {
        "args": {"T": T},
        "device": device,
        "children": {i: {"flags": flags, "results": [dict(r) for r in results]} for i in IMPLS},
    }


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return cal.Model(str(tmp_path_factory.mktemp("plan_driver")))


@pytest.mark.parametrize("device", [H100, A100], ids=["H100", "A100"])
@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "exact_f32"])
def test_python_chooses_as_plan_h_does(model, device, tf32):
    """With today's constants the script's choice per pass is plan.h's choose_path +
    prefer_tensor_cores, and its per-step costs are plan.h's, on every configuration."""
    probe = _probe(
        64,
        [32, 256, 1000, 2048],
        ["float32", "bfloat16", "float16", "float64"],
        [1, 5, 8, 64, 200, 512],
        device,
        tf32,
    )
    consts, configs = cal.build_configs(probe, model, probe_lengths)
    assert len(configs) == 4 * 4 * 2 * 6
    assert cal.check_against_plan(configs, cal.theta0(consts), consts[0]) == []
    # The check can fail: each choice occurs, so a wrong branch would show (the exact kernel
    # over tensor cores: H=1000 float32 at small B on the H100, where the model prices the
    # tensor-core kernel higher).
    picks = {p for c in configs for p in cal.auto_choice(c, cal.theta0(consts), consts[0])}
    want = {"persistent", "fallback"}
    if tf32 and device is H100:
        want.add("persistent_exact")
    assert want <= picks, picks


def _synthesize(configs, th_true, clock, T, rng, noise=0.02):
    """Measured times of a pretend device: what all paths share (input projection, weight
    gradients; any positive amount: it cancels) + the model with th_true, each with noise."""
    for c in configs:
        shared = rng.uniform(0.05, 2.0) * (1 + c.B / 64) * (2 if c.mode == "train" else 1)
        for impl in IMPLS:
            if impl == "fallback" or all(
                ks[cal.kernel_of(c, impl)].fits for ks in c.passes.values()
            ):
                t = shared + cal.modelled_us(c, impl, th_true, clock, T) / 1e3
                c.measured[impl] = t * (1 + rng.uniform(-noise, noise))
            else:
                c.measured.pop(impl, None)


def test_fit_finds_the_choices_a_pretend_device_makes_right(model):
    T = 128
    probe = _probe(T, [256, 512, 1024], ["float32", "bfloat16"], [1, 8, 32, 64, 128, 256], H100)
    consts, configs = cal.build_configs(probe, model, probe_lengths)
    clock, th0 = consts[0], cal.theta0(consts)
    # The pretend device: its barrier slower, L2 faster, the CUDA-core product slower, tensor
    # cores much slower, the host's floor higher and its GEMMs slower than today's constants say.
    th_true = th0 * np.array([1.8, 0.6, 1.4, 3.0, 1.2, 1.6, 1.5, 1.7])
    _synthesize(configs, th_true, clock, T, np.random.default_rng(0))
    th, eq = cal.fit(configs, th0, clock, T)
    assert eq > 0.8 * 2 * len(configs)
    r0, r1 = cal.residual(configs, th0, clock, T), cal.residual(configs, th, clock, T)
    assert r1 < 0.03 < r0, (r0, r1)

    def right(th_):
        ok = n = 0
        for c in configs:
            truth = cal.auto_choice(c, th_true, clock)
            got = cal.auto_choice(c, th_, clock)
            n += 1
            ok += got == truth
        return ok / n

    assert right(th) >= 0.95 > right(th0), (right(th0), right(th))
    # The terms the differences pin down come back (the barrier and the host floor are both
    # per-step constants, so only their combination is pinned; they are not asserted).
    for name in ("mma", "gemm", "kernel_us"):
        i = cal.PARAMS.index(name)
        assert th[i] == pytest.approx(th_true[i], rel=0.25), name


def test_report_and_command_line(model, tmp_path):
    T = 64
    probe = _probe(T, [256], ["float32"], [1, 64, 256], H100)
    consts, configs = cal.build_configs(probe, model, probe_lengths)
    th_true = cal.theta0(consts) * np.array([1.5, 1, 1, 2, 1, 2, 1, 1.5])
    _synthesize(configs, th_true, consts[0], T, np.random.default_rng(1))
    for impl in IMPLS:  # back into the probe's own layout
        for r in probe["children"][impl]["results"]:
            c = next(
                c
                for c in configs
                if (c.H, c.dtype, c.mode, c.B) == (r["H"], r["dtype"], r["mode"], r["B"])
            )
            if impl in c.measured:
                r["median_ms"] = c.measured[impl]
            else:
                r.pop("median_ms")
                r["error"] = "RuntimeError: does not fit"
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    out = tmp_path / "calibration.md"
    assert cal.main([str(tmp_path), "--out", str(out)]) == 0
    md = out.read_text()
    assert "CostModel::kGridSyncCycles" in md and "kFallbackHostUs" in md
    key = md.strip().splitlines()[-1]
    assert key.startswith("KEY: calibration: auto picks the fastest measured path in ")
    assert md.count("\n| 256 | float32 |") == 6
