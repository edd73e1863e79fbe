"""NVIDIA's `aiperf` against the appliance's OpenAI endpoint (`/v1/chat/completions`, streaming): an
outside load generator's requests/s, output tokens/s and time to first token.

aiperf pins older `rich` and `psutil` than ours and pulls ~1.2 GB (pandas, pyarrow, scipy, transformers,
plotly, kubernetes clients), so it lives in its own virtualenv: `make aiperf-venv` makes `.venv-aiperf`;
`make bench-serve` runs this module when that exists. The tokenizer it counts with is the model
file's own, written out as a Hugging Face `tokenizer.json` (the Hub is never asked).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

VENV = Path(os.environ.get("AIPERF_VENV", Path(__file__).resolve().parents[2] / ".venv-aiperf"))


def binary() -> Path:
    found = VENV / "bin" / "aiperf"
    if found.is_file():
        return found
    on_path = shutil.which("aiperf")
    if on_path is None:
        raise FileNotFoundError(f"no aiperf at {found} nor on PATH: `make aiperf-venv` installs it")
    return Path(on_path)


def tokenizer_folder(model: Path, into: Path) -> Path:
    """The model file's tokenizer as aiperf (transformers' AutoTokenizer) loads it from a folder."""
    from models.gguf_file import open_gguf
    from models.tokenizer import Tokenizer

    metadata = open_gguf(model).metadata
    Tokenizer(metadata).save(str(into / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": metadata.get("tokenizer.chat_template")}
    (into / "tokenizer_config.json").write_text(json.dumps(config))
    return into


def run(model: str, url: str, tokenizer: Path, key: str | None = None, concurrency: int = 1, requests: int = 8) -> dict:
    """One aiperf profile (streaming chat, 32-token prompts, 16 tokens out); its averages, or RuntimeError."""
    with tempfile.TemporaryDirectory(prefix="aiperf-") as out:
        cmd = [str(binary()), "profile", "--model-names", model, "--url", url, "--endpoint-type", "chat"]
        cmd += ["--streaming", "--tokenizer", str(tokenizer), "--use-server-token-count", "--ui-type", "none"]
        cmd += ["--concurrency", str(concurrency), "--request-count", str(requests), "--isl", "32", "--osl", "16"]
        cmd += ["--artifact-dir", out]
        if key:
            cmd += ["--api-key", key]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=out)
        report = Path(out) / "profile_export_aiperf.json"
        if done.returncode != 0 or not report.is_file():
            raise RuntimeError(f"aiperf exited with {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
        figures = json.loads(report.read_text())

    def avg(name: str) -> float | None:
        value = figures.get(name)
        return value.get("avg") if isinstance(value, dict) else None

    return {
        "concurrency": concurrency,
        "requests": avg("request_count"),
        "errors": avg("error_request_count") or 0,
        "requests_per_s": avg("request_throughput"),
        "tokens_per_s": avg("output_token_throughput"),
        "ttft_ms": avg("time_to_first_token"),
    }


def main() -> None:
    from appliance.bench.engine import print_table
    from appliance.testbed.launch import bench_server
    from models.store import ModelStore

    path = ModelStore().get()
    rows = []
    with tempfile.TemporaryDirectory() as folder, bench_server(path) as (http, _):
        tokenizer = tokenizer_folder(path, Path(folder))
        for concurrency in (1, 4):
            rows.append(run(path.stem, f"http://127.0.0.1:{http}", tokenizer, None, concurrency, 4 * concurrency))
    print_table(
        f"{path.name}: NVIDIA aiperf, streaming chat, 32-token prompts, 16 tokens out, {os.cpu_count()} CPU threads "
        "(its own ~10 processes share them)",
        ["concurrency", "requests", "errors", "requests/s", "tokens/s", "mean TTFT ms"],
        [
            [
                str(r["concurrency"]),
                f"{r['requests']:.0f}",
                f"{r['errors']:.0f}",
                f"{r['requests_per_s']:.2f}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['ttft_ms']:.0f}",
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
