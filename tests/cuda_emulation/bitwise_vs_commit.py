"""Shows that the persistent kernels, exact and on tensor cores, give the same bits as those of
another commit, on the CPU emulation: a change to how the kernels exchange, stage or skip data
(not to what they compute) must leave every output and gradient bit for bit unchanged.

    python tests/cuda_emulation/bitwise_vs_commit.py COMMIT

Exports COMMIT's csrc/ and tests/ into a temporary folder, runs the cases below with
each tree's emulation (two child processes; each builds its emulation, ~1-2 minutes), and
compares. Needs the checkout's CPU extension built in place (the cases' CPU references); several
minutes in all. Exit status 0 when every tensor is equal."""

import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[3])
import emulation, test_cuda_emulated as g, test_cuda_emulated_cells as c
emu = emulation.load_emulation()
res = {}
# Tensor cores: their cases and two more layouts, in each 16-bit dtype and TF32.
for dt in (torch.bfloat16, torch.float16, torch.float32):
    for n in g.MMA_CASES + ["offsets-K-chunks-tiles-nobias", "packed-bi-K-chunks"]:
        res[f"gru-tc-{n}-{dt}"] = g.run_case(emu, g.CASES[n], dt, True, mma=True)[0]
    for cell in ("lstm", "rnn-tanh"):
        for n in ("uni-basic", "K-chunks-tail-block", "offsets-tiles-nobias"):
            res[f"{cell}-tc-{n}-{dt}"] = c.run_case(emu, c.CELLS[cell], c.CASES[n], dt, True,
                                                    mma=True)[0]
# The exact kernels: every case, every dtype.
for dt in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
    for n in g.CASES:
        res[f"gru-{n}-{dt}"] = g.run_case(emu, g.CASES[n], dt, True)[0]
    for cell in c.CELLS:
        for n in c.CASES:
            res[f"{cell}-{n}-{dt}"] = c.run_case(emu, c.CELLS[cell], c.CASES[n], dt, True)[0]
torch.save(res, sys.argv[2])
"""


def run(tests_dir: str, out: str) -> None:
    subprocess.run([sys.executable, "-c", CHILD, tests_dir, out, ROOT], check=True)


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    with tempfile.TemporaryDirectory(prefix="varlen_rnn_bitwise_") as tmp:
        base = os.path.join(tmp, "base")
        os.makedirs(base)
        archive = subprocess.run(
            ["git", "-C", ROOT, "archive", sys.argv[1], "csrc", "tests"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
        run(os.path.join(base, "tests"), os.path.join(tmp, "base.pt"))
        run(os.path.join(ROOT, "tests"), os.path.join(tmp, "here.pt"))
        a, b = torch.load(os.path.join(tmp, "base.pt")), torch.load(os.path.join(tmp, "here.pt"))
    differ, n = [], 0
    missing = sorted(set(a) ^ set(b))  # cases one tree has and the other not
    for key in sorted(set(a) & set(b)):
        for x, y in zip(a[key], b[key]):
            if x is None and y is None:
                continue
            n += 1
            if not torch.equal(x, y):
                differ.append((key, (x - y).abs().max().item()))
    print(
        f"{len(set(a) & set(b))} cases, {n} tensors compared with {sys.argv[1]}; "
        f"differing: {differ or 'none'}; in one tree only: {missing or 'none'}"
    )
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
