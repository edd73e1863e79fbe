"""No request can break the server: bad input is a 4xx in its protocol's shape, a failing generation
reaches its client as an error, clients that leave are cancelled, and the process starts and stops
cleanly. Real server processes, real clients (httpx, grpcio, tritonclient), real offload workers."""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import threading
import time

import grpc
import httpx
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from appliance.serving.scheduler import BROKEN_AFTER, Event, Scheduler
from appliance.testbed.launch import free_port
from tests.serving import running_server, serve_command

KEY = "robust-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GRPC_AUTH = [("authorization", f"Bearer {KEY}")]
LONG = {"prompt": "Tell me a very long story.", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}
COUNTING = "Count from 1 to 1000: 1, 2, 3, 4,"  # greedy text that goes on (KServe has no ignore_eos)


@pytest.fixture(scope="module")
def server(model_path):
    with running_server("--max-tokens-limit", "2000", "--no-advertise", "--no-discover", key=KEY) as s:
        yield s


def post(server, path: str, body: dict | None = None, content=None, headers: dict | None = None) -> httpx.Response:
    headers = headers or {**AUTH, "Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", json=body, content=content, headers=headers, timeout=120)


def health(server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=30).json()


def wait_idle(server, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while (h := health(server))["active"] or h["waiting"]:
        assert time.monotonic() < deadline, f"requests left running: {h}"
        time.sleep(0.2)
    return h


def metric(server, name: str) -> float:
    line = next(x for x in httpx.get(f"{server.url}/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[-1])


def openai_message(r: httpx.Response) -> str:
    return r.json()["error"]["message"]


def kserve_message(r: httpx.Response) -> str:
    error = r.json()["error"]
    assert isinstance(error, str), r.text
    return error


# --- the scheduler never dies of a request ---


def test_a_step_that_raises_fails_only_its_requests(served):
    """A generation whose step raises (an id beyond the vocabulary) gets an error event; the next is served,
    and only steps failing again and again make the scheduler say it cannot serve."""
    scheduler = Scheduler(served)
    scheduler.start()
    try:

        def run(ids: list[int]) -> list[Event]:
            events: queue.Queue[Event] = queue.Queue()
            scheduler.submit(served.generate(ids, max_tokens=3), events.put)
            got = [events.get(timeout=60)]
            while got[-1].kind == "text":
                got.append(events.get(timeout=60))
            return got

        bad = [served.model.config.vocab_size + 7]
        assert run(bad)[-1].kind == "error" and scheduler.ready
        assert run(served.prompt_ids("Hello"))[-1].kind == "done"
        for _ in range(BROKEN_AFTER):
            assert run(bad)[-1].kind == "error"
        assert not scheduler.ready  # the served cannot serve: health says so
        assert run(served.prompt_ids("Hello"))[-1].kind == "done" and scheduler.ready
        assert scheduler.metrics.failed._value.get() == BROKEN_AFTER + 1
    finally:
        scheduler.stop()
    assert not scheduler.ready


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 1e-300},
        {"temperature": 2, "top_p": 1e-300},
        {"temperature": 1, "repetition_penalty": 1e-300},
        {"temperature": 1, "repetition_penalty": 100},
        {"temperature": 1, "top_k": 10**30},
        {"temperature": 1, "seed": -1},
        {"temperature": 1, "seed": 2**70},
    ],
)
def test_sampling_at_the_edges_of_the_float_range_is_served(server, served, fields):
    r = post(server, "/v1/completions", {"model": served.name, "prompt": "Hi", "max_tokens": 3, **fields})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert health(server)["status"] == "ok"


def test_kserve_sampling_at_the_edges_is_served(server, served):
    for fields in ({"temperature": 3e38}, {"temperature": 1e-300, "top_k": 2**31 - 1}, {"seed": -5}):
        r = post(server, f"/v2/models/{served.name}/generate", {"text_input": "Hi", "max_tokens": 3, **fields})
        assert r.status_code == 200, r.text


# --- bad input: a 4xx in the protocol's shape, never a 5xx ---


