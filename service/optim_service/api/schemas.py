"""Request bodies. Tensors are typed ``Any`` here and decoded by ``wire`` against the session layout."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
GRADIENTS_SCHEMA = {
    "description": TENSORS_SCHEMA["description"] + "; a named tensor's gradient may be null: that tensor "
    "skips this step, as torch skips a parameter whose .grad is None",
    "oneOf": [{"type": "array"}, {"type": "object", "additionalProperties": {
        "oneOf": [*TENSOR_SCHEMA["oneOf"], {"type": "null"}]}}],
}
Gradients = Annotated[Any, Field(json_schema_extra=GRADIENTS_SCHEMA)]


def _an_object(schema: dict) -> None:
    """Documented as an object; its null default is not part of the document (an object schema
    defaulting to null fails OpenAPI validation)."""
    schema.pop("default", None)
    schema["type"] = "object"


class RestoredState(BaseModel):
    """The optimizer state of a checkpoint: the step count and torch-named buffers per tensor."""

    model_config = ConfigDict(extra="forbid")

    step: Annotated[int, Field(ge=0, strict=True)]
    buffers: Annotated[Any, Field(json_schema_extra=_an_object)] = None
    tensor_steps: dict[str, Annotated[int, Field(ge=0, strict=True)]] | None = Field(
        None, description="each named tensor's own count of updates, where some skipped steps (null gradients)")
    schedule_state: dict[str, Any] | None = Field(None, description="reduce_on_plateau's state")


class CreateSession(TrainingConfig):
    """A new session, or (with ``state``) a checkpoint from ``GET /v1/sessions/{id}/state`` resumed."""

    params: Tensors
    dtype: Literal["float32", "float64"] = "float32"
    state: RestoredState | None = None
    schema_version: Literal[1] | None = None

    @field_validator("dtype", mode="before")
    @classmethod
    def _half_travels_on_the_wire(cls, value):
        if isinstance(value, str) and value.lower() in ("float16", "bfloat16", "half"):
            raise ValueError(
                f"a session keeps float32 or float64 state (the master copy); {value} belongs on the wire: send "
                'tensors as {"shape", "dtype": "bfloat16", "b64"}, or octet-stream with the header '
                "Optim-Wire-Dtype: bfloat16, to a float32 session")
        return value

    def training_config(self) -> TrainingConfig:
        return TrainingConfig.model_validate(self.model_dump(include=set(TrainingConfig.model_fields)))


class StepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gradients: Gradients
    loss: Annotated[Float, Field(allow_inf_nan=False)] | None = None
    worker: Annotated[str, Field(min_length=1, max_length=128, description="who contributes (sync rounds)")] | None = None
    weight: Annotated[Float, Field(gt=0, allow_inf_nan=False, description="a contribution's weight, e.g. its "
                                   "number of examples (sync rounds, weighting: weighted)")] | None = None
    round: Annotated[int, Field(ge=0, strict=True, description="the round this was computed for")] | None = None
    base_step: Annotated[int, Field(ge=0, strict=True, description="the step whose params this gradient was "
                                    "computed on (async)")] | None = None


class RegionRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    region: Annotated[str, Field(min_length=1, max_length=128, description="a registered region's name")]
    offset: Annotated[int, Field(ge=0, strict=True, description="bytes into the region")] = 0
    byte_size: Annotated[int, Field(ge=1, strict=True, description="default: the session's parameters' bytes "
                                    "(for gradients, the rest of the region)")] | None = None


class SharedMemoryStep(BaseModel):
    """A step whose gradients lie in a shared-memory region (every tensor's values concatenated in
    creation order, little-endian, in the session's dtype: the binary body's layout), and whose
    answer may be written into one (``params``) instead of the body."""

    model_config = ConfigDict(extra="forbid")

    gradients: RegionRef
    params: RegionRef | None = None
    loss: Annotated[Float, Field(allow_inf_nan=False)] | None = None
    worker: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    weight: Annotated[Float, Field(gt=0, allow_inf_nan=False)] | None = None
    round: Annotated[int, Field(ge=0, strict=True)] | None = None
    base_step: Annotated[int, Field(ge=0, strict=True)] | None = None


class RegionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=128, description="what steps call it")]
    key: Annotated[str, Field(min_length=1, max_length=256, description="the /dev/shm file, as shm_open names "
                              "it ('/name')")]
    offset: Annotated[int, Field(ge=0, strict=True, description="where the region starts in the file")] = 0
    byte_size: Annotated[int, Field(ge=1, strict=True)]


class RegionInfo(BaseModel):
    name: str
    key: str
    offset: int
    byte_size: int


class RegionStatus(RegionInfo):
    status: Literal["ready", "short"] = Field(description="short: its file was shrunk below the region")
    file_bytes: int


EXAMPLE_CREATE = {
    "optimizer": {"type": "adam", "lr": 0.001},
    "params": {"w": [[0.5, -0.2], [0.1, 0.3]], "b": [0.0, 0.0]},
    "dtype": "float64",
    "schedule": {"type": "inverse_sqrt"},
}
EXAMPLE_STEP = {"gradients": {"w": [[0.1, -0.1], [0.2, 0.0]], "b": [0.05, -0.05]}, "loss": 0.42}


# --- responses, for the OpenAPI document (and so schemathesis can check every answer) -----------

INFO_EXAMPLE = {
    "id": "f_joPwoJg9ouOaD6w5TJvA", "step": 12,
    "optimizer": {"type": "adam", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                  "amsgrad": False, "maximize": False, "decoupled_weight_decay": False},
    "dtype": "float32", "shapes": {"w": [2, 2], "b": [2]}, "num_parameters": 6,
    "schedule": {"type": "inverse_sqrt"}, "clip_grad_norm": None, "param_groups": [], "nan_policy": "error",
    "aggregation": {"mode": "each"},
    "loss": 0.42, "skipped_steps": 0,
    "created_at": "2026-11-24T17:57:32.772250Z", "updated_at": "2026-11-24T18:02:11.104519Z",
}
PARAMS_EXAMPLE = {"w": [[0.499, -0.199], [0.101, 0.299]], "b": [-0.001, 0.001]}


def _examples(*examples) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


class Problem(BaseModel):
    """RFC 9457 problem details; ``detail`` says what to change."""

    model_config = _examples({"type": "about:blank", "title": "Invalid request", "status": 422,
                              "detail": "gradient 'w': expected shape [2, 2], got [1, 2]"})

    type: str = "about:blank"
    title: str
    status: int
    detail: str


class SessionInfo(BaseModel):
    model_config = _examples(INFO_EXAMPLE)

    id: str
    step: int
    optimizer: dict[str, Any]
    dtype: Literal["float32", "float64"]
    shapes: Annotated[Any, Field(json_schema_extra={"description": "a shape list, or name → shape"})]
    num_parameters: int
    schedule: dict[str, Any] | None
    clip_grad_norm: dict[str, Any] | None
    param_groups: list[dict[str, Any]]
    nan_policy: Literal["error", "skip"]
    aggregation: dict[str, Any]
    loss: float | None
    skipped_steps: int
    next_lr: list[float] | None = Field(None, description="the lr each param group takes on the next step")
    created_at: str
    updated_at: str


class CreatedSession(SessionInfo):
    model_config = _examples({**INFO_EXAMPLE, "step": 0, "params": PARAMS_EXAMPLE})

    params: Tensors


class StepAnswer(BaseModel):
    model_config = _examples({"step": 13, "params": PARAMS_EXAMPLE})

    step: int
    params: Tensors
    grad_norm: float | None = None
    skipped: bool | None = None
    round: int | None = Field(None, description="the synchronous round this step committed")
    lr_scale: float | None = Field(None, description="an asynchronous push's staleness scale of the lr")
    staleness: int | None = Field(None, description="an asynchronous push's staleness, in steps")


class ParamsAnswer(BaseModel):
    model_config = _examples({"step": 13, "params": PARAMS_EXAMPLE})

    step: int
    params: Tensors


class SessionPage(BaseModel):
    model_config = _examples({"sessions": [INFO_EXAMPLE], "next": None})

    sessions: list[SessionInfo]
    next: str | None


class OptimizerInfo(BaseModel):
    model_config = _examples({"type": "adagrad", "summary": "θ ← θ − η/(1+(t−1)·lr_decay) · g / (√Σg² + ε)",
                              "hyperparameters": {"lr": {"default": 0.01, "type": "number"}},
                              "state_buffers": ["sum"], "buffer_shapes": {"sum": "param"},
                              "torch": "torch.optim.Adagrad"})

    type: str
    summary: str
    hyperparameters: dict[str, dict[str, Any]]
    state_buffers: list[str]
    buffer_shapes: dict[str, Literal["param", "scalar", "row", "column"]] = Field(
        description="how each buffer's shape follows its parameter's: the same, one number, or a "
                    "matrix's row or column factor (Adafactor)")
    torch: str | None = Field(description="the torch.optim class it equals; null beyond torch")


def _problem(description: str) -> dict:
    return {"description": description,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}


PROBLEMS = {
    401: _problem("missing or invalid API key (when keys are configured)"),
    413: _problem("body over OPTIM_MAX_BODY_BYTES"),
    422: _problem("invalid input; nothing was changed"),
    429: _problem("rate limit, or a session cap"),
    503: _problem("the session store is unreachable; nothing was changed"),
}
SESSION_PROBLEMS = {404: _problem("no such session (or not yours)"), **PROBLEMS}
STEP_PROBLEMS = {
    **SESSION_PROBLEMS,
    406: _problem("Accept names neither JSON nor octet-stream"),
    409: _problem("an Idempotency-Key's answer is gone, or the session kept changing"),
    412: _problem("If-Match names another step"),
    403: _problem("a shared-memory step on a server with regions off (OPTIM_SHM)"),
    415: _problem("Content-Type is not JSON, octet-stream, safetensors or the shared-memory step's"),
}


def answers(model: type[BaseModel], binary: bool = False, status: int = 200) -> dict:
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if binary:
        for media in ("application/octet-stream", "application/vnd.safetensors"):
            content[media] = {"schema": {"type": "string", "format": "binary"}}
    return {status: {"description": "OK", "content": content}}


class HistoryEntry(BaseModel):
    """One step: what the loss curve and the diagnosis read."""

    step: int
    time: float
    loss: float | None
    lr: list[float] = Field(description="the learning rate each param group used (the optimizer's own first)")
    grad_norm: float | None = Field(description="the gradients' L2 norm before clipping")
    clipped: bool
    skipped: bool
    worker: str | None
    ratio: dict[str, float | None] | None = Field(None, description="per tensor, RMS(update) / RMS(param)")
    u: list[float] | None = Field(None, description="a 16-number sketch of the update's direction")


class HistoryAnswer(BaseModel):
    history: list[HistoryEntry]


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to_step: Annotated[int, Field(ge=0, strict=True, description="the step whose state to restore")]


class ForkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    optimizer: dict[str, Any] | None = Field(None, description="hyperparameters to override, e.g. {\"lr\": 0.01}")


class DiagnosisAnswer(BaseModel):
    verdict: Literal["diverging", "oscillating", "too_slow", "plateau", "healthy", "not_enough_data"]
    evidence: dict[str, Any] = Field(description="the numbers the rule read")
    suggestion: str


class RoundInfo(BaseModel):
    """A synchronous round: its number (it commits as step round + 1), contributions so far and needed."""

    round: int
    received: int
    needed: int
    workers: list[str]
    opened_at: float | None = Field(description="when its first contribution came (Unix seconds)")
    deadline: float | None = Field(description="when it commits with min_contributions (Unix seconds)")


DOCUMENTED = (Problem, SessionInfo, CreatedSession, StepAnswer, ParamsAnswer, SessionPage, OptimizerInfo, RoundInfo,
              HistoryEntry, HistoryAnswer, DiagnosisAnswer)
