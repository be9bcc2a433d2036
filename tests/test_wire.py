"""The fast JSON readers (orjson for small bodies, simdjson for large ones): each reads common
tensor bodies itself, gives exactly what orjson plus numpy would, and declines (None: orjson and the
exact checks take over) whenever it cannot be sure."""

import numpy as np
import orjson
import pytest
from hypothesis import given, settings, strategies as st

from optim_service.api import jsonbody
from optim_service.api.jsonbody import loads_with_tensors
from optim_service.api.wire import is_b64_tensor


@pytest.fixture(params=["orjson", "simdjson"], autouse=True)
def reader(request, monkeypatch):
    """Every test here runs through each reader, whatever the size of its bodies."""
    monkeypatch.setattr(jsonbody, "SMALL_BODY_BYTES", 1 << 30 if request.param == "orjson" else 0)
    return request.param


def orjson_reference(body: bytes, field: str):
    """What the exact path makes of a body it accepts: orjson, then np.array of each number list."""
    obj = orjson.loads(body)
    tensors = obj.get(field)
    if isinstance(tensors, list):
        obj[field] = np.array(tensors, np.float64)
    elif isinstance(tensors, dict) and not is_b64_tensor(tensors):
        obj[field] = {k: np.array(v, np.float64) if isinstance(v, list) else v for k, v in tensors.items()}
    return obj


def assert_same(fast, reference):
    assert type(fast) is type(reference)
    if isinstance(fast, np.ndarray):
        assert fast.dtype == np.float64 and fast.shape == reference.shape
        assert np.array_equal(fast.view(np.int64), reference.view(np.int64))  # bit for bit, -0.0 too
    elif isinstance(fast, dict):
        assert list(fast) == list(reference)
        for k in fast:
            assert_same(fast[k], reference[k])
    else:
        assert fast == reference


@pytest.mark.parametrize("doc", [
    {"gradients": {"w": [1.0, 2.5, -3]}},
    {"gradients": {"w": [[1.0, 2.0], [3.0, 4.0]], "b": [0.5]}, "loss": 0.5},
    {"gradients": [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]},
    {"gradients": {"w": [], "e": [[], []]}},
    {"gradients": {"w": [[1.0], [2.0]], "b": [1e-310, -0.0, 9007199254740993], "s": 1.5}},
    {"optimizer": {"type": "adam", "betas": [0.9, 0.99]}, "params": {"w": [1.0]},
     "schedule": {"type": "multistep", "milestones": [1, 2]}},
])
def test_reads_common_bodies_exactly(doc):
    body = orjson.dumps(doc)
    field = "params" if "params" in doc else "gradients"
    fast = loads_with_tensors(body, field)
    assert fast is not None, "a common body should not need the slow path"
    assert_same(fast, orjson_reference(body, field))


@pytest.mark.parametrize("body", [
    b'{"gradients": {"w": [1.0, true]}}',
    b'{"gradients": {"w": [true, false]}}',
    b'{"gradients": {"w": [1.0, null]}}',
    b'{"gradients": {"w": [1.0, "2.0"]}}',
    b'{"gradients": {"w": [1.0, {}]}}',
    b'{"gradients": {"w": [1.0, [2.0]]}}',  # a nested singleton: as many numbers, one list too many
    b'{"gradients": {"w": [[1.0, 2.0], [3.0, [4.0]]]}}',
    b'{"gradients": {"w": [[1, 2], [3], [4, 5, 6]]}}',  # ragged with the "right" count of numbers
    b'{"gradients": {"w": [[[1, 2], [3, 4]], [[5, 6, 7], [8]]]}}',  # ragged, right counts of lists too
    b'{"gradients": {"w": [1e400]}}',
    b'{"gradients": {"w": [1.0,]}}',
    b'[1.0, 2.0]',
])
def test_declines_what_it_cannot_vouch_for(body):
    assert loads_with_tensors(body, "gradients") is None


