"""The dashboard in a real browser (Debian's Chromium through Playwright), against a real server
with API keys: it renders a session's curves, follows a step as it lands, and logs no console error."""

from __future__ import annotations

import httpx
import numpy as np

from conftest import ServerProcess
from test_browser import browser  # noqa: F401  (the module's Chromium)


def test_the_dashboard_draws_a_session_and_follows_its_steps(browser, tmp_path):  # noqa: F811
    server = ServerProcess("--store", "memory", env={"OPTIM_API_KEYS": "sk-dash"})
    auth = {"Authorization": "Bearer sk-dash"}
    try:
        theta = np.array([1.0, -0.5])
        sid = httpx.post(f"{server.url}/v1/sessions", headers=auth, json={
            "optimizer": {"type": "sgd", "lr": 0.3}, "dtype": "float64", "params": {"w": theta.tolist()}}).json()["id"]

        def step():
            nonlocal theta
            answer = httpx.post(f"{server.url}/v1/sessions/{sid}/step", headers=auth,
                                json={"gradients": {"w": theta.tolist()}, "loss": float(theta @ theta) / 2})
            theta = np.array(answer.json()["params"]["w"])

        for _ in range(12):
            step()
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        missing = []  # everything the page asks for is there (its icon too: it names none to fetch)
        page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
        page.goto(f"{server.url}/dashboard?session={sid}")
        page.wait_for_selector("#key-form:not([hidden])", timeout=10000)  # the API said 401: a key is asked
        errors.clear()  # the 401 the page met on purpose
        page.fill("#key", "sk-dash")
        page.click("#key-form button")
        page.wait_for_selector(f"#sessions tr[data-id='{sid}']", timeout=10000)
        page.wait_for_function("document.querySelector('#steps').textContent === '12'", timeout=10000)
        assert page.locator("#chart-loss canvas").count() == 1 and page.locator("#chart-ratio canvas").count() == 1
        assert page.inner_text("#verdict") == "healthy"
        row = page.inner_text(f"#sessions tr[data-id='{sid}']")
        assert "sgd" in row and "12" in row and "healthy" in row
        step()  # a step lands: the page follows it without a reload
        page.wait_for_function("document.querySelector('#steps').textContent === '13'", timeout=10000)
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        assert (tmp_path / "dashboard.png").stat().st_size > 20_000
        assert errors == [], errors
        assert missing == [], missing
        page.close()
    finally:
        server.stop()
