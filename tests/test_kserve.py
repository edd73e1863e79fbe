"""KServe v2 / Triton protocol, driven by the real `tritonclient` (http and grpc) against a real server."""

from __future__ import annotations

import json
import queue

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from models.llama import Session
from models.sampling import SamplingParams
from tests.serving import ADMIN_KEY, running_server

KEY = "kserve-key"


def auth(key: str = KEY) -> dict:
    """A fresh headers dict per call: tritonclient.http adds its own headers to the dict it is given.
    Lower case, as gRPC metadata keys must be."""
    return {"authorization": f"Bearer {key}"}


def text(value) -> str:
    """tritonclient gives BYTES as bytes from binary data and as str from JSON data."""
    return value.decode() if isinstance(value, bytes) else value


PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(model_path):
    with running_server(key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)


@pytest.fixture(scope="module")
def grpc_client(server):
    return grpcclient.InferenceServerClient(server.grpc)


@pytest.fixture(scope="module")
def expected(served):
    return served.generate(served.prompt_ids(PROMPT), SamplingParams(), 12).run()


def text_inputs(module, prompt: str = PROMPT, max_tokens: int = 12, binary: bool = True, stream: bool = False):
    text = module.InferInput("text_input", [1], "BYTES")
    n = module.InferInput("max_tokens", [1], "INT32")
    s = module.InferInput("stream", [1], "BOOL")
    data = [
        (text, np.array([prompt.encode()], dtype=np.object_)),
        (n, np.array([max_tokens], dtype=np.int32)),
        (s, np.array([stream])),
    ]
    for tensor, value in data:
        if module is httpclient:
            tensor.set_data_from_numpy(value, binary_data=binary)
        else:
            tensor.set_data_from_numpy(value)
    return [text, n, s]


def test_health_and_metadata(http, grpc_client, served):
    assert http.is_server_live() and http.is_server_ready()
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert http.is_model_ready(served.name, headers=auth())
    assert grpc_client.is_model_ready(served.name, headers=auth())
    assert "binary_tensor_data" in http.get_server_metadata(headers=auth())["extensions"]
    assert grpc_client.get_server_metadata(headers=auth()).name == "appliance"
    meta = http.get_model_metadata(served.name, headers=auth())
    assert [i["name"] for i in meta["inputs"]][:2] == ["text_input", "max_tokens"]
    assert [o.name for o in grpc_client.get_model_metadata(served.name, headers=auth()).outputs] == [
        "text_output",
        "finish_reason",
        "num_output_tokens",
    ]
    config = http.get_model_config(served.name, headers=auth())
    assert config["model_transaction_policy"]["decoupled"] is True
    gconfig = grpc_client.get_model_config(served.name, headers=auth()).config
    assert gconfig.model_transaction_policy.decoupled and gconfig.input[0].data_type == 13  # TYPE_STRING
    names = {m["name"] for m in http.get_model_repository_index(headers=auth())}
    assert names == {served.name, f"{served.name}-logits"}


@pytest.mark.parametrize("binary", [True, False])
def test_http_infer_json_and_binary(http, served, expected, binary):
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=binary)
        for n in ("text_output", "finish_reason", "num_output_tokens")
    ]
    r = http.infer(served.name, text_inputs(httpclient, binary=binary), outputs=outputs, headers=auth())
    assert text(r.as_numpy("text_output")[0]) == expected
    assert text(r.as_numpy("finish_reason")[0]) == "length"
    assert int(r.as_numpy("num_output_tokens")[0]) == 12


def test_grpc_infer(grpc_client, served, expected):
    r = grpc_client.infer(served.name, text_inputs(grpcclient), headers=auth())
    assert r.as_numpy("text_output")[0].decode() == expected


def test_grpc_stream_infer_is_decoupled(grpc_client, served, expected):
    results: queue.Queue = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: results.put((result, error)), headers=auth())
    try:
        grpc_client.async_stream_infer(served.name, text_inputs(grpcclient, stream=True))
        pieces, final = [], False
        while not final:
            result, error = results.get(timeout=60)
            assert error is None
            pieces.append(result.as_numpy("text_output")[0].decode())
            final = result.get_response().parameters["triton_final_response"].bool_param
    finally:
        grpc_client.stop_stream()
    assert len(pieces) > 3 and "".join(pieces) == expected


