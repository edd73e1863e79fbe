"""Property-based: any JSON value in any field of /v1 and /v2 requests, and arbitrary gRPC
ModelInferRequest fields, give a 2xx or a 4xx (gRPC: never UNKNOWN or INTERNAL), and the server
answers a normal request right after. Example counts are modest so the module stays fast."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.scale import full_or
from tests.serving import running_server

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
FUZZ = settings(max_examples=full_or(100, 20), deadline=None, suppress_health_check=list(HealthCheck))

text = st.text(max_size=8) | st.sampled_from(["\ud800", "\x00", "", "NaN"])
numbers = st.integers() | st.floats() | st.sampled_from([2**63, -(2**63) - 1, 10**30, 1e-300, 3e38])
scalars = st.none() | st.booleans() | numbers | text
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=6
)


@pytest.fixture(scope="module")
def server(model_path):
    with running_server("--max-tokens-limit", "3", "--no-advertise", "--no-discover", key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client:
        yield client


def send(http: httpx.Client, path: str, body: object) -> httpx.Response:
    r = http.post(path, content=json.dumps(body).encode())  # NaN and Infinity go as JSON's extensions
    assert r.status_code < 500, (body, r.status_code, r.text[:500])
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in r.text.splitlines() if line.startswith("data:")]
        assert path.startswith("/v2") or events[-1] == "data: [DONE]", r.text[-300:]
    return r


def with_field(base: dict, fields: list[str]):
    """The base request with one field (known or not) set to any JSON value."""
    return st.tuples(st.sampled_from(fields) | text, json_values).map(lambda kv: {**base, kv[0]: kv[1]})


def still_serving(http: httpx.Client, served) -> None:
    r = http.post("/v1/completions", json={"model": served.name, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None


COMMON = ["model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options"]
COMMON += ["repetition_penalty", "ignore_eos", "max_completion_tokens"]


def test_chat_completions_take_any_json(http, served):
    base = {"model": served.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

    @FUZZ
    @given(with_field(base, [*COMMON, "messages"]) | json_values)
    def check(body):
        send(http, "/v1/chat/completions", body)

    check()
    still_serving(http, served)


def test_completions_take_any_json(http, served):
    base = {"model": served.name, "prompt": "Hi", "max_tokens": 2}

    @FUZZ
    @given(with_field(base, [*COMMON, "prompt"]))
    def check(body):
        send(http, "/v1/completions", body)

    check()
    still_serving(http, served)


def test_kserve_generate_takes_any_json(http, served):
    base = {"text_input": "Hi", "max_tokens": 2}
    fields = ["text_input", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop_words", "parameters"]

    @FUZZ
    @given(with_field(base, fields), st.booleans())
    def check(body, stream):
        send(http, f"/v2/models/{served.name}/generate{'_stream' if stream else ''}", body)

    check()
    still_serving(http, served)


def test_kserve_infer_takes_any_json(http, served):
    tensor = {"name": "max_tokens", "datatype": "INT32", "shape": [1], "data": [2]}
    text_in = {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["Hi"]}
    tensors = with_field(tensor, ["name", "datatype", "shape", "data", "parameters"])
    bodies = st.builds(
        lambda t, extra: {"inputs": [text_in, t], **extra}, tensors, st.dictionaries(text, json_values, max_size=2)
    )
    bodies |= with_field({"inputs": [text_in, tensor]}, ["inputs", "outputs", "parameters", "id"])

    @FUZZ
    @given(bodies, st.sampled_from([served.name, f"{served.name}-logits"]))
    def check(body, model):
        send(http, f"/v2/models/{model}/infer", body)

    check()
    still_serving(http, served)


DATATYPES = ["BYTES", "INT32", "INT64", "UINT64", "FP32", "FP64", "BOOL", "FP16", "BF16", "INT8"]
contents = st.fixed_dictionaries(
    {},
    optional={
        "bytes_contents": st.lists(st.binary(max_size=8), max_size=3),
        "int_contents": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3),
        "int64_contents": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
        "uint64_contents": st.lists(st.integers(0, 2**64 - 1), max_size=3),
        "fp32_contents": st.lists(st.floats(width=32), max_size=3),
        "bool_contents": st.lists(st.booleans(), max_size=3),
    },
)
tensors = st.builds(
    dict,
    name=st.sampled_from(["text_input", "max_tokens", "temperature", "seed", "input_ids", "stream"])
    | st.text(max_size=5),
    datatype=st.sampled_from(DATATYPES) | st.text(max_size=5),
    shape=st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 3), max_size=3),
    contents=contents,
)


def test_grpc_model_infer_takes_any_fields(server, served):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc))
    raw = grpc.insecure_channel(server.grpc).unary_unary("/inference.GRPCInferenceService/ModelInfer")
    metadata = [("authorization", f"Bearer {KEY}")]
    requests = st.builds(
        service_pb2.ModelInferRequest,
        model_name=st.sampled_from([served.name, f"{served.name}-logits"]) | st.text(max_size=5),
        model_version=st.sampled_from(["", "1"]) | st.text(max_size=3),
        id=st.text(max_size=5),
        inputs=st.lists(tensors, max_size=3),
        raw_input_contents=st.lists(st.binary(max_size=16), max_size=2),
        outputs=st.lists(st.builds(dict, name=st.text(max_size=12)), max_size=2),
    )

    @FUZZ
    @given(requests | st.binary(max_size=64))
    def check(request):
        try:
            if isinstance(request, bytes):
                raw(request, metadata=metadata, timeout=60)
            else:
                stub.ModelInfer(request, metadata=metadata, timeout=60)
        except grpc.RpcError as e:
            assert e.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (request, e.details())

    check()
    ok = service_pb2.ModelInferRequest(model_name=served.name)
    ok.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hi")
    assert stub.ModelInfer(ok, metadata=metadata, timeout=60).outputs
