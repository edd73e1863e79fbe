"""The committed stubs are what grpcio-tools makes from offload.proto today (`make proto` remakes them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("offload_pb2.py", "offload_pb2.pyi", "offload_pb2_grpc.py")


def test_offload_stubs_are_not_stale(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", str(ROOT / "offload" / "offload.proto")],
        check=True,
    )  # fmt: skip
    for name in GENERATED:
        fresh = (tmp_path / "offload" / name).read_text()
        assert (ROOT / "offload" / name).read_text() == fresh, f"offload/{name} is stale: run `make proto`"


def test_the_service_is_versioned():
    from offload import offload_pb2 as pb

    assert pb.DESCRIPTOR.package == "appliance.offload.v1"
