"""`make openwebui`: Open WebUI, as a home installs it (`pip install open-webui`, its own virtualenv), pointed at
the appliance as its Ollama server: its API lists the model and answers a chat, and in headless Chromium its
page shows the model and the reply to a question typed into it. Not part of `make test` (the install is
~7.4 GB and takes minutes); the figures it prints go into issue notes.

    python -m tests.openwebui_check --open-webui .venv-openwebui/bin/open-webui
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

from appliance.testbed.launch import free_port, running

QUESTION = "What is the capital of France?"


def _chat_in_browser(url: str, model: str, timeout_s: float = 180) -> str:
    """Type QUESTION into the page's chat box and wait for the assistant's reply to stop growing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(url)
        deadline = time.monotonic() + 60
        while not driver.find_elements(By.ID, "chat-input") and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # the model list and the changelog dialog load after the box
        page = driver.find_element(By.TAG_NAME, "body").text
        assert model in page, f"the page does not show {model}: {page[:400]!r}"
        for button in driver.find_elements(By.TAG_NAME, "button"):
            if "Let's Go" in button.text:  # the first run's changelog dialog
                button.click()
        box = driver.find_element(By.ID, "chat-input")
        box.click()
        box.send_keys(QUESTION)
        box.send_keys(Keys.ENTER)
        deadline, reply, steady = time.monotonic() + timeout_s, "", 0
        while time.monotonic() < deadline and steady < 4:
            time.sleep(1)
            found = driver.find_elements(By.ID, "response-content-container")
            text = found[-1].text.strip() if found else ""
            steady = steady + 1 if text and text == reply else 0
            reply = text
        driver.save_screenshot(str(Path(tempfile.gettempdir()) / "openwebui-chat.png"))
        assert reply, f"no reply within {timeout_s:.0f} s (screenshot: {tempfile.gettempdir()}/openwebui-chat.png)"
        return reply
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--open-webui", type=Path, required=True, help="the open-webui command of its virtualenv")
    args = parser.parse_args()
    port, webui_port = free_port(), free_port()
    ours = [sys.executable, "-m", "appliance.cli", "serve", "--no-auth", "--no-advertise", "--host", "127.0.0.1"]
    ours += ["--http-port", str(port), "--grpc-port", str(free_port())]
    with tempfile.TemporaryDirectory() as data:
        env = {
            **os.environ,
            "OLLAMA_BASE_URL": f"http://127.0.0.1:{port}",
            "ENABLE_OPENAI_API": "false",
            "WEBUI_AUTH": "False",  # one user, the home's owner: no sign-up page
            "DATA_DIR": data,
            "OFFLINE_MODE": "true",  # no model downloads from Hugging Face (its RAG embedder stays unloaded)
            "HF_HUB_OFFLINE": "1",
        }
        webui = [str(args.open_webui), "serve", "--host", "127.0.0.1", "--port", str(webui_port)]
        url = f"http://127.0.0.1:{webui_port}"
        with running(ours, f"http://127.0.0.1:{port}/health"), running(webui, f"{url}/health", env=env, timeout=300):
            token = httpx.post(f"{url}/api/v1/auths/signin", json={"email": "", "password": ""}).json()["token"]
            auth = {"Authorization": f"Bearer {token}"}
            models = [m["id"] for m in httpx.get(f"{url}/api/models", headers=auth, timeout=60).json()["data"]]
            print(f"Open WebUI lists: {models}")
            (model,) = [m for m in models if m.startswith("smollm2-135m-instruct")]
            started = time.perf_counter()
            body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "stream": False}
            r = httpx.post(f"{url}/api/chat/completions", json=body, headers=auth, timeout=180)
            r.raise_for_status()
            answer = r.json()["choices"][0]["message"]["content"]
            print(f"its API, {time.perf_counter() - started:.1f} s: {answer!r}")
            assert answer.strip(), "an empty answer"
            started = time.perf_counter()
            reply = _chat_in_browser(url, model)
            print(f"its page in headless Chromium, {time.perf_counter() - started:.1f} s: {reply!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