@pytest.mark.parametrize(
    "fragment,field",
    [
        ('"temperature": NaN', "temperature"),
        ('"temperature": Infinity', "temperature"),
        ('"temperature": 1e999', "temperature"),
        ('"top_p": 0', "top_p"),
        ('"n": 9', "n"),
        ('"n": 0', "n"),
        ('"max_tokens": 0', "max_tokens"),
        ('"max_tokens": 100000000000000000000000000000', "max_tokens"),
        ('"top_k": -1', "top_k"),
        ('"repetition_penalty": 0', "repetition_penalty"),
        ('"seed": 1.5', "seed"),
        ('"stop": "\\ud800"', "stop"),
        ('"prompt": "\\ud800\\udfff\\ud800"', "prompt"),
    ],
)
def test_bad_openai_fields_are_400(server, served, fragment, field):
    body = f'{{"model": "{served.name}", "prompt": "Hi", {fragment}}}'.encode()
    r = post(server, "/v1/completions", content=body)
    assert r.status_code == 400, r.text
    assert field in openai_message(r)


def test_a_lone_surrogate_in_a_chat_message_is_400(server, served):
    body = f'{{"model": "{served.name}", "messages": [{{"role": "user", "content": "hi \\ud800"}}]}}'.encode()
    r = post(server, "/v1/chat/completions", content=body)
    assert r.status_code == 400 and "surrogate" in openai_message(r)


@pytest.mark.parametrize(
    "raw,fragment",
    [
        ('{"text_input": "\\ud800"}', "surrogate"),
        ('{"text_input": "Hi", "temperature": NaN}', "temperature"),
        ('{"text_input": "Hi", "top_p": 1e999}', "top_p"),
        ('{"text_input": "Hi", "max_tokens": 1e999}', "max_tokens"),
        ('{"text_input": "Hi", "max_tokens": -3}', "max_tokens"),
        ('{"text_input": "Hi", "parameters": [1]}', "parameters"),
        ('{"text_input": "Hi", "top_k": {"a": 1}}', "top_k"),
        ("[" * 5000 + "]" * 5000, "JSON"),
    ],
)
def test_bad_kserve_generate_is_400(server, served, raw, fragment):
    r = post(server, f"/v2/models/{served.name}/generate", content=raw.encode())
    assert r.status_code == 400, r.text
    assert fragment in kserve_message(r)


def _infer_body(**tensor) -> dict:
    text = {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["Hi"]}
    return {"inputs": [text, {"name": "max_tokens", "datatype": "INT32", "shape": [1], "data": [2], **tensor}]}


@pytest.mark.parametrize(
    "body,fragment",
    [
        (_infer_body(shape=[2**62, 2**62]), "needs"),
        (_infer_body(data=[2**40]), "INT32"),
        (_infer_body(data=["x"]), "INT32"),
        (_infer_body(datatype="FP8"), "datatype"),
        (_infer_body(datatype="BYTES", data=[5]), "BYTES"),
        (_infer_body(shape=[True]), "shape"),
        (_infer_body(parameters=[]), "parameters"),
        ({**_infer_body(), "outputs": "text_output"}, "outputs"),
        ({**_infer_body(), "parameters": 5}, "parameters"),
        ({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["\ud800"]}]}, "BYTES"),
    ],
)
def test_bad_kserve_infer_is_400(server, served, body, fragment):
    r = post(server, f"/v2/models/{served.name}/infer", content=json.dumps(body).encode())
    assert r.status_code == 400, r.text
    assert fragment in kserve_message(r)


def test_a_bad_binary_header_length_is_400(server, served):
    body = json.dumps(_infer_body()).encode()
    for length in ("-3", "x", str(len(body) + 10)):
        r = post(
            server,
            f"/v2/models/{served.name}/infer",
            content=body,
            headers={**AUTH, "Inference-Header-Content-Length": length},
        )
        assert r.status_code == 400, (length, r.text)


@pytest.mark.parametrize("path", ["/v1/completions", "/v2/models/{name}/generate"])
@pytest.mark.parametrize("chunked", [True, False])
def test_oversized_bodies_are_413_in_the_protocols_shape(server, served, path, chunked):
    path = path.format(name=served.name)
    content = b"x" * (2 << 20)

    def chunks():
        for i in range(0, len(content), 1 << 16):
            yield content[i : i + (1 << 16)]

    r = post(server, path, content=chunks() if chunked else content)
    assert r.status_code == 413, r.text
    message = openai_message(r) if path.startswith("/v1") else kserve_message(r)
    assert "over the limit" in message


