"""The JSON fast path's guard: it vouches for a body only when no string, boolean or null can hide
among the numbers, and the exact check still refuses what it lets through to numpy."""

import orjson
import pytest

from optim_service.api.wire import numbers_only


@pytest.mark.parametrize("doc,plain", [
    ({"gradients": {"w": [1.0, 2.5, -3]}}, True),
    ({"gradients": {"w": [[1.0, 2.0], [3.0, 4.0]]}, "loss": 0.5}, True),
    ({"gradients": {"true_null_false": [1.0]}}, True),  # the words inside a key are accounted for
    ({"gradients": {"w": {"shape": [1], "b64": "nullAAA="}}}, True),
    ({"gradients": {"w": [1.0, True]}}, False),
    ({"gradients": {"w": [1.0, None]}}, False),
    ({"gradients": {"w": [1.0, "2.0"]}}, False),
    ({"gradients": {"w": [1.0, False], "b": "false"}}, False),
    ({"gradients": {'quo"te': [1.0]}}, False),  # an escaped quote: unsure, so the exact path runs
])
def test_numbers_only(doc, plain):
    body = orjson.dumps(doc)
    assert numbers_only(body, orjson.loads(body)) is plain
