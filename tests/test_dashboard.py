"""The dashboard at /ui in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
Selenium), over HTTPS: it asks for the key, shows the devices of a server with one real worker, and streams
a chat reply. Chromium trusts the appliance's CA the way an owner's browser would: the CA certificate
imported into the NSS database of its (temporary) home with `certutil` (Debian's libnss3-tools), no flag
that skips certificate checks; the same page in a Chromium without it shows the certificate error.

UPDATE_SCREENSHOT=1 also saves the page to docs/dashboard.png.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from appliance.testbed.netsim import worker_process
from models.store import model_name
from offload.pki import certificate_authority, issue_identity
from tests.serving import running_server

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium")
CERTUTIL = shutil.which("certutil")


@pytest.fixture()
def browsers():
    """Opens headless Chromiums whose home (and so NSS database) is the given folder; quits them after."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM and CHROMEDRIVER, "needs Debian's chromium and chromium-driver (.ci/run installs them)"
    opened = []

    def open_in(home: Path):
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
            options.add_argument(arg)
        service = Service(CHROMEDRIVER, env={**os.environ, "HOME": str(home)})
        opened.append(webdriver.Chrome(service=service, options=options))
        return opened[-1]

    try:
        yield open_in
    finally:
        for driver in opened:
            driver.quit()


def trusting_home(home: Path, ca_pem: Path) -> Path:
    """A home whose NSS database (what Chromium on Linux reads) trusts the CA for TLS servers ("C,,")."""
    assert CERTUTIL, "needs Debian's libnss3-tools (certutil); make system-test-deps installs it"
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True)
    certutil = [CERTUTIL, "-d", f"sql:{db}"]
    subprocess.run([*certutil, "-N", "--empty-password"], check=True)
    subprocess.run([*certutil, "-A", "-t", "C,,", "-n", "appliance-ca", "-i", str(ca_pem)], check=True)
    return home


def wait_for(condition, timeout: float = 120, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.05)


def test_dashboard_shows_devices_and_streams_a_chat_reply(tmp_path, monkeypatch, model_path, browsers):
    from selenium.webdriver.common.by import By

    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "appliance"))
    ca = certificate_authority()
    issue_identity(ca, tmp_path / "laptop", "laptop")
    with (
        worker_process(tmp_path / "laptop", budget="420MB") as laptop,
        running_server(
            "--model",
            str(model_path),
            "--memory-budget",
            "190MB",  # float32 sizes: 3 layers of the NumPy reference
            "--backend",
            "numpy",
            "--worker",
            laptop.address,
            "--no-discover",
            "--no-advertise",
            log_path=tmp_path / "server.log",
            tls=True,
        ) as server,
    ):
        assert server.url.startswith("https://")
        assert httpx.get(f"{server.url}/ui", verify=server.verify()).status_code == 200  # the page is public ...
        assert httpx.get(f"{server.url}/ui/summary", verify=server.verify()).status_code == 401  # ... its data not

        stranger = browsers(tmp_path / "stranger")  # a browser that does not trust the appliance's CA
        stranger.get(f"{server.url}/ui")
        assert stranger.title == "Privacy error" and stranger.find_elements(By.ID, "key") == []
        browser = browsers(trusting_home(tmp_path / "owner", ca.folder / "ca.pem"))
        browser.get(f"{server.url}/ui")
        assert browser.execute_script("return location.protocol") == "https:"
        find = browser.find_element
        assert find(By.ID, "login").is_displayed() and not find(By.ID, "board").is_displayed()
        find(By.ID, "key").send_keys("wrong-key")
        find(By.ID, "save-key").click()
        wait_for(lambda: "refused" in find(By.ID, "login-error").text, 30, "refusing a wrong key")

        find(By.ID, "key").send_keys("test-key")
        find(By.ID, "save-key").click()
        summary = httpx.get(
            f"{server.url}/ui/summary", headers={"Authorization": "Bearer test-key"}, verify=server.verify()
        )
        assert summary.status_code == 200, summary.text
        wait_for(lambda: find(By.ID, "board").is_displayed(), 30, f"opening with the key ({find(By.ID, 'state').text})")
        assert browser.execute_script("return sessionStorage.getItem('appliance-api-key')") == "test-key"
        assert model_name(model_path) in find(By.ID, "model").text
        rows = wait_for(  # read in one script: the page re-renders the table every poll, staling elements
            lambda: browser.execute_script(
                "return [...document.querySelectorAll('#devices tbody tr')].map(r => r.innerText.replace(/\\s+/g, ' '))"
            ),
            30,
            "devices",
        )
        assert rows[0].startswith("appliance here [0, 3)")
        assert rows[1].startswith("laptop connected [3, 30)") and laptop.address in rows[1]

        find(By.ID, "chat-input").send_keys("Name the capital of France.")
        find(By.ID, "send").click()
        reply = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"), 30, "a reply bubble")[0]
        seen: set[str] = set()

        def finished() -> bool:
            seen.add(reply.text)
            return "done" in reply.get_attribute("class")

        wait_for(finished, 300, "the streamed reply")
        assert "Paris" in reply.text and "error" not in reply.get_attribute("class")
        growing = sorted(len(t) for t in seen if t)
        assert len(growing) >= 2 and growing[0] < len(reply.text), "the reply arrived in one piece, not streamed"
        wait_for(lambda: find(By.ID, "tps").text not in ("", "-"), 10, "the tokens/s figure")

        shot = tmp_path / "dashboard.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("UPDATE_SCREENSHOT"):
            shutil.copy(shot, Path(__file__).parent.parent / "docs" / "dashboard.png")
