"""The owner's view: `appliance generate/serve --memory-budget` with workers named or found by mDNS."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from appliance.testbed.netsim import worker_process
from offload import offload_pb2 as pb
from offload.client import WorkerClient
from offload.pki import issue_identity
from tests.serving import running_server
from tests.test_offload import PROMPTS

# The budgets here (190MB holds 3 layers) are the NumPy reference's float32 sizes: the appliance runs it too.
NUMPY = ("--backend", "numpy")


def appliance(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args], capture_output=True, text=True, timeout=300, env=os.environ
    )


def test_generate_split_over_named_workers_prints_the_local_text(ca, tmp_path, engine):
    for name in ("w1", "w2"):
        issue_identity(ca, tmp_path / name, name)
    local = appliance("generate", PROMPTS[0], "-n", "24", *NUMPY)
    assert local.returncode == 0, local.stderr
    with worker_process(tmp_path / "w1") as w1, worker_process(tmp_path / "w2") as w2:
        workers = ["--worker", w1.address, "--worker", w2.address]
        split = appliance("generate", PROMPTS[0], "-n", "24", "--memory-budget", "190MB", *NUMPY, *workers)
        assert split.returncode == 0, split.stderr
        assert split.stdout == local.stdout
        assert f"layers [0, 3) here, [3, {engine.model.config.n_layers}) on workers" in split.stderr

        plan = appliance("plan", "--memory-budget", "190MB", *NUMPY, *workers)
        assert plan.returncode == 0, plan.stderr
        assert "(this appliance)" in plan.stdout and "[0, 3)" in plan.stdout
        assert w1.address in plan.stdout and w2.address in plan.stdout
        assert "ms per token (3 one-way trips)" in plan.stdout


def test_generate_without_enough_workers_is_a_clear_error(ca):
    result = appliance("generate", "hi", "--memory-budget", "190MB", *NUMPY)
    assert result.returncode == 1
    assert "no placement can hold the model" in result.stderr and "Traceback" not in result.stderr


def test_serve_with_workers_found_by_mdns(ca, tmp_path, engine):
    """Workers announce themselves (on loopback here); the appliance finds them and serves the split model."""
    for name in ("m1", "m2"):
        issue_identity(ca, tmp_path / name, name)
    advertise = ("--advertise",)
    with (
        worker_process(tmp_path / "m1", extra=advertise) as m1,
        worker_process(tmp_path / "m2", extra=advertise) as m2,
        running_server("--memory-budget", "190MB", *NUMPY, "--no-advertise") as server,
    ):
        client = OpenAI(base_url=f"{server.url}/v1", api_key="test-key")
        reply = client.completions.create(model=engine.name, prompt=PROMPTS[1], max_tokens=24, temperature=0)
        gen = engine.generate(engine.prompt_ids(PROMPTS[1]), max_tokens=24)
        assert reply.choices[0].text == gen.run()

        # /metrics gives each worker's time and hidden-state bytes for the layers it ran
        text = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer test-key"}).text
        samples = {
            (s.name, s.labels.get("address")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        prompt_bytes = len(engine.prompt_ids(PROMPTS[1])) * engine.model.config.dim * 4  # fp32 on the wire
        for w in (m1, m2):
            assert samples[("appliance_offload_compute_seconds_total", w.address)] > 0
            assert samples[("appliance_offload_bytes_total", w.address)] > prompt_bytes

        # A client that leaves mid-stream: its sessions on the workers are released at once, not left
        # to the workers' idle timeout.
        # (ignore_eos: a sampled end-of-text token would end the generation, and free it, before the client leaves)
        body = {"model": engine.name, "prompt": PROMPTS[0], "max_tokens": 500, "stream": True, "ignore_eos": True}
        headers = {"Authorization": "Bearer test-key"}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60) as r:
            lines = r.iter_lines()  # held: a dropped line iterator makes httpx close the connection
            next(lines)
            assert [sessions(ca, w) for w in (m1, m2)] == [1, 1]
            assert next(line for line in lines if line).startswith("data: ")  # still streaming
        deadline = time.monotonic() + 10
        while max(sessions(ca, w) for w in (m1, m2)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [sessions(ca, w) for w in (m1, m2)] == [0, 0]


def sessions(ca, worker) -> int:
    """Open sessions on a worker, asked over mTLS as the appliance."""
    client = WorkerClient(worker.address, ca.identity())
    try:
        return client.stub.Health(pb.HealthRequest(), timeout=5).sessions
    finally:
        client.close()


def test_bench_offload_prints_its_table():
    """The figures belong to `make bench-offload`; here only that it runs end to end (loopback, no peer)."""
    result = appliance(
        "bench-offload", "--prompt-tokens", "8", "--decode-tokens", "4", "--delay", "0", "--clients", "2"
    )
    assert result.returncode == 0, result.stderr
    assert "1w: 27" in result.stdout and "2w: 14/13" in result.stdout and "loopback" in result.stdout
    assert "trips/tok" in result.stdout and "accepted" in result.stdout
    assert "worker (own copy): layers [3, 30)" in result.stdout and "0.0 MB shipped" in result.stdout
    assert "TCP, mTLS" in result.stdout and "gRPC, mTLS" in result.stdout
