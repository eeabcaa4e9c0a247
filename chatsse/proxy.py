"""nginx in front of chatsse, as a child process: its configuration rendered into a temporary
directory of its own (prefix, pid file, temp paths, access log), on a free loopback port, run
as the current user, stopped like any other server (chatsse/processes.py, chatsse/registry.py).

Used by the tests and the notebooks to show what a reverse proxy does to a stream::

    with NginxServer(chatsse.url, buffering=False) as proxy:
        proxy.url  # http://127.0.0.1:<free port>, every path proxied to chatsse

The settings that matter for SSE (README, "Behind nginx"): ``proxy_buffering`` (a buffering
proxy holds events until a buffer fills; chatsse's ``X-Accel-Buffering: no`` turns it off per
response unless nginx is told to ignore that header), ``proxy_http_version 1.1`` with an empty
``Connection`` header (kept-alive upstream connections), and ``proxy_read_timeout``, the
longest silence nginx allows between two reads from chatsse, which must outlast
``CHATSSE_SSE_KEEPALIVE_INTERVAL``.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from chatsse.processes import ServerProcess, ServerProcessError

__all__ = ["NGINX_MISSING", "NginxServer", "NginxSettings", "find_nginx"]

NGINX_MISSING: Final = "nginx not installed (apt-get install nginx)"
# Debian installs nginx in /usr/sbin, which an ordinary user's PATH often lacks.
_SBIN_DIRS: Final = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_TEMP_PATHS: Final = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def find_nginx() -> str | None:
    """The path of the ``nginx`` binary: on ``PATH``, else in the usual sbin directories."""
    found = shutil.which("nginx")
    if found is not None:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / "nginx"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _milliseconds(seconds: float) -> str:
    """nginx's time syntax, in whole milliseconds (``1500ms``)."""
    return f"{max(1, round(seconds * 1000))}ms"


@dataclass(frozen=True, slots=True)
class NginxSettings:
    """What the proxy does with a response (README, "Behind nginx").

    ``buffering``: ``proxy_buffering`` (nginx's own default is on); ``ignore_accel_buffering``:
    nginx ignores the ``X-Accel-Buffering`` header chatsse sends; ``read_timeout``:
    ``proxy_read_timeout`` in seconds; ``http_version``: ``proxy_http_version``;
    ``directives``: more lines for the ``location`` (``"gzip on"``)."""

    buffering: bool = False
    ignore_accel_buffering: bool = False
    read_timeout: float = 60.0
    http_version: str = "1.1"
    directives: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.http_version not in ("1.0", "1.1"):
            raise ValueError(f"http_version must be '1.0' or '1.1', got {self.http_version!r}")
        if not self.read_timeout > 0:
            raise ValueError(f"read_timeout must be positive, got {self.read_timeout}")
        object.__setattr__(self, "directives", tuple(self.directives))

    def config(self, *, directory: Path, listen: str, upstream: str) -> str:
        """The whole ``nginx.conf``: one worker, everything under ``directory``, every path of
        ``listen`` (``host:port``) proxied to ``upstream`` (``host:port``)."""
        user = ""
        if os.geteuid() == 0:  # else nginx ignores `user`; as root its workers would be nobody's
            user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"
        temp_paths = "".join(f"    {name}_temp_path {directory / name};\n" for name in _TEMP_PATHS)
        location = [
            "proxy_pass http://chatsse",
            f"proxy_http_version {self.http_version}",
            *(['proxy_set_header Connection ""'] if self.http_version == "1.1" else []),
            "proxy_set_header Host $host",
            "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for",
            f"proxy_buffering {'on' if self.buffering else 'off'}",
            *(["proxy_ignore_headers X-Accel-Buffering"] if self.ignore_accel_buffering else []),
            f"proxy_read_timeout {_milliseconds(self.read_timeout)}",
            *(line.rstrip("; ") for line in self.directives),
        ]
        directives = "".join(f"            {line};\n" for line in location)
        return (
            f"daemon off;\n"
            f"worker_processes 1;\n"
            f"pid {directory / 'nginx.pid'};\n"
            f"error_log stderr notice;\n"
            f"{user}"
            f"events {{\n    worker_connections 1024;\n}}\n"
            f"http {{\n"
            f"    access_log {directory / 'access.log'};\n"
            f"{temp_paths}"
            f"    upstream chatsse {{\n        server {upstream};\n        keepalive 16;\n    }}\n"
            f"    server {{\n"
            f"        listen {listen};\n"
            f"        location / {{\n"
            f"{directives}"
            f"        }}\n"
            f"    }}\n"
            f"}}\n"
        )


class NginxServer(ServerProcess):
    """nginx on a free loopback port, proxying every path to ``upstream`` (a chatsse URL), with
    ``settings`` (:class:`NginxSettings`'s fields: ``NginxServer(url, buffering=True)``). Its
    configuration, logs and temporary files live in a temporary directory, removed when it
    stops."""

    kind = "nginx"

    def __init__(
        self,
        upstream: str,
        *,
        binary: str | None = None,
        host: str = "127.0.0.1",
        name: str | None = None,
        startup_timeout: float = 30.0,
        **settings: Any,
    ) -> None:
        self.settings = NginxSettings(**settings)  # checked before the log file is made
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        hostname = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self.upstream = f"{hostname}:{parts.port}"
        super().__init__(host=host, name=name, startup_timeout=startup_timeout)
        self.binary = binary
        self.directory: Path | None = None

    def config(self) -> str:
        """The configuration this server runs with (written when it starts)."""
        if self.directory is None or self.port is None:
            raise ServerProcessError("not started")
        listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return self.settings.config(directory=self.directory, listen=listen, upstream=self.upstream)

    def command(self) -> list[str]:
        binary = self.binary or find_nginx()
        if binary is None:
            raise ServerProcessError(NGINX_MISSING)
        self.directory = directory = Path(tempfile.mkdtemp(prefix="chatsse-nginx-"))
        (directory / "nginx.conf").write_text(self.config())
        return [binary, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-e", "stderr"]

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def is_ready(self) -> bool:
        """nginx answers HTTP (any status: a 502 is nginx up and chatsse not)."""
        httpx.get(f"{self.url}/health", timeout=1)
        return True

    def access_log(self) -> str:
        """The access log: one line per request, in nginx's ``combined`` format."""
        if self.directory is None:
            return ""
        with contextlib.suppress(OSError):
            return (self.directory / "access.log").read_text(errors="replace")
        return ""

    def stop(self, *args: Any, **kwargs: Any) -> int | None:
        """Stop nginx (SIGTERM: its fast shutdown, which closes open streams) and remove its
        directory."""
        code = super().stop(*args, **kwargs)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
        return code
