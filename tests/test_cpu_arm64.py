"""The arm64 kernels (kernels/cpu/arm.c) on an x86 machine: tests/native/arm_driver.c is cross-compiled
with the kernel sources and run under qemu-aarch64 as a Cortex-A53 (NEON, no dotprod) and a Cortex-A76
(dotprod), and its products are checked against the NumPy reference as test_cpu_kernels.py checks
the x86 variants. `make system-test-deps` installs the Debian packages this needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as Q

from kernels.backend import NumpyBackend
from kernels.reference import rope_tables
from models.llama import LayerRange, LayerWeights, LlamaConfig
from tests.gguf_factory import K_FORMATS, random_k_blocks
from tests.test_cpu_kernels import FLOAT, TYPES, random_weight, reference

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = "gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
CC, QEMU, SYSROOT = "aarch64-linux-gnu-gcc", "qemu-aarch64", "/usr/aarch64-linux-gnu"
# The CPU qemu emulates, and the variant the kernels must pick on it by what it reports.
CPUS = {"cortex-a53": "neon", "cortex-a76": "neon-dotprod"}


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    missing = [tool for tool in (CC, QEMU) if shutil.which(tool) is None]
    if not Path(SYSROOT, "include/stdio.h").exists():
        missing.append(f"{SYSROOT}/include")
    if missing:
        why = f"{' and '.join(missing)} not found: `make system-test-deps` installs Debian's {PACKAGES}"
        if os.environ.get("CI"):  # CI must run these, not skip them
            pytest.fail(why)
        pytest.skip(why)
    kernels = [str(p) for p in sorted((ROOT / "kernels/cpu").glob("*.c")) if p.name != "module.c"]
    exe = tmp_path_factory.mktemp("arm64") / "arm_driver"
    build = [CC, "-std=c11", "-O3", "-pthread", "-Wall", "-Werror", "-Wno-unused-function", "-o", str(exe)]
    subprocess.run([*build, str(ROOT / "tests/native/arm_driver.c"), *kernels, "-lm"], check=True)
    return exe


def matmul_jobs(rng: np.random.Generator) -> list[tuple]:
    """Every format at test_cpu_kernels.py's odd sizes, each size on its own thread count."""
    jobs = []
    for qtype in TYPES:
        per_block = GGML_QUANT_SIZES[qtype][0] if qtype not in FLOAT else 32
        for threads, (rows, cols, batch) in enumerate(
            [(37, 2 * per_block, 1), (5, 3 * per_block, 9), (131, per_block, 4)], 1
        ):
            raw = random_weight(qtype, rows, cols, rng)
            jobs.append((qtype, threads, raw, rng.standard_normal((batch, cols)).astype(np.float32)))
    return jobs


