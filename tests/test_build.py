"""The build: import-time version check, and what the extension registers."""

import os
import subprocess
import sys

import torch

import varlen_rnn


def test_import_refuses_a_different_torch_with_a_clear_message():
    code = "import torch; torch.__version__ = '0.0.1'; import varlen_rnn"
    env = dict(os.environ)
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(varlen_rnn.__file__)),
    )
    assert r.returncode != 0
    assert "ImportError" in r.stderr
    assert f"built against torch {torch.__version__}" in r.stderr
    assert "torch 0.0.1 is running" in r.stderr and "pip install" in r.stderr


def test_cpu_kernels_registered():
    for op in ("gru_layer_forward", "gru_layer_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"varlen_rnn::{op}", "CPU")
