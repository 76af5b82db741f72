"""Per-kernel resources of the built extension: registers, stack, shared and local memory, spills.

    cuobjdump --dump-resource-usage varlen_rnn/_C*.so > res.txt
    python benchmarks/gpu_resources.py res.txt [--ptxas-log build.log]   # markdown table + KEY line
    python benchmarks/gpu_resources.py --self-test                       # the parser on a sample

Spills come from ptxas -v's "bytes spill stores/loads" lines in the build log (gpu_check.sh builds
with NVCC_APPEND_FLAGS=-Xptxas=-v); cuobjdump's report has no spill column. A STACK or LOCAL above 0
usually means an array the compiler put in local memory (see HOPPER.md: register arrays indexed at
run time).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

PAIR = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")
FUNC = re.compile(r"^\s*Function (\S+?):\s*(.*)$")
PROPS = re.compile(r"Function properties for (\S+)")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")

SAMPLE = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _Z25persistent_forward_kernelIffEv24PersistentForwardArgsIT_T0_E:
  REG:168 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:712 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z19lengths_prep_kernelIlEvPKT_iiPiS3_S3_:
  REG:16 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
SAMPLE_PTXAS = """
ptxas info    : Function properties for _Z25persistent_forward_kernelIffEv24PersistentForwardArgsIT_T0_E
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 16 bytes cumulative stack size
"""


def parse_resources(text: str) -> dict:
    """{mangled name: {"arch": "sm_90", "REG": 168, "STACK": 16, ...}} (the largest over archs)."""
    kernels, arch, name = {}, None, None
    for line in text.splitlines():
        if line.strip().startswith("arch ="):
            arch = line.split("=", 1)[1].strip()
        m = FUNC.match(line)
        if m:
            name, line = m.group(1), m.group(2)
            kernels.setdefault(name, {"arch": arch})
        elif not (name and line.startswith("  ")):  # a function's values are indented below it
            name = None
        if name:
            for k, v in PAIR.findall(line):
                kernels[name][k] = max(int(v), kernels[name].get(k, 0))
    return kernels


def parse_spills(text: str) -> dict:
    """{mangled name: (stack frame, spill stores, spill loads)} from ptxas -v output."""
    spills, name = {}, None
    for line in text.splitlines():
        m = PROPS.search(line)
        if m:
            name = m.group(1)
            continue
        m = SPILL.search(line)
        if m and name:
            old = spills.get(name, (0, 0, 0))
            spills[name] = tuple(max(int(v), o) for v, o in zip(m.groups(), old))
            name = None
    return spills


def demangle(names: list[str]) -> dict:
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(
        ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=False
    ).stdout
    return {n: _short(d) for n, d in zip(names, out.splitlines())}


def _short(d: str) -> str:
    """'void k<float, float>(Args<float, float>)' -> 'k<float, float>'."""
    d = d.removeprefix("void ")
    if d.endswith(")"):
        depth = 0
        for i in range(len(d) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(d[i], 0)
            if depth == 0:
                return d[:i]
    return d


def report(res_text: str, ptxas_text: str = "") -> tuple[str, str]:
    kernels, spills = parse_resources(res_text), parse_spills(ptxas_text)
    names = demangle(sorted(kernels))
    lines = [
        "| kernel | arch | REG | STACK | SHARED | LOCAL | spill stores / loads (ptxas) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for n in sorted(kernels, key=lambda n: names[n]):
        k, s = kernels[n], spills.get(n)
        lines.append(
            f"| {names[n]} | {k.get('arch')} | {k.get('REG', '-')} | {k.get('STACK', '-')} | "
            f"{k.get('SHARED', '-')} | {k.get('LOCAL', '-')} | "
            + (f"{s[1]} / {s[2]}" if s else "-")
            + " |"
        )
    if not kernels:
        return "no kernels found in the cuobjdump output", "KEY: no kernels found"
    top = max(kernels, key=lambda n: kernels[n].get("REG", 0))
    stack = sum(1 for k in kernels.values() if k.get("STACK", 0) or k.get("LOCAL", 0))
    spilled = [n for n, s in spills.items() if s[1] or s[2]]
    key = (
        f"KEY: {len(kernels)} kernels; max {kernels[top].get('REG')} registers ({names[top]}); "
        f"{stack} with stack/local memory; "
        + (
            f"{len(spilled)} spill ({', '.join(demangle(spilled).values())})"
            if spilled
            else ("no spills" if spills else "spills unknown (no ptxas -v log)")
        )
    )
    return "\n".join(lines), key


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("resources", nargs="?", help="cuobjdump --dump-resource-usage output")
    p.add_argument("--ptxas-log", default=None, help="a build log with ptxas -v output")
    p.add_argument("--self-test", action="store_true", help="parse a built-in sample and check it")
    a = p.parse_args(argv)
    if a.self_test:
        k, s = parse_resources(SAMPLE), parse_spills(SAMPLE_PTXAS)
        name = "_Z25persistent_forward_kernelIffEv24PersistentForwardArgsIT_T0_E"
        assert k[name]["REG"] == 168 and k[name]["STACK"] == 16 and k[name]["arch"] == "sm_90", k
        assert len(k) == 2 and s[name] == (16, 8, 12), (k, s)
        table, key = report(SAMPLE, SAMPLE_PTXAS)
        print(table)
        print(key)
        return 0
    if not a.resources:
        p.error("give the cuobjdump output file, or --self-test")
    with open(a.resources) as f:
        res = f.read()
    ptxas = ""
    if a.ptxas_log:
        with open(a.ptxas_log, errors="replace") as f:
            ptxas = f.read()
    table, key = report(res, ptxas)
    print(table)
    print(key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
