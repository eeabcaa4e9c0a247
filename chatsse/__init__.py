"""chatsse: a workbook for building, serving and load-testing SSE chat servers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ChatsseError", "Settings", "SettingsError", "__version__", "create_app", "load_settings"]

if TYPE_CHECKING:
    from chatsse.app import create_app
    from chatsse.errors import ChatsseError
    from chatsse.settings import Settings, SettingsError, load_settings

_LAZY = {
    "create_app": "chatsse.app",
    "ChatsseError": "chatsse.errors",
    "Settings": "chatsse.settings",
    "SettingsError": "chatsse.settings",
    "load_settings": "chatsse.settings",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a light module (settings, the load client) does not import the
    # server, and gunicorn's master can set up multiprocess metrics before prometheus-client
    # is first imported.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'chatsse' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
