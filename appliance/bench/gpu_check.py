"""Every GPU check in one go (`make gpu-check`), printed as one table.

Rows: each kernel against the NumPy reference on random data; the emulator's kernel tests with every
launch mirrored on the GPU and compared; greedy text of `--backend cuda` (the product's engine) on
three prompts against the reference (or, where a near-tie flips, the reference's margin there);
compute-sanitizer on a short generation; decode tok/s at batch 1 and 8 and prefill tok/s for a
512-token prompt, for SmolLM2-135M and a synthetic Llama-3.2-1B-shaped Q4_0 model, beside
transformers on the same GPU, with the memory-bandwidth bound. Exits 2 where there is no GPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kernels import reference
from kernels.cuda_backend import KERNEL_FORMATS, Q8_BLOCK_BYTES, WIDTHS, gpu_present
from kernels.dequant import dequantize

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,")
ROWS: list[tuple[str, str, str]] = []  # (check, result, detail)


def row(check: str, ok: bool | None, detail: str) -> None:
    ROWS.append((check, "PASS" if ok else ("FAIL" if ok is False else "-"), detail))
    print(f"{check:<44} {ROWS[-1][1]:<5} {detail}", flush=True)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def random_weight(rng, qtype, rows: int, cols: int) -> np.ndarray:
    from gguf import quants

    from tests.gguf_factory import K_FORMATS, random_k_blocks

    if qtype in K_FORMATS:
        return random_k_blocks(rng, (rows, cols), qtype, cols**-0.5 * K_FORMATS[qtype][1] * 400)
    data = (rng.standard_normal((rows, cols)) * cols**-0.5).astype(np.float32)
    if qtype.name == "F16":
        return data.astype(np.float16).view(np.uint8)
    return quants.quantize(data, qtype).view(np.uint8)


def check_kernels(dev) -> None:
    """Each kernel on random data (odd token counts included) against the reference formulas."""
    rng = np.random.default_rng(0)
    N, K = 320, 512
    for qtype, fmt in KERNEL_FORMATS.items():
        raw = random_weight(rng, qtype, N, K)
        w_ref = dequantize(raw, qtype, (N, K))
        w = dev.upload(raw)
        worst = 0.0
        for width in WIDTHS:
            x = rng.standard_normal((width, K)).astype(np.float32)
            xd, q, y = dev.upload(x), dev.alloc(width * K // 32 * Q8_BLOCK_BYTES), dev.alloc(width * N * 4)
            dev.quantize(xd, width, K, q)
            dev.matvec(fmt, w, N, K, q, y, width, N, False)
            worst = max(worst, rel(dev.to_host(y, (width, N)), x @ w_ref.T))
        row(f"matvec {fmt} (widths 1-8)", worst < 2e-2, f"rel err {worst:.1e} (8-bit activations)")
        T = 77
        x = rng.standard_normal((T, K)).astype(np.float32)
        y = dev.alloc(T * N * 4)
        dev.matmat(fmt, w, N, K, dev.upload(x), T, y, N, False)
        err = rel(dev.to_host(y, (T, N)), x @ w_ref.T)
        row(f"matmat {fmt} (T={T})", err < 5e-3, f"rel err {err:.1e} (half operands, float sums)")
        ids = rng.integers(0, N, 5).astype(np.int32)
        out = dev.alloc(5 * K * 4)
        dev.embed(fmt, w, K, dev.upload(ids), out, 5)
        err = rel(dev.to_host(out, (5, K)), w_ref[ids])
        row(f"embed {fmt}", err < 1e-6, f"rel err {err:.1e}")
    # RMSNorm, and SwiGLU fused with gate/up.
    D, F = 576, 1536
    x = rng.standard_normal((3, D)).astype(np.float32)
    g = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    y = dev.alloc(3 * D * 4)
    dev.rmsnorm_quant(dev.upload(x), dev.upload(g), 3, D, 1e-5, y, 0)
    err = rel(dev.to_host(y, (3, D)), reference.rmsnorm(x, g, 1e-5))
    row("rmsnorm", err < 1e-5, f"rel err {err:.1e}")
    from gguf import GGMLQuantizationType as Q

    wg, wu = random_weight(rng, Q.Q4_0, F, D), random_weight(rng, Q.Q4_0, F, D)
    q, hq, h = dev.alloc(D // 32 * Q8_BLOCK_BYTES), dev.alloc(F // 32 * Q8_BLOCK_BYTES), dev.alloc(F * 4)
    dev.quantize(dev.upload(x[:1]), 1, D, q)
    dev.swiglu_vec("q4_0", dev.upload(wg), dev.upload(wu), F, D, q, hq, 1)
    # Read the quantized result back through a mat-vec with the identity would need Q8 weights; decode it.
    blocks = dev.to_host(hq, (F // 32, Q8_BLOCK_BYTES), np.uint8)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    got = (blocks[:, 4:].view(np.int8).astype(np.float32) * d).reshape(F)
    gate, up = x[:1] @ dequantize(wg, Q.Q4_0, (F, D)).T, x[:1] @ dequantize(wu, Q.Q4_0, (F, D)).T
    err = rel(got, (reference.silu(gate) * up)[0])
    row("swiglu fused with gate/up (q4_0)", err < 3e-2, f"rel err {err:.1e}")
    del h


def check_layer0(ref_model, cuda_model) -> None:
    """RoPE + attention inside the model against the reference: layer 0 as the backend's CudaRange,
    T=1 (the graph-replayed mat-vec step) and T=37 (mat-mat)."""
    from models.llama import Session

    rng = np.random.default_rng(1)
    for T in (1, 37):
        hidden = rng.standard_normal((T, ref_model.config.dim)).astype(np.float32)
        ref = ref_model.run_layers((0, 1), hidden, Session())
        got = cuda_model.run_layers((0, 1), hidden, Session())
        err = rel(got, ref)
        row(f"layer 0 (norm, rope, attention, swiglu) T={T}", err < 2e-2, f"rel err {err:.1e}")


def greedy(engine, ids: list[int], n_new: int) -> list[int]:
    gen = engine.generate(ids, max_tokens=n_new, ignore_eos=True)
    gen.run()
    return gen.token_ids


def check_greedy(ref_engine, engine, n_new: int = 24, prompts=PROMPTS) -> None:
    """The cuda engine's greedy text (the product path: engine, CudaRange, head) against the reference's;
    prompts: texts, or token id lists."""
    from models.llama import Session

    for prompt in prompts:
        ids = ref_engine.prompt_ids(prompt) if isinstance(prompt, str) else list(prompt)
        got = greedy(engine, ids, n_new)
        session, want, margin_at = Session(), [], None
        logits = ref_engine.next_logits(ids, session)
        for step in range(n_new):
            top2 = np.sort(logits)[-2:]
            want.append(int(np.argmax(logits)))
            if got[: step + 1] != want and margin_at is None:
                margin_at = (step, float(top2[1] - top2[0]))
                break
            logits = ref_engine.next_logits([want[-1]], session)
        if margin_at is None:
            row(f"greedy text: {str(prompt)[:24]!r}", True, f"{n_new} tokens equal the reference's")
        else:
            step, margin = margin_at
            row(
                f"greedy text: {str(prompt)[:24]!r}",
                margin < 0.1,
                f"differs at token {step}; reference margin {margin:.3f}",
            )


def bench(engine, label: str, bound_bytes: int, bandwidth: float) -> dict:
    """Decode tok/s at batch 1 and 8 (Engine.step: the range's CUDA-graph replay and the head) and
    prefill tok/s for 512 tokens, through the product's engine."""
    from models.llama import Session

    rng = np.random.default_rng(2)
    prompt = rng.integers(10, 1000, 512).tolist()
    engine.step([prompt[:8]], [Session()])  # warm-up
    t = time.perf_counter()
    engine.step([prompt], [Session()])
    prefill = 512 / (time.perf_counter() - t)
    out = {}
    for batch in (1, 8):
        sessions = [Session() for _ in range(batch)]
        for s in sessions:
            engine.step([prompt[:16]], [s])
        toks = [[5]] * batch
        for _ in range(3):
            logits, _ = engine.step(toks, sessions)
            toks = [[int(t)] for t in logits.argmax(axis=1)]
        n = 128
        t = time.perf_counter()
        for _ in range(n):
            logits, _ = engine.step(toks, sessions)
            toks = [[int(t)] for t in logits.argmax(axis=1)]
        out[batch] = batch * n / (time.perf_counter() - t)
    bound = bandwidth / bound_bytes
    row(f"bench {label}: decode b1", None, f"{out[1]:.0f} tok/s ({out[1] / bound:.0%} of the {bound:.0f} tok/s bound)")
    row(f"bench {label}: decode b8", None, f"{out[8]:.0f} tok/s ({out[8] / out[1]:.1f}x batch 1)")
    row(f"bench {label}: prefill 512", None, f"{prefill:.0f} tok/s")
    return {"b1": out[1], "b8": out[8], "prefill": prefill}


def emulated_kernel_tests(subject: str = "gpu", select: str | None = None) -> None:
    """The emulator's kernel tests (tests/test_cuda_emulated.py) with every launch also on this GPU,
    same inputs, each result compared (tests/ptx/mirror.py); a difference fails the test it is in.
    subject "emulated" mirrors onto a second emulated GPU (how the suite runs this path without one)."""
    from tests.ptx.mirror import MIRROR_ENV

    env = {**os.environ, MIRROR_ENV: subject, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda_emulated.py"]
    cmd += ["-k", select] if select else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    row(f"emulator's kernel tests, mirrored on the {subject}", proc.returncode == 0, summary)


def bench_transformers(path: Path, label: str) -> None:
    """The same GGUF through transformers (dequantized to float16) on the same GPU."""
    try:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float16)
        model = model.cuda().eval()
        ids = torch.randint(10, 1000, (1, 512), device="cuda")
        with torch.no_grad():
            model(ids[:, :8])
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
            prefill = 512 / (time.perf_counter() - t)
            for batch in (1, 8):
                t = time.perf_counter()
                model.generate(ids[:, :16].repeat(batch, 1), max_new_tokens=64, min_new_tokens=64, do_sample=False)
                torch.cuda.synchronize()
                rate = batch * 64 / (time.perf_counter() - t)
                row(f"transformers {label}: decode b{batch}", None, f"{rate:.0f} tok/s (generate, float16)")
        row(f"transformers {label}: prefill 512", None, f"{prefill:.0f} tok/s")
        del model
        torch.cuda.empty_cache()
    except Exception as e:  # a peer that will not run is reported, not fatal
        row(f"transformers {label}", None, f"did not run: {type(e).__name__}: {e}")


def measure_bandwidth(dev, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read plus written per second."""
    a, b = dev.alloc(nbytes), dev.alloc(nbytes)
    dev.cuda.memcpy_dtod(b, a, nbytes)
    dev.ctx.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        dev.cuda.memcpy_dtod(b, a, nbytes)
    dev.ctx.synchronize()
    return 2 * nbytes * 10 / (time.perf_counter() - t)


def sanitizer(model_path: Path) -> None:
    cmd = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "9", sys.executable, "-m",
           "appliance.bench.gpu_check", "--short-generation", "--model", str(model_path)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        row("compute-sanitizer memcheck", False, "compute-sanitizer not on PATH")
        return
    summary = [line for line in proc.stdout.splitlines() if "ERROR SUMMARY" in line]
    row("compute-sanitizer memcheck (8 tokens)", proc.returncode == 0, summary[-1] if summary else proc.stderr[-200:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the store's SmolLM2)")
    parser.add_argument("--short-generation", action="store_true", help="(for compute-sanitizer) 8 greedy tokens")
    parser.add_argument("--skip-1b", action="store_true")
    args = parser.parse_args()
    if not gpu_present():
        print(
            "error: no NVIDIA GPU on this machine (NVML finds none): gpu-check runs only where one is", file=sys.stderr
        )
        return 2
    from kernels.cuda_backend import Device
    from models.engine import Engine
    from models.gguf_file import open_gguf
    from models.store import ModelStore

    model_path = args.model or ModelStore().get()  # the lent GPU machines have no network: pass --model
    if args.short_generation:
        print(greedy(Engine.load(model_path, "cuda"), [1, 2, 3, 4], 8))
        return 0
    dev = Device()
    print(f"device: {dev.name} ({dev.sms} SMs, {'integrated' if dev.integrated else 'discrete'})")
    check_kernels(dev)
    emulated_kernel_tests("gpu")
    ref = Engine.load(model_path, backend="numpy")
    engine = Engine.load(model_path, backend="cuda")  # the product path: what `--backend cuda` serves with
    check_layer0(ref.model, engine.model)
    check_greedy(ref, engine)
    sanitizer(model_path)
    bandwidth = measure_bandwidth(dev)
    row("memory bandwidth (device copy)", None, f"{bandwidth / 1e9:.0f} GB/s")
    bench(engine, "SmolLM2-135M", open_gguf(model_path).quantized_bytes, bandwidth)
    bench_transformers(model_path, "SmolLM2-135M")
    if not args.skip_1b:
        from models.synthetic import write_llama_1b_q4_0

        with tempfile.TemporaryDirectory() as tmp:
            path = write_llama_1b_q4_0(Path(tmp) / "llama-1b-shapes.Q4_0.gguf")
            # Per token a decode reads every layer weight and the (tied) head once; the embedding row is noise.
            bench(Engine.load(path, "cuda"), "Llama-1B-shape Q4_0", open_gguf(path).quantized_bytes, bandwidth)
            bench_transformers(path, "Llama-1B-shape Q4_0")
    print("\n| check | result | detail |\n|---|---|---|")
    for check, result, detail in ROWS:
        print(f"| {check} | {result} | {detail} |")
    return 1 if any(r[1] == "FAIL" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
