"""Pairing and mutual TLS: only devices paired with this appliance's CA take part, and only while valid."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import pytest

from appliance.testbed.netsim import free_port, worker_process
from models.llama import Llama
from offload import offload_pb2 as pb
from offload import offload_pb2_grpc as rpc
from offload.client import WorkerClient, WorkerRefused, layer_manifest
from offload.pki import CertificateAuthority, Identity, PairingError, issue_identity, new_key, signing_request
from offload.protocol import GRPC_OPTIONS
from tests.serving import running_server


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_a_client_without_a_certificate_is_refused_by_the_worker(ca, tmp_path):
    issue_identity(ca, tmp_path / "w", "w")
    with worker_process(tmp_path / "w") as w:
        anonymous = grpc.ssl_channel_credentials(ca.ca_pem)  # trusts the worker, shows no certificate
        with (
            grpc.secure_channel(w.address, anonymous, options=GRPC_OPTIONS) as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            rpc.OffloadStub(channel).GetCapabilities(pb.CapabilitiesRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # while the paired appliance is served
        assert WorkerClient(w.address, ca.identity()).verify().name == "w"


def test_a_worker_with_a_certificate_from_another_ca_is_refused(ca, tmp_path):
    other = CertificateAuthority(tmp_path / "someone-elses-appliance")
    issue_identity(other, tmp_path / "w", "rogue")
    with worker_process(tmp_path / "w") as w, pytest.raises(WorkerRefused, match="not from this appliance's CA"):
        WorkerClient(w.address, ca.identity()).verify()


def test_a_worker_without_tls_is_refused(ca, tmp_path):
    """Something answering on the port in the clear (no certificate at all) is not a worker."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_OffloadServicer_to_server(rpc.OffloadServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(WorkerRefused, match="no mutual TLS"):
            WorkerClient(f"127.0.0.1:{port}", ca.identity()).verify()
    finally:
        server.stop(None)


def test_a_revoked_worker_is_refused(ca, tmp_path):
    issue_identity(ca, tmp_path / "w", "old-laptop")
    with worker_process(tmp_path / "w") as w:
        assert WorkerClient(w.address, ca.identity(), ca.revoked_serials).verify().name == "old-laptop"
        revoked = cli("-m", "appliance.ctl", "workers", "revoke", "old-laptop")
        assert revoked.returncode == 0, revoked.stderr
        with pytest.raises(WorkerRefused, match=r"old-laptop\): its certificate was revoked"):
            WorkerClient(w.address, ca.identity(), ca.revoked_serials).verify()
    unknown = cli("-m", "appliance.ctl", "workers", "revoke", "nobody")
    assert unknown.returncode == 5 and "no paired device is named 'nobody'" in unknown.stderr


def test_a_revoked_device_cannot_reach_the_other_workers(ca, tmp_path):
    """The appliance tells each worker its revocations; the worker refuses the revoked, even restarted."""
    issue_identity(ca, tmp_path / "w", "desktop")
    old = issue_identity(ca, tmp_path / "old", "old-laptop")
    tablet = issue_identity(ca, tmp_path / "tablet", "tablet")

    def call(identity: Identity, address: str, request=None):
        with grpc.secure_channel(address, _credentials(identity), options=GRPC_OPTIONS) as channel:
            stub = rpc.OffloadStub(channel)
            if request is None:
                return stub.Health(pb.HealthRequest(), timeout=5)
            return stub.GetCapabilities(request, timeout=5)

    with worker_process(tmp_path / "w") as w:
        assert call(old, w.address) is not None  # paired devices reach each other (a chain's next hop)
        ca.revoke("old-laptop")
        serial = str(old.certificate.serial_number)
        with pytest.raises(grpc.RpcError) as not_the_appliance:
            call(tablet, w.address, pb.CapabilitiesRequest(revoked_serials=[str(tablet.certificate.serial_number)]))
        assert not_the_appliance.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "only the appliance" in not_the_appliance.value.details()
        assert call(old, w.address) is not None  # nothing revoked by that, and not yet told
        WorkerClient(w.address, ca.identity(), ca.revoked_serials).verify()  # the appliance tells it
        with pytest.raises(grpc.RpcError) as refused:
            call(old, w.address)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'old-laptop' was revoked" in refused.value.details()
        assert call(tablet, w.address) is not None
    assert serial in (tmp_path / "w" / "revoked.json").read_text()
    with worker_process(tmp_path / "w") as w, pytest.raises(grpc.RpcError) as after_restart:
        call(old, w.address)
    assert after_restart.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_no_device_is_signed_the_appliances_own_name(ca):
    with pytest.raises(PairingError, match="the appliance's own name"):
        ca.pair(ca.new_code(), signing_request(new_key(), "appliance"))
    ca.identity()
    assert "appliance" not in ca.workers()  # its own certificate is not a device to list or revoke


