"""The ``chatsse`` command: ``chatsse serve`` runs the server under uvicorn; ``chatsse load``
load-tests a streaming chat server (its plots need the ``chatsse[load]`` extra)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from chatsse.loadcli import add_load_command
from chatsse.settings import SettingsError, env_name, load_settings

__all__ = ["build_parser", "main"]

APP_FACTORY = "chatsse.app:create_app"


def _serve(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    if args.log_level:
        overrides["log_level"] = args.log_level
    try:
        settings = load_settings(**overrides)
    except SettingsError as exc:
        print(f"chatsse: {exc}", file=sys.stderr)
        return 2
    if args.reload:
        import uvicorn

        # The reloader imports the factory in a fresh process, which reads the environment.
        for key, value in overrides.items():
            os.environ[env_name(key)] = str(value)
        uvicorn.run(
            APP_FACTORY, factory=True, host=settings.host, port=settings.port, reload=True,
            reload_dirs=[str(Path(__file__).parent)], log_config=None,
        )  # fmt: skip
        return 0
    from chatsse.serving import serve

    serve(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatsse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the chat server (one uvicorn process)")
    serve.add_argument("--host", help="bind address (CHATSSE_HOST)")
    serve.add_argument("--port", type=int, help="port (CHATSSE_PORT)")
    serve.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"])
    serve.set_defaults(run=_serve)
    add_load_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code
