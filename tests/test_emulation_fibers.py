"""The emulation's threads (tests/cuda_emulation/fibers.h), on their own: every CUDA thread of an
emulated launch is a fiber, so the emulated kernels' tests are only as good as its barriers. A
small program (fibers_check.cpp, built here with the C++ compiler, ~2 s) checks that a barrier
orders the writes before it for every thread of a block and of the grid, that the threads keep
their own indices across switches, that launches interleave the threads differently (what the
determinism tests of test_cuda_emulated.py lean on), and that a barrier some threads never reach
stops the run with a message rather than hanging it."""

import os
import shutil
import subprocess

import pytest
from emulation import EMU_SRC, needs_emulation

pytestmark = needs_emulation


@pytest.fixture(scope="module")
def fibers_check(tmp_path_factory):
    exe = tmp_path_factory.mktemp("fibers") / "fibers_check"
    cxx = shutil.which("c++")
    r = subprocess.run(
        [cxx, "-std=c++20", "-O1", "-Wall", "-Werror", "-I", EMU_SRC,
         os.path.join(EMU_SRC, "fibers_check.cpp"), "-o", str(exe)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return lambda what: subprocess.run([str(exe), what], capture_output=True, text=True, timeout=60)


def test_barriers_order_the_writes_of_a_block_and_of_the_grid(fibers_check):
    r = fibers_check("barrier")
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stdout + r.stderr


def test_launches_interleave_the_threads_differently(fibers_check):
    r = fibers_check("order")
    assert r.returncode == 0, r.stderr
    runs = [[int(v) for v in line.split()] for line in r.stdout.splitlines()]
    assert len(runs) == 2
    for order in runs:
        assert sorted(order) == list(range(64))  # each thread passed the barrier once
        assert order != sorted(order) and order != sorted(order, reverse=True)
    assert runs[0] != runs[1]


def test_a_barrier_not_every_thread_reaches_stops_the_run(fibers_check):
    r = fibers_check("divergent")
    assert r.returncode != 0 and "returned" not in r.stdout
    assert "32 of 64 CUDA threads wait at barriers the others will never reach" in r.stderr
