"""Metrics (Prometheus, one registry per app) and JSON logs that carry a request id.

Nothing here sees a body, a tensor or an Authorization header: the access log has method, path,
status, duration and the request id, which is taken from ``X-Request-ID`` or made, and sent back.
"""

from __future__ import annotations

import bisect
import contextvars
import itertools
import logging
import random
import re
import time

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from .store.base import StoreWrapper

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
access_log = logging.getLogger("optim_service.access")
_REQUEST_ID = re.compile(r"^[\w.:@/+=-]{1,128}$")
# Our lines name no caller, thread or process: not collecting them is the logging HOWTO's own
# optimisation. With the orjson formatter it took the access log from 60-100 µs of server CPU per
# small step (/proc CPU time, log level info against warning) to within the noise.
logging._srcfile = None
logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


class Histogram:
    """A labelled histogram exported through prometheus-client's custom-collector interface. A
    child's ``observe`` is a bisect and two additions, where prometheus-client's takes a lock per
    counter it touches: a step observes three to five of them, all on the event loop's thread."""

    def __init__(self, name: str, documentation: str, labelnames, buckets, registry: CollectorRegistry):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.bounds = tuple(buckets)
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = HistogramChild(self.bounds)
        return child

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [*map(floatToGoString, self.bounds), "+Inf"]
        for values, child in self._children.items():
            family.add_metric(list(values), list(zip(edges, itertools.accumulate(child.counts))), child.sum)
        yield family


class HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bound >= value
        self.sum += value


class Metrics:
    def __init__(self) -> None:
        self._series: dict[tuple, tuple] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.step_seconds = Histogram(
            "optim_step_duration_seconds", "Step requests, from body read to answer",
            ["optimizer", "wire"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram(
            "optim_compute_duration_seconds", "The update itself (Server-Timing: compute)",
            ["optimizer"], buckets=LATENCY_BUCKETS, registry=r)
        self.steps = Counter("optim_steps", "Steps answered, by outcome (applied, skipped, replayed)",
                             ["optimizer", "outcome"], registry=r)
        self.errors = Counter("optim_http_errors", "Answers with status >= 400", ["status"], registry=r)
        self.sessions = Gauge("optim_sessions", "Live sessions in the store", registry=r)
        self.store_seconds = Histogram("optim_store_operation_duration_seconds", "Store calls",
                                       ["operation"], buckets=LATENCY_BUCKETS, registry=r)
        self.rounds = Counter("optim_rounds_committed", "Synchronous rounds committed", registry=r)
        self.in_place = Counter("optim_updates_in_place", "Steps whose update wrote the stored state in place "
                                "(proven safe); the rest wrote a working copy", registry=r)
        self.contributions = Counter("optim_contributions", "Contributions to rounds, by outcome (accepted into "
                                     "an open round, committed a round, replayed)", ["outcome"], registry=r)
        self.round_seconds = Histogram("optim_round_duration_seconds", "From a round's first contribution to its "
                                       "commit", [], buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800),
                                       registry=r).labels()
        self.staleness = Histogram("optim_staleness_steps", "Staleness of asynchronous pushes (steps)", [],
                                   buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128), registry=r).labels()

    def step_series(self, optimizer: str, outcome: str, wire: str):
        """The labelled children a step updates (looking labels up costs more than updating them)."""
        key = (optimizer, outcome, wire)
        if key not in self._series:
            self._series[key] = (self.steps.labels(optimizer, outcome), self.compute_seconds.labels(optimizer),
                                 self.step_seconds.labels(optimizer, wire))
        return self._series[key]


class MeteredStore(StoreWrapper):
    """Times every coroutine method of the store it wraps, by method name."""

    def __init__(self, inner, histogram: Histogram):
        super().__init__(inner)
        self._histogram = histogram

    def wrap(self, name: str, attr):
        observe = self._histogram.labels(name).observe

        async def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                observe(time.perf_counter() - started)

        return timed


_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC), level, logger, message, then the record's ``extra``
    fields, the request id among them. python-json-logger took ~17 µs an access line here, this
    takes ~8, most of it logging's own record and handler: a small step's whole budget is ~100."""

    _second, _stamp = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self._time(record.created), "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        doc.update((k, v) for k, v in record.__dict__.items() if k not in _RECORD_FIELDS)
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()

    def _time(self, created: float) -> str:
        """ISO 8601 in UTC to the millisecond; the seconds are formatted once per second (4 µs)."""
        second = int(created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def logging_config(level: str) -> dict:
    """dictConfig for uvicorn and the service: one JSON object a line on stderr."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json",
                                "filters": ["request_id"], "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
            "optim_service": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
        },
    }


def request_id_of(given: str | None) -> str:
    """The client's ``X-Request-ID`` when it is a sane one, else 128 random bits, made without a
    system call: a request id correlates log lines, it guards nothing (a client may send its own)."""
    return given if given and _REQUEST_ID.match(given) else f"{random.getrandbits(128):032x}"


def request_done(metrics: Metrics, scope, status: int, started: float) -> None:
    """A request's error count (4xx and 5xx) and its access-log line, once its answer is sent."""
    if status >= 400:
        metrics.errors.labels(str(status)).inc()
    access_log.info("request", extra={
        "method": scope["method"], "path": scope["path"], "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1e3, 3),
    })


class RequestContextMiddleware:
    """Request id in and out, one access-log line per request, and the error counter (the step
    lane, outside it, does the same for the steps it answers)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = request_id_of(dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1"))
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        def send_with_id(message):  # returns send's awaitable: a coroutine of its own cost a step µs a message
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            return send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_done(self.metrics, scope, status, started)
            request_id_var.reset(token)
