"""The soak: clients for a while against a real server, mixing good, bad, cancelled and oversized requests
over /v1 (streamed and not), /v2 and gRPC. Prints a table; exits 1 on any 5xx, hang, stream that ended
without its proper end, or resident memory afterwards over 1.5x its idle level.

    python -m appliance.drills.soak --seconds 300 --clients 16      (make soak)
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import psutil
from tritonclient.grpc import service_pb2, service_pb2_grpc

from appliance.testbed.launch import free_port, running

KEY = "soak-key"
DEADLINE_S = 120  # a request not answered within this is a hang
MEMORY_BOUND = 1.5  # resident memory afterwards, over idle
SETTLE_S = 5  # after the last request, before "after" is measured
BAD_FIELDS = [
    {"temperature": "hot"},
    {"top_p": 5},
    {"n": 0},
    {"max_tokens": -1},
    {"seed": 1.5},
    {"prompt": "\ud800"},
    {"temperature": float("nan")},
    {"repetition_penalty": 0},
]


class Outcome:
    """What a request ended as: 2xx, 4xx, 5xx, left (the client left on purpose) or hang."""

    def __init__(self, status: str, stream_ok: bool = True):
        self.status, self.stream_ok = status, stream_ok


def _http_status(code: int) -> str:
    return f"{code // 100}xx"


class Soak:
    def __init__(self, url: str, grpc_target: str, model: str):
        self.url, self.model = url, model
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(grpc_target))
        self.kinds: dict[str, Callable[[httpx.Client, random.Random], Outcome]] = {
            "v1 stream": self.v1_stream,
            "v1 plain": self.v1_plain,
            "v1 bad": self.v1_bad,
            "v1 stream left": self.v1_stream_left,
            "v1 plain left": self.v1_plain_left,
            "v1 oversized": self.oversized,
            "v2 generate": self.v2_generate,
            "v2 generate_stream": self.v2_stream,
            "v2 bad": self.v2_bad,
            "grpc infer": self.grpc_good,
            "grpc bad": self.grpc_bad,
            "grpc left": self.grpc_left,
        }

    def body(self, rng: random.Random, **extra) -> dict:
        return {
            "model": self.model,
            "prompt": rng.choice(["Hello", "The sky is", "def f(x):"]),
            "max_tokens": 16,
            **extra,
        }

    def v1_stream(self, http: httpx.Client, rng: random.Random) -> Outcome:
        with http.stream("POST", "/v1/completions", json=self.body(rng, stream=True)) as r:
            lines = [line for line in r.iter_lines() if line]
        return Outcome(_http_status(r.status_code), r.status_code != 200 or lines[-1:] == ["data: [DONE]"])

    def v1_plain(self, http: httpx.Client, rng: random.Random) -> Outcome:
        chat = {"model": self.model, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 16}
        return Outcome(_http_status(http.post("/v1/chat/completions", json=chat).status_code))

    def v1_bad(self, http: httpx.Client, rng: random.Random) -> Outcome:
        content = json.dumps(self.body(rng, **rng.choice(BAD_FIELDS))).encode()  # NaN as JSON's extension
        return Outcome(_http_status(http.post("/v1/completions", content=content).status_code))

    def v1_stream_left(self, http: httpx.Client, rng: random.Random) -> Outcome:
        with http.stream("POST", "/v1/completions", json=self.body(rng, stream=True, max_tokens=64)) as r:
            lines = r.iter_lines()
            next(lines)
        return Outcome("left")

    def v1_plain_left(self, http: httpx.Client, rng: random.Random) -> Outcome:
        try:
            r = http.post("/v1/completions", json=self.body(rng, max_tokens=64), timeout=httpx.Timeout(30, read=0.5))
            return Outcome(_http_status(r.status_code))
        except httpx.ReadTimeout:
            return Outcome("left")

    def oversized(self, http: httpx.Client, rng: random.Random) -> Outcome:
        path = rng.choice(["/v1/completions", f"/v2/models/{self.model}/generate"])
        r = http.post(path, content=b"x" * ((1 << 20) + 1000))
        return Outcome(_http_status(r.status_code), r.status_code == 413)

    def v2_generate(self, http: httpx.Client, rng: random.Random) -> Outcome:
        r = http.post(f"/v2/models/{self.model}/generate", json={"text_input": "Hello", "max_tokens": 16})
        return Outcome(_http_status(r.status_code))

    def v2_stream(self, http: httpx.Client, rng: random.Random) -> Outcome:
        body = {"text_input": "The sky is", "max_tokens": 16}
        with http.stream("POST", f"/v2/models/{self.model}/generate_stream", json=body) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        return Outcome(_http_status(r.status_code), r.status_code != 200 or "finish_reason" in events[-1])

    def v2_bad(self, http: httpx.Client, rng: random.Random) -> Outcome:
        tensor = rng.choice([{"shape": [2**62, 2**62]}, {"data": [2**40]}, {"datatype": "FP8"}])
        inputs = [
            {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["Hi"]},
            {"name": "max_tokens", "datatype": "INT32", "shape": [1], "data": [4], **tensor},
        ]
        return Outcome(_http_status(http.post(f"/v2/models/{self.model}/infer", json={"inputs": inputs}).status_code))

    def _grpc(self, request, timeout: float, leaving: bool = False) -> Outcome:
        try:
            self.stub.ModelInfer(request, metadata=[("authorization", f"Bearer {KEY}")], timeout=timeout)
            return Outcome("2xx")
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return Outcome("left" if leaving else "hang")
            if e.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
                return Outcome("5xx")
            return Outcome("4xx")

    def grpc_request(self, max_tokens: int, datatype: str = "INT32") -> service_pb2.ModelInferRequest:
        request = service_pb2.ModelInferRequest(model_name=self.model)
        request.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hello")
        request.inputs.add(name="max_tokens", datatype=datatype, shape=[1]).contents.int_contents.append(max_tokens)
        return request

    def grpc_good(self, http: httpx.Client, rng: random.Random) -> Outcome:
        return self._grpc(self.grpc_request(16), DEADLINE_S)

    def grpc_bad(self, http: httpx.Client, rng: random.Random) -> Outcome:
        return self._grpc(self.grpc_request(16, rng.choice(["FP8", "BYTES", ""])), DEADLINE_S)

    def grpc_left(self, http: httpx.Client, rng: random.Random) -> Outcome:
        return self._grpc(self.grpc_request(64), 0.5, leaving=True)


def _rss(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def run_soak(model: Path, seconds: float, clients: int) -> int:
    """Soak a fresh server; print the table; return the exit status (0: every promise held)."""
    http_port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "appliance.cli", "serve", "--model", str(model), "--host", "127.0.0.1"]
    cmd += ["--http-port", str(http_port), "--grpc-port", str(grpc_port), "--api-key", KEY, "--admin-key", "soak"]
    cmd += ["--no-advertise", "--no-discover", "--max-tokens-limit", "64"]
    url = f"http://127.0.0.1:{http_port}"
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    lock = threading.Lock()
    with running(cmd, f"{url}/health") as pid:
        soak = Soak(url, f"127.0.0.1:{grpc_port}", model.stem)
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        with httpx.Client(base_url=url, headers=headers, timeout=DEADLINE_S) as http:
            for kind in ("v1 stream", "v2 generate", "grpc infer"):  # warm: weights prepared, first allocations
                soak.kinds[kind](http, random.Random(0))
        idle = _rss(pid)
        peak = idle
        end = time.monotonic() + seconds

        def client(index: int) -> None:
            rng, kinds = random.Random(index), list(soak.kinds)
            turn = index * len(kinds) // clients  # clients start spread over the kinds, then take each in turn
            with httpx.Client(base_url=url, headers=headers, timeout=DEADLINE_S) as http:
                while time.monotonic() < end:
                    kind, turn = kinds[turn % len(kinds)], turn + 1
                    try:
                        outcome = soak.kinds[kind](http, rng)
                    except httpx.TimeoutException:
                        outcome = Outcome("hang")
                    except httpx.HTTPError as e:  # a connection the server dropped
                        outcome = Outcome(f"error: {type(e).__name__}")
                    with lock:
                        counts[kind][outcome.status] += 1
                        counts[kind]["bad end"] += not outcome.stream_ok

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, _rss(pid))
            time.sleep(0.5)
        for t in threads:
            t.join(DEADLINE_S)
        time.sleep(SETTLE_S)
        after = _rss(pid)
        left_running = httpx.get(f"{url}/health").json()
    return _report(counts, idle, peak, after, left_running, seconds, clients)


def _report(counts, idle: float, peak: float, after: float, health: dict, seconds: float, clients: int) -> int:
    columns = ["2xx", "4xx", "5xx", "left", "hang", "bad end"]
    others = sorted({k for c in counts.values() for k in c} - set(columns))
    print(f"soak: {clients} clients for {seconds:.0f} s")
    print(f"{'kind':<20}" + "".join(f"{c:>9}" for c in ["requests", *columns, *others]))
    total: collections.Counter = collections.Counter()
    for kind in sorted(counts):
        c = counts[kind]
        n = sum(c[k] for k in c if k != "bad end")
        total.update(c)
        total["requests"] += n
        print(f"{kind:<20}{n:>9}" + "".join(f"{c[k]:>9}" for k in [*columns, *others]))
    print(f"{'total':<20}{total['requests']:>9}" + "".join(f"{total[k]:>9}" for k in [*columns, *others]))
    print(
        f"resident memory: idle {idle:.0f} MiB, peak {peak:.0f} MiB, after {after:.0f} MiB ({after / idle:.2f}x idle)"
    )
    failures = [f"{total[k]} {k}" for k in ("5xx", "hang", "bad end", *others) if total[k]]
    if after > MEMORY_BOUND * idle:
        failures.append(f"memory after is {after / idle:.2f}x idle (bound {MEMORY_BOUND}x)")
    if health["active"] or health["waiting"]:
        failures.append(f"requests left running: {health}")
    print("FAILED: " + "; ".join(failures) if failures else "ok: no 5xx, no hang, every stream ended properly")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the default model)")
    args = parser.parse_args()
    from models.store import ModelStore

    sys.exit(run_soak(args.model or ModelStore().get(), args.seconds, args.clients))


if __name__ == "__main__":
    main()