@pytest.mark.parametrize("body", [
    b'{"gradients": {"w[0]": [1.0]}}',  # brackets inside strings: simdjson's count of lists is off
    b'{"gradients": {"w": [1.0]}, "gradients": {"w": [2.0]}}',  # duplicate keys: orjson keeps the last
    b'{"gradients": {"w": [18446744073709551616]}}',  # orjson reads a number beyond uint64 as a float
    b'{"params": {"shape": [2], "b64": "AAAAAAAAAAA="}}',  # base64: orjson holds fewer copies
    b'{"params": {"b64": [1.0], "w": [2.0]}}',  # tensors named like base64's fields stay lists
    b'{"gradients": {"w": {"shape": [1], "b\\u0036\\u0034": "AAAAAA=="}}}',  # base64 behind escapes
])
def test_simdjson_declines_what_only_orjson_reads_exactly(body, reader):
    field = "params" if b'"params"' in body else "gradients"
    fast = loads_with_tensors(body, field)
    if reader == "simdjson":
        assert fast is None
    else:
        assert_same(fast, orjson_reference(body, field))


leaves = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-2**63, 2**63 - 1),
                   st.booleans(), st.none(), st.just("x"))
nested = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4), max_leaves=24)


@settings(max_examples=400, deadline=None)
@given(tensors=st.dictionaries(st.text(min_size=1, max_size=3), nested, min_size=1, max_size=3))
def test_never_disagrees_with_the_exact_path(tensors):
    """Whatever it accepts, it reads as orjson + numpy would; whatever numpy would refuse (ragged,
    mixed types), it declines."""
    body = orjson.dumps({"gradients": tensors})
    fast = loads_with_tensors(body, "gradients")
    if fast is None:
        return
    for name, value in tensors.items():
        got = fast["gradients"][name]
        if isinstance(value, list):
            reference = np.array(value, dtype=object)  # refuses nothing: ragged stays objects
            assert reference.dtype == object and all(type(x) in (int, float) for x in reference.flat)
            assert got.shape == reference.shape
            assert np.array_equal(got, reference.astype(np.float64))
        else:
            assert got == value and type(got) is type(value)


def test_large_tensor_shape_and_values():
    w = np.random.default_rng(0).standard_normal((300, 7)).astype(np.float32)
    body = orjson.dumps({"gradients": {"w": w}}, option=orjson.OPT_SERIALIZE_NUMPY)
    fast = loads_with_tensors(body, "gradients")
    assert fast["gradients"]["w"].shape == (300, 7)
    assert np.array_equal(fast["gradients"]["w"].astype(np.float32), w)  # float32 round-trips


async def _post_in_pieces(app, path: str, pieces: list[bytes], declared: int) -> tuple[int, bytes]:
    """A step whose body reaches the app in several ASGI messages, under a chosen Content-Length."""
    messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("test", 80),
             "client": ("test", 1), "headers": [(b"content-type", b"application/octet-stream"),
                                                (b"content-length", str(declared).encode())]}
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def test_a_body_in_pieces_is_assembled_and_a_miscounted_one_refused():
    from optim_service.app import create_app
    from optim_service.settings import Settings

    app = create_app(Settings(store="memory"))
    async with app.router.lifespan_context(app):
        session = await app.state.sessions.create(None, *_sgd_session(4))
        path = f"/v1/sessions/{session.id}/step"
        body = np.ones(4, "<f4").tobytes()
        status, answer = await _post_in_pieces(app, path, [body[:5], body[5:11], body[11:]], len(body))
        assert status == 200 and orjson.loads(answer)["params"] == [-1.0] * 4
        status, answer = await _post_in_pieces(app, path, [body[:8], body[8:]], len(body) - 4)
        assert status == 422 and b"longer than its Content-Length" in answer
        status, answer = await _post_in_pieces(app, path, [body[:8], body[8:12]], len(body))
        assert status == 422 and b"ended after 12 of its 16 declared bytes" in answer
        status, answer = await _post_in_pieces(app, path, [body], len(body))  # whole, in one message
        assert status == 200 and orjson.loads(answer)["params"] == [-2.0] * 4


def _sgd_session(size: int):
    from optim_service.optim.config import TrainingConfig
    from optim_service.record import Layout

    config = TrainingConfig.model_validate({"optimizer": {"type": "sgd", "lr": 1.0}})
    return config, Layout(("",), ((size,),), "float32", "array"), [np.zeros(size, np.float32)]
