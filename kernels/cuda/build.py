"""Build every CUDA kernel ahead of time into one fatbin, with a manifest saying what it was built from.

    python -m kernels.cuda.build          # (make fatbin) writes appliance_kernels.fatbin + manifest.json

nvcc comes from PyPI (`pip install -e '.[cuda-build]'`: nvidia-cuda-nvcc and the CCCL headers), so
every target compiles on a machine without a GPU. The fatbin holds machine code (SASS) for each
chip the appliance runs on and PTX for the newest, which newer chips' drivers compile at load.
ptxas's resource report is parsed: a kernel that spills registers to local memory fails the build.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
UNITY = HERE / "appliance_kernels.cu"  # includes every other .cu
FATBIN = HERE / "appliance_kernels.fatbin"
MANIFEST = HERE / "manifest.json"
# Jetson Orin, Hopper, datacenter Blackwell, consumer Blackwell, DGX Spark (GB10).
SASS_ARCHS = ("87", "90", "100", "120", "121")
PTX_ARCH = "121"  # PTX of the newest: a later chip's driver compiles it at load
NVCC_FLAGS = ("-O3", "-std=c++17", "--use_fast_math", "-Xptxas", "-v")


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class KernelResources:
    arch: str
    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int


def find_nvcc() -> str:
    """$NVCC, else the nvcc of the nvidia-cuda-nvcc wheel in this environment, else nvcc on PATH."""
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations if spec and spec.submodule_search_locations else []:
        for candidate in sorted(Path(root).glob("cu*/bin/nvcc"), reverse=True):
            return str(candidate)
    found = shutil.which("nvcc")
    if not found:
        raise BuildError("nvcc not found: pip install -e '.[cuda-build]' (or set NVCC)")
    return found


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]  # e.g. "Build cuda_13.5.r13.5/compiler.39125733_0"


def sources() -> list[Path]:
    return sorted(p for p in HERE.iterdir() if p.suffix in (".cu", ".cuh"))


def source_hashes() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sources()}


def targets() -> list[str]:
    return [f"sm_{a}" for a in SASS_ARCHS] + [f"compute_{PTX_ARCH}"]


def gencode_flags(sass_archs=SASS_ARCHS, ptx_arch: str | None = PTX_ARCH) -> list[str]:
    flags = []
    for a in sass_archs:
        code = f"[sm_{a},compute_{a}]" if a == ptx_arch else f"sm_{a}"
        flags += ["-gencode", f"arch=compute_{a},code={code}"]
    return flags


def compile_fatbin(out: Path, source: Path = UNITY, sass_archs=SASS_ARCHS, ptx_arch: str | None = PTX_ARCH) -> str:
    """Run nvcc; return ptxas's report (its -v output). nvcc runs one job per core, no more."""
    nvcc = find_nvcc()
    cmd = [nvcc, "-fatbin", *NVCC_FLAGS, f"--threads={os.cpu_count() or 1}", *gencode_flags(sass_archs, ptx_arch)]
    proc = subprocess.run([*cmd, str(source), "-o", str(out)], capture_output=True, text=True, cwd=HERE)
    if proc.returncode != 0:
        raise BuildError(f"nvcc failed on {source.name}:\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(report: str) -> list[KernelResources]:
    """Each kernel's registers and spills per target, from ptxas -v's report."""
    found, current, spills = [], None, (0, 0)
    for line in report.splitlines():
        if m := _ENTRY.search(line):
            current, spills = (m.group(2), m.group(1)), (0, 0)
        elif (m := _SPILL.search(line)) and current:
            spills = (int(m.group(1)), int(m.group(2)))
        elif (m := _REGS.search(line)) and current:
            found.append(KernelResources(current[0], current[1], int(m.group(1)), *spills))
            current = None
    return found


def spilling(resources: list[KernelResources]) -> list[KernelResources]:
    return [r for r in resources if r.spill_stores or r.spill_loads]


def build(out_dir: Path = HERE) -> dict:
    """Build the fatbin into out_dir and write its manifest there; fail on any spill."""
    fatbin = out_dir / FATBIN.name
    report = compile_fatbin(fatbin)
    resources = parse_ptxas(report)
    if bad := spilling(resources):
        raise BuildError("kernels spill to local memory: " + ", ".join(f"{r.kernel} ({r.arch})" for r in bad))
    manifest = {
        "nvcc": nvcc_version(find_nvcc()),
        "targets": targets(),
        "flags": list(NVCC_FLAGS),
        "sources": source_hashes(),
        "fatbin_sha256": hashlib.sha256(fatbin.read_bytes()).hexdigest(),
        "kernels": sorted({r.kernel for r in resources}),
    }
    (out_dir / MANIFEST.name).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def stale_reasons(manifest_path: Path = MANIFEST, fatbin_path: Path = FATBIN) -> list[str]:
    """Why the committed fatbin does not match the sources (empty when it does)."""
    if not manifest_path.exists() or not fatbin_path.exists():
        return ["no fatbin or manifest: run make fatbin"]
    manifest = json.loads(manifest_path.read_text())
    reasons = []
    now, then = source_hashes(), manifest["sources"]
    reasons += [f"{name} changed" for name in sorted(now) if then.get(name) != now[name]]
    reasons += [f"{name} was removed" for name in sorted(set(then) - set(now))]
    if manifest["targets"] != targets():
        reasons.append(f"targets changed: {manifest['targets']} -> {targets()}")
    if hashlib.sha256(fatbin_path.read_bytes()).hexdigest() != manifest["fatbin_sha256"]:
        reasons.append("the fatbin is not the one the manifest describes")
    return reasons


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether the committed fatbin is stale")
    args = parser.parse_args()
    if args.check:
        reasons = stale_reasons()
        print("fatbin is current" if not reasons else "fatbin is stale: " + "; ".join(reasons))
        return 1 if reasons else 0
    try:
        with tempfile.TemporaryDirectory() as tmp:  # replace the committed pair only when the build succeeds
            manifest = build(Path(tmp))
            shutil.copy(Path(tmp) / FATBIN.name, FATBIN)
            shutil.copy(Path(tmp) / MANIFEST.name, MANIFEST)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = FATBIN.stat().st_size / 2**20
    print(f"{FATBIN.name}: {size:.1f} MiB, {len(manifest['kernels'])} kernels, {' '.join(manifest['targets'])}")
    print(f"nvcc: {manifest['nvcc']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