def _stub(server):
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc))


def _grpc_request(served, **max_tokens) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=served.name)
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hi")
    request.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(2)
    for key, value in max_tokens.items():
        setattr(request.inputs[1], key, value)
    return request


def test_garbage_and_bad_grpc_requests_are_invalid_argument(server, served):
    channel = grpc.insecure_channel(server.grpc)
    raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    for garbage in (b"\xff\xff\xff", b"\x0a\x02\xed\xa0", b"\x0a\x05hi"):
        with pytest.raises(grpc.RpcError) as e:
            raw(garbage, metadata=GRPC_AUTH, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (garbage, e.value.details())
    stub = _stub(server)
    for bad in (_grpc_request(served, datatype="FP8"), _grpc_request(served, datatype="BYTES")):
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(bad, metadata=GRPC_AUTH, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    request = _grpc_request(served)
    request.inputs[1].shape[:] = [2**62, 2**62]
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request, metadata=GRPC_AUTH, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.ModelInfer(_grpc_request(served), metadata=GRPC_AUTH, timeout=60).outputs


def test_a_bad_request_in_a_stream_is_one_error_and_the_stream_goes_on(server, served):
    channel = grpc.insecure_channel(server.grpc)
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    requests = [b"\xff\xff\xff", _grpc_request(served, datatype="FP8").SerializeToString()]
    requests.append(_grpc_request(served).SerializeToString())
    replies = [
        service_pb2.ModelStreamInferResponse.FromString(r)
        for r in stream(iter(requests), metadata=GRPC_AUTH, timeout=120)
    ]
    errors = [r.error_message for r in replies if r.error_message]
    assert len(errors) == 2 and "not a valid" in errors[0] and "FP8" in errors[1]
    assert replies[-1].infer_response.outputs and not replies[-1].error_message


# --- clients that leave are cancelled ---


def test_a_plain_http_client_that_leaves_is_cancelled(server, served):
    post(server, "/v1/completions", {"model": served.name, "prompt": "Hi", "max_tokens": 2})  # warm
    before = metric(server, "appliance_generations_cancelled_total")
    for path, body in (
        ("/v1/completions", {"model": served.name, **LONG}),
        (f"/v2/models/{served.name}/generate", {"text_input": COUNTING, "max_tokens": 2000}),
    ):
        with pytest.raises(httpx.ReadTimeout):
            r = httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=httpx.Timeout(60, read=2))
            pytest.fail(f"{path} answered before the client left: {r.status_code} {r.text[:200]}")
        wait_idle(server, 60)
    assert metric(server, "appliance_generations_cancelled_total") >= before + 2


def test_a_grpc_client_that_leaves_is_cancelled(server, served):
    before = metric(server, "appliance_generations_cancelled_total")
    request = _grpc_request(served)
    request.inputs[0].contents.bytes_contents[:] = [COUNTING.encode()]
    request.inputs[1].contents.int_contents[:] = [2000]
    with pytest.raises(grpc.RpcError) as e:
        _stub(server).ModelInfer(request, metadata=GRPC_AUTH, timeout=2)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(server, 60)
    assert metric(server, "appliance_generations_cancelled_total") >= before + 1


def test_n_choices_refused_by_a_full_queue_leave_nothing_running(served):
    args = ("--max-batch", "1", "--max-queue", "2", "--no-advertise", "--no-discover")
    with running_server(*args, key=KEY) as s, httpx.Client(base_url=s.url, headers=AUTH, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={"model": served.name, **LONG, "stream": True}) as first:
            lines = first.iter_lines()
            next(lines)
            r = http.post("/v1/completions", json={"model": served.name, **LONG, "n": 3})
            assert r.status_code == 429
            assert (health(s)["active"], health(s)["waiting"]) == (1, 0)  # none of the three was queued
        wait_idle(s, 60)


# --- a failing generation reaches its client, and health tells the truth ---


def test_failures_reach_clients_in_their_shape_and_health_turns_not_ready(served, model_path, tmp_path_factory):
    """The model split with one worker; kill -9 of the worker leaves no placement: every generation
    fails from then on, each client is told in its protocol's shape, and readiness turns to 503."""
    from offload.pki import certificate_authority
    from tests.test_offload import new_worker

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPLIANCE_HOME", str(tmp_path_factory.mktemp("robust-home")))
        ca = certificate_authority()
        with new_worker(ca, tmp_path_factory, "only", budget="420MB") as worker:
            args = (
                "--memory-budget",
                "190MB",
                "--backend",
                "numpy",
                "--worker",
                worker.address,
                "--no-discover",
                "--no-advertise",
            )
            with running_server(*args, key=KEY) as s, httpx.Client(base_url=s.url, headers=AUTH, timeout=120) as http:
                body = {"model": served.name, **LONG, "max_tokens": 200, "stream": True}
                with http.stream("POST", "/v1/completions", json=body) as r:
                    lines = r.iter_lines()
                    assert next(line for line in lines if line).startswith("data: {")
                    worker.kill()
                    rest = [line for line in lines if line]
                assert rest[-1] == "data: [DONE]"
                error = json.loads(rest[-2].removeprefix("data: "))["error"]
                assert "generation failed" in error["message"] and error["type"] == "server_error"

                plain = http.post("/v1/completions", json={"model": served.name, "prompt": "Hi", "max_tokens": 2})
                assert plain.status_code == 500 and "generation failed" in openai_message(plain)
                kserve = http.post(f"/v2/models/{served.name}/generate", json={"text_input": "Hi"})
                assert kserve.status_code == 500 and "generation failed" in kserve_message(kserve)
                with pytest.raises(grpc.RpcError) as e:
                    _stub(s).ModelInfer(_grpc_request(served), metadata=GRPC_AUTH, timeout=60)
                assert e.value.code() == grpc.StatusCode.INTERNAL and "generation failed" in e.value.details()

                assert http.get("/health").status_code == 503
                assert http.get("/v2/health/ready").status_code == 503
                assert not grpcclient.InferenceServerClient(s.grpc).is_server_ready()
                assert http.get("/v2/health/live").status_code == 200


# --- ports and shutdown ---


def _serve_cmd(http_port: int, grpc_port: int) -> list[str]:
    return serve_command(http_port, grpc_port, KEY, "admin", "--no-advertise", "--no-discover")


def test_a_port_in_use_is_refused(server):
    """A second server on the same gRPC (or HTTP) port exits 1 with an error line, not a shared port."""
    http_port, grpc_port = int(server.url.rsplit(":", 1)[1]), int(server.grpc.rsplit(":", 1)[1])
    for cmd, what in (
        (_serve_cmd(free_port(), grpc_port), "gRPC"),
        (_serve_cmd(http_port, free_port()), "HTTP"),
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, done.stderr
        assert re.search(rf"error: cannot listen for {what} on 127\.0\.0\.1:\d+", done.stderr), done.stderr
        assert "serving" not in done.stderr and "Traceback" not in done.stderr
    assert health(server)["status"] == "ok"


def test_sigterm_stops_http_and_grpc_within_seconds(served, tmp_path):
    http_port, grpc_port = free_port(), free_port()
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(_serve_cmd(http_port, grpc_port), stdout=subprocess.DEVNULL, stderr=log)
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        seen: queue.Queue = queue.Queue()

        def long_stream() -> None:  # a client mid-stream when the signal comes
            body = {"model": served.name, **LONG, "stream": True}
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
                    for line in r.iter_lines():
                        seen.put(line)
            except httpx.HTTPError:
                pass

        threading.Thread(target=long_stream, daemon=True).start()
        seen.get(timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0  # a few seconds of grace, then both servers are gone
        for port in (http_port, grpc_port):
            with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_health_is_ready_when_serving(server):
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    assert grpcclient.InferenceServerClient(server.grpc).is_server_ready()
    assert metric(server, "appliance_generations_failed_total") == 0
