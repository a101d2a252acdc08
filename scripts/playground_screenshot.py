"""Take docs/playground.png from a real run: a server on the embedded models (the
default MODELS), one real chat answer from the instruct model (the page's default) in
headless Chromium (Debian's /usr/bin/chromium; no browser is downloaded).

    .venv/bin/python scripts/playground_screenshot.py [output.png]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.server_process import ServerProcess  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def main() -> None:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "playground.png"
    env = {"LLM_MODEL": "", "CHAT_FORMAT": "", "N_CTX": "2048"}
    with tempfile.TemporaryDirectory() as logs, ServerProcess(env, log_dir=Path(logs)) as server, \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 720, "height": 600})
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)
        page.goto(server.url + "/")
        expect(page.locator("#status-conn")).to_have_text("connected")
        page.click("#settings summary")
        page.fill("#max-tokens", "200")
        page.fill("#temperature", "0.2")
        page.fill("#prompt", "Give me three tips for a good night's sleep.")
        page.press("#prompt", "Enter")
        expect(page.locator("#transcript .msg.assistant")).to_have_attribute("data-state", "done")
        page.wait_for_timeout(1200)  # one status poll after the reply
        page.locator("#settings summary").click()  # fold the settings again
        page.screenshot(path=str(output), full_page=True)
        browser.close()
    print(f"wrote {output} ({output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
