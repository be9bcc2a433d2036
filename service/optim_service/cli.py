"""``optim-service``: serve the API, manage sessions on a running server, write the OpenAPI spec."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .observability import logging_config
from .settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optim-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="bind address (OPTIM_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (OPTIM_PORT, default 8000)")
    serve.add_argument("--store", help="memory | sqlite:///path | redis://host:port/db (OPTIM_STORE)")
    serve.add_argument("--workers", type=int, help="worker processes (OPTIM_WORKERS, default 1)")

    sessions = commands.add_parser("sessions", help="list, show or delete sessions on a running server")
    sessions.add_argument("--url", default=os.environ.get("OPTIM_URL", "http://127.0.0.1:8000"),
                          help="the server (OPTIM_URL)")
    sessions.add_argument("--api-key", default=os.environ.get("OPTIM_API_KEY"), help="(OPTIM_API_KEY)")
    actions = sessions.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every session of this key, one a line")
    show = actions.add_parser("show", help="one session's metadata as JSON")
    show.add_argument("session_id")
    delete = actions.add_parser("delete", help="delete sessions")
    delete.add_argument("session_ids", nargs="+")

    spec = commands.add_parser("openapi", help="write the OpenAPI document (no server needed)")
    spec.add_argument("--output", "-o", help="file to write (default: standard output)")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "openapi":
        return _openapi(args.output)
    return _sessions(args)


def _serve(args) -> int:
    # Flags become OPTIM_* variables so every worker process builds the same Settings.
    for name in ("host", "port", "store", "workers"):
        if getattr(args, name) is not None:
            os.environ[f"OPTIM_{name.upper()}"] = str(getattr(args, name))
    settings = Settings()
    if settings.workers > 1 and settings.store == "memory":
        print("optim-service: the memory store lives inside one process, so --workers > 1 would give "
              "each worker its own sessions; use --store sqlite:///path or redis://...", file=sys.stderr)
        return 2

    import uvicorn

    uvicorn.run(
        "optim_service.app:create_app", factory=True, host=settings.host, port=settings.port,
        workers=settings.workers, log_level=settings.log_level,
        log_config=logging_config(settings.log_level), access_log=False,  # ours has the request id
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
                after = None
                print(f"{'id':<24} {'optimizer':<9} {'step':>8} {'dtype':<8} {'parameters':>12}  updated")
                while True:
                    page = _ok(http.get("/v1/sessions", params={"limit": 1000, **({"after": after} if after else {})}))
                    for s in page["sessions"]:
                        print(f"{s['id']:<24} {s['optimizer']['type']:<9} {s['step']:>8} {s['dtype']:<8} "
                              f"{s['num_parameters']:>12}  {s['updated_at']}")
                    if not (after := page["next"]):
                        return 0
            if args.action == "show":
                print(json.dumps(_ok(http.get(f"/v1/sessions/{args.session_id}")), indent=2))
                return 0
            for session_id in args.session_ids:
                _ok(http.delete(f"/v1/sessions/{session_id}"))
                print(f"deleted {session_id}")
            return 0
        except httpx.HTTPError as e:
            print(f"optim-service: cannot reach {args.url}: {e}", file=sys.stderr)
        except _Refused as e:
            print(f"optim-service: {e}", file=sys.stderr)
        return 1


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
