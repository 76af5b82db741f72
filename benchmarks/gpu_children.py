"""Run one piece of a GPU check in a child process, with a time limit, and share out a deadline.

The library reads VARLEN_RNN_CUDA_PATH once per process, so every path under test runs in its own
process; a child that hangs (a grid barrier that never releases) is killed with its process group
and costs only its share of the time, never the parent's report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def import_path() -> None:
    """This folder first (sibling modules), the repo root last: an installed varlen_rnn, or one on
    PYTHONPATH, wins over the source tree; an in-place build is found when nothing else is."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    if REPO not in sys.path:
        sys.path.append(REPO)


def run_child(args: list[str], timeout: float, env: dict | None = None, log=None) -> dict:
    """Run `python <args>` with `env` added; returns {status: ok|failed|timed out, rc, seconds, tail}.
    The child stays in this process group, so a `timeout` around the whole check still reaches it."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONUNBUFFERED"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        status = "timed out"
    seconds = time.perf_counter() - t0
    if log is not None:
        tag = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        log.write(
            f"---- child {tag} {' '.join(args)}: {status} (rc {proc.returncode}, {seconds:.1f}s)\n"
        )
        log.write(out or "")
        log.flush()
    return {
        "status": status,
        "rc": proc.returncode,
        "seconds": seconds,
        "tail": (out or "")[-2000:],
    }


class Deadline:
    """A time budget shared out among the children still to run."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def share(self, children_left: int, floor: float = 5.0) -> float:
        return max(floor, self.left() / max(1, children_left))
