"""Workers that hold the model file themselves read their layers from it: nothing is shipped to them."""

from __future__ import annotations

import subprocess
import sys

from appliance.startup import load_engine
from models.engine import Engine
from tests.test_offload import PROMPTS, greedy, home, new_worker  # noqa: F401  (home: the module's CA fixture)


def test_a_worker_with_the_file_gets_no_bytes_and_one_without_gets_its_layers(model_path, home, tmp_path_factory):  # noqa: F811
    local = Engine.load(model_path, "cpu")
    holding = ("--model", str(model_path))
    with (
        new_worker(home, tmp_path_factory, "own", budget="45MB", backend="cpu", extra=holding) as own,
        new_worker(home, tmp_path_factory, "bare", budget="45MB", backend="cpu") as bare,
    ):
        split = load_engine(model_path, "cpu", "40MB", [own.address, bare.address], draft="none")
        coordinator = split.offload
        plan, _ = coordinator.current_plan()
        assert {s.device.address for s in plan.chain} == {own.address, bare.address}
        clients = {address: client for address, (client, _) in coordinator.workers.items()}
        assert clients[own.address].holds(coordinator.file_sha256)
        assert not clients[bare.address].holds(coordinator.file_sha256)
        assert clients[own.address].shipped_bytes == 0
        assert clients[bare.address].shipped_bytes > 1_000_000  # its 13 or so layers of ~3 MB
        assert greedy(split, PROMPTS[0]) == greedy(local, PROMPTS[0])
        coordinator.close()


def test_a_model_file_that_is_not_there_is_a_clear_error(home, tmp_path):  # noqa: F811
    from offload.pki import issue_identity

    issue_identity(home, tmp_path, "w")
    out = subprocess.run(
        [sys.executable, "-m", "offload.worker", "--home", str(tmp_path), "--no-advertise", "--model", "/nope.gguf"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--model: no such file: /nope.gguf" in out.stderr
