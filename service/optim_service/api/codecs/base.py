"""What every codec is: it reads a step's body and writes a session's parameters."""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol


class StepBody(NamedTuple):
    decode: Callable  # Session -> the gradients, one per tensor (None: skipped), checked against its layout
    loss: float | None
    encodings: dict[str, str]  # how each tensor came, so a JSON answer mirrors it
    contribution: dict = {}  # worker, weight, round, base_step where the body says them (JSON)


class Codec(Protocol):
    media_type: str

    def read_step(self, body, headers, max_json_depth: int) -> StepBody:
        """The step's gradients (decoded against a session when it is loaded), loss and encodings."""

    def write_params(self, session, wire: str | None, encodings, extra: dict) -> bytes | memoryview:
        """The session's parameters (and ``extra`` fields where the format has room) as a body,
        in ``wire`` dtype or the session's own."""
