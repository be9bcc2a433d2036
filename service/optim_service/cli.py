"""``optim-service``: serve the API, manage sessions on a running server, write the OpenAPI spec."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .observability import logging_config
from .settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optim-service", description=__doc__)
    parser.add_argument("--version", action="version", version=f"optim-service {__version__}")
    _client_flags(parser, os.environ.get("OPTIM_URL", "http://127.0.0.1:8000"), os.environ.get("OPTIM_API_KEY"))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="bind address (OPTIM_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (OPTIM_PORT, default 8000)")
    serve.add_argument("--store", help="memory | sqlite:///path | redis://host:port/db (OPTIM_STORE)")
    serve.add_argument("--workers", type=int, help="worker processes (OPTIM_WORKERS, default 1)")
    serve.set_defaults(run=_serve)

    sessions = commands.add_parser("sessions", help="list, show or delete sessions on a running server")
    _client_flags(sessions)
    actions = sessions.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="this key's sessions, one a line")
    listing.add_argument("--limit", type=int, default=None, help="at most this many (default: all)")
    show = actions.add_parser("show", help="one session's metadata as JSON")
    show.add_argument("session_id")
    delete = actions.add_parser("delete", help="delete sessions")
    delete.add_argument("session_ids", nargs="+")
    watch = actions.add_parser("watch", help="follow a session's steps as they land (Ctrl-C to stop)")
    watch.add_argument("session_id")
    watch.add_argument("--interval", type=float, default=1.0, help="seconds between looks (default 1)")
    for action in (listing, show, delete, watch):
        _client_flags(action)
        action.set_defaults(run=_sessions)

    spec = commands.add_parser("openapi", help="write the OpenAPI document (no server needed)")
    spec.add_argument("--output", "-o", help="file to write (default: standard output)")
    spec.set_defaults(run=lambda args: _openapi(args.output))
    return parser


def _client_flags(parser: argparse.ArgumentParser, url=argparse.SUPPRESS, key=argparse.SUPPRESS) -> None:
    """--url and --api-key, accepted before or after any subcommand (set only where given)."""
    parser.add_argument("--url", default=url, help="the server (OPTIM_URL, default http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=key, help="(OPTIM_API_KEY)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # `optim-service sessions list | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> int:
    print(f"optim-service: {message}", file=sys.stderr)
    return 2


def _serve(args) -> int:
    from pydantic import ValidationError

    from .store import check_url

    # Flags become OPTIM_* variables so every worker process builds the same Settings.
    for name in ("host", "port", "store", "workers"):
        if getattr(args, name) is not None:
            os.environ[f"OPTIM_{name.upper()}"] = str(getattr(args, name))
    try:
        settings = Settings()
    except ValidationError as e:
        return _fail("; ".join(f"OPTIM_{'_'.join(map(str, err['loc'])).upper()}: {err['msg']}" for err in e.errors()))
    try:
        check_url(settings.store)
    except ValueError as e:
        return _fail(str(e))
    if settings.workers > 1 and settings.store == "memory":
        return _fail("the memory store lives inside one process, so --workers > 1 would give each worker "
                     "its own sessions; use --store sqlite:///path or redis://...")
    if settings.workers > 1 and settings.shm:
        return _fail("OPTIM_SHM: a shared-memory region is registered with one process, so it needs --workers 1 "
                     "(each worker would know only the regions registered with it)")

    # Unbound, OpenMP's sleeping worker often wakes on the core its kernel thread runs on and a large
    # update takes twice as long. Bound, libgomp pins only the team: the thread that first runs a
    # kernel (the kernel thread) and its workers, each to its own core (docs/performance.md).
    os.environ.setdefault("OMP_PROC_BIND", "true")

    import uvicorn

    uvicorn.run(
        "optim_service.app:serve_app", factory=True, host=settings.host, port=settings.port,
        workers=settings.workers, log_level=settings.log_level,
        log_config=logging_config(settings.log_level), access_log=False,  # ours has the request id
        proxy_headers=False,  # nothing here reads the client's address: one layer less on every request
        server_header=False,  # no "server: uvicorn": it tells a scanner what to try, and costs every answer
        http="optim_service.api.connection:LimitedHttpProtocol",  # limits before any request is read
    )
    return 0


def _openapi(output: str | None) -> int:
    from .app import create_app

    text = json.dumps(create_app(Settings(store="memory")).openapi(), indent=2, ensure_ascii=False)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


def _sessions(args) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=30) as http:
        try:
            if args.action == "list":
                _list(http, args.limit)
            elif args.action == "watch":
                _watch(http, args.session_id, args.interval)
            elif args.action == "show":
                print(json.dumps(_ok(http.get(f"/v1/sessions/{args.session_id}")), indent=2))
            else:
                for session_id in args.session_ids:
                    _ok(http.delete(f"/v1/sessions/{session_id}"))
                    print(f"deleted {session_id}")
            return 0
        except httpx.HTTPError as e:
            print(f"optim-service: cannot reach {args.url}: {e}", file=sys.stderr)
        except _Refused as e:
            print(f"optim-service: {e}", file=sys.stderr)
        return 1


def _list(http, limit: int | None) -> None:
    after, shown = None, 0
    while limit is None or shown < limit:
        page_size = 1000 if limit is None else min(1000, limit - shown)
        page = _ok(http.get("/v1/sessions", params={"limit": page_size, **({"after": after} if after else {})}))
        if after is None:  # the header once the server has answered
            print(f"{'id':<24} {'optimizer':<9} {'step':>8} {'dtype':<8} {'parameters':>12} {'loss':>12} "
                  f"{'verdict':<15}  updated")
        for s in page["sessions"]:
            loss = "" if s["loss"] is None else f"{s['loss']:.6g}"
            verdict = _ok(http.get(f"/v1/sessions/{s['id']}/diagnosis"))["verdict"]
            print(f"{s['id']:<24} {s['optimizer']['type']:<9} {s['step']:>8} {s['dtype']:<8} "
                  f"{s['num_parameters']:>12} {loss:>12} {verdict:<15}  {s['updated_at']}")
        shown += len(page["sessions"])
        if not (after := page["next"]):
            return


def _watch(http, session_id: str, interval: float) -> None:
    """A line per step as it lands: step, loss, lr, gradient norm, median update ratio; the verdict
    when it changes."""
    import statistics
    import time

    print(f"{'step':>8} {'loss':>12} {'lr':>10} {'grad norm':>10} {'ratio':>10}  verdict")
    since, verdict = 0, None
    while True:
        steps = _ok(http.get(f"/v1/sessions/{session_id}/history", params={"since": since}))["history"]
        for h in steps:
            ratios = [r for r in (h.get("ratio") or {}).values() if r is not None]
            cells = [_num(h["loss"]), _num(h["lr"][0] if h["lr"] else None), _num(h["grad_norm"]),
                     _num(statistics.median(ratios) if ratios else None)]
            print(f"{h['step']:>8} {cells[0]:>12} {cells[1]:>10} {cells[2]:>10} {cells[3]:>10}"
                  + ("  skipped" if h["skipped"] else ""))
            since = h["step"] + 1
        if steps:
            found = _ok(http.get(f"/v1/sessions/{session_id}/diagnosis"))
            if found["verdict"] != verdict:
                verdict = found["verdict"]
                print(f"{'':>8} verdict: {verdict} — {found['suggestion']}")
        sys.stdout.flush()
        time.sleep(interval)


def _num(value) -> str:
    return "" if value is None else f"{value:.4g}"


class _Refused(Exception):
    pass


def _ok(response):
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise _Refused(f"{response.status_code}: {detail}")
    return response.json() if response.content else None


if __name__ == "__main__":
    sys.exit(main())
