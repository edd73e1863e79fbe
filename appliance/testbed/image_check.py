"""`make image-check`: the built images run as containers (buildah run, chroot isolation), checked end to end.

The appliance serves with its state volume on a temporary folder; its HEALTHCHECK command (read from the
image) succeeds; /v2/health/ready answers; the worker image pairs with it and takes the layers beyond the
appliance's memory budget; OpenAI's client gets a completion; a restart keeps the key and the paired
device; both run as the image's non-root user; the GPU backend is in the image and, with no GPU here,
the server says it runs the C kernels. The whole check runs in a network namespace of its own (the images'
fixed ports, 8000, 8001 and 50051, on a private loopback). Prints timings and image sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import httpx
import psutil

from appliance.testbed.image import BUILDAH, image_name, size_mb

HTTP = "https://127.0.0.1:8000"  # the port the image's HEALTHCHECK asks, over TLS as it does
WORKER_PORT = 50051
# The appliance's serve flags, in one place: TLS (its CA's certificate, as the HEALTHCHECK expects) on the
# namespace's loopback, no mDNS (the worker is named), and a budget that leaves most layers to the worker.
SERVE_FLAGS = ["--host", "127.0.0.1", "--tls", "--no-advertise", "--no-discover", "--memory-budget", "40MB"]
SERVE_FLAGS += ["--worker", f"127.0.0.1:{WORKER_PORT}"]
WORKER_FLAGS = ["--host", "127.0.0.1", "--port", str(WORKER_PORT), "--no-advertise", "--memory-budget", "420MB"]
PROMPT = "The capital of France is"
NETNS_MARK = "APPLIANCE_IMAGE_CHECK_NETNS"


class CheckFailed(Exception):
    pass


def trust(state: Path) -> ssl.SSLContext | bool:
    """The appliance's CA, from its state volume, once the appliance has made it (before: nothing is trusted
    but the system's CAs, which do not sign it, so a probe fails as a client without the CA would)."""
    ca = state / "pki" / "ca.pem"
    return ssl.create_default_context(cafile=str(ca)) if ca.exists() else True


def check(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)
    print(f"  ok  {what}", flush=True)


