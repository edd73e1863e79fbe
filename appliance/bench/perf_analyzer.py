"""Triton's own load generator, `perf_analyzer` (shipped in tritonclient), against the appliance's text
model over HTTP and over gRPC streaming, with its plain flags (no `-x VERSION`).

It needs Debian's `libb64-0d` and `libcudart.so.12`, which the `nvidia-cuda-runtime-cu12` wheel
carries (found here and put on LD_LIBRARY_PATH). `python -m appliance.bench.perf_analyzer` starts a
server and prints requests/s at a few concurrencies; `make bench-serve` runs it after its own table.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

THROUGHPUT = re.compile(r"Concurrency: (\d+), throughput: ([0-9.]+) infer/sec, latency (\d+) usec")


def binary() -> Path:
    found = Path(sys.executable).parent / "perf_analyzer"
    if not found.is_file():
        raise FileNotFoundError(f"no perf_analyzer at {found}: it comes with tritonclient")
    return found


def environment() -> dict[str, str]:
    """LD_LIBRARY_PATH with the CUDA runtime wheel's lib folder (perf_analyzer links libcudart.so.12)."""
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime

        lib = str(Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib")
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (lib, env.get("LD_LIBRARY_PATH")) if p)
    except ImportError:
        pass  # perhaps a system CUDA runtime
    return env


def run(
    model: str,
    url: str,
    protocol: str = "http",
    key: str | None = None,
    concurrency: int = 1,
    max_tokens: int = 1,
    requests: int = 4,
) -> dict:
    """One perf_analyzer run; its requests/s and mean latency, or RuntimeError with its output.
    A window is `requests` completed requests (count_windows: a slow CPU box never ends up with an
    empty time window), and windows count as stable within 999 %: on a busy box the default 10 % is
    rarely met; the figure is the tool's own mean over its last windows either way."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"data": [{"text_input": ["The capital of France is"], "max_tokens": [max_tokens]}]}, f)
    cmd = [str(binary()), "-m", model, "-u", url, "-i", protocol, "--input-data", f.name]
    cmd += ["--concurrency-range", str(concurrency), "--measurement-mode", "count_windows"]
    cmd += ["--measurement-request-count", str(requests), "--stability-percentage", "999", "-r", "10"]
    if protocol == "grpc":
        cmd.append("--streaming")  # the text model is decoupled: one response per piece, then a final one
    if key:
        cmd += ["-H", f"authorization:Bearer {key}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=environment(), timeout=300)
    finally:
        os.unlink(f.name)
    found = THROUGHPUT.search(done.stdout)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"perf_analyzer exited with {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
    return {
        "protocol": protocol,
        "concurrency": int(found[1]),
        "requests_per_s": float(found[2]),
        "latency_ms": int(found[3]) / 1e3,
    }


def main() -> None:
    from appliance.bench.engine import print_table
    from appliance.testbed.launch import bench_server
    from models.store import ModelStore

    path = ModelStore().get()
    rows = []
    with bench_server(path) as (http, grpc):
        for protocol, url in (("http", f"127.0.0.1:{http}"), ("grpc", f"127.0.0.1:{grpc}")):
            for concurrency in (1, 4):
                rows.append(run(path.stem, url, protocol, concurrency=concurrency, max_tokens=16, requests=20))
    print_table(
        f"{path.name}: Triton perf_analyzer, requests of 16 tokens (gRPC: --streaming), {os.cpu_count()} CPU threads",
        ["protocol", "concurrency", "requests/s", "tokens/s", "mean latency ms"],
        [
            [
                r["protocol"],
                str(r["concurrency"]),
                f"{r['requests_per_s']:.2f}",
                f"{16 * r['requests_per_s']:.1f}",
                f"{r['latency_ms']:.0f}",
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
