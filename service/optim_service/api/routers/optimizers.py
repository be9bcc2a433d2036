"""/v1/optimizers: the catalogue, with every hyperparameter's default and constraints."""

from __future__ import annotations

from fastapi import APIRouter

from ...optim import OPTIMIZERS
from ..deps import Caller
from ..schemas import PROBLEMS, OptimizerInfo

router = APIRouter(prefix="/v1/optimizers", tags=["optimizers"])


def catalogue() -> list[dict]:
    out = []
    for name, opt in OPTIMIZERS.items():
        schema = opt.hyperparameters.model_json_schema()["properties"]
        hps = {}
        for field, info in opt.hyperparameters.model_fields.items():
            if info.exclude:
                continue
            entry = {k: v for k, v in schema[field].items() if k not in ("title",)}
            entry["default"] = list(info.default) if isinstance(info.default, tuple) else info.default
            hps[field] = entry
        buffers = list(opt.state_type._fields)
        out.append({"type": name, "summary": opt.summary, "hyperparameters": hps, "state_buffers": buffers,
                    "buffer_shapes": {b: opt.shapes.get(b, "param") for b in buffers},
                    "torch": f"torch.optim.{opt.torch}" if opt.torch else None})
    return out


@router.get("", response_model=list[OptimizerInfo], responses=PROBLEMS,
            summary="Every optimizer with its hyperparameters, defaults and state buffers")
async def list_optimizers(_: Caller) -> list[dict]:
    return catalogue()


