"""``create_app(settings)``: the FastAPI application, its store built in the lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import State
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from . import __version__, history
from .api import problems
from .api.auth import KeyRing, Tenant
from .api.responses import JSONResponse
from .api.routers import health, optimizers, sessions, shm
from .api.methods import HeadAsGet
from .api.steplane import StepLane
from .api.routers import metrics as metrics_router
from .api.schemas import DOCUMENTED, CreateSession, RegionCreate, SharedMemoryStep, StepRequest
from .optim.config import warm_kernels, warm_team
from .observability import MeteredStore, Metrics, RequestContextMiddleware
from .ratelimit import Unlimited, open_limiter
from .sessions import KERNEL_THREAD, SessionService
from .settings import Settings
from .shm import Regions, warm as warm_shm
from .store import MemoryStore, StoreUnavailable, open_store, redact

logger = logging.getLogger("optim_service")
CORS_REQUEST_HEADERS = ("Authorization", "Content-Type", "Accept", "If-Match", "Idempotency-Key", "X-Request-ID",
                        "Prefer", "Optim-Wire-Dtype", "Optim-Worker", "Optim-Weight", "Optim-Round",
                        "Optim-Base-Step")
CORS_RESPONSE_HEADERS = ("ETag", "Location", "Server-Timing", "X-Request-ID", "Retry-After",
                         "Idempotent-Replayed", "Optim-Step-Skipped", "Preference-Applied", "Optim-Wire-Dtype")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    keys = KeyRing(settings.key_list())
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.fused_kernels:  # no compile stall on a first request
            logger.info("preparing the numba kernels (a first start compiles them, ~10 s; later starts "
                        "load them from numba's cache)")
            started = time.perf_counter()
            # on the thread that runs large updates, so that its thread team exists before a step
            await asyncio.get_running_loop().run_in_executor(KERNEL_THREAD, warm_kernels)
            await asyncio.get_running_loop().run_in_executor(KERNEL_THREAD, history.warm)
            warm_team()  # this thread's, for the updates too small to hand over
            logger.info("kernels ready in %.1f s", time.perf_counter() - started)
        if settings.shm:  # a large step's copies through a mapped region, on the thread that makes them
            await asyncio.get_running_loop().run_in_executor(KERNEL_THREAD, warm_shm)
        store = open_store(settings.store, settings.session_ttl_seconds, settings.cache_bytes,
                           settings.store_timeout_seconds, settings.redis_wait_replicas)
        if not isinstance(store, MemoryStore):  # its calls never wait: timing them would only slow them
            store = MeteredStore(store, metrics.store_seconds)
        await _report_store(store, settings)
        app.state.sessions = SessionService(store, settings)
        app.state.sessions.round_latency = metrics.round_seconds.observe
        # every caller when API keys are off (None when on: each request authenticates, caller_of)
        app.state.anonymous = None if keys.enabled else Tenant(None, app.state.sessions)
        app.state.limiter = (open_limiter(settings.store, settings.rate_limit_per_second, settings.rate_limit_burst,
                                          settings.store_timeout_seconds)
                             if keys.enabled else Unlimited())
        sweeper = asyncio.create_task(_sweep_forever(store, app.state.sessions, settings.sweep_interval_seconds))
        try:
            yield
        finally:
            sweeper.cancel()
            await app.state.limiter.close()
            await store.close()
            app.state.regions.close()

    app = ServiceApp(
        title="optim-service",
        version=__version__,
        summary="Adam, AdamW, RMSProp, Adagrad and SGD over HTTP, numerically identical to torch.optim",
        default_response_class=JSONResponse,
        lifespan=lifespan,
        redirect_slashes=False,  # its 307 built the Location from the Host header; a 404 says enough
        docs_url=None,  # served below from local assets: no CDN is reachable from every deployment
        redoc_url=None,
        openapi_url="/openapi.json" if settings.expose_docs else None,
        # Prometheus and JSON logs are this service's telemetry; FastAPI's OpenTelemetry hooks
        # would otherwise look up their providers (and the environment) on every request
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.outer_middleware = [
        Middleware(StepLane, service=app, metrics=metrics, cors=bool(settings.cors_origins)),  # answers steps
        Middleware(RequestContextMiddleware, metrics=metrics),  # sees every other answer
        Middleware(HeadAsGet)]  # (inside the access log, which names the method asked)
    if settings.cors_origins:
        app.outer_middleware.append(Middleware(
            CORSMiddleware, allow_origins=[o.strip() for o in settings.cors_origins.split(",") if o.strip()],
            allow_methods=["GET", "POST", "DELETE"], allow_headers=list(CORS_REQUEST_HEADERS),
            expose_headers=list(CORS_RESPONSE_HEADERS), max_age=600))
    app.state.settings = settings
    app.state.keys = keys
    app.state.metrics = metrics
    problems.install(app)
    app.state.regions = Regions(settings.shm_dir, settings.shm, settings.shm_regions_per_key)
    for module in (sessions, optimizers, shm):
        app.include_router(module.router)  # each route authenticates through its Caller
    app.include_router(health.router)
    if settings.expose_metrics:
        app.include_router(metrics_router.router)
    if settings.expose_docs:
        _serve_docs(app)
    if settings.expose_dashboard:
        _serve_dashboard(app)
    _document_bodies(app)
    return app


def serve_app():
    """``optim-service serve``'s app for uvicorn: ``create_app()`` as it runs (``ServiceApp.entry``)."""
    return create_app().entry()


