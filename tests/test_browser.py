"""In a real browser (Debian's Chromium driven by Playwright): Swagger UI renders every route, and the
JavaScript client trains from a page on another origin (CORS)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ServerProcess, free_port, wait_for_port

JS = Path(__file__).parents[1] / "clients" / "js"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_swagger_ui_lists_every_route(browser, server, tmp_path):
    page = browser.new_page()
    page.goto(f"{server.url}/docs")
    page.wait_for_selector(".opblock", timeout=20000)
    summaries = page.locator(".opblock-summary-path").all_inner_texts()
    for path in ["/v1/sessions", "/v1/sessions/{session_id}/step", "/v1/sessions/{session_id}/state",
                 "/v1/optimizers", "/metrics"]:
        assert any(path in s.replace("\u200b", "") for s in summaries), (path, summaries)
    page.screenshot(path=str(tmp_path / "docs.png"))
    assert (tmp_path / "docs.png").stat().st_size > 10_000
    page.close()


def test_javascript_client_trains_from_a_browser_page(browser, tmp_path):
    page_dir = tmp_path / "site"
    page_dir.mkdir()
    shutil.copy(JS / "index.js", page_dir / "index.js")
    (page_dir / "index.html").write_text("""<!doctype html><script type="module">
import { OptimClient, NotFoundError } from "./index.js";
const url = new URLSearchParams(location.search).get("api");
try {
  const client = new OptimClient(url, { apiKey: "sk-browser" });
  const session = await client.createSession({ params: { w: new Float32Array([1, 2, 3]) },
                                               optimizer: { type: "sgd", lr: 0.5 } });
  const out = await session.step({ w: new Float32Array([1, 1, 1]) });
  await session.delete();
  let missing = "";
  try { await session.step({ w: new Float32Array(3) }); } catch (e) { missing = e instanceof NotFoundError; }
  window.result = { w: Array.from(out.w), step: session.stepCount, missing };
} catch (e) { window.result = { error: String(e) }; }
</script>""")
    site_port = free_port()
    site = subprocess.Popen([sys.executable, "-m", "http.server", str(site_port), "--bind", "127.0.0.1"],
                            cwd=page_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    origin = f"http://127.0.0.1:{site_port}"
    api = ServerProcess("--store", "memory", env={"OPTIM_CORS_ORIGINS": origin, "OPTIM_API_KEYS": "sk-browser"})
    try:
        wait_for_port(site_port)
        page = browser.new_page()
        page.goto(f"{origin}/index.html?api={api.url}")
        page.wait_for_function("window.result !== undefined", timeout=20000)
        result = page.evaluate("window.result")
        assert result == {"w": [0.5, 1.5, 2.5], "step": 1, "missing": True}, result
        page.close()
    finally:
        api.stop()
        site.terminate()
