"""chatsse: a workbook for building, serving and load-testing SSE chat servers."""

__version__ = "0.1.0"

from chatsse.app import create_app
from chatsse.settings import Settings, SettingsError, load_settings

__all__ = ["Settings", "SettingsError", "__version__", "create_app", "load_settings"]
