"""Triton's perf_analyzer against the text model with its plain flags (no -x): over HTTP, and over gRPC
with --streaming (the decoupled model's final response carries triton_final_response)."""

from __future__ import annotations

import pytest

from appliance.bench import perf_analyzer
from tests.serving import running_server


@pytest.fixture(scope="module")
def server(model_path):
    with running_server("--model", str(model_path), "--no-advertise", "--no-discover") as s:
        yield s


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_reports_a_throughput(server, model_path, protocol):
    url = server.url.removeprefix("http://") if protocol == "http" else server.grpc
    result = perf_analyzer.run(model_path.stem, url, protocol, key="test-key", max_tokens=1)
    assert result["requests_per_s"] > 0 and result["latency_ms"] > 0


def test_perf_analyzer_without_the_key_is_refused(server, model_path):
    with pytest.raises(RuntimeError, match="perf_analyzer exited"):
        perf_analyzer.run(model_path.stem, server.url.removeprefix("http://"), "http", key="wrong")