class ServiceApp(FastAPI):
    """FastAPI with this service's middlewares (``outer_middleware``, outermost first) around
    Starlette's whole stack instead of inside its error and telemetry layers. The outermost, the step lane, answers
    a step there, so a step crosses one wrapper, not eight, each way: at ~100 µs of server time for
    a small step, every one of them showed (bench/wire.py). A bug still answers 500, from uvicorn
    instead of Starlette's error middleware."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.outer_middleware: list[Middleware] = []
        self.state = AppState()

    def entry(self):
        """What a server runs: the middleware stack itself, whose outermost layer, the step lane,
        sets ``scope["app"]`` (this app's ``__call__``, which is only that, costs a request a
        coroutine). Under a root path, the app, which sets it."""
        if self.root_path:
            return self
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        return self.middleware_stack

    def build_middleware_stack(self):
        app = super().build_middleware_stack()
        for cls, args, kwargs in reversed(self.outer_middleware):
            app = cls(app, *args, **kwargs)
        return app

    async def __call__(self, scope, receive, send):
        # FastAPI's and Starlette's own __call__ only pick the telemetry wrapper (off) and set
        # scope["app"] on the way to this stack, which the step lane does: two calls a request
        if scope["type"] != "http" or self.root_path:
            return await super().__call__(scope, receive, send)
        await self.entry()(scope, receive, send)


class AppState(State):
    """``app.state`` with its values as plain attributes too: Starlette's State keeps them only in a
    dict behind ``__getattr__``, a Python call on every read (a step makes five)."""

    def __setattr__(self, key, value) -> None:
        object.__setattr__(self, key, value)
        self._state[key] = value

    def __delattr__(self, key) -> None:
        object.__delattr__(self, key)
        del self._state[key]


async def _report_store(store, settings: Settings) -> None:
    """One line naming the store (no password) and whether it answers: a store that does not is
    not fatal (it may come up later; /readyz tells), but the operator should know now."""
    try:
        async with asyncio.timeout(settings.readyz_timeout_seconds * 2):
            await store.ping()
        logger.info("store %s answers", redact(settings.store))
    except (StoreUnavailable, TimeoutError) as e:
        logger.warning("store %s does not answer yet (%s); /readyz answers 503 until it does",
                       redact(settings.store), e or "no answer in time")


async def _sweep_forever(store, sessions: SessionService, interval: float) -> None:
    """Reclaim expired sessions; reads already treat them as gone, this frees their space (and the
    warm copies this process kept of them)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await store.sweep()
            await sessions.prune_warm()
        except Exception:  # a store hiccup must not end the sweeper; the next round retries
            logger.exception("sweeping expired sessions failed")


def _serve_docs(app: FastAPI) -> None:
    """Swagger UI at /docs with its assets from the fastapi-offline package, not a CDN."""
    app.mount("/docs-static", StaticFiles(directory=Path(fastapi_offline.__file__).parent / "static"),
              name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="optim-service — API",
            swagger_js_url="/docs-static/swagger-ui-bundle.js", swagger_css_url="/docs-static/swagger-ui.css",
            swagger_favicon_url="/docs-static/favicon.png")


STATIC = Path(__file__).parent / "static"


def _serve_dashboard(app: FastAPI) -> None:
    """/dashboard: a page of static assets (uPlot vendored, no CDN) that reads the API with the
    caller's key, so it shows exactly what that key may see."""
    app.mount("/dashboard-static", StaticFiles(directory=STATIC), name="dashboard-static")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse((STATIC / "dashboard.html").read_text())


def _document_bodies(app: FastAPI) -> None:
    """Routes parse their bodies with orjson themselves; publish the body models in the OpenAPI doc."""
    base = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = base()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (CreateSession, StepRequest, SharedMemoryStep, RegionCreate, *DOCUMENTED):
                doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(doc.pop("$defs", {}))
                components[model.__name__] = doc
        return app.openapi_schema

    app.openapi = openapi
