"""/v1/shm/regions: shared-memory regions a client on the server's host registers, so that steps
name where their gradients lie and where their answer goes instead of sending the bytes
(``optim_service.shm``; off unless ``OPTIM_SHM=true``)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ..deps import Caller
from ..negotiation import parse_json, request_body
from ..responses import JSONResponse
from ..schemas import PROBLEMS, RegionCreate, RegionInfo, RegionStatus, _problem

router = APIRouter(prefix="/v1/shm/regions", tags=["shared memory"])
OFF = {403: _problem("shared-memory regions are off on this server (OPTIM_SHM)")}
UNKNOWN = {404: _problem("no region of this name is registered with this API key"), **OFF, **PROBLEMS}


@router.post("", status_code=201, responses={201: {"description": "registered", "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/RegionInfo"}}}},
    409: _problem("a region of this name is registered already"), **OFF, **PROBLEMS},
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/RegionCreate"},
        "example": {"name": "grads", "key": "/my-model-grads", "offset": 0, "byte_size": 4000}}}}},
    summary="Register a region of a /dev/shm file")
async def register(request: Request, caller: Caller) -> JSONResponse:
    state = request.app.state
    body = parse_json(await request_body(request), RegionCreate, "-", state.settings.max_json_depth)
    region = state.regions.register(caller.owner, body.name, body.key, body.offset, body.byte_size)
    return JSONResponse(region.document(), status_code=201, headers={"Location": f"/v1/shm/regions/{region.name}"})


@router.get("", response_model=list[RegionInfo], responses={**OFF, **PROBLEMS},
            summary="The regions this API key registered")
async def list_regions(request: Request, caller: Caller) -> list[dict]:
    return [r.document() for r in request.app.state.regions.list(caller.owner)]


@router.get("/{name}", response_model=RegionStatus, responses=UNKNOWN,
            summary="A region, and whether its file still holds it")
async def region_status(name: str, request: Request, caller: Caller) -> dict:
    return request.app.state.regions.status(caller.owner, name)


@router.delete("/{name}", status_code=204, responses=UNKNOWN, summary="Unregister a region (its file stays)")
async def unregister(name: str, request: Request, caller: Caller) -> Response:
    request.app.state.regions.unregister(caller.owner, name)
    return Response(status_code=204)
