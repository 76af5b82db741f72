"""Empty stand-ins for the CUDA libraries that torch's aarch64 wheel links against, so that the
wheel imports on a machine without them (scripts/check_aarch64.sh: our CPU build under QEMU).

    python scripts/aarch64_stubs.py TORCH_DIR OUT_DIR [--readelf aarch64-linux-gnu-readelf]
        [--cc aarch64-linux-gnu-gcc] [--sysroot DIR ...] [--python TARGET_PYTHON]

PyPI's torch for aarch64 is a CUDA build: its libraries need libcudart.so.13, libcudnn.so.9,
libnccl.so.2 and the rest, which come from NVIDIA's wheels (about 3 GB). Nothing on a CPU-only
run calls them, but the dynamic loader must find every library and bind every symbol (Python
loads extensions with RTLD_NOW). For each library that torch needs and neither torch's folder nor
the system has, this writes a shared library of that soname defining the symbols torch takes from
it: functions that return 100 (the CUDA runtime's and driver's "no device", which torch takes
quietly: torch.cuda.is_available() is False; cuDNN, cuBLAS, NCCL and CUPTI read any non-zero
result as a failure) and zero-filled objects, each under
the symbol version torch asks for. Symbols torch needs without a version go into the first stub
unless a library present defines them.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

SYSTEM = ("libc.so", "libm.so", "libdl.so", "libpthread.so", "librt.so", "ld-linux")


def readelf(tool: str, *args: str) -> str:
    return subprocess.run([tool, "-W", *args], check=True, capture_output=True, text=True).stdout


def needed(tool: str, lib: Path) -> list[str]:
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", readelf(tool, "-d", str(lib)))


def version_files(tool: str, lib: Path) -> dict[str, str]:
    """Version name -> the library it is needed from (readelf -V's .gnu.version_r)."""
    out, current = {}, None
    for line in readelf(tool, "-V", str(lib)).splitlines():
        m = re.search(r"File: (\S+)\s+Cnt:", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"Name: (\S+)\s+Flags:", line)
        if m and current:
            out[m.group(1)] = current
    return out


def dyn_symbols(tool: str, lib: Path):
    """(name, version or None, type, weak, defined) for each dynamic symbol."""
    for line in readelf(tool, "--dyn-syms", str(lib)).splitlines():
        f = line.split()
        if len(f) < 8 or not f[0].endswith(":") or not f[0][:-1].isdigit():
            continue
        typ, bind, ndx, name = f[3], f[4], f[6], f[7]
        version = None
        if "@" in name:
            name, _, version = name.partition("@")
            version = version.lstrip("@")
        yield name, version, typ, bind == "WEAK", ndx != "UND"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("torch_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--readelf", default="aarch64-linux-gnu-readelf")
    p.add_argument("--cc", default="aarch64-linux-gnu-gcc")
    p.add_argument(
        "--sysroot",
        type=Path,
        action="append",
        default=[],
        help="folders whose libraries count as present (the target's lib dirs)",
    )
    p.add_argument("--python", type=Path, help="the target's interpreter (defines Py* symbols)")
    a = p.parse_args(argv)
    libs = sorted((a.torch_dir / "lib").glob("*.so*")) + sorted(a.torch_dir.glob("_C*.so"))
    present = {lib.name for lib in libs}
    for d in a.sysroot:
        present |= {q.name for q in d.glob("*.so*")}
    missing: list[str] = []
    for lib in libs:
        for n in needed(a.readelf, lib):
            if n not in present and not n.startswith(SYSTEM) and n not in missing:
                missing.append(n)
    if not missing:
        print("aarch64_stubs: every library torch needs is present")
        return 0
    versioned = {n: {} for n in missing}  # soname -> {version: {name: type}}
    unversioned: dict[str, str] = {}
    defined: set[str] = set()
    for lib in libs:
        files = version_files(a.readelf, lib)
        for name, version, typ, weak, is_defined in dyn_symbols(a.readelf, lib):
            if is_defined:
                defined.add(name)
            elif version and files.get(version) in versioned:
                versioned[files[version]].setdefault(version, {})[name] = typ
            elif not version and not weak:  # a weak one may stay unbound (null)
                unversioned[name] = typ
    others = [q for d in a.sysroot for q in sorted(d.glob("*.so*")) if not q.is_symlink()]
    for other in others + ([a.python] if a.python else []):
        defined |= {n for n, _, _, _, d in dyn_symbols(a.readelf, other) if d}
    # Unversioned references that nothing present defines (the system's are versioned).
    loose = {n: t for n, t in unversioned.items() if n not in defined}
    a.out_dir.mkdir(parents=True, exist_ok=True)
    for i, soname in enumerate(missing):
        versions = versioned[soname]
        extra = loose if i == 0 else {}
        src, script = [], []
        for version, syms in sorted(versions.items()):
            script.append(f"{version} {{ global: {'; '.join(sorted(syms))}; }};")
            src += [_definition(n, t) for n, t in sorted(syms.items())]
        taken = {n for syms in versions.values() for n in syms}
        src += [_definition(n, t) for n, t in sorted(extra.items()) if n not in taken]
        c = a.out_dir / f"{soname}.c"
        c.write_text("\n".join(src) + "\n")
        cmd = [
            a.cc,
            "-shared",
            "-fPIC",
            "-o",
            str(a.out_dir / soname),
            str(c),
            f"-Wl,-soname,{soname}",
        ]
        if script:
            (a.out_dir / f"{soname}.map").write_text("\n".join(script) + "\n")
            cmd.append(f"-Wl,--version-script={a.out_dir / f'{soname}.map'}")
        subprocess.run(cmd, check=True)
        count = sum(len(s) for s in versions.values()) + len(extra)
        print(f"aarch64_stubs: {soname}: {count} symbols")
    return 0


def _definition(name: str, typ: str) -> str:
    if typ == "OBJECT" or typ == "TLS":
        return f"char {name}[4096];"
    return f"int {name}(void) {{ return 100; }}"


if __name__ == "__main__":
    sys.exit(main())