def _credentials(identity: Identity) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem)


def test_pairing_through_the_running_appliance(ca, tmp_path):
    """`appliance-ctl workers pair` -> `appliance-worker --pair CODE`: a code pairs once, and only in time."""
    with running_server("--no-advertise") as server:

        def pair(code: str, name: str) -> subprocess.CompletedProcess:
            return cli(
                "-m", "offload.worker", "--pair", code, "--appliance", server.url, "--name", name,
                "--home", str(tmp_path / name), "--pair-only", "--no-advertise",
            )  # fmt: skip

        code = cli("-m", "appliance.ctl", "workers", "pair").stdout.strip()
        first = pair(code, "laptop")
        assert first.returncode == 0, first.stderr
        identity = Identity.load(tmp_path / "laptop", "worker")
        assert identity is not None and identity.ca_pem == ca.ca_pem

        reused = pair(code, "intruder")
        assert reused.returncode == 2 and "already used" in reused.stderr
        assert Identity.load(tmp_path / "intruder", "worker") is None

        short = cli("-m", "appliance.ctl", "workers", "pair", "--ttl", "1").stdout.strip()
        time.sleep(1.5)
        expired = pair(short, "late")
        assert expired.returncode == 2 and "expired" in expired.stderr
        assert Identity.load(tmp_path / "late", "worker") is None

        wrong = pair("ABCD-EFGH", "guesser")
        assert wrong.returncode == 2 and "unknown pairing code" in wrong.stderr

    listed = cli("-m", "appliance.ctl", "workers", "list")
    assert "laptop" in listed.stdout and "intruder" not in listed.stdout
    with worker_process(tmp_path / "laptop") as w:  # the paired laptop serves the appliance
        assert WorkerClient(w.address, ca.identity()).verify().name == "laptop"


def test_an_unpaired_worker_will_not_start(tmp_path):
    result = cli("-m", "offload.worker", "--home", str(tmp_path), "--port", str(free_port()), "--no-advertise")
    assert result.returncode == 2 and "not paired" in result.stderr


def test_a_worker_refuses_layers_beyond_its_budget(ca, tmp_path, model_path):
    issue_identity(ca, tmp_path / "w", "tiny")
    model = Llama.load(str(model_path), "numpy")
    with worker_process(tmp_path / "w", budget="45MB") as w:
        client = WorkerClient(w.address, ca.identity())
        with pytest.raises(grpc.RpcError) as refused:
            client.ensure_layers(model, "m", 0, 4, layer_manifest(model, 0, 4))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "budget is 45.0 MB" in refused.value.details()
        client.ensure_layers(model, "m", 0, 2, layer_manifest(model, 0, 2))  # what fits is taken


def test_shipped_tensors_are_kept_across_a_restart(ca, tmp_path, model_path):
    issue_identity(ca, tmp_path / "w", "w")
    model = Llama.load(str(model_path), "numpy")
    manifest = layer_manifest(model, 0, 2)
    with worker_process(tmp_path / "w") as w:
        stub = WorkerClient(w.address, ca.identity()).stub
        assert len(stub.MissingTensors(pb.Manifest(tensors=manifest)).sha256) == len(manifest)
        WorkerClient(w.address, ca.identity()).ensure_layers(model, "m", 0, 2, manifest)
    with worker_process(tmp_path / "w") as w:  # same disk, new process
        assert (
            list(WorkerClient(w.address, ca.identity()).stub.MissingTensors(pb.Manifest(tensors=manifest)).sha256) == []
        )


def test_a_tensor_whose_bytes_do_not_match_its_hash_is_refused(ca, tmp_path, model_path):
    issue_identity(ca, tmp_path / "w", "w")
    model = Llama.load(str(model_path), "numpy")
    spec = layer_manifest(model, 0, 1)[0]
    with worker_process(tmp_path / "w") as w:
        stub = WorkerClient(w.address, ca.identity()).stub
        bad = [pb.TensorChunk(sha256=spec.sha256, offset=0, data=b"not the tensor", last=True)]
        with pytest.raises(grpc.RpcError) as refused:
            stub.PushTensors(iter(bad))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "do not match their SHA-256" in refused.value.details()
        assert list(stub.MissingTensors(pb.Manifest(tensors=[spec])).sha256) == [spec.sha256]
