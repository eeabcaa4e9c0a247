"""Every server this interpreter started and has not stopped: held strongly, so a server
whose last reference is gone (a notebook cell run again rebinds its variable) is still found
and stopped, by :func:`stop_all`, at interpreter exit, or when a server of the same ``name``
starts.

A child process has its own session (chatsse/processes.py), so nothing else would stop it: a
weak registry loses it with its last reference, and it runs on after the kernel has gone.
"""

from __future__ import annotations

import atexit
import threading
from typing import Protocol

__all__ = ["Stoppable", "register", "running", "stop_all", "unregister"]


class Stoppable(Protocol):
    def stop(self) -> object: ...


_lock = threading.Lock()
_running: dict[int, tuple[str | None, Stoppable]] = {}


def register(server: Stoppable, name: str | None = None) -> None:
    """Hold ``server`` until :func:`unregister`; first stop a running server named ``name``."""
    if name is not None:
        for previous in [s for n, s in running_named() if n == name and s is not server]:
            previous.stop()
    with _lock:
        _running[id(server)] = (name, server)


def unregister(server: Stoppable) -> None:
    with _lock:
        _running.pop(id(server), None)


def running_named() -> list[tuple[str | None, Stoppable]]:
    with _lock:
        return list(_running.values())


def running() -> list[Stoppable]:
    """The servers started and not yet stopped, oldest first."""
    return [server for _, server in running_named()]


def stop_all() -> int:
    """Stop every server still running, newest first; returns how many there were."""
    servers = running()
    for server in reversed(servers):
        server.stop()
    return len(servers)


atexit.register(stop_all)
