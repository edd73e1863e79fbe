"""`make image`: the Dockerfile's two targets built with buildah, daemonless, on a Debian base made here.

The base is a debootstrapped minbase of this machine's release, from the mirror its apt uses, committed as
an image; the Dockerfile takes it as `--build-arg BASE=...` exactly as it takes the CUDA and L4T bases on real
boxes. buildah runs as root with the vfs storage driver and chroot isolation (no daemon, no overlay, no user
namespaces needed). What a download inside the build needs from this machine (the CA bundle pip trusts, apt's
proxy settings) goes in as build secrets, mounted only into the steps that download and never committed.
With qemu-user's binfmt handlers registered, the worker is built for arm64 too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILDAH = ["buildah", "--storage-driver", "vfs"]
TARGETS = ("appliance", "worker")  # the Dockerfile's run-time stages
IMAGES = {"appliance": "localhost/appliance", "worker": "localhost/appliance-worker"}
ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}
QEMU = {"arm64": "qemu-aarch64", "amd64": "qemu-x86_64"}
WORK = Path(os.environ.get("APPLIANCE_IMAGE_WORK", "/var/tmp/appliance-image"))  # debootstrap's scratch


def host_arch() -> str:
    return ARCHES[platform.machine()]


def image_name(target: str, arch: str | None = None) -> str:
    """The tag `make image` gives a target: latest for this machine's architecture, else the arch's name."""
    arch = arch or host_arch()
    return f"{IMAGES[target]}:{'latest' if arch == host_arch() else arch}"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kw)


def exists(image: str) -> bool:
    return subprocess.run([*BUILDAH, "inspect", "--type", "image", image], capture_output=True).returncode == 0


def release() -> tuple[str, str]:
    """This machine's Debian release and the mirror its apt reads (deb822 or one-line sources)."""
    codename = re.search(r"^VERSION_CODENAME=(\S+)", Path("/etc/os-release").read_text(), re.M)
    if codename is None:
        sys.exit("error: /etc/os-release names no VERSION_CODENAME (the base is made for Debian hosts)")
    mirror = "http://deb.debian.org/debian"
    for source in sorted(Path("/etc/apt").glob("sources.list*")) + sorted(Path("/etc/apt/sources.list.d").glob("*")):
        if source.is_file() and source.suffix in ("", ".list", ".sources"):
            found = re.search(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+/debian)/?\s", source.read_text(), re.M)
            if found:
                mirror = found.group(1)
                break
    return codename.group(1), mirror


def binfmt_ready(arch: str) -> str | None:
    """Why `arch` binaries cannot run here (None when they can): qemu-user's handler must be registered, with
    the F flag so that it works inside a build's chroot."""
    if arch == host_arch():
        return None
    entry = Path("/proc/sys/fs/binfmt_misc") / QEMU[arch]
    if not entry.exists():
        if not Path("/proc/sys/fs/binfmt_misc/status").exists():
            mount = ["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"]
            subprocess.run(mount, capture_output=True)
        subprocess.run(["update-binfmts", "--enable", QEMU[arch]], capture_output=True)
    if not entry.exists():
        return f"no binfmt_misc handler {entry} (apt-get install qemu-user-static binfmt-support)"
    text = entry.read_text()
    if not text.startswith("enabled"):
        return f"{entry} is disabled"
    flags = re.search(r"^flags: (\S*)", text, re.M)
    if flags is None or "F" not in flags.group(1):
        return f"{entry} lacks the F flag: its interpreter would have to be inside each build's chroot"
    return None


def base(arch: str) -> str:
    """The debootstrapped base image for `arch`, made once (~40 s) and kept in buildah's store."""
    codename, mirror = release()
    name = f"localhost/appliance-base:{codename}-{arch}"
    if exists(name):
        return name
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK, prefix=f"base-{arch}-") as tmp:
        rootfs, tarball = Path(tmp) / "rootfs", Path(tmp) / "rootfs.tar"
        foreign = ["--arch", arch, "--foreign"] if arch != host_arch() else []
        run(["debootstrap", "--variant=minbase", *foreign, codename, str(rootfs), mirror], stdout=subprocess.DEVNULL)
        if foreign:  # the second stage runs the target's own binaries, through qemu-user
            run(["chroot", str(rootfs), "/debootstrap/debootstrap", "--second-stage"], stdout=subprocess.DEVNULL)
        run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."])
        container = run([*BUILDAH, "from", "--arch", arch, "scratch"], capture_output=True).stdout.strip()
        try:
            run([*BUILDAH, "add", container, str(tarball), "/"], stdout=subprocess.DEVNULL)
            run([*BUILDAH, "config", "--arch", arch, "--os", "linux", "--cmd", "/bin/bash", container])
            run([*BUILDAH, "commit", "--quiet", container, name], stdout=subprocess.DEVNULL)
        finally:
            subprocess.run([*BUILDAH, "rm", container], capture_output=True)
    return name


