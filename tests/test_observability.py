"""Prometheus metrics, request ids, and JSON logs that never carry tensors or keys."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerProcess


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_steps_by_optimizer_wire_and_outcome(app, client):
    sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "adam"}, "params": [1.0, 2.0],
                                                   "nan_policy": "skip"})).json()["id"]
    await client.post("/v1/sessions", json={"optimizer": {"type": "sgd"}, "params": [1.0]})
    for _ in range(3):
        await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.1, 0.2]})
    await client.post(f"/v1/sessions/{sid}/step", content=np.ones(2, "<f4").tobytes(),
                      headers={"content-type": "application/octet-stream", "idempotency-key": "k"})
    await client.post(f"/v1/sessions/{sid}/step", content=np.ones(2, "<f4").tobytes(),
                      headers={"content-type": "application/octet-stream", "idempotency-key": "k"})
    await client.post(f"/v1/sessions/{sid}/step", content=np.array([np.nan, 1], "<f4").tobytes(),
                      headers={"content-type": "application/octet-stream"})
    await client.get("/v1/sessions/nope")
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    assert m[("optim_steps_total", (("optimizer", "adam"), ("outcome", "applied")))] == 4
    assert m[("optim_steps_total", (("optimizer", "adam"), ("outcome", "replayed")))] == 1
    assert m[("optim_steps_total", (("optimizer", "adam"), ("outcome", "skipped")))] == 1
    assert m[("optim_step_duration_seconds_count", (("optimizer", "adam"), ("wire", "json")))] == 3
    assert m[("optim_step_duration_seconds_count", (("optimizer", "adam"), ("wire", "binary")))] == 3
    assert m[("optim_compute_duration_seconds_count", (("optimizer", "adam"),))] == 4
    assert m[("optim_http_errors_total", (("status", "404"),))] == 1
    assert m[("optim_sessions", ())] == 2
    store_calls = m.get(("optim_store_operation_duration_seconds_count", (("operation", "compare_and_set"),)), 0)
    if app.state.settings.store == "memory":
        assert store_calls == 0  # a dict's calls never wait: not timed
    else:
        assert store_calls >= 5


async def test_request_id_is_echoed_or_made(client):
    r = await client.get("/healthz", headers={"x-request-id": "trace-abc.123"})
    assert r.headers["x-request-id"] == "trace-abc.123"
    r = await client.get("/healthz", headers={"x-request-id": "bad id\twith spaces"})
    assert r.headers["x-request-id"] != "bad id\twith spaces" and len(r.headers["x-request-id"]) == 32
    r = await client.get("/v1/sessions/unknown")
    assert len(r.headers["x-request-id"]) == 32  # errors carry one too


async def test_a_step_keeps_its_request_context_whether_it_succeeds_or_fails(app, client):
    """The step lane answers steps outside the request-context middleware, so it keeps their context
    itself: the id echoed or made, the error counted, one access-log line each with its status."""
    sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "sgd"}, "params": [1.0]})).json()["id"]
    lines = []
    handler = logging.Handler()
    handler.emit = lines.append
    access = logging.getLogger("optim_service.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        ok = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.5]}, headers={"x-request-id": "s-1"})
        bad = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.5, 1.0]})
        gone = await client.post("/v1/sessions/nope/step", json={"gradients": [0.5]}, headers={"x-request-id": "s-3"})
    finally:
        access.removeHandler(handler)
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "s-1"
    assert bad.status_code == 422 and len(bad.headers["x-request-id"]) == 32
    assert gone.status_code == 404 and gone.headers["x-request-id"] == "s-3"
    assert gone.headers["content-type"] == "application/problem+json"
    steps = [r for r in lines if r.path.endswith("/step")]
    assert [(r.status, r.method) for r in steps] == [(200, "POST"), (422, "POST"), (404, "POST")]
    m = samples((await client.get("/metrics")).text)
    assert m[("optim_http_errors_total", (("status", "422"),))] == 1
    assert m[("optim_http_errors_total", (("status", "404"),))] == 1
    assert (await client.get(f"/v1/sessions/{sid}")).json()["step"] == 1  # the refused step changed nothing


async def test_with_cors_on_a_browsers_step_is_answered_through_cors():
    from optim_service.app import create_app
    from optim_service.settings import Settings

    app = create_app(Settings(store="memory", cors_origins="http://page.example"))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            sid = (await client.post("/v1/sessions", json={"optimizer": {"type": "sgd"}, "params": [1.0]})).json()["id"]
            browser = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.5]},
                                        headers={"origin": "http://page.example"})
            other = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.5]},
                                      headers={"origin": "http://elsewhere.example"})
            plain = await client.post(f"/v1/sessions/{sid}/step", json={"gradients": [0.5]})
    assert browser.status_code == 200 and browser.json()["step"] == 1
    assert browser.headers["access-control-allow-origin"] == "http://page.example"
    assert "server-timing" in browser.headers["access-control-expose-headers"].lower()
    assert len(browser.headers["x-request-id"]) == 32
    assert "access-control-allow-origin" not in other.headers and other.json()["step"] == 2
    assert plain.json()["step"] == 3 and "access-control-allow-origin" not in plain.headers


def test_json_logs_carry_the_request_id_and_no_tensors():
    server = ServerProcess("--store", "memory", env={"OPTIM_EXPOSE_METRICS": "false"})
    try:
        sid = httpx.post(f"{server.url}/v1/sessions", json={"optimizer": {"type": "sgd"},
                                                           "params": [0.123456789]}).json()["id"]
        r = httpx.post(f"{server.url}/v1/sessions/{sid}/step", json={"gradients": [0.987654321]},
                       headers={"x-request-id": "req-42"})
        assert r.headers["x-request-id"] == "req-42"
        assert "server" not in r.headers  # uvicorn's advertisement is off
        assert httpx.get(f"{server.url}/metrics").status_code == 404
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    assert lines and all("level" in line and "time" in line for line in lines)
    step = next(line for line in lines if line.get("request_id") == "req-42")
    assert step["logger"] == "optim_service.access" and step["status"] == 200
    assert step["path"] == f"/v1/sessions/{sid}/step" and step["duration_ms"] > 0
    assert step["time"].endswith("Z")  # ISO 8601, UTC, to the millisecond
    assert abs(datetime.fromisoformat(step["time"][:-1] + "+00:00").timestamp() - time.time()) < 120
    text = server.logs()
    assert "0.98765" not in text and "0.12345" not in text


def test_log_lines_carry_no_terminal_colour_codes():
    server = ServerProcess("--store", "memory")
    server.stop()
    assert "\x1b[" not in server.logs() and "color_message" not in server.logs()
    assert "Started server process" in server.logs()


def test_histogram_exposition_matches_prometheus_clients_own():
    from prometheus_client import CollectorRegistry, Histogram as Reference, generate_latest

    from optim_service.observability import LATENCY_BUCKETS, Histogram

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = Histogram("h_seconds", "doc", ["op"], LATENCY_BUCKETS, ours)
    ref = Reference("h_seconds", "doc", ["op"], buckets=LATENCY_BUCKETS, registry=theirs)
    values = [0.0, 0.0005, 0.00051, 0.001, 0.3, 10.0, 11.0, 1e-9, 2.5]
    for i, v in enumerate(values):
        op = "get" if i % 3 else "set"
        mine.labels(op).observe(v)
        ref.labels(op).observe(v)
    ours_text = {line for line in generate_latest(ours).decode().splitlines() if "_created" not in line}
    theirs_text = {line for line in generate_latest(theirs).decode().splitlines() if "_created" not in line}
    assert ours_text == theirs_text


def test_the_json_formatter_writes_extras_and_tracebacks():
    from optim_service.observability import JsonFormatter

    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.makeLogRecord({"name": "optim_service", "levelname": "ERROR", "msg": "sweep %s failed",
                                        "args": ("3",), "exc_info": sys.exc_info(), "request_id": "r-1",
                                        "status": 500})
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "sweep 3 failed" and line["level"] == "ERROR" and line["logger"] == "optim_service"
    assert line["request_id"] == "r-1" and line["status"] == 500
    assert "ValueError: boom" in line["exc_info"] and "args" not in line and "msg" not in line
