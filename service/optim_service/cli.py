"""``optim-service serve``: run the API under uvicorn."""

from __future__ import annotations

import argparse
import os
import sys

from .observability import logging_config
from .settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optim-service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="bind address (OPTIM_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (OPTIM_PORT, default 8000)")
    serve.add_argument("--store", help="memory | sqlite:///path | redis://host:port/db (OPTIM_STORE)")
    serve.add_argument("--workers", type=int, help="worker processes (OPTIM_WORKERS, default 1)")
    args = parser.parse_args(argv)

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
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
