"""Request bodies. Tensors are typed ``Any`` here and decoded by ``wire`` against the session layout."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..optim.base import Float
from ..optim.config import TrainingConfig

TENSOR_SCHEMA = {
    "oneOf": [
        {"type": "number"},
        {"type": "array", "description": "nested lists of numbers; the shape comes from the nesting"},
        {"type": "object", "required": ["shape", "b64"], "additionalProperties": False,
         "properties": {"shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                        "b64": {"type": "string", "description": "base64 of little-endian values in the session dtype, C order"}}},
    ]
}
TENSORS_SCHEMA = {
    "description": "one unnamed tensor (a JSON array or a b64 object), or an object of named tensors",
    "oneOf": [{"type": "array"}, {"type": "object", "additionalProperties": TENSOR_SCHEMA}],
}
Tensors = Annotated[Any, Field(json_schema_extra=TENSORS_SCHEMA)]


class RestoredState(BaseModel):
    """The optimizer state of a checkpoint: the step count and torch-named buffers per tensor."""

    model_config = ConfigDict(extra="forbid")

    step: Annotated[int, Field(ge=0, strict=True)]
    buffers: Annotated[Any, Field(json_schema_extra={"type": "object"})] = None


class CreateSession(TrainingConfig):
    """A new session, or (with ``state``) a checkpoint from ``GET /v1/sessions/{id}/state`` resumed."""

    params: Tensors
    dtype: Literal["float32", "float64"] = "float32"
    state: RestoredState | None = None
    schema_version: Literal[1] | None = None

    def training_config(self) -> TrainingConfig:
        return TrainingConfig.model_validate(self.model_dump(include=set(TrainingConfig.model_fields)))


class StepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gradients: Tensors
    loss: Annotated[Float, Field(allow_inf_nan=False)] | None = None


EXAMPLE_CREATE = {
    "optimizer": {"type": "adam", "lr": 0.001},
    "params": {"w": [[0.5, -0.2], [0.1, 0.3]], "b": [0.0, 0.0]},
    "dtype": "float64",
    "schedule": {"type": "inverse_sqrt"},
}
EXAMPLE_STEP = {"gradients": {"w": [[0.1, -0.1], [0.2, 0.0]], "b": [0.05, -0.05]}, "loss": 0.42}
