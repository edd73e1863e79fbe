"""A short smoke of the soak (`make soak` runs it for 5 minutes): every promise it checks holds for 20 s."""

from __future__ import annotations

import subprocess
import sys


def test_soak_smoke(model_path):
    cmd = [
        sys.executable,
        "-m",
        "appliance.drills.soak",
        "--seconds",
        "20",
        "--clients",
        "8",
        "--model",
        str(model_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "ok: no 5xx, no hang, every stream ended properly" in done.stdout
    for kind in ("v1 stream left", "v1 oversized", "v2 generate_stream", "grpc left"):
        assert kind in done.stdout
