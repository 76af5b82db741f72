"""The CPU ops' large buffers (csrc/cpu/large_tensors.h): those of 32 MiB and more are advised for
transparent huge pages (the kernel's VmFlags show it), not with VARLEN_RNN_CPU_HUGE_PAGES=0, and
the advice changes no value; a bad setting is refused with its name."""

import os
import subprocess
import sys

import pytest
import torch

import varlen_rnn

MIB = 1 << 20
HUGE = 2 * MIB
THP = os.path.isdir("/sys/kernel/mm/transparent_hugepage")
# [T, B, H] float32 outputs of 34 MiB: past the 32 MiB from which the ops advise; H small keeps
# the call cheap. 16 MiB: under it.
BIG = dict(T=520, B=1024, H=16)
SMALL = dict(T=260, B=1024, H=16)


def vm_flags(addr: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds addr (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def advised(t: torch.Tensor) -> bool:
    """Whether the first whole 2 MiB block inside t's data lies in a mapping advised for huge
    pages (VmFlags hg); the blocks before and after it keep their mapping's flags."""
    first = (t.data_ptr() + HUGE - 1) // HUGE * HUGE
    assert first + HUGE <= t.data_ptr() + t.nbytes
    return "hg" in vm_flags(first)


def run(T, B, H, grad=False):
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(4, H)
    x = torch.randn(T, B, 4, requires_grad=grad)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    with torch.set_grad_enabled(grad):
        out, h = gru(x, lengths=lengths)
    if not grad:
        return out, h
    out.pow(2).sum().backward()
    return out, h, x.grad, *(p.grad for p in gru.parameters())


needs_thp = pytest.mark.skipif(
    not (THP and os.path.exists("/proc/self/smaps")),
    reason="no transparent huge pages (Linux's /sys/kernel/mm/transparent_hugepage)",
)


def advised_in_a_fresh_process(setting, sizes) -> bool:
    """Whether a new process's first call, with VARLEN_RNN_CPU_HUGE_PAGES=setting (None: unset),
    gives an output in huge-page-advised memory. A fresh process, because advice given to a
    block glibc served from its heap stays on that memory after the block is freed, and in a
    process with a history a block of any size may come from there."""
    env = {k: v for k, v in os.environ.items() if k != "VARLEN_RNN_CPU_HUGE_PAGES"}
    if setting is not None:
        env["VARLEN_RNN_CPU_HUGE_PAGES"] = setting
    code = (
        f"import test_cpu_large_tensors as t; out, _ = t.run(**t.{sizes}); "
        "print(out.nbytes, t.advised(out))"
    )
    # This file's folder, then this process's path (so the child imports the varlen_rnn this
    # process did, installed or built in place), run from outside the checkout: a source tree
    # that was never built in place must not come first.
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([here, *(p for p in sys.path if p)])
    run = dict(env=env, capture_output=True, text=True, cwd=os.path.dirname(os.__file__))
    done = subprocess.run([sys.executable, "-c", code], **run)
    assert done.returncode == 0, done.stderr[-3000:]
    nbytes, flag = done.stdout.split()[-2:]
    limits = {"BIG": (32 * MIB, 64 * MIB), "SMALL": (4 * HUGE, 32 * MIB)}[sizes]
    assert limits[0] <= int(nbytes) < limits[1]
    return flag == "True"


@needs_thp
@pytest.mark.parametrize("setting", [None, "1", "0"])
def test_outputs_of_32_mib_and_more_are_advised_unless_turned_off(setting):
    assert advised_in_a_fresh_process(setting, "BIG") == (setting != "0")


@needs_thp
def test_smaller_outputs_are_not_advised():
    """glibc may serve blocks under its 32 MiB mmap ceiling from its heap, where advice would
    outlive the buffer, so none is given."""
    assert not advised_in_a_fresh_process(None, "SMALL")


def test_advice_changes_no_value(monkeypatch):
    """Training with buffers over 32 MiB (the output, the backward's gate gradients): the same
    bits with the advice and without."""
    monkeypatch.setenv("VARLEN_RNN_CPU_HUGE_PAGES", "1")
    on = run(**BIG, grad=True)
    monkeypatch.setenv("VARLEN_RNN_CPU_HUGE_PAGES", "0")
    off = run(**BIG, grad=True)
    assert len(on) == len(off) == 7
    for a, b in zip(on, off):
        assert torch.equal(a, b)


def test_a_bad_setting_is_refused_with_its_name(monkeypatch):
    monkeypatch.setenv("VARLEN_RNN_CPU_HUGE_PAGES", "yes")
    with pytest.raises(RuntimeError, match="VARLEN_RNN_CPU_HUGE_PAGES must be 0 or 1, got 'yes'"):
        run(**BIG)