def pip_ca() -> Path | None:
    """The CA bundle pip here trusts (PIP_CERT, else pip's `cert` setting), for the build's pip steps."""
    cert = os.environ.get("PIP_CERT")
    if not cert:
        pip = [sys.executable, "-m", "pip", "config", "get", "global.cert"]
        got = subprocess.run(pip, capture_output=True, text=True)
        cert = got.stdout.strip() if got.returncode == 0 else ""
    return Path(cert) if cert and Path(cert).is_file() else None


def apt_conf() -> str:
    """This machine's apt proxy settings (Acquire::*::Proxy), as an apt.conf for the build's apt steps."""
    dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True).stdout
    return "".join(line + "\n" for line in dump.splitlines() if re.match(r"Acquire::[a-z]+::Proxy", line, re.I))


@dataclass
class Built:
    image: str
    arch: str
    seconds: float
    size_mb: float


def size_mb(image: str) -> float:
    """The image's size as buildah's store holds it (the sum of its layers, uncompressed)."""
    out = run([*BUILDAH, "images", "--json", image], capture_output=True).stdout
    number, unit = json.loads(out)[0]["size"].split()  # e.g. "760 MB"
    return float(number) * {"B": 1e-6, "kB": 1e-3, "KB": 1e-3, "MB": 1.0, "GB": 1e3}[unit]


def build(target: str, arch: str, base_image: str, secrets: list[str], build_args: dict[str, str]) -> Built:
    image = image_name(target, arch)
    args = [f"--build-arg=BASE={base_image}"] + [f"--build-arg={k}={v}" for k, v in build_args.items()]
    cmd = [*BUILDAH, "build", "--isolation", "chroot", "--layers", "--force-rm", "--format", "docker", "--arch", arch]
    cmd += [*args, *secrets, "--target", target, "--tag", image, "--file", str(ROOT / "Dockerfile"), str(ROOT)]
    start = time.monotonic()
    run(cmd)
    return Built(image, arch, time.monotonic() - start, size_mb(image))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--arm64", choices=("auto", "yes", "no"), default="auto", help="also the worker for arm64")
    opts = parser.parse_args(argv)
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"error: {' and '.join(missing)} not installed (apt-get install -y buildah debootstrap)")
    if os.geteuid() != 0:
        sys.exit("error: make image runs buildah as root (vfs storage, chroot isolation)")
    with tempfile.TemporaryDirectory(prefix="appliance-image-") as tmp:
        secrets = []
        ca = pip_ca()
        if ca is not None:
            secrets.append(f"--secret=id=pip-ca,src={ca}")
        conf = apt_conf()
        if conf:
            (Path(tmp) / "apt.conf").write_text(conf)
            secrets.append(f"--secret=id=apt-conf,src={Path(tmp) / 'apt.conf'}")
        print(f"build secrets: pip-ca={ca or '-'} apt-conf={'proxy settings' if conf else '-'}", flush=True)
        results: list[Built] = []
        start = time.monotonic()
        base_image = base(host_arch())
        print(f"base {base_image}: {time.monotonic() - start:.0f} s", flush=True)
        for target in opts.targets:
            results.append(build(target, host_arch(), base_image, secrets, {}))
        foreign = "arm64" if host_arch() == "amd64" else "amd64"
        why_not = binfmt_ready(foreign) if opts.arm64 != "no" else "not asked for (--arm64 no)"
        if why_not is None and "worker" in opts.targets:
            start = time.monotonic()
            foreign_base = base(foreign)
            print(f"base {foreign_base}: {time.monotonic() - start:.0f} s", flush=True)
            # pycuda is not compiled under emulation (tens of minutes); a GPU worker builds natively
            results.append(build("worker", foreign, foreign_base, secrets, {"EXTRAS": ""}))
        elif opts.arm64 == "yes":
            sys.exit(f"error: no {foreign} build: {why_not}")
        else:
            print(f"{foreign} worker not built: {why_not}")
    for r in results:
        print(f"{r.image:44} {r.arch:6} {r.size_mb:7.0f} MB  built in {r.seconds:5.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