def scaled_weight(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Blocks of qtype whose values are about a trained layer's size (as gguf_factory writes them)."""
    scale = cols**-0.5
    if qtype in K_FORMATS:
        return random_k_blocks(rng, (rows, cols), qtype, scale)
    data = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    return data.astype(np.float16 if qtype == Q.F16 else np.float32) if qtype in FLOAT else quants.quantize(data, qtype)


# One layer with every format in it; two sequences: a 3-token prompt, and one token after 5 cached.
CONFIG = LlamaConfig(256, 1, 4, 2, 64, 512, 1, 16, 1e-5, 10000.0)
LAYER_TYPES = {"wq": Q.Q4_0, "wk": Q.Q4_1, "wv": Q.Q8_0, "wo": Q.F16, "w_gate": Q.Q4_K, "w_up": Q.Q6_K, "w_down": Q.F32}
SEQS = [(3, 0), (1, 5)]  # (new tokens, cached before)


def layer_job(rng: np.random.Generator, workdir: Path) -> tuple[str, np.ndarray]:
    """Write one layer's files for the driver; return its command and the NumPy reference's output."""
    c = CONFIG
    D, F, HE, GE = c.dim, c.hidden_dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {
        "wq": (HE, D),
        "wk": (GE, D),
        "wv": (GE, D),
        "wo": (D, HE),
        "w_gate": (F, D),
        "w_up": (F, D),
        "w_down": (D, F),
    }
    raw = {name: scaled_weight(rng, LAYER_TYPES[name], *shapes[name]) for name in shapes}
    norms = {name: (1 + 0.1 * rng.standard_normal(D)).astype(np.float32) for name in ("attn_norm", "ffn_norm")}
    numpy = NumpyBackend()
    weights = {name: numpy.weight(raw[name].view(np.uint8), LAYER_TYPES[name], shapes[name]) for name in shapes}
    layer = LayerRange(c, numpy, 0, [LayerWeights(**norms, **weights)])
    xs = [rng.standard_normal((n, D)).astype(np.float32) for n, _ in SEQS]
    caches, seqs = [], []
    for j, (n, cached) in enumerate(SEQS):
        cache = layer.new_cache()
        cache.k[:, :cached] = rng.standard_normal((1, cached, c.n_kv_heads, c.head_dim))
        cache.v[:, :cached] = rng.standard_normal((1, cached, c.n_kv_heads, c.head_dim))
        cache.length = cached
        cache.k.astype(np.float16).tofile(workdir / f"k{j}.bin")  # the C kernels' cache is float16
        cache.v.astype(np.float16).tofile(workdir / f"v{j}.bin")
        caches.append(cache)
        seqs.append(f"{n} {cached} {cache.capacity}")
    positions = np.concatenate([np.arange(cached, cached + n) for n, cached in SEQS])
    cos, sin = rope_tables(positions, c.inv_freq, c.rope_attn_factor)
    for name, array in {**raw, **norms, "x": np.concatenate(xs), "cos": cos, "sin": sin}.items():
        np.ascontiguousarray(array).tofile(workdir / f"{name}.bin")
    want = np.concatenate(layer.forward(xs, caches))
    types = " ".join(str(int(LAYER_TYPES[name])) for name in shapes)
    dims = f"{D} {c.n_heads} {c.n_kv_heads} {c.head_dim} {F} {c.norm_eps}"
    return f"layer {workdir} {dims} {types} {len(SEQS)} {' '.join(seqs)}", want


def quantize_q8_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """generic.c's quantize_q8 in float32 NumPy: d = max|x| / 127 per 32 values, q = x * (1/d) rounded to even."""
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    return d, np.rint(blocks * inv[:, None]).astype(np.int8)


@pytest.fixture(scope="module", params=list(CPUS))
def run(request, driver, tmp_path_factory):
    """All jobs in one qemu run per CPU (its start costs more than a job): the driver's first lines,
    and each job with what the driver computed."""
    cpu, work = request.param, tmp_path_factory.mktemp(request.param)
    rng = np.random.default_rng(10)
    commands, portable, matmuls = [], ["isa generic"], []
    for i, (qtype, threads, raw, x) in enumerate(matmul_jobs(rng)):
        raw.tofile(work / f"w{i}.bin")
        x.tofile(work / f"x{i}.bin")
        args = f"matmul {int(qtype)} {raw.shape[0]} {x.shape[1]} {len(x)} {work}/w{i}.bin {work}/x{i}.bin {work}"
        commands += [f"threads {threads}", f"{args}/y{i}.bin"]
        portable.append(f"{args}/g{i}.bin")  # the same product by generic.c
        matmuls.append((qtype, threads, raw, x, work / f"y{i}.bin", work / f"g{i}.bin"))
    acts = rng.standard_normal(7 * 32).astype(np.float32) * np.repeat(rng.uniform(0.01, 10, 7), 32).astype(np.float32)
    acts[32:64] = 0  # a block of zeros: scale 0, no division by it
    acts.tofile(work / "acts.bin")
    commands.append(f"quantize {len(acts)} {work}/acts.bin {work}/q8.bin")
    (work / "layer").mkdir()
    layer_command, layer_want = layer_job(rng, work / "layer")
    commands += ["threads 2", layer_command, *portable]  # generic.c last: the rest ran on the CPU's choice
    qemu = [QEMU, "-L", SYSROOT, "-cpu", cpu, str(driver)]
    proc = subprocess.run(qemu, input="\n".join(commands) + "\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the driver failed under {cpu}: {proc.stderr}"
    lines = proc.stdout.splitlines()
    assert lines.count("ok") == len(commands), proc.stdout
    q8 = np.fromfile(work / "q8.bin", dtype=np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", 32)]))
    layer = (layer_want, np.fromfile(work / "layer/out.bin", np.float32).reshape(layer_want.shape))
    return {"cpu": cpu, "lines": lines, "matmuls": matmuls, "quantize": (acts, q8), "layer": layer}


def test_the_variant_is_the_one_the_cpu_reports(run):
    """The driver picks through detect_isas, as kernels._cpu does at import: dotprod only where HWCAP says so."""
    want = CPUS[run["cpu"]]
    assert run["lines"][0] == f"isa {want}"
    assert run["lines"][1] == "isas " + " ".join([want, *(["neon"] if want != "neon" else []), "generic"])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_matches_reference(run, qtype):
    for q, threads, raw, x, out, _ in run["matmuls"]:
        if q != qtype:
            continue
        rows, cols = raw.shape[0], x.shape[1]
        got = np.fromfile(out, np.float32).reshape(len(x), rows)
        want = reference(raw, qtype, rows, cols, x)
        err = np.abs(got - want).max() / np.abs(want).max()  # the tolerances of test_cpu_kernels.py
        assert err < (1e-5 if qtype in FLOAT else 1e-2), (
            f"{qtype.name} [{rows}x{cols}] batch {len(x)} on {threads} threads, {run['cpu']}: relative error {err:.2e}"
        )


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_variant_agrees_with_portable_c(run, qtype):
    """The NEON variants sum the same integers as generic.c: only float rounding may differ."""
    for q, *_, out, portable_out in run["matmuls"]:
        if q == qtype:
            got, portable = np.fromfile(out, np.float32), np.fromfile(portable_out, np.float32)
            np.testing.assert_allclose(got, portable, rtol=1e-4, atol=1e-4 * np.abs(portable).max(), err_msg=run["cpu"])


def test_quantize_q8_matches_reference(run):
    acts, q8 = run["quantize"]
    d, qs = quantize_q8_reference(acts)
    np.testing.assert_array_equal(q8["d"], d)
    np.testing.assert_array_equal(q8["qs"], qs)
    np.testing.assert_allclose(q8["s"], d * qs.sum(axis=1, dtype=np.int32), rtol=1e-6)


def test_fused_layer_matches_reference(run):
    """One layer of every format through layer.c on 2 threads: a prompt and a decode step with a cache."""
    want, got = run["layer"]
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-2, f"fused layer on {run['cpu']}: relative error {err:.2e}"
