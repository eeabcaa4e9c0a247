"""The ``chatsse`` command: ``chatsse serve`` runs the server under uvicorn; ``chatsse keys``
makes, lists and revokes API keys; ``chatsse load`` load-tests a streaming chat server (its
plots need the ``chatsse[load]`` extra)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chatsse.loadcli import add_load_command
from chatsse.settings import SettingsError, env_name, load_settings

__all__ = ["build_parser", "main"]

APP_FACTORY = "chatsse.app:create_app"
DEFAULT_KEYS_FILE = "keys.json"


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


def _keys_file(args: argparse.Namespace) -> str:
    path: str = args.file or os.environ.get(env_name("keys_file")) or DEFAULT_KEYS_FILE
    return path


def _keys_create(args: argparse.Namespace) -> int:
    from chatsse.keys import KeyLimits, KeysFileError, create_key

    path = _keys_file(args)
    try:
        limits = KeyLimits(args.max_streams, args.requests_per_minute, args.tokens_per_minute)
        record, key = create_key(path, args.name, admin=args.admin, limits=limits)
    except (KeysFileError, ValueError) as exc:
        print(f"chatsse: {exc}", file=sys.stderr)
        return 2
    print(f"created key {record.id} ({record.name}) in {path}; it is shown this once:", file=sys.stderr)
    print(key)
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from chatsse.keys import KeysFileError, revoke_key

    path = _keys_file(args)
    try:
        record = revoke_key(path, args.id)
    except KeysFileError as exc:
        print(f"chatsse: {exc}", file=sys.stderr)
        return 2
    except KeyError:
        print(f"chatsse: no key {args.id} in {path}", file=sys.stderr)
        return 1
    print(f"revoked key {record.id} ({record.name}); servers stop accepting it within a second")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from chatsse.keys import KeysFileError, read_keys

    try:
        keys = read_keys(_keys_file(args))
    except KeysFileError as exc:
        print(f"chatsse: {exc}", file=sys.stderr)
        return 2
    for key in keys.values():
        limits = ", ".join(f"{k}={v}" for k, v in key.limits.to_dict().items() if v is not None)
        status = "revoked" if key.revoked_at is not None else ("admin" if key.admin else "active")
        print(f"{key.id}  {status:<8} {key.name}" + (f"  ({limits})" if limits else ""))
    return 0


def _add_keys_command(commands: Any) -> None:
    keys = commands.add_parser("keys", help="make, list and revoke API keys (CHATSSE_KEYS_FILE)")
    actions = keys.add_subparsers(dest="action", required=True)
    file_help = f"the keys file (default: CHATSSE_KEYS_FILE, else {DEFAULT_KEYS_FILE})"
    create = actions.add_parser("create", help="add a key and print it (once)")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--admin", action="store_true", help="may read /metrics and /stats")
    create.add_argument("--max-streams", type=int, help="streams open at once (CHATSSE_KEY_MAX_STREAMS)")
    create.add_argument(
        "--requests-per-minute", type=int, help="turns a minute (CHATSSE_KEY_REQUESTS_PER_MINUTE)"
    )
    create.add_argument(
        "--tokens-per-minute", type=int, help="tokens a minute (CHATSSE_KEY_TOKENS_PER_MINUTE)"
    )
    create.set_defaults(run=_keys_create)
    revoke = actions.add_parser("revoke", help="stop accepting a key")
    revoke.add_argument("id", help="the key's id (chatsse keys list)")
    revoke.set_defaults(run=_keys_revoke)
    listing = actions.add_parser("list", help="the keys, never the secrets")
    listing.set_defaults(run=_keys_list)
    for action in (create, revoke, listing):
        action.add_argument("--file", help=file_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatsse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the chat server (one uvicorn process)")
    serve.add_argument("--host", help="bind address (CHATSSE_HOST)")
    serve.add_argument("--port", type=int, help="port (CHATSSE_PORT)")
    serve.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"])
    serve.set_defaults(run=_serve)
    _add_keys_command(commands)
    add_load_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code