def test_generate_and_generate_stream(server, served, expected):
    body = {"text_input": PROMPT, "max_tokens": 12}
    r = httpx.post(f"{server.url}/v2/models/{served.name}/generate", json=body, headers=auth(), timeout=60)
    assert r.status_code == 200 and r.json()["text_output"] == expected
    with httpx.stream(
        "POST", f"{server.url}/v2/models/{served.name}/generate_stream", json=body, headers=auth(), timeout=60
    ) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert "".join(e["text_output"] for e in events) == expected
    assert events[-1]["finish_reason"] == "length"


def test_logits_model(http, grpc_client, served):
    ids = np.array(served.tokenizer.encode(PROMPT), dtype=np.int64)
    want = served.next_logits(list(ids), Session())
    for module, client in ((httpclient, http), (grpcclient, grpc_client)):
        t = module.InferInput("input_ids", [len(ids)], "INT64")
        t.set_data_from_numpy(ids)
        r = client.infer(f"{served.name}-logits", [t], headers=auth())
        np.testing.assert_allclose(r.as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
        logprobs = r.as_numpy("logprobs")
        assert np.exp(logprobs).sum() == pytest.approx(1.0, rel=1e-4)
        assert int(np.argmax(logprobs)) == int(np.argmax(want))


def test_unload_and_load_need_the_admin_key(http, grpc_client, served):
    with pytest.raises(InferenceServerException, match="admin key"):
        http.unload_model(served.name, headers=auth())
    admin = auth(ADMIN_KEY)
    http.unload_model(served.name, headers=admin.copy())
    try:
        assert not http.is_model_ready(served.name, headers=auth())
        with pytest.raises(InferenceServerException, match="not loaded"):
            grpc_client.infer(served.name, text_inputs(grpcclient), headers=auth())
        states = {m["name"]: m["state"] for m in http.get_model_repository_index(headers=auth())}
        assert states[served.name] == "UNAVAILABLE"
    finally:
        grpc_client.load_model(served.name, headers=admin.copy())
    assert http.is_model_ready(served.name, headers=auth())


def test_statistics(http, grpc_client, served):
    """Each infer counts once, seen alike over REST and gRPC (whatever ran before this test)."""

    def counts() -> tuple[int, int]:
        stats = http.get_inference_statistics(served.name, headers=auth())["model_stats"][0]
        assert stats["name"] == served.name
        grpc_stats = grpc_client.get_inference_statistics(served.name, headers=auth()).model_stats[0]
        return stats["inference_stats"]["success"]["count"], grpc_stats.inference_count

    before = counts()
    grpc_client.infer(served.name, text_inputs(grpcclient, max_tokens=2), headers=auth())
    assert counts() == (before[0] + 1, before[1] + 1)


def _bytes_input(module, name: str, value: bytes, datatype: str = "BYTES"):
    t = module.InferInput(name, [1], datatype)
    t.set_data_from_numpy(np.array([value], dtype=np.object_))
    return t


@pytest.mark.parametrize("module", ["http", "grpc"])
def test_errors_are_clear_and_the_server_keeps_serving(http, grpc_client, served, expected, module):
    mod, client = (httpclient, http) if module == "http" else (grpcclient, grpc_client)
    cases = [
        ("nope", [_bytes_input(mod, "text_input", b"hi")], "unknown model 'nope'"),
        (served.name, [_bytes_input(mod, "prompt", b"hi")], "unexpected input"),
        (served.name, [_bytes_input(mod, "text_input", b"\xff\xfe")], "not valid UTF-8"),
        (served.name, [_bytes_input(mod, "text_input", b"word " * 9000)], "context window"),
        (f"{served.name}-logits", [_bytes_input(mod, "input_ids", b"1")], "integer ids"),
    ]
    for model, inputs, fragment in cases:
        with pytest.raises(InferenceServerException, match=fragment):
            client.infer(model, inputs, headers=auth())
    with pytest.raises(InferenceServerException, match="API key"):
        client.infer(served.name, text_inputs(mod), headers={"authorization": "Bearer wrong"})
    r = client.infer(served.name, text_inputs(mod), headers=auth())
    assert r.as_numpy("text_output")[0].decode() == expected


def test_grpc_status_codes(server, served):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc))
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="nope"), metadata=[("authorization", f"Bearer {KEY}")])
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "unknown model" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=served.name))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_rest_errors_have_the_kserve_shape(server, served):
    r = httpx.post(f"{server.url}/v2/models/{served.name}/infer", content=b"{oops", headers=auth())
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = httpx.get(f"{server.url}/v2/models/nope", headers=auth())
    assert r.status_code == 404 and "unknown model" in r.json()["error"]
