"""The dashboard at /ui in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
Selenium): it asks for the key, shows the devices of a server with one real worker, and streams a chat reply.

UPDATE_SCREENSHOT=1 also saves the page to docs/dashboard.png.
"""

from __future__ import annotations

import os
import shutil
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


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM and CHROMEDRIVER, "needs Debian's chromium and chromium-driver (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition, timeout: float = 120, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.05)


def test_dashboard_shows_devices_and_streams_a_chat_reply(tmp_path, monkeypatch, model_path, browser):
    from selenium.webdriver.common.by import By

    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "appliance"))
    issue_identity(certificate_authority(), tmp_path / "laptop", "laptop")
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
        ) as server,
    ):
        assert httpx.get(f"{server.url}/ui").status_code == 200  # the page is public ...
        assert httpx.get(f"{server.url}/ui/summary").status_code == 401  # ... what it shows is not

        browser.get(f"{server.url}/ui")
        find = browser.find_element
        assert find(By.ID, "login").is_displayed() and not find(By.ID, "board").is_displayed()
        find(By.ID, "key").send_keys("wrong-key")
        find(By.ID, "save-key").click()
        wait_for(lambda: "refused" in find(By.ID, "login-error").text, 30, "refusing a wrong key")

        find(By.ID, "key").send_keys("test-key")
        find(By.ID, "save-key").click()
        summary = httpx.get(f"{server.url}/ui/summary", headers={"Authorization": "Bearer test-key"})
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
