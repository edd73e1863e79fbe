"""The CUDA kernels build for every target without a GPU, spill nothing, and the committed fatbin is current."""

from __future__ import annotations

import json
import re

import pytest

from kernels.cuda import build
from tests.scale import FULL

# The suite compiles for Jetson Orin's sm_87 alone (~20 s on 2 cores); `make test-full` for every target.
ARCHS = build.SASS_ARCHS if FULL else ("87",)

SPILLING_REPORT = """\
ptxas info    : Compiling entry function 'matvec_q4_0_b8' for 'sm_90'
ptxas info    : Function properties for matvec_q4_0_b8
    8 bytes stack frame, 8 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 8 bytes cumulative stack size
ptxas info    : Compiling entry function 'sample' for 'sm_87'
ptxas info    : Function properties for sample
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 4352 bytes smem
"""


@pytest.fixture(scope="module")
def fresh_build(tmp_path_factory):
    """The fatbin rebuilt from the sources with the nvcc of the cuda-build extra (all targets: minutes on 2 cores)."""
    try:
        build.find_nvcc()
    except build.BuildError as e:
        pytest.fail(str(e))
    out = tmp_path_factory.mktemp("fatbin") / "appliance_kernels.fatbin"
    report = build.compile_fatbin(out, sass_archs=ARCHS, ptx_arch=build.PTX_ARCH if FULL else None)
    return out, build.parse_ptxas(report)


def test_every_kernel_compiles_without_spills(fresh_build):
    fatbin, resources = fresh_build
    committed = json.loads(build.MANIFEST.read_text())
    by_arch = {}
    for r in resources:
        by_arch.setdefault(r.arch, set()).add(r.kernel)
    assert sorted(by_arch) == sorted(f"sm_{a}" for a in ARCHS)
    for arch, kernels in by_arch.items():
        assert kernels == set(committed["kernels"]), f"{arch} lacks {set(committed['kernels']) - kernels}"
    assert build.spilling(resources) == [], "kernels spill registers to local memory"
    assert fatbin.stat().st_size > 0


def test_every_source_is_in_the_build():
    included = set(re.findall(r'#include "(\w+\.cu)"', build.UNITY.read_text()))
    assert included == {p.name for p in build.sources() if p.suffix == ".cu"} - {build.UNITY.name}


def test_committed_fatbin_is_current():
    assert build.stale_reasons() == [], "run `make fatbin` and commit kernels/cuda/appliance_kernels.fatbin"


def test_a_changed_source_makes_the_fatbin_stale(tmp_path):
    manifest = json.loads(build.MANIFEST.read_text())
    manifest["sources"]["matvec.cu"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert build.stale_reasons(tmp_path / "manifest.json") == ["matvec.cu changed"]


def test_ptxas_report_parser_finds_spills():
    resources = build.parse_ptxas(SPILLING_REPORT)
    assert [(r.kernel, r.arch, r.registers) for r in resources] == [
        ("matvec_q4_0_b8", "sm_90", 40),
        ("sample", "sm_87", 32),
    ]
    assert [r.kernel for r in build.spilling(resources)] == ["matvec_q4_0_b8"]