def config(image: str) -> dict:
    """The image's Docker config (entrypoint, user, healthcheck, volumes)."""
    out = subprocess.run([*BUILDAH, "inspect", "--type", "image", image], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["Docker"]["config"]


class Container:
    """A working container of an image; each `run` is one process in it, as `docker run` would start it."""

    def __init__(self, image: str, volume: tuple[Path, str]):
        self.image, self.volume = image, volume
        self.config = config(image)
        out = subprocess.run([*BUILDAH, "from", "--quiet", image], check=True, capture_output=True, text=True)
        self.name = out.stdout.strip()

    def command(self, *argv: str) -> list[str]:
        host, inside = self.volume
        return [*BUILDAH, "run", "--isolation", "chroot", "--volume", f"{host}:{inside}", self.name, "--", *argv]

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*argv), capture_output=True, text=True, timeout=timeout)

    def entrypoint(self, *args: str) -> list[str]:
        """The image's ENTRYPOINT with these arguments in place of its CMD."""
        return self.command(*self.config["Entrypoint"], *args)

    @contextmanager
    def serving(
        self, args: list[str], ready_url: str, log: Path, timeout: float = 300, state: Path | None = None
    ) -> Iterator[float]:
        """The entrypoint running until the block ends; yields the seconds it took to answer ready_url
        (over TLS, trusting the CA in `state`)."""
        start = time.monotonic()
        with open(log, "a") as out:
            proc = subprocess.Popen(self.entrypoint(*args), stdout=out, stderr=subprocess.STDOUT)
        try:
            while True:
                if proc.poll() is not None:
                    raise CheckFailed(f"{self.image} exited with {proc.returncode}: {log.read_text()[-3000:]}")
                try:
                    verify = trust(state) if state is not None else True
                    if ready_url and httpx.get(ready_url, timeout=2, verify=verify).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if not ready_url and "serving on" in log.read_text():
                    break
                if time.monotonic() - start > timeout:
                    raise CheckFailed(f"{self.image} not ready within {timeout:.0f} s: {log.read_text()[-3000:]}")
                time.sleep(0.5)
            yield time.monotonic() - start
        finally:
            stop(proc)

    def remove(self) -> None:
        subprocess.run([*BUILDAH, "rm", self.name], capture_output=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the container's processes (chroot isolation shares our PID namespace), then to buildah."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in reversed(family):
        with suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        for p in [*family, psutil.Process(proc.pid)]:
            with suppress(psutil.NoSuchProcess):
                p.kill()
        proc.wait(timeout=10)


def ctl(state: Path, *args: str) -> object:
    """appliance-ctl from this machine's virtualenv, with the admin key the container wrote to its state."""
    env = {
        **os.environ,
        "APPLIANCE_SERVER": HTTP,
        "APPLIANCE_ADMIN_KEY": (state / "admin-key").read_text().strip(),
        "APPLIANCE_CACERT": str(state / "pki" / "ca.pem"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "appliance.ctl", *args, "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    if result.returncode != 0:
        raise CheckFailed(f"appliance-ctl {' '.join(args)}: {result.stderr.strip()}")
    return json.loads(result.stdout)


def complete(key: str, state: Path) -> str:
    from openai import DefaultHttpxClient, OpenAI

    http = DefaultHttpxClient(verify=trust(state))
    client = OpenAI(base_url=f"{HTTP}/v1", api_key=key, timeout=300, http_client=http)
    model = client.models.list().data[0].id
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    return reply.choices[0].text


def wait_for(what: str, probe, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what} within {timeout:.0f} s")
        time.sleep(1)


def owned_by(path: Path, uid: int) -> bool:
    """Every file the container wrote under `path` is uid's (directories may be mount points, made by root)."""
    return all(p.stat().st_uid == uid for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> int:
    """WORKER_ARCH=arm64 (environment): the worker is the arm64 image, run through qemu-user (make image ARM64=auto)."""
    appliance_image, worker_image = image_name("appliance"), image_name("worker", os.environ.get("WORKER_ARCH") or None)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="appliance-image-check-", dir="/var/tmp") as tmp, ExitStack() as stack:
        state, worker_state, logs = Path(tmp) / "state", Path(tmp) / "worker-state", Path(tmp)
        box = Container(appliance_image, (state, "/var/lib/appliance"))
        stack.callback(box.remove)
        uid = int(box.config["User"])
        for folder in (state, worker_state):  # as a fresh named volume would be: the image user's
            folder.mkdir(mode=0o700)
            os.chown(folder, uid, uid)
        laptop = Container(worker_image, (worker_state, "/var/lib/appliance-worker"))
        stack.callback(laptop.remove)
        print(f"{appliance_image} and {worker_image}; state on {tmp}", flush=True)

        check(uid != 0 and box.run("id", "-u").stdout.strip() == str(uid), f"the appliance runs as uid {uid}")
        check(laptop.run("id", "-u").stdout.strip() == laptop.config["User"] != "0", "the worker runs as non-root")
        serve_log = logs / "serve.log"
        with box.serving(["serve", *SERVE_FLAGS], f"{HTTP}/v2/health/ready", serve_log, state=state) as seconds:
            timings["appliance ready (first start)"] = seconds
            fallback = "backend auto: the C kernels, because no NVIDIA GPU is visible"
            check(fallback in serve_log.read_text(), f"serve says: {fallback!r}")
            health = box.config["Healthcheck"]["Test"]
            check(health[0] == "CMD" and box.run(*health[1:]).returncode == 0, "the image's HEALTHCHECK passes")
            ready = httpx.get(f"{HTTP}/v2/health/ready", verify=trust(state)).status_code
            check(ready == 200, "/v2/health/ready answers 200 over TLS, the appliance's CA trusted")
            key = ctl(state, "keys", "create", "image-check")["key"]
            code = ctl(state, "devices", "pair", "--ttl", "120")["code"]
            pair_flags = ["--pair", code, "--appliance", HTTP, "--name", "laptop", *WORKER_FLAGS]
            stack.enter_context(laptop.serving(pair_flags, "", logs / "worker.log"))

            def connected():
                return [d for d in ctl(state, "devices", "list") if d["state"] == "connected"]

            start = time.monotonic()
            wait_for("the worker connected", connected)
            timings["worker paired and connected"] = time.monotonic() - start
            start = time.monotonic()
            text = complete(key, state)
            timings["first completion (layers shipped)"] = time.monotonic() - start
            check(bool(text.strip()), f"OpenAI's client gets a completion: {PROMPT!r} -> {text!r}")
            held = {d["name"]: d["layers"] for d in ctl(state, "devices", "list")}
            check(bool(held.get("laptop")), f"the worker holds layers {held.get('laptop')} under its budget")
        check(owned_by(state, uid), f"every file in the state volume is the image user's (uid {uid})")
        with box.serving(["serve", *SERVE_FLAGS], f"{HTTP}/v2/health/ready", serve_log, state=state) as seconds:
            timings["appliance ready (restart)"] = seconds
            devices = wait_for("the paired worker back after the restart", connected)
            check(devices[0]["name"] == "laptop", "after a restart the paired worker is still paired and connected")
            again = complete(key, state)
            check(again == text, "after a restart the key still works and the text is the same")
        driver = box.run("python", "-c", "import pycuda, pycuda.driver").stderr.splitlines()
        why = next((line for line in driver if "libcuda.so.1" in line), " | ".join(driver[-3:]))
        check(
            box.run("python", "-c", "import pycuda").returncode == 0 and "libcuda.so.1: cannot open" in why,
            f"pycuda is in the appliance image; its driver, with no GPU driver here: {why.strip()}",
        )
    print("image-check passed")
    for what, seconds in timings.items():
        print(f"  {what:36} {seconds:6.1f} s")
    for image in (appliance_image, worker_image):
        print(f"  {image:36} {size_mb(image):6.0f} MB")
    return 0


def in_own_netns() -> None:
    """Re-run this module in a fresh network namespace with its loopback up, once."""
    if os.environ.get(NETNS_MARK):
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if shutil.which("unshare") is None:
        sys.exit("error: unshare (util-linux) is needed for the check's network namespace")
    env = {**os.environ, NETNS_MARK: "1"}
    os.execvpe("unshare", ["unshare", "--net", "--", sys.executable, "-m", "appliance.testbed.image_check"], env)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("error: make image-check runs buildah as root")
    in_own_netns()
    try:
        sys.exit(main())
    except CheckFailed as e:
        print(f"image-check FAILED: {e}", file=sys.stderr)
        sys.exit(1)
