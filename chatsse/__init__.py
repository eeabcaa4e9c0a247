"""chatsse: a workbook for building, serving and load-testing SSE chat servers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Settings", "SettingsError", "__version__", "create_app", "load_settings"]

if TYPE_CHECKING:
    from chatsse.app import create_app
    from chatsse.settings import Settings, SettingsError, load_settings


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a light module (settings, the load client) does not import the
    # server, and gunicorn's master can set up multiprocess metrics before prometheus-client
    # is first imported.
    if name == "create_app":
        from chatsse.app import create_app

        return create_app
    if name in ("Settings", "SettingsError", "load_settings"):
        from chatsse import settings

        return getattr(settings, name)
    raise AttributeError(f"module 'chatsse' has no attribute {name!r}")
