"""Fuzzing: schemathesis against the app's own OpenAPI document (in-process ASGI), and a hypothesis
property that any refused step leaves the stored state byte-identical."""

from __future__ import annotations

import base64

import hypothesis.strategies as st
import numpy as np
import schemathesis
from schemathesis import checks
from hypothesis import HealthCheck, given, settings
from starlette.testclient import TestClient

from optim_service.app import create_app
from optim_service.settings import Settings

app = create_app(Settings(store="memory", rate_limit_per_second=0))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


# Every check but "a schema-valid request is accepted": JSON Schema cannot say that gradients must
# match the session's shapes, so schema-valid bodies are rightly refused with 422.
EXCLUDED = [checks.positive_data_acceptance]


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzz_finds_no_5xx_and_every_answer_matches_the_document(case):
    with TestClient(app):  # runs the lifespan: the store exists
        case.call_and_validate(excluded_checks=EXCLUDED)


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**63, 2**63 - 1)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=12,
)
hostile_floats = st.sampled_from([np.nan, np.inf, -np.inf, 1e300, -1e300, 5e-324, 1e-310, 3e38, 0.0])
tensor_like = st.one_of(
    json_values,
    st.lists(hostile_floats.map(lambda x: x if np.isfinite(x) else str(x)), min_size=3, max_size=3),
    st.lists(st.lists(st.floats(-1e40, 1e40), min_size=0, max_size=4), min_size=1, max_size=4),
    st.builds(lambda shape, raw: {"shape": shape, "b64": base64.b64encode(raw).decode()},
              st.lists(st.integers(-2, 10**12), max_size=4), st.binary(max_size=64)),
)


@st.composite
def hostile_steps(draw):
    """A step request that should be refused: a mangled JSON body, a binary body of the wrong
    length or with non-finite values, or bad headers around a valid body."""
    kind = draw(st.sampled_from(["json", "binary", "headers", "overflow"]))
    headers = {"content-type": "application/json"}
    if kind == "json":
        body = draw(st.dictionaries(st.sampled_from(["gradients", "loss", "step", "params", "owner"]),
                                    st.fixed_dictionaries({"w": tensor_like, "b": tensor_like}) | tensor_like,
                                    max_size=3))
        return orjson_bytes(body), headers
    if kind == "binary":
        values = draw(st.lists(hostile_floats, min_size=0, max_size=9))
        if len(values) == 5 and all(np.isfinite(values)):
            values.append(np.nan)  # 5 finite float32 values would be a valid step
        with np.errstate(over="ignore"):
            raw = np.asarray(values, "<f4").tobytes()
        return raw, {"content-type": "application/octet-stream"}
    if kind == "overflow":  # finite gradients whose square overflows float32
        return orjson_bytes({"gradients": {"w": [[1e25, 0.0], [0.0, 0.0]], "b": [0.0]}}), headers
    valid = orjson_bytes({"gradients": {"w": [[0.1, 0.2], [0.3, 0.4]], "b": [0.5]}})
    bad = draw(st.sampled_from([{"content-type": "text/plain"}, {"accept": "text/html"},
                                {"if-match": '"999"'}, {"if-match": "garbage"},
                                {"idempotency-key": "has spaces"}, {"content-type": "application/xml"}]))
    return valid, {**headers, **bad}


def orjson_bytes(value) -> bytes:
    import orjson

    return orjson.dumps(value)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=hostile_steps())
def test_refused_steps_leave_the_stored_state_byte_identical(request, fuzz_client):
    client, sid, stored = fuzz_client
    body, headers = request
    before = stored(sid)
    r = client.post(f"/v1/sessions/{sid}/step", content=body, headers=headers)
    assert r.status_code < 500, r.text
    assert r.status_code != 200, (body, headers, r.text)
    assert r.headers["content-type"] == "application/problem+json" and r.json()["detail"]
    assert stored(sid) == before
